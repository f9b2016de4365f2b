"""What every DataLoader worker process does first (``worker_init_fn``).

SLURM sends the pre-emption warning (``#SBATCH --signal=SIGUSR1@90``, see
``experiments/slurm/*.sbatch``) to every process of the job step, and a spawned worker would die of
SIGUSR1's default action before the main process could checkpoint: workers ignore it, the trainer
process handles it (``organseg.runtime.slurm``).
"""

from __future__ import annotations

import signal

REQUEUE_SIGNAL = signal.SIGUSR1


def init_worker(worker_id: int | None = None) -> None:
    """DataLoader ``worker_init_fn``: ignore the requeue signal (module doc)."""
    signal.signal(REQUEUE_SIGNAL, signal.SIG_IGN)
