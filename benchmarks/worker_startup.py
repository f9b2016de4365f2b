"""DataLoader worker start-up: seconds from ``iter(loader)`` to the first batch, ``spawn`` vs the
preloaded ``forkserver`` of ``organseg.data.workers.worker_context`` (issue 11: 11-37 s per fit with spawn).

Two loaders in a row per start method, as a fit makes them (training, then validation): spawn pays
the imports (torch, torchio, SimpleITK, h5py) in every worker of every loader; the forkserver once per
process, in its server. Repeats alternate the methods, so a busy machine slows both alike.

    .venv/bin/python benchmarks/worker_startup.py [--repeats 2] [--workers 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from functools import partial
from pathlib import Path

import yaml
from torch.utils.data import DataLoader

from organseg.cache.build import build_cache
from organseg.cli.main import main as organseg
from organseg.data.datamodule import CTDataModule
from organseg.data.workers import init_worker, worker_context

ROOT = Path(__file__).resolve().parents[1]
CARD = "data_modules/cards/hn_phantom_demo.yaml"


def prepare(work: Path) -> Path:
    """Two phantom cases and their cache (the demo's card), reused when present."""
    raw = work / "raw"
    if len(list((raw / "imagesTr").glob("*_0000.nii.gz"))) != 2:
        organseg(["phantom", "hn", "--out", str(raw), "--cases", "2", "--seed", "0", "--quiet"])
    spec = yaml.safe_load((ROOT / CARD).read_text())
    spec.update(
        name="bench_workers", path=str(raw), cache=str(work / "cache.h5"), split={"val": 1, "test": 0}
    )
    card = work / "card.yaml"
    card.write_text(yaml.safe_dump(spec))
    from organseg.io.card import DatasetCard

    build_cache(DatasetCard.load(card), workers=1, progress=False)
    return card


def first_batch_s(card: Path, workers: int, context) -> float:
    dm = CTDataModule(
        [str(card)], patch_size=(48, 48, 16), batch_size=2, num_workers=workers, preprocess=False
    )
    dm.setup("fit")
    loader = DataLoader(
        dm.train_dataloader().dataset,
        batch_size=2,
        num_workers=workers,
        worker_init_fn=partial(init_worker, threads=1),
        multiprocessing_context=context,
    )
    t0 = time.perf_counter()
    next(iter(loader))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", default="data/bench_workers")
    args = ap.parse_args()
    card = prepare(Path(args.work))
    rows = []
    for rep in range(args.repeats):
        # the forkserver lives as long as this process, as in a fit: only its first loader pays its start
        for name, context in (
            ("spawn", multiprocessing.get_context("spawn")),
            ("forkserver", worker_context()),
        ):
            first, second = (first_batch_s(card, args.workers, context) for _ in range(2))
            rows.append((rep, name, first, second, os.getloadavg()[0]))
            print(
                f"repeat {rep} {name:10s} loader 1: {first:5.1f} s  loader 2: {second:5.1f} s  "
                f"load {rows[-1][-1]:.1f}",
                flush=True,
            )
    for name in ("spawn", "forkserver"):
        mine = [r for r in rows if r[1] == name]
        print(
            f"{name:10s} loader 1 {min(r[2] for r in mine):.1f}-{max(r[2] for r in mine):.1f} s, "
            f"loader 2 {min(r[3] for r in mine):.1f}-{max(r[3] for r in mine):.1f} s ({args.workers} workers)"
        )


if __name__ == "__main__":
    main()
