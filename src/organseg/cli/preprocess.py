"""``organseg preprocess <card.yaml> [...]``: build (or verify) the HDF5 cache of each dataset card."""

from __future__ import annotations

import argparse

from organseg.cache.build import build_cache
from organseg.errors import ConfigError
from organseg.io.card import DatasetCard
from organseg.io.dicom_rt import names_table
from organseg.io.layouts import list_cases


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "preprocess",
        help="resample, crop and cache datasets as HDF5 (no-op when up to date)",
        description="Read and validate every case of each dataset card, resample to the card's "
        "target_spacing, clip to hu_window, crop to the body and write one HDF5 cache per "
        "dataset at the card's `cache` path. Re-running with unchanged inputs does nothing.",
    )
    p.add_argument(
        "cards", nargs="+", metavar="card.yaml", help="dataset card(s), e.g. data_modules/cards/*.yaml"
    )
    p.add_argument("--workers", type=int, default=2, help="parallel reader/resampler processes (default 2)")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip unreadable/inconsistent cases with a warning instead of failing",
    )
    p.add_argument("--force", action="store_true", help="rebuild even if the cache is up to date")
    p.add_argument(
        "--interpolation",
        choices=("linear", "bspline"),
        default="linear",
        help="image interpolation when resampling (labels always use nearest neighbour)",
    )
    p.add_argument(
        "--compression",
        choices=("lzf", "gzip"),
        default="lzf",
        help="HDF5 compression: lzf (fast, default) or gzip (smaller, slower reads)",
    )
    p.add_argument(
        "--fg-samples",
        type=int,
        default=10000,
        help="voxel coordinates stored per organ for class-balanced patch sampling",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="write nothing: list the cases, and for a dicom_rt card print every structure name in the "
        "RTSTRUCTs -> class / ignored (why) / unmatched, with counts, to fix the card before a long run",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    cards = [DatasetCard.load(path) for path in args.cards]  # all cards validated before any work
    if args.dry_run:
        for card in cards:
            cases = list_cases(card)
            if card.layout == "dicom_rt":
                print(names_table(card, cases), flush=True)
            else:
                print(f"{card.name}: {len(cases)} case(s) in {card.path} (layout {card.layout})", flush=True)
        return 0
    for card in cards:
        build_cache(
            card,
            workers=args.workers,
            skip_bad=args.skip_bad,
            force=args.force,
            fg_samples=args.fg_samples,
            compression=args.compression,
            progress=not args.no_progress,
            interpolation=args.interpolation,
        )
    return 0
