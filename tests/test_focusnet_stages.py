"""FocusNetV2 stage modules: freezing, checkpoint chaining, GT-centred SOS ROIs, the joint step, the one
architecture (given once, followed by every stage config, checked against the checkpoint a stage loads),
and one real `organseg fit` of stage 1 whose checkpoint stage 2 loads."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from organseg.cli.lightning import run_lightning_cli
from organseg.errors import CheckpointError, ConfigError
from organseg.methods import focusnet_stages
from organseg.methods.checkpoints import load_module
from organseg.methods.focusnet_stages import JointStage, ShapeAEStage, SNetStage, SOLStage, SOSStage
from organseg.networks.focusnetv2 import FocusNetArchitecture
from organseg.spatial.heatmaps import gaussian_heatmaps

REPO = Path(__file__).resolve().parents[1]
ORGANSEG = str(Path(sys.executable).with_name("organseg"))
CLASSES = ["background", "big", "small_a", "small_b"]
PATCH = [32, 32, 8]
ARCH = FocusNetArchitecture(
    base_channels=4,
    aspp_rates=(1, 2),
    sol_hidden=4,
    sos_base=4,
    ae_code_channels=4,
    ae_base=4,
    roi_mm=(8.0, 8.0, 6.0),
)
TINY = dict(
    num_classes=4,
    classes=CLASSES,
    patch_size=PATCH,
    small_organs=["small_a", "small_b"],
    spacing=[1.0, 1.0, 3.0],
    architecture=ARCH,
    sw_overlap=0.25,
    hd95_every_n_epochs=0,
)
STAGE_CONFIGS = ["snet", "sol", "sos", "shape_ae", "joint"]
BOXES = {2: (slice(8, 11), slice(9, 12), slice(3, 5)), 3: (slice(20, 22), slice(18, 21), slice(4, 5))}


def sample(seed: int = 0, shape=PATCH) -> dict:
    g = torch.Generator().manual_seed(seed)
    label = torch.zeros(shape, dtype=torch.int64)
    label[14:30, 2:12, 1:7] = 1
    centres = []
    for cls, box in BOXES.items():
        label[box] = cls
        centres.append([(s.start + s.stop - 1) / 2 for s in box])
    image = torch.randn(1, *shape, generator=g) * 0.1 + label[None].float() * 0.5
    heat = gaussian_heatmaps(torch.tensor(centres), shape, [1.0, 1.0, 3.0], 3.0)
    return {"image": image, "label": label, "heatmap": heat, "labeled": torch.ones(4), "case_id": f"c{seed}"}


def batch(n: int = 2) -> dict:
    return torch.utils.data.default_collate([sample(i) for i in range(n)])


def state(module, part: str) -> dict:
    return {k: v.detach().clone() for k, v in getattr(module.focusnet, part).state_dict().items()}


def changed(before: dict, module, part: str) -> bool:
    after = getattr(module.focusnet, part).state_dict()
    return any(not torch.equal(before[k], after[k]) for k in before)


def one_step(module, b: dict) -> None:
    opt = module.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    module.train()
    loss = module.training_step(b, 0)
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    opt.step()


def trainer(**kw) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        **kw,
    )


def loader(n: int = 2) -> DataLoader:
    return DataLoader([sample(i) for i in range(n)], batch_size=n)


@pytest.fixture(scope="module")
def snet_ckpt(tmp_path_factory) -> Path:
    """A stage-1 checkpoint written by Lightning itself (the way `organseg fit` writes them)."""
    torch.manual_seed(0)
    module = SNetStage(**TINY, class_weights="uniform")
    t = trainer()
    t.fit(module, train_dataloaders=loader())
    path = tmp_path_factory.mktemp("s1") / "snet.ckpt"
    t.save_checkpoint(path)
    return path


def test_sol_stage_freezes_snet_and_trains_sol():
    torch.manual_seed(0)
    module = SOLStage(**TINY)
    snet, sol = state(module, "snet"), state(module, "sol")
    one_step(module, batch())
    assert not changed(snet, module, "snet"), "a frozen S-Net parameter changed"
    assert changed(sol, module, "sol")
    assert all(not p.requires_grad for p in module.focusnet.snet.parameters())
    module.train()
    assert module.training and module.focusnet.sol.training
    assert not module.focusnet.snet.training and not any(m.training for m in module.focusnet.snet.modules())


def test_sos_stage_freezes_snet_and_sol_and_trains_sos():
    torch.manual_seed(0)
    module = SOSStage(**TINY, jitter_voxels=[1, 1, 0])
    before = {p: state(module, p) for p in ("snet", "sol", "sos", "shape_ae")}
    one_step(module, batch())
    for part in ("snet", "sol", "shape_ae"):
        assert not changed(before[part], module, part), f"frozen {part} changed"
    assert changed(before["sos"], module, "sos")
    module.train()
    assert (
        not module.focusnet.snet.training
        and not module.focusnet.sol.training
        and module.focusnet.sos.training
    )


def test_sos_rois_are_centred_on_true_centres():
    module = SOSStage(**TINY, jitter_voxels=[0, 0, 0])
    b = batch()
    rois = module.gt_rois(b, [0, 0, 0])
    assert [r["k"] for r in rois] == [0, 1]
    for r in rois:
        cls = module.small_classes[r["k"]]
        assert r["target"].shape == (2, 1, *module.roi_sizes[r["k"]])
        organ_voxels = (b["label"] == cls).flatten(1).sum(1).float()
        # the whole organ lies inside its ROI, and the ROI centre voxel is organ
        assert torch.equal(r["target"].flatten(1).sum(1), organ_voxels)
        cx, cy, cz = (s // 2 for s in module.roi_sizes[r["k"]])
        assert bool((r["target"][:, 0, cx - 1 : cx + 1, cy - 1 : cy + 1, max(cz - 1, 0) : cz + 1] > 0).any())
    # an organ missing from a patch (heatmap channel ~0) is skipped for that sample only
    b["heatmap"][0, 1] = 0
    rois = module.gt_rois(b, [0, 0, 0])
    assert rois[1]["index"].tolist() == [1]


def test_init_from_missing_or_wrong_kind_raises_one_line(snet_ckpt, tmp_path):
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(ValueError) as e:
        SOLStage(**TINY, init_from=str(missing)).load_init()
    assert str(missing) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError) as e:  # a stage-1 checkpoint is not a SOL-stage checkpoint
        SOSStage(**TINY, init_from=str(snet_ckpt)).load_init()
    assert str(snet_ckpt) in str(e.value) and "SNetStage" in str(e.value) and "\n" not in str(e.value)
    # a checkpoint without an architecture record (hand-made) is still checked by its shapes
    other = SNetStage(**dict(TINY, architecture=dataclasses.replace(ARCH, base_channels=8)))
    bare = tmp_path / "bare.ckpt"
    torch.save({"state_dict": other.state_dict(), "organseg": {"module": "x.SNetStage"}}, bare)
    with pytest.raises(CheckpointError, match="shape of"):
        SOLStage(**TINY, init_from=str(bare)).load_init()


def test_every_stage_checkpoint_stores_the_architecture(snet_ckpt):
    ckpt = torch.load(snet_ckpt, map_location="cpu", weights_only=False)
    record = {**ARCH.as_dict(), "small_organs": ["small_a", "small_b"], "spacing": [1.0, 1.0, 3.0]}
    assert ckpt["organseg"]["architecture"] == record
    assert ckpt["hyper_parameters"]["architecture"] == ARCH.as_dict()  # plain values, not the dataclass
    model, extra = load_module(snet_ckpt)  # what organseg evaluate / predict do
    assert model.architecture == ARCH and extra["architecture"] == record
    assert [tuple(p.shape) for p in model.focusnet.parameters()] == [
        tuple(p.shape) for p in SNetStage(**TINY).focusnet.parameters()
    ]


def test_later_stage_with_another_architecture_stops_with_one_line_naming_both(snet_ckpt, tmp_path):
    wider = dataclasses.replace(ARCH, base_channels=8)
    with pytest.raises(CheckpointError) as e:
        SOLStage(**dict(TINY, architecture=wider), init_from=str(snet_ckpt)).load_init()
    msg = str(e.value)
    assert "\n" not in msg and str(snet_ckpt) in msg
    assert "architecture {base_channels: 4, " in msg
    assert "differs from this stage's {base_channels: 8, " in msg
    assert msg.endswith("(base_channels 4 vs 8)"), msg
    # the data's part of the record (spacing, small organs) must agree as well
    with pytest.raises(CheckpointError, match=r"\(spacing \[1.0, 1.0, 3.0\] vs \[2.0, 2.0, 3.0\]\)$"):
        SOLStage(**dict(TINY, spacing=[2.0, 2.0, 3.0]), init_from=str(snet_ckpt)).load_init()
    # shape_from is checked the same way
    ae_path = tmp_path / "ae.ckpt"
    ae = ShapeAEStage(**dict(TINY, architecture=dataclasses.replace(ARCH, ae_base=8)))
    torch.save(
        {
            "state_dict": ae.state_dict(),
            "organseg": {"module": "x.ShapeAEStage", "architecture": ae.architecture_record},
        },
        ae_path,
    )
    with pytest.raises(CheckpointError, match=r"\(ae_base 8 vs 4\)$"):
        JointStage(**TINY, shape_from=str(ae_path)).load_init()


def test_stage_signatures_are_keyword_only_and_joint_has_no_schedule():
    with pytest.raises(TypeError):
        SOLStage(4, CLASSES)  # the shared arguments are keywords, never a positional chain
    with pytest.raises(ConfigError, match="max_epochs_for_schedule"):
        JointStage(**TINY, max_epochs_for_schedule=10)


def print_config(stage_yaml: Path, *more: str) -> dict:
    """What `organseg fit -c <stage> -c <data> [more] --print_config` prints, as a dict (in-process)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        run_lightning_cli(
            [
                "fit",
                "-c",
                str(stage_yaml),
                "-c",
                str(REPO / "data_modules/hn_phantom_focusnet.yaml"),
                *more,
                "--print_config",
            ]
        )
    assert e.value.code in (0, None)
    return yaml.safe_load(out.getvalue())


