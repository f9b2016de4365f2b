"""Thread counts of a run: loader workers 1 thread each, the trainer process its share of the cores.

Left to the libraries, every process of a run (the trainer and each DataLoader worker) starts its own
pools (torch intra-op, OpenMP, BLAS, SimpleITK), each one thread per core, and on a machine shared
with other jobs they fight for the cores (issue 11: 17x fewer steps for ~3x less CPU). The ``threads``
section of ``organseg fit|validate|test`` (this callback, registered by ``cli/lightning.py``) sets them:

.. code-block:: yaml

    threads:
      trainer: null   # torch intra-op threads of each training process; null: its share of the cores
      workers: 1      # threads per DataLoader worker (torch, SimpleITK, OpenMP/BLAS env vars)
      enabled: true   # false: leave every library's default (the behaviour before this setting)

A process's share of the cores (``cores_per_process``) is the CPUs it may run on
(``os.sched_getaffinity``, capped by a cgroup v2 CPU quota) divided among the training processes of
its node (``trainer.num_devices``: under DDP each rank gets its part); in a SLURM job with
``--cpus-per-task`` it is that count (srun may or may not bind each task to its own CPUs).

Why the trainer keeps all of its share although the loader workers run beside it: with OpenMP's
waiting threads passive (``runtime/openmp.py``, chosen by the ``organseg`` command) 2 trainer threads on
2 cores with 2 loader workers made 1.4x the steps/s of 1 thread on free cores and 1.3x beside 2 busy
processes, at the same CPU seconds per step (``benchmarks/threads_under_load.py``, results in
``benchmarks/results/threads_under_load_cpu_2026-11-29.md``). What collapses under load is OpenMP's
default spinning, not the thread count.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from organseg.errors import ConfigError
from organseg.runtime import slurm
from organseg.runtime.openmp import wait_policy

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


def available_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """CPUs this process may use: its affinity set, capped by a cgroup v2 CPU quota (containers)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def cores_per_process(local_processes: int = 1, env: dict | None = None, cpus: int | None = None) -> int:
    """This training process's share of the cores (module doc): ``cpus`` (default ``available_cpus()``)
    over the training processes of this node, or SLURM's ``--cpus-per-task`` in a SLURM job."""
    env = os.environ if env is None else env
    cpus = available_cpus() if cpus is None else cpus
    per_task = str(env.get("SLURM_CPUS_PER_TASK", ""))
    if slurm.job_id(env) is not None and per_task.isdigit() and int(per_task) > 0:
        return max(1, min(cpus, int(per_task)))
    return max(1, cpus // max(1, local_processes))


def loader_workers(datamodule) -> int | None:
    """``num_workers`` of a DataModule's hyper-parameters (CTDataModule's), None if it has none."""
    hparams = getattr(datamodule, "hparams", None)
    value = hparams.get("num_workers") if hasattr(hparams, "get") else None
    return None if value is None else int(value)


class Threads(Callback):
    """Set the trainer's torch intra-op threads and the loader workers' threads when a run starts.

    Args:
        trainer: intra-op threads of each training process; null = its share of the cores
            (``cores_per_process``).
        workers: threads per DataLoader worker (``CTDataModule.worker_threads``, ``data/workers.py``).
        enabled: false leaves every library's default (trainer: one thread per core; workers: SimpleITK
            and OpenMP one per core, torch 1 as DataLoader sets it), the behaviour before this setting.

    The numbers are printed when the run starts (rank 0), e.g. ``organseg: threads: trainer 2 intra-op,
    2 loader workers x 1 (2 cores per training process; OMP_WAIT_POLICY=PASSIVE)``; the trainer's
    previous count is restored when the run ends (in-process callers keep theirs).
    """

    def __init__(self, trainer: int | None = None, workers: int = 1, enabled: bool = True):
        if trainer is not None and not (_is_int(trainer) and trainer >= 1):
            raise ConfigError(
                f"threads.trainer: must be an integer >= 1 or null (the process's share of the cores), "
                f"got {trainer!r}"
            )
        if not (_is_int(workers) and workers >= 1):
            raise ConfigError(f"threads.workers: must be an integer >= 1, got {workers!r}")
        self.trainer_threads = trainer
        self.worker_threads = workers
        self.enabled = bool(enabled)
        self._previous: int | None = None

    def chosen(self, trainer) -> tuple[int, int | None, int]:
        """(trainer intra-op threads, threads per loader worker or None, cores per training process)."""
        share = cores_per_process(_processes_per_node(trainer))
        if not self.enabled:
            return torch.get_num_threads(), None, share
        return self.trainer_threads or share, self.worker_threads, share

    def setup(self, trainer, pl_module, stage: str) -> None:
        intra, per_worker, share = self.chosen(trainer)
        if self.enabled and self._previous is None:
            self._previous = torch.get_num_threads()
            torch.set_num_threads(intra)
        datamodule = getattr(trainer, "datamodule", None)
        if hasattr(datamodule, "worker_threads"):
            datamodule.worker_threads = per_worker
        if trainer.is_global_zero:
            print(self.describe(intra, per_worker, share, trainer), flush=True)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._previous is not None:
            torch.set_num_threads(self._previous)
            self._previous = None

    def describe(self, intra: int, per_worker: int | None, share: int, trainer) -> str:
        """The line printed when the run starts."""
        n_workers = loader_workers(getattr(trainer, "datamodule", None))
        loaders = "loader workers" if n_workers is None else f"{n_workers} loader worker{_s(n_workers)}"
        each = "with library defaults" if per_worker is None else f"x {per_worker}"
        processes = _processes_per_node(trainer)
        where = f"{share} core{_s(share)} per training process"
        if processes > 1:
            where += f", {processes} on this node"
        text = f"organseg: threads: trainer {intra} intra-op, {loaders} {each} ({where}; {wait_policy()})"
        if not self.enabled:
            text += "; threads.enabled: false, so library defaults"
        return text


def _processes_per_node(trainer) -> int:
    return max(1, int(getattr(trainer, "num_devices", 1) or 1))


def _s(count: int) -> str:
    return "" if count == 1 else "s"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
