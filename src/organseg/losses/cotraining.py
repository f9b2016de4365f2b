"""The co-training soft-label loss of Huang et al. (MICCAI 2020): region mask, soft cross-entropy,
ramp-up.

Network k learns, on the voxels its dataset did not annotate, the softmax of the *peer's*
weight-averaged model:

    L_soft(k) = -(1/|M|) sum_{v in M} sum_c q_c(v) log p_c(v),   q = softmax(E_peer(x)), p = softmax(F_k(x))

M (:func:`region_mask`) is the set of voxels outside the annotated organs of the sample's dataset
(``label == 0`` in the batch representation; empty for a dataset that annotates every organ, whose 0
is true background; optionally only a dilated band around the organs that carry pseudo-labels
there). Annotated voxels are excluded exactly: they contribute zero loss and zero gradient (their
ground truth supervises them). The term is weighted by :func:`sigmoid_rampup`, because the averaged
models' early predictions are poor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.transforms.utils_morphological_ops import dilate

from organseg.errors import ConfigError


def region_mask(
    label: torch.Tensor,
    labeled: torch.Tensor | None = None,
    pseudo: torch.Tensor | None = None,
    dilation: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """bool [B,*S]: voxels that receive the soft-label loss.

    Args:
        label: int [B,*S] ground truth of the sample's own dataset (unannotated organs are 0).
        labeled: bool [B,C] the classes each sample's dataset annotates (needed with ``dilation``); when
            given, samples of a dataset that annotates every organ get an empty mask.
        pseudo: int [B,*S] hard pseudo-labels over the full label space (needed with ``dilation``).
        dilation: None = every voxel with ``label == 0``; else restrict to the pseudo-labelled
            organs the sample's dataset does NOT annotate, dilated by a cubic (or per-axis x, y, z)
            structuring element of half-width ``dilation`` voxels (MONAI's ``dilate``), intersected
            with ``label == 0``.
    """
    mask = label == 0
    if labeled is not None:
        # a sample whose dataset annotates every organ has no unannotated region: its 0 is true background
        incomplete = (~labeled.bool()[:, 1:]).any(dim=1)
        mask = mask & incomplete.view(-1, *([1] * (label.ndim - 1)))
    if dilation is None:
        return mask
    if pseudo is None or labeled is None:
        raise ValueError(
            "region_mask: a dilated region needs pseudo-labels and labeled "
            "(supervision=pseudo with a data config that provides pseudo-labels)"
        )
    if isinstance(dilation, (int, float)):
        radius = [int(dilation)] * (label.ndim - 1)
    else:
        radius = [int(r) for r in dilation]
    if len(radius) != label.ndim - 1 or min(radius) < 0:
        raise ConfigError(f"mask_dilation must be one non-negative int or one per axis, got {dilation}")
    pseudo = pseudo.long()
    unannotated = ~labeled.bool()
    unannotated[:, 0] = False
    flat = torch.gather(unannotated, 1, pseudo.reshape(pseudo.shape[0], -1)).reshape(pseudo.shape)
    organs = flat.unsqueeze(1).float()
    if max(radius) > 0:
        organs = dilate(organs, filter_size=[2 * r + 1 for r in radius])
    return mask & (organs[:, 0] > 0.5)


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over ``mask`` voxels of ``-sum_c q_c log softmax(logits)_c``.

    logits [B,C,*S] (this network); target_probs [B,C,*S] (the peer's averaged softmax; detached
    here so no gradient can reach the teacher); mask bool [B,*S]. An empty mask gives 0 (still
    attached to ``logits``, so DDP sees every parameter used)."""
    logp = torch.log_softmax(logits.float(), dim=1)
    ce = -(target_probs.detach().float() * logp).sum(dim=1)
    ce = torch.where(mask, ce, torch.zeros_like(ce))  # exactly zero loss and gradient outside M
    return ce.sum() / mask.sum().clamp_min(1)


def sigmoid_rampup(step: int, rampup_steps: int) -> float:
    """Laine & Aila / mean-teacher ramp-up ``exp(-5 (1 - t)^2)``, ``t = min(step / rampup_steps, 1)``;
    1 when ``rampup_steps <= 0``."""
    if rampup_steps <= 0:
        return 1.0
    t = min(max(float(step), 0.0) / float(rampup_steps), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)
