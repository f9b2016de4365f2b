"""What every DataLoader worker process does first (``worker_init_fn``).

SLURM sends the pre-emption warning (``#SBATCH --signal=SIGUSR1@90``, see
``experiments/slurm/*.sbatch``) to every process of the job step, and a spawned worker would die of
SIGUSR1's default action before the main process could checkpoint: workers ignore it, the trainer
process handles it (``organseg.runtime.slurm``).

Threads: a worker is one of several processes that share the cores with the trainer. Left alone,
each would start its own pools (torch intra-op, SimpleITK/ITK, OpenMP, BLAS), one thread per core
each, and on a shared machine they fight the trainer for the cores. So a worker runs ``threads``
threads (default 1) in each library, and sets the libraries' environment variables for any process
it starts. The trainer's own count is the ``threads`` callback's (``organseg.runtime.threads``), which
also passes this number on (``CTDataModule.worker_threads``).

Start method: ``worker_context()``. Workers are never forked from the trainer (a fork of a process whose
OpenMP/torch thread pools and HDF5 handles exist can deadlock or share file state). ``spawn`` is safe but
re-imports torch, torchio and SimpleITK in every worker of every loader: 27-42 s per loader of 2 workers on
a loaded 2-core machine. A ``forkserver`` imports them once, in a clean single-threaded server process,
and forks each worker from it: a second loader's workers start in ~0.2 s (first loader ~15-16 s, against
spawn's 27-31 s in the same run). Python 3.14 makes it the default on Linux for the same reasons.
"""

from __future__ import annotations

import multiprocessing
import os
import signal

import SimpleITK as sitk
import torch

from organseg.child_processes import exit_with_parent

REQUEUE_SIGNAL = signal.SIGUSR1

# what OpenMP, BLAS builds, numexpr and ITK read when a library starts in a (child) process
THREAD_ENV_VARS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS",
)


# what a loader worker imports anyway: loaded once by the forkserver, inherited by every worker it forks
WORKER_PRELOAD = ("torch", "torchio", "SimpleITK", "h5py", "organseg.data.datasets", "organseg.data.workers")


def worker_context() -> multiprocessing.context.BaseContext:
    """The multiprocessing context of DataLoader workers (module doc): ``forkserver`` with the worker's
    heavy imports preloaded where the platform has it, else ``spawn`` (Windows)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(WORKER_PRELOAD))  # no effect once this process's server runs
    return context


def limit_threads(threads: int) -> None:
    """Run this process's libraries with ``threads`` threads: torch intra-op (and inter-op while torch
    still allows it: only before its inter-op pool has started), SimpleITK's global default, and the
    environment variables above for the processes it starts."""
    threads = int(threads)
    for var in THREAD_ENV_VARS:
        os.environ[var] = str(threads)
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # the inter-op pool already exists (or was sized): torch refuses a second call
        pass
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def init_worker(worker_id: int | None = None, threads: int | None = 1) -> None:
    """DataLoader ``worker_init_fn``: end with the parent (the trainer, or the forkserver, which ends with
    the trainer), ignore the requeue signal and run ``threads`` threads per library (module doc);
    ``threads=None`` leaves the libraries' defaults (one thread per core each)."""
    exit_with_parent()
    signal.signal(REQUEUE_SIGNAL, signal.SIG_IGN)
    if threads is not None:
        limit_threads(threads)
