"""Segment raw images (NIfTI/NRRD/MHA files or DICOM CT series) in their ORIGINAL geometry: find the
cases named on the command line, read and validate them, preprocess them exactly as the dataset card
preprocessed its training cache (:func:`organseg.cache.build.preprocess_volume`), run the model's
whole-case ``predict_case`` and undo the crop and the resampling
(:func:`organseg.io.geometry.restore_original_geometry`). ``organseg predict`` (:mod:`organseg.cli.predict`)
adds the checkpoint, the outputs and RTSTRUCT writing around it.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from pydicom.misc import is_dicom

from organseg.cache.build import crop_to_body, resample_volume
from organseg.errors import ConfigError, InputError
from organseg.inference.precision import inference_autocast
from organseg.io.dicom import DicomError, read_dicom_series, series_ids
from organseg.io.geometry import Geometry, restore_original_geometry
from organseg.io.layouts import IMAGE_ENDINGS, CaseError, read_validated_image

_CHANNEL = re.compile(r"_\d{4}$")  # nnU-Net's channel suffix: imagesTs/<case>_0000.nii.gz -> <case>


# ---------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class PredictInput:
    """One case to segment: an image file, or a folder holding one DICOM series (``kind`` "dicom")."""

    case: str
    kind: str  # "image" | "dicom"
    path: Path


#: PDDCA's image file (``<case>/img.nrrd``): every case has the same file name, so the case is its folder
PDDCA_IMAGE = "img.nrrd"


def case_name(path: Path) -> str:
    """``case_0000.nii.gz`` -> ``case`` (file ending and nnU-Net channel suffix dropped); a folder's name.
    A PDDCA image (``<case>/img.nrrd``, the same name in every case) is named after its case folder."""
    name = path.name
    if name.lower() == PDDCA_IMAGE:
        folder = Path(path).absolute().parent.name
        if folder:
            return folder
    for ending in IMAGE_ENDINGS:
        if name.lower().endswith(ending):
            name = name[: -len(ending)]
            break
    return _CHANNEL.sub("", name) or name


def _pddca_image(folder: Path) -> Path | None:
    """``folder/img.nrrd`` (any case of the name) when ``folder`` is a PDDCA case folder, else None."""
    return next(
        (p for p in folder.iterdir() if p.is_file() and p.name.lower() == PDDCA_IMAGE),
        None,
    )


def _image_files(folder: Path) -> list[Path]:

    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(IMAGE_ENDINGS)
    )


def collect_inputs(paths: list[str]) -> list[PredictInput]:
    """The cases named by ``--input`` (one-line InputError for a missing path, an unsupported file, a
    folder with no images, or a folder with several DICOM series)."""

    found: list[PredictInput] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise InputError(f"input {path}: no such file or folder")
        if path.is_file():
            if path.name.lower().endswith(IMAGE_ENDINGS):
                found.append(PredictInput(case_name(path), "image", path))
            elif path.suffix.lower() in (".dcm", ".ima") or is_dicom(str(path)):
                raise InputError(f"input {path}: a single DICOM file; pass the folder of its series")
            else:
                raise InputError(f"input {path}: not a NIfTI/NRRD/MHA image ({', '.join(IMAGE_ENDINGS)})")
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
            raise DicomError(
                f"{path}: {len(ids)} DICOM series in one folder ({', '.join(ids)}); "
                f"put each series in its own folder"
            )
        subs = [d for d in sorted(path.iterdir()) if d.is_dir() and not d.name.startswith(".")]
        pddca = [(d, img) for d in subs if (img := _pddca_image(d)) is not None]  # <case>/img.nrrd
        series_dirs = [(d, series_ids(d)) for d in subs if all(d != c for c, _ in pddca)]
        series_dirs = [(d, s) for d, s in series_dirs if s]
        if not series_dirs and not pddca:
            raise InputError(
                f"input {path}: no readable images in this folder (NIfTI/NRRD/MHA files, one "
                f"DICOM series per folder, or PDDCA case folders <case>/{PDDCA_IMAGE})"
            )
        found += [PredictInput(d.name, "image", img) for d, img in pddca]
        for d, s in series_dirs:
            if len(s) > 1:
                raise DicomError(
                    f"{d}: {len(s)} DICOM series in one folder ({', '.join(s)}); "
                    f"put each series in its own folder"
                )
            found.append(PredictInput(d.name, "dicom", d))
    seen: dict[str, Path] = {}
    for item in found:
        if item.case in seen:
            raise InputError(
                f"input {item.path}: case name {item.case!r} also comes from {seen[item.case]}; "
                f"outputs would collide"
            )
        seen[item.case] = item.path
    return found


#: pixel types an image keeps as stored: float32 holds every value, so resampling them straight into
#: float32 gives the values the cache's float32 copy would (``organseg.cache.build.resample_volume``)
_EXACT_IN_FLOAT32 = (sitk.sitkInt8, sitk.sitkUInt8, sitk.sitkInt16, sitk.sitkUInt16, sitk.sitkFloat32)


def read_input(item: PredictInput) -> tuple[Any, list[Path]]:
    """``(HU SimpleITK image, DICOM files in slice order or [])`` of one input: float32, or the stored
    8/16-bit integer type (half the memory of float32 for a CT stored as int16; preprocessing resamples it
    into float32 with the same values)."""

    if item.kind == "dicom":
        return read_dicom_series(item.path)
    image = read_validated_image(item.path, item.case, "image")  # validated, one-line errors
    if image.GetPixelID() not in _EXACT_IN_FLOAT32:
        image = sitk.Cast(image, sitk.sitkFloat32)
    if image.GetPixelID() == sitk.sitkFloat32:
        view = sitk.GetArrayViewFromImage(image)
        if not np.all(np.isfinite(view)):
            raise CaseError(f"{item.case}: image has non-finite voxels (NaN/inf) ({item.path})", item.case)
    return image, []


# ---------------------------------------------------------------------------------- one case
def normalise(hu, hu_window) -> np.ndarray:
    """HU -> [-1, 1] with the same float32 operations as ``CacheReader.normalise`` (training's input)."""
    lo, hi = np.float32(hu_window[0]), np.float32(hu_window[1])
    out = np.array(hu, dtype=np.float32)  # a copy: the operations below are in place
    np.clip(out, lo, hi, out=out)
    out -= lo
    out *= np.float32(2.0) / (hi - lo)
    out -= np.float32(1.0)
    return out


def normalise_windows(hu_window) -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`normalise` for torch windows (float32 operations in the same order, so the same values): what
    a model's ``predict_case(..., window_transform=...)`` applies to each window of an int16 case."""
    lo, hi = np.float32(hu_window[0]), np.float32(hu_window[1])
    scale = float(np.float32(2.0) / (hi - lo))

    def transform(windows: torch.Tensor) -> torch.Tensor:
        out = windows.to(torch.float32).clamp_(float(lo), float(hi))
        return out.sub_(float(lo)).mul_(scale).sub_(1.0)

    return transform


def takes_window_transform(model) -> bool:
    """Whether ``model.predict_case`` accepts ``window_transform`` (the sliding-window models; FocusNetV2's
    locate-zoom-paste stages and the multi-model take a normalised float32 case)."""
    try:
        return "window_transform" in inspect.signature(model.predict_case).parameters
    except (TypeError, ValueError):
        return False


def preprocess_for_model(
    image, card, interpolation: str = "linear", normalised: bool = True
) -> tuple[np.ndarray, dict[str, Any]]:
    """``(normalised float32 (x, y, z) on the cache's grid, grid attrs to undo it)`` for one image; with
    ``normalised=False`` the int16 HU crop instead (half the memory; :func:`normalise_windows` per window).

    ``image`` may be handed over as a one-item list ``[image]``: the list is emptied once the image is
    resampled, so (when nothing else refers to it) its memory is freed before the crop and the model."""
    handed_over = isinstance(image, list)
    src = image.pop() if handed_over else image
    geom = Geometry.of(src)
    r_image, _ = resample_volume(card, src, None, interpolation)
    del src  # the caller's list no longer holds it: the input image is freed here
    hu, _, attrs = crop_to_body(card, geom, r_image)
    del r_image
    return (normalise(hu, card.hu_window) if normalised else hu), attrs


def set_sliding_window(model, overlap: float | None = None, batch_size: int | None = None) -> None:
    """Override the checkpoint's sliding-window ``sw_overlap`` / ``sw_batch_size`` (what every model's
    ``predict_case`` reads; None keeps the checkpoint's); a one-line ConfigError for a value out of range."""
    if overlap is not None:
        if not 0 <= overlap < 1:
            raise ConfigError(f"--sw-overlap must be in [0, 1), got {overlap}")
        model.sw_overlap = float(overlap)
    if batch_size is not None:
        if batch_size < 1:
            raise ConfigError(f"--sw-batch-size must be at least 1, got {batch_size}")
        model.sw_batch_size = int(batch_size)


def predict_image(
    model,
    image,
    card,
    interpolation: str = "linear",
    device: str = "cpu",
    precision: str = "fp32",
    after_preprocess: Callable[[], object] | None = None,
):
    """A uint8 label map with exactly ``image``'s size, spacing, origin and direction. ``precision``:
    the autocast of the network calls (``organseg.inference.precision``; the default ``fp32`` is none).
    Pass ``[image]`` to hand the image over (:func:`preprocess_for_model`): freed once resampled.
    ``after_preprocess``: called between preprocessing and the network (``organseg predict`` hands the
    preprocessing's freed heap back to the system there, ``organseg.runtime.allocator``).

    Memory (``organseg predict``, ``benchmarks/predict_memory.py``): the input image with its resampled
    int16 copy and body mask (3 bytes a resampled voxel, ``organseg.cache.build.resample_volume``), then the
    mask's components (2), the model input (crop: int16 for a sliding-window model, which normalises each
    window, else float32), the streamed sliding window's buffer, capped and
    run in x bands (``organseg.inference.sliding_window``), and uint8 labels on the cropped, resampled and
    original grids; never a float volume per class."""

    src = image[0] if isinstance(image, list) else image
    geom = Geometry.of(src)
    del src
    per_window = takes_window_transform(model)  # then the model gets the int16 crop, normalised per window
    x, attrs = preprocess_for_model(image, card, interpolation, normalised=not per_window)
    del image
    if after_preprocess is not None:
        after_preprocess()
    extra = {"window_transform": normalise_windows(card.hu_window)} if per_window else {}
    with torch.inference_mode(), inference_autocast(device, precision):
        labels = model.predict_case(torch.from_numpy(x)[None, None].to(device), **extra)
    del x
    labels = labels[0].cpu().numpy().astype(np.uint8, copy=False)
    out = sitk.Cast(restore_original_geometry(labels, attrs, "nearest"), sitk.sitkUInt8)
    # restore_original_geometry built exactly this grid; stamp the input's values so it is bit-identical
    return geom.apply(out)
