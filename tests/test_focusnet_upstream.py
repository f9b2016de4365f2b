"""FocusNetV2 as published (issue 13): the joint stage trains only the SOS-Nets, upstream's shape-constraint
and SOS losses equal a hand computation of adv_train.py / losses.py, SOS trains at SOL-predicted centres with
negatives, upstream's ROI box in mm; and each project variant is still reachable by its named option."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from organseg.errors import CheckpointError, ConfigError
from organseg.losses import FocalDiceLoss
from organseg.losses.segmentation import (
    UpstreamFocalTverskyLoss,
    binary_adaptive_tversky_loss,
    binary_focal_loss,
)
from organseg.losses.shape import upstream_discriminator_loss, upstream_generator_shape_loss
from organseg.methods.focusnet_stages import JointStage, SNetStage, SOLStage, SOSStage
from organseg.networks.focusnetv2 import FocusNetArchitecture
from organseg.networks.shape_autoencoder import ShapeAutoencoder, UpstreamShapeAutoencoder
from organseg.networks.sos import UpstreamSOSBranch
from test_focusnet_stages import TINY, Record, batch, loader, trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------ 1. the joint stage trains SOS only
def test_joint_stage_default_trains_only_sos_and_the_autoencoder():
    torch.manual_seed(0)
    module = JointStage(**TINY)
    assert (module.hparams.joint_trainable, module.hparams.shape_loss) == ("sos", "upstream")
    assert not module.uses_heatmap_targets  # frozen SOL's own centres: no target heatmaps needed
    before = {p: digest(getattr(module.focusnet, p)) for p in ("snet", "sol", "sos", "shape_ae", "disc")}
    rec = Record()
    trainer(callbacks=[rec]).fit(module, train_dataloaders=loader())
    after = {p: digest(getattr(module.focusnet, p)) for p in before}
    # parameters AND buffers (BatchNorm statistics): frozen parts run in eval mode
    assert after["snet"] == before["snet"] and after["sol"] == before["sol"]
    assert after["disc"] == before["disc"]  # upstream has no real/fake head
    assert after["sos"] != before["sos"] and after["shape_ae"] != before["shape_ae"]
    opt_g, opt_d = (o.optimizer for o in module.optimizers())
    assert type(opt_g) is torch.optim.Adam and type(opt_d) is torch.optim.Adam
    for opt in (opt_g, opt_d):
        assert opt.defaults["lr"] == 2e-4 and opt.defaults["weight_decay"] == 1e-4
    g = {id(p) for grp in opt_g.param_groups for p in grp["params"]}
    assert g == {id(p) for p in module.focusnet.sos.parameters()}
    for key in ("loss", "loss_sos", "loss_shape", "loss_disc", "loss_recon", "loss_push"):
        assert math.isfinite(rec.metrics[f"train/{key}"]), key
    assert "train/loss_adv" not in rec.metrics and "train/loss_heatmap" not in rec.metrics


def test_joint_trainable_all_is_the_option_that_fine_tunes_snet_and_sol():
    module = JointStage(**TINY, joint_trainable="all", shape_loss="code_l2_bce")
    assert set(module.trainable) == {"snet", "sol", "sos", "shape_ae", "disc"}
    opt_g, _ = module.configure_optimizers()
    assert type(opt_g) is torch.optim.AdamW
    assert module.uses_heatmap_targets
    with pytest.raises(ConfigError, match="joint_trainable must be one of"):
        JointStage(**TINY, joint_trainable="snet")
    with pytest.raises(ConfigError, match="shape_loss must be one of"):
        JointStage(**TINY, shape_loss="bce")


# ------------------------------------------------------------------ 2. upstream's losses by hand
def test_binary_focal_and_tversky_equal_upstream_formulas_by_hand():
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0])
    target = torch.tensor([1.0, 0.0, 0.0, 1.0])
    p = [1 / (1 + math.exp(-v)) for v in logits.tolist()]
    terms = [
        -0.5 * (1 - pi) ** 2 * math.log(pi) if t else -0.5 * pi**2 * math.log(1 - pi)
        for pi, t in zip(p, target.tolist())
    ]
    assert binary_focal_loss(logits, target).item() == pytest.approx(sum(terms) / 4, rel=1e-5)
    tp = p[0] + p[3]
    fp = p[1] + p[2]
    fn = (1 - p[0]) + (1 - p[3])
    a = min(max(fp / (fp + fn + 1e-5), 0.2), 0.8)
    ti = tp / (tp + a * fp + (1 - a) * fn + 1e-5)
    assert binary_adaptive_tversky_loss(logits, target).item() == pytest.approx(1 - ti, rel=1e-5)
    # organs given as a list are pooled like upstream's batch of organs
    parts = binary_focal_loss([logits[:2], logits[2:]], [target[:2], target[2:]])
    assert parts.item() == pytest.approx(sum(terms) / 4, rel=1e-5)


def test_upstream_shape_losses_equal_a_hand_computation():
    torch.manual_seed(0)
    ae = ShapeAutoencoder(1, code_channels=3, base=2)
    g = torch.Generator().manual_seed(1)
    # two organs (upstream stacks its three as one batch), 1 sample each, 8 x 8 x 8 ROIs
    pred = [torch.randn(1, 1, 8, 8, 8, generator=g, requires_grad=True) for _ in range(2)]
    true = [(torch.rand(1, 1, 8, 8, 8, generator=g) > 0.7).float() for _ in range(2)]

    def outputs(x):  # upstream's ConvAE returns (sigmoid recon, code, _, [f1, f2])
        code = ae.encode(x)
        logits, feats = ae.decode(code, x.shape[-3:], return_features=True)
        assert len(feats) == 3  # [from_code, f1, f2]
        return torch.sigmoid(logits), code, feats[1], feats[2]

    sp = torch.cat([torch.sigmoid(p.detach()) for p in pred])
    gt = torch.cat(true)
    rp, zp, f1p, f2p = outputs(sp)
    rg, zg, f1g, f2g = outputs(gt)
    with torch.no_grad():
        want_d = 0.999 * (F.mse_loss(rp, sp) + F.mse_loss(rg, gt)) - 0.001 * (
            F.mse_loss(zp, zg) + 0.2 * F.mse_loss(f1p, f1g) + 0.2 * F.mse_loss(f2p, f2g)
        )
    d = upstream_discriminator_loss(ae, pred, true)
    assert d["loss"].item() == pytest.approx(want_d.item(), rel=1e-5)
    # D step: gradients reach the AE only (predictions detached)
    d["loss"].backward()
    assert all(p.grad is None for p in pred) and all(q.grad is not None for q in ae.parameters())
    ae.zero_grad(set_to_none=True)

    sg = torch.cat([torch.sigmoid(p) for p in pred])
    rp, zp, f1p, f2p = outputs(sg)
    with torch.no_grad():
        want_g = 5 * F.mse_loss(zp, zg) + F.mse_loss(f1p, f1g) + F.mse_loss(f2p, f2g) + F.mse_loss(sg, gt)
    ae.zero_grad(set_to_none=True)
    gl = upstream_generator_shape_loss(ae, pred, true)
    assert gl["loss"].item() == pytest.approx(want_g.item(), rel=1e-5)
    # G step: gradients reach the predictions only (the AE is frozen)
    gl["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pred)
    assert all(q.grad is None for q in ae.parameters())


def test_sos_stage_upstream_loss_is_focal_plus_half_tversky_pooled_over_organs():
    module = SOSStage(**TINY)
    g = torch.Generator().manual_seed(2)
    rois = [
        {
            "logits": torch.randn(2, 1, 8, 8, 2, generator=g),
            "target": (torch.rand(2, 1, 8, 8, 2, generator=g) > 0.8),
        }
        for _ in range(2)
    ]
    for r in rois:
        r["target"] = r["target"].float()
    got = module.sos_loss(rois)["loss"]
    x = torch.cat([r["logits"].flatten() for r in rois])
    t = torch.cat([r["target"].flatten() for r in rois])
    assert got.item() == pytest.approx(
        (binary_focal_loss(x, t) + 0.5 * binary_adaptive_tversky_loss(x, t)).item(), rel=1e-6
    )
    ours = SOSStage(**TINY, sos_loss="focal_dice").sos_loss(rois)["loss"]
    assert ours.item() != pytest.approx(got.item())


# ------------------------------------------------------------------ 3. SOS at predicted centres, negatives
def test_sos_trains_at_predicted_centres_of_every_sample_including_negatives():
    module = SOSStage(**TINY)  # default sos_centres="predicted"
    assert not module.uses_heatmap_targets  # SOL's own heatmaps, no target heatmaps needed
    b = batch(3)
    b["label"][1][b["label"][1] == 2] = 0  # sample 1: organ small_a absent
    b["heatmap"][1, 0] = 0  # (and so its target heatmap)
    heat = torch.zeros(3, 2, *b["label"].shape[1:])
    peaks_a = [(9, 10, 3), (25, 25, 5), (0, 31, 7)]  # on the organ / elsewhere / in a corner
    for i, (x, y, z) in enumerate(peaks_a):
        heat[i, 0, x, y, z] = 1.0
        heat[i, 1, 20, 19, 4] = 1.0
    rois = module.training_rois(b, heat)
    assert [r["k"] for r in rois] == [0, 1]
    a = rois[0]
    size = module.roi_sizes[0]
    assert a["index"].tolist() == [0, 1, 2]  # every sample, organ present or not
    assert a["target"].shape == (3, 1, *size)
    # sample 0: centred on the SOL peak; sample 2: the box shifted inside the patch (upstream's clamp)
    assert a["centres"][0].tolist() == [9.0, 10.0, 3.0]
    dims = b["label"].shape[1:]
    for c, s, d in zip(a["centres"][2].tolist(), size, dims):
        assert 0 <= c - s // 2 and c - s // 2 + s <= d
    # sample 2 holds the organ, but SOL's peak is far from it: also a negative ROI, as at test time
    assert a["present"].tolist() == [True, False, False]
    assert a["target"][0].sum() > 0 and a["target"][1].sum() == 0 and a["target"][2].sum() == 0  # negatives
    # ours: true centres + jitter, only where the organ is present, so never a negative
    ours = SOSStage(**TINY, sos_centres="true_jittered", jitter_voxels=[0, 0, 0])
    assert ours.uses_heatmap_targets
    gt = ours.training_rois(b, heat)
    assert gt[0]["index"].tolist() == [0, 2] and all(t.sum() > 0 for t in gt[0]["target"])
    # a training step at predicted centres runs and trains SOS on them
    torch.manual_seed(0)
    step = SOSStage(**TINY)
    loss = step.training_step(batch(2), 0)
    assert torch.isfinite(loss) and loss.requires_grad
    with pytest.raises(ConfigError, match="sos_centres must be one of"):
        SOSStage(**TINY, sos_centres="true")


# ------------------------------------------------------------------ 4. upstream's ROI box in mm
def test_default_roi_is_upstreams_64_64_8_voxels_at_its_spacing():
    arch = FocusNetArchitecture()
    assert arch.roi_mm == (64.0, 64.0, 20.0)
    assert arch.roi_sizes(["chiasm"], [1.0, 1.0, 2.5]) == [(64, 64, 8)]  # upstream's 8 x 64 x 64 voxels
    assert arch.roi_sizes(["chiasm"], [1.0, 1.0, 3.0]) == [(64, 64, 8)]
    assert arch.roi_sizes(["chiasm"], [2.0, 2.0, 3.0]) == [(32, 32, 8)]


# ------------------------------------------------------------------ 5. merge option and older checkpoints
def test_merge_defaults_to_upstream_and_older_small_organs_from_maps_to_its_rule():
    assert SOSStage(**TINY).merge == "upstream"
    assert SOSStage(**TINY, merge="runner_up").merge == "runner_up"
    # checkpoints written before issue 13 store small_organs_from; they keep the rule they had
    assert SOSStage(**TINY, small_organs_from="sos").merge == "runner_up"
    assert SOSStage(**TINY, small_organs_from="snet_and_sos").merge == "replace_in_roi"
    assert SOSStage(**TINY, small_organs_from="sos").hparams["merge"] == "runner_up"
    with pytest.raises(ConfigError, match="merge must be one of"):
        SOSStage(**TINY, merge="sos")


# ------------------------------------------------------------------ 6. S-Net: fixed alphas + 0.2 Tversky
def test_snet_upstream_loss_equals_focal_with_fixed_alphas_plus_point_two_tversky_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]]).T.reshape(1, 2, 3, 1, 1)  # 3 voxels, 2 classes
    target = torch.tensor([0, 1, 1]).reshape(1, 3, 1, 1)
    p = torch.softmax(logits[0, :, :, 0, 0], dim=0)  # [C, voxel]
    alphas = [0.5, 8.0]
    focal = (
        sum(
            -alphas[y] * (1 - p[y, v].item()) ** 2 * math.log(p[y, v].item()) for v, y in enumerate([0, 1, 1])
        )
        / 3
    )
    dl = []
    for c in (0, 1):
        t = [1.0 if y == c else 0.0 for y in [0, 1, 1]]
        tp = sum(p[c, v].item() * t[v] for v in range(3))
        fp = sum(p[c, v].item() * (1 - t[v]) for v in range(3))
        fn = sum((1 - p[c, v].item()) * t[v] for v in range(3))
        a = min(max(fp / (fp + fn + 1e-5), 0.2), 0.8)
        dl.append(1 - tp / (tp + a * fp + (1 - a) * fn + 1e-5))
    got = UpstreamFocalTverskyLoss(2, alphas)(logits, target)
    assert got["loss_focal"].item() == pytest.approx(focal, rel=1e-5)
    assert got["loss_dice"].item() == pytest.approx(sum(dl) / 2, rel=1e-5)
    assert got["loss"].item() == pytest.approx(focal + 0.2 * sum(dl) / 2, rel=1e-5)


def test_snet_stage_defaults_to_upstream_alphas_and_keeps_ours_as_options():
    module = SNetStage(**TINY)
    assert isinstance(module.loss_fn, UpstreamFocalTverskyLoss)
    # classes: background, big, small_a, small_b
    assert module.loss_fn.focal.class_weight.tolist() == [0.5, 1.0, 8.0, 8.0]
    assert torch.isfinite(module.training_step(batch(2), 0))
    ours = SNetStage(**TINY, snet_loss="focal_dice", class_weights="inverse_sqrt_frequency")
    assert isinstance(ours.loss_fn, FocalDiceLoss)
    with pytest.raises(ConfigError, match="snet_loss must be one of"):
        SNetStage(**TINY, snet_loss="dice")


# ------------------------------------------------------------------ 8. schedules over a step budget
def test_step_budget_schedule_warms_up_and_decays_over_max_steps():
    module = SNetStage(**TINY)  # upstream shape: warm-up 5/600, x0.1 at 1/3 and 2/3 of the steps
    module._trainer = SimpleNamespace(estimated_stepping_batches=600)  # e.g. --trainer.max_steps=600
    cfg = module.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    assert cfg["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(600):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    lr = 2e-3
    assert lrs[0] == pytest.approx(lr * math.exp(-10))  # upstream's lr * e^(10 (s/5 - 1)) at s = 0
    assert lrs[3] == pytest.approx(lr * math.exp(10 * (3 / 5 - 1)))
    assert lrs[5] == pytest.approx(lr) and lrs[199] == pytest.approx(lr)
    assert lrs[200] == pytest.approx(lr * 0.1) and lrs[399] == pytest.approx(lr * 0.1)
    assert lrs[400] == pytest.approx(lr * 0.01) and lrs[599] == pytest.approx(lr * 0.01)
    # the same shape over another budget: the milestones follow max_steps
    module._trainer = SimpleNamespace(estimated_stepping_batches=60)
    factor = module.configure_optimizers()["lr_scheduler"]["scheduler"].lr_lambdas[0]
    assert factor(19) == 1.0 and factor(20) == pytest.approx(0.1) and factor(40) == pytest.approx(0.01)
    # SOL: x0.25 at 1/3 and 2/3, no warm-up
    sol = SOLStage(**TINY)
    sol._trainer = SimpleNamespace(estimated_stepping_batches=90)
    f = sol.configure_optimizers()["lr_scheduler"]["scheduler"].lr_lambdas[0]
    assert (f(0), f(30), f(60)) == (1.0, 0.25, 0.0625)
    # ours: poly per epoch; SOS: constant (upstream); unbounded runs: constant
    ours = SNetStage(**TINY, lr_schedule="poly_epochs")
    ours._trainer = SimpleNamespace(max_epochs=10, estimated_stepping_batches=600)
    assert ours.configure_optimizers()["lr_scheduler"]["interval"] == "epoch"
    assert isinstance(SOSStage(**TINY).configure_optimizers(), torch.optim.AdamW)
    module._trainer = SimpleNamespace(estimated_stepping_batches=float("inf"))
    with pytest.warns(UserWarning, match="constant lr"):
        assert isinstance(module.configure_optimizers(), torch.optim.AdamW)
    with pytest.raises(ConfigError, match="lr_schedule"):
        JointStage(**TINY, lr_schedule="step_budget")


# ------------------------------------------------------------------ 9. upstream's SOS branch (CT only)
def test_sos_branch_defaults_to_upstreams_ct_only_network_and_unet_stays_an_option():
    assert FocusNetArchitecture().sos_branch == "upstream"
    torch.manual_seed(0)
    image = torch.randn(1, 1, *TINY["patch_size"])
    centres = torch.tensor([[10.0, 10.0, 4.0]])
    g = torch.Generator().manual_seed(3)
    feats = [torch.randn(1, 4, *TINY["patch_size"], generator=g) for _ in range(2)]
    heat = torch.rand(1, 2, *TINY["patch_size"], generator=g)
    for branch, reads_features in (("upstream", False), ("unet", True)):
        net = dataclasses.replace(TINY["architecture"], sos_branch=branch).build(
            TINY["classes"], TINY["small_organs"], TINY["spacing"]
        )
        net.eval()
        with torch.no_grad():
            a, _ = net.sos_logits(feats[0], heat, image, centres, 0)
            b, _ = net.sos_logits(feats[1], heat, image, centres, 0)
        assert a.shape == (1, 1, *net.roi_sizes[0])
        assert (not torch.equal(a, b)) == reads_features, branch  # upstream: the CT crop alone
    assert isinstance(SOSStage(**TINY).focusnet.sos[0], UpstreamSOSBranch)
    # an architecture record written before issue 13 has no sos_branch: its SOS-Nets are the U-Net
    old = {k: v for k, v in TINY["architecture"].as_dict().items() if k != "sos_branch"}
    assert FocusNetArchitecture.of(old).sos_branch == "unet"
    # two poolings: the ROI must be divisible by (4, 4, 2)
    with pytest.raises(ConfigError, match="divisible by"):
        dataclasses.replace(TINY["architecture"], roi_mm=(6.0, 8.0, 6.0)).build(
            TINY["classes"], TINY["small_organs"], TINY["spacing"]
        )


def test_a_chain_begun_before_issue_13_continues_with_its_architecture(tmp_path):
    """An S-Net checkpoint whose record predates sos_branch loads into a later stage given ``unet``."""
    old_arch = dataclasses.replace(TINY["architecture"], sos_branch="unet", shape_ae="spatial")
    snet = SNetStage(**dict(TINY, architecture=old_arch))
    added = ("sos_branch", "shape_ae", "ae_latent")  # the fields issue 13 added
    record = {k: v for k, v in snet.architecture_record.items() if k not in added}
    path = tmp_path / "old_snet.ckpt"
    torch.save(
        {"state_dict": snet.state_dict(), "organseg": {"module": "x.SNetStage", "architecture": record}}, path
    )
    SOLStage(**dict(TINY, architecture=old_arch), init_from=str(path)).load_init()
    with pytest.raises(
        CheckpointError, match=r"\(sos_branch unet vs upstream; shape_ae spatial vs upstream\)$"
    ):
        SOLStage(**TINY, init_from=str(path)).load_init()


def test_shape_ae_defaults_to_upstreams_conv_ae_with_a_fully_connected_code():
    arch = FocusNetArchitecture()
    assert (arch.shape_ae, arch.ae_latent) == ("upstream", 512)
    # upstream's widths at its ROI: ConvAE(1, 1, 512) has 31,148,801 parameters
    full = UpstreamShapeAutoencoder((64, 64, 8), base=64, latent=512)
    assert sum(p.numel() for p in full.parameters()) == 31_148_801
    ae = UpstreamShapeAutoencoder((16, 16, 8), base=2, latent=6)
    masks = (torch.rand(3, 1, 16, 16, 8) > 0.5).float()
    code, h0, f1, f2 = ae.embed(masks)
    # upstream (D, H, W) 8 x 64 x 64: z 512, f1 128 x 2 x 16², f2 64 x 4 x 32²; here x, y, z and b = 2
    assert code.shape == (3, 6) and f1.shape == (3, 4, 4, 4, 2) and f2.shape == (3, 2, 8, 8, 4)
    recon, _ = ae(masks)
    assert recon.shape == masks.shape
    net = dataclasses.replace(
        TINY["architecture"], roi_mm={"small_a": (8.0, 8.0, 6.0), "small_b": (16.0, 16.0, 6.0)}
    )
    with pytest.raises(ConfigError, match="one ROI size"):
        net.build(TINY["classes"], TINY["small_organs"], TINY["spacing"])
    spatial = dataclasses.replace(net, shape_ae="spatial", sos_branch="unet")  # ours: any ROI sizes
    assert not isinstance(
        spatial.build(TINY["classes"], TINY["small_organs"], TINY["spacing"]).shape_ae,
        UpstreamShapeAutoencoder,
    )
