"""Tiny on-disk CT datasets (nnU-Net, MSD, PDDCA layouts) written with SimpleITK, for io/cache tests.

Deliberately independent of organseg's own geometry code: arrays are (x, y, z) here and transposed to
SimpleITK's (z, y, x) with plain numpy, so the tests check organseg.io's transposition instead of
reusing it.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import yaml

from organseg.io.card import DatasetCard

SPACING = (0.8, 0.9, 2.5)
ORIGIN = (-20.5, 10.25, -31.0)


def rotation_direction(angle_deg: float = 20.0) -> tuple[float, ...]:
    """A non-identity direction: rotation about z, with the y axis flipped (det = -1 is legal in ITK)."""
    a = math.radians(angle_deg)
    m = np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
    m = m @ np.diag([1.0, -1.0, 1.0])
    return tuple(float(v) for v in m.ravel())


DIRECTION = rotation_direction()
CLASSES = ["background", "brainstem", "mandible", "parotid_l"]


def phantom(
    shape: Sequence[int] = (40, 36, 12),
    seed: int = 0,
    n_organs: int = 3,
    couch: bool = True,
    noise: float = 15.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(image HU float32, label uint8), both (x, y, z): an elliptic body cylinder in air, ``n_organs``
    spherical organs labelled 1..n_organs, and (optionally) a separate couch slab under the body."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    x, y, z = np.meshgrid(np.arange(nx), np.arange(ny), np.arange(nz), indexing="ij")
    cx, cy = (nx - 1) / 2, (ny - 1) / 2 - (2 if couch else 0)
    rx, ry = 0.38 * nx, 0.33 * ny
    body = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0
    image = np.full(shape, -1000.0, dtype=np.float32)
    image[body] = 30.0
    image += rng.normal(0.0, noise, size=shape).astype(np.float32)
    if couch:
        image[2:-2, ny - 3 : ny - 1, :] = 150.0  # separate from the body: cropped away
    label = np.zeros(shape, dtype=np.uint8)
    radius = max(2.0, min(nx, ny) * 0.1)
    for k in range(1, n_organs + 1):
        ang = 2 * math.pi * (k + seed * 0.37) / n_organs
        ox, oy = cx + 0.45 * rx * math.cos(ang), cy + 0.45 * ry * math.sin(ang)
        oz = (nz - 1) / 2 + (k - 2) * 0.15 * nz
        organ = ((x - ox) ** 2 + (y - oy) ** 2 + ((z - oz) * 2.0) ** 2) <= radius**2
        organ &= body
        label[organ] = k
        image[organ] = 40.0 + 25.0 * k + rng.normal(0.0, noise, size=int(organ.sum())).astype(np.float32)
    return image, label


def to_sitk(array_xyz: np.ndarray, spacing=SPACING, origin=ORIGIN, direction=DIRECTION) -> sitk.Image:
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array_xyz).transpose(2, 1, 0)))
    img.SetSpacing(tuple(float(v) for v in spacing))
    img.SetOrigin(tuple(float(v) for v in origin))
    img.SetDirection(tuple(float(v) for v in direction))
    return img


def write(
    array_xyz: np.ndarray,
    path: Path,
    spacing=SPACING,
    origin=ORIGIN,
    direction=DIRECTION,
    compress: bool = False,
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(to_sitk(array_xyz, spacing, origin, direction), str(path), compress)
    return path


def make_nnunet_dataset(
    root: Path,
    case_ids: Sequence[str] = ("hn_000", "hn_001", "hn_002"),
    shape=(40, 36, 12),
    spacing=SPACING,
    origin=ORIGIN,
    direction=DIRECTION,
    ending: str = ".nii.gz",
    msd: bool = False,
    dataset_json: bool = True,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """imagesTr/<case>_0000<ending> (or <case><ending> with ``msd``) + labelsTr/<case><ending>."""
    root = Path(root)
    out = {}
    for i, cid in enumerate(case_ids):
        image, label = phantom(shape, seed=i)
        name = f"{cid}{ending}" if msd else f"{cid}_0000{ending}"
        write(image.astype(np.int16), root / "imagesTr" / name, spacing, origin, direction)
        write(label, root / "labelsTr" / f"{cid}{ending}", spacing, origin, direction)
        out[cid] = (image.astype(np.int16).astype(np.float32), label)
    if dataset_json:
        meta = {
            "name": root.name,
            "channel_names": {"0": "CT"},
            "file_ending": ending,
            "labels": {c: i for i, c in enumerate(CLASSES)},
            "numTraining": len(case_ids),
        }
        (root / "dataset.json").write_text(json.dumps(meta))
    return out


PDDCA_STEMS = {"BrainStem": "brainstem", "Mandible": "mandible", "Parotid_L": "parotid_l"}


def make_pddca_dataset(
    root: Path, case_ids: Sequence[str] = ("0522c0001", "0522c0002"), shape=(40, 36, 12), overlap: bool = True
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """<case>/img.nrrd + <case>/structures/<Stem>.nrrd binary masks (+ one stem not in the class map).

    With ``overlap`` the Parotid_L mask also covers part of BrainStem: merged, parotid_l (the later class
    index) wins there. Returns the expected merged class-index label per case."""
    root = Path(root)
    out = {}
    for i, cid in enumerate(case_ids):
        image, label = phantom(shape, seed=i)
        write(image.astype(np.int16), root / cid / "img.nrrd", compress=True)
        masks = {"BrainStem": label == 1, "Mandible": label == 2, "Parotid_L": label == 3}
        if overlap:
            bs = np.argwhere(label == 1)
            extra = np.zeros_like(masks["Parotid_L"])
            extra[tuple(bs[: len(bs) // 3].T)] = True
            masks["Parotid_L"] = masks["Parotid_L"] | extra
        for stem, mask in masks.items():
            write(mask.astype(np.uint8), root / cid / "structures" / f"{stem}.nrrd", compress=True)
        write(
            (label == 2).astype(np.uint8),
            root / cid / "structures" / "Unlisted_Structure.nrrd",
            compress=True,
        )
        expected = np.zeros_like(label)
        for stem, cls in PDDCA_STEMS.items():  # class index order: later index wins
            expected[masks[stem]] = CLASSES.index(cls)
        out[cid] = (image.astype(np.int16).astype(np.float32), expected)
    return out


def make_card(tmp: Path, root: Path, layout: str = "nnunet", name: str = "synth", **fields) -> DatasetCard:
    """Write ``<tmp>/<name>.yaml`` (absolute paths) and load it."""
    cache = str(Path(tmp) / "cache" / f"{name}.h5")
    raw = {
        "name": name,
        "layout": layout,
        "path": str(root),
        "cache": cache,
        "classes": CLASSES,
        "labeled": "all",
        "target_spacing": [1.0, 1.0, 3.0],
        "hu_window": [-160, 240],
    }
    if layout == "pddca":
        raw["class_map"] = dict(PDDCA_STEMS)
    raw.update(fields)
    path = Path(tmp) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return DatasetCard.load(path)


def truncate(path: Path, fraction: float = 0.5) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * fraction)])


# ---------------------------------------------------------------------------------- reader helpers
class CountingFile(io.FileIO):
    """A read-only file that counts the bytes h5py reads through it."""

    def __init__(self, path):
        super().__init__(str(path), "r")
        self.bytes_read = 0

    def readinto(self, b):
        n = super().readinto(b)
        self.bytes_read += n or 0
        return n

    def read(self, size=-1):
        data = super().read(size)
        self.bytes_read += len(data)
        return data


class CountingOpener:
    """``CacheReader(opener=...)`` hook: remembers the files it opened."""

    def __init__(self):
        self.files: list[CountingFile] = []

    def __call__(self, path):
        f = CountingFile(path)
        self.files.append(f)
        return f

    @property
    def bytes_read(self) -> int:
        return sum(f.bytes_read for f in self.files)


def read_patch_in_child(reader, case_id, start, size):
    """Target for a spawned process: unpickled reader -> patch (+ the child's pid)."""
    import os

    image, label = reader.read_patch(case_id, start, size)
    return image, label, os.getpid()
