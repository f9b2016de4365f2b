"""Build the per-dataset HDF5 preprocessing cache (``organseg preprocess <card.yaml>``).

One file per dataset at ``card.cache``::
    /                      attrs: format_version, fingerprint, fingerprint_inputs (JSON), complete,
                                  card (JSON), classes (JSON), hu_window, norm (JSON), axis_order="xyz",
                                  created (ISO time), case_ids (JSON), skipped (JSON), skipped_errors (JSON),
                                  interpolation, compression, fg_samples, chunks
    /cases/<case>/image    int16 HU clipped to card.hu_window, (x, y, z), chunked + compressed
    /cases/<case>/label    uint8 class indices, same chunks
    /cases/<case>/fg/<c>   int32 (N, 3) seeded uniform sample of up to fg_samples voxel coords of class c
    /cases/<case>          attrs: spacing, shape, origin, direction (of the cached grid), orig_spacing,
                           orig_origin, orig_direction, orig_shape, resampled_origin, resampled_shape,
                           crop_start, crop_stop, class_counts (C,), bboxes (C,2,3), centres (C,3),
                           source_image, source_label, source_structures (JSON),
                           structure_report (JSON, dicom_rt: each RTSTRUCT structure's name -> class /
                           ignored / unmatched, RTSTRUCT conflicts settled, organ overlaps counted)

Per case: read + validate (``organseg.io``), resample image (linear or B-spline) and label (nearest) to
``card.target_spacing`` keeping origin/direction, crop to the body (largest connected component of
HU > -500, plus a margin, always including every labelled voxel), clip HU to the window, store.

Writes go to ``<cache>.tmp-<pid>`` (fsync, then ``os.replace``): a reader never sees a partial file.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import multiprocessing as mp
import os
import sys
import warnings
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import SimpleITK as sitk
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from scipy import ndimage

from organseg.cache.reader import FORMAT_VERSION
from organseg.child_processes import exit_with_parent
from organseg.errors import ConfigError, OutputError
from organseg.io.atomic import make_dirs
from organseg.io.card import CardError, DatasetCard
from organseg.io.dicom_rt import report_notes
from organseg.io.geometry import (
    Geometry,
    cropped_origin,
    image_to_xyz,
    resample_label,
    resample_to_grid,
    resampled_size,
    same_spacing,
)
from organseg.io.layouts import CaseError, CaseFiles, OverlapWarning, list_cases, read_case_sitk

# HDF5 reads and decompresses whole chunks. A 96x96x48 training patch at a random offset overlaps
# (96/32+1)^2 * (48/16+1) = 64 chunks of 32x32x16 int16 (32 KiB raw, ~10-20 KiB lzf): ~2 MiB read for a
# 0.9 MiB patch. Bigger chunks (64x64x32: 27 chunks x 256 KiB = 7 MiB) waste I/O and decompression on
# voxels the patch does not use; much smaller ones (16^3) multiply per-chunk overhead (index lookups,
# filter calls) by 5-8x. The z extent is half the x/y one because the target spacing is usually ~3x
# coarser in z, so a chunk is roughly cubic in mm. See benchmarks in the module's report/tests.
CHUNKS = (32, 32, 16)
BODY_THRESHOLD_HU = -500.0
BODY_MARGIN = 4  # voxels around the body's bounding box
COMPRESSIONS = ("lzf", "gzip")
INTERPOLATIONS = ("linear", "bspline")


# ---------------------------------------------------------------------------------- messages
def _info(msg: str) -> None:
    print(msg, flush=True)


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------- per case
@dataclass
class CaseResult:
    case_id: str
    image: np.ndarray | None = None  # int16 (x, y, z)
    label: np.ndarray | None = None  # uint8 (x, y, z)
    fg: dict[int, np.ndarray] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (category name, message)
    notes: list[str] = field(default_factory=list)  # what reading decided, printed by the writer


def body_bbox(
    image_hu: np.ndarray,
    label: np.ndarray | None = None,
    threshold: float = BODY_THRESHOLD_HU,
    margin: int = BODY_MARGIN,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """[start, stop) of the body: the largest connected component of ``image > threshold`` plus
    ``margin`` voxels, extended to include every labelled voxel. The full volume if nothing is found."""

    return body_bbox_of_mask(image_hu > threshold, label, margin)


def body_bbox_of_mask(
    mask: np.ndarray, label: np.ndarray | None = None, margin: int = BODY_MARGIN
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """:func:`body_bbox` of an already thresholded image (``mask`` = image > threshold; consumed)."""
    shape = np.asarray(mask.shape)
    box = None
    if mask.any():
        comp, n = _label_components(mask)
        del mask  # (comp holds the components; a whole CT's mask is 1 byte per voxel)
        sizes = _component_sizes(comp, n)
        sizes[0] = 0
        largest = int(np.argmax(sizes))  # the first of equal sizes, as in scan order
        found = ndimage.find_objects(comp, max_label=largest)[largest - 1]  # its bounding box
        del comp
        box = (np.asarray([s.start for s in found]), np.asarray([s.stop for s in found]))
    if label is not None and np.any(label):
        lbox = _mask_bbox(label > 0)
        box = lbox if box is None else (np.minimum(box[0], lbox[0]), np.maximum(box[1], lbox[1]))
    if box is None:
        return (0, 0, 0), tuple(int(v) for v in shape)
    start = np.maximum(box[0] - margin, 0)
    stop = np.minimum(box[1] + margin, shape)
    return tuple(int(v) for v in start), tuple(int(v) for v in stop)


def _component_sizes(comp: np.ndarray, n: int, chunk: int = 1 << 22) -> np.ndarray:
    """Voxels per component label 0..n, counted ``chunk`` voxels at a time (``np.bincount`` casts its input
    to int64: 8 bytes a voxel at once for a whole CT)."""
    flat = comp.reshape(-1)
    sizes = np.zeros(n + 1, dtype=np.int64)
    for i in range(0, flat.size, chunk):
        sizes += np.bincount(flat[i : i + chunk], minlength=n + 1)
    return sizes


def _label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """``ndimage.label`` into uint16 (2 bytes a voxel) when the components fit, else int32: the same
    components, numbered in scan order either way."""
    try:
        return ndimage.label(mask, output=np.uint16)
    except RuntimeError:  # "insufficient bit-depth": more than 65535 components
        return ndimage.label(mask)


def _mask_bbox(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    start, stop = [], []
    for axis in range(3):
        proj = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        start.append(proj[0])
        stop.append(proj[-1] + 1)
    return np.asarray(start), np.asarray(stop)


def label_stats(label: np.ndarray, num_classes: int, fg_samples: int, seed_key: str) -> dict[str, Any]:
    """class_counts (C,), bboxes (C,2,3) [start, stop) or -1, centres (C,3) voxel centre of mass or NaN,
    and fg: {class index: (N,3) int32 seeded uniform sample of up to fg_samples voxel coordinates}."""
    label = np.ascontiguousarray(label)
    flat = label.ravel()
    shape = label.shape
    counts = np.bincount(flat, minlength=num_classes)[:num_classes].astype(np.int64)
    bboxes = np.full((num_classes, 2, 3), -1, dtype=np.int32)
    centres = np.full((num_classes, 3), np.nan, dtype=np.float32)
    fg: dict[int, np.ndarray] = {}
    fg_sum = np.zeros(3, dtype=np.float64)
    seed = zlib.crc32(seed_key.encode())
    for c in range(1, num_classes):
        if counts[c] == 0:
            continue
        idx = np.flatnonzero(flat == c)
        coords = np.stack(np.unravel_index(idx, shape), axis=1)
        bboxes[c, 0] = coords.min(axis=0)
        bboxes[c, 1] = coords.max(axis=0) + 1
        total = coords.sum(axis=0, dtype=np.float64)
        fg_sum += total
        centres[c] = total / len(coords)
        if len(coords) > fg_samples:
            pick = np.random.default_rng([seed, c]).choice(len(coords), size=fg_samples, replace=False)
            coords = coords[np.sort(pick)]
        fg[c] = coords.astype(np.int32)
    if counts[0]:
        bg = label == 0
        s, e = _mask_bbox(bg)
        bboxes[0, 0], bboxes[0, 1] = s, e
        n = np.asarray(shape, dtype=np.float64)
        all_sum = np.prod(n) * (n - 1) / 2  # sum of each index over the whole grid
        centres[0] = (all_sum - fg_sum) / counts[0]
    return {"class_counts": counts, "bboxes": bboxes, "centres": centres, "fg": fg}


def preprocess_volume(
    card: DatasetCard, image, label=None, interpolation: str = "linear"
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Resample to ``card.target_spacing`` (image linear/B-spline, label nearest; origin and direction
    kept), crop to the body, clip HU to the window: ``(image int16 (x, y, z), label uint8 or None, grid
    attrs)``. The grid attrs are what :func:`organseg.io.geometry.restore_original_geometry` needs to
    undo it. Shared by the cache and ``organseg predict`` so training and inference cannot drift:
    :func:`resample_volume` then :func:`crop_to_body` (``predict`` calls the two itself, to free the
    input image between them)."""

    geom = Geometry.of(image)
    r_image, r_label = resample_volume(card, image, label, interpolation)
    return crop_to_body(card, geom, r_image, r_label)


