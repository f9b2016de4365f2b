"""Lazy, process-safe reads from the preprocessing cache: the training hot path.

``CacheReader`` pickles cheaply (no open handles, no cached arrays) and opens the HDF5 file lazily in
each process that uses it (a DataLoader worker, forked or spawned): the pid is remembered and the file
reopened when it changes. Patches are read with h5py slicing of the in-bounds slab only, so a
96x96x48 patch decompresses only the few chunks it overlaps, never the whole volume.

This module deliberately imports neither SimpleITK nor torch.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import h5py
import numpy as np

from organseg.errors import ConfigError, OrgansegError

#: version of the cache layout (bump when build.py changes what it writes)
FORMAT_VERSION = 1

#: normalised value of air (and of voxels outside the volume in ``read_patch``)
PAD_VALUE = -1.0

_GEOMETRY_KEYS = (
    "spacing",
    "shape",
    "origin",
    "direction",
    "orig_spacing",
    "orig_origin",
    "orig_direction",
    "orig_shape",
    "resampled_origin",
    "resampled_shape",
    "crop_start",
    "crop_stop",
)


class CacheError(OrgansegError, ValueError):
    """The cache file is missing, incomplete or corrupt (one-line message naming the file)."""


class CacheReader:
    """Read-only access to a cache written by :func:`organseg.cache.build.build_cache`.

    ``opener`` (optional, must be picklable to cross processes) returns a binary file-like object for
    the path; h5py then reads through it (used by tests to count the bytes a patch read touches).

    The file is opened without HDF5 file locking (``locking=False``: safe for a read-only file that is
    only ever replaced atomically, and needed on NFS/Lustre). Note HDF5 refuses to open one file twice
    in a process with different locking flags: open the cache elsewhere with ``h5py.File(path, "r",
    locking=False)`` (or ``organseg.cache.build.open_h5``) while a reader holds it.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        rdcc_nbytes: int = 8 << 20,
        rdcc_nslots: int = 5003,
        max_open_cases: int = 4,
        opener: Callable[[Path], IO[bytes]] | None = None,
        locking: bool | str = False,
    ):
        self.path = Path(path)
        self._locking = locking
        self._rdcc = (int(rdcc_nbytes), int(rdcc_nslots))
        self._max_open = max(1, int(max_open_cases))
        self._opener = opener
        self._reset()
        if not self.path.exists():
            raise CacheError(f"{self.path}: no cache file; run `organseg preprocess <card.yaml>` first")
        try:
            f = self._open()
        except OSError as exc:
            detail = " ".join(str(exc).split())[:160]
            raise CacheError(
                f"{self.path}: cache is corrupt ({detail}); rebuild it with `organseg preprocess <card.yaml>`"
            ) from None
        try:
            attrs = {k: f.attrs[k] for k in f.attrs}
            try:
                card = json.loads(attrs.get("card", "{}"))
            except ValueError:
                card = {}
            hint = f"`organseg preprocess {card.get('source') or '<card.yaml>'}`"
            if not bool(attrs.get("complete", False)):
                raise CacheError(
                    f"{self.path}: cache is incomplete (interrupted build?); rebuild it with {hint}"
                )
            if int(attrs.get("format_version", -1)) != FORMAT_VERSION:
                raise CacheError(
                    f"{self.path}: cache format_version {attrs.get('format_version')} is not "
                    f"{FORMAT_VERSION}; rebuild it with {hint}"
                )
            self.card: dict[str, Any] = card
            self.classes: list[str] = list(json.loads(attrs["classes"]))
            self.fingerprint: str = str(attrs["fingerprint"])
            self.case_ids: list[str] = list(json.loads(attrs["case_ids"]))
            self.skipped: list[str] = list(json.loads(attrs.get("skipped", "[]")))
            self.norm: dict[str, Any] = json.loads(attrs.get("norm", "{}"))
            self.hu_window: tuple[float, float] = tuple(float(v) for v in attrs["hu_window"])
            missing = [c for c in self.case_ids if f"cases/{c}/image" not in f]
            if missing:
                raise CacheError(
                    f"{self.path}: cache is corrupt (case group(s) {missing[:3]} missing); "
                    f"rebuild it with {hint}"
                )
        except KeyError as exc:
            raise CacheError(
                f"{self.path}: cache is corrupt (root attribute {exc} missing); rebuild it with "
                f"`organseg preprocess <card.yaml>`"
            ) from None
        finally:
            f.close()
        lo, hi = self.hu_window
        self._lo, self._hi, self._scale = np.float32(lo), np.float32(hi), np.float32(2.0 / (hi - lo))
        self._case_set = set(self.case_ids)

    # ----------------------------------------------------------------- process-local state
    def _reset(self) -> None:
        self._h5: h5py.File | None = None
        self._pid: int | None = None
        self._datasets: OrderedDict[str, tuple[h5py.Dataset, h5py.Dataset]] = OrderedDict()
        self._attrs: dict[str, dict[str, Any]] = {}
        self._fg: dict[tuple[str, int], np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_h5", "_pid", "_datasets", "_attrs", "_fg"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def _open(self) -> h5py.File:
        kw = {"rdcc_nbytes": self._rdcc[0], "rdcc_nslots": self._rdcc[1]}
        target = self._opener(self.path) if self._opener is not None else self.path
        try:
            return h5py.File(target, "r", locking=self._locking, **kw)
        except TypeError:  # pragma: no cover - h5py/HDF5 without the locking option
            return h5py.File(target, "r", **kw)
        except OSError as exc:
            # HDF5 refuses a second open of a file in one process with different locking flags
            # (someone else in this process holds it open with the default locking)
            if "locking flag values don't match" not in str(exc):
                raise
            return h5py.File(target, "r", **kw)

    def _file(self) -> h5py.File:
        pid = os.getpid()
        if self._h5 is None or self._pid != pid:
            # a handle inherited through fork is dropped, never used: each process opens its own
            self._datasets = OrderedDict()
            self._h5 = self._open()
            self._pid = pid
        return self._h5

    def close(self) -> None:
        if self._h5 is not None and self._pid == os.getpid():
            self._datasets.clear()
            self._h5.close()
        self._h5 = None
        self._pid = None

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.case_ids)

    def __contains__(self, case_id: object) -> bool:
        return case_id in self._case_set

    def __repr__(self) -> str:
        return f"CacheReader({str(self.path)!r}, cases={len(self.case_ids)}, classes={len(self.classes)})"

    # ----------------------------------------------------------------- metadata
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _check_case(self, case_id: str) -> None:
        if case_id not in self._case_set:
            raise CacheError(f"{self.path}: no case {case_id!r} in the cache")

    def _case_attrs(self, case_id: str) -> dict[str, Any]:
        attrs = self._attrs.get(case_id)
        if attrs is None:
            self._check_case(case_id)
            raw = self._file()[f"cases/{case_id}"].attrs
            attrs = {k: raw[k] for k in raw}
            self._attrs[case_id] = attrs
        return attrs

    def shape(self, case_id: str) -> tuple[int, int, int]:
        return tuple(int(v) for v in self._case_attrs(case_id)["shape"])

    def spacing(self, case_id: str) -> tuple[float, float, float]:
        return tuple(float(v) for v in self._case_attrs(case_id)["spacing"])

    def class_counts(self, case_id: str) -> np.ndarray:
        return np.asarray(self._case_attrs(case_id)["class_counts"], dtype=np.int64)

    def bboxes(self, case_id: str) -> np.ndarray:
        return np.asarray(self._case_attrs(case_id)["bboxes"], dtype=np.int32)

    def centres(self, case_id: str) -> np.ndarray:
        return np.asarray(self._case_attrs(case_id)["centres"], dtype=np.float32)

    def geometry(self, case_id: str) -> dict[str, Any]:
        """Everything needed to undo the preprocessing (``organseg.io.restore_original_geometry``)."""
        a = self._case_attrs(case_id)
        out: dict[str, Any] = {}
        for key in _GEOMETRY_KEYS:
            v = np.asarray(a[key])
            out[key] = tuple(int(x) for x in v) if v.dtype.kind in "iu" else tuple(float(x) for x in v)
        return out

    def sources(self, case_id: str) -> dict[str, Any]:
        a = self._case_attrs(case_id)
        return {
            "image": str(a.get("source_image", "")),
            "label": str(a.get("source_label", "")),
            "structures": json.loads(a.get("source_structures", "{}")),
        }

    def fg_coords(self, case_id: str, class_index: int) -> np.ndarray:
        """(N, 3) int32 voxel coordinates sampled uniformly from class ``class_index`` (empty if absent)."""
        key = (case_id, int(class_index))
        coords = self._fg.get(key)
        if coords is None:
            self._check_case(case_id)
            if not 0 < int(class_index) < self.num_classes:
                raise ValueError(f"fg_coords: class index {class_index} not in 1..{self.num_classes - 1}")
            ds = self._file().get(f"cases/{case_id}/fg/{int(class_index)}")
            coords = (
                np.asarray(ds[()], dtype=np.int32).reshape(-1, 3)
                if ds is not None
                else np.zeros((0, 3), dtype=np.int32)
            )
            coords.setflags(write=False)
            self._fg[key] = coords
        return coords

    # ----------------------------------------------------------------- voxels
    def _case_datasets(self, case_id: str) -> tuple[h5py.Dataset, h5py.Dataset]:
        f = self._file()
        pair = self._datasets.get(case_id)
        if pair is None:
            self._check_case(case_id)
            g = f[f"cases/{case_id}"]
            pair = (g["image"], g["label"])
            self._datasets[case_id] = pair
            while len(self._datasets) > self._max_open:  # each open dataset holds its own chunk cache
                self._datasets.popitem(last=False)
        else:
            self._datasets.move_to_end(case_id)
        return pair

    def normalise(self, hu: np.ndarray) -> np.ndarray:
        """Clip HU to the cache's window and scale linearly to [-1, 1] (float32)."""
        out = np.clip(np.asarray(hu, dtype=np.float32), self._lo, self._hi)
        out -= self._lo
        out *= self._scale
        out -= np.float32(1.0)
        return out

    def read_patch(
        self, case_id: str, start: Sequence[int], size: Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(image float32 normalised, label uint8) of the box ``[start, start + size)`` in (x, y, z) voxels.

        The box may extend past the volume (``start`` may be negative): outside voxels are padded with
        ``PAD_VALUE`` (-1.0, normalised air) and label 0. Only the in-bounds slab is read from disk.
        """
        start = np.asarray(start, dtype=np.int64).reshape(3)
        size = np.asarray(size, dtype=np.int64).reshape(3)
        if np.any(size <= 0):  # the config's patch_size
            raise ConfigError(f"read_patch: size must be positive, got {tuple(size)}")
        shape = np.asarray(self.shape(case_id), dtype=np.int64)
        lo = np.clip(start, 0, shape)
        hi = np.clip(start + size, 0, shape)
        out_shape = tuple(int(v) for v in size)
        label = np.zeros(out_shape, dtype=np.uint8)
        if not np.all(hi > lo):  # entirely outside the volume
            return np.full(out_shape, PAD_VALUE, dtype=np.float32), label
        image_ds, label_ds = self._case_datasets(case_id)
        src = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        dst = tuple(slice(int(a - s), int(b - s)) for a, b, s in zip(lo, hi, start))
        hu = np.empty(tuple(int(v) for v in hi - lo), dtype=np.int16)
        image_ds.read_direct(hu, src)
        label_ds.read_direct(label, src, dst)
        if np.array_equal(lo, start) and np.array_equal(hi, start + size):
            return self.normalise(hu), label
        image = np.full(out_shape, PAD_VALUE, dtype=np.float32)
        image[dst] = self.normalise(hu)
        return image, label

    def read_case(self, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        """The whole cached (cropped, resampled) case: (image float32 normalised, label uint8)."""
        image_ds, label_ds = self._case_datasets(case_id)
        return self.normalise(image_ds[()]), np.asarray(label_ds[()], dtype=np.uint8)

    def read_hu(self, case_id: str) -> np.ndarray:
        """The whole cached image in (clipped) HU, int16."""
        return np.asarray(self._case_datasets(case_id)[0][()])
