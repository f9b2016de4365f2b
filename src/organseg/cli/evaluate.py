"""``organseg evaluate --ckpt X [Y ...] [--data CARD]``: per-case, per-organ Dice/HD95/ASSD of a checkpoint
on a split of a cached dataset, written as CSV + Markdown + summary.json + PNG overlays.

The checkpoint carries its dataset cards, so ``--data`` is only needed to evaluate on another dataset.
Several checkpoints of single-dataset models are evaluated as one multi-model (co-training's baseline:
each contributes the organs its own cards annotate, N forward passes).
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
    p.add_argument(
        "--ckpt",
        required=True,
        nargs="+",
        help="checkpoint(s) written by `organseg fit`; several: one multi-model of single-dataset models",
    )
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
    from organseg.methods.cowam_baselines import MultiModel  # noqa: PLC0415
    from organseg.runtime.allocator import retain_freed_memory  # noqa: PLC0415

    retain_freed_memory()  # ~20 % less CPU per window (runtime/allocator.py); the command exits when done
    model, card, _ = load_segmenter(args.ckpt[0], args.device, args.data)
    ckpts = [Path(c).resolve() for c in args.ckpt]
    if len(ckpts) > 1:  # each expert checked as one checkpoint above would be, then combined
        for extra_ckpt in args.ckpt[1:]:
            load_segmenter(extra_ckpt, args.device, args.data)
        model = MultiModel.from_checkpoints(ckpts, card.classes, device=args.device)
    out = Path(args.out) if args.out else ckpts[0].parent.parent / f"eval_{card.name}_{args.split}"
    evaluate_split(
        model,
        card,
        args.split,
        out,
        title=f"{card.name} / {args.split} / {' + '.join(c.name for c in ckpts)}",
        extra={
            "checkpoint": str(ckpts[0]) if len(ckpts) == 1 else [str(c) for c in ckpts],
            "dataset": card.name,
        },
        overlays=args.overlays,
        device=args.device,
    )
    return 0