def resample_volume(card: DatasetCard, image, label=None, interpolation: str = "linear"):
    """Step 1 of :func:`preprocess_volume`: ``(ResampledImage, label or None)``: ``image`` resampled to
    ``card.target_spacing`` (float32 arithmetic), each value clipped to the card's HU window and rounded to
    int16, and the body mask (``> BODY_THRESHOLD_HU``) taken from the unclipped values, ``_RESAMPLE_SLICES``
    output slices at a time. ``image`` may be float32 or an integer type float32 holds exactly (int16 as
    stored): the interpolators compute in double either way, so the values are the same.

    Memory: the input, the int16 grid (2 bytes a voxel) and the mask (1), never a float32 copy of the whole
    resampled volume (4 bytes a voxel, the largest buffer before). The values are those of one whole-volume
    ResampleImageFilter call: each output voxel is interpolated on its own, and a B-spline's coefficients
    come from the whole input in every call (so B-spline is resampled in one call: per chunk it would
    recompute them each time)."""
    target = tuple(float(v) for v in card.target_spacing)
    lo, hi = (float(v) for v in card.hu_window)
    if interpolation not in ("linear", "bspline"):
        raise ConfigError(f"interpolation must be linear or bspline, got {interpolation!r}")
    same = same_spacing(image.GetSpacing(), target)
    size = (
        tuple(int(v) for v in image.GetSize())
        if same
        else resampled_size(image.GetSize(), image.GetSpacing(), target)
    )
    origin = np.asarray(image.GetOrigin(), dtype=float)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    hu = np.empty(size, dtype=np.int16)  # (x, y, z)
    body = np.empty(size, dtype=bool)
    step = size[2] if interpolation == "bspline" and not same else _RESAMPLE_SLICES
    for z0 in range(0, size[2], step):
        z1 = min(z0 + step, size[2])
        if same:  # only a cast, as resample_image does at the target spacing
            part = sitk.GetArrayViewFromImage(image)[z0:z1].astype(np.float32)
        else:
            chunk = resample_to_grid(
                image,
                (size[0], size[1], z1 - z0),
                target,
                origin + direction @ np.array([0.0, 0.0, z0 * target[2]]),
                direction.ravel(),
                interpolation,
                default_value=-1024.0,
                pixel_type=sitk.sitkFloat32,
            )
            part = sitk.GetArrayFromImage(chunk)  # (z, y, x) float32
            del chunk
        part = part.transpose(2, 1, 0)
        body[..., z0:z1] = part > BODY_THRESHOLD_HU
        np.clip(part, lo, hi, out=part)
        np.rint(part, out=part)
        hu[..., z0:z1] = part
        del part
    r_label = resample_label(label, target) if label is not None else None
    return ResampledImage(hu, body, tuple(float(v) for v in origin)), r_label


