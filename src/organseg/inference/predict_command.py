"""``organseg predict --ckpt X --input <files or folders> --out DIR``: label maps in each input's ORIGINAL
geometry (same size, spacing, origin and direction) as NIfTI, plus a DICOM RTSTRUCT for a DICOM CT series.

Inputs: NIfTI/NRRD/MHA files, folders of them, a folder holding one DICOM CT series, or a folder whose
sub-folders each hold one series. Each input is preprocessed exactly as the checkpoint's dataset card
preprocessed its training cache (``organseg.cache.build.preprocess_volume``: resample to the target
spacing, crop to the body, clip and scale the HU window), segmented with the model's whole-case
``predict_case`` (sliding window; the locate-zoom-paste pipeline for FocusNetV2), then the crop and the
resampling are undone (``organseg.io.geometry.restore_original_geometry``).

Writes ``<out>/<case>_seg.nii.gz`` (uint8 class indices), ``<out>/labels.json`` (class name -> value)
and, for a DICOM series, ``<out>/<case>_rtstruct.dcm`` (one ROI per organ present, via rt-utils).
Existing outputs are never replaced without ``--overwrite``; every file is written atomically.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SEG_SUFFIX = "_seg.nii.gz"
RTSTRUCT_SUFFIX = "_rtstruct.dcm"
_CHANNEL = re.compile(r"_\d{4}$")   # nnU-Net's channel suffix: imagesTs/<case>_0000.nii.gz -> <case>


def register(subparsers) -> None:
    p = subparsers.add_parser("predict", help="label maps (NIfTI + DICOM RTSTRUCT) in the inputs' original geometry",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint written by `organseg fit` (carries its dataset card)")
    p.add_argument("--input", required=True, nargs="+", metavar="PATH",
                   help="NIfTI/NRRD/MHA files, folders of them, or DICOM series folders")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--device", default="cpu", help="torch device for inference, e.g. cuda:0 (default cpu)")
    p.add_argument("--rtstruct", choices=("auto", "always", "never"), default="auto",
                   help="DICOM RTSTRUCT: auto = for DICOM inputs; always = every input must be a DICOM series; "
                        "never")
    p.add_argument("--data", default=None,
                   help="dataset card whose preprocessing to use (default: the first card in the checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(func=run)


# ---------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class PredictInput:
    """One case to segment: an image file, or a folder holding one DICOM series (``kind`` "dicom")."""

    case: str
    kind: str   # "image" | "dicom"
    path: Path


def case_name(path: Path) -> str:
    """``case_0000.nii.gz`` -> ``case`` (file ending and nnU-Net channel suffix dropped); a folder's name."""
    from organseg.io.layouts import IMAGE_ENDINGS

    name = path.name
    for ending in IMAGE_ENDINGS:
        if name.lower().endswith(ending):
            name = name[: -len(ending)]
            break
    return _CHANNEL.sub("", name) or name


def _image_files(folder: Path) -> list[Path]:
    from organseg.io.layouts import IMAGE_ENDINGS

    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.name.lower().endswith(IMAGE_ENDINGS))


def collect_inputs(paths: list[str]) -> list[PredictInput]:
    """The cases named by ``--input`` (one-line ValueError for a missing path, an unsupported file, a
    folder with no images, or a folder with several DICOM series)."""
    from pydicom.misc import is_dicom

    from organseg.io.dicom import DicomError, series_ids
    from organseg.io.layouts import IMAGE_ENDINGS

    found: list[PredictInput] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise ValueError(f"input {path}: no such file or folder")
        if path.is_file():
            if path.name.lower().endswith(IMAGE_ENDINGS):
                found.append(PredictInput(case_name(path), "image", path))
            elif path.suffix.lower() in (".dcm", ".ima") or is_dicom(str(path)):
                raise ValueError(f"input {path}: a single DICOM file; pass the folder of its series")
            else:
                raise ValueError(f"input {path}: not a NIfTI/NRRD/MHA image ({', '.join(IMAGE_ENDINGS)})")
            continue
        images = _image_files(path)
        if images:
            found += [PredictInput(case_name(p), "image", p) for p in images]
            continue
        ids = series_ids(path)
        if len(ids) == 1:
            found.append(PredictInput(path.name, "dicom", path))
            continue
        if len(ids) > 1:
            raise DicomError(f"{path}: {len(ids)} DICOM series in one folder ({', '.join(ids)}); "
                             f"put each series in its own folder")
        subs = [d for d in sorted(path.iterdir()) if d.is_dir() and not d.name.startswith(".")]
        series_dirs = [(d, series_ids(d)) for d in subs]
        series_dirs = [(d, s) for d, s in series_dirs if s]
        if not series_dirs:
            raise ValueError(f"input {path}: no readable images in this folder (NIfTI/NRRD/MHA files or one "
                             f"DICOM series per folder)")
        for d, s in series_dirs:
            if len(s) > 1:
                raise DicomError(f"{d}: {len(s)} DICOM series in one folder ({', '.join(s)}); "
                                 f"put each series in its own folder")
            found.append(PredictInput(d.name, "dicom", d))
    seen: dict[str, Path] = {}
    for item in found:
        if item.case in seen:
            raise ValueError(f"input {item.path}: case name {item.case!r} also comes from {seen[item.case]}; "
                             f"outputs would collide")
        seen[item.case] = item.path
    return found


