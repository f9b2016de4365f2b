"""``organseg fit`` under SLURM: one run per job, checkpoint + requeue on pre-emption, resume.

What a job gets (``experiments/slurm/*.sbatch`` launch it with ``srun organseg fit ...``):

- a stable run: W&B id ``slurm-<job id>`` (``<array job>_<task>`` for array tasks) unless one is
  given, and ``trainer.default_root_dir`` = the run folder ``lightning_logs/<project>/<run id>``;
  SLURM keeps the job id across requeues, so a requeued job finds its own folder and W&B run;
- on the pre-emption warning (``#SBATCH --signal=SIGUSR1@90``) the ranks save the HPC checkpoint
  ``<run folder>/hpc_ckpt_<n>.ckpt`` together at the next training step, rank 0 runs
  ``scontrol requeue`` and the job exits; the requeued job resumes from the newest of the HPC checkpoint and
  ``checkpoints/last.ckpt`` (the latter covers a requeue without warning, e.g. a node failure).

Why not Lightning's ``SLURMEnvironment(auto_requeue=True)`` as is: its handler saves the checkpoint
*inside* the signal handler on every rank, i.e. at an arbitrary bytecode of each rank (mid-backward
on one, mid-forward on another), and ``save_checkpoint`` ends with a barrier that then meets
unrelated DDP collectives (Lightning issue #21406: intermittent hangs). Here the handler only sets a
flag; the ranks agree on it at a step boundary (one tiny all-reduce per step) and checkpoint
together. The file name and folder are Lightning's, so ``ckpt_path="hpc"`` still finds it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment
from lightning.fabric.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

from organseg.data.workers import REQUEUE_SIGNAL  # workers ignore it (organseg.data.workers)


def job_id(env: os._Environ | dict | None = None) -> str | None:
    """The id SLURM keeps across requeues, or None when Lightning would not treat this as a SLURM
    run (not under srun/sbatch, or an interactive ``bash`` job: see ``SLURMEnvironment.detect``)."""
    env = os.environ if env is None else env
    if (
        "SLURM_NTASKS" not in env
        or env.get("SLURM_JOB_NAME") in ("bash", "interactive")
        or "SLURM_JOB_ID" not in env
    ):
        return None
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env["SLURM_JOB_ID"]


def apply_job_defaults(config, env=None) -> str | None:
    """Under SLURM, give a ``fit`` config (jsonargparse Namespace, before instantiation) a run that
    survives requeues: W&B ``id`` ``$WANDB_RUN_ID`` or ``slurm-<job>`` (if none given), ``resume: allow``, and
    ``default_root_dir`` = that run's folder (if left at the default ``lightning_logs``).
    Returns the job id (None outside SLURM, config untouched)."""
    job = job_id(env)
    if job is None:
        return None
    trainer = config.trainer
    logger = trainer.get("logger")
    folder = Path("lightning_logs") / f"slurm-{job}"
    if _is_wandb(logger):
        args = logger.init_args
        if not (args.get("id") or args.get("version")):
            # a sweep trial (wandb agent / organseg sweep) brings its own run id: one W&B run per trial
            args.id = (env if env is not None else os.environ).get("WANDB_RUN_ID") or f"slurm-{job}"
        if args.get("resume") is None:
            args.resume = "allow"
        project = args.get("project") or os.environ.get("WANDB_PROJECT", "lightning_logs")
        folder = (
            Path(args.get("save_dir") or args.get("dir") or "lightning_logs")
            / project
            / (args.get("id") or args.version)
        )
    if str(trainer.get("default_root_dir") or "lightning_logs").rstrip("/") == "lightning_logs":
        trainer.default_root_dir = str(folder)
    return job


def _is_wandb(logger) -> bool:
    return (
        logger is not None
        and not isinstance(logger, (bool, list))
        and str(getattr(logger, "class_path", "") or "").endswith("WandbLogger")
        and getattr(logger, "init_args", None) is not None
    )


def hpc_checkpoints(folder: Path) -> list[Path]:
    """``hpc_ckpt_<n>.ckpt`` in ``folder``, oldest number first (Lightning's naming)."""
    found = [
        (int(m.group(1)), p)
        for p in Path(folder).glob("hpc_ckpt_*.ckpt")
        if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))
    ]
    return [p for _, p in sorted(found)]


