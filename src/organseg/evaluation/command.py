"""``organseg evaluate --ckpt X [--data CARD]``: per-case, per-organ Dice/HD95/ASSD of a checkpoint on a
split of a cached dataset, written as CSV + Markdown + summary.json + PNG overlays.

The checkpoint carries its dataset cards, so ``--data`` is only needed to evaluate on another dataset.
"""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import torch


def register(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="per-organ Dice / HD95 / ASSD of a checkpoint (CSV, Markdown, PNG)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="Lightning checkpoint written by `organseg fit`")
    p.add_argument("--data", default=None, help="dataset card (default: the first card stored in the checkpoint)")
    p.add_argument("--split", default="test", help="which split of the card to evaluate (train/val/test/all)")
    p.add_argument("--out", default=None, help="output folder (default: <run>/eval_<dataset>_<split>)")
    p.add_argument("--overlays", type=int, default=3, help="number of cases to draw PNG overlays for")
    p.add_argument("--device", default="cpu", help="torch device for inference, e.g. cuda:0")
    p.set_defaults(func=run)


def load_module(ckpt: str | Path, device: str = "cpu"):
    """The LightningModule a checkpoint was written by (its class is recorded in the checkpoint)."""
    from organseg.modules.base import CHECKPOINT_KEY, read_checkpoint

    path = Path(ckpt)
    raw = read_checkpoint(path)   # one-line ValueError for a missing/foreign file (printed by the CLI)
    module_path, _, cls_name = raw[CHECKPOINT_KEY]["module"].rpartition(".")
    cls = getattr(importlib.import_module(module_path), cls_name)
    model = cls.load_from_checkpoint(path, map_location=device, weights_only=False)
    return model.eval().to(device), raw[CHECKPOINT_KEY]


def run(args) -> int:
    from rich.console import Console
    from rich.progress import track

    from organseg.cache.build import build_cache
    from organseg.cache.reader import CacheReader
    from organseg.cli import UserError
    from organseg.evaluation.metrics import case_metrics, summarize
    from organseg.evaluation.overlays import save_overlays
    from organseg.evaluation.report import format_table, write_report
    from organseg.io.card import DatasetCard

    console = Console()
    model, extra = load_module(args.ckpt, args.device)
    if args.data:
        card = DatasetCard.load(args.data)
    elif extra.get("cards"):
        card = DatasetCard.from_dict({k: v for k, v in extra["cards"][0].items() if k != "source"},
                                     source=extra["cards"][0].get("source", ""))
    else:
        raise UserError(f"{args.ckpt}: the checkpoint carries no dataset card; pass --data <card>")
    if card.classes != model.classes:
        raise UserError(f"{card.source or card.name}: classes differ from the checkpoint's ({len(model.classes)} classes)")
    build_cache(card, progress=False)   # a no-op when the cache is up to date
    reader = CacheReader(card.cache)
    splits = card.split_cases(reader.case_ids)
    if args.split == "all":
        case_ids = list(reader.case_ids)
    elif args.split in splits:
        case_ids = splits[args.split]
    else:
        raise UserError(f"{card.source or card.name}: no split {args.split!r} (have {sorted(splits)} and 'all')")
    if not case_ids:
        raise UserError(f"{card.source or card.name}: split {args.split!r} has no cases")
    out = Path(args.out) if args.out else Path(args.ckpt).resolve().parent.parent / f"eval_{card.name}_{args.split}"
    labeled = card.labeled_mask
    rows = []
    for i, cid in enumerate(track(case_ids, description=f"evaluating {len(case_ids)} cases", console=console)):
        image, label = reader.read_case(cid)
        x = torch.from_numpy(image)[None, None].to(args.device)
        pred = model.predict_case(x)[0].cpu().numpy()
        rows += case_metrics(pred, label, reader.spacing(cid), card.classes, labeled=labeled, case_id=cid)
        if i < args.overlays:
            save_overlays(image, label, pred, card.classes, out / "overlays" / f"{cid}.png",
                          spacing=reader.spacing(cid))
    paths = write_report(rows, out, title=f"{card.name} / {args.split} / {Path(args.ckpt).name}",
                         extra={"checkpoint": str(Path(args.ckpt).resolve()), "dataset": card.name,
                                "split": args.split, "cases": case_ids})
    console.print(format_table(summarize(rows)))
    console.print(f"report: {out}  ({', '.join(p.name for p in paths.values())}; overlays in {out / 'overlays'})")
    return 0
