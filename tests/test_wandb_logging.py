"""What an `organseg fit` logs to W&B, read back from the offline run's own transaction log
(`run-<id>.wandb`, W&B's protobuf records): every loss term, per-organ val Dice/HD95, the mean and
best-so-far Dice, contour images, and the resolved config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from organseg.runtime.wandb_runs import find_run_file, iter_payloads, read_run

REPO = Path(__file__).resolve().parents[1]


def tiny_config(tmp: Path, hn_small) -> Path:
    cfg = {
        "trainer": {
            "max_epochs": 2,
            "check_val_every_n_epoch": 1,
            "accelerator": "cpu",
            "devices": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "log_every_n_steps": 1,
        },
        "model": {
            "init_args": {
                "filters": [8, 16, 32],
                "strides": [[1, 1, 1], [2, 2, 1], [2, 2, 2]],
                "hd95_every_n_epochs": 1,
            }
        },
        "data": {
            "init_args": {
                "cards": [str(hn_small["card"])],
                "patch_size": [48, 48, 16],
                "batch_size": 2,
                "patches_per_epoch": 4,
                "num_workers": 0,
                "augmentation": None,
            }
        },
        "val_images": {"n_slices": 2},
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def wandb_run(hn_small, tmp_path_factory):
    """One in-process fit (offline W&B), read back from its .wandb file."""
    import os

    import wandb

    from organseg.cli.main import main

    tmp = tmp_path_factory.mktemp("wandb_fit")
    cwd, mode = os.getcwd(), os.environ.get("WANDB_MODE")
    os.chdir(tmp)
    os.environ["WANDB_MODE"] = "offline"  # the .wandb file is what is read back
    try:
        assert (
            main(
                [
                    "fit",
                    "-c",
                    str(REPO / "experiments/baseline/unet.yaml"),
                    "-c",
                    str(REPO / "data_modules/hn_phantom.yaml"),
                    "-c",
                    str(tiny_config(tmp, hn_small)),
                    "--trainer.logger.init_args.id=wbtest",
                ]
            )
            == 0
        )
        wandb.finish()  # Lightning leaves the run open; finishing flushes the transaction log
        wandb.teardown()  # stop this process's wandb service (child processes of later tests must not use it)
    finally:
        os.chdir(cwd)
        if mode is None:
            os.environ.pop("WANDB_MODE", None)
        else:
            os.environ["WANDB_MODE"] = mode
    path = find_run_file(tmp / "lightning_logs/wandb", "wbtest")
    assert path is not None, sorted(str(p) for p in (tmp / "lightning_logs").rglob("*"))
    return tmp, read_run(path)


def test_every_loss_term_and_metric_is_its_own_key(wandb_run, hn_small):
    _, run = wandb_run
    assert run.run_id == "wbtest" and run.exit_code == 0
    keys = run.keys()
    for term in ("loss", "loss_focal", "loss_dice"):  # UNetBaseline's terms (docs/architecture.md §4.7)
        assert f"train/{term}" in keys and f"train/{term}_epoch" in keys, sorted(keys)
    organs = yaml.safe_load(Path(hn_small["card"]).read_text())["classes"][1:]
    for organ in organs:
        assert f"val/dice/{organ}" in keys, organ
    assert {"val/dice_mean", "val/dice_best", "val/hd95/brainstem", "val/hd95/mandible"} <= keys
    val_rows = [r for r in run.history if "val/dice_mean" in r]
    assert len(val_rows) == 2  # one per validation (2 epochs)
    means = [r["val/dice_mean"] for r in val_rows]
    bests = [r["val/dice_best"] for r in val_rows]
    assert bests == pytest.approx([means[0], max(means)])  # best so far, not the last
    assert all(0.0 <= d <= 1.0 for d in means)
    assert run.summary["val/dice_best"] == pytest.approx(max(means))  # what a sweep optimises


def test_contour_images_are_logged_each_validation(wandb_run):
    tmp, run = wandb_run
    rows = [r for r in run.history if "val/contours" in r]
    assert len(rows) == 2
    media = rows[-1]["val/contours"]
    assert media["_type"].startswith("images") and media["count"] == 1, media
    run_dir = run.path.parent
    assert (run_dir / "files" / media["filenames"][0]).is_file()
    assert media["captions"][0].startswith("hn_") and "solid reference" in media["captions"][0]
    assert rows[-1]["trainer/global_step"] == max(r.get("trainer/global_step", 0) for r in run.history)
    pngs = sorted(p.name for p in (tmp / "lightning_logs/organseg/wbtest/val_images").glob("*.png"))
    assert pngs == ["epoch000.png", "epoch001.png"]


def test_resolved_config_is_the_run_config(wandb_run):
    _, run = wandb_run
    cli = run.config["cli"]  # RunConfigCallback: the whole composed config
    assert cli["model"]["class_path"] == "organseg.methods.UNetBaseline"
    assert cli["model"]["init_args"]["filters"] == [8, 16, 32] and cli["val_images"]["n_slices"] == 2
    assert cli["data"]["init_args"]["patch_size"] == [48, 48, 16] and cli["trainer"]["max_epochs"] == 2
    assert run.config["lr"] == pytest.approx(0.002) and run.config["num_classes"] == 18  # module hparams


def test_reader_rejects_a_file_that_is_not_a_wandb_log(tmp_path):
    bad = tmp_path / "run-x.wandb"
    bad.write_bytes(b"not a log")
    with pytest.raises(ValueError, match="not a W&B transaction log"):
        list(iter_payloads(bad))
