"""Co-training weight-averaged models (organseg.methods.cowam): EMA exactness, region mask and its zero
gradient, different initialisations, frozen averages, checkpoint + selected-model inference, and
`organseg fit` end to end (1 process and 2-process DDP) on two few-organ abdominal phantom datasets."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from organseg.losses.cotraining import region_mask, sigmoid_rampup, soft_cross_entropy
from organseg.losses.partial_labels import merge_pseudo_labels
from organseg.methods.cowam import CoTrainingWAM
from organseg.networks.weight_averaging import warmup_decay

REPO = Path(__file__).resolve().parents[1]
ORGANSEG = str(Path(sys.executable).with_name("organseg"))
CLASSES = ["background", "liver", "spleen", "kidney_l", "kidney_r", "pancreas", "stomach"]
TINY = {
    "filters": [4, 8, 8],
    "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
    "max_steps_for_schedule": 100,  # the run length the schedules scale with (a fit takes the trainer's)
    "spacing": [1.0, 1.0, 2.0],
}
FEW = {"liv": ["liver", "spleen", "stomach"], "kid": ["kidney_l", "kidney_r", "pancreas"]}
SHAPE, SPACING = (64, 48, 20), (3.75, 4.0, 7.2)


def tiny_module(**kw) -> CoTrainingWAM:
    return CoTrainingWAM(len(CLASSES), CLASSES, patch_size=[16, 16, 8], **{**TINY, **kw})


def batch_of(b: int = 2, shape=(16, 16, 8), seed: int = 0) -> dict:
    """Sample 0 annotates liver/spleen/stomach, sample 1 kidneys/pancreas (background always True)."""
    g = torch.Generator().manual_seed(seed)
    label = torch.zeros(b, *shape, dtype=torch.long)
    label[0, 2:8, 2:8, 1:4] = 1
    label[0, 10:14, 10:14, 5:7] = 6
    label[1, 3:7, 9:13, 2:5] = 3
    label[1, 9:12, 3:6, 4:6] = 5
    labeled = torch.tensor([[1, 1, 1, 0, 0, 0, 1], [1, 0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    pseudo = torch.zeros_like(label)
    pseudo[0, 9:13, 2:6, 2:5] = 3  # kidney_l: not annotated in sample 0 -> used
    pseudo[0, 2:6, 2:6, 1:3] = 2  # spleen: annotated in sample 0 -> ignored
    pseudo[1, 2:9, 2:7, 5:8] = 1  # liver: not annotated in sample 1 -> used
    return {
        "image": torch.randn(b, 1, *shape, generator=g),
        "label": label,
        "labeled": labeled,
        "pseudo": pseudo,
    }


# ---------------------------------------------------------------- weight averaging
def test_ema_update_is_exact_with_warmup():
    m = tiny_module(ema_decay=0.6, ema_warmup_eta=0)  # MMT's warm-up (ours)
    p_net = next(m.net_a.parameters())
    p_avg = next(m.wam_a.parameters())
    assert torch.equal(p_avg, p_net) and not p_avg.requires_grad
    values = []
    expected = p_avg.detach().clone()
    for t in range(4):  # t earlier updates: decay 0, 1/2, 0.6 (capped), 0.6
        with torch.no_grad():
            for p in m.net_a.parameters():
                p.add_(torch.randn_like(p))
        values.append(p_net.detach().clone())
        d = min(1 - 1 / (t + 1), 0.6)
        assert warmup_decay(t, 0.6) == pytest.approx(d)
        expected = d * expected + (1 - d) * values[-1]
        m.update_averages()
        assert int(m.wam_a.n_averaged) == t + 1
        torch.testing.assert_close(p_avg, expected, rtol=1e-6, atol=1e-6)
    # by hand from the raw values: copy, then 1/2-1/2, then 0.6/0.4 twice
    hand = 0.6 * (0.6 * (0.5 * values[0] + 0.5 * values[1]) + 0.4 * values[2]) + 0.4 * values[3]
    torch.testing.assert_close(p_avg, hand, rtol=1e-6, atol=1e-6)
    # the other average follows its own net only
    assert torch.equal(next(m.wam_b.parameters()), next(m.net_b.parameters()))


def test_default_warmup_forgets_the_start_polynomially():
    """eta = 3 (default): d_t = min(1 - 4/(t+4), decay); the first iterate's weight after t updates is
    prod_{u=1..t} u/(u+4) (= 4! t!/(t+4)!), far below MMT's uniform 1/(t+1)."""
    m = tiny_module(ema_decay=0.999)
    assert m.wam_a.ema.eta == 3.0
    p_avg = next(m.wam_a.parameters())
    values = []
    for t in range(6):
        with torch.no_grad():
            for p in m.net_a.parameters():
                p.copy_(torch.full_like(p, float(t == 0)))  # iterate 0 is 1, the rest 0
        values.append(t)
        assert warmup_decay(t, 0.999, 3) == pytest.approx(min(1 - 4 / (t + 4), 0.999))
        m.update_averages()
    first_weight = math.prod(u / (u + 4) for u in range(1, 6))
    assert float(p_avg.flatten()[0]) == pytest.approx(first_weight, rel=1e-5)
    assert first_weight < 0.01 < 1 / 6  # MMT's warm-up would keep 1/6 of the random start