def test_every_stage_config_composes_the_one_architecture_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = REPO / "experiments/focusnetv2"
    given = yaml.safe_load((folder / "architecture.yaml").read_text())
    assert FocusNetArchitecture(**given) == FocusNetArchitecture()  # the file is the code's default
    # a width and roi_mm changed in ONE place (a copy of the folder's architecture.yaml)...
    copy = tmp_path / "focusnetv2"
    shutil.copytree(folder, copy)
    changed = {**given, "base_channels": 24, "roi_mm": [40.0, 40.0, 12.0]}
    (copy / "architecture.yaml").write_text(yaml.safe_dump(changed))
    # ...reaches all five stages, and their containers alike (each stage built from its printed config)
    data = dict(num_classes=3, classes=["background", "a", "b"], small_organs=["b"], spacing=[1.0, 1.0, 3.0])
    shapes = set()
    for stage in STAGE_CONFIGS:
        model = print_config(copy / f"{stage}.yaml")["model"]
        assert model["init_args"]["architecture"] == changed, stage
        cls = getattr(focusnet_stages, model["class_path"].rsplit(".", 1)[1])
        module = cls(**model["init_args"], **data)
        assert module.roi_sizes == [(40, 40, 4)], stage
        shapes.add(tuple(tuple(p.shape) for p in module.focusnet.parameters()))
    default = FocusNetArchitecture().build(data["classes"], data["small_organs"], data["spacing"])
    assert len(shapes) == 1 and shapes != {tuple(tuple(p.shape) for p in default.parameters())}
    # the demo overlay follows every stage config and leaves the architecture alone
    demo = print_config(folder / "sos.yaml", "-c", str(folder / "demo.yaml"))["model"]["init_args"]
    assert demo["architecture"] == given


