"""Partial-label supervision: pseudo-label merging rules and the marginal (merged-background) loss."""

from __future__ import annotations

import pytest
import torch

from organseg.losses.partial_labels import (
    MarginalFocalDiceLoss,
    exclusion_dice,
    marginal_log_probs,
    merge_pseudo_labels,
)
from organseg.losses.segmentation import FocalDiceLoss

# classes: 0 background, 1 liver, 2 kidney, 3 pancreas
C = 4


def _labeled(*rows):
    return torch.tensor(rows, dtype=torch.bool)


def test_merge_keeps_gt_and_fills_only_unannotated_classes():
    label = torch.tensor(
        [
            [1, 1, 0, 0, 0, 0],  # liver dataset: annotates {liver}
            [0, 2, 2, 0, 0, 0],
        ]
    )  # kidney+pancreas dataset
    pseudo = torch.tensor(
        [
            [2, 1, 1, 3, 2, 0],  # GT liver wins over pseudo kidney; pseudo liver on GT-0 -> 0
            [1, 3, 2, 1, 3, 2],
        ]
    )  # pseudo kidney/pancreas never land on GT-0 voxels
    labeled = _labeled([True, True, False, False], [True, False, True, True])
    out = merge_pseudo_labels(label, labeled, pseudo)
    assert out.dtype == torch.int64
    assert out.tolist() == [[1, 1, 0, 3, 2, 0], [1, 2, 2, 1, 0, 0]]


def test_merge_is_identity_when_all_annotated_and_pseudo_when_nothing_is():
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, C, (2, 3, 4, 5), generator=g)
    pseudo = torch.randint(0, C, (2, 3, 4, 5), generator=g)
    all_on = torch.ones(2, C, dtype=torch.bool)
    assert torch.equal(merge_pseudo_labels(label, all_on, pseudo), label)
    only_bg = torch.zeros(2, C, dtype=torch.bool)
    only_bg[:, 0] = True
    assert torch.equal(merge_pseudo_labels(torch.zeros_like(label), only_bg, pseudo), pseudo)


def test_merge_rejects_bad_input():
    label = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="differ"):
        merge_pseudo_labels(label, torch.ones(1, C, dtype=torch.bool), torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="outside"):
        merge_pseudo_labels(label, torch.ones(1, C, dtype=torch.bool), torch.full((1, 4), C))


def _batch(seed=0, b=3, shape=(6, 5, 4)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, C, *shape, generator=g)
    label = torch.randint(0, C, (b, *shape), generator=g)
    return logits, label


def test_marginal_equals_focal_dice_when_every_class_is_annotated():
    logits, label = _batch()
    weights = [0.5, 1.0, 1.5, 2.0]
    full = FocalDiceLoss(C, class_weights=weights)(logits, label)
    marg = MarginalFocalDiceLoss(C, class_weights=weights)(logits, label, torch.ones(3, C, dtype=torch.bool))
    for key in ("loss", "loss_focal", "loss_dice"):
        assert torch.allclose(full[key], marg[key], atol=1e-5), key


def test_merged_distribution_sums_background_and_unannotated_per_sample():
    logits, _ = _batch(b=2)
    labeled = _labeled([True, True, False, False], [True, False, True, True])
    p = torch.softmax(logits, 1)
    q = torch.exp(marginal_log_probs(logits, labeled))
    assert torch.allclose(q.sum(1), torch.ones_like(q[:, 0]), atol=1e-5)
    assert torch.allclose(q[0, 0], p[0, 0] + p[0, 2] + p[0, 3], atol=1e-6)
    assert torch.allclose(q[0, 1], p[0, 1], atol=1e-6)
    assert q[0, 2:].max() < 1e-30
    assert torch.allclose(q[1, 0], p[1, 0] + p[1, 1], atol=1e-6)
    assert torch.allclose(q[1, 2:], p[1, 2:], atol=1e-6)


def test_marginal_is_blind_to_which_unannotated_class_fills_the_background():
    """Moving probability between background and unannotated classes changes neither loss nor gradient
    along that direction: the net is not told that an unannotated organ is background."""
    logits, label = _batch(seed=1, b=2)
    labeled = _labeled([True, True, False, False], [True, True, False, True])
    label = torch.where(labeled.gather(1, label.flatten(1)).view_as(label), label, torch.zeros_like(label))
    loss_fn = MarginalFocalDiceLoss(C, class_weights=[1.0, 2.0, 1.0, 0.5])
    base = loss_fn(logits, label, labeled)["loss"]
    # swap the background and an unannotated class's logits (sample 0: kidney; sample 1: kidney)
    swapped = logits.clone()
    swapped[:, [0, 2]] = logits[:, [2, 0]]
    assert torch.allclose(loss_fn(swapped, label, labeled)["loss"], base, atol=1e-6)
    # gradient: zero directional derivative along "more of class 2, less of background" at fixed merged sum
    x = logits.clone().requires_grad_(True)
    loss_fn(x, label, labeled)["loss"].backward()
    p = torch.softmax(logits, 1)
    # the loss sees only the merged sum p_0 + p_2, so dL/dz_k = p_k * dL/d(log sum) for both members:
    # equal grad/p ratios <=> zero derivative along any redistribution that keeps the sum
    g = x.grad
    ratio_bg = g[:, 0] / p[:, 0]
    ratio_u = g[:, 2] / p[:, 2]
    assert torch.allclose(ratio_bg, ratio_u, rtol=1e-3, atol=1e-6)
    assert g[:, 2].abs().max() > 0  # it is not simply cut off: the merged sum is still trained


