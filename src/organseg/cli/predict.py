"""``organseg predict --ckpt X --input <files or folders> --out DIR``: label maps in each input's ORIGINAL
geometry (same size, spacing, origin and direction) as NIfTI, plus a DICOM RTSTRUCT for a DICOM CT series.

Inputs: NIfTI/NRRD/MHA files, folders of them, a folder holding one DICOM CT series, or a folder whose
sub-folders each hold one series (or are PDDCA case folders, ``<case>/img.nrrd``: named after the case
folder, since every PDDCA image has the same file name). Each input is preprocessed exactly as the
checkpoint's dataset card preprocessed its training cache (``organseg.cache.build.preprocess_volume``:
resample to the target spacing, crop to the body, clip and scale the HU window), segmented with the
model's whole-case ``predict_case`` (sliding window; the locate-zoom-paste pipeline for FocusNetV2),
then the crop and the resampling are undone (``organseg.io.geometry.restore_original_geometry``).

Writes ``<out>/<case>_seg.nii.gz`` (uint8 class indices), ``<out>/labels.json`` (class name -> value)
and, for a DICOM series, ``<out>/<case>_rtstruct.dcm`` (one ROI per organ present, via rt-utils).
Existing outputs are never replaced without ``--overwrite``. Every input is read and validated before
anything is written, and the outputs are moved into ``--out`` only when every case is done: a failed
run leaves ``--out`` as it was (and removes it if it created it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import track

from organseg.cache.build import inspect_cache
from organseg.errors import InputError, OutputError
from organseg.io.atomic import make_dirs
from organseg.io.dicom import read_headers
from organseg.io.rtstruct import write_rtstruct
from organseg.io.writers import write_image, write_json

if TYPE_CHECKING:  # imports torch: loaded by run(), not by `organseg --help`
    from organseg.inference.raw_images import PredictInput

SEG_SUFFIX = "_seg.nii.gz"
# organseg.inference.precision.PRECISIONS written out: importing it loads torch (`organseg --help` stays fast)
PRECISIONS = ("fp32", "bf16", "fp16")
RTSTRUCT_SUFFIX = "_rtstruct.dcm"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict",
        help="label maps (NIfTI + DICOM RTSTRUCT) in the inputs' original geometry",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--ckpt", required=True, help="checkpoint written by `organseg fit` (carries its dataset card)"
    )
    p.add_argument(
        "--input",
        required=True,
        nargs="+",
        metavar="PATH",
        help="NIfTI/NRRD/MHA files, folders of them, or DICOM series folders",
    )
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--device", default="cpu", help="torch device for inference, e.g. cuda:0 (default cpu)")
    p.add_argument(
        "--sw-overlap",
        type=float,
        default=None,
        help="sliding-window overlap in [0, 1) (default: the checkpoint's, 0.5 unless trained otherwise); "
        "0.25 runs ~3x fewer windows on a CT",
    )
    p.add_argument(
        "--sw-batch-size",
        type=int,
        default=None,
        help="windows per network call (default: the checkpoint's, 2); more on a GPU with memory to spare",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="autocast of the network calls: fp32 (default), bf16 or fp16 (GPU; bf16 on a CPU only with "
        "native bf16 instructions, otherwise much slower)",
    )
    p.add_argument(
        "--rtstruct",
        choices=("auto", "always", "never"),
        default="auto",
        help="DICOM RTSTRUCT: auto = for DICOM inputs; always = every input must be a DICOM series; never",
    )
    p.add_argument(
        "--data",
        default=None,
        help="dataset card whose preprocessing to use (default: the first card in the checkpoint)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(func=run)


# ---------------------------------------------------------------------------------- the command
def _check_outputs(items: list[PredictInput], out: Path, rtstruct: str, overwrite: bool) -> None:
    for item in items:
        if rtstruct == "always" and item.kind != "dicom":
            raise InputError(f"--rtstruct always: input {item.path} is not a DICOM series")
        targets = [out / f"{item.case}{SEG_SUFFIX}"]
        if item.kind == "dicom" and rtstruct != "never":
            targets.append(out / f"{item.case}{RTSTRUCT_SUFFIX}")
        for t in targets:
            if t.exists() and not overwrite:
                raise OutputError(f"{t}: output exists (use --overwrite to replace it)")


def _labels_json(card, ckpt: str, out: Path, overwrite: bool) -> dict | None:
    """The sidecar to write, or None when ``out`` already has one with these labels (kept as it is)."""
    labels = {name: i for i, name in enumerate(card.classes)}
    path = out / "labels.json"
    if path.exists() and not overwrite:
        try:
            old = json.loads(path.read_text()).get("labels")
        except (ValueError, AttributeError, OSError):
            old = None
        if old != labels:
            raise OutputError(f"{path}: exists with other labels (use --overwrite or another --out)")
        return None
    return {"labels": labels, "dataset": card.name, "checkpoint": str(Path(ckpt).resolve())}


def _interpolation(card) -> str:
    """The image interpolation the card's training cache was built with (it is not part of the card)."""
    problem, attrs = inspect_cache(Path(card.cache).expanduser())
    return str(attrs.get("interpolation", "linear")) if problem is None else "linear"


