"""The HDF5 preprocessing cache: ``build_cache`` (``organseg preprocess``) and ``CacheReader``.

Submodules are imported lazily: ``organseg.cache.reader`` (the training hot path) needs only h5py and
numpy, while ``organseg.cache.build`` pulls in SimpleITK and scipy.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CacheReader": "reader",
    "CacheError": "reader",
    "FORMAT_VERSION": "reader",
    "PAD_VALUE": "reader",
    "build_cache": "build",
    "inspect_cache": "build",
    "preprocess_case": "build",
    "CHUNKS": "build",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"organseg.cache.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'organseg.cache' has no attribute {name!r}")
