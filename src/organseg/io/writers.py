"""Atomic writers for prediction outputs: label maps (any SimpleITK format, e.g. ``.nii.gz``) and JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from organseg.io.atomic import atomic_open, atomic_path
from organseg.io.layouts import IMAGE_ENDINGS


def _ending(path: Path) -> str:
    low = path.name.lower()
    return next((e for e in IMAGE_ENDINGS if low.endswith(e)), path.suffix)


def write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write ``image`` so that readers see the old file or the complete new one, never a half (a temp file
    beside ``path`` with the same ending, from which SimpleITK picks the format)."""
    path = Path(path)
    with atomic_path(path, suffix=_ending(path)) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=compress)
    return path


def write_json(data: Any, path: str | os.PathLike) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    return Path(path)
