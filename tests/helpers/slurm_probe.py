"""A callback `organseg fit` jobs in tests/test_slurm.py load (PYTHONPATH=tests): per SLURM start
(restart count) and rank, the global step training starts and ends at, and which checkpoint it
resumed from."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class StepRecorder(Callback):
    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def _write(self, what: str, trainer) -> None:
        restart = int(os.environ.get("SLURM_RESTART_COUNT", 0))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "global_step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "rank": trainer.global_rank,
            "world": trainer.world_size,
            "pid": os.getpid(),
            "restart": restart,
            "job": os.environ.get("SLURM_JOB_ID"),
            "ckpt_path": trainer.ckpt_path,
            "default_root_dir": str(trainer.default_root_dir),
        }
        (self.out_dir / f"{what}-restart{restart}-rank{trainer.global_rank}.json").write_text(
            json.dumps(record)
        )

    def on_train_start(self, trainer, pl_module):
        self._write("start", trainer)

    def on_fit_end(self, trainer, pl_module):
        self._write("end", trainer)
