"""nnU-Net v2's training loader, timed: run by ``loader_peers.py`` inside its throwaway venv (never .venv).

It imports nothing from organseg. ``convert`` writes organseg's exported cases (``<case>.npz``: ``image``
float32 (x, y, z) in [-1, 1], ``label`` uint8, ``spacing`` (x, y, z) mm) into nnU-Net v2's preprocessed
layout (Blosc2 ``.b2nd`` + ``.pkl`` with ``class_locations``, as ``DefaultPreprocessor`` writes them, chunks
for the patch size); ``time`` builds the loader the way ``nnUNetTrainer.get_dataloaders`` does (the 3D
``nnUNetDataLoader`` with the trainer's initial patch size, foreground oversampling 0.33 and
``get_training_transforms`` with its default parameters, deep supervision scales from nnU-Net's own
pooling plan for that patch and spacing) inside ``NonDetMultiThreadedAugmenter`` with N processes, and
prints one JSON line with patches/s.

Threads: the caller sets ``OMP_NUM_THREADS`` etc. to 1 before this starts, and this sets torch to 1
thread before the worker processes fork, the same per-worker count as organseg's loader workers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from nnunetv2.configuration import ANISO_THRESHOLD
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.label_handling.label_handling import LabelManager


def convert(cases: Path, out: Path, patch_zyx: tuple[int, ...]) -> None:

    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(cases.glob("*.npz")):
        z = np.load(f)
        data = np.ascontiguousarray(z["image"].transpose(2, 1, 0)[None], dtype=np.float32)  # (c, z, y, x)
        seg = np.ascontiguousarray(z["label"].transpose(2, 1, 0)[None]).astype(np.int16)
        classes = [int(c) for c in np.unique(seg) if c > 0]
        props = {
            "spacing": [float(s) for s in z["spacing"][::-1]],
            "shape_before_cropping": data.shape[1:],
            "bbox_used_for_cropping": [[0, s] for s in data.shape[1:]],
            "shape_after_cropping_and_before_resampling": data.shape[1:],
            "class_locations": DefaultPreprocessor._sample_foreground_locations(seg, classes, seed=1234),
        }
        bd, cd = comp_blosc2_params(data.shape, patch_zyx, data.itemsize)
        bs, cs = comp_blosc2_params(seg.shape, patch_zyx, seg.itemsize)
        nnUNetDatasetBlosc2.save_case(
            data, seg, props, str(out / f.stem), chunks=cd, blocks=bd, chunks_seg=cs, blocks_seg=bs
        )


def build_loader(prep: Path, patch_zyx, spacing_zyx, num_classes: int, batch: int, processes: int):
    """What ``nnUNetTrainer.get_dataloaders`` builds for the training split (its code, its defaults)."""

    patch = np.array(patch_zyx)
    # configure_rotation_dummyDA_mirroring_and_inital_patch_size, 3D branch
    dummy_2d = (max(patch) / patch[0]) > ANISO_THRESHOLD
    rot = (-np.pi, np.pi) if dummy_2d else (-30.0 / 360 * 2 * np.pi, 30.0 / 360 * 2 * np.pi)
    mirror_axes = (0, 1, 2)
    initial = get_patch_size(patch, rot, rot, rot, (0.85, 1.25))
    if dummy_2d:
        initial[0] = patch[0]
    # _get_deep_supervision_scales from the plan nnU-Net's planner makes for this patch and spacing
    _, pools, _, _, _ = get_pool_and_conv_props(list(spacing_zyx), list(patch), 4, 999999)
    ds_scales = list(list(i) for i in 1 / np.cumprod(np.vstack(pools), axis=0))[:-1]
    labels = LabelManager({"background": 0, **{f"c{i}": i for i in range(1, num_classes)}}, None)
    transforms = nnUNetTrainer.get_training_transforms(
        patch,
        rot,
        ds_scales,
        mirror_axes,
        dummy_2d,
        use_mask_for_norm=[False],
        is_cascaded=False,
        foreground_labels=labels.foreground_labels,
        regions=None,
        ignore_label=None,
    )
    dl = nnUNetDataLoader(
        nnUNetDatasetBlosc2(str(prep)),
        batch,
        initial,
        patch,
        labels,
        oversample_foreground_percent=0.33,
        sampling_probabilities=None,
        pad_sides=None,
        transforms=transforms,
        probabilistic_oversampling=False,
    )
    return NonDetMultiThreadedAugmenter(
        data_loader=dl,
        transform=None,
        num_processes=processes,
        num_cached=max(6, processes // 2),
        seeds=None,
        pin_memory=False,
        wait_time=0.002,
    ), {"dummy_2d": bool(dummy_2d), "initial_patch": [int(i) for i in initial], "ds_scales": len(ds_scales)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=Path, required=True)
    ap.add_argument("--prep", type=Path, required=True)
    ap.add_argument("--patch", type=int, nargs=3, required=True, help="x y z (organseg order)")
    ap.add_argument("--spacing", type=float, nargs=3, required=True, help="x y z mm")
    ap.add_argument("--classes", type=int, required=True)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=10, help="batches before timing (start-up, cache fill)")
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    patch_zyx = tuple(args.patch[::-1])
    if not any(args.prep.glob("*.b2nd")):
        convert(args.cases, args.prep, patch_zyx)
    gen, info = build_loader(
        args.prep, patch_zyx, args.spacing[::-1], args.classes, args.batch, args.processes
    )
    for _ in range(args.warmup):
        batch = next(gen)
    assert tuple(batch["data"].shape[2:]) == patch_zyx, batch["data"].shape
    t0, seen = time.perf_counter(), 0
    while time.perf_counter() - t0 < args.seconds:
        seen += next(gen)["data"].shape[0]
    rate = seen / (time.perf_counter() - t0)
    gen._finish()
    print(json.dumps({"patches_per_s": rate, "patches": seen, "nnunetv2": version("nnunetv2"), **info}))
    sys.stdout.flush()
    os._exit(0)  # the augmenter's processes and queues can hang interpreter shutdown


if __name__ == "__main__":
    sys.exit(main())