def resume_checkpoint(default_root_dir: Path, run_folder: Path) -> Path | None:
    """The checkpoint a (re)started job continues from: the newest (by time written) of the last
    HPC checkpoint and ``checkpoints/last*.ckpt``; None for a fresh job."""
    candidates = hpc_checkpoints(default_root_dir)[-1:] + list(
        (Path(run_folder) / "checkpoints").glob("last*.ckpt")
    )
    candidates = [p for p in candidates if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def requeue_command(env=None) -> list[str]:
    env = os.environ if env is None else env
    job = env["SLURM_JOB_ID"]
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return ["scontrol", "requeue", job]


def trainer_setup(config: dict, callbacks: list) -> tuple[dict, list]:
    """Trainer kwargs and callbacks for a SLURM job: Lightning's SLURMEnvironment without its
    in-handler requeue, plus ``SlurmRequeue``. Unchanged outside SLURM or when the config names its
    own cluster environment plugin (then that one decides)."""
    if job_id() is None:
        return config, callbacks
    plugins = config.get("plugins") or []
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if any(isinstance(p, ClusterEnvironment) for p in plugins):
        return config, callbacks
    return (
        {**config, "plugins": [*plugins, SLURMEnvironment(auto_requeue=False)]},
        [*callbacks, SlurmRequeue(REQUEUE_SIGNAL)],
    )


def _close_wandb_runs(trainer) -> None:
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            try:
                logger.experiment.finish()
            except Exception as exc:  # logging must not cost the requeue
                rank_zero_warn(f"organseg: closing the W&B run before requeue failed: {exc}")


class SlurmRequeue(Callback):
    """Checkpoint-and-requeue on SLURM's pre-emption warning, at a step boundary on all ranks.

    The signal handler only records the request (forked processes that inherit it ignore it).
    After each training batch the ranks OR their flags; if any got the signal, all of them save
    ``<default_root_dir>/hpc_ckpt_<n+1>.ckpt``, rank 0 closes the W&B run and runs
    ``scontrol requeue <job>``, and every rank exits at once. If the requeue is refused (job not
    requeueable), training goes on.
    """

    def __init__(self, signum: int = REQUEUE_SIGNAL):
        self.signum = signal.Signals(signum)
        self._pid: int | None = None
        self._requested = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        if os.getpid() == self._pid:
            self._requested = True

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or self._pid is not None:
            return
        self._pid, self._requested = os.getpid(), False
        try:
            self._previous = signal.signal(self.signum, self._handler)
        except ValueError:  # not the main thread: nothing can be installed
            self._pid = None

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._pid == os.getpid() and stage == "fit":
            try:
                signal.signal(self.signum, self._previous if self._previous is not None else signal.SIG_DFL)
            except ValueError:
                pass
            self._pid = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.strategy.reduce_boolean_decision(self._requested, all=False):
            return
        self._requested = False
        folder = Path(trainer.default_root_dir)
        existing = hpc_checkpoints(folder)
        number = int(re.findall(r"\d+", existing[-1].name)[0]) + 1 if existing else 1
        path = trainer.strategy.broadcast(str(folder / f"hpc_ckpt_{number}.ckpt"), src=0)
        rank_zero_info(
            f"organseg: SLURM pre-emption signal: saving {path} at global step {trainer.global_step}"
        )
        trainer.save_checkpoint(path)  # all ranks (sharded strategies), ends in a barrier
        ok = False
        if trainer.is_global_zero:
            _close_wandb_runs(trainer)  # flushed and closed before SLURM's SIGTERM; the restart resumes it
            cmd = requeue_command()
            try:
                result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
                ok = result.returncode == 0
                if not ok:
                    rank_zero_warn(
                        f"organseg: `{' '.join(cmd)}` failed ({result.returncode}): "
                        f"{result.stderr.strip()}; training goes on"
                    )
            except (OSError, subprocess.TimeoutExpired) as exc:
                rank_zero_warn(f"organseg: `{' '.join(cmd)}` failed: {exc}; training goes on")
        if trainer.strategy.broadcast(ok, src=0):
            rank_zero_info(
                f"organseg: requeued SLURM job {job_id()}; this run exits and resumes when it restarts"
            )
            # SLURM now SIGTERMs (then SIGKILLs) every process of the step, DataLoader workers included:
            # a normal teardown would only race it. The checkpoint is on disk and W&B closed, so leave now.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)


def fit_ckpt_path(trainer, ckpt_path, run_folder: Path):
    """``fit``'s ``ckpt_path`` for this process: as given, or, for a SLURM job started without one,
    the checkpoint a requeued job continues from (None on its first start)."""
    if ckpt_path is not None or job_id() is None:
        return ckpt_path
    found = resume_checkpoint(Path(trainer.default_root_dir), run_folder)
    if found is not None:
        rank_zero_info(
            f"organseg: SLURM job {job_id()} (restart {os.environ.get('SLURM_RESTART_COUNT', 0)}) "
            f"resumes from {found}"
        )
        return str(found)
    return None
