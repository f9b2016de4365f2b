"""Per-organ segmentation metrics: Dice, HD95 and ASSD (in mm), computed with MONAI.

Conventions
-----------
* ``pred`` and ``label`` are integer class-index maps indexed (x, y, z) (torchio / nibabel order);
  0 is background. ``spacing`` is the voxel size in mm in the same axis order.
* ``classes[c]`` names class ``c`` (``classes[0] == "background"``); ``labeled[c]`` (optional) says
  whether the dataset annotates class ``c``. Background and unlabelled classes get no row.
* The numbers themselves come from MONAI: :func:`monai.metrics.compute_dice`,
  :func:`monai.metrics.compute_hausdorff_distance` (``percentile=95``: MONAI's HD95 is the larger of
  the two directed 95th-percentile surface distances) and
  :func:`monai.metrics.compute_average_surface_distance` (``symmetric=True``: ASSD, the mean over
  the surface voxels of both masks of the distance to the other surface). ``spacing`` is passed
  through, so distances are in mm. Surfaces are MONAI's: the mask voxels removed by one binary
  erosion.
* Efficiency: no volume is ever one-hot encoded. For each organ both binary masks are cropped to
  the bounding box of ``(pred == c) | (label == c)`` padded by :data:`CROP_PAD` voxels (clipped to
  the image). Dice and surface distances are translation invariant and MONAI's surface extraction
  treats outside-the-image as background, so the cropped values are identical to the full-volume
  ones (tested).

Empty-mask policy
-----------------
See :data:`EMPTY_MASK_POLICY` (printed under every report, beside :data:`HD95_DEFINITION`):

* reference empty and prediction empty -> status ``"absent"``; Dice, HD95 and ASSD are NaN and the
  row is excluded from every mean (nothing to segment, nothing predicted);
* reference present, prediction empty -> status ``"missed"``; Dice 0 and HD95 = ASSD = the image
  diagonal in mm;
* reference empty, prediction present -> status ``"false_positive"``; Dice 0 and HD95 = ASSD = the
  image diagonal in mm;
* otherwise -> status ``"ok"``.

The diagonal is the worst-case penalty (a common challenge convention): failures are counted in
the means instead of silently dropped, and they cannot be "better" than any real prediction.
The image diagonal is ``sqrt(sum((shape_i * spacing_i) ** 2))``, the diagonal of the image's
physical extent.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance
from scipy import ndimage

__all__ = [
    "CROP_PAD",
    "EMPTY_MASK_POLICY",
    "HD95_DEFINITION",
    "METRIC_KEYS",
    "ROW_KEYS",
    "SUMMARY_KEYS",
    "STATUS_ABSENT",
    "STATUS_FALSE_POSITIVE",
    "STATUS_MISSED",
    "STATUS_OK",
    "binary_metrics",
    "case_metrics",
    "image_diagonal_mm",
    "summarize",
    "union_bbox",
]

CROP_PAD = 2
"""Voxels of margin around the union bounding box of prediction and reference."""

STATUS_OK = "ok"
STATUS_ABSENT = "absent"
STATUS_MISSED = "missed"
STATUS_FALSE_POSITIVE = "false_positive"

EMPTY_MASK_POLICY = (
    "Empty-mask policy: if an organ is absent from both the reference and the prediction the case "
    "is marked 'absent' (Dice/HD95/ASSD undefined, excluded from means). If the reference has the "
    "organ but the prediction does not ('missed'), or the prediction has it but the reference does "
    "not ('false_positive'), Dice = 0 and HD95 = ASSD = the image diagonal in mm (worst-case "
    "penalty, so failures count in the means). HD95 is MONAI's (max of the two directed 95th "
    "percentiles), ASSD is the symmetric average surface distance; distances are in mm using the "
    "voxel spacing."
)

HD95_DEFINITION = (
    "HD95 definition (MONAI compute_hausdorff_distance, percentile=95): a mask's surface is its voxels "
    "that one binary erosion (6-connected) removes; for each surface voxel of one mask, the Euclidean "
    "distance in mm to the nearest surface voxel of the other; HD95 = the larger of the two directed "
    "95th percentiles (linear interpolation between ranks). It is not surface-area weighted: tools that "
    "weight by surfel area (DeepMind's surface-distance) can differ by about a voxel on masks of a few "
    "tens of voxels. ASSD = the mean of both directions' distances, pooled."
)
"""How HD95 (and ASSD) are computed, printed beside :data:`EMPTY_MASK_POLICY` in every report."""

METRIC_KEYS = ("dice", "hd95", "assd")
ROW_KEYS = ("case_id", "organ", "dice", "hd95", "assd", "n_ref", "n_pred", "status")
SUMMARY_KEYS = (
    "organ",
    "n",
    "dice_mean",
    "dice_std",
    "hd95_mean",
    "hd95_std",
    "assd_mean",
    "assd_std",
)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _as_label_map(a: Any, name: str) -> np.ndarray:
    """numpy integer label map; a leading singleton channel axis is dropped."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.dtype == bool:
        a = a.astype(np.uint8)
    elif not np.issubdtype(a.dtype, np.integer):
        if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
            raise ValueError(f"{name} must be an integer class-index map, got non-integer values")
        a = a.astype(np.int64)
    return a