def test_schedules_are_fractions_of_max_steps():
    """At 10 %, 50 % and 100 % of T = max_steps: w = soft_weight exp(-5 (1 - min(t/(f T), 1))^2) and the
    averages' decay min(1 - (eta+1)/(n+eta+1), 1 - 1/(h T)); explicit step counts (ours) override."""
    from organseg.networks.weight_averaging import set_schedule

    T, f, h, eta = 1000, 0.5, 0.0625, 3.0
    m = tiny_module(max_steps_for_schedule=None)
    m._trainer = SimpleNamespace(estimated_stepping_batches=T, global_step=0)
    m.on_fit_start()
    assert m.schedule_steps == T and m.rampup_length == f * T
    alpha = 1 - 1 / (h * T)
    assert m.wam_a.ema.decay == m.wam_b.ema.decay == pytest.approx(alpha)
    for frac in (0.1, 0.5, 1.0):
        t = int(frac * T)
        m._trainer.global_step = t
        expect = 0.5 * math.exp(-5 * (1 - min(t / (f * T), 1)) ** 2)
        assert m.soft_weight_now() == pytest.approx(expect)
        m.wam_a.n_averaged.fill_(t)
        assert m.ema_decay_now == pytest.approx(min(1 - (eta + 1) / (t + eta + 1), alpha))
    assert m.soft_weight_at(int(0.1 * T)) == pytest.approx(0.5 * math.exp(-5 * 0.8**2))
    assert m.soft_weight_at(T) == 0.5
    # a run ten times longer stretches both schedules alike
    m._trainer.estimated_stepping_batches = 10 * T
    m.on_fit_start()
    assert m.soft_weight_at(5 * T) == 0.5 and m.wam_a.ema.decay == pytest.approx(1 - 1 / (h * 10 * T))
    # ours: explicit step counts (benchmark args soft_rampup_steps={max_steps*0.5}, ema_decay=0.99)
    fixed = tiny_module(soft_rampup_steps=300, ema_decay=0.99, max_steps_for_schedule=None)
    fixed._trainer = SimpleNamespace(estimated_stepping_batches=T, global_step=0)
    fixed.on_fit_start()
    assert fixed.rampup_length == 300 and fixed.wam_a.ema.decay == 0.99
    assert fixed.soft_weight_at(150) == pytest.approx(0.5 * math.exp(-1.25))
    # an unknown run length is a one-line error, not a silent schedule
    lost = tiny_module(max_steps_for_schedule=None)
    lost._trainer = SimpleNamespace(estimated_stepping_batches=float("inf"), global_step=0)
    with pytest.raises(ValueError, match="fractions of the run's length"):
        lost.on_fit_start()
    with pytest.raises(ValueError, match="ema_decay must be in"):
        set_schedule(m.wam_a, 1.0)


def test_optimizer_step_hook_updates_the_averages_after_the_step():
    m = tiny_module(ema_decay=0.999)
    opt = torch.optim.SGD([*m.net_a.parameters(), *m.net_b.parameters()], lr=0.1)
    batch = batch_of()

    def closure():
        opt.zero_grad()
        loss = m.compute_losses({**batch})["loss"]
        loss.backward()
        return loss

    before = next(m.wam_a.parameters()).detach().clone()
    opt.step(closure)  # what LightningModule.optimizer_step does
    m.update_averages()
    after_net = next(m.net_a.parameters()).detach()
    assert not torch.equal(after_net, before)
    assert torch.equal(next(m.wam_a.parameters()), after_net)  # t = 0: the average copies the net


