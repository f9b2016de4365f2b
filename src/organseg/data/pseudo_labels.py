"""Offline hard pseudo-labels for few-organ datasets (the self-training base of co-training WAM).

``organseg pseudolabel --ckpt A.ckpt B.ckpt --card CARD --out FILE.h5`` runs first-stage
single-dataset models (experts) on every case of CARD's cache (:mod:`organseg.methods.pseudo_labelling`)
and stores one uint8 label map per case, in the cache geometry, for the organs CARD does *not* annotate.
This module reads and writes those files. ``CTDataModule(pseudo_labels=[...])`` then reads
the pseudo-label patch alongside the image patch (same box, same torchio spatial augmentation) and
puts it in the batch as ``pseudo``.

File layout (HDF5, written atomically)::

    attrs: format_version, complete, fingerprint, cache (path), cache_fingerprint, classes (json),
           checkpoints (json: [{path, sha256, organs}]), card (name), case_ids (json)
    /cases/<case_id>   uint8 [X,Y,Z], chunked like the cache (lazy patch reads)

The fingerprint covers the cache's fingerprint and the checkpoints' contents, so a file made from
another cache build or other checkpoints is detected (one-line error naming the file) and never used.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import h5py
import numpy as np

from organseg.cache.build import CHUNKS, label_stats
from organseg.cache.reader import CacheError, CacheReader
from organseg.errors import OrgansegError
from organseg.io.atomic import atomic_open
from organseg.io.card import DatasetCard

FORMAT_VERSION = 1
FG_SAMPLES = 10000  # organ voxel coordinates kept per class for patch centres (as the cache's default)


class PseudoLabelError(OrgansegError, ValueError):
    """A pseudo-label file is missing, incomplete, stale or inconsistent with its cache."""


def file_sha256(path: str | os.PathLike, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def pseudo_fingerprint(cache_fingerprint: str, checkpoints: Sequence[dict], classes: Sequence[str]) -> str:
    """Digest of what the pseudo-labels depend on: the cache build, the experts' weights, the organs
    each contributes and the label space."""
    spec = {
        "format": FORMAT_VERSION,
        "cache": cache_fingerprint,
        "classes": list(classes),
        "experts": [{"sha256": c["sha256"], "organs": list(c["organs"])} for c in checkpoints],
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _open(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r", locking=False)
    except TypeError:  # pragma: no cover - old h5py
        return h5py.File(path, "r")


class PseudoLabelReader:
    """Lazy, picklable reads of a pseudo-label file (one h5py handle per process, like CacheReader).

    Validated on construction against the cache it belongs to (``cache_fingerprint`` given): a stale
    file (other cache build, changed expert checkpoint, missing cases) raises :class:`PseudoLabelError`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        cache_fingerprint: str | None = None,
        case_ids: Sequence[str] | None = None,
        check_checkpoints: bool = True,
    ):
        self.path = Path(path)
        hint = "rerun `organseg pseudolabel ...` to regenerate it"
        if not self.path.is_file():
            raise PseudoLabelError(
                f"{self.path}: pseudo-label file not found; create it with "
                f"`organseg pseudolabel --ckpt ... --card ... --out {self.path}`"
            )
        try:
            f = _open(self.path)
        except OSError:
            raise PseudoLabelError(f"{self.path}: not a readable HDF5 pseudo-label file; {hint}") from None
        with f:
            a = f.attrs
            if int(a.get("format_version", -1)) != FORMAT_VERSION or not bool(a.get("complete", False)):
                raise PseudoLabelError(
                    f"{self.path}: incomplete or not an organseg pseudo-label file; {hint}"
                )
            self.fingerprint = str(a["fingerprint"])
            self.cache_fingerprint = str(a["cache_fingerprint"])
            self.classes = list(json.loads(a["classes"]))
            self.checkpoints = list(json.loads(a["checkpoints"]))
            self.case_ids = list(json.loads(a["case_ids"]))
        if cache_fingerprint is not None and cache_fingerprint != self.cache_fingerprint:
            raise PseudoLabelError(
                f"{self.path}: stale pseudo-labels (made from another build of the cache); {hint}"
            )
        missing = sorted(set(case_ids or ()) - set(self.case_ids))
        if missing:
            raise PseudoLabelError(f"{self.path}: no pseudo-labels for case(s) {missing[:3]}; {hint}")
        if check_checkpoints:
            # a checkpoint that moved away cannot be checked (its digest is kept in the file); one that is
            # still there but changed (retrained) makes the file stale
            for c in self.checkpoints:
                p = Path(c["path"])
                if p.is_file() and file_sha256(p) != c["sha256"]:
                    raise PseudoLabelError(
                        f"{self.path}: stale pseudo-labels (checkpoint {p} changed since); {hint}"
                    )
        self._h5: h5py.File | None = None
        self._pid: int | None = None
        self._stats: dict[str, dict] = {}

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_h5", "_pid", "_stats")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._h5, self._pid, self._stats = None, None, {}

    def _case_stats(self, case_id: str) -> dict:
        """Voxel counts and organ coordinates of a case's pseudo-labels, computed on first use (one read
        of the case per process, kept) by the cache's own rule (``cache.build.label_stats``: a seeded
        uniform sample of up to ``FG_SAMPLES`` coordinates per class), so files need no extra content."""
        stats = self._stats.get(case_id)
        if stats is None:
            stats = label_stats(self.read_case(case_id), len(self.classes), FG_SAMPLES, case_id)
            self._stats[case_id] = stats
        return stats

    def class_counts(self, case_id: str) -> np.ndarray:
        """int64 [C]: pseudo-labelled voxels per class (class 0: the rest of the case)."""
        return np.asarray(self._case_stats(case_id)["class_counts"], dtype=np.int64)

    def fg_coords(self, case_id: str, class_index: int) -> np.ndarray:
        """(N, 3) int32 coordinates sampled uniformly from pseudo-class ``class_index`` (empty if none)."""
        coords = self._case_stats(case_id)["fg"].get(int(class_index))
        return np.zeros((0, 3), dtype=np.int32) if coords is None else coords

    def _file(self) -> h5py.File:
        if self._h5 is None or self._pid != os.getpid():
            self._h5, self._pid = _open(self.path), os.getpid()
        return self._h5

    def read_case(self, case_id: str) -> np.ndarray:
        return np.asarray(self._file()[f"cases/{case_id}"][()], dtype=np.uint8)

    def read_patch(self, case_id: str, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
        """uint8 box ``[start, start + size)`` (x, y, z); outside the volume is 0, as in CacheReader."""
        ds = self._file()[f"cases/{case_id}"]
        start = np.asarray(start, dtype=np.int64).reshape(3)
        size = np.asarray(size, dtype=np.int64).reshape(3)
        shape = np.asarray(ds.shape, dtype=np.int64)
        lo, hi = np.clip(start, 0, shape), np.clip(start + size, 0, shape)
        out = np.zeros(tuple(int(v) for v in size), dtype=np.uint8)
        if np.all(hi > lo):
            src = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
            dst = tuple(slice(int(a - s), int(b - s)) for a, b, s in zip(lo, hi, start))
            ds.read_direct(out, src, dst)
        return out


def write_pseudo_file(
    out: str | os.PathLike,
    labels: Iterable[tuple[str, np.ndarray]],
    *,
    fingerprint: str,
    cache: str | os.PathLike,
    cache_fingerprint: str,
    classes: Sequence[str],
    checkpoints: Sequence[dict],
    card_name: str,
) -> Path:
    """Write (case id, uint8 label map in the cache geometry) pairs as a pseudo-label file, atomically
    (readers see the old file or the complete new one; an error leaves nothing behind)."""

    out = Path(out)
    ids = []
    with atomic_open(out, "wb") as fobj, h5py.File(fobj, "w") as h5:
        h5.attrs["format_version"] = FORMAT_VERSION
        h5.attrs["complete"] = False
        g = h5.create_group("cases")
        for cid, arr in labels:
            arr = np.asarray(arr)
            if arr.ndim != 3 or arr.min(initial=0) < 0 or arr.max(initial=0) >= len(classes):
                raise PseudoLabelError(
                    f"{out}: case {cid}: pseudo-labels must be a 3-D map of class indices "
                    f"0..{len(classes) - 1}"
                )
            g.create_dataset(
                cid,
                data=arr.astype(np.uint8),
                compression="lzf",
                chunks=tuple(int(min(c, n)) for c, n in zip(CHUNKS, arr.shape)),
            )
            ids.append(cid)
        h5.attrs["fingerprint"] = fingerprint
        h5.attrs["cache"] = str(Path(cache).resolve())
        h5.attrs["cache_fingerprint"] = cache_fingerprint
        h5.attrs["classes"] = json.dumps(list(classes))
        h5.attrs["checkpoints"] = json.dumps(list(checkpoints))
        h5.attrs["card"] = card_name
        h5.attrs["case_ids"] = json.dumps(ids)
        h5.attrs["complete"] = True
    return out


def pseudo_label_problem(path: str | os.PathLike, card: str | os.PathLike) -> str | None:
    """Why the pseudo-label file cannot be used with the card's cache as it is now (missing, stale: the
    cache was rebuilt or an expert changed since), in one line naming the file; None when it can."""
    try:
        cache = CacheReader(DatasetCard.load(card).cache)
        cache.close()
        PseudoLabelReader(path, cache_fingerprint=cache.fingerprint, case_ids=cache.case_ids)
    except (CacheError, PseudoLabelError) as exc:
        return str(exc).split("; ")[0]
    return None
