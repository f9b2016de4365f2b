"""Evaluation reports: per-case / per-organ CSV, a Markdown table and a JSON summary.

Every file is written atomically (temporary file in the same folder, then :func:`os.replace`), so
an interrupted run never leaves a half-written report behind.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from organseg.io.atomic import atomic_open, make_dirs

from .metrics import EMPTY_MASK_POLICY, HD95_DEFINITION, ROW_KEYS, STATUS_OK, SUMMARY_KEYS, summarize

__all__ = ["atomic_write_text", "csv_text", "format_table", "to_jsonable", "write_report"]


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` via a temporary file and :func:`os.replace`."""
    path = Path(path)
    with atomic_open(path, "w") as f:
        f.write(text)
    return path


def to_jsonable(obj: Any) -> Any:
    """Recursively convert to plain JSON types; NaN/inf -> ``None``, numpy scalars -> Python."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [to_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "item") and callable(obj.item):  # torch scalars
        try:
            return to_jsonable(obj.item())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(obj)


def _fmt(mean: float, std: float, digits: int) -> str:
    if mean is None or not math.isfinite(float(mean)):
        return "n/a"
    if std is None or not math.isfinite(float(std)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_table(summary: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table ``| organ | Dice | HD95 (mm) | ASSD (mm) | n |`` from :func:`summarize` rows.

    Cells are "mean ± std" (Dice with 3 decimals, distances with 2); undefined values are "n/a".
    """
    lines = ["| organ | Dice | HD95 (mm) | ASSD (mm) | n |", "|---|---:|---:|---:|---:|"]
    for s in summary:
        lines.append(
            "| {organ} | {dice} | {hd95} | {assd} | {n} |".format(
                organ=str(s["organ"]).replace("|", "\\|"),
                dice=_fmt(s.get("dice_mean"), s.get("dice_std"), 3),
                hd95=_fmt(s.get("hd95_mean"), s.get("hd95_std"), 2),
                assd=_fmt(s.get("assd_mean"), s.get("assd_std"), 2),
                n=s.get("n", ""),
            )
        )
    return "\n".join(lines)


def _csv_value(v: Any) -> Any:
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return "nan" if math.isnan(v) else repr(v)
    if isinstance(v, np.integer):
        return int(v)
    return v


def csv_text(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> str:
    """CSV with ``keys`` first (then any extra keys of the rows); floats exact, NaN as ``nan``."""
    fields = list(keys)
    for r in rows:  # extra keys (e.g. added by the caller) go after the standard ones
        fields.extend(k for k in r if k not in fields)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, restval="", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _csv_value(v) for k, v in r.items()})
    return buf.getvalue()


def write_report(
    rows: Sequence[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    title: str = "",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``per_case.csv``, ``per_organ.csv``, ``report.md`` and ``summary.json`` to ``out_dir``.

    Args:
        rows: per-case rows from :func:`~organseg.evaluation.metrics.case_metrics` (any number of
            cases concatenated).
        out_dir: created if needed.
        title: Markdown heading of ``report.md``.
        extra: more top-level entries for ``summary.json`` (e.g. checkpoint, dataset, split); it
            must not use the keys ``per_organ``, ``mean``, ``policy`` or ``hd95_definition``.

    Returns:
        ``{"per_case": path, "per_organ": path, "report": path, "summary": path}``.
    """
    rows = [dict(r) for r in rows]
    extra = dict(extra or {})
    clash = {"per_organ", "mean", "policy", "hd95_definition"} & set(extra)
    if clash:
        raise ValueError(f"extra must not override {sorted(clash)}")
    out_dir = Path(out_dir)
    make_dirs(out_dir)
    summary = summarize(rows)
    organ_rows, mean_row = summary[:-1], summary[-1]

    paths = {
        "per_case": out_dir / "per_case.csv",
        "per_organ": out_dir / "per_organ.csv",
        "report": out_dir / "report.md",
        "summary": out_dir / "summary.json",
    }
    atomic_write_text(paths["per_case"], csv_text(rows, ROW_KEYS))
    atomic_write_text(paths["per_organ"], csv_text(summary, SUMMARY_KEYS))

    n_cases = len({r.get("case_id", "") for r in rows})
    status_counts = Counter(str(r.get("status", "")) for r in rows)
    md = []
    if title:
        md += [f"# {title}", ""]
    md += [f"{n_cases} case(s), {len(organ_rows)} organ(s).", "", format_table(summary), ""]
    failures = {k: v for k, v in sorted(status_counts.items()) if k != STATUS_OK}
    if failures:
        md += [
            "Rows by status: "
            + ", ".join(f"{k}: {v}" for k, v in failures.items())
            + f" (ok: {status_counts.get(STATUS_OK, 0)}).",
            "",
        ]
    md += [EMPTY_MASK_POLICY, "", HD95_DEFINITION, ""]
    atomic_write_text(paths["report"], "\n".join(md))

    doc = {
        "per_organ": {s["organ"]: {k: v for k, v in s.items() if k != "organ"} for s in organ_rows},
        "mean": {k: v for k, v in mean_row.items() if k != "organ"},
        "policy": EMPTY_MASK_POLICY,
        "hd95_definition": HD95_DEFINITION,
        "n_cases": n_cases,
        "status_counts": dict(status_counts),
        **extra,
    }
    atomic_write_text(paths["summary"], json.dumps(to_jsonable(doc), indent=2, allow_nan=False) + "\n")
    return paths
