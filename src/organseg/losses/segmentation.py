"""Weighted focal + Dice loss for one-label-per-voxel organ segmentation.

MONAI's ``DiceFocalLoss`` builds its focal term without ``use_softmax`` (sigmoid per channel,
MONAI #8242), which is wrong for mutually exclusive organ labels, so the two MONAI terms are
combined here by hand, and each is returned separately so it can be logged on its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
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


def _flat(values: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """One tensor, or several of any shapes (e.g. organs with different ROI sizes) pooled into one 1-D
    float tensor: a loss over the pooled voxels equals the loss over the concatenation."""
    if isinstance(values, torch.Tensor):
        return values.reshape(-1).float()
    return torch.cat([v.reshape(-1).float() for v in values])


def binary_focal_loss(
    logits: torch.Tensor | Sequence[torch.Tensor],
    target: torch.Tensor | Sequence[torch.Tensor],
    alpha: float = 0.5,
    gamma: float = 2.0,
) -> torch.Tensor:
    """FocusNetV2's SOS focal loss (upstream ``losses.BinaryFocalLoss``, alpha 0.5, gamma 2), the mean
    over every voxel of ``-alpha (1-p)^gamma log p * t - (1-alpha) p^gamma log(1-p) * (1-t)``, p = sigmoid.

    Upstream's negative term uses ``logsigmoid(1 - logit)``, a typo for ``log(1 - p) = logsigmoid(-logit)``
    (it leaves a non-zero gradient at p = 0); this is the intended formula. Several tensors (organs) are
    pooled, as upstream stacks its three organs into one batch."""
    x, t = _flat(logits), _flat(target).to(_flat(logits).dtype)
    p = torch.sigmoid(x)
    pos = -alpha * (1 - p).pow(gamma) * F.logsigmoid(x) * t
    neg = -(1 - alpha) * p.pow(gamma) * F.logsigmoid(-x) * (1 - t)
    return (pos + neg).mean()


def adaptive_tversky(
    tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor, smooth: float = 1e-5
) -> torch.Tensor:
    """Upstream's adaptive Tversky index per class from summed TP/FP/FN: ``alpha = FP / (FP + FN)`` clamped
    to [0.2, 0.8] (not detached, as upstream), ``beta = 1 - alpha``, ``TP / (TP + alpha FP + beta FN)``."""
    alpha = torch.clamp(fp / (fp + fn + smooth), 0.2, 0.8)
    return tp / (tp + alpha * fp + (1 - alpha) * fn + smooth)


def binary_adaptive_tversky_loss(
    logits: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor | Sequence[torch.Tensor]
) -> torch.Tensor:
    """FocusNetV2's SOS Dice term (upstream ``losses.BinaryDiceLoss``): ``1 - adaptive_tversky`` of
    sigmoid(logits), TP/FP/FN summed over every voxel of every given tensor (batch and organs pooled)."""
    p, t = torch.sigmoid(_flat(logits)), _flat(target)
    tp, fp, fn = (p * t).sum(), (p * (1 - t)).sum(), ((1 - p) * t).sum()
    return 1 - adaptive_tversky(tp, fp, fn)


def upstream_class_alphas(num_classes: int, small_classes: Sequence[int]) -> list[float]:
    """FocusNetV2's fixed focal alphas (upstream ``train_backbone.py``): background 0.5, each small organ 8,
    every other organ 1 (upstream also gives its submandibular glands 2, a PDDCA-specific choice)."""
    alphas = [1.0] * num_classes
    alphas[0] = 0.5
    for c in small_classes:
        alphas[int(c)] = 8.0
    return alphas


class UpstreamFocalLoss(nn.Module):
    """Upstream's softmax focal loss (``losses.FocalLoss``): the mean over voxels of
    ``-alpha_y (1 - p_y)^gamma log p_y`` (one term per voxel, its true class y). MONAI's weighted focal
    loss averages over classes too (its value is this over C). ``class_weight`` is a buffer named as
    MONAI's, so a frequency mode resolved at fit start (``resolve_class_weights``) can replace it."""

    def __init__(self, class_weights: Sequence[float], gamma: float = 2.0):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("class_weight", torch.as_tensor(list(class_weights), dtype=torch.float32))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits [B,C,*S]; target [B,1,*S] or [B,*S] class indices."""
        y = target.long().reshape(logits.shape[0], 1, *logits.shape[2:])
        logp = torch.log_softmax(logits.float(), dim=1).gather(1, y)
        alpha = self.class_weight.to(logits.device)[y]
        return (-alpha * (1 - logp.exp()).pow(self.gamma) * logp).mean()


class UpstreamFocalTverskyLoss(nn.Module):
    """FocusNetV2's S-Net loss (upstream ``train_backbone.py``): ``FL + tversky_weight * DL`` with FL
    upstream's focal loss (``UpstreamFocalLoss``, fixed alphas: ``upstream_class_alphas``) and DL its
    adaptive Tversky loss over softmax, background included, TP/FP/FN of each class summed over the batch,
    ``mean_c (1 - TI_c)`` (upstream weights classes by a per-scan presence vector; all present here).
    ``forward`` returns ``loss``, ``loss_focal``, ``loss_dice`` (as ``FocalDiceLoss``)."""

    def __init__(
        self,
        num_classes: int,
        class_weights: Sequence[float],
        gamma: float = 2.0,
        tversky_weight: float = 0.2,
    ):
        super().__init__()
        if len(class_weights) != num_classes:
            raise ConfigError(f"class_weights has {len(class_weights)} entries, expected {num_classes}")
        self.num_classes = num_classes
        self.tversky_weight = tversky_weight
        self.focal = UpstreamFocalLoss(class_weights, gamma)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        focal = self.focal(logits, target)
        p = torch.softmax(logits.float(), dim=1)
        onehot = F.one_hot(target.long().reshape(logits.shape[0], *logits.shape[2:]), self.num_classes)
        onehot = onehot.movedim(-1, 1).to(p.dtype)
        dims = [0, *range(2, p.dim())]
        tp, fp, fn = (p * onehot).sum(dims), (p * (1 - onehot)).sum(dims), ((1 - p) * onehot).sum(dims)
        dice = (1 - adaptive_tversky(tp, fp, fn)).mean()
        return {"loss": focal + self.tversky_weight * dice, "loss_focal": focal, "loss_dice": dice}