# ---------------------------------------------------------------- networks
def test_two_networks_start_different_and_averages_never_get_grad():
    m = tiny_module()
    pa, pb = [torch.cat([p.flatten() for p in n.parameters()]) for n in (m.net_a, m.net_b)]
    assert pa.shape == pb.shape and not torch.allclose(pa, pb)
    assert torch.equal(pa, torch.cat([p.flatten() for p in tiny_module().net_a.parameters()]))  # seeded
    terms = m.compute_losses(batch_of())
    terms["loss"].backward()
    for wam in m.averaged:
        assert all(not p.requires_grad and p.grad is None for p in wam.parameters())
        assert not wam.training
    assert all(p.grad is not None for p in [*m.net_a.parameters(), *m.net_b.parameters()])
    opt = m.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    opt_params = {id(p) for g in opt.param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in [*m.net_a.parameters(), *m.net_b.parameters()]}
    with pytest.raises(ValueError, match="init_seeds"):
        tiny_module(init_seeds=[3, 3])

    def first_net_a(seed=None):
        return torch.cat([p.flatten() for p in tiny_module(init_seeds=seed).net_a.parameters()])

    # no init_seeds: (2s, 2s+1) from the run's seed s; another run seed, other networks
    os.environ.pop("PL_GLOBAL_SEED", None)
    assert torch.equal(first_net_a(), first_net_a([0, 1]))
    os.environ["PL_GLOBAL_SEED"] = "3"
    try:
        assert torch.equal(first_net_a(), first_net_a([6, 7]))
        assert not torch.equal(first_net_a(), first_net_a([0, 1]))
    finally:
        os.environ.pop("PL_GLOBAL_SEED")
    with pytest.raises(ValueError, match="supervision"):
        tiny_module(supervision="typo")


def test_network_is_configurable_and_a_bad_class_path_is_one_line():
    m = tiny_module(network={"class_path": "organseg.networks.snet.SNet", "init_args": {"base_channels": 4}})
    assert type(m.net_a).__name__ == type(m.wam_b.module).__name__ == "SNet" and m.net_a.num_classes == 7
    assert torch.isfinite(m.compute_losses(batch_of())["loss"])
    with pytest.raises(ValueError, match="organseg.networks.nope.X.*cannot be imported"):
        tiny_module(network={"class_path": "organseg.networks.nope.X"})


# ---------------------------------------------------------------- region mask + soft loss
def test_region_mask_excludes_annotated_voxels_and_soft_loss_gives_them_zero_gradient():
    b = batch_of()
    mask = region_mask(b["label"])
    assert torch.equal(mask, b["label"] == 0)
    assert torch.equal(region_mask(b["label"], b["labeled"]), mask)
    full = region_mask(b["label"], torch.tensor([[True] * 7, [True, False] + [True] * 5]))
    assert not full[0].any() and torch.equal(full[1], mask[1])  # fully labelled sample: 0 = background
    logits = torch.randn(2, len(CLASSES), 16, 16, 8, requires_grad=True)
    target = torch.softmax(torch.randn(2, len(CLASSES), 16, 16, 8), 1)
    loss = soft_cross_entropy(logits, target, mask)
    ce = -(target * torch.log_softmax(logits, 1)).sum(1)
    assert float(loss.detach()) == pytest.approx(float(ce[mask].mean().detach()), rel=1e-5)
    loss.backward()
    annotated = (b["label"] > 0).unsqueeze(1).expand_as(logits)
    assert logits.grad[annotated].abs().max() == 0.0  # exactly zero
    assert logits.grad[~annotated].abs().max() > 0
    # one-hot targets on every voxel: ordinary cross-entropy
    y = torch.randint(0, len(CLASSES), (2, 16, 16, 8))
    onehot = torch.nn.functional.one_hot(y, len(CLASSES)).movedim(-1, 1).float()
    with torch.no_grad():
        full = soft_cross_entropy(logits, onehot, torch.ones_like(mask))
        assert float(full) == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)), rel=1e-5)
        assert float(soft_cross_entropy(logits, target, torch.zeros_like(mask))) == 0.0


