"""Patch loading throughput: the lazy HDF5 patch source vs torchio's Queue over NIfTI.gz.

Both read the same preprocessed CT-sized cases (>= 100x256x256 voxels) and draw class-balanced
96x96x48 patches; both run side by side in one process tree, so the ratio is what matters on a
shared machine. For scale it also times a training step of the baseline U-Net on the same patches.

    .venv/bin/python benchmarks/patch_loading.py [--cases 4] [--patches 200] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torchio as tio
import yaml
from torch.utils.data import DataLoader

from organseg.cache.build import build_cache
from organseg.cache.reader import CacheReader
from organseg.cli.main import main as organseg
from organseg.data.datasets import CacheSource, PatchStream
from organseg.io.card import DatasetCard

PATCH = (96, 96, 48)
SHAPE, SPACING = (
    (384, 384, 110),
    (0.5, 0.5, 1.5),
)  # 192 mm FOV; the head stays >= 256 voxels wide after the body crop


def make_data(root: Path, cases: int, workers: int) -> tuple[DatasetCard, list[Path], list[Path]]:
    raw = root / "raw"
    organseg(
        [
            "phantom",
            "hn",
            "--out",
            str(raw),
            "--cases",
            str(cases),
            "--seed",
            "0",
            "--workers",
            str(workers),
            "--shape",
            *map(str, SHAPE),
            "--spacing",
            *map(str, SPACING),
        ]
    )
    base = yaml.safe_load(Path("data_modules/cards/hn_phantom.yaml").read_text())
    base.update(name="bench", path=str(raw), cache=str(root / "bench.h5"), target_spacing=list(SPACING))
    card = DatasetCard.from_dict(base)
    build_cache(card, workers=workers)
    reader = CacheReader(card.cache)
    # the same preprocessed volumes as NIfTI.gz, for torchio
    images, labels = [], []
    for cid in reader.case_ids:
        image, label = reader.read_case(cid)
        for arr, name, out in ((image, f"{cid}_img.nii.gz", images), (label, f"{cid}_lbl.nii.gz", labels)):
            img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
            img.SetSpacing(reader.spacing(cid))
            sitk.WriteImage(img, str(root / name), useCompression=True)
            out.append(root / name)
    return card, images, labels


def rate(loader, n: int, warmup: int) -> float:
    """Patches/s over ``n`` patches after ``warmup`` batches (worker start-up, the queue's first fill)."""

    def batches():  # across epochs: torchio's Queue ends an epoch after subjects x samples_per_volume patches
        while True:
            yield from loader

    it = batches()
    for _ in range(warmup):
        next(it)
    t0, seen = time.perf_counter(), 0
    for batch in it:
        image = batch["image"]
        seen += (image["data"] if isinstance(image, dict) else image).shape[
            0
        ]  # torchio nests tensors in dicts
        if seen >= n:
            break
    return seen / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=4)
    ap.add_argument("--patches", type=int, default=400)
    ap.add_argument(
        "--tio-patches", type=int, default=192, help="patches timed for torchio (24 volume loads)"
    )
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=2, help="the training batch size, for both loaders")
    ap.add_argument("--keep", help="keep the generated data in this folder")
    args = ap.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="organseg-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        card, images, labels = make_data(root, args.cases, args.workers)
        reader = CacheReader(card.cache)
        shapes = [reader.shape(c) for c in reader.case_ids]
        print(
            f"\ncases: {len(shapes)}, preprocessed shapes (x,y,z): {shapes}; patch {PATCH}; "
            f"DataLoader workers: {args.workers}; batch size {args.batch_size}"
        )

        src = CacheSource(card.name, reader, list(reader.case_ids), np.ones(card.num_classes, bool))
        stream = PatchStream(
            [src], PATCH, batch_size=args.batch_size, patches_per_epoch=10**6, transform=None, seed=0
        )
        lazy = rate(
            DataLoader(
                stream,
                batch_size=args.batch_size,
                num_workers=args.workers,
                multiprocessing_context="spawn" if args.workers else None,
            ),
            args.patches,
            warmup=10,
        )

        subjects = [
            tio.Subject(image=tio.ScalarImage(i), label=tio.LabelMap(lab)) for i, lab in zip(images, labels)
        ]
        probs = {0: 1.0 - 0.67, **{c: 0.67 / (card.num_classes - 1) for c in range(1, card.num_classes)}}
        queue = tio.Queue(
            tio.SubjectsDataset(subjects),
            max_length=64,
            samples_per_volume=8,
            sampler=tio.LabelSampler(PATCH, "label", label_probabilities=probs),
            num_workers=args.workers,
            shuffle_subjects=True,
            shuffle_patches=True,
        )
        # steady state: skip the first fill (max_length patches), then time several refills
        tio_rate = rate(
            tio.SubjectsLoader(queue, batch_size=args.batch_size, num_workers=0), args.tio_patches, warmup=64
        )

        from organseg.networks import build_unet

        net = build_unet(1, card.num_classes, spacing=card.target_spacing)  # the baseline's kernels
        opt = torch.optim.AdamW(net.parameters(), 1e-3)
        x = torch.randn(2, 1, 96, 96, 32)
        y = torch.randint(0, card.num_classes, (2, 96, 96, 32))
        for i in range(4):
            if i == 1:
                t0 = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        step = 3 / (time.perf_counter() - t0)

        print("\n| source | settings | patches/s |")
        print("|---|---|---|")
        print(
            f"| organseg lazy HDF5 (PatchStream) | {args.workers} DataLoader workers, class-balanced, "
            f"no aug | {lazy:.1f} |"
        )
        print(
            f"| torchio Queue over NIfTI.gz | LabelSampler, samples_per_volume=8, max_length=64, "
            f"{args.workers} queue workers | {tio_rate:.1f} |"
        )
        print(f"\nratio lazy / torchio: {lazy / tio_rate:.1f}x")
        print(
            "for scale: baseline U-Net training step (batch 2 x 96x96x32, CPU, "
            f"{torch.get_num_threads()} threads): "
            f"{step:.2f} steps/s = {2 * step:.1f} patches/s consumed"
        )
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "disabled")
    sys.exit(main())