@dataclass
class ResampledImage:
    """:func:`resample_volume`'s image on the card's grid: ``hu`` int16 (x, y, z), clipped to the HU window
    and rounded; ``body`` the voxels above ``BODY_THRESHOLD_HU`` before clipping; the grid's origin."""

    hu: np.ndarray
    body: np.ndarray
    origin: tuple[float, ...]


#: output slices resampled per ResampleImageFilter call by :func:`resample_volume` (its float32 scratch)
_RESAMPLE_SLICES = 16


def crop_to_body(
    card: DatasetCard, geom: Geometry, resampled: ResampledImage, r_label=None
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Step 2 of :func:`preprocess_volume`, on its resampled image and label (``geom``: the original
    image's grid): the body box from ``resampled.body`` (consumed: set to None), the int16 crop of
    ``resampled.hu`` (released too), so the memory on top of the int16 grid is the uint16 components
    and then the crop."""
    target = tuple(float(v) for v in card.target_spacing)
    lab = image_to_xyz(r_label) if r_label is not None else None
    resampled_shape = resampled.hu.shape
    body, resampled.body = resampled.body, None
    start, stop = body_bbox_of_mask(body, lab)
    del body
    box = tuple(slice(a, b) for a, b in zip(start, stop))
    img = np.ascontiguousarray(resampled.hu[box])
    resampled.hu = None
    if lab is not None:
        lab = np.ascontiguousarray(lab[box])
    origin = resampled.origin
    attrs = {
        "spacing": np.asarray(target, dtype=np.float64),
        "shape": np.asarray(img.shape, dtype=np.int64),
        "origin": np.asarray(cropped_origin(origin, geom.direction, target, start), dtype=np.float64),
        "direction": np.asarray(geom.direction, dtype=np.float64),
        "orig_spacing": np.asarray(geom.spacing, dtype=np.float64),
        "orig_origin": np.asarray(geom.origin, dtype=np.float64),
        "orig_direction": np.asarray(geom.direction, dtype=np.float64),
        "orig_shape": np.asarray(geom.shape, dtype=np.int64),
        "resampled_origin": np.asarray(origin, dtype=np.float64),
        "resampled_shape": np.asarray(resampled_shape, dtype=np.int64),
        "crop_start": np.asarray(start, dtype=np.int64),
        "crop_stop": np.asarray(stop, dtype=np.int64),
    }
    return img, lab, attrs


def preprocess_case(
    card: DatasetCard, case: CaseFiles, fg_samples: int = 10000, interpolation: str = "linear"
) -> CaseResult:
    """Read, validate, resample, crop and clip one case (raises CaseError for a bad case)."""

    report: dict = {}
    image, label, _ = read_case_sitk(card, case, report)
    img, lab, attrs = preprocess_volume(card, image, label, interpolation)
    del image, label
    stats = label_stats(lab, card.num_classes, fg_samples, case.case_id)
    attrs.update(
        {
            "class_counts": stats["class_counts"],
            "bboxes": stats["bboxes"],
            "centres": stats["centres"],
            "source_image": str(case.image),
            "source_label": str(case.label) if case.label is not None else "",
            "source_structures": json.dumps({k: str(v) for k, v in sorted(case.structures.items())}),
        }
    )
    notes = []
    if report:
        attrs["structure_report"] = json.dumps(report)
        notes = report_notes(case.case_id, report)
    return CaseResult(case.case_id, img, lab, stats["fg"], attrs, notes=notes)


def _run_case(card: DatasetCard, case: CaseFiles, fg_samples: int, interpolation: str) -> CaseResult:
    """Worker entry point: never raises for a bad case; the error travels back in the result."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = preprocess_case(card, case, fg_samples, interpolation)
        except CaseError as exc:
            result = CaseResult(case.case_id, error=str(exc))
        except MemoryError:
            result = CaseResult(
                case.case_id, error=f"{case.case_id}: out of memory while preprocessing (try --workers 1)"
            )
        except Exception as exc:  # noqa: BLE001 - one bad file must not lose hours of preprocessing
            msg = " ".join(str(exc).split()) or type(exc).__name__
            result = CaseResult(
                case.case_id,
                error=f"{case.case_id}: preprocessing failed ({type(exc).__name__}: {msg[:300]})",
            )
    result.warnings = [(w.category.__name__, str(w.message)) for w in caught]
    return result


def _init_worker(threads: int, parent_pid: int | None = None) -> None:
    exit_with_parent(parent_pid)  # a killed `organseg preprocess` must not leave its workers running
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, threads))


