"""FocusNetV2's "zoom in": fixed-size ROIs around located small-organ centres, and pasting back.

Integer-voxel boxes (no resampling): upstream SOS-Net crops a hard 64x64x8 box at the SOL argmax
(no RoIAlign, no resizing), and an integer box makes crop -> paste exact. Boxes may stick out of the volume:
``crop_roi`` pads those parts with ``pad_value`` (e.g. the normalised-CT background for the image,
0 for features and heatmaps) instead of shifting the box, so the organ centre stays at the ROI
centre; ``roi_box(..., fit_within=shape)`` gives upstream's alternative (shift the box inside).
Axes are [.., X, Y, Z]; boxes are (start, stop) voxel triples, stop exclusive.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from organseg.errors import ConfigError

Triple = tuple[int, int, int]


def _triple(values, name: str, error: type[ValueError] = ValueError) -> list:
    values = values.tolist() if hasattr(values, "tolist") else list(values)
    if len(values) != 3:
        raise error(f"{name} must have 3 entries (x, y, z), got {values}")
    return values


def roi_box(
    centre_vox, roi_size: Sequence[int], fit_within: Sequence[int] | None = None
) -> tuple[Triple, Triple]:
    """Integer box ``(start, stop)`` of ``roi_size`` voxels around ``round(centre_vox)``.

    ``start = round(c) - size // 2``: for an even size the centre voxel is the first of the upper
    half (upstream's ``[c - 4, c + 4)``), for an odd size it is the middle voxel. Rounding is
    half-up (not numpy's half-to-even) so a centre exactly between voxels always goes the same way.
    The box may extend beyond the volume; with ``fit_within`` (the volume's X, Y, Z) it is shifted
    to lie inside (upstream clamps SOL centres like this) or, if larger than the volume, to cover it
    (the covering position nearest to the requested one).
    """
    centre = [math.floor(float(c) + 0.5) for c in _triple(centre_vox, "centre_vox")]
    size = [int(s) for s in _triple(roi_size, "roi_size")]
    if any(s < 1 for s in size):
        raise ValueError(f"roi_size must be positive, got {size}")
    start = [c - s // 2 for c, s in zip(centre, size)]
    if fit_within is not None:
        dims = [int(d) for d in _triple(fit_within, "fit_within")]
        start = [min(max(st, min(0, d - s)), max(0, d - s)) for st, s, d in zip(start, size, dims)]
    stop = [st + s for st, s in zip(start, size)]
    return tuple(start), tuple(stop)


def roi_size_voxels(size_mm: Sequence[float], spacing: Sequence[float]) -> Triple:
    """ROI extent in voxels for a physical size: ``ceil(size_mm / spacing)`` per axis, rounded up to
    an even number (SOS-Net halves the in-plane size once; even sizes also make the box symmetric
    in the ``c ± size/2`` sense), except that an axis of a single voxel stays 1 (a one-slice ROI
    is legitimate when the requested depth is below the slice thickness)."""
    out = []
    # roi_mm and the spacing come from the config: a bad value is the user's (ConfigError)
    for mm, sp in zip(_triple(size_mm, "size_mm", ConfigError), _triple(spacing, "spacing", ConfigError)):
        if sp <= 0 or mm <= 0:
            raise ConfigError(f"size_mm and spacing must be positive, got {size_mm}, {spacing}")
        n = max(1, math.ceil(mm / sp - 1e-6))
        out.append(n + (n % 2) if n > 1 else 1)
    return tuple(out)


def _clip(start: Sequence[int], size: Sequence[int], dims: Sequence[int]):
    """Per axis: the in-volume slice, the matching slice of the ROI, and (before, after) padding."""
    vol, roi, pads = [], [], []
    for st, s, d in zip(start, size, dims):
        lo, hi = min(max(st, 0), d), max(min(st + s, d), 0)
        hi = max(hi, lo)
        vol.append(slice(lo, hi))
        roi.append(slice(lo - st, lo - st + (hi - lo)))
        pads.append((lo - st if hi > lo else s, st + s - hi if hi > lo else 0))
    return vol, roi, pads


def crop_roi(
    volume: torch.Tensor, start: Sequence[int], size: Sequence[int], pad_value: float = 0.0
) -> torch.Tensor:
    """``volume[..., start:start+size]`` over the last three axes ([B,C,X,Y,Z] or [C,X,Y,Z]); parts
    outside the volume are filled with ``pad_value``. Slicing + ``F.pad`` keeps it differentiable
    w.r.t. ``volume`` (gradient 1 inside the box, 0 elsewhere); detach the result to stop it."""
    start = [int(s) for s in _triple(start, "start")]
    size = [int(s) for s in _triple(size, "size")]
    if volume.dim() < 3:
        raise ValueError(f"crop_roi needs [..., X, Y, Z], got shape {tuple(volume.shape)}")
    vol, _, pads = _clip(start, size, volume.shape[-3:])
    part = volume[(..., *vol)]
    flat = [p for axis in reversed(pads) for p in axis]  # F.pad wants the last axis first
    if not any(flat):
        return part
    return F.pad(part, flat, mode="constant", value=pad_value)


def crop_rois(
    volume: torch.Tensor,
    centres,
    size: Sequence[int],
    pad_value: float = 0.0,
    fit_within: bool = False,
    return_starts: bool = False,
):
    """One ROI per batch item: ``volume`` [B,C,X,Y,Z], ``centres`` [B,3] voxel coordinates ->
    [B,C,*size] (and the [B,3] int64 starts, needed to paste back, with ``return_starts``).
    ``fit_within=True`` shifts each box inside the volume (see ``roi_box``)."""
    if volume.dim() != 5:
        raise ValueError(f"crop_rois needs [B,C,X,Y,Z], got shape {tuple(volume.shape)}")
    centres = torch.as_tensor(centres, dtype=torch.float64).reshape(-1, 3)
    if centres.shape[0] != volume.shape[0]:
        raise ValueError(f"{centres.shape[0]} centres for a batch of {volume.shape[0]}")
    dims = volume.shape[-3:] if fit_within else None
    starts = [roi_box(c, size, fit_within=dims)[0] for c in centres]
    crops = torch.stack([crop_roi(volume[b], st, size, pad_value) for b, st in enumerate(starts)])
    if return_starts:
        return crops, torch.tensor(starts, dtype=torch.int64)
    return crops


def paste_roi(
    label_map: torch.Tensor,
    roi_mask: torch.Tensor,
    start: Sequence[int],
    class_index: int,
    inplace: bool = False,
    clear: bool = True,
) -> torch.Tensor:
    """Write a small-organ ROI mask into a label map [..., X, Y, Z] (upstream's code writes SOS labels
    into a separate map and never merges them):

    - with ``clear`` (default), voxels of ``class_index`` inside the ROI that ``roi_mask`` does not
      contain become 0 (background), so the SOS result REPLACES S-Net's for that organ inside the ROI;
      ``clear=False`` leaves them (only the mask's voxels are written: upstream's separate map laid
      over S-Net's);
    - voxels in ``roi_mask`` become ``class_index`` (overwriting any other organ there);
    - voxels outside the ROI, and ROI parts outside the volume, are never touched.

    ``roi_mask`` is bool [..., *size] (last three axes = the ROI). Returns a new tensor unless
    ``inplace``. Cropping a label map and pasting ``crop == class_index`` back is the identity.
    """
    start = [int(s) for s in _triple(start, "start")]
    roi_mask = roi_mask.bool()
    out = label_map if inplace else label_map.clone()
    vol, roi, _ = _clip(start, roi_mask.shape[-3:], out.shape[-3:])
    region = out[(..., *vol)]  # a view: writes go into ``out``
    mask = roi_mask[(..., *roi)].expand_as(region)
    if clear:
        region[(region == class_index) & ~mask] = 0
    region[mask] = class_index
    return out


def paste_probabilities(
    prob_volume: torch.Tensor,
    roi_prob: torch.Tensor,
    start: Sequence[int],
    class_index: int,
    inplace: bool = False,
) -> torch.Tensor:
    """Probability version of ``paste_roi`` for prob_volume [C,X,Y,Z] (softmax over C): inside the
    ROI, channel ``class_index`` becomes ``roi_prob`` [*size] (the SOS sigmoid) and the other
    channels share the remaining ``1 - roi_prob`` in proportion to their S-Net probabilities (all
    to background where S-Net gave the organ everything), so every voxel still sums to 1.

    Useful because inference resamples probabilities, not labels, back to the original grid
    (upstream resamples the averaged SOS sigmoid trilinearly, then thresholds at 0.5); ``paste_roi``
    is the label-space rule after thresholding at 0.5.
    """
    start = [int(s) for s in _triple(start, "start")]
    if prob_volume.dim() != 4:
        raise ValueError(f"paste_probabilities needs [C,X,Y,Z], got shape {tuple(prob_volume.shape)}")
    out = prob_volume if inplace else prob_volume.clone()
    vol, roi, _ = _clip(start, roi_prob.shape[-3:], out.shape[-3:])
    region = out[(slice(None), *vol)]
    p = roi_prob[tuple(roi)].to(out.dtype)
    others = region.clone()
    others[class_index] = 0
    total = others.sum(0, keepdim=True)
    empty = total <= 1e-12
    others[0] = torch.where(empty[0], torch.ones_like(others[0]), others[0])
    total = torch.where(empty, torch.ones_like(total), total)
    region.copy_(others / total * (1 - p))
    region[class_index] = p
    return out
