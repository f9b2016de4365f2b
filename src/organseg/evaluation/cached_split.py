"""Evaluate a segmentation model on one split of a cached dataset: per case and organ Dice / HD95 / ASSD,
a report (CSV, Markdown, summary.json) and PNG overlays of the first cases. ``organseg evaluate``
(:mod:`organseg.cli.evaluate`) loads the checkpoint and calls :func:`evaluate_split`."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from rich.progress import track

from organseg.cache.build import build_cache
from organseg.cache.reader import CacheReader
from organseg.errors import ConfigError
from organseg.evaluation.metrics import case_metrics, summarize
from organseg.evaluation.overlays import save_overlays
from organseg.evaluation.report import format_table, write_report
from organseg.io.card import DatasetCard


def split_case_ids(card: DatasetCard, reader: CacheReader, split: str) -> list[str]:
    """The case ids of ``split`` (``train``/``val``/``test`` as the card splits its cache, or ``all``)."""
    splits = card.split_cases(reader.case_ids)
    if split == "all":
        case_ids = list(reader.case_ids)
    elif split in splits:
        case_ids = splits[split]
    else:
        raise ConfigError(f"{card.source or card.name}: no split {split!r} (have {sorted(splits)} and 'all')")
    if not case_ids:
        raise ConfigError(f"{card.source or card.name}: split {split!r} has no cases")
    return case_ids


def evaluate_split(
    model,
    card: DatasetCard,
    split: str,
    out: Path,
    *,
    title: str,
    extra: dict,
    overlays: int = 3,
    device: str = "cpu",
    console: Console | None = None,
) -> dict:
    """Run ``model.predict_case`` on every case of ``split`` and write the report to ``out``; returns
    the report's paths. The cache is built first if it is missing or stale (a no-op otherwise)."""
    console = console or Console()
    build_cache(card, progress=False)
    reader = CacheReader(card.cache)
    case_ids = split_case_ids(card, reader, split)
    labeled = card.labeled_mask
    rows = []
    for i, cid in enumerate(
        track(case_ids, description=f"evaluating {len(case_ids)} cases", console=console)
    ):
        image, label = reader.read_case(cid)
        pred = model.predict_case(torch.from_numpy(image)[None, None].to(device))[0].cpu().numpy()
        rows += case_metrics(pred, label, reader.spacing(cid), card.classes, labeled=labeled, case_id=cid)
        if i < overlays:
            save_overlays(
                image,
                label,
                pred,
                card.classes,
                out / "overlays" / f"{cid}.png",
                spacing=reader.spacing(cid),
                direction=reader.geometry(cid)["direction"],  # radiological view of this scan's axes
            )
    paths = write_report(rows, out, title=title, extra={**extra, "split": split, "cases": case_ids})
    console.print(format_table(summarize(rows)))
    console.print(
        f"report: {out}  ({', '.join(p.name for p in paths.values())}; overlays in {out / 'overlays'})"
    )
    return paths
