"""Dataset IO: cards, on-disk layouts, validated case reading and image geometry.

SimpleITK's (z, y, x) arrays are transposed to organseg's (x, y, z) here and nowhere else
(``image_to_xyz`` / ``xyz_to_image``). Submodules are imported lazily so that ``organseg.io.card``
stays cheap to import.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DatasetCard": "card",
    "CardError": "card",
    "CaseError": "layouts",
    "CaseFiles": "layouts",
    "list_cases": "layouts",
    "read_case": "layouts",
    "read_case_sitk": "layouts",
    "IMAGE_ENDINGS": "layouts",
    "Geometry": "geometry",
    "image_to_xyz": "geometry",
    "xyz_to_image": "geometry",
    "resample_image": "geometry",
    "resample_label": "geometry",
    "resample_xyz": "geometry",
    "resample_to_grid": "geometry",
    "resampled_size": "geometry",
    "cropped_origin": "geometry",
    "restore_original_geometry": "geometry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"organseg.io.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'organseg.io' has no attribute {name!r}")
