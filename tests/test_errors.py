"""Typed errors: a user error (bad option, file, checkpoint, card) is ONE line on stderr with exit status 2,
for the LightningCLI commands and the tool commands alike; anything else (a bug, an error inside torch)
propagates with its traceback. No path heuristics: what counts is the class (``organseg.errors``)."""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import pkgutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import organseg
from helpers.checkpoints import tiny_unet_checkpoint
from helpers.tiny_fit import KEEP, SNET, TINY_FOCUSNET, TINY_UNET, tiny_fit_args
from organseg.cli.main import main
from organseg.errors import (
    CheckpointError,
    ConfigError,
    InputError,
    OrgansegError,
    OutputError,
    UsageError,
)

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src/organseg"


def one_line(capsys, command: str) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith("Seed set")]
    assert len(err) == 1, err
    assert err[0].startswith(f"organseg {command}: error: "), err[0]
    return err[0]


# ------------------------------------------------------------------------------------ the classes
def all_modules() -> list:
    return [importlib.import_module(m.name) for m in pkgutil.walk_packages(organseg.__path__, "organseg.")]


def test_every_error_class_in_the_package_is_an_organseg_error():
    """Every exception class organseg defines is one a user can cause and fix, so each derives from
    OrgansegError; the ones that replaced a ValueError still are one (``pytest.raises(ValueError)``)."""
    defined = {
        cls
        for module in all_modules()
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, BaseException)
        and not issubclass(cls, Warning)
        and cls.__module__.startswith("organseg")
    }
    assert {c.__name__ for c in defined} >= {
        "OrgansegError",
        "ConfigError",
        "InputError",
        "CheckpointError",
        "OutputError",
        "UsageError",
        "CardError",
        "CaseError",
        "DicomError",
        "CacheError",
        "PseudoLabelError",
    }
    assert [c for c in defined if not issubclass(c, OrgansegError)] == []
    # not value errors: an output location, a command line, a benchmark step that failed (its log is named)
    from organseg.cli.bench import BenchError

    assert [
        c.__name__
        for c in defined
        if c is not OrgansegError
        and c not in (OutputError, UsageError, BenchError)
        and not issubclass(c, ValueError)
    ] == []
    assert issubclass(OutputError, OSError) and not issubclass(UsageError, ValueError)


def test_domain_errors_keep_their_place_and_are_user_errors():
    from organseg.cache.reader import CacheError
    from organseg.data.pseudo_labels import PseudoLabelError
    from organseg.io.card import CardError
    from organseg.io.dicom import DicomError
    from organseg.io.layouts import CaseError

    for cls in (
        CardError,
        CaseError,
        DicomError,
        CacheError,
        PseudoLabelError,
        ConfigError,
        InputError,
        CheckpointError,
    ):
        assert issubclass(cls, OrgansegError) and issubclass(cls, ValueError), cls


