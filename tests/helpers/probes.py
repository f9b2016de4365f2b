"""A callback the CLI tests plug into `organseg fit` subprocesses (PYTHONPATH=tests) to record,
per rank, which patches were trained on and which cases were validated."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class DrawRecorder(Callback):
    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.train: list = []
        self.val: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for cid, loc in zip(batch["case_id"], batch["location"].tolist()):
            self.train.append([trainer.current_epoch, cid, loc])

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.val += [[trainer.current_epoch, cid] for cid in batch["case_id"]]

    def on_fit_end(self, trainer, pl_module):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(
            json.dumps(
                {
                    "rank": trainer.global_rank,
                    "world": trainer.world_size,
                    "pid": os.getpid(),
                    "train": self.train,
                    "val": self.val,
                    "metrics": metrics,
                }
            )
        )


class AveragedWeightsRecorder(Callback):
    """Per rank: a SHA-256 of each weight-averaged model (and live net) of a CoTrainingWAM at fit end,
    with the EMA update count, so a DDP test can assert the averages are identical across ranks."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_fit_end(self, trainer, pl_module):
        import hashlib

        def digest(module) -> str:
            h = hashlib.sha256()
            for name, t in sorted(module.state_dict().items()):
                h.update(name.encode())
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
            return h.hexdigest()

        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"wam_rank{trainer.global_rank}.json").write_text(
            json.dumps(
                {
                    "rank": trainer.global_rank,
                    "world": trainer.world_size,
                    "global_step": trainer.global_step,
                    "hashes": {
                        n: digest(getattr(pl_module, n)) for n in ("wam_a", "wam_b", "net_a", "net_b")
                    },
                    "n_averaged": [int(pl_module.wam_a.n_averaged), int(pl_module.wam_b.n_averaged)],
                    "selected": int(pl_module.selected),
                }
            )
        )