def test_naive_loss_does_penalise_unannotated_organ_probability():
    """Control for the test above: the plain loss changes when background mass moves to an organ."""
    logits, label = _batch(seed=1, b=2)
    label = torch.where(label == 2, torch.zeros_like(label), label)
    swapped = logits.clone()
    swapped[:, [0, 2]] = logits[:, [2, 0]]
    plain = FocalDiceLoss(C)
    assert not torch.allclose(plain(logits, label)["loss"], plain(swapped, label)["loss"], atol=1e-4)


def test_marginal_mixed_batch_sample_matches_single_sample_focal():
    """Per-sample merging: a sample that annotates everything gets the plain focal term even when the
    other sample in the batch annotates almost nothing."""
    logits, label = _batch(seed=2, b=2)
    labeled = _labeled([True, True, True, True], [True, False, False, False])
    label[1] = 0
    fn = MarginalFocalDiceLoss(C, dice_weight=0.0)
    mixed = fn(logits, label, labeled)["loss_focal"]
    # focal is a voxel mean: mixed = mean(plain focal of sample 0, merged focal of sample 1)
    f0 = FocalDiceLoss(C, dice_weight=0.0)(logits[:1], label[:1])["loss_focal"]
    merged1 = fn(logits[1:], label[1:], labeled[1:])["loss_focal"]
    assert torch.allclose(mixed, (f0 + merged1) / 2, atol=1e-6)
    # sample 1 annotates nothing but background: its merged distribution is all background -> ~0 loss
    assert merged1 < 1e-6


def test_marginal_ignores_labels_of_classes_declared_unannotated():
    logits, label = _batch(seed=3, b=1)
    labeled = _labeled([True, True, False, False])
    fn = MarginalFocalDiceLoss(C)
    cleaned = torch.where(label >= 2, torch.zeros_like(label), label)
    assert torch.allclose(fn(logits, label, labeled)["loss"], fn(logits, cleaned, labeled)["loss"])


def test_marginal_is_finite_under_half_precision_and_trains():
    logits, label = _batch(seed=4, b=2, shape=(8, 8, 4))
    labeled = _labeled([True, True, False, False], [True, False, True, True])
    label = torch.where(labeled.gather(1, label.flatten(1)).view_as(label), label, torch.zeros_like(label))
    out = MarginalFocalDiceLoss(C)(logits.bfloat16(), label, labeled)
    assert torch.isfinite(out["loss"])
    x = torch.zeros_like(logits, requires_grad=True)
    opt = torch.optim.Adam([x], lr=0.3)
    fn = MarginalFocalDiceLoss(C)
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = fn(x, label, labeled)["loss"]
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_exclusion_loss_equals_a_hand_computation():
    """Shi et al.'s exclusion loss on 4 voxels: liver annotated (label [1, 1, 0, 0]), kidney and pancreas
    not. Exclusion sets: liver 1 - g_liver = [0, 0, 1, 1]; kidney, pancreas 1 - g_bg = [1, 1, 0, 0].
    L = mean_c (2 sum p_c E_c) / (sum p_c + sum E_c) over c = liver, kidney, pancreas."""
    p = torch.tensor(  # per voxel (rows): background, liver, kidney, pancreas
        [[0.1, 0.6, 0.2, 0.1], [0.1, 0.5, 0.1, 0.3], [0.7, 0.1, 0.1, 0.1], [0.4, 0.2, 0.3, 0.1]]
    )
    logits = torch.log(p).T[None]  # [1, C, 4]
    label = torch.tensor([[1, 1, 0, 0]])
    labeled = _labeled([True, True, False, False])
    # (overlap with E, sum p, |E|): liver (0.1 + 0.2, 1.4, 2); kidney (0.2 + 0.1, 0.7, 2);
    # pancreas (0.1 + 0.3, 0.6, 2)
    hand = (2 * 0.3 / (1.4 + 2) + 2 * 0.3 / (0.7 + 2) + 2 * 0.4 / (0.6 + 2)) / 3
    assert float(exclusion_dice(logits, label, labeled)) == pytest.approx(hand, rel=1e-4)
    # a fully annotated sample in the same batch is left out (it has no unannotated organ)
    full_logits = torch.cat([logits, torch.randn(1, C, 4)])
    full_label = torch.cat([label, torch.tensor([[2, 3, 0, 1]])])
    both = torch.cat([labeled, torch.ones(1, C, dtype=torch.bool)])
    assert float(exclusion_dice(full_logits, full_label, both)) == pytest.approx(hand, rel=1e-4)
    assert float(exclusion_dice(logits, label, torch.ones(1, C, dtype=torch.bool))) == 0.0
    # in the marginal loss: loss = marginal focal + Dice + exclusion_weight x L, logged as loss_exclusion
    marg = MarginalFocalDiceLoss(C)(logits[..., None], label[..., None], labeled)
    with_ex = MarginalFocalDiceLoss(C, exclusion_weight=2.0)(logits[..., None], label[..., None], labeled)
    assert "loss_exclusion" not in marg
    assert float(with_ex["loss_exclusion"]) == pytest.approx(hand, rel=1e-4)
    assert float(with_ex["loss"]) == pytest.approx(float(marg["loss"]) + 2 * hand, rel=1e-4)


def test_marginal_baseline_pairs_the_exclusion_loss_by_default():
    from organseg.methods.cowam_baselines import MarginalUNet

    tiny = {"filters": [4, 4, 4], "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "patch_size": [8, 8, 4]}
    published = MarginalUNet(C, **tiny)
    assert published.loss_fn.exclusion_weight == 2.0 and published.hparams.exclusion_weight == 2.0
    assert (
        MarginalUNet(C, exclusion_weight=0.0, **tiny).loss_fn.exclusion_weight == 0.0
    )  # ours: marginal only
    with pytest.raises(ValueError, match="exclusion_weight"):
        MarginalUNet(C, exclusion_weight=-1.0, **tiny)