def read_input(item: PredictInput) -> tuple[Any, list[Path]]:
    """``(float32 HU SimpleITK image, DICOM files in slice order or [])`` of one input."""
    import SimpleITK as sitk

    from organseg.io.dicom import read_dicom_series
    from organseg.io.layouts import CaseError, _read

    if item.kind == "dicom":
        return read_dicom_series(item.path)
    image = sitk.Cast(_read(item.path, item.case, "image"), sitk.sitkFloat32)   # validated, one-line errors
    view = sitk.GetArrayViewFromImage(image)
    if not np.all(np.isfinite(view)):
        raise CaseError(f"{item.case}: image has non-finite voxels (NaN/inf) ({item.path})", item.case)
    return image, []


# ---------------------------------------------------------------------------------- one case
def normalise(hu, hu_window) -> np.ndarray:
    """HU -> [-1, 1] with the same float32 operations as ``CacheReader.normalise`` (training's input)."""
    lo, hi = np.float32(hu_window[0]), np.float32(hu_window[1])
    out = np.clip(np.asarray(hu, dtype=np.float32), lo, hi)
    out -= lo
    out *= np.float32(2.0) / (hi - lo)
    out -= np.float32(1.0)
    return out


def preprocess_for_model(image, card, interpolation: str = "linear") -> tuple[np.ndarray, dict[str, Any]]:
    """``(normalised float32 (x, y, z) on the cache's grid, grid attrs to undo it)`` for one image."""
    from organseg.cache.build import preprocess_volume

    hu, _, attrs = preprocess_volume(card, image, None, interpolation)
    return normalise(hu, card.hu_window), attrs


def predict_image(model, image, card, interpolation: str = "linear", device: str = "cpu"):
    """A uint8 label map with exactly ``image``'s size, spacing, origin and direction."""
    import SimpleITK as sitk
    import torch

    from organseg.io.geometry import restore_original_geometry

    x, attrs = preprocess_for_model(image, card, interpolation)
    with torch.inference_mode():
        labels = model.predict_case(torch.from_numpy(x)[None, None].to(device))
    labels = labels[0].cpu().numpy().astype(np.uint8)
    out = sitk.Cast(restore_original_geometry(labels, attrs, "nearest"), sitk.sitkUInt8)
    out.CopyInformation(image)   # restore_original_geometry built exactly this grid; make it bit-identical
    return out


