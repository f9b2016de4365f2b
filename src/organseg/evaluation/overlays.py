"""PNG overlays of reference (solid) and predicted (dashed) organ contours on axial CT slices.

Uses :class:`matplotlib.figure.Figure` with an explicit Agg canvas, never ``pyplot``: no global
backend switch, no figure registry, safe from worker threads and headless machines.

Arrays are indexed (x, y, z); an axial slice is ``volume[:, :, z]``, drawn in mm from the grid's
corner when ``spacing`` is given (so anisotropic voxels keep the right aspect ratio).

Orientation is radiological: anterior at the top, the patient's left on the viewer's right (the
patient seen from the feet), with "A", "P", "R", "L" markers at the panel edges. Which way the index
axes run on screen follows the grid's direction cosines (:func:`axial_view`). The cache keeps each
source image's direction (it resamples and crops, never reorients; ``CacheReader.geometry(case)
["direction"]``): pass it as ``direction``. Without it the identity is assumed, i.e. index x increases
towards the patient's left and y towards posterior (LPS, the usual CT case); a scan stored with
direction (-1, -1, 1) would then be drawn mirrored in both axes, with the markers still claiming the
identity layout.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from organseg.io.atomic import atomic_open

__all__ = [
    "AxialView",
    "axial_view",
    "choose_slices",
    "organ_colors",
    "save_overlays",
    "slice_areas",
    "slice_contours",
]


def _np(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    return a


def slice_areas(label: np.ndarray, n_classes: int) -> np.ndarray:
    """``(Z, n_classes)`` voxel counts of every class on every axial slice (one bincount each)."""
    label = np.asarray(label)
    out = np.zeros((label.shape[2], n_classes), dtype=np.int64)
    for z in range(label.shape[2]):
        sl = label[:, :, z].ravel()
        sl = sl[(sl > 0) & (sl < n_classes)]
        if sl.size:
            out[z] = np.bincount(sl.astype(np.int64), minlength=n_classes)[:n_classes]
    return out


def choose_slices(areas: np.ndarray, n_slices: int = 3, min_fraction: float = 0.3) -> list[int]:
    """Pick ``n_slices`` axial slices that show as many distinct organs as possible.

    Greedy set cover: an organ "shows well" on a slice if its area there is at least
    ``min_fraction`` of its largest slice area (so a small organ such as a lens counts on its own
    central slices, not on a one-voxel tip). Each pick maximises (new organs shown well, organs
    present, distance to slices already picked, foreground area). Returns sorted slice indices;
    evenly spaced slices when there is no foreground.
    """
    n_z = areas.shape[0]
    n_slices = max(1, min(int(n_slices), n_z))
    present = areas > 0
    present[:, 0] = False
    if not present.any():
        return sorted({int(round(v)) for v in np.linspace(0, n_z - 1, n_slices + 2)[1:-1]})
    peak = areas.max(axis=0)
    good = present & (areas >= min_fraction * np.maximum(peak, 1)[None, :])
    n_present = present.sum(axis=1)
    fg = areas[:, 1:].sum(axis=1)
    covered = np.zeros(areas.shape[1], dtype=bool)
    chosen: list[int] = []
    zs = np.arange(n_z)
    for _ in range(n_slices):
        new = (good & ~covered[None, :]).sum(axis=1)
        dist = (
            np.min(np.abs(zs[:, None] - np.asarray(chosen)[None, :]), axis=1) if chosen else np.full(n_z, n_z)
        )
        # lexicographic: new organs, organs present, spread, area; never repeat a slice
        key = np.lexsort((fg, dist, n_present, new))[::-1]
        pick = next((int(z) for z in key if int(z) not in chosen), None)
        if pick is None:
            break
        chosen.append(pick)
        covered |= good[pick]
    return sorted(chosen)


def organ_colors(n_classes: int) -> list[tuple[float, float, float, float]]:
    """One distinct RGBA colour per class index (index 0 unused)."""

    # tab20 reordered: its 10 saturated colours first, then their light partners, then repeat
    cmap = matplotlib.colormaps["tab20"]
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))
    return [cmap(order[(c - 1) % 20]) for c in range(max(n_classes, 1))]


#: patient directions at the (negative, positive) end of each physical LPS axis
_ENDS = (("R", "L"), ("A", "P"), ("I", "S"))


@dataclass(frozen=True)
class AxialView:
    """How a 2-D (x, y) slice is laid out on screen (see :func:`axial_view`).

    ``horizontal`` is the index axis drawn left-right (0 = x, 1 = y; the other one is drawn
    bottom-top); ``flip_h`` means that axis increases to the LEFT, ``flip_v`` that the other one
    increases DOWNWARDS. ``left``/``right``/``top``/``bottom`` are the patient directions at the panel
    edges ("R", "L", "A", "P", "I", "S")."""

    horizontal: int
    flip_h: bool
    flip_v: bool
    left: str
    right: str
    top: str
    bottom: str

    @property
    def radiological_axial(self) -> bool:
        """True for the usual axial layout: anterior up, the patient's left on the viewer's right."""
        return (self.left, self.right, self.top, self.bottom) == ("R", "L", "A", "P")


def axial_view(direction: Sequence[float] | None = None) -> AxialView:
    """The radiological screen layout of a slice ``volume[:, :, z]`` of a grid with ``direction``.

    ``direction`` is SimpleITK's row-major 3x3 direction cosine matrix (columns = the x, y, z index
    axes in LPS physical space); ``None`` means the identity (x -> patient's left, y -> posterior).
    Each in-plane index axis is matched to the physical axis it is closest to (the best one-to-one
    assignment, so oblique grids get the nearest letters). The left-right physical axis is drawn
    horizontally with the patient's left on the right, and anterior-posterior vertically with
    anterior at the top; for a grid whose z index is not the feet-head axis (a sagittal or coronal
    acquisition) the remaining axis follows the usual convention for that view (superior up,
    anterior on the left).
    """
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64).reshape(-1)
    if d.size != 9 or not np.all(np.isfinite(d)):
        raise ValueError(f"direction must be 9 finite floats (row-major 3x3), got {direction!r}")
    d = d.reshape(3, 3)
    pairs = [(p, q) for p in range(3) for q in range(3) if p != q]
    phys = max(pairs, key=lambda pq: abs(d[pq[0], 0]) + abs(d[pq[1], 1]))  # physical axis of x, of y
    sign = (
        bool(d[phys[0], 0] >= 0),
        bool(d[phys[1], 1] >= 0),
    )  # True: the index axis runs to the positive end
    # left-right goes across; failing that (sagittal), anterior-posterior
    h = min((0, 1), key=lambda i: phys[i])
    v = 1 - h
    ph, pv = phys[h], phys[v]
    flip_h = not sign[h]  # the positive physical end (L; P when sagittal: anterior left) to the right
    positive_up = pv == 2  # superior up; anterior (the negative end of y) up
    flip_v = sign[v] != positive_up
    top, bottom = (_ENDS[pv][1], _ENDS[pv][0]) if positive_up else (_ENDS[pv][0], _ENDS[pv][1])
    return AxialView(h, flip_h, flip_v, _ENDS[ph][0], _ENDS[ph][1], top, bottom)


def _orientation_markers(ax: Any, view: AxialView) -> None:
    box = {"boxstyle": "square,pad=0.15", "facecolor": "black", "edgecolor": "none", "alpha": 0.55}
    style = {"transform": ax.transAxes, "color": "yellow", "fontsize": 8, "fontweight": "bold", "bbox": box}
    ax.text(0.5, 0.985, view.top, ha="center", va="top", **style)
    ax.text(0.5, 0.015, view.bottom, ha="center", va="bottom", **style)
    ax.text(0.015, 0.5, view.left, ha="left", va="center", **style)
    ax.text(0.985, 0.5, view.right, ha="right", va="center", **style)


def slice_contours(
    ax: Any,
    mask2d: np.ndarray,
    color: Any,
    linestyle: str = "solid",
    spacing_xy: Sequence[float] = (1.0, 1.0),
    linewidth: float = 1.2,
) -> bool:
    """Draw the 0.5 iso-contour of a 2-D binary mask on ``ax``; False when it is empty.

    The mask's first axis is drawn along the plot's x axis, its second along y (``spacing_xy`` in
    the same order). Voxel centres sit at ``(i + 0.5) * spacing`` so the contour lines up with
    ``imshow(mask2d.T, origin="lower", extent=[0, X * sx, 0, Y * sy])``; flipping the view (reversed
    axis limits, as :func:`save_overlays` does) keeps them aligned.
    """
    m = np.asarray(mask2d, dtype=bool)
    if not m.any():
        return False
    # pad so that masks touching the border still close their contour
    mp = np.pad(m, 1).astype(np.float32)
    sx, sy = float(spacing_xy[0]), float(spacing_xy[1])
    xs = (np.arange(mp.shape[0]) - 0.5) * sx
    ys = (np.arange(mp.shape[1]) - 0.5) * sy
    ax.contour(xs, ys, mp.T, levels=[0.5], colors=[color], linestyles=linestyle, linewidths=linewidth)
    return True


def _window(image: np.ndarray, zs: Sequence[int]) -> tuple[float, float]:
    vals = np.concatenate([image[:, :, z].ravel() for z in zs]).astype(np.float64)
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(vals, [1.0, 99.0])
    if not hi > lo:
        lo, hi = float(vals.min()), float(vals.max())
        if not hi > lo:
            hi = lo + 1.0
    return float(lo), float(hi)


def save_overlays(
    image: Any,
    label: Any,
    pred: Any,
    classes: Sequence[str],
    out_path: str | os.PathLike,
    n_slices: int = 3,
    spacing: Sequence[float] | None = None,
    title: str | None = None,
    slices: Sequence[int] | None = None,
    slice_labels: Sequence[str] | None = None,
    direction: Sequence[float] | None = None,
) -> Path:
    """Save a PNG with ``n_slices`` axial slices: CT in grey, reference solid, prediction dashed.

    Args:
        image: CT volume (x, y, z), HU or normalised floats; ``None`` draws a black background.
        label, pred: integer class-index maps (x, y, z); ``pred`` may be ``None``.
        classes: class names by index (``classes[0]`` is background).
        out_path: PNG path (parent folders are created; written atomically).
        n_slices: number of axial slices, chosen by :func:`choose_slices` from the reference (or
            from the prediction if the reference is empty).
        spacing: voxel size (x, y, z) in mm; sets the aspect ratio and mm axes.
        title: optional figure title (e.g. the case id).
        slices: explicit slice indices, overriding the automatic choice.
        slice_labels: panel titles, one per slice (default ``slice z=<index>``); e.g. the original
            indices when ``image``/``label``/``pred`` are a stack of pre-picked slices.
        direction: the grid's direction cosines (SimpleITK row-major 3x3; for a cached case
            ``CacheReader.geometry(case)["direction"]``). Decides the radiological layout (anterior
            up, patient's left on the right) and the A/P/R/L markers, see :func:`axial_view`;
            ``None`` assumes the identity (index x -> patient's left, y -> posterior).

    Returns:
        The written path.
    """

    label = _np(label)
    if label.ndim != 3:
        raise ValueError(f"label must be 3-D (x, y, z), got shape {label.shape}")
    pred = None if pred is None else _np(pred)
    if pred is not None and pred.shape != label.shape:
        raise ValueError(f"pred {pred.shape} and label {label.shape} must have the same shape")
    image = np.zeros(label.shape, np.float32) if image is None else _np(image)
    if image.shape != label.shape:
        raise ValueError(f"image {image.shape} and label {label.shape} must have the same shape")
    sx, sy = (1.0, 1.0) if spacing is None else (float(spacing[0]), float(spacing[1]))
    n_classes = len(classes)
    nx, ny, nz = label.shape

    if slices is None:
        areas = slice_areas(label, n_classes)
        if not areas[:, 1:].any() and pred is not None:
            areas = slice_areas(pred, n_classes)
        zs = choose_slices(areas, n_slices)
    else:
        zs = [int(z) for z in slices]
        if any(not 0 <= z < nz for z in zs):
            raise ValueError(f"slices {zs} out of range for {nz} axial slices")
    lo, hi = _window(image, zs)
    colors = organ_colors(n_classes)

    view = axial_view(direction)
    h = view.horizontal
    # 2-D slices are re-indexed (horizontal, vertical); data coordinates are mm from the grid corner
    # in index space, and the radiological flips are reversed axis limits (so contours stay aligned)
    plane = (lambda a: a) if h == 0 else (lambda a: a.T)
    sh, sv = (sx, sy) if h == 0 else (sy, sx)
    nh, nv = (nx, ny) if h == 0 else (ny, nx)
    width, height = nh * sh, nv * sv
    extent = (0.0, width, 0.0, height)
    panel_w = 3.6
    panel_h = max(1.5, min(8.0, panel_w * height / max(width, 1e-6)))
    fig = Figure(figsize=(panel_w * len(zs) + 1.9, panel_h + 0.7), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(zs), squeeze=False)[0]
    shown: set[int] = set()
    if slice_labels is not None and len(slice_labels) != len(zs):
        raise ValueError(f"{len(slice_labels)} slice_labels for {len(zs)} slices")
    for i, (ax, z) in enumerate(zip(axes, zs)):
        ax.imshow(
            plane(image[:, :, z]).T,
            cmap="gray",
            vmin=lo,
            vmax=hi,
            origin="lower",
            extent=extent,
            interpolation="nearest",
            aspect="equal",
        )
        lab_z = plane(label[:, :, z])
        pred_z = None if pred is None else plane(pred[:, :, z])
        present = set(np.unique(lab_z).tolist())
        if pred_z is not None:
            present |= set(np.unique(pred_z).tolist())
        for c in sorted(int(v) for v in present if 0 < v < n_classes):
            drawn = slice_contours(ax, lab_z == c, colors[c], "solid", (sh, sv))
            if pred_z is not None:
                drawn |= slice_contours(ax, pred_z == c, colors[c], "dashed", (sh, sv))
            if drawn:
                shown.add(c)
        # Agg may leave a 1-pixel seam at the edge of a reversed axis: let it show air, not white
        ax.set_facecolor("black")
        ax.set_xlim((width, 0.0) if view.flip_h else (0.0, width))
        ax.set_ylim((height, 0.0) if view.flip_v else (0.0, height))
        _orientation_markers(ax, view)
        ax.set_title(f"slice z={z}" if slice_labels is None else str(slice_labels[i]), fontsize=9)
        ax.tick_params(labelsize=6)
        if spacing is not None:
            ax.set_xlabel(f"{'xy'[h]} (mm)", fontsize=7)
            ax.set_ylabel(f"{'xy'[1 - h]} (mm)", fontsize=7)

    handles = [Line2D([], [], color=colors[c], lw=2, label=str(classes[c])) for c in sorted(shown)]
    handles += [
        Line2D([], [], color="black", lw=1.2, ls="solid", label="reference"),
        Line2D([], [], color="black", lw=1.2, ls="dashed", label="prediction"),
    ]
    fig.legend(handles=handles, loc="center right", fontsize=7, frameon=False)
    if view.radiological_axial:
        fig.text(0.995, 0.01, "radiological view\n(from the feet)", ha="right", va="bottom", fontsize=6)
    if title:
        fig.suptitle(str(title), fontsize=10)
    fig.subplots_adjust(
        left=0.06,
        right=1.0 - 1.7 / (panel_w * len(zs) + 1.9),
        wspace=0.25,
        top=0.86 if title else 0.9,
        bottom=0.1,
    )

    out_path = Path(out_path)
    with atomic_open(out_path, "wb") as f:
        fig.savefig(f, format="png")
    return out_path
