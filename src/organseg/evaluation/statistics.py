"""Benchmark statistics: per-arm mean +- SD over seeds and paired differences with bootstrap intervals.

Input is the long result form every benchmark writes (``per_case.csv``): one row per
arm x seed x case x organ with ``dice``, ``hd95_mm``, ``assd_mm`` (NaN where the metric is undefined,
e.g. an organ absent from both reference and prediction: ``metrics.EMPTY_MASK_POLICY``).

- A *score* of an organ group in one case is the mean over the group's organs with a defined value.
- An arm's figure for one seed is the mean over the test cases; the table gives the mean and SD of
  those per-seed figures (SD with ddof=1: the seed-to-seed spread a rerun would see).
- A paired difference between arms A and B is taken per (seed, case) on the same seeds and cases
  (seed s of both arms sees the same split and, for a chain, the same data seed). Its interval is a
  two-level percentile bootstrap: seeds and cases are each resampled with replacement, independently,
  and the mean of the resampled grid is recorded; the 2.5th and 97.5th percentiles bound the 95 %
  interval. A difference is a *win* only when that interval excludes 0.

Written by hand (a few lines of numpy): scipy.stats.bootstrap resamples one axis of independent
observations, not a seeds x cases grid.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

RESULT_COLUMNS = ("arm", "seed", "case_id", "organ", "dice", "hd95_mm", "assd_mm")
METRICS = ("dice", "hd95_mm", "assd_mm")
HIGHER_IS_BETTER = {"dice": True, "hd95_mm": False, "assd_mm": False}


def _value(row: Mapping, metric: str) -> float:
    v = row.get(metric)
    if v is None or v == "":
        return math.nan
    return float(v)


def score_grid(
    rows: Iterable[Mapping], arm: str, organs: Sequence[str], metric: str = "dice"
) -> tuple[list[int], list[str], np.ndarray]:
    """(seeds, case ids, grid [seed, case]) of one arm: per cell the mean of ``metric`` over ``organs``
    with a defined value (NaN when none has one)."""
    wanted = set(organs)
    cells: dict[tuple[int, str], list[float]] = {}
    for row in rows:
        if row["arm"] != arm or row["organ"] not in wanted:
            continue
        cells.setdefault((int(row["seed"]), str(row["case_id"])), []).append(_value(row, metric))
    seeds = sorted({s for s, _ in cells})
    cases = sorted({c for _, c in cells})
    grid = np.full((len(seeds), len(cases)), np.nan)
    for (s, c), values in cells.items():
        v = np.asarray(values, dtype=float)
        if np.isfinite(v).any():
            grid[seeds.index(s), cases.index(c)] = float(np.nanmean(v))
    return seeds, cases, grid


@dataclass(frozen=True)
class SeedSummary:
    """An arm's figure for one organ or group: mean and SD over seeds of the per-seed case means."""

    mean: float
    sd: float
    per_seed: tuple[float, ...]
    n_cases: int

    def format(self, digits: int = 3) -> str:
        if not math.isfinite(self.mean):
            return "-"
        sd = f" ± {self.sd:.{digits}f}" if math.isfinite(self.sd) else ""
        return f"{self.mean:.{digits}f}{sd}"


def seed_summary(
    rows: Iterable[Mapping], arm: str, organs: Sequence[str], metric: str = "dice"
) -> SeedSummary:
    _, cases, grid = score_grid(rows, arm, organs, metric)
    with np.errstate(all="ignore"):
        per_seed = [float(np.nanmean(g)) if np.isfinite(g).any() else math.nan for g in grid]
    finite = [v for v in per_seed if math.isfinite(v)]
    mean = float(np.mean(finite)) if finite else math.nan
    sd = float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan
    return SeedSummary(mean, sd, tuple(per_seed), len(cases))


@dataclass(frozen=True)
class PairedDifference:
    """A - B over shared seeds and cases, with its bootstrap 95 % interval."""

    mean: float
    low: float
    high: float
    n_seeds: int
    n_cases: int
    higher_is_better: bool = True

    @property
    def win(self) -> str | None:
        """``"A"`` or ``"B"`` when the interval excludes 0 (in the metric's better direction), else None."""
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low <= 0 <= self.high:
            return None
        a_better = self.low > 0 if self.higher_is_better else self.high < 0
        return "A" if a_better else "B"

    def format(self, digits: int = 3) -> str:
        if not math.isfinite(self.mean):
            return "-"
        return f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def bootstrap_means(differences: np.ndarray, seed_draws: np.ndarray, case_draws: np.ndarray) -> np.ndarray:
    """Mean of ``differences`` [seed, case] over each resampled grid: draw b uses seeds ``seed_draws[b]``
    and cases ``case_draws[b]`` (index arrays, with repeats); NaN cells are left out of the mean."""
    out = np.empty(len(seed_draws))
    for b, (s, c) in enumerate(zip(seed_draws, case_draws)):
        cell = differences[np.ix_(s, c)]
        out[b] = np.nanmean(cell) if np.isfinite(cell).any() else np.nan
    return out


def paired_difference(
    rows: Sequence[Mapping],
    arm_a: str,
    arm_b: str,
    organs: Sequence[str],
    metric: str = "dice",
    n_boot: int = 2000,
    rng_seed: int = 0,
) -> PairedDifference:
    """A - B per (seed, case) on the seeds and cases both arms have, and its percentile interval
    (module doc). Fixed ``rng_seed``: the same CSV always gives the same interval."""
    seeds_a, cases_a, grid_a = score_grid(rows, arm_a, organs, metric)
    seeds_b, cases_b, grid_b = score_grid(rows, arm_b, organs, metric)
    seeds = [s for s in seeds_a if s in seeds_b]
    cases = [c for c in cases_a if c in cases_b]
    better = HIGHER_IS_BETTER.get(metric, True)
    if not seeds or not cases:
        return PairedDifference(math.nan, math.nan, math.nan, len(seeds), len(cases), better)
    a = grid_a[np.ix_([seeds_a.index(s) for s in seeds], [cases_a.index(c) for c in cases])]
    b = grid_b[np.ix_([seeds_b.index(s) for s in seeds], [cases_b.index(c) for c in cases])]
    d = a - b
    if not np.isfinite(d).any():
        return PairedDifference(math.nan, math.nan, math.nan, len(seeds), len(cases), better)
    rng = np.random.default_rng(rng_seed)
    seed_draws = rng.integers(0, len(seeds), size=(n_boot, len(seeds)))
    case_draws = rng.integers(0, len(cases), size=(n_boot, len(cases)))
    means = bootstrap_means(d, seed_draws, case_draws)
    low, high = np.nanpercentile(means, [2.5, 97.5])
    return PairedDifference(float(np.nanmean(d)), float(low), float(high), len(seeds), len(cases), better)


INTERVAL_NOTE = (
    "Mean ± SD over seeds of the per-seed mean over test cases. Differences: A - B per (seed, case), "
    "mean [95 % interval: percentile bootstrap resampling seeds and cases]; a win (bold) only where "
    "the interval excludes 0, otherwise no difference is shown."
)