def test_no_user_error_class_or_path_heuristic_in_the_cli():
    import organseg.cli.lightning as lightning
    import organseg.cli.main as cli_main

    assert not hasattr(cli_main, "UserError") and not hasattr(lightning, "user_error_in")
    tree = ast.parse((SRC / "cli/lightning.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "organseg.cli.main" not in imported  # the main <-> lightning cycle is gone
    for path in (SRC / "cli").glob("*.py"):  # no telling errors apart by file path
        assert "co_filename" not in path.read_text() and "tb_frame" not in path.read_text(), path


def test_user_error_is_found_along_the_chain():
    from organseg.cli.main import user_error

    cause = ConfigError("model x: bad")
    try:
        try:
            raise cause
        except ConfigError as exc:
            raise TypeError('Parser key "model": wrapped') from exc  # as jsonargparse wraps it
    except TypeError as wrapped:
        assert user_error(wrapped) is cause
    assert user_error(ValueError("from torch")) is None


# ------------------------------------------------------------------------------ tool commands
def test_tool_user_errors_are_one_line_exit_2(hn_small, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cases = [
        (["phantom", "hn", "--out", str(tmp_path / "p"), "--cases", "0"], "--cases must be at least 1"),
        (["phantom", "hn", "--out", str(blocker / "sub"), "--cases", "1"], "Not a directory"),  # bad --out
        (["preprocess", str(hn_small["card"]), "--workers", "0"], "--workers must be >= 1"),
        (["preprocess", str(tmp_path / "nope.yaml")], "dataset card not found"),
        (["evaluate", "--ckpt", str(tmp_path / "nope.ckpt")], "file not found"),
        (
            [
                "predict",
                "--ckpt",
                "x.ckpt",
                "--input",
                str(tmp_path / "nope.nii.gz"),
                "--out",
                str(tmp_path / "o"),
            ],
            "no such file or folder",
        ),
        (["sweep", str(tmp_path / "nope.yaml")], "file not found"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        assert expected in one_line(capsys, argv[0]), argv


def test_existing_dicom_folder_is_a_one_line_error(tmp_path, capsys):
    dicom = tmp_path / "dicom"
    (dicom / "hn_000").mkdir(parents=True)
    argv = [
        "phantom",
        "hn",
        "--out",
        str(tmp_path / "raw"),
        "--cases",
        "1",
        "--quiet",
        "--workers",
        "1",
        "--shape",
        "64",
        "64",
        "16",
        "--spacing",
        "3",
        "3",
        "9",
        "--dicom",
        str(dicom),
    ]
    assert main(argv) == 2
    assert "already exists; not overwriting a DICOM folder" in one_line(capsys, "phantom")


def test_organseg_debug_shows_the_traceback_of_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ORGANSEG_DEBUG", "1")
    with pytest.raises(ConfigError, match="--cases must be at least 1"):
        main(["phantom", "hn", "--out", str(tmp_path / "p"), "--cases", "0"])


def test_a_plain_value_error_in_a_tool_command_keeps_its_traceback(hn_small, monkeypatch):
    """The old blanket ``except (ValueError, OSError)`` would have printed this as a user error."""
    import organseg.cli.preprocess

    def broken(*args, **kwargs):
        raise ValueError("an internal precondition failed")

    monkeypatch.setattr(organseg.cli.preprocess, "build_cache", broken)
    with pytest.raises(ValueError, match="an internal precondition failed"):
        main(["preprocess", str(hn_small["card"])])


@pytest.fixture(scope="module")
def tiny_ckpt(hn_small, tmp_path_factory) -> Path:
    """A real UNetBaseline checkpoint after one training step (tests/helpers/checkpoints.py)."""
    from organseg.io.card import DatasetCard

    return tiny_unet_checkpoint(DatasetCard.load(hn_small["card"]), tmp_path_factory.mktemp("ckpt"))


TORCH_SAYS = {
    "ValueError": (ValueError, "same number of spatial dimensions"),
    "RuntimeError": (RuntimeError, "input to conv3d"),
}


def raised_in_torch(info) -> bool:
    return "/torch/" in str(info.traceback[-1].path)


def _internal_check_fails(self, x):
    """A plain ValueError from organseg's own code (an internal precondition, no user error): the old
    rule (\"raised in a file under /organseg/\") printed this as one line and hid the traceback."""
    from organseg.spatial.roi import crop_rois

    return crop_rois(x[0], torch.zeros(1, 3), (8, 8, 8))


def _wrong_shape_forward(kind: str):
    """A forward that feeds the network a wrong-shaped tensor: torch raises (a bug, not a user error)."""

    def forward(self, x):
        if kind == "ValueError":
            return self.net(F.interpolate(x, size=(8, 8)))  # 2 sizes for 3 spatial dims: torch's ValueError
        return self.net(x[0, 0])  # a 3-D tensor into Conv3d: torch's RuntimeError

    return forward


@pytest.mark.parametrize("kind", ["ValueError", "RuntimeError"])
def test_a_torch_error_in_predict_keeps_its_traceback(hn_small, tiny_ckpt, tmp_path, monkeypatch, kind):
    from organseg.methods import UNetBaseline

    image = hn_small["raw"] / "imagesTr/hn_000_0000.nii.gz"
    monkeypatch.setattr(UNetBaseline, "forward", _wrong_shape_forward(kind))
    error, message = TORCH_SAYS[kind]
    with pytest.raises(error, match=message) as info:
        main(["predict", "--ckpt", str(tiny_ckpt), "--input", str(image), "--out", str(tmp_path / "out")])
    assert not isinstance(info.value, OrgansegError) and raised_in_torch(info)


# ----------------------------------------------------------------------------- fit (LightningCLI)
def fit_args(hn_small, tmp_path: Path, **model) -> list[str]:
    """A tiny U-Net ``organseg fit`` on hn_small (tests/helpers/tiny_fit.py); ``model`` adds init args."""
    return tiny_fit_args(hn_small["card"], tmp_path, model={**TINY_UNET, **model})


@pytest.mark.parametrize(
    "extra, expected",
    [
        (
            ["--data.init_args.cards=[/nonexistent/card.yaml]"],
            "/nonexistent/card.yaml: dataset card not found",
        ),
        (["--model.init_args.filters=[8, 16]"], "filters (2) and strides (3) must have one entry per level"),
        (["--model.init_args.class_weights=[1.0, 2.0]"], "class_weights has 2 entries, expected 18"),
        (["--trainer.max_epochz=3"], "unrecognized arguments: --trainer.max_epochz=3"),
    ],
)
def test_fit_user_errors_are_one_line_exit_2(hn_small, tmp_path, monkeypatch, capsys, extra, expected):
    monkeypatch.chdir(tmp_path)
    assert main([*fit_args(hn_small, tmp_path), *extra]) == 2
    assert expected in one_line(capsys, "fit")


def test_fit_usage_error_is_typed(hn_small, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ORGANSEG_DEBUG", "1")
    with pytest.raises(UsageError, match="max_epochz"):
        main([*fit_args(hn_small, tmp_path), "--trainer.max_epochz=3"])


@pytest.mark.parametrize("kind", ["ValueError", "RuntimeError"])
def test_a_torch_error_during_fit_keeps_its_traceback(hn_small, tmp_path, monkeypatch, kind):
    from organseg.methods import UNetBaseline

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(UNetBaseline, "forward", _wrong_shape_forward(kind))
    error, message = TORCH_SAYS[kind]
    with pytest.raises(error, match=message) as info:
        main(fit_args(hn_small, tmp_path, class_weights=[1.0] * 18))
    assert not isinstance(info.value, OrgansegError) and raised_in_torch(info)


def test_a_plain_value_error_of_organseg_during_fit_keeps_its_traceback(hn_small, tmp_path, monkeypatch):
    from organseg.methods import UNetBaseline

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(UNetBaseline, "forward", _internal_check_fails)
    with pytest.raises(ValueError, match=r"crop_rois needs \[B,C,X,Y,Z\]") as info:
        main(fit_args(hn_small, tmp_path, class_weights=[1.0] * 18))
    assert not isinstance(info.value, OrgansegError)
    assert str(info.traceback[-1].path).endswith("organseg/spatial/roi.py")


# ------------------------------------------------- paths and sizes checked before any work (issue 11)
@pytest.fixture
def work(monkeypatch) -> list[str]:
    """Records whether the DataModule started any work (building caches, opening them)."""
    from organseg.data.datamodule import CTDataModule

    calls: list[str] = []
    monkeypatch.setattr(CTDataModule, "prepare_data", lambda self: calls.append("prepare_data"))
    monkeypatch.setattr(CTDataModule, "setup", lambda self, stage=None: calls.append(f"setup {stage}"))
    return calls


def nothing_written(root: Path) -> bool:
    return not (root / "lightning_logs/organseg").exists() and not list(root.rglob("*.ckpt"))


def only_line(capsys, command: str) -> str:
    """The error, alone on stderr: checked before Lightning prints anything (not even "Seed set")."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"organseg {command}: error: "), err
    return err[0]


@pytest.mark.parametrize("command", ["fit", "validate", "test"])
def test_a_missing_ckpt_path_is_one_line_before_any_work(
    hn_small, tmp_path, monkeypatch, capsys, work, command
):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "missing.ckpt"
    assert main([command, *fit_args(hn_small, tmp_path)[1:], f"--ckpt_path={missing}"]) == 2
    assert only_line(capsys, command) == (
        f"organseg {command}: error: ckpt_path: checkpoint {missing}: file not found"
    )
    assert work == [] and nothing_written(tmp_path)


def test_a_foreign_or_unreadable_ckpt_path_is_one_line(hn_small, tmp_path, monkeypatch, capsys, work):
    monkeypatch.chdir(tmp_path)
    foreign, garbage = tmp_path / "foreign.pt", tmp_path / "garbage.pt"
    torch.save({"state_dict": {}}, foreign)
    garbage.write_text("not a checkpoint")
    for path, expected in ((foreign, "not an organseg checkpoint"), (garbage, "cannot be read")):
        assert main(["test", *fit_args(hn_small, tmp_path)[1:], f"--ckpt_path={path}"]) == 2
        assert f"ckpt_path: checkpoint {path}: {expected}" in one_line(capsys, "test")
    assert work == []


@pytest.mark.parametrize(
    "extra, expected",
    [
        (
            ["--data.init_args.patch_size=[-48, 48, 16]"],
            "data.init_args.patch_size: must be 3 positive integers (x, y, z voxels), got [-48, 48, 16]",
        ),
        (["--data.init_args.patch_size=[48, 0, 16]"], "data.init_args.patch_size: must be 3 positive"),
        (["--data.init_args.patch_size=[48, 48]"], "positive integers (x, y, z voxels), got [48, 48]"),
        (
            ["--data.init_args.patch_size=[50, 48, 16]"],  # the tiny U-Net's strides multiply to (4, 4, 2)
            "data.init_args.patch_size: [50, 48, 16] must be a multiple of [4, 4, 2] per axis for "
            "UNetBaseline (its network downsamples that much), e.g. [48, 48, 16]",
        ),
        (["--data.init_args.batch_size=0"], "data.init_args.batch_size: must be an integer >= 1, got 0"),
        (
            ["--data.init_args.patches_per_epoch=0"],
            "data.init_args.patches_per_epoch: must be an integer >= 1",
        ),
        (["--data.init_args.num_workers=-1"], "data.init_args.num_workers: must be an integer >= 0, got -1"),
        (["--data.init_args.foreground_probability=1.5"], "foreground_probability: must be a probability"),
        (["--data.init_args.val_split=vall"], "data.init_args.val_split: unknown split 'vall'"),
        (["--data.init_args.dataset_weights=[1, 2]"], "dataset_weights: has 2 entries for 1 cards"),
        (["--data.init_args.augmentation={affine_pp: 0.3}"], "augmentation: unknown key(s) ['affine_pp']"),
        (
            ["--data.init_args.augmentation={spatial: sitk}"],
            "data.init_args.augmentation: spatial must be one of ['composed', 'torchio'], got 'sitk'",
        ),
        (
            ["--data.init_args.pseudo_labels=[/nonexistent/pseudo.h5]"],
            "data.init_args.pseudo_labels: /nonexistent/pseudo.h5: pseudo-label file not found",
        ),
        (
            ["--data.init_args.cards=[/nonexistent/card.yaml]"],
            "data.init_args.cards: /nonexistent/card.yaml: dataset card not found",
        ),
    ],
)
def test_bad_sizes_and_paths_name_their_key_before_any_work(
    hn_small, tmp_path, monkeypatch, capsys, work, extra, expected
):
    monkeypatch.chdir(tmp_path)
    assert main([*fit_args(hn_small, tmp_path), *extra]) == 2
    # the divisibility needs the model (built after Lightning sets the seed); the rest is checked at once
    line = one_line(capsys, "fit") if "must be a multiple of" in expected else only_line(capsys, "fit")
    assert expected in line
    assert work == [] and nothing_written(tmp_path)


def test_data_module_checks_its_arguments_outside_the_cli_too(hn_small):
    from organseg.data import CTDataModule

    with pytest.raises(
        ConfigError, match=r"^CTDataModule.patch_size: must be 3 positive .* got \[96, -1, 32\]$"
    ):
        CTDataModule([str(hn_small["card"])], patch_size=(96, -1, 32))


def snet_args(hn_small, tmp_path: Path, **trainer) -> list[str]:
    """``organseg fit`` of a tiny FocusNetV2 S-Net stage on hn_small (the stage keeps its other parts
    frozen, in eval mode); no logger, no validation, no loader workers."""
    return tiny_fit_args(
        hn_small["card"],
        tmp_path,
        SNET,
        model={**TINY_FOCUSNET, "class_weights": [1.0] * 18},
        trainer={"max_steps": 2, **trainer},
        data={"patches_per_epoch": 4},
    )


def test_a_missing_init_from_is_one_line_before_any_work(hn_small, tmp_path, monkeypatch, capsys, work):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "snet.ckpt"
    assert main([*snet_args(hn_small, tmp_path), f"--model.init_args.init_from={missing}"]) == 2
    assert (
        only_line(capsys, "fit")
        == f"organseg fit: error: model.init_args.init_from: checkpoint {missing}: file not found"
    )
    assert work == [] and nothing_written(tmp_path)


# ------------------------------------------- the checkpoint's class, not silently another (issue 15)
@pytest.fixture(scope="module")
def snet_ckpt(hn_small, tmp_path_factory) -> Path:
    """A real SNetStage checkpoint written by ``organseg fit`` (LightningCLI records its class path)."""
    folder = tmp_path_factory.mktemp("snet_fit")
    here = Path.cwd()
    os.chdir(folder)
    try:
        assert main(snet_args(hn_small, folder, max_steps=1)) == 0
    finally:
        os.chdir(here)
    (path,) = folder.rglob("last.ckpt")
    return path


@pytest.mark.parametrize("command", ["test", "validate"])
def test_a_checkpoint_of_another_model_class_is_one_line_before_any_work(
    hn_small, snet_ckpt, tmp_path, monkeypatch, capsys, work, command
):
    """An S-Net checkpoint given with the U-Net config: LightningCLI would take the class from the
    checkpoint and run SNetStage without a word; it stops instead, naming both classes."""
    monkeypatch.chdir(tmp_path)
    assert main([command, *fit_args(hn_small, tmp_path)[1:], f"--ckpt_path={snet_ckpt}"]) == 2
    assert only_line(capsys, command) == (
        f"organseg {command}: error: ckpt_path: checkpoint {snet_ckpt} holds a SNetStage "
        "(organseg.methods.focusnet_stages.SNetStage), but model.class_path is "
        "organseg.methods.UNetBaseline; give the config of the model that wrote the checkpoint"
    )
    assert work == [] and nothing_written(tmp_path)


def test_the_class_used_with_ckpt_path_is_stated(hn_small, snet_ckpt, tmp_path, monkeypatch, capsys):
    """With the matching config the run goes ahead and says which class it uses (the checkpoint's)."""
    from organseg.methods import SNetStage

    monkeypatch.chdir(tmp_path)
    ran: list[str] = []  # the test case reaches the stated class (not evaluated: that takes ~50 s here)
    monkeypatch.setattr(SNetStage, "test_step", lambda self, batch, batch_idx: ran.append(batch["case_id"]))
    assert main(["test", *snet_args(hn_small, tmp_path)[1:], f"--ckpt_path={snet_ckpt}"]) == 0
    out = capsys.readouterr().out
    line = f"organseg: model organseg.methods.focusnet_stages.SNetStage (the class recorded in {snet_ckpt})"
    assert line in out.splitlines(), out
    assert len(ran) == 1


def test_the_class_check_compares_classes_not_spellings(tiny_ckpt):
    from organseg.cli.lightning import check_model_class

    ckpt = torch.load(tiny_ckpt, map_location="cpu", weights_only=False)  # built in Python: no _class_path
    full = "organseg.methods.unet_baseline.UNetBaseline"
    for spelling in ("organseg.methods.UNetBaseline", full):  # the package re-export is the same class
        assert check_model_class({"model": {"class_path": spelling}}, ckpt, tiny_ckpt) == full
    assert check_model_class({"model": None}, ckpt, tiny_ckpt) == full  # no model in the config
    with pytest.raises(CheckpointError, match=r"holds a UNetBaseline .* model.class_path is .*SNetStage;"):
        check_model_class({"model": {"class_path": "organseg.methods.SNetStage"}}, ckpt, tiny_ckpt)


# ------------------------------------------- a run that fails before its first step leaves nothing (issue 15)
@pytest.fixture
def offline_wandb(monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    yield
    wandb.finish()
    wandb.teardown()  # this process's wandb service must not outlive the test


def wandb_runs(root: Path) -> list[str]:
    folder = root / "lightning_logs/wandb"
    return sorted(p.name for p in folder.glob("offline-run-*")) if folder.is_dir() else []


def test_a_fit_failing_before_its_first_step_removes_its_run(
    hn_small, tiny_ckpt, tmp_path, monkeypatch, capsys, offline_wandb
):
    """An S-Net stage told to start from a U-Net checkpoint (``init_from`` of the wrong kind, found when the
    stage loads it at setup, after the run folder and the W&B run exist): one line, exit 2, and neither the
    run folder nor the offline W&B run is left; a run folder that existed before the run is kept."""
    monkeypatch.chdir(tmp_path)
    args = [*snet_args(hn_small, tmp_path, logger=KEEP), f"--model.init_args.init_from={tiny_ckpt}"]
    assert main([*args, "--trainer.logger.init_args.id=failed"]) == 2
    out, err = capsys.readouterr()
    (line,) = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("wandb:")]
    assert line.startswith("organseg fit: error: ") and "UNetBaseline" in line, line
    folder = tmp_path / "lightning_logs/organseg/failed"
    assert "the run failed before its first training step; removed lightning_logs/organseg/failed" in out
    assert not folder.exists() and wandb_runs(tmp_path) == []

    kept = tmp_path / "lightning_logs/organseg/resumed"
    (kept / "checkpoints").mkdir(parents=True)
    (kept / "notes.txt").write_text("an earlier segment of this run")
    assert main([*args, "--trainer.logger.init_args.id=resumed"]) == 2
    assert (kept / "notes.txt").read_text() == "an earlier segment of this run"


def test_a_failed_test_removes_its_run_and_a_finished_one_keeps_it(
    hn_small, snet_ckpt, tmp_path, monkeypatch, capsys, offline_wandb
):
    from organseg.methods import SNetStage

    monkeypatch.chdir(tmp_path)
    base = ["test", *snet_args(hn_small, tmp_path, logger=KEEP)[1:], f"--ckpt_path={snet_ckpt}"]

    def broken(self, batch, batch_idx):
        raise RuntimeError("a bug in the test loop")

    monkeypatch.setattr(SNetStage, "test_step", broken)
    with pytest.raises(RuntimeError, match="a bug in the test loop"):  # a bug keeps its traceback
        main([*base, "--trainer.logger.init_args.id=failedtest"])
    assert not (tmp_path / "lightning_logs/organseg/failedtest").exists() and wandb_runs(tmp_path) == []
    monkeypatch.setattr(SNetStage, "test_step", lambda self, batch, batch_idx: None)
    assert main([*base, "--trainer.logger.init_args.id=goodtest"]) == 0
    assert (tmp_path / "lightning_logs/organseg/goodtest/config_test.yaml").is_file()


# ------------------------------------------------------- noise a newcomer reads as errors (issue 11)
NOISE = (
    "module(s) in eval mode",  # Lightning, about frozen parts / averaged models kept in eval mode on purpose
    "`srun` command is available",  # Lightning's hint wherever srun exists, also outside any SLURM job
    "isinstance(treespec, LeafSpec)",  # torch's deprecation, raised inside Lightning
    "could not find the monitored key",  # ModelCheckpoint when a run stops before its first validation
)


def test_a_tiny_fit_prints_none_of_the_intended_warnings(hn_small, tmp_path, monkeypatch, capsys):
    """An S-Net stage (frozen parts in eval mode) that stops at max_steps before any validation,
    validating every epoch (so ModelCheckpoint would have looked for its monitor at the epoch's end), on a
    machine with ``srun`` on the PATH but outside a SLURM job: none of the four messages, yet other warnings
    still get through (the control), and last.ckpt is written."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    for var in [v for v in os.environ if v.startswith("SLURM_")]:
        monkeypatch.delenv(var)
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # pytest's own filters would hide Lightning's UserWarnings
        assert main(snet_args(hn_small, tmp_path, check_val_every_n_epoch=1)) == 0
    out = capsys.readouterr()
    text = "\n".join([out.out, out.err, *(str(w.message) for w in caught)])
    assert [n for n in NOISE if n in text] == [], text[-3000:]
    assert "args parameter is intended to run from within Python" in text  # control: warnings get through
    assert list(tmp_path.rglob("last.ckpt"))


def test_only_frozen_parts_in_eval_mode_are_quiet():
    from torch import nn

    from organseg.cli.lightning import frozen_eval_modules_only

    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.Dropout()))
    assert frozen_eval_modules_only(model)  # nothing in eval mode
    model[1].eval()
    assert not frozen_eval_modules_only(model)  # a part that trains, in eval mode: Lightning may warn
    model[1].requires_grad_(False)
    assert frozen_eval_modules_only(model)  # frozen: intended
    model[0].train().requires_grad_(True)
    model.append(nn.Dropout().eval())
    assert not frozen_eval_modules_only(model)  # a stray eval-mode dropout among trained layers


def test_lightnings_own_checkpoint_names_pass_the_early_check(tmp_path, monkeypatch):
    from organseg.cli.lightning import check_ckpt_path

    monkeypatch.chdir(tmp_path)
    for name in (None, "last", "best", "hpc", "registry", "registry:model:v1"):
        check_ckpt_path(name)  # Lightning resolves these itself
    with pytest.raises(CheckpointError, match="^ckpt_path: checkpoint LAST: file not found$"):
        check_ckpt_path("LAST")


def test_lightnings_litlogger_advert_is_dropped_and_other_info_kept(caplog):
    import logging

    from lightning.pytorch.utilities import rank_zero_info

    from organseg.cli.lightning import quiet_lightning_tips

    quiet_lightning_tips()
    quiet_lightning_tips()  # idempotent: one filter however many fits a process runs
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    assert len([f for f in logger.filters if type(f).__name__ == "_DropLitLoggerTip"]) == 1
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        rank_zero_info(
            "💡 Tip: try installing [litlogger](https://pypi.org/project/litlogger/) to enable LitLogger"
        )
        rank_zero_info("`Trainer.fit` stopped: `max_steps=3` reached.")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["`Trainer.fit` stopped: `max_steps=3` reached."]


def test_the_commands_that_predict_and_exit_keep_freed_memory(tmp_path, monkeypatch, capsys):
    """predict, evaluate and pseudolabel set the allocator first (runtime/allocator.py, ~20 % less CPU per
    window); each then stops on its bad input in one line. The setting is recorded, not applied, here."""
    from organseg.cli.main import main
    from organseg.runtime import allocator

    calls = []
    monkeypatch.setattr(allocator, "retain_freed_memory", lambda: calls.append(True) or True)
    missing = str(tmp_path / "missing.ckpt")
    out = str(tmp_path / "out")
    assert main(["evaluate", "--ckpt", missing, "--out", out]) == 2
    assert main(["pseudolabel", "--ckpt", missing, "--card", str(tmp_path / "none.yaml"), "--out", out]) == 2
    assert main(["predict", "--ckpt", missing, "--input", str(tmp_path), "--out", out]) == 2
    assert calls == [True, True, True]
    assert all(line.startswith("organseg ") for line in capsys.readouterr().err.strip().splitlines())
