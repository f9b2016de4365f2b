"""Heatmap geometry for small-organ localisation: Gaussian centre targets (``gaussian_heatmaps``), their
decoding back to centres (``decode_centres``) and the sub-voxel peak refinement both the decoder and the
whole-volume pipeline use (``log_parabola_offset``).

Used by the patch stream (targets), the SOL stage (decoding) and inference (peaks over the whole volume),
so it lives below all three. Tensors are [B, K, X, Y, Z]; centres are (x, y, z) voxel coordinates of the
same grid (voxel i has its centre at coordinate i); spacing is (x, y, z) in mm.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def gaussian_heatmaps(
    centres_vox: torch.Tensor,
    shape: Sequence[int],
    spacing: Sequence[float],
    sigma_mm: float | Sequence[float] = 5.0,
    cutoff: float = 0.01,
) -> torch.Tensor:
    """One Gaussian per centre: ``exp(-|(v - c) * spacing|^2 / (2 sigma_mm^2))`` -> [K, X, Y, Z] float32.

    ``centres_vox`` [K, 3] in voxels, may be non-integer (no rounding, unlike upstream, so the target
    keeps sub-voxel position; the value is exactly 1.0 at an integer centre, slightly less at the nearest
    voxel otherwise); a row with any NaN (organ absent) gives an all-zero channel. ``sigma_mm`` is in mm
    (a scalar or per axis), so at spacing (1, 1, 3) the voxel sigma along z is a third of x's. Upstream
    used sigma = 5 voxels on every axis (5 mm in-plane but 12.5 mm along z) and cut the map to the centre
    slice +-1; a physical sigma gives the thin z extent without that cut. Values below ``cutoff``
    (upstream 0.01) are set to 0 so the background is exactly 0. Built separably (3 1-D profiles).
    """
    centres = torch.as_tensor(centres_vox, dtype=torch.float32)
    if centres.dim() != 2 or centres.shape[1] != 3:
        raise ValueError(f"centres_vox must be [K, 3], got {tuple(centres.shape)}")
    if len(shape) != 3 or len(spacing) != 3:
        raise ValueError(f"shape and spacing must have 3 entries (x, y, z), got {shape}, {spacing}")
    sigma = torch.as_tensor(sigma_mm, dtype=torch.float32).expand(3)
    present = ~torch.isnan(centres).any(dim=1)
    c = torch.where(present[:, None], centres, torch.zeros_like(centres))
    profiles = []
    for axis in range(3):
        coords = torch.arange(int(shape[axis]), dtype=torch.float32, device=c.device)
        d_mm = (coords[None, :] - c[:, axis : axis + 1]) * float(spacing[axis])
        profiles.append(torch.exp(-0.5 * (d_mm / sigma[axis].to(c.device)) ** 2))
    px, py, pz = profiles
    heat = px[:, :, None, None] * py[:, None, :, None] * pz[:, None, None, :]
    if cutoff > 0:
        heat = torch.where(heat < cutoff, torch.zeros_like(heat), heat)
    return heat * present[:, None, None, None].to(heat.dtype)


def log_parabola_offset(lm: torch.Tensor, l0: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """Vertex of the parabola through (-1, lm), (0, l0), (1, lp); 0 where it is not a maximum; clamped
    to +-0.5 (a larger offset would mean the neighbour was the peak)."""
    denom = lm - 2.0 * l0 + lp
    off = torch.where(
        denom < 0,
        0.5 * (lm - lp) / torch.where(denom < 0, denom, -torch.ones_like(denom)),
        torch.zeros_like(denom),
    )
    return off.clamp(-0.5, 0.5)


@torch.no_grad()
def decode_centres(
    heatmaps: torch.Tensor, threshold: float = 0.3, subvoxel: bool = True, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Peak of each channel of [B, K, X, Y, Z] -> (centres [B, K, 3] float voxel coords, found [B, K]).

    ``found`` is ``peak > threshold`` (strict, as upstream's ``> 0.6``); the centre of a channel not
    found is NaN (the ``gaussian_heatmaps`` convention for "absent"), so it cannot be cropped by mistake.
    ``subvoxel=True`` refines each axis by the vertex of a parabola through the log values of the peak
    and its two neighbours (the three-point Gaussian estimator: exact for a Gaussian, unlike a 3x3x3
    centre of mass, which is biased toward the peak voxel); axes where the peak sits on the border, or
    whose neighbours are not below the peak, keep the integer position.
    """
    if heatmaps.dim() != 5:
        raise ValueError(f"heatmaps must be [B, K, X, Y, Z], got {tuple(heatmaps.shape)}")
    b, k, *size = heatmaps.shape
    h = heatmaps.detach().float()
    peak, flat = h.reshape(b, k, -1).max(dim=-1)
    idx = torch.stack([flat // (size[1] * size[2]), (flat // size[2]) % size[1], flat % size[2]], dim=-1)
    centres = idx.to(torch.float32)
    if subvoxel:
        bi = torch.arange(b, device=h.device)[:, None].expand(b, k)
        ki = torch.arange(k, device=h.device)[None, :].expand(b, k)
        logh = torch.log(h.clamp_min(eps))
        l0 = logh[bi, ki, idx[..., 0], idx[..., 1], idx[..., 2]]
        for axis in range(3):
            inner = (idx[..., axis] > 0) & (idx[..., axis] < size[axis] - 1)
            vals = []
            for step in (-1, 1):
                j = idx.clone()
                j[..., axis] = (j[..., axis] + step).clamp(0, size[axis] - 1)
                vals.append(logh[bi, ki, j[..., 0], j[..., 1], j[..., 2]])
            off = log_parabola_offset(vals[0], l0, vals[1])
            centres[..., axis] += torch.where(inner, off, torch.zeros_like(off))
    found = peak > threshold
    centres = torch.where(found[..., None], centres, torch.full_like(centres, float("nan")))
    return centres, found