def test_dilated_region_mask_covers_only_pseudo_labelled_unannotated_organs():
    b = batch_of()
    m = region_mask(b["label"], b["labeled"], b["pseudo"], dilation=1)
    assert not m[b["label"] > 0].any()
    # sample 0: kidney_l pseudo-labels (not annotated there) +1 voxel; the spleen pseudo-label is ignored
    expect0 = torch.zeros(16, 16, 8, dtype=torch.bool)
    expect0[8:14, 1:7, 1:6] = True
    assert torch.equal(m[0], expect0 & (b["label"][0] == 0))
    expect1 = torch.zeros(16, 16, 8, dtype=torch.bool)
    expect1[1:10, 1:8, 4:8] = True
    assert torch.equal(m[1], expect1 & (b["label"][1] == 0))
    with pytest.raises(ValueError, match="pseudo"):
        region_mask(b["label"], dilation=1)


def test_mm_region_is_the_dilated_unannotated_organs_inside_ground_truth_background():
    """Hand case on a 1 x 1 x 2 mm grid with a 2 mm ball: offsets with dx^2 + dy^2 + (2 dz)^2 <= 4, i.e.
    the 13-voxel disc of radius 2 in-plane plus one voxel above and below (15 voxels)."""
    from organseg.losses.cotraining import ball_kernel

    k = ball_kernel(2.0, (1.0, 1.0, 2.0))
    assert k.shape == (5, 5, 3) and int(k.sum()) == 15
    label = torch.zeros(1, 9, 9, 5, dtype=torch.long)
    label[0, 5, 4, 2] = 1  # annotated liver, inside the ball: never in the region
    label[0, 0, 0, 0] = 1
    pseudo = torch.zeros_like(label)
    pseudo[0, 4, 4, 2] = 5  # pancreas: NOT annotated by this dataset -> its ball is the region
    pseudo[0, 0, 0, 4] = 1  # liver: annotated here (GT says where it is) -> ignored
    labeled = torch.tensor([[True, True, True, False, False, False, True]])
    m = region_mask(label, labeled, pseudo, radius_mm=2.0, spacing=(1.0, 1.0, 2.0))
    expect = torch.zeros(9, 9, 5, dtype=torch.bool)
    for dx in range(-2, 3):
        for dy in range(-2, 3):
            for dz in (-1, 0, 1):
                if dx * dx + dy * dy + 4 * dz * dz <= 4:
                    expect[4 + dx, 4 + dy, 2 + dz] = True
    expect[5, 4, 2] = False  # ground-truth liver
    assert int(expect.sum()) == 14 and torch.equal(m[0], expect)
    # a dataset annotating every organ has no unannotated organ: empty region
    assert not region_mask(
        label, torch.ones(1, 7, dtype=torch.bool), pseudo, radius_mm=2.0, spacing=(1, 1, 2)
    ).any()
    # the module: dilated_pseudo (default) with the card's spacing vs unannotated (ours, every GT-background
    # voxel of a partially annotated sample)
    batch = {"label": label, "labeled": labeled, "pseudo": pseudo}
    assert torch.equal(tiny_module(mask_dilation_mm=2.0).soft_region_mask(batch)[0], expect)
    assert torch.equal(tiny_module(soft_region="unannotated").soft_region_mask(batch), label == 0)
    with pytest.raises(ValueError, match="soft_region=unannotated"):
        tiny_module().soft_region_mask({"label": label, "labeled": labeled})
    with pytest.raises(ValueError, match="mask_dilation needs soft_region=dilated_pseudo"):
        tiny_module(soft_region="unannotated", mask_dilation=1)


def test_sigmoid_rampup():
    assert sigmoid_rampup(0, 0) == 1.0 and sigmoid_rampup(5, -1) == 1.0
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(100, 100) == sigmoid_rampup(1000, 100) == 1.0


