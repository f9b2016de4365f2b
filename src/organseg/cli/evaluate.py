"""``organseg evaluate --ckpt X [--data CARD]``: per-case, per-organ Dice/HD95/ASSD of a checkpoint on a
split of a cached dataset, written as CSV + Markdown + summary.json + PNG overlays.

The checkpoint carries its dataset cards, so ``--data`` is only needed to evaluate on another dataset.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="per-organ Dice / HD95 / ASSD of a checkpoint (CSV, Markdown, PNG)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ckpt", required=True, help="Lightning checkpoint written by `organseg fit`")
    p.add_argument(
        "--data", default=None, help="dataset card (default: the first card stored in the checkpoint)"
    )
    p.add_argument("--split", default="test", help="which split of the card to evaluate (train/val/test/all)")
    p.add_argument("--out", default=None, help="output folder (default: <run>/eval_<dataset>_<split>)")
    p.add_argument("--overlays", type=int, default=3, help="number of cases to draw PNG overlays for")
    p.add_argument("--device", default="cpu", help="torch device for inference, e.g. cuda:0")
    p.set_defaults(func=run)


def run(args) -> int:
    # lazy: torch and the models are imported when the command runs, not by `organseg --help`
    from organseg.evaluation.cached_split import evaluate_split  # noqa: PLC0415
    from organseg.methods.checkpoints import load_segmenter  # noqa: PLC0415
    from organseg.runtime.allocator import retain_freed_memory  # noqa: PLC0415

    retain_freed_memory()  # ~20 % less CPU per window (runtime/allocator.py); the command exits when done
    model, card, _ = load_segmenter(args.ckpt, args.device, args.data)
    ckpt = Path(args.ckpt).resolve()
    out = Path(args.out) if args.out else ckpt.parent.parent / f"eval_{card.name}_{args.split}"
    evaluate_split(
        model,
        card,
        args.split,
        out,
        title=f"{card.name} / {args.split} / {ckpt.name}",
        extra={"checkpoint": str(ckpt), "dataset": card.name},
        overlays=args.overlays,
        device=args.device,
    )
    return 0
