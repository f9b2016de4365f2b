"""Benchmark figures: per-organ Dice box plots per arm, and a forest plot of paired differences.

Like ``overlays``, a :class:`matplotlib.figure.Figure` on an explicit Agg canvas (no ``pyplot`` state,
safe in worker processes and tests). PNGs are written atomically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from organseg.io.atomic import atomic_open

from .statistics import PairedDifference, score_grid


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    return path


def dice_boxplots(rows: Sequence[Mapping], arms: Sequence[str], organs: Sequence[str], path: Path) -> Path:
    """One box per arm and organ over every (seed, case) value: the spread a reader should see first."""
    fig = Figure(figsize=(max(6.0, 0.45 * len(organs) * len(arms) + 2), 4.2))
    ax = fig.add_subplot()
    colours = matplotlib.colormaps["tab10"]
    width = 0.8 / max(len(arms), 1)
    for i, arm in enumerate(arms):
        data = []
        for organ in organs:
            _, _, grid = score_grid(rows, arm, [organ])
            values = grid[np.isfinite(grid)]
            data.append(values if values.size else np.array([np.nan]))
        positions = np.arange(len(organs)) + (i - (len(arms) - 1) / 2) * width
        parts = ax.boxplot(data, positions=positions, widths=width * 0.9, patch_artist=True, showfliers=True)
        for box in parts["boxes"]:
            box.set_facecolor(colours(i % 10))
            box.set_alpha(0.75)
        ax.plot([], [], "s", color=colours(i % 10), label=arm)
    ax.set_xticks(np.arange(len(organs)), organs, rotation=45, ha="right")
    ax.set_ylabel("Dice (each seed x test case)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower left", fontsize="small", ncols=min(len(arms), 4))
    return _save(fig, path)


def forest_plot(differences: Mapping[str, PairedDifference], title: str, path: Path) -> Path:
    """One line per comparison (label -> A - B with its 95 % interval), 0 marked; wins drawn solid."""
    labels = list(differences)
    fig = Figure(figsize=(7.0, 0.35 * len(labels) + 1.4))
    ax = fig.add_subplot()
    for y, label in enumerate(reversed(labels)):
        d = differences[label]
        if not np.isfinite(d.mean):
            continue
        colour = "tab:blue" if d.win else "0.45"
        ax.plot([d.low, d.high], [y, y], color=colour, lw=2)
        ax.plot([d.mean], [y], "o", color=colour, mfc=colour if d.win else "white")
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set_yticks(np.arange(len(labels)), list(reversed(labels)), fontsize="small")
    ax.set_xlabel("difference A - B, mean and bootstrap 95 % interval (filled: interval excludes 0)")
    ax.set_title(title, fontsize="medium")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)
