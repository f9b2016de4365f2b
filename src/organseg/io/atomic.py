"""Write a file so that readers see either the old file or the complete new one, never a half."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from organseg.errors import OutputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_dirs(path: str | os.PathLike) -> Path:
    """``mkdir -p path`` for an output folder: one that cannot be created (a file in the way, no permission)
    is an :class:`OutputError` with the OSError's own one-line message, not a traceback."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError.from_os_error(exc) from exc
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """``with atomic_path(p, ".nii.gz") as tmp: writer(tmp)``: for writers that want a file name (SimpleITK,
    h5py). ``tmp`` lies beside ``p`` (same file system) with ``suffix`` (a format-picking ending); when the
    block ends it is fsynced and ``os.replace``d onto ``p``; on any error it is removed and ``p`` is
    untouched."""
    path = Path(path)
    make_dirs(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as exc:
        raise OutputError.from_os_error(exc) from exc
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result gets a normal file's permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """``with atomic_open(p, "wb") as f: ...``: writes a temp file beside ``p``, fsyncs it and
    ``os.replace``s it onto ``p``; on any error the temp file is removed and ``p`` is untouched."""
    kwargs = {} if "b" in mode else {"encoding": "utf-8", "newline": ""}
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f
        f.flush()