def _start_method() -> str:
    """``spawn`` (safe with the progress bar's thread and the open HDF5 file), except when ``__main__``
    cannot be re-imported by a spawned child (``python -`` / ``python -c``): then ``fork``."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if (
        main_file is not None
        and not os.path.isfile(main_file)
        and "fork" in __import__("multiprocessing").get_all_start_methods()
    ):
        return "fork"
    return "spawn"


def _iter_results(
    card: DatasetCard, cases: list[CaseFiles], workers: int, fg_samples: int, interpolation: str
) -> Iterator[CaseResult]:
    """Results in case order; with ``workers > 1`` computed by a (spawned) process pool, at most
    ``2 * workers`` cases ahead of the writer (bounded memory)."""
    if workers <= 1 or len(cases) <= 1:
        for case in cases:
            yield _run_case(card, case, fg_samples, interpolation)
        return

    workers = min(workers, len(cases))
    threads = max(1, (os.cpu_count() or 1) // workers)
    ex = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=mp.get_context(_start_method()),
        initializer=_init_worker,
        initargs=(threads, os.getpid()),
    )
    try:
        todo = iter(cases)
        pending: deque = deque()
        for case in cases[: 2 * workers]:
            next(todo)
            pending.append((case, ex.submit(_run_case, card, case, fg_samples, interpolation)))
        while pending:
            case, fut = pending.popleft()
            try:
                result = fut.result()
            except BrokenProcessPool:
                raise CaseError(
                    f"{case.case_id}: a preprocessing worker died while processing this case "
                    f"(out of memory? try --workers 1)",
                    case.case_id,
                ) from None
            nxt = next(todo, None)
            if nxt is not None:
                pending.append((nxt, ex.submit(_run_case, card, nxt, fg_samples, interpolation)))
            yield result
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------- writing
def _chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(min(c, s)) for c, s in zip(CHUNKS, shape))


def _filters(compression: str, dtype: np.dtype) -> dict[str, Any]:
    kw: dict[str, Any] = {"compression": compression}
    if compression == "gzip":
        kw["compression_opts"] = 4
    if np.dtype(dtype).itemsize > 1:
        kw["shuffle"] = True  # byte-shuffle: the high bytes of int16 HU are very repetitive
    return kw


def _write_case(h5: h5py.File, result: CaseResult, compression: str) -> None:
    """Write one preprocessed case under /cases/<case_id> (main process, in case order)."""
    g = h5.require_group("cases").create_group(result.case_id)
    chunks = _chunks(result.image.shape)
    g.create_dataset("image", data=result.image, chunks=chunks, **_filters(compression, result.image.dtype))
    g.create_dataset("label", data=result.label, chunks=chunks, **_filters(compression, result.label.dtype))
    fg = g.create_group("fg")
    for c, coords in sorted(result.fg.items()):
        fg.create_dataset(str(int(c)), data=np.asarray(coords, dtype=np.int32).reshape(-1, 3))
    for key, value in result.attrs.items():
        g.attrs[key] = value


def norm_description(hu_window) -> dict[str, Any]:
    lo, hi = (float(v) for v in hu_window)
    return {
        "type": "linear",
        "window": [lo, hi],
        "range": [-1.0, 1.0],
        "pad_value": -1.0,
        "formula": "2 * (clip(hu, lo, hi) - lo) / (hi - lo) - 1",
    }


# ---------------------------------------------------------------------------------- fingerprint
def _file_stamp(path: Path) -> list:
    try:
        st = os.stat(path)
        return [str(Path(path).resolve()), int(st.st_size), int(st.st_mtime_ns)]
    except OSError:
        return [str(path), -1, -1]


def fingerprint_inputs(
    card: DatasetCard, cases: list[CaseFiles], fg_samples: int, compression: str, interpolation: str
) -> dict[str, Any]:
    """Everything the cache contents depend on: parameters and every input file's path, size and mtime."""
    return {
        "format_version": FORMAT_VERSION,
        "params": card.preprocessing_params(),
        "fg_samples": int(fg_samples),
        "compression": compression,
        "interpolation": interpolation,
        "chunks": list(CHUNKS),
        "body": [BODY_THRESHOLD_HU, BODY_MARGIN],
        "cases": {c.case_id: [_file_stamp(p) for p in c.files] for c in cases},
    }