def _staging_folder(out: Path) -> Path:
    try:
        return Path(tempfile.mkdtemp(prefix=".organseg-predict-", dir=out))
    except OSError as exc:
        raise OutputError.from_os_error(exc) from exc


def _predict_all(items, held, model, card, extra, interpolation, args, stage: Path, out: Path) -> list[str]:
    """Segment every input into ``stage`` (named as they will be in ``out``); the lines to print.
    ``held``: a list holding ``(item, (image, files))`` of the first input, already read; it is emptied, so
    that image is freed once predict_image has resampled it (the caller keeps no other reference)."""
    from organseg.inference.raw_images import predict_image, read_input  # noqa: PLC0415 - loads torch
    from organseg.runtime.allocator import release_freed_memory  # noqa: PLC0415

    written = []
    for item in track(items, description=f"predicting {len(items)} case(s)", console=Console(stderr=True)):
        if held and held[0][0] is item:
            (image, files) = held.pop()[1]
        else:
            image, files = read_input(item)
        handed_over = [image]  # predict_image empties it once resampled: the image is freed then
        del image
        label = predict_image(
            model,
            handed_over,
            card,
            interpolation,
            args.device,
            args.precision,
            after_preprocess=release_freed_memory,  # the retained heap would keep preprocessing's scratch
        )
        write_image(label, stage / f"{item.case}{SEG_SUFFIX}")
        line = f"{item.case}: {out / f'{item.case}{SEG_SUFFIX}'}"
        if item.kind == "dicom" and args.rtstruct != "never":
            rs = f"{item.case}{RTSTRUCT_SUFFIX}"
            rois = write_rtstruct(
                label,
                card.classes,
                read_headers(files),
                stage / rs,
                description=f"organseg {extra.get('module', '').rsplit('.', 1)[-1]} {Path(args.ckpt).name}",
            )
            line += f", {out / rs} ({len(rois)} ROI(s))"
        written.append(line)
    return written


def run(args) -> int:
    # lazy: torch and the models are imported when the command runs, not by `organseg --help`
    from organseg.inference.raw_images import (  # noqa: PLC0415
        collect_inputs,
        read_input,
        set_sliding_window,
    )
    from organseg.methods.checkpoints import load_segmenter  # noqa: PLC0415
    from organseg.runtime.allocator import retain_freed_memory  # noqa: PLC0415

    retain_freed_memory()  # ~20 % less CPU per window (runtime/allocator.py); the command exits when done
    console = Console()
    items = collect_inputs(args.input)  # cheap checks first: nothing is loaded or written on bad input
    out = Path(args.out)
    _check_outputs(items, out, args.rtstruct, args.overwrite)
    model, card, extra = load_segmenter(args.ckpt, args.device, args.data)
    used = extra.get("module", type(model).__name__)
    console.print(
        f"predict: model {used} (the class recorded in {args.ckpt})", highlight=False, soft_wrap=True
    )
    set_sliding_window(model, args.sw_overlap, args.sw_batch_size)
    interpolation = _interpolation(card)
    sidecar = _labels_json(card, args.ckpt, out, args.overwrite)
    # every input is read and validated before anything is written (a 2D/4D/NaN/text input among good
    # ones stops the command with nothing in --out); read last to first, so the first case stays loaded
    held: list[tuple] = []  # [(item, (image, files))]: handed over to _predict_all, which empties it
    for item in reversed(items):
        held.clear()  # one image in memory at a time
        held.append((item, read_input(item)))
    created = not out.exists()
    make_dirs(out)
    # outputs go to a staging folder inside --out and are moved into place only once every case is done:
    # a run that fails part-way (a bug, no memory, Ctrl-C) leaves --out as it found it
    stage = _staging_folder(out)
    try:
        written = _predict_all(items, held, model, card, extra, interpolation, args, stage, out)
        if sidecar is not None:
            write_json(sidecar, stage / "labels.json")
        for path in sorted(stage.iterdir()):
            os.replace(path, out / path.name)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only when empty: a folder this run created
        raise
    shutil.rmtree(stage, ignore_errors=True)
    for line in written:
        console.print(line, highlight=False, soft_wrap=True)
    console.print(
        f"predict: {len(items)} case(s) -> {out} (label names in {out / 'labels.json'})",
        highlight=False,
        soft_wrap=True,
    )
    return 0
