"""W&B sweeps: the shipped sweep YAMLs are valid for W&B's engine and for `organseg fit`, and
`organseg sweep` runs one locally (W&B's `sweeps` engine proposing, real `organseg fit` trials)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from organseg.cli import sweep
from organseg.cli.main import main
from organseg.runtime.wandb_runs import find_run_file, read_run

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / "experiments/sweeps").glob("*.yaml"))


def test_sweep_yamls_exist_for_every_method():
    names = {p.stem for p in SWEEPS}
    assert {"baseline_unet", "focusnetv2_snet", "focusnetv2_sol", "focusnetv2_joint", "cowam"} <= names


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_shipped_sweep_passes_the_engine_schema_and_runs_organseg_fit(path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sweeps import schema_violations_from_proposed_config

    raw = yaml.safe_load(path.read_text())
    assert schema_violations_from_proposed_config(raw) == []
    cfg = sweep.load_sweep(path)
    assert cfg["metric"]["goal"] in ("maximize", "minimize") and cfg["program"] == "organseg"
    fit_args = sweep.fit_command(cfg, path)
    assert fit_args[-1] == "${args}" and fit_args[0] == "-c" and (REPO / fit_args[1]).is_file()
    configs = [fit_args[i + 1] for i, a in enumerate(fit_args) if a == "-c"]
    assert all((REPO / c).is_file() for c in configs) and len(configs) == 2  # method config + data config
    assert all(
        key.startswith(("model.init_args.", "data.init_args.", "trainer.")) for key in cfg["parameters"]
    )


def test_shipped_sweep_parameters_are_keys_of_their_composed_config(monkeypatch):
    """Every parameter name and listed value of every shipped sweep parses with its command's configs
    (catches a renamed init arg before anyone starts a sweep)."""
    monkeypatch.chdir(REPO)
    for path in SWEEPS:
        cfg = sweep.load_sweep(path)
        composed = sweep.check_parameters(cfg, sweep.fit_command(cfg, path), path)
        assert composed["model"]["class_path"].startswith("organseg.methods")


def test_args_are_rendered_as_wandb_agent_renders_them():
    fit_args = ["-c", "a.yaml", "${args}"]
    argv = sweep.trial_args(
        fit_args,
        {"model.init_args.lr": {"value": 0.001}, "data.init_args.patch_size": {"value": [48, 48, 16]}},
    )
    assert argv == ["-c", "a.yaml", "--model.init_args.lr=0.001", "--data.init_args.patch_size=[48, 48, 16]"]


def test_engine_numpy_proposals_become_plain_values_before_rendering():
    """The engine proposes numpy scalars; under numpy 2 their repr is ``np.float64(x)``, which must not
    reach ``${args}`` or the results table (CI resolves numpy 2)."""
    proposed = {"lr": np.float64(0.003), "patch": [np.int64(48), np.int64(16)], "name": "a"}
    native = {k: sweep._native(v) for k, v in proposed.items()}
    assert native == {"lr": 0.003, "patch": [48, 16], "name": "a"}
    assert type(native["lr"]) is float and all(type(x) is int for x in native["patch"])
    argv = sweep.trial_args(["${args}"], {k: {"value": v} for k, v in native.items()})
    assert argv == ["--lr=0.003", "--patch=[48, 16]", "--name=a"]
    assert sweep._fmt(native["lr"], full=True) == "0.003"


def write_tiny_sweep(tmp: Path, hn_small, parameters: dict, method: str = "random") -> Path:
    tiny = {
        "trainer": {
            "max_epochs": 1,
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
                "hd95_every_n_epochs": 0,
            }
        },
        "data": {
            "init_args": {
                "cards": [str(hn_small["card"])],
                "batch_size": 2,
                "patches_per_epoch": 4,
                "num_workers": 0,
                "augmentation": None,
            }
        },
        "val_images": {"n_slices": 0},
    }
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    spec = {
        "name": "tiny",
        "program": "organseg",
        "method": method,
        "metric": {"name": "val/dice_best", "goal": "maximize"},
        "parameters": parameters,
        "command": [
            "${env}",
            "${program}",
            "fit",
            "-c",
            str(REPO / "experiments/baseline/unet.yaml"),
            "-c",
            str(REPO / "data_modules/hn_phantom.yaml"),
            "-c",
            str(tmp / "tiny.yaml"),
            "${args}",
        ],
    }
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.slow
def test_two_trial_random_sweep_on_the_phantom_ranks_the_trials(hn_small, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = write_tiny_sweep(
        tmp_path,
        hn_small,
        {
            "model.init_args.lr": {"distribution": "log_uniform_values", "min": 0.0001, "max": 0.01},
            "data.init_args.patch_size": {"values": [[48, 48, 16]]},  # a list value through ${args}
            "trainer.max_steps": {"value": 2},
        },
    )
    assert main(["sweep", str(path), "--count", "2", "--out", "results", "--seed", "0"]) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "results/results.csv").open()))
    assert len(rows) == 2 and all(r["state"] == "finished" for r in rows), rows
    scores = [float(r["val/dice_best"]) for r in rows]
    lrs = {float(r["model.init_args.lr"]) for r in rows}
    assert len(lrs) == 2 and all(0.0001 <= lr <= 0.01 for lr in lrs)  # two proposals of the engine
    assert scores == sorted(scores, reverse=True) and [r["rank"] for r in rows] == ["1", "2"]
    assert "| rank | run | val/dice_best | model.lr | data.patch_size | trainer.max_steps |" in printed
    assert (tmp_path / "results/results.md").read_text() in printed
    for r in rows:
        run_dir = tmp_path / r["run_dir"]
        assert (run_dir / "checkpoints/last.ckpt").is_file()
        config = yaml.safe_load((run_dir / "config_fit.yaml").read_text())
        # the trial's ${args} reached LightningCLI: the run's resolved config has the proposed values
        assert config["model"]["init_args"]["lr"] == pytest.approx(float(r["model.init_args.lr"]))
        assert (
            config["data"]["init_args"]["patch_size"]
            == [48, 48, 16]
            == yaml.safe_load(r["data.init_args.patch_size"])
        )
        assert config["trainer"]["max_steps"] == 2
        log = read_run(find_run_file(tmp_path / "lightning_logs/wandb", r["run_id"]))
        assert log.summary["val/dice_best"] == pytest.approx(float(r["val/dice_best"]))  # the W&B summary
        assert (
            log.exit_code == 0
            and log.config["cli"]["model"]["init_args"]["lr"] == config["model"]["init_args"]["lr"]
        )


def test_a_failed_trial_is_recorded_and_ranked_last(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "ORGANSEG", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"])
    bad = sweep.Trial(0, "x-t00", {"model.init_args.lr": 0.1})
    sweep.run_trial(bad, ["${args}"], tmp_path, tmp_path, "val/dice_best", "g", timeout=60)
    assert bad.state == "failed" and "exit 3" in bad.note and "boom" in bad.note
    good = sweep.Trial(1, "x-t01", {"model.init_args.lr": 0.01}, state="finished", metric=0.5)
    cfg = {
        "name": "t",
        "method": "random",
        "metric": {"name": "val/dice_best", "goal": "maximize"},
        "parameters": {"model.init_args.lr": {"values": [0.1, 0.01]}},
    }
    sweep.write_results([bad, good], cfg, tmp_path)
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [(r["run_id"], r["rank"], r["state"]) for r in rows] == [
        ("x-t01", "1", "finished"),
        ("x-t00", "", "failed"),
    ]


def test_unknown_parameter_is_a_one_line_error_before_any_trial(hn_small, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = write_tiny_sweep(tmp_path, hn_small, {"model.init_args.learning_rate": {"values": [0.001, 0.01]}})
    assert main(["sweep", str(path), "--count", "2", "--out", "results"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(path) in err
    assert (
        "unknown parameter 'model.init_args.learning_rate'" in err
        and "did you mean model.init_args.lr" in err
    )
    assert not (tmp_path / "results").exists()  # nothing ran, nothing written


def test_a_yaml_the_engine_rejects_is_a_one_line_error(hn_small, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = write_tiny_sweep(
        tmp_path, hn_small, {"model.init_args.lr": {"values": [0.001]}}, method="annealing"
    )
    assert main(["sweep", str(path), "--count", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a valid W&B sweep config" in err and "annealing" in err