# ---------------------------------------------------------------------------------- the command
def _load(args):
    """(model, card, interpolation, checkpoint extras) with one-line errors for a wrong checkpoint."""
    import torch

    from organseg.cache.build import inspect_cache
    from organseg.cli import UserError
    from organseg.evaluation.command import load_module
    from organseg.io.card import DatasetCard

    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UserError(f"--device {args.device}: not a torch device (e.g. cpu, cuda:0)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available on this machine")
    try:
        model, extra = load_module(args.ckpt, args.device)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"checkpoint {args.ckpt}: its LightningModule cannot be loaded "
                        f"({type(exc).__name__}: {exc})") from None
    if not callable(getattr(model, "predict_case", None)):
        raise UserError(f"checkpoint {args.ckpt}: a {type(model).__name__} checkpoint cannot segment a case "
                        f"(no predict_case); use a segmentation checkpoint")
    cards = extra.get("cards") or []
    if args.data:
        card = DatasetCard.load(args.data)
    elif cards:
        card = DatasetCard.from_dict({k: v for k, v in cards[0].items() if k != "source"},
                                     source=cards[0].get("source", ""))
        if any((c.get("target_spacing"), c.get("hu_window")) != (cards[0].get("target_spacing"),
               cards[0].get("hu_window")) for c in cards[1:]):
            print(f"warning: the checkpoint's {len(cards)} dataset cards preprocess differently; using "
                  f"{card.name}'s target spacing and HU window (choose with --data)")
    else:
        raise UserError(f"checkpoint {args.ckpt}: carries no dataset card; pass --data <card.yaml>")
    if list(card.classes) != list(model.classes):
        raise UserError(f"{card.source or card.name}: classes differ from the checkpoint's "
                        f"({len(model.classes)} classes)")
    # the cache's interpolation is not part of the card; use the one the training cache was built with
    problem, attrs = inspect_cache(Path(card.cache).expanduser())
    interpolation = str(attrs.get("interpolation", "linear")) if problem is None else "linear"
    return model, card, interpolation, extra


def _check_outputs(items: list[PredictInput], out: Path, rtstruct: str, overwrite: bool) -> None:
    from organseg.cli import UserError

    for item in items:
        if rtstruct == "always" and item.kind != "dicom":
            raise UserError(f"--rtstruct always: input {item.path} is not a DICOM series")
        targets = [out / f"{item.case}{SEG_SUFFIX}"]
        if item.kind == "dicom" and rtstruct != "never":
            targets.append(out / f"{item.case}{RTSTRUCT_SUFFIX}")
        for t in targets:
            if t.exists() and not overwrite:
                raise UserError(f"{t}: output exists (use --overwrite to replace it)")


def _labels_json(card, ckpt: str, out: Path, overwrite: bool) -> dict | None:
    """The sidecar to write, or None when ``out`` already has one with these labels (kept as it is)."""
    import json

    from organseg.cli import UserError

    labels = {name: i for i, name in enumerate(card.classes)}
    path = out / "labels.json"
    if path.exists() and not overwrite:
        try:
            old = json.loads(path.read_text()).get("labels")
        except (ValueError, AttributeError, OSError):
            old = None
        if old != labels:
            raise UserError(f"{path}: exists with other labels (use --overwrite or another --out)")
        return None
    return {"labels": labels, "dataset": card.name, "checkpoint": str(Path(ckpt).resolve())}


def run(args) -> int:
    from rich.console import Console
    from rich.progress import track

    from organseg.io.dicom import read_headers
    from organseg.io.rtstruct import write_rtstruct
    from organseg.io.writers import write_image, write_json

    console = Console()
    items = collect_inputs(args.input)          # cheap checks first: nothing is loaded or written on bad input
    out = Path(args.out)
    _check_outputs(items, out, args.rtstruct, args.overwrite)
    model, card, interpolation, extra = _load(args)
    sidecar = _labels_json(card, args.ckpt, out, args.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    if sidecar is not None:
        write_json(sidecar, out / "labels.json")
    written = []
    for item in track(items, description=f"predicting {len(items)} case(s)", console=Console(stderr=True)):
        image, files = read_input(item)
        label = predict_image(model, image, card, interpolation, args.device)
        seg = write_image(label, out / f"{item.case}{SEG_SUFFIX}")
        line = f"{item.case}: {seg}"
        if item.kind == "dicom" and args.rtstruct != "never":
            rs = out / f"{item.case}{RTSTRUCT_SUFFIX}"
            rois = write_rtstruct(label, card.classes, read_headers(files), rs,
                                  description=f"organseg {extra.get('module', '').rsplit('.', 1)[-1]} "
                                              f"{Path(args.ckpt).name}")
            line += f", {rs} ({len(rois)} ROI(s))"
        written.append(line)
    for line in written:
        console.print(line, highlight=False, soft_wrap=True)
    console.print(f"predict: {len(items)} case(s) -> {out} (label names in {out / 'labels.json'})",
                  highlight=False, soft_wrap=True)
    return 0
