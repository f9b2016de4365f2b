"""glibc malloc settings for whole-volume inference: keep freed memory in the process.

A sliding-window network call allocates and frees its activations (tens of MB each) once per window.
glibc serves blocks above its mmap threshold with a fresh ``mmap`` and returns them with ``munmap``
(and trims the heap top above the trim threshold), so every window touches new pages: ~360,000 page
faults and 0.8 CPU-s of kernel time per S-Net window pair at 96 x 96 x 32, a fifth of the CPU time
(``benchmarks/results/focusnet_inference_cpu_2026-11-29.md``). ``retain_freed_memory`` raises the
mmap threshold to glibc's maximum (32 MiB on 64-bit), keeps up to 2 GiB of free heap top untrimmed
and grows the heap in 1 GiB steps, so the next window reuses the pages of the last: the same results
for ~20 % less CPU. The cost: memory freed after the peak goes back to the system only when the
process exits (peak RSS ~0.5 GB higher), which suits a command that predicts and exits
(``organseg predict``, ``evaluate``, ``pseudolabel``). The same as exporting ``MALLOC_MMAP_THRESHOLD_=33554432
MALLOC_TRIM_THRESHOLD_=2147483647 MALLOC_TOP_PAD_=1073741824`` before the process starts.
Elsewhere than glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["release_freed_memory", "retain_freed_memory"]

# mallopt parameter numbers from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
TRIM_THRESHOLD = 2**31 - 1  # the largest mallopt accepts (an int): the heap top is kept up to 2 GiB
TOP_PAD = 1024 * 2**20


def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name)
    except (OSError, TypeError):
        return None


def release_freed_memory() -> bool:
    """Hand the heap's free pages back to the system now (glibc ``malloc_trim(0)``), e.g. between
    preprocessing, whose slab-sized scratch the retained heap would otherwise keep resident, and the
    sliding window, whose large buffers are mmapped apart from it. True if glibc released anything."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return bool(trim(0))


def retain_freed_memory() -> bool:
    """Apply the settings above to this process's glibc malloc; True if glibc accepted all three."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX),
        (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (M_TOP_PAD, TOP_PAD),
    )
    return all(mallopt(param, value) == 1 for param, value in settings)
