"""``organseg pseudolabel --ckpt A.ckpt B.ckpt --card CARD --out FILE.h5``: hard pseudo-labels of a
few-organ dataset from single-dataset models (see :mod:`organseg.methods.pseudo_labelling`)."""

from __future__ import annotations

import argparse

from organseg.io.card import DatasetCard

DESCRIPTION = """Run first-stage single-dataset models (experts) on every cached case of CARD and store
one uint8 label map per case, in the cache geometry, for the organs CARD does *not* annotate (each expert
contributes only the organs its own training cards annotate; overlaps go to the more confident expert).
Give the file to the data config as `pseudo_labels: [FILE.h5]`. The file is written atomically and
fingerprinted against the cache and the checkpoints, so a stale file is detected, never used."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pseudolabel",
        help="hard pseudo-labels of a few-organ dataset from single-dataset models (HDF5)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--ckpt", nargs="+", required=True, help="checkpoints of first-stage single-dataset models"
    )
    p.add_argument("--card", required=True, help="dataset card whose cached cases are pseudo-labelled")
    p.add_argument("--out", required=True, help="output HDF5 file (e.g. data/pseudo/<dataset>.h5)")
    p.add_argument("--device", default="cpu", help="torch device for inference, e.g. cuda:0")
    p.add_argument("--force", action="store_true", help="rewrite even if the file is up to date")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    # lazy (torch, the methods): `organseg --help` imports every command's register() and must stay fast
    from organseg.methods.pseudo_labelling import write_pseudo_labels  # noqa: PLC0415
    from organseg.runtime.allocator import retain_freed_memory  # noqa: PLC0415

    retain_freed_memory()  # ~20 % less CPU per window (runtime/allocator.py); the command exits when done
    card = DatasetCard.load(args.card)
    write_pseudo_labels(
        card, args.ckpt, args.out, device=args.device, force=args.force, progress=not args.no_progress
    )
    return 0
