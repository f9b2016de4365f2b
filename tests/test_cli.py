"""`organseg` end to end through its real command line: fit (1 process and 2-process DDP), evaluate,
errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
ORGANSEG = str(Path(sys.executable).with_name("organseg"))

# every test here starts `organseg` subprocesses (each imports torch and Lightning: 15-20 s on 2 busy CPU
# cores) and several train: `make test-slow`. tests/test_errors.py checks the one-line errors in process.
pytestmark = pytest.mark.slow


def run(args, cwd, timeout=600, check=True):
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "PYTHONPATH": str(REPO / "tests") + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    proc = subprocess.run(
        [ORGANSEG, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"organseg {' '.join(args)} failed ({proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def tiny_config(tmp: Path, hn_small, record: Path, **trainer) -> Path:
    cfg = {
        "trainer": {
            "max_epochs": 2,
            "check_val_every_n_epoch": 1,
            "accelerator": "cpu",
            "devices": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "log_every_n_steps": 1,
            "callbacks": [
                {"class_path": "helpers.probes.DrawRecorder", "init_args": {"out_dir": str(record)}}
            ],
            **trainer,
        },
        "model": {
            "init_args": {
                "filters": [8, 16, 32],
                "strides": [[1, 1, 1], [2, 2, 1], [2, 2, 2]],
                "hd95_every_n_epochs": 2,
            }
        },
        "data": {
            "init_args": {
                "cards": [str(hn_small["card"])],
                "patch_size": [48, 48, 16],
                "batch_size": 2,
                "patches_per_epoch": 8,
                "num_workers": 0,
                "augmentation": None,
            }
        },
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def fitted(hn_small, tmp_path_factory):
    """One single-process fit shared by the checkpoint/evaluate tests."""
    tmp = tmp_path_factory.mktemp("fit1")
    cfg = tiny_config(tmp, hn_small, tmp / "record")
    run(
        [
            "fit",
            "-c",
            str(REPO / "experiments/baseline/unet.yaml"),
            "-c",
            str(REPO / "data_modules/hn_phantom.yaml"),
            "-c",
            str(cfg),
            "--trainer.logger.init_args.id=tiny1",
        ],
        cwd=tmp,
    )
    return tmp, tmp / "lightning_logs/organseg/tiny1"


def test_help_lists_subcommands_and_each_has_help(tmp_path):
    out = run(["--help"], cwd=tmp_path).stdout
    for sub in ("fit", "validate", "test", "predict", "phantom", "preprocess", "evaluate"):
        assert sub in out
    for sub in (["phantom", "hn"], ["phantom", "abdomen"], ["preprocess"], ["evaluate"], ["fit"], ["test"]):
        assert run([*sub, "--help"], cwd=tmp_path).returncode == 0


def test_fit_writes_checkpoint_config_and_wandb_run(fitted):
    tmp, run_dir = fitted
    ckpts = {p.name for p in (run_dir / "checkpoints").glob("*.ckpt")}
    assert "last.ckpt" in ckpts and any(n.startswith("epoch") for n in ckpts)
    config = yaml.safe_load((run_dir / "config_fit.yaml").read_text())
    assert config["model"]["class_path"] == "organseg.methods.UNetBaseline"
    ckpt = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["num_classes"] == 18  # linked from the card, not configured
    extra = ckpt["organseg"]
    assert (
        extra["cards"][0]["name"] == "hn_small"
        and len(extra["classes"]) == 18
        and "trainer:" in extra["config"]
    )
    assert list((tmp / "lightning_logs/wandb").glob("offline-run-*-tiny1/run-tiny1.wandb"))
    record = json.loads((tmp / "record/rank0.json").read_text())
    assert record["metrics"]["val/cases"] == 1.0 and "val/dice/chiasm" in record["metrics"]
    assert "train/loss_focal_epoch" in record["metrics"] and "train/loss_dice_epoch" in record["metrics"]
    assert "val/hd95/brainstem" in record["metrics"]  # HD95 on epoch 2 (hd95_every_n_epochs=2)


def test_evaluate_from_checkpoint_alone(fitted, tmp_path):
    _, run_dir = fitted
    out = tmp_path / "eval"
    proc = run(
        ["evaluate", "--ckpt", str(run_dir / "checkpoints/last.ckpt"), "--out", str(out), "--overlays", "1"],
        cwd=tmp_path,
    )
    assert "| organ | Dice |" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["per_organ"]) >= {"brainstem", "lens_l", "chiasm"} and summary["split"] == "test"
    rows = (out / "per_case.csv").read_text().splitlines()
    assert len(rows) == 1 + 17  # one test case x 17 organs
    assert len(list((out / "overlays").glob("*.png"))) == 1


def test_evaluate_rejects_a_foreign_checkpoint_in_one_line(tmp_path):
    bad = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, bad)
    proc = run(["evaluate", "--ckpt", str(bad)], cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().count("\n") == 0
        and "not an organseg checkpoint" in proc.stderr
        and str(bad) in proc.stderr
    )
    missing = run(["evaluate", "--ckpt", str(tmp_path / "nope.ckpt")], cwd=tmp_path, check=False)
    assert missing.returncode == 2 and "file not found" in missing.stderr


@pytest.mark.parametrize(
    "bad, expected",
    [
        (
            ["--model.init_args.learning_rate=0.1"],
            "Option 'learning_rate' is not accepted",
        ),  # key typo on the CLI
        (["-c", "TYPO_YAML"], "Option 'lrr' is not accepted"),  # key typo in a file
        (["--trainer.max_epochz=3"], "unrecognized arguments: --trainer.max_epochz=3"),
        (["--trainer.max_epochs=abc"], 'Parser key "trainer.max_epochs"'),
        (["-c", "/nonexistent/exp.yaml"], "/nonexistent/exp.yaml"),  # config not found
        (
            ["--data.init_args.cards=[/nonexistent/card.yaml]"],
            "/nonexistent/card.yaml: dataset card not found",
        ),
    ],
)
def test_fit_reports_bad_config_in_one_line(tmp_path, bad, expected):
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  init_args:\n    lrr: 0.1\n")
    bad = [str(typo) if b == "TYPO_YAML" else b for b in bad]
    proc = run(
        [
            "fit",
            "-c",
            str(REPO / "experiments/baseline/unet.yaml"),
            "-c",
            str(REPO / "data_modules/hn_phantom.yaml"),
            *bad,
        ],
        cwd=tmp_path,
        check=False,
    )
    err = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("Seed set")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(err) == 1 and err[0].startswith("organseg fit: error:") and expected in err[0], proc.stderr[
        -3000:
    ]
    assert not (tmp_path / "lightning_logs/organseg").exists() or not any(
        (tmp_path / "lightning_logs/organseg").iterdir()
    )


@pytest.mark.ddp
def test_ddp_two_cpu_processes_draw_distinct_patches_and_validate_each_case_once(hn_small, tmp_path):
    record = tmp_path / "record"
    cfg = tiny_config(tmp_path, hn_small, record, strategy="ddp", devices=2)
    run(
        [
            "fit",
            "-c",
            str(REPO / "experiments/baseline/unet.yaml"),
            "-c",
            str(REPO / "data_modules/hn_phantom.yaml"),
            "-c",
            str(cfg),
            "--trainer.logger.init_args.id=ddp1",
        ],
        cwd=tmp_path,
        timeout=900,
    )
    ranks = [json.loads((record / f"rank{r}.json").read_text()) for r in range(2)]
    assert {r["world"] for r in ranks} == {2} and ranks[0]["pid"] != ranks[1]["pid"]
    draws = [{(e, c, tuple(loc)) for e, c, loc in r["train"]} for r in ranks]
    assert (
        len(ranks[0]["train"]) == len(ranks[1]["train"]) == 8
    )  # 8 patches/epoch split over 2 ranks x 2 epochs
    assert not draws[0] & draws[1]  # distinct data on each rank
    for epoch in range(2):
        cases = [c for r in ranks for e, c in r["val"] if e == epoch]
        assert len(cases) == 1  # the 1 val case, once, on one rank
    assert ranks[0]["metrics"]["val/cases"] == ranks[1]["metrics"]["val/cases"] == 1.0
    assert ranks[0]["metrics"]["val/dice_mean"] == pytest.approx(ranks[1]["metrics"]["val/dice_mean"])