def test_chaining_snet_checkpoint_into_sol_and_sos(snet_ckpt, tmp_path):
    ckpt = torch.load(snet_ckpt, map_location="cpu", weights_only=False)
    assert ckpt["organseg"]["module"] == "organseg.methods.focusnet_stages.SNetStage"
    torch.manual_seed(1)
    sol = SOLStage(**TINY, init_from=str(snet_ckpt))
    sol.load_init()
    for k, v in sol.focusnet.snet.state_dict().items():
        assert torch.equal(v, ckpt["state_dict"][f"focusnet.snet.{k}"])
    one_step(sol, batch())
    path = tmp_path / "sol.ckpt"
    torch.save(
        {"state_dict": sol.state_dict(), "organseg": {"module": "organseg.methods.focusnet_stages.SOLStage"}},
        path,
    )
    torch.manual_seed(2)
    sos = SOSStage(**TINY, init_from=str(path))
    sos.load_init()
    for part in ("snet", "sol"):
        for k, v in getattr(sos.focusnet, part).state_dict().items():
            assert torch.equal(v, getattr(sol.focusnet, part).state_dict()[k])


def test_sos_predict_case_pastes_and_sol_localisation_rows():
    torch.manual_seed(0)
    module = SOSStage(**TINY, loc_threshold=0.0).eval()  # threshold 0: every organ "found"
    case = sample(3, shape=[48, 40, 12])
    labels = module.predict_case(case["image"][None])
    assert labels.shape == (1, 48, 40, 12) and labels.dtype == torch.uint8
    b = {"spacing": torch.tensor([[1.0, 1.0, 3.0]]), "centres": torch.full((1, 4, 3), float("nan"))}
    b["centres"][0, 2] = torch.tensor([9.0, 10.0, 3.5])
    rows = module.localisation_rows(*module._last_centres, b)
    assert [r["organ"] for r in rows] == ["small_a", "small_b"]
    assert rows[0]["present"] and rows[0]["found"] and rows[0]["error_mm"] >= 0
    assert not rows[1]["present"]


