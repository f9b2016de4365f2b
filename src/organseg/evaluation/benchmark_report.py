"""A benchmark's result folder: ``per_case.csv`` (long form), ``table.md``, ``summary.json`` and PNGs.

``per_case.csv`` has one row per arm x seed x case x organ (``statistics.RESULT_COLUMNS``), so any
claim in ``table.md`` can be recomputed from it alone. ``table.md`` gives, per organ and per organ
group, each arm's mean ± SD over seeds, then every requested comparison as a paired difference with its
bootstrap interval (``statistics``), a win in bold only where the interval excludes 0.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from .benchmark_plots import dice_boxplots, forest_plot
from .report import atomic_write_text, csv_text, to_jsonable
from .statistics import INTERVAL_NOTE, RESULT_COLUMNS, PairedDifference, paired_difference, seed_summary


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _groups_and_organs(organs: Sequence[str], groups: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Rows of the tables: every organ group (``mean`` = all organs), then each organ."""
    out = {"mean (all organs)": list(organs)}
    out.update({f"{name} (group)": [o for o in members if o in organs] for name, members in groups.items()})
    out.update({o: [o] for o in organs})
    return out


def comparisons_for(
    rows: Sequence[Mapping],
    comparisons: Sequence[Sequence[str]],
    organs: Sequence[str],
    groups: Mapping[str, Sequence[str]],
    metric: str = "dice",
) -> dict[tuple[str, str], dict[str, PairedDifference]]:
    """{(A, B): {row label: A - B}} for every comparison and table row."""
    labels = _groups_and_organs(organs, groups)
    return {
        (a, b): {label: paired_difference(rows, a, b, members, metric) for label, members in labels.items()}
        for a, b in comparisons
    }


def markdown_table(
    rows: Sequence[Mapping],
    arms: Sequence[str],
    organs: Sequence[str],
    groups: Mapping[str, Sequence[str]],
    differences: Mapping[tuple[str, str], Mapping[str, PairedDifference]],
    metric: str = "dice",
) -> str:
    labels = _groups_and_organs(organs, groups)
    lines = [f"### {metric}: mean ± SD over seeds", "", "| | " + " | ".join(arms) + " |"]
    lines.append("|---|" + "---:|" * len(arms))
    for label, members in labels.items():
        cells = [seed_summary(rows, arm, members, metric).format() for arm in arms]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if differences:
        pairs = list(differences)
        lines += ["", f"### {metric}: paired differences A - B [95 % interval]", ""]
        lines.append("| | " + " | ".join(f"{a} - {b}" for a, b in pairs) + " |")
        lines.append("|---|" + "---:|" * len(pairs))
        for label in labels:
            cells = []
            for pair in pairs:
                d = differences[pair][label]
                text = d.format()
                cells.append(f"**{text}**" if d.win else text)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", INTERVAL_NOTE]
    return "\n".join(lines)


def budget_table(arms: Mapping[str, Sequence[Mapping]]) -> str:
    """Each arm's optimiser steps per run (the budget), and the wall time and machine load it took: a
    Markdown table. ``arms``: arm -> one record per seed with ``runs`` (name -> steps, wall_s, load_*)."""
    lines = [
        "### Budgets (optimiser steps) and what they cost here",
        "",
        "| arm | steps per run | total steps | train wall min (mean over seeds) | 1-min load (min-max) |",
        "|---|---|---:|---:|---:|",
    ]
    for arm, records in arms.items():
        if not records:
            continue
        runs = records[0]["runs"]
        per_run = " + ".join(
            f"{name} {run['steps']}" if run.get("steps") else f"{name} (inference)"
            for name, run in runs.items()
        )
        walls = [r["train_wall_s"] / 60 for r in records]
        loads = [
            run[k]
            for r in records
            for run in r["runs"].values()
            for k in ("load_before", "load_after")
            if k in run
        ]
        load = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "-"
        lines.append(
            f"| {arm} | {per_run} | {records[0]['steps']} | {sum(walls) / len(walls):.1f} | {load} |"
        )
    lines += [
        "",
        "A run shared by two arms (same stages, same seed) is trained once and counted in both; wall time "
        "depends on the machine's load, the steps do not.",
    ]
    return "\n".join(lines)


def write_benchmark_report(
    rows: Sequence[Mapping],
    arms: Sequence[str],
    organs: Sequence[str],
    groups: Mapping[str, Sequence[str]],
    comparisons: Sequence[Sequence[str]],
    meta: Mapping,
    out_dir: Path,
) -> dict[str, Path]:
    """Write the result folder (module doc); ``meta`` (commands, steps, wall time, load, commit,
    versions) goes into ``summary.json`` and the head of ``table.md``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    differences = comparisons_for(rows, comparisons, organs, groups)
    paths = {
        "per_case": atomic_write_text(out_dir / "per_case.csv", csv_text(rows, RESULT_COLUMNS)),
        "boxplot": dice_boxplots(rows, arms, organs, out_dir / "dice_boxplot.png"),
    }
    for (a, b), per_label in differences.items():
        paths[f"forest_{a}_vs_{b}"] = forest_plot(
            per_label, f"Dice: {a} - {b} (paired per seed and case)", out_dir / f"forest_{a}_vs_{b}.png"
        )
    head = [f"# Benchmark {meta.get('name', '')}", ""]
    for key in ("command", "date", "seeds", "test_cases", "git_commit", "machine"):
        if key in meta:
            head.append(f"- {key}: `{meta[key]}`")
    head.append("")
    n_seeds = len({r["seed"] for r in rows})
    if n_seeds < 3:
        head += [
            f"**{n_seeds} seed(s) only: the intervals barely sample seed-to-seed variation (too narrow); "
            "read no difference here as shown (a claim needs >= 3 seeds).**",
            "",
        ]
    if meta.get("arms"):
        head += [budget_table(meta["arms"]), "", ""]
    body = markdown_table(rows, arms, organs, groups, differences)
    figures = "\n".join(f"![{p.stem}]({p.name})" for k, p in paths.items() if p.suffix == ".png")
    paths["table"] = atomic_write_text(out_dir / "table.md", "\n".join(head) + body + "\n\n" + figures + "\n")
    summary = dict(meta)
    summary["differences"] = {
        f"{a} - {b}": {
            label: {
                "mean": d.mean,
                "low": d.low,
                "high": d.high,
                "win": d.win,
                "n_seeds": d.n_seeds,
                "n_cases": d.n_cases,
            }
            for label, d in per_label.items()
        }
        for (a, b), per_label in differences.items()
    }
    paths["summary"] = atomic_write_text(
        out_dir / "summary.json", json.dumps(to_jsonable(summary), indent=2) + "\n"
    )
    return paths