def _as_spacing(spacing: Any, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    if np.isscalar(spacing):
        return (float(spacing),) * ndim
    sp = tuple(float(s) for s in np.asarray(spacing, dtype=float).ravel())
    if len(sp) != ndim:
        raise ValueError(f"spacing has {len(sp)} values for a {ndim}-D image")
    if not all(s > 0 and math.isfinite(s) for s in sp):
        raise ValueError(f"spacing must be positive and finite, got {sp}")
    return sp


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Diagonal of the image's physical extent, ``sqrt(sum((shape_i * spacing_i)**2))`` in mm."""
    return float(math.sqrt(sum((float(n) * float(s)) ** 2 for n, s in zip(shape, spacing))))


def union_bbox(
    boxes: Sequence[tuple[slice, ...] | None], shape: Sequence[int], pad: int = CROP_PAD
) -> tuple[slice, ...] | None:
    """Union of bounding boxes (``None`` entries are empty), padded by ``pad`` and clipped."""
    boxes = [b for b in boxes if b is not None]
    if not boxes:
        return None
    out = []
    for d, n in enumerate(shape):
        lo = min(b[d].start for b in boxes)
        hi = max(b[d].stop for b in boxes)
        out.append(slice(max(lo - pad, 0), min(hi + pad, int(n))))
    return tuple(out)


def _find_boxes(label_map: np.ndarray, n_classes: int) -> list[tuple[slice, ...] | None]:
    """Bounding box of every class 1..n_classes-1 in one pass (index c-1 -> class c)."""
    if n_classes <= 1:
        return []
    boxes = ndimage.find_objects(label_map, max_label=n_classes - 1)
    return list(boxes) + [None] * (n_classes - 1 - len(boxes))


def binary_metrics(
    pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Sequence[float]
) -> tuple[float, float, float]:
    """(Dice, HD95, ASSD) of two non-empty binary masks, with MONAI, on the arrays as given.

    No cropping here and no empty-mask handling: both masks must be non-empty (see
    :func:`case_metrics` for the policy). Distances are in the units of ``spacing``.
    """
    p = torch.from_numpy(np.ascontiguousarray(pred_mask, dtype=bool))
    g = torch.from_numpy(np.ascontiguousarray(ref_mask, dtype=bool))
    sp = [float(s) for s in spacing]

    # (batch, channel, *spatial): two channels (background, organ) for Dice, organ only for distances
    # (the reference in float64 so that Dice is not rounded to float32)
    p2 = torch.stack([~p, p])[None]
    g2 = torch.stack([~g, g])[None].to(torch.float64)
    dice = compute_dice(p2, g2, include_background=False, ignore_empty=False)
    p1, g1 = p[None, None], g[None, None]
    with warnings.catch_warnings():
        # MONAI 1.5-1.6 passes its own deprecated argument internally (always_return_as_numpy)
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        hd95 = compute_hausdorff_distance(p1, g1, include_background=True, percentile=95, spacing=sp)
        assd = compute_average_surface_distance(p1, g1, include_background=True, symmetric=True, spacing=sp)
    return float(dice.reshape(-1)[0]), float(hd95.reshape(-1)[0]), float(assd.reshape(-1)[0])


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def case_metrics(
    pred: Any,
    label: Any,
    spacing: Sequence[float],
    classes: Sequence[str],
    labeled: Sequence[bool] | None = None,
    case_id: str = "",
    distances: bool = True,
) -> list[dict]:
    """One row per annotated organ of one case.

    Args:
        pred, label: integer class-index maps of the same shape, indexed (x, y, z).
        spacing: voxel size in mm, same axis order.
        classes: class names by index, ``classes[0]`` is background.
        labeled: optional booleans (len ``len(classes)``); classes with ``False`` get no row.
        case_id: copied into every row.
        distances: False skips HD95/ASSD (NaN for "ok" rows): cheap Dice-only validation.

    Returns:
        Rows ``{case_id, organ, dice, hd95, assd, n_ref, n_pred, status}`` in class order;
        ``n_ref``/``n_pred`` are voxel counts. See :data:`EMPTY_MASK_POLICY` for empty masks.
    """
    pred = _as_label_map(pred, "pred")
    label = _as_label_map(label, "label")
    if pred.shape != label.shape:
        raise ValueError(f"pred {pred.shape} and label {label.shape} must have the same shape")
    sp = _as_spacing(spacing, label.ndim)
    n_classes = len(classes)
    if labeled is not None and len(labeled) != n_classes:
        raise ValueError(f"labeled has {len(labeled)} entries for {n_classes} classes")
    diag = image_diagonal_mm(label.shape, sp)

    ref_boxes = _find_boxes(label, n_classes)
    pred_boxes = _find_boxes(pred, n_classes)
    rows: list[dict] = []
    for c in range(1, n_classes):
        if labeled is not None and not bool(labeled[c]):
            continue
        row = {"case_id": str(case_id), "organ": str(classes[c])}
        box = union_bbox([ref_boxes[c - 1], pred_boxes[c - 1]], label.shape, CROP_PAD)
        if box is None:
            row.update(dice=math.nan, hd95=math.nan, assd=math.nan, n_ref=0, n_pred=0, status=STATUS_ABSENT)
            rows.append(row)
            continue
        p = pred[box] == c
        g = label[box] == c
        n_pred, n_ref = int(p.sum()), int(g.sum())
        if n_ref == 0 or n_pred == 0:  # exactly one is empty (the union box is not empty)
            status = STATUS_MISSED if n_pred == 0 else STATUS_FALSE_POSITIVE
            row.update(dice=0.0, hd95=diag, assd=diag, status=status)
        elif distances:
            dice, hd95, assd = binary_metrics(p, g, sp)
            row.update(dice=dice, hd95=hd95, assd=assd, status=STATUS_OK)
        else:
            dice = 2.0 * np.logical_and(p, g).sum() / (n_pred + n_ref)
            row.update(dice=float(dice), hd95=math.nan, assd=math.nan, status=STATUS_OK)
        row.update(n_ref=n_ref, n_pred=n_pred)
        rows.append({k: row[k] for k in ROW_KEYS})
    return rows


def _nan_stats(values: Sequence[float]) -> tuple[float, float]:
    """(mean, population std) ignoring NaN; (nan, nan) when nothing is finite. No warnings."""
    a = np.asarray([v for v in values if v is not None], dtype=float)
    a = a[~np.isnan(a)]
    if a.size == 0:
        return math.nan, math.nan
    return float(a.mean()), float(a.std())


def summarize(rows: Sequence[dict]) -> list[dict]:
    """Per-organ means and standard deviations over cases, then a final ``"mean"`` row.

    Organs appear in order of first appearance in ``rows`` (class order for rows from
    :func:`case_metrics`). NaN values (status ``"absent"``) are ignored; ``n`` is the number of
    cases that count (rows that are not ``"absent"``). Standard deviations are population std
    (``ddof=0``). The ``"mean"`` row holds the mean over organs of the per-organ means, its ``*_std``
    the std over organs of those means and its ``n`` the number of organs with a defined mean.
    """
    organs: dict[str, list[dict]] = {}
    for r in rows:
        organs.setdefault(str(r["organ"]), []).append(r)

    summary: list[dict] = []
    for organ, rs in organs.items():
        counted = [r for r in rs if r.get("status") != STATUS_ABSENT]
        out: dict[str, Any] = {"organ": organ, "n": len(counted)}
        for k in METRIC_KEYS:
            vals = [float(r[k]) if r.get("status") != STATUS_ABSENT else math.nan for r in rs]
            out[f"{k}_mean"], out[f"{k}_std"] = _nan_stats(vals)
        summary.append(out)

    mean_row: dict[str, Any] = {
        "organ": "mean",
        "n": sum(1 for s in summary if not math.isnan(s["dice_mean"])),
    }
    for k in METRIC_KEYS:
        mean_row[f"{k}_mean"], mean_row[f"{k}_std"] = _nan_stats([s[f"{k}_mean"] for s in summary])
    summary.append(mean_row)
    return summary
