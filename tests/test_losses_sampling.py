"""Loss terms and class-balanced sampling: values, not just shapes."""

import numpy as np
import pytest
import torch
from monai.losses import DiceLoss, FocalLoss

from organseg.data.augmentation import AugmentationConfig
from organseg.data.sampling import class_probabilities, draw_centre, patch_start
from organseg.data.sharding import split_evenly
from organseg.losses import FocalDiceLoss, class_weights_from_counts


def test_focal_dice_matches_monai_terms_and_uses_softmax():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 8, 4, requires_grad=True)
    target = torch.randint(0, 4, (2, 8, 8, 4))
    w = [0.5, 1.0, 2.0, 3.0]
    terms = FocalDiceLoss(4, w, gamma=2.0, focal_weight=0.7, dice_weight=0.3)(logits, target)
    focal = FocalLoss(to_onehot_y=True, use_softmax=True, gamma=2.0, weight=torch.tensor(w))(
        logits, target[:, None]
    )
    dice = DiceLoss(
        to_onehot_y=True, softmax=True, include_background=False, batch=True, smooth_nr=1e-5, smooth_dr=1e-5
    )(logits, target[:, None])
    assert torch.allclose(terms["loss_focal"], focal)
    assert torch.allclose(terms["loss_dice"], dice)
    assert torch.allclose(terms["loss"], 0.7 * focal + 0.3 * dice)
    terms["loss"].backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # softmax focal: adding a constant to all logits changes nothing (a sigmoid focal term would change)
    shifted = FocalDiceLoss(4, w)(logits.detach() + 3.0, target)
    base = FocalDiceLoss(4, w)(logits.detach(), target)
    assert torch.allclose(shifted["loss_focal"], base["loss_focal"], atol=1e-5)


def test_perfect_prediction_has_near_zero_loss():
    target = torch.randint(0, 3, (1, 6, 6, 3))
    logits = torch.nn.functional.one_hot(target, 3).permute(0, 4, 1, 2, 3).float() * 50
    terms = FocalDiceLoss(3)(logits, target)
    assert terms["loss"].item() < 1e-3


def test_class_weights_inverse_frequency_ordering_and_mean_one():
    w = class_weights_from_counts([1_000_000, 10_000, 100, 0], "inverse_sqrt_frequency")
    assert np.isclose(np.mean(w[:3]), 1.0)
    assert w[0] < w[1] < w[2] and w[3] == 0.0  # absent: never a target, weight 0
    w_max = class_weights_from_counts([1_000_000, 10_000, 100, 0], "inverse_sqrt_frequency", absent="max")
    assert np.isclose(np.mean(w_max), 1.0) and w_max[3] == max(w_max)
    w_full = class_weights_from_counts([1000, 10], "inverse_frequency")
    assert np.isclose(w_full[1] / w_full[0], 100.0)
    assert class_weights_from_counts([5, 7], "uniform") == [1.0, 1.0]
    with pytest.raises(ValueError, match="unknown mode"):
        class_weights_from_counts([1, 2], "bogus")


def test_class_probabilities_starve_no_small_organ():
    counts = np.array([10**7, 30_000, 25, 0])  # background, big organ, lens, absent organ
    p = class_probabilities(counts, foreground_probability=0.6)
    assert np.isclose(p.sum(), 1.0)
    assert np.isclose(p[0], 0.4) and np.isclose(p[1], p[2]) and p[3] == 0.0
    p_w = class_probabilities(counts, 0.6, organ_weights=[1, 1, 3, 1])
    assert np.isclose(p_w[2] / p_w[1], 3.0)
    assert np.allclose(class_probabilities(np.array([100, 0, 0]), 0.6), [1.0, 0.0, 0.0])


def test_draw_centre_hits_the_chosen_class_at_the_requested_rate():
    rng = np.random.default_rng(0)
    lens = np.array([[10, 10, 3], [11, 10, 3]])
    big = np.stack(
        np.meshgrid(np.arange(30, 40), np.arange(30, 40), np.arange(5, 8), indexing="ij"), -1
    ).reshape(-1, 3)
    coords = {1: big, 2: lens}
    counts = np.array([10**6, len(big), len(lens)])
    drawn = [draw_centre(rng, (64, 64, 16), counts, coords.__getitem__, 0.67)[1] for _ in range(3000)]
    frac = np.bincount(drawn, minlength=3) / len(drawn)
    assert abs(frac[2] - 0.335) < 0.04 and abs(frac[1] - 0.335) < 0.04
    c, k = draw_centre(np.random.default_rng(1), (64, 64, 16), np.array([1, 0, 2]), coords.__getitem__, 1.0)
    assert k == 2 and any((c == x).all() for x in lens)


def test_patch_start_keeps_centre_inside_patch():
    rng = np.random.default_rng(0)
    size = np.array([32, 32, 8])
    for _ in range(200):
        centre = rng.integers(0, 100, 3)
        start = patch_start(rng, centre, size, jitter=0.9)
        assert ((centre >= start) & (centre < start + size)).all()


def test_split_evenly_covers_everything_once():
    for n, parts in [(10, 3), (2, 4), (0, 2), (7, 7)]:
        runs = [split_evenly(n, parts, i) for i in range(parts)]
        covered = [j for a, b in runs for j in range(a, b)]
        assert covered == list(range(n))


def test_augmentation_margin_grows_with_rotation_and_is_zero_without_affine():
    small = AugmentationConfig(degrees=(2, 2, 2)).margin([96, 96, 32])
    big = AugmentationConfig(degrees=(20, 20, 20)).margin([96, 96, 32])
    assert all(b > s for b, s in zip(big, small))
    assert AugmentationConfig(affine_p=0).margin([96, 96, 32]) == [0, 0, 0]
    assert AugmentationConfig.from_any(None) is None