def fingerprint(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def _describe_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    parts = []
    for key in sorted(set(old) | set(new)):
        if key in ("cases", "params") or old.get(key) == new.get(key):
            continue
        parts.append(f"{key} {old.get(key)!r} -> {new.get(key)!r}")
    op, np_ = old.get("params", {}), new.get("params", {})
    changed = [k for k in sorted(set(op) | set(np_)) if op.get(k) != np_.get(k)]
    if changed:
        parts.append("card " + ", ".join(changed) + " changed")
    oc, nc = old.get("cases", {}), new.get("cases", {})
    added = sorted(set(nc) - set(oc))
    removed = sorted(set(oc) - set(nc))
    modified = sorted(c for c in set(oc) & set(nc) if oc[c] != nc[c])
    for what, ids in (("new", added), ("removed", removed), ("modified", modified)):
        if ids:
            parts.append(f"{len(ids)} {what} case(s) ({', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''})")
    return "; ".join(parts) or "fingerprint differs"


# ---------------------------------------------------------------------------------- inspection
def open_h5(path: str | os.PathLike, mode: str = "r", **kw) -> h5py.File:
    """h5py.File without HDF5 file locking where supported (NFS/Lustre). A file that cannot be created
    (mode "w": a folder without write permission) is an :class:`OutputError`."""
    try:
        try:
            return h5py.File(path, mode, locking=False, **kw)
        except TypeError:  # pragma: no cover - old h5py/HDF5
            return h5py.File(path, mode, **kw)
    except OSError as exc:
        if mode != "w":
            raise
        raise OutputError.from_os_error(exc) from exc


def inspect_cache(path: str | os.PathLike) -> tuple[str | None, dict[str, Any]]:
    """(problem, root attrs): problem is None for a complete, readable cache of this format version,
    "missing" when there is no file, else a short description of why it cannot be used."""
    path = Path(path)
    if not path.exists():
        return "missing", {}
    try:
        with open_h5(path, "r") as f:
            attrs = {k: f.attrs[k] for k in f.attrs}
            if not bool(attrs.get("complete", False)):
                return "the 'complete' flag is not set", attrs
            if int(attrs.get("format_version", -1)) != FORMAT_VERSION:
                return f"format_version {attrs.get('format_version')} != {FORMAT_VERSION}", attrs
            case_ids = json.loads(attrs.get("case_ids", "[]"))
            if not case_ids:
                return "no cases", attrs
            missing = [c for c in case_ids if not (f"cases/{c}/image" in f and f"cases/{c}/label" in f)]
            if missing:
                return f"case group(s) missing: {', '.join(missing[:3])}", attrs
            return None, attrs
    except (OSError, ValueError, KeyError) as exc:
        return f"cannot be read: {' '.join(str(exc).split())[:200]}", {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    except OSError:
        return False
    return True


def remove_stale_temps(cache: Path, say: Callable[[str], None] = _info) -> list[Path]:
    """Remove ``<cache>.tmp-<pid>`` files left by killed runs (never read them)."""
    removed = []
    if not cache.parent.is_dir():
        return removed
    for p in sorted(cache.parent.glob(cache.name + ".tmp-*")):
        pid_txt = p.name.rsplit(".tmp-", 1)[-1]
        pid = int(pid_txt) if pid_txt.isdigit() else None
        if pid is not None and pid != os.getpid() and _pid_alive(pid):
            _warn(f"{p}: another preprocess run (pid {pid}) seems to be writing this file; leaving it")
            continue
        try:
            p.unlink()
        except FileNotFoundError:
            continue
        say(f"{p}: removed stale temporary file from an interrupted run")
        removed.append(p)
    return removed


# ---------------------------------------------------------------------------------- build
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def build_cache(
    card: DatasetCard,
    workers: int = 2,
    skip_bad: bool = False,
    force: bool = False,
    fg_samples: int = 10000,
    compression: str = "lzf",
    progress: bool = True,
    interpolation: str = "linear",
) -> Path:
    """Build (or verify) ``card.cache``; returns its path.

    No-op when a complete cache with the same fingerprint exists (unless ``force``). A bad case raises
    :class:`CaseError` (nothing is written, an existing cache stays untouched) unless ``skip_bad``, which
    skips it with a warning and records it in the root attr ``skipped``.
    """
    _check_options(card, compression, interpolation, fg_samples)
    cache = Path(card.cache).expanduser()
    make_dirs(cache.parent)  # a folder that cannot be made is the user's to fix: one line
    remove_stale_temps(cache)

    cases = list_cases(card)
    inputs = fingerprint_inputs(card, cases, fg_samples, compression, interpolation)
    reason = _rebuild_reason(cache, inputs, force)
    if reason is None:
        return cache

    _info(f"preprocessing {len(cases)} case(s) of {card.name} -> {cache} ({reason})")
    with (
        _written_atomically(cache) as tmp,
        open_h5(tmp, "w") as h5,
        _progress_bar(card.name, len(cases), progress) as advance,
    ):
        _write_root_attrs(h5, card, inputs)
        tally = _write_cases(h5, card, cases, inputs, workers, skip_bad, advance)
        _mark_complete(h5, card, tally)
    note = f", {len(tally.skipped)} bad case(s) skipped" if tally.skipped else ""
    _info(f"wrote {cache}: {len(tally.written)} case(s){note}")
    return cache


def _check_options(card: DatasetCard, compression: str, interpolation: str, fg_samples: int) -> None:
    """Refuse bad build options before anything is read or written (one-line user errors)."""
    if compression not in COMPRESSIONS:
        raise ConfigError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if int(fg_samples) < 1:
        raise ConfigError(f"fg_samples must be >= 1, got {fg_samples}")
    lo, hi = (float(v) for v in card.hu_window)
    if lo < -32768 or hi > 32767:
        raise CardError(f"{card.source or card.name}: hu_window {card.hu_window} does not fit int16")


def _rebuild_reason(cache: Path, inputs: dict[str, Any], force: bool) -> str | None:
    """Why ``cache`` must be (re)built, or None when it is complete and of these inputs (said on stdout)."""
    problem, attrs = inspect_cache(cache)
    if problem == "missing":
        return "new cache"
    if problem is not None:
        _info(f"{cache}: cache is corrupt/incomplete ({problem}), rebuilding")
        return "rebuilding a corrupt cache"
    if attrs.get("fingerprint") != fingerprint(inputs):
        try:
            old = json.loads(attrs.get("fingerprint_inputs", "{}"))
        except ValueError:
            old = {}
        reason = _describe_change(old, inputs)
        _info(f"{cache}: inputs or parameters changed ({reason}), rebuilding")
        return reason
    if force:
        return "--force"
    skipped = json.loads(attrs.get("skipped", "[]"))
    note = f" ({len(skipped)} bad case(s) skipped: {', '.join(skipped[:5])})" if skipped else ""
    _info(f"cache up to date: {cache}{note}")
    return None


@contextmanager
def _written_atomically(cache: Path) -> Iterator[Path]:
    """Yield ``<cache>.tmp-<pid>``; then fsync it and move it over ``cache``, or on any error delete it."""
    tmp = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, cache)
        _fsync_dir(cache.parent)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise


@contextmanager
def _progress_bar(name: str, total: int, enabled: bool) -> Iterator[Callable[[], None]]:
    """Yield a function that advances a per-case progress bar on stderr (a no-op when not ``enabled``)."""
    if not enabled:
        yield lambda: None
        return
    bar = Progress(
        TextColumn("[bold]preprocess[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    )
    try:
        bar.start()
        task = bar.add_task(name, total=total)
        yield lambda: bar.advance(task)
    finally:
        bar.stop()


def _write_root_attrs(h5: h5py.File, card: DatasetCard, inputs: dict[str, Any]) -> None:
    """Describe the cache in its root attrs (``complete`` still False); ``inputs`` holds the build options."""
    lo, hi = (float(v) for v in card.hu_window)
    h5.attrs["format_version"] = FORMAT_VERSION
    h5.attrs["complete"] = False
    h5.attrs["fingerprint"] = fingerprint(inputs)
    h5.attrs["fingerprint_inputs"] = json.dumps(inputs, sort_keys=True, default=str)
    h5.attrs["card"] = json.dumps(card.to_dict(), default=str)
    h5.attrs["classes"] = json.dumps(list(card.classes))
    h5.attrs["hu_window"] = np.asarray([lo, hi], dtype=np.float64)
    h5.attrs["norm"] = json.dumps(norm_description(card.hu_window))
    h5.attrs["axis_order"] = "xyz"
    h5.attrs["interpolation"] = inputs["interpolation"]
    h5.attrs["compression"] = inputs["compression"]
    h5.attrs["fg_samples"] = inputs["fg_samples"]
    h5.attrs["chunks"] = np.asarray(CHUNKS, dtype=np.int64)
    h5.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    h5.create_group("cases")


@dataclass
class _Tally:
    """The cases a build wrote, and the bad ones it skipped with their errors."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)


def _write_cases(
    h5: h5py.File,
    card: DatasetCard,
    cases: list[CaseFiles],
    inputs: dict[str, Any],
    workers: int,
    skip_bad: bool,
    advance: Callable[[], None],
) -> _Tally:
    """Preprocess the cases (a pool when ``workers > 1``); write each good one as it comes, in case order."""
    tally = _Tally()
    shown_once: set[str] = set()
    for result in _iter_results(card, cases, workers, inputs["fg_samples"], inputs["interpolation"]):
        _relay_warnings(result, shown_once)
        for note in result.notes:
            _info(note)
        if result.error is not None:
            _skip_bad_case(result, skip_bad, tally)
        else:
            _write_case(h5, result, inputs["compression"])
            tally.written.append(result.case_id)
        advance()
    return tally


def _relay_warnings(result: CaseResult, shown_once: set[str]) -> None:
    """Print a case's warnings on stderr; the overlap warning only once per build (it repeats per case)."""
    for category, message in result.warnings:
        if category == OverlapWarning.__name__:
            if "overlap" in shown_once:
                continue
            shown_once.add("overlap")
        _warn(message)


def _skip_bad_case(result: CaseResult, skip_bad: bool, tally: _Tally) -> None:
    """Stop the build at a bad case (nothing is written), or with ``skip_bad`` warn and record it."""
    if not skip_bad:
        raise CaseError(f"{result.error} (use --skip-bad to skip bad cases)", result.case_id)
    _warn(f"skipping bad case {result.error}")
    tally.skipped.append(result.case_id)
    tally.errors[result.case_id] = result.error


def _mark_complete(h5: h5py.File, card: DatasetCard, tally: _Tally) -> None:
    """List the written and skipped cases, then set ``complete``: only a whole cache is ever complete."""
    if not tally.written:
        raise CaseError(f"{card.path}: no usable cases ({len(tally.skipped)} bad case(s) skipped)")
    h5.attrs["case_ids"] = json.dumps(tally.written)
    h5.attrs["skipped"] = json.dumps(tally.skipped)
    h5.attrs["skipped_errors"] = json.dumps(tally.errors)
    h5.attrs["complete"] = True
    h5.flush()