def test_training_terms_per_supervision_mode():
    b = batch_of()
    for mode in ("pseudo", "marginal", "naive"):
        m = tiny_module(supervision=mode, soft_rampup_steps=0, soft_region="unannotated")
        terms = {k: v.detach() for k, v in m.compute_losses(dict(b)).items()}
        for k in (
            "loss",
            "loss_focal",
            "loss_dice",
            "loss_soft",
            "net_a/loss_soft",
            "net_b/loss_soft",
            "mask_fraction",
        ):
            assert torch.isfinite(terms[k]), (mode, k)
        assert float(terms["mask_fraction"]) == pytest.approx(float((b["label"] == 0).float().mean()))
        # total = sum over nets of (focal + Dice) + ramped soft weight x soft terms
        expect = terms["loss_focal"] + terms["loss_dice"] + 0.5 * terms["loss_soft"]
        assert float(terms["loss"]) == pytest.approx(float(expect), rel=1e-5)
    m = tiny_module(supervision="pseudo")
    target = m.supervised_target(b)
    assert torch.equal(target, merge_pseudo_labels(b["label"], b["labeled"], b["pseudo"]))
    assert int(target[0, 10, 3, 3]) == 3 and int(target[0, 3, 3, 1]) == 1  # pseudo kidney; GT liver wins
    with pytest.raises(ValueError, match="pseudo"):
        m.compute_losses({k: v for k, v in b.items() if k != "pseudo"})
    # a data config without pseudo-labels is caught at fit start, as a one-line user error
    from organseg.errors import ConfigError

    m._trainer = SimpleNamespace(datamodule=SimpleNamespace(pseudo_labels=[None, None]))
    with pytest.raises(ConfigError, match="supervision=pseudo but the data config has no pseudo_labels"):
        m.setup("fit")
    m._trainer.datamodule.pseudo_labels = ["a.h5", None]
    m.setup("fit")
    marginal = tiny_module(supervision="marginal")  # the default dilated region needs pseudo-labels too
    marginal._trainer = SimpleNamespace(datamodule=SimpleNamespace(pseudo_labels=[None, None]))
    with pytest.raises(ConfigError, match="soft_region=dilated_pseudo but the data config has no pseudo"):
        marginal.setup("fit")
    dilated = tiny_module(supervision="pseudo", mask_dilation=1).compute_losses(dict(b))
    assert float(dilated["mask_fraction"]) < float(terms["mask_fraction"])
    ball = tiny_module(supervision="pseudo").compute_losses(dict(b))
    assert 0 < float(ball["mask_fraction"]) < float(terms["mask_fraction"])


# ---------------------------------------------------------------- checkpoint + selected-model inference
def test_checkpoint_state_holds_both_averages_and_predict_uses_the_selected_one():
    m = tiny_module().eval()
    for _ in range(2):
        with torch.no_grad():
            for p in [*m.net_a.parameters(), *m.net_b.parameters()]:
                p.add_(0.1 * torch.randn_like(p))
        m.update_averages()
    keys = m.state_dict().keys()
    assert {"selected", "wam_a.n_averaged", "wam_b.n_averaged"} <= set(keys)
    for name in ("wam_a", "wam_b"):
        assert any(k.startswith(f"{name}.module.") for k in keys)
    image = torch.randn(1, 1, 24, 20, 12)
    m.selected.fill_(1)
    out = m.predict_case(image)
    manual = torch.softmax(_sliding(m.wam_b.module, image, m), 1).argmax(1).to(torch.uint8)
    assert torch.equal(out, manual)
    with torch.no_grad():  # corrupting the non-selected average changes nothing
        for p in m.wam_a.parameters():
            p.copy_(torch.randn_like(p) * 10)
    assert torch.equal(m.predict_case(image), out)
    # a fresh module restores the selection and both averages from the state dict
    fresh = tiny_module()
    fresh.load_state_dict(m.state_dict())
    assert int(fresh.selected) == 1 and fresh.selected_name == "wam_b"
    assert torch.equal(fresh.eval().predict_case(image), out)


def _sliding(net, image, m):
    from monai.inferers import sliding_window_inference

    with torch.no_grad():
        return sliding_window_inference(
            image,
            m.patch_size,
            m.sw_batch_size,
            net,
            overlap=m.sw_overlap,
            mode="gaussian",
            padding_mode="constant",
            cval=float(image.min()),
        )


