"""The co-training soft-label loss of Huang et al. (MICCAI 2020): region mask, soft cross-entropy,
ramp-up.

Network k learns, on the voxels its dataset did not annotate, the softmax of the *peer's*
weight-averaged model:

    L_soft(k) = -(1/|M|) sum_{v in M} sum_c q_c(v) log p_c(v),   q = softmax(E_peer(x)), p = softmax(F_k(x))

M (:func:`region_mask`) is, as in the paper, the hard pseudo-label masks of the organs the sample's
dataset does NOT annotate, dilated (a ball of ``radius_mm`` millimetres, converted to voxels with the
card's spacing: :func:`ball_kernel`), intersected with the ground-truth background (``label == 0``),
so soft targets never override an annotated voxel. A dataset that annotates every organ has no
unannotated organ, hence an empty M. The project's earlier region (``soft_region: unannotated``,
ours) is every voxel outside the annotated organs, about the whole background of a patch.
Annotated voxels are excluded exactly: they contribute zero loss and zero gradient (their
ground truth supervises them). The term is weighted by :func:`sigmoid_rampup`, because the averaged
models' early predictions are poor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.transforms.utils_morphological_ops import dilate

from organseg.errors import ConfigError

SOFT_REGIONS = ("dilated_pseudo", "unannotated")


def ball_kernel(radius_mm: float | Sequence[float], spacing: Sequence[float]) -> torch.Tensor:
    """bool [2r_x+1, 2r_y+1, ...]: the voxel offsets within ``radius_mm`` of the centre, in millimetres
    (``sum_i (o_i s_i / R_i)^2 <= 1`` for offsets o, spacing s, radius R; one R or one per axis), so an
    anisotropic grid (e.g. 0.8 x 0.8 x 3 mm) gets an ellipsoid of voxels. Radius 0: the centre only."""
    spacing = [float(v) for v in spacing]
    radii = (
        [float(radius_mm)] * len(spacing)
        if isinstance(radius_mm, (int, float))
        else [float(r) for r in radius_mm]
    )
    if len(radii) != len(spacing) or min(radii) < 0 or min(spacing) <= 0:
        raise ConfigError(
            f"mask_dilation_mm must be one radius >= 0 or one per axis ({len(spacing)}), and spacing > 0; "
            f"got {radius_mm} with spacing {spacing}"
        )
    half = [int(math.floor(r / s + 1e-9)) for r, s in zip(radii, spacing)]
    grids = torch.meshgrid(*[torch.arange(-h, h + 1, dtype=torch.float64) for h in half], indexing="ij")
    dist = torch.zeros_like(grids[0])
    for g, s, r in zip(grids, spacing, radii):
        if r > 0:
            dist = dist + (g * s / r) ** 2
    return dist <= 1.0 + 1e-9


def dilate_ball(mask: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """bool [B,*S]: ``mask`` (bool [B,*S]) dilated by the structuring element ``kernel`` (bool, odd sizes)."""
    if kernel.numel() == 1:
        return mask.clone()
    n = mask.ndim - 1
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]
    weight = kernel.to(device=mask.device, dtype=torch.float32)[None, None]
    pad = tuple(k // 2 for k in kernel.shape)
    hits = conv(mask[:, None].float(), weight, padding=pad)
    return hits[:, 0] > 0.5


def region_mask(
    label: torch.Tensor,
    labeled: torch.Tensor | None = None,
    pseudo: torch.Tensor | None = None,
    dilation: int | Sequence[int] | None = None,
    *,
    radius_mm: float | Sequence[float] | None = None,
    spacing: Sequence[float] | None = None,
) -> torch.Tensor:
    """bool [B,*S]: voxels that receive the soft-label loss.

    Args:
        label: int [B,*S] ground truth of the sample's own dataset (unannotated organs are 0).
        labeled: bool [B,C] the classes each sample's dataset annotates (needed with ``dilation``); when
            given, samples of a dataset that annotates every organ get an empty mask.
        pseudo: int [B,*S] hard pseudo-labels over the full label space (needed with ``dilation``).
        dilation: voxels (ours): restrict to the pseudo-labelled organs the sample's dataset does NOT
            annotate, dilated by a cubic (or per-axis x, y, z) structuring element of half-width
            ``dilation`` voxels (MONAI's ``dilate``), intersected with ``label == 0``.
        radius_mm / spacing: the paper's region: the same organs dilated by a ball of ``radius_mm``
            millimetres on a grid of ``spacing`` mm (:func:`ball_kernel`), intersected with ``label == 0``.

    Neither ``dilation`` nor ``radius_mm``: every voxel with ``label == 0`` (``soft_region:
    unannotated``, ours).
    """
    mask = label == 0
    if labeled is not None:
        # a sample whose dataset annotates every organ has no unannotated region: its 0 is true background
        incomplete = (~labeled.bool()[:, 1:]).any(dim=1)
        mask = mask & incomplete.view(-1, *([1] * (label.ndim - 1)))
    if dilation is None and radius_mm is None:
        return mask
    if dilation is not None and radius_mm is not None:
        raise ConfigError("region_mask: give the dilation in voxels or in mm, not both")
    if pseudo is None or labeled is None:
        raise ValueError(
            "region_mask: a dilated region needs pseudo-labels and labeled "
            "(supervision=pseudo with a data config that provides pseudo-labels)"
        )
    pseudo = pseudo.long()
    unannotated = ~labeled.bool()
    unannotated[:, 0] = False
    organs = torch.gather(unannotated, 1, pseudo.reshape(pseudo.shape[0], -1)).reshape(pseudo.shape)
    if radius_mm is not None:
        if spacing is None:
            raise ConfigError(
                "region_mask: a dilation in mm needs the voxel spacing (model spacing, linked from the card)"
            )
        return mask & dilate_ball(organs, ball_kernel(radius_mm, spacing))
    if isinstance(dilation, (int, float)):
        radius = [int(dilation)] * (label.ndim - 1)
    else:
        radius = [int(r) for r in dilation]
    if len(radius) != label.ndim - 1 or min(radius) < 0:
        raise ConfigError(f"mask_dilation must be one non-negative int or one per axis, got {dilation}")
    dilated = organs.unsqueeze(1).float()
    if max(radius) > 0:
        dilated = dilate(dilated, filter_size=[2 * r + 1 for r in radius])
    return mask & (dilated[:, 0] > 0.5)


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over ``mask`` voxels of ``-sum_c q_c log softmax(logits)_c``.

    logits [B,C,*S] (this network); target_probs [B,C,*S] (the peer's averaged softmax; detached
    here so no gradient can reach the teacher); mask bool [B,*S]. An empty mask gives 0 (still
    attached to ``logits``, so DDP sees every parameter used)."""
    logp = torch.log_softmax(logits.float(), dim=1)
    ce = -(target_probs.detach().float() * logp).sum(dim=1)
    ce = torch.where(mask, ce, torch.zeros_like(ce))  # exactly zero loss and gradient outside M
    return ce.sum() / mask.sum().clamp_min(1)


def sigmoid_rampup(step: int, rampup_steps: float) -> float:
    """Laine & Aila / mean-teacher ramp-up ``exp(-5 (1 - t)^2)``, ``t = min(step / rampup_steps, 1)``;
    1 when ``rampup_steps <= 0``."""
    if rampup_steps <= 0:
        return 1.0
    t = min(max(float(step), 0.0) / float(rampup_steps), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)