def test_shape_ae_stage_trains_only_the_autoencoder():
    torch.manual_seed(0)
    module = ShapeAEStage(**TINY, jitter_voxels=[0, 0, 0])
    before = {p: state(module, p) for p in ("snet", "sos", "shape_ae", "disc")}
    one_step(module, batch())
    assert changed(before["shape_ae"], module, "shape_ae")
    assert not any(changed(before[p], module, p) for p in ("snet", "sos", "disc"))


class Record(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_joint_step_runs_both_optimizers_and_logs_all_terms(tmp_path):
    """Ours (the behaviour before issue 13): every part fine-tuned, code-L2 + BCE real/fake shape terms."""
    torch.manual_seed(0)
    sos_path, ae_path = tmp_path / "sos.ckpt", tmp_path / "ae.ckpt"
    src = SOSStage(**TINY)
    torch.save({"state_dict": src.state_dict(), "organseg": {"module": "x.SOSStage"}}, sos_path)
    ae = ShapeAEStage(**TINY)
    torch.save({"state_dict": ae.state_dict(), "organseg": {"module": "x.ShapeAEStage"}}, ae_path)
    module = JointStage(
        **TINY,
        init_from=str(sos_path),
        shape_from=str(ae_path),
        class_weights="uniform",
        jitter_voxels=[0, 0, 0],
        adv_weight=0.1,
        joint_trainable="all",
        shape_loss="code_l2_bce",
        sos_centres="true_jittered",
        sos_loss="focal_dice",
    )
    before = {p: state(module, p) for p in ("snet", "sol", "sos", "shape_ae", "disc")}
    rec = Record()
    trainer(callbacks=[rec]).fit(module, train_dataloaders=loader())
    assert module._init_loaded  # init_from / shape_from were loaded at setup("fit")
    assert all(changed(before[p], module, p) for p in ("snet", "sol", "sos", "shape_ae", "disc"))
    for key in ("loss", "loss_heatmap", "loss_shape", "loss_adv", "loss_disc"):
        assert f"train/{key}" in rec.metrics, sorted(rec.metrics)
        assert torch.isfinite(torch.tensor(rec.metrics[f"train/{key}"]))
    assert rec.metrics["train/loss_shape"] > 0
    # the loaded shape AE: a fresh JointStage loading the same files gets the ShapeAE's weights
    fresh = JointStage(**TINY, init_from=str(sos_path), shape_from=str(ae_path))
    fresh.load_init()
    for k, v in fresh.focusnet.shape_ae.state_dict().items():
        assert torch.equal(v, ae.focusnet.shape_ae.state_dict()[k])
    with pytest.raises(ValueError, match="expected one of"):
        JointStage(**TINY, init_from=str(sos_path), shape_from=str(sos_path)).load_init()


@pytest.mark.slow
def test_cli_fit_stage1_then_sol_loads_it(hn_small, tmp_path):
    cfg = {
        "trainer": {
            "max_epochs": 1,
            "accelerator": "cpu",
            "devices": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "log_every_n_steps": 1,
            "check_val_every_n_epoch": 1,
        },
        "model": {
            "init_args": {
                "architecture": {
                    "base_channels": 4,
                    "aspp_rates": [1, 2],
                    "sol_hidden": 4,
                    "sos_base": 4,
                    "ae_base": 4,
                    "ae_code_channels": 4,
                },
                "sw_overlap": 0.25,
                "sw_batch_size": 8,
                "hd95_every_n_epochs": 0,
            }
        },
        "data": {
            "init_args": {
                "cards": [str(hn_small["card"])],
                "patch_size": PATCH,
                "batch_size": 1,
                "patches_per_epoch": 2,
                "num_workers": 0,
                "augmentation": None,
            }
        },
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run(
        [
            ORGANSEG,
            "fit",
            "-c",
            str(REPO / "experiments/focusnetv2/snet.yaml"),
            "-c",
            str(REPO / "data_modules/hn_phantom_focusnet.yaml"),
            "-c",
            str(tmp_path / "tiny.yaml"),
            "--trainer.logger.init_args.id=s1",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = tmp_path / "lightning_logs/organseg/s1/checkpoints/last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["organseg"]["module"].endswith("SNetStage")
    hp = {k: ckpt["hyper_parameters"][k] for k in ("num_classes", "classes", "architecture", "spacing")}
    assert hp["architecture"]["base_channels"] == 4 and hp["architecture"]["roi_mm"] == [64.0, 64.0, 20.0]
    assert ckpt["organseg"]["architecture"]["spacing"] == hp["spacing"]  # linked from the card
    sol = SOLStage(**hp, patch_size=PATCH, init_from=str(last))
    sol.load_init()
    assert sol.small_organs == yaml.safe_load(Path(hn_small["card"]).read_text())["small"]
    for k, v in sol.focusnet.snet.state_dict().items():
        assert torch.equal(v, ckpt["state_dict"][f"focusnet.snet.{k}"])
    # stage 2 through the CLI with a width that differs from stage 1's: one line naming both, exit 2
    proc = subprocess.run(
        [
            ORGANSEG,
            "fit",
            "-c",
            str(REPO / "experiments/focusnetv2/sol.yaml"),
            "-c",
            str(REPO / "data_modules/hn_phantom_focusnet.yaml"),
            "-c",
            str(tmp_path / "tiny.yaml"),
            "--trainer.logger.init_args.id=s2",
            f"--model.init_args.init_from={last}",
            "--model.init_args.architecture.base_channels=8",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    error = [ln for ln in proc.stderr.splitlines() if ln.startswith("organseg fit: error:")]
    assert proc.returncode == 2 and len(error) == 1, proc.stderr[-4000:]
    assert str(last) in error[0] and error[0].endswith("(base_channels 4 vs 8)")


def test_later_stage_with_the_classes_in_another_order_stops(snet_ckpt):
    """Same count, other order: every shape matches, so only the recorded class list can tell."""
    swapped = [CLASSES[0], *reversed(CLASSES[1:])]
    with pytest.raises(CheckpointError, match=r"classes \[.*\] differ from this stage's \[.*\]$"):
        SOLStage(**dict(TINY, classes=swapped), init_from=str(snet_ckpt)).load_init()
