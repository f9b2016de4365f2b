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
"""

from __future__ import annotations

import os
import signal

import SimpleITK as sitk
import torch

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
    """DataLoader ``worker_init_fn``: ignore the requeue signal and run ``threads`` threads per library
    (module doc); ``threads=None`` leaves the libraries' defaults (one thread per core each)."""
    signal.signal(REQUEUE_SIGNAL, signal.SIG_IGN)
    if threads is not None:
        limit_threads(threads)
