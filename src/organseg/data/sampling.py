"""Class-balanced patch centres drawn from the cache's foreground coordinates (no volume scan)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def class_probabilities(
    counts: np.ndarray, foreground_probability: float, organ_weights: Sequence[float] | None = None
) -> np.ndarray:
    """P(centre class) for one case: background gets ``1 - foreground_probability``; the rest is
    shared by the organs present in this case in proportion to ``organ_weights`` (default equal),
    so a 30-voxel lens is drawn as often as a 30k-voxel temporal lobe."""
    counts = np.asarray(counts)
    n = len(counts)
    w = np.ones(n) if organ_weights is None else np.asarray(organ_weights, dtype=np.float64).copy()
    w[0] = 0.0
    w[counts <= 0] = 0.0
    p = np.zeros(n)
    if w.sum() > 0:
        p[1:] = foreground_probability * w[1:] / w.sum()
        p[0] = 1.0 - foreground_probability
    else:
        p[0] = 1.0
    return p


def draw_centre(
    rng: np.random.Generator,
    shape: Sequence[int],
    counts: np.ndarray,
    fg_coords,
    foreground_probability: float,
    organ_weights=None,
) -> tuple[np.ndarray, int]:
    """(centre voxel (3,), chosen class). ``fg_coords(c)`` returns the cached (N,3) coordinates of class c.
    A background draw is a uniform voxel of the case (mostly background, sometimes an organ)."""
    p = class_probabilities(counts, foreground_probability, organ_weights)
    c = int(rng.choice(len(p), p=p))
    if c > 0:
        coords = fg_coords(c)
        if len(coords):
            return np.asarray(coords[rng.integers(len(coords))], dtype=np.int64), c
    return np.array([rng.integers(s) for s in shape], dtype=np.int64), 0


def patch_start(
    rng: np.random.Generator, centre: np.ndarray, patch_size: Sequence[int], jitter: float
) -> np.ndarray:
    """Patch origin so that ``centre`` lies inside the patch, displaced by up to ``jitter`` x patch/2
    from the middle (an organ is not always at the patch centre; no positional shortcut)."""
    size = np.asarray(patch_size)
    half = size // 2
    max_shift = np.floor(half * jitter).astype(np.int64)
    shift = np.array([rng.integers(-m, m + 1) if m > 0 else 0 for m in max_shift])
    return centre - half + shift
