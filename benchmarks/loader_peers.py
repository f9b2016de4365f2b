"""Training-loader throughput, organseg vs nnU-Net v2, side by side (issue 11).

Same phantom cases (one organseg HDF5 cache, exported once to nnU-Net v2's preprocessed Blosc2 layout),
batch 2, 2 worker processes each, 1 thread per library in every worker on both sides (``OMP_NUM_THREADS``
& co. = 1, torch 1 thread; organseg's workers via ``init_worker``), each with its default augmentation:

- organseg: ``PatchStream`` in a ``DataLoader`` as ``CTDataModule`` builds it (persistent workers, its
  worker context), the augmentation of ``data_modules/hn_phantom.yaml`` (``AugmentationConfig``
  defaults + that file's keys: composed spatial transform, one ``grid_sample`` per sample);
- organseg (torchio): the same with ``spatial: torchio`` (one SimpleITK resampling per channel over
  patch + margin), the loader before issue 11, for scale;
- nnU-Net v2: ``nnUNetDataLoader`` + ``nnUNetTrainer.get_training_transforms`` in
  ``NonDetMultiThreadedAugmenter``, as ``nnUNetTrainer.get_dataloaders`` builds them
  (``benchmarks/loader_peers_nnunet.py``).

Patch sizes 64x64x32, 96x96x32, 192x192x48 (x, y, z); ``--repeats`` (3) rounds, interleaved (every
loader at every size in each round, the order alternating between rounds) so a busy machine slows all
alike; each figure is patches/s over ``--seconds`` after ``--warmup`` batches (worker start-up and the
prefetch queues' first fill), with the 1-minute load average read as it ends.

nnU-Net v2 is never a project dependency: it is pip-installed into its own venv
(``$XDG_CACHE_HOME/organseg-bench/nnunetv2-venv``, or ``--nnunet-venv``), with ``constraints-cpu.txt``
so the CPU torch wheel is used where it lies on disk. Where that fails the benchmark says why in one
line and reports organseg's figures only (exit 0).

    .venv/bin/python benchmarks/loader_peers.py [--cases 4] [--repeats 3] [--seconds 10] [--out-stem ...]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader

from organseg.cache.build import build_cache
from organseg.cache.reader import CacheReader
from organseg.cli.main import main as organseg
from organseg.data.augmentation import AugmentationConfig
from organseg.data.datasets import CacheSource, PatchStream
from organseg.data.workers import THREAD_ENV_VARS, init_worker, worker_context
from organseg.io.card import DatasetCard

ROOT = Path(__file__).resolve().parents[1]
PATCHES = ((64, 64, 32), (96, 96, 32), (192, 192, 48))
SHAPE, SPACING = (
    (256, 256, 80),
    (1.0, 1.0, 3.0),
)  # 256 x 256 x 240 mm: the 192x192x48 patch fits after the body crop
NNUNET_SCRIPT = Path(__file__).with_name("loader_peers_nnunet.py")


def make_cache(root: Path, cases: int) -> DatasetCard:
    raw = root / "raw"
    organseg(
        ["phantom", "hn", "--out", str(raw), "--cases", str(cases), "--seed", "0", "--quiet"]
        + ["--shape", *map(str, SHAPE), "--spacing", *map(str, SPACING)]
    )
    base = yaml.safe_load((ROOT / "data_modules/cards/hn_phantom.yaml").read_text())
    base.update(name="peers", path=str(raw), cache=str(root / "peers.h5"), target_spacing=list(SPACING))
    card = DatasetCard.from_dict(base)
    build_cache(card, workers=2)
    return card


def export_cases(card: DatasetCard, out: Path) -> None:
    """organseg's cached cases as .npz for the nnU-Net side: the same voxels, normalised to [-1, 1]."""
    out.mkdir(parents=True, exist_ok=True)
    reader = CacheReader(card.cache)
    for cid in reader.case_ids:
        image, label = reader.read_case(cid)
        np.savez(out / f"{cid}.npz", image=image.astype(np.float32), label=label, spacing=reader.spacing(cid))


def default_augmentation(**overrides) -> AugmentationConfig:
    """The training augmentation of data_modules/hn_phantom.yaml (the defaults plus that file's keys)."""
    cfg = yaml.safe_load((ROOT / "data_modules/hn_phantom.yaml").read_text())
    return AugmentationConfig(**{**cfg["data"]["init_args"]["augmentation"], **overrides})


