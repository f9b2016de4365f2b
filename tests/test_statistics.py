"""Benchmark statistics (issue 12): per-seed summaries and paired bootstrap intervals, checked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from organseg.evaluation.statistics import (
    bootstrap_means,
    paired_difference,
    score_grid,
    seed_summary,
)


def rows_for(arm: str, table: dict[tuple[int, str, str], float]) -> list[dict]:
    return [
        {"arm": arm, "seed": s, "case_id": c, "organ": o, "dice": v, "hd95_mm": 10 * (1 - v), "assd_mm": ""}
        for (s, c, o), v in table.items()
    ]


def test_score_grid_averages_the_organs_of_a_group_per_case_and_skips_undefined():
    rows = rows_for("a", {(0, "c1", "eye"): 0.8, (0, "c1", "lens"): 0.4, (0, "c2", "eye"): 0.6})
    rows += rows_for("a", {(0, "c2", "lens"): math.nan, (1, "c1", "eye"): 0.2})
    seeds, cases, grid = score_grid(rows, "a", ["eye", "lens"])
    assert seeds == [0, 1] and cases == ["c1", "c2"]
    np.testing.assert_allclose(grid, [[0.6, 0.6], [0.2, np.nan]])


def test_seed_summary_is_mean_and_sd_of_per_seed_case_means():
    rows = rows_for(
        "a", {(0, "c1", "eye"): 0.8, (0, "c2", "eye"): 0.6, (1, "c1", "eye"): 0.4, (1, "c2", "eye"): 0.2}
    )
    s = seed_summary(rows, "a", ["eye"])
    assert s.per_seed == pytest.approx((0.7, 0.3)) and s.n_cases == 2
    assert s.mean == pytest.approx(0.5) and s.sd == pytest.approx(math.sqrt(0.08))  # ddof=1
    assert s.format() == "0.500 ± 0.283"


def test_bootstrap_means_by_hand():
    d = np.array([[0.1, 0.2, 0.6], [0.3, np.nan, 0.0]])
    seed_draws = np.array([[0, 0], [1, 0], [1, 1]])
    case_draws = np.array([[0, 1, 2], [2, 2, 1], [1, 1, 1]])
    got = bootstrap_means(d, seed_draws, case_draws)
    # draw 0: seed 0 twice, cases 0,1,2 -> mean of (.1,.2,.6) = 0.3
    # draw 1: seeds 1,0; cases 2,2,1 -> (0,0,nan, .6,.6,.2) -> 1.4/5 = 0.28
    # draw 2: seed 1 twice; case 1 thrice -> all NaN -> NaN
    np.testing.assert_allclose(got[:2], [0.3, 0.28])
    assert math.isnan(got[2])


def test_a_constant_gain_is_a_win_and_identical_arms_are_not():
    base = {(s, f"c{c}", "eye"): 0.1 * c + 0.01 * s for s in range(3) for c in range(8)}
    rows = rows_for("b", base) + rows_for("a", {k: v + 0.1 for k, v in base.items()}) + rows_for("same", base)
    gain = paired_difference(rows, "a", "b", ["eye"])
    assert (
        gain.mean == pytest.approx(0.1) and gain.low == pytest.approx(0.1) and gain.high == pytest.approx(0.1)
    )
    assert gain.win == "A" and (gain.n_seeds, gain.n_cases) == (3, 8)
    assert paired_difference(rows, "b", "a", ["eye"]).win == "B"
    none = paired_difference(rows, "same", "b", ["eye"])
    assert none.mean == 0 and none.win is None
    # distances: lower is better, so A's smaller HD95 is A's win although A - B < 0
    hd = paired_difference(rows, "a", "b", ["eye"], metric="hd95_mm")
    assert hd.mean == pytest.approx(-1.0) and hd.win == "A"


def test_noise_larger_than_the_gain_is_not_a_win_and_the_interval_is_reproducible():
    rng = np.random.default_rng(1)
    base = {(s, f"c{c}", "eye"): 0.5 for s in range(3) for c in range(8)}
    noisy = {k: v + 0.01 + rng.normal(0, 0.2) for k, v in base.items()}
    rows = rows_for("b", base) + rows_for("a", noisy)
    first = paired_difference(rows, "a", "b", ["eye"])
    assert first.low < 0 < first.high and first.win is None
    assert paired_difference(rows, "a", "b", ["eye"]) == first


def test_only_shared_seeds_and_cases_are_paired():
    a = rows_for("a", {(0, "c1", "eye"): 0.9, (0, "c2", "eye"): 0.9, (1, "c1", "eye"): 0.9})
    b = rows_for("b", {(0, "c1", "eye"): 0.5, (2, "c1", "eye"): 0.0})
    d = paired_difference(a + b, "a", "b", ["eye"])
    assert (d.n_seeds, d.n_cases) == (1, 1) and d.mean == pytest.approx(0.4)
    empty = paired_difference(a, "a", "missing", ["eye"])
    assert math.isnan(empty.mean) and empty.win is None