# ---------------------------------------------------------------- organseg fit end to end
def run(args, cwd, timeout=600):
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO / "tests") + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    proc = subprocess.run(
        [ORGANSEG, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"organseg {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
            f"{proc.stderr[-5000:]}"
        )
    return proc


@pytest.fixture(scope="module")
def fewlabel(tmp_path_factory) -> dict:
    """Two few-organ abdominal phantom datasets (3 cases each: train/val/test), cards + caches, and a
    data config listing both cards."""
    from organseg.cache.build import build_cache
    from organseg.cache.reader import CacheReader
    from organseg.data.pseudo_labels import write_pseudo_file
    from organseg.io.card import DatasetCard
    from organseg.phantom.abdomen import write_abdomen_dataset

    root = tmp_path_factory.mktemp("cowam_data")
    base = yaml.safe_load((REPO / "data_modules/cards/abdomen_phantom.yaml").read_text())
    cards = []
    for name, keep in FEW.items():
        write_abdomen_dataset(
            root / name, 3, 0, keep=keep, shape=SHAPE, spacing=SPACING, workers=1, quiet=True
        )
        card = {
            **base,
            "name": f"abd_{name}",
            "path": str(root / name),
            "cache": str(root / f"{name}.h5"),
            "labeled": keep,
            "target_spacing": list(SPACING),
            "split": {"val": 1, "test": 1, "seed": 0},
        }
        path = root / f"card_{name}.yaml"
        path.write_text(yaml.safe_dump(card, sort_keys=False))
        build_cache(DatasetCard.load(path), workers=1, progress=False)
        cards.append(str(path))
        # stand-in pseudo-labels (first-stage experts are tested elsewhere): a block of one organ this
        # dataset does not annotate, in the middle of each case
        reader = CacheReader(card["cache"])
        organ = CLASSES.index("pancreas" if name == "liv" else "liver")
        maps = []
        for cid in reader.case_ids:
            lab = np.zeros(reader.shape(cid), dtype=np.uint8)
            c = [n // 2 for n in lab.shape]
            lab[c[0] - 4 : c[0] + 4, c[1] - 4 : c[1] + 4, c[2] - 2 : c[2] + 2] = organ
            maps.append((cid, lab))
        write_pseudo_file(
            root / f"pseudo_{name}.h5",
            maps,
            fingerprint="test",
            cache=reader.path,
            cache_fingerprint=reader.fingerprint,
            classes=CLASSES,
            checkpoints=[],
            card_name=card["name"],
        )
    init = {
        "cards": cards,
        "patch_size": [32, 32, 16],
        "batch_size": 2,
        "patches_per_epoch": 4,
        "num_workers": 0,
        "augmentation": None,
    }
    pseudo = {**init, "pseudo_labels": [str(root / f"pseudo_{name}.h5") for name in FEW]}
    for file, args in (("data.yaml", init), ("data_pseudo.yaml", pseudo)):
        (root / file).write_text(
            yaml.safe_dump({"data": {"class_path": "organseg.data.CTDataModule", "init_args": args}})
        )
    return {
        "root": root,
        "cards": cards,
        "data": root / "data.yaml",
        "data_pseudo": root / "data_pseudo.yaml",
    }


def tiny_fit_config(tmp: Path, record: Path, model: dict | None = None, **trainer) -> Path:
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
                {"class_path": f"helpers.probes.{probe}", "init_args": {"out_dir": str(record)}}
                for probe in ("DrawRecorder", "AveragedWeightsRecorder")
            ],
            **trainer,
        },
        "model": {
            "init_args": {
                "filters": [8, 16, 32],
                "strides": [[1, 1, 1], [2, 2, 1], [2, 2, 2]],
                "soft_rampup_steps": 2,
                "hd95_every_n_epochs": 0,
                **(model or {}),
            }
        },
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_fit_on_few_organ_datasets_keeps_both_averages_and_evaluates_the_selected(fewlabel, tmp_path, capsys):
    from organseg.methods.checkpoints import load_module
    from organseg.networks import build_unet

    record = tmp_path / "record"
    cfg = tiny_fit_config(tmp_path, record, model={"mask_dilation": 2})  # supervision: pseudo (cowam.yaml)
    run(
        [
            "fit",
            "-c",
            str(REPO / "experiments/cowam/cowam.yaml"),
            "-c",
            str(fewlabel["data_pseudo"]),
            "-c",
            str(cfg),
            "--trainer.logger.init_args.id=cowam1",
        ],
        cwd=tmp_path,
    )
    metrics = json.loads((record / "rank0.json").read_text())["metrics"]
    for k in (
        "train/loss_epoch",
        "train/loss_focal_epoch",
        "train/loss_dice_epoch",
        "train/loss_soft_epoch",
        "train/net_a/loss_soft_epoch",
        "train/net_b/loss_soft_epoch",
        "train/mask_fraction_epoch",
        "val/wam_a/dice_mean",
        "val/wam_b/dice_mean",
        "val/dice_mean",
        "val/dice/liver",
        "val/dice/pancreas",
        "val/wam_a/dice/pancreas",
        "val/wam_b/dice/liver",
    ):
        assert k in metrics, k
    assert 0 < metrics["train/mask_fraction_epoch"] < 1
    wam = json.loads((record / "wam_rank0.json").read_text())
    assert wam["global_step"] == 4 and wam["n_averaged"] == [4, 4]  # one update per optimiser step
    ckpt_path = tmp_path / "lightning_logs/organseg/cowam1/checkpoints/last.ckpt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    sd = ckpt["state_dict"]
    assert any(k.startswith("wam_a.module.") for k in sd) and any(k.startswith("wam_b.module.") for k in sd)
    extra = ckpt["organseg"]["cowam"]
    sel = extra["selected"]
    assert sel == ["wam_a", "wam_b"][int(sd["selected"])] == ["wam_a", "wam_b"][wam["selected"]]
    dice = {k: metrics[f"val/{k}/dice_mean"] for k in ("wam_a", "wam_b")}
    assert dice[sel] == max(dice.values()) and metrics["val/dice_mean"] == pytest.approx(dice[sel])
    hp = ckpt["hyper_parameters"]
    assert hp["num_classes"] == 7 and hp["supervision"] == "pseudo" and hp["ema_decay"] is None
    assert hp["soft_region"] == "dilated_pseudo" and hp["ema_horizon"] == 0.0625
    # `organseg evaluate --ckpt` loads this way: its predictions are the selected average's, one forward
    model, _ = load_module(ckpt_path)
    net = build_unet(1, 7, [8, 16, 32], [[1, 1, 1], [2, 2, 1], [2, 2, 2]])
    prefix = f"{sel}.module."
    net.load_state_dict({k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)})
    image = torch.randn(1, 1, 40, 36, 20)
    manual = torch.softmax(_sliding(net.eval(), image, model), 1).argmax(1).to(torch.uint8)
    assert torch.equal(model.predict_case(image), manual)
    out = tmp_path / "eval"
    from organseg.cli.main import main

    assert main(["evaluate", "--ckpt", str(ckpt_path), "--out", str(out), "--overlays", "0"]) == 0
    assert "| organ | Dice |" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["per_organ"]) == set(FEW["liv"])  # the first card's annotated organs
    # Lightning's test loop from the run's saved config (every card's test case) scores the same model
    # (its loader ships images as float16, evaluate reads float32: a few boundary voxels may differ)
    run(
        [
            "test",
            "-c",
            str(ckpt_path.parent.parent / "config_fit.yaml"),
            "--ckpt_path",
            str(ckpt_path),
            "--trainer.logger.init_args.id=cowam1test",
            "--trainer.callbacks=[]",
        ],
        cwd=tmp_path,
    )
    report = tmp_path / "lightning_logs/organseg/cowam1test/test_report/summary.json"
    tested = json.loads(report.read_text())["per_organ"]
    assert set(tested) == set(CLASSES[1:])
    for organ in FEW["liv"]:
        assert tested[organ]["dice_mean"] == pytest.approx(summary["per_organ"][organ]["dice_mean"], abs=5e-3)


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_two_processes_keep_the_averaged_models_identical(fewlabel, tmp_path):
    record = tmp_path / "record"
    cfg = tiny_fit_config(
        tmp_path,
        record,
        model={"supervision": "marginal", "soft_region": "unannotated"},
        strategy="ddp",
        devices=2,
        max_epochs=1,
    )
    run(
        [
            "fit",
            "-c",
            str(REPO / "experiments/cowam/cowam.yaml"),
            "-c",
            str(fewlabel["data"]),
            "-c",
            str(cfg),
            "--data.init_args.patches_per_epoch=8",
            "--trainer.logger.init_args.id=cowam_ddp",
        ],
        cwd=tmp_path,
        timeout=900,
    )
    ranks = [json.loads((record / f"wam_rank{r}.json").read_text()) for r in range(2)]
    draws = [json.loads((record / f"rank{r}.json").read_text())["train"] for r in range(2)]
    assert {r["world"] for r in ranks} == {2}
    assert {(c, tuple(loc)) for _, c, loc in draws[0]}.isdisjoint({(c, tuple(loc)) for _, c, loc in draws[1]})
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 2
    assert ranks[0]["n_averaged"] == ranks[1]["n_averaged"] == [2, 2]
    for name in ("wam_a", "wam_b", "net_a", "net_b"):  # different data, identical weights
        assert ranks[0]["hashes"][name] == ranks[1]["hashes"][name], name
    assert ranks[0]["hashes"]["wam_a"] != ranks[0]["hashes"]["wam_b"]
    assert ranks[0]["selected"] == ranks[1]["selected"]