def organseg_rate(
    card: DatasetCard, patch, aug, batch: int, workers: int, warmup: int, seconds: float
) -> float:
    reader = CacheReader(card.cache)
    src = CacheSource(card.name, reader, list(reader.case_ids), np.ones(card.num_classes, bool))
    stream = PatchStream(
        [src],
        patch,
        batch_size=batch,
        patches_per_epoch=10**6,
        transform=aug.build(),
        margin=aug.margin(patch),
        seed=int(time.time()),
    )
    loader = DataLoader(
        stream,
        batch_size=batch,
        num_workers=workers,
        persistent_workers=True,
        worker_init_fn=partial(init_worker, threads=1),
        multiprocessing_context=worker_context(),  # as CTDataModule starts them
    )
    it = iter(loader)
    for _ in range(warmup):
        b = next(it)
    assert tuple(b["image"].shape[2:]) == tuple(patch)
    t0, seen = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        seen += next(it)["image"].shape[0]
    rate = seen / (time.perf_counter() - t0)
    del it, loader
    return rate


def nnunet_venv(path: Path) -> tuple[Path | None, str]:
    """(python of a venv with nnunetv2, '') or (None, why not)."""
    py = path / "bin" / "python"
    if py.exists() and subprocess.run([py, "-c", "import nnunetv2"], capture_output=True).returncode == 0:
        return py, ""
    print(f"installing nnunetv2 into the throwaway venv {path} (once; a few minutes) ...", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(path)], check=True, capture_output=True)
        pip = subprocess.run(
            [py, "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints-cpu.txt"), "nnunetv2"],
            capture_output=True,
            text=True,
        )
    except (OSError, subprocess.CalledProcessError) as e:
        return None, f"could not create the venv {path}: {e}"
    if pip.returncode != 0:
        last = (pip.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"pip could not install nnunetv2 into {path} (exit {pip.returncode}): {last}"
    return py, ""


def nnunet_rate(py: Path, cases: Path, prep: Path, patch, card, batch, workers, warmup, seconds) -> dict:
    env = {**os.environ, **{v: "1" for v in THREAD_ENV_VARS}, "nnUNet_n_proc_DA": str(workers)}
    env.pop("PYTHONPATH", None)
    cmd = [py, NNUNET_SCRIPT, "--cases", cases, "--prep", prep, "--patch", *map(str, patch)]
    cmd += ["--spacing", *map(str, SPACING), "--classes", str(card.num_classes), "--batch", str(batch)]
    cmd += ["--processes", str(workers), "--warmup", str(warmup), "--seconds", str(seconds)]
    out = subprocess.run(list(map(str, cmd)), env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"nnU-Net side failed (exit {out.returncode}): {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt(values) -> str:
    return "–" if not values else f"{statistics.median(values):.1f} ({', '.join(f'{v:.1f}' for v in values)})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10.0, help="timed seconds per figure")
    ap.add_argument("--warmup", type=int, default=10, help="batches before timing")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-torchio", action="store_true", help="skip the spatial: torchio column")
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    ap.add_argument("--nnunet-venv", type=Path, default=cache_home / "organseg-bench" / "nnunetv2-venv")
    ap.add_argument("--out-stem", default=f"benchmarks/results/loader_peers_cpu_{dt.date.today()}")
    ap.add_argument("--keep", help="keep the generated data in this folder")
    args = ap.parse_args()
    for var in THREAD_ENV_VARS:  # what this process's children (and spawned workers) inherit
        os.environ[var] = "1"
    root = Path(args.keep or tempfile.mkdtemp(prefix="organseg-peers-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        py, why = nnunet_venv(args.nnunet_venv)
        if py is None:
            print(f"nnU-Net v2 side skipped: {why}")
        card = make_cache(root, args.cases)
        export_cases(card, root / "export")
        reader = CacheReader(card.cache)
        shapes = [reader.shape(c) for c in reader.case_ids]
        print(f"cases: {len(shapes)}, cached shapes (x, y, z): {shapes}, spacing {SPACING} mm", flush=True)
        loaders = {"organseg": default_augmentation()}
        if not args.no_torchio:
            loaders["organseg (torchio spatial)"] = default_augmentation(spatial="torchio")
        names = [*loaders, *(["nnU-Net v2"] if py else [])]
        runs: list[dict] = []
        nnunet_info: dict = {}
        for r in range(args.repeats):
            for patch in PATCHES:
                order = names if r % 2 == 0 else names[::-1]
                for name in order:
                    if name == "nnU-Net v2":
                        prep = root / "nnunet" / "x".join(map(str, patch))
                        res = nnunet_rate(
                            py, root / "export", prep, patch, card, args.batch_size, args.workers,
                            args.warmup, args.seconds,
                        )  # fmt: skip
                        rate = res.pop("patches_per_s")
                        nnunet_info["x".join(map(str, patch))] = res
                    else:
                        rate = organseg_rate(
                            card,
                            patch,
                            loaders[name],
                            args.batch_size,
                            args.workers,
                            args.warmup,
                            args.seconds,
                        )
                    load = os.getloadavg()[0]
                    runs.append(
                        {
                            "repeat": r,
                            "patch": list(patch),
                            "loader": name,
                            "patches_per_s": rate,
                            "load1": load,
                        }
                    )
                    print(
                        f"round {r + 1} {'x'.join(map(str, patch))} {name}: {rate:.2f} patches/s "
                        f"(load {load:.2f})",
                        flush=True,
                    )
        lines = [
            f"# Training loader, organseg vs nnU-Net v2 (CPU, {dt.date.today()})",
            "",
            f"`.venv/bin/python benchmarks/loader_peers.py` ({' '.join(sys.argv[1:]) or 'defaults'}); "
            f"{len(shapes)} phantom cases, cached {shapes} (x, y, z) at {SPACING} mm; "
            f"batch {args.batch_size}, {args.workers} worker processes per loader, 1 thread per library in "
            "every worker on both sides (OMP/MKL/OpenBLAS/ITK env = 1, torch 1 thread, Blosc2 1 thread); "
            f"{args.repeats} interleaved rounds, "
            f"each figure {args.seconds:g} s after {args.warmup} warm-up batches; {os.cpu_count()} CPUs.",
            "",
            "patches/s: median (each round); load: the 1-min load average as each figure of the row ended "
            "(min-max).",
            "",
            "| patch (x, y, z) | " + " | ".join(names) + " | organseg / nnU-Net | load |",
            "|---|" + "---|" * len(names) + "---|---|",
        ]
        summary = {}
        for patch in PATCHES:
            key = "x".join(map(str, patch))
            row = {
                n: [x["patches_per_s"] for x in runs if x["loader"] == n and x["patch"] == list(patch)]
                for n in names
            }
            loads = [x["load1"] for x in runs if x["patch"] == list(patch)]
            ratio = (
                statistics.median(row["organseg"]) / statistics.median(row["nnU-Net v2"])
                if "nnU-Net v2" in row
                else None
            )
            summary[key] = {n: statistics.median(v) for n, v in row.items()} | {"ratio": ratio}
            lines.append(
                f"| {key} | " + " | ".join(fmt(row[n]) for n in names)
                + f" | {'–' if ratio is None else f'{ratio:.2f}x'} | {min(loads):.1f}-{max(loads):.1f} |"
            )  # fmt: skip
        if py is None:
            lines += ["", f"nnU-Net v2 side skipped: {why}"]
        else:
            info = next(iter(nnunet_info.values()), {})
            lines += [
                "",
                f"nnU-Net v2 {info.get('nnunetv2', '?')}: per patch size, dummy 2D augmentation / initial "
                "patch (z, y, x) / deep supervision outputs: "
                + "; ".join(
                    f"{k}: {v['dummy_2d']} / {v['initial_patch']} / {v['ds_scales']}"
                    for k, v in nnunet_info.items()
                ),
            ]  # fmt: skip
        text = "\n".join(lines) + "\n"
        print("\n" + text)
        stem = ROOT / args.out_stem
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".md").write_text(text)
        stem.with_suffix(".json").write_text(
            json.dumps(
                {
                    "argv": sys.argv[1:],
                    "shapes": shapes,
                    "runs": runs,
                    "summary": summary,
                    "nnunet": nnunet_info,
                    "nnunet_skipped": why or None,
                },
                indent=1,
            )  # fmt: skip
        )
        print(f"written: {stem}.md, {stem}.json")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "disabled")
    torch.set_num_threads(1)
    sys.exit(main())
