"""Weighted focal + Dice loss for one-label-per-voxel organ segmentation.

MONAI's ``DiceFocalLoss`` builds its focal term without ``use_softmax`` (sigmoid per channel,
MONAI #8242), which is wrong for mutually exclusive organ labels, so the two MONAI terms are
combined here by hand, and each is returned separately so it can be logged on its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.losses import DiceLoss, FocalLoss
from torch import nn

from organseg.errors import ConfigError


def class_weights_from_counts(
    counts: Sequence[float], mode: str = "inverse_sqrt_frequency", absent: str = "zero"
) -> list[float]:
    """Per-class focal weights from voxel counts, normalised to mean 1 over the classes with voxels.

    ``inverse_frequency`` follows the papers literally but gives 1000x weights for lens vs
    parotid; ``inverse_sqrt_frequency`` (default) keeps the ordering with a tamer range.
    A class with no voxels is never a target in these data, so its weight changes no loss value;
    ``absent="zero"`` (default) gives it 0 and leaves it out of the normalisation, so it does not
    lower the others' weights; ``absent="max"`` (ours, the earlier rule) gives it the largest weight
    seen, counted in the mean.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if mode == "uniform":
        return [1.0] * len(counts)
    power = {"inverse_frequency": 1.0, "inverse_sqrt_frequency": 0.5}.get(mode)
    if power is None:
        raise ConfigError(
            f"class_weights: unknown mode {mode!r} (uniform, inverse_frequency, inverse_sqrt_frequency)"
        )
    if absent not in ("zero", "max"):
        raise ConfigError(f"class_weights: absent must be 'zero' or 'max', got {absent!r}")
    freq = counts / max(counts.sum(), 1.0)
    present = freq > 0
    if not present.any():
        return [1.0] * len(counts)
    w = np.zeros_like(freq)
    w[present] = freq[present] ** -power
    if absent == "max":
        w[~present] = w[present].max()
        return (w / w.mean()).tolist()
    return (w / w[present].mean()).tolist()


class FocalDiceLoss(nn.Module):
    """``focal_weight * FocalLoss(softmax, class weights) + dice_weight * DiceLoss(softmax)``.

    ``forward`` returns a dict with ``loss``, ``loss_focal`` and ``loss_dice`` (the logged names,
    docs/architecture.md §4.7).
    Dice is pooled over the batch (``batch=True``): tiny organs absent from one patch do not
    produce a 0/0 term, which stabilises training on rare classes.
    """

    def __init__(
        self,
        num_classes: int,
        class_weights: Sequence[float] | None = None,
        gamma: float = 2.0,
        focal_weight: float = 1.0,
        dice_weight: float = 1.0,
        dice_include_background: bool = False,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.focal_weight = focal_weight
        self.dice_weight = dice_weight
        weight = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        if weight is not None and weight.numel() != num_classes:
            raise ConfigError(f"class_weights has {weight.numel()} entries, expected {num_classes}")
        self.focal = FocalLoss(
            include_background=True, to_onehot_y=True, gamma=gamma, weight=weight, use_softmax=True
        )
        self.dice = DiceLoss(
            include_background=dice_include_background,
            to_onehot_y=True,
            softmax=True,
            batch=True,
            smooth_nr=1e-5,
            smooth_dr=1e-5,
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """logits [B,C,*S]; target int64 [B,*S] (class indices)."""
        y = target.long().unsqueeze(1)
        focal = self.focal(logits, y)
        dice = self.dice(logits, y)
        return {
            "loss": self.focal_weight * focal + self.dice_weight * dice,
            "loss_focal": focal,
            "loss_dice": dice,
        }
