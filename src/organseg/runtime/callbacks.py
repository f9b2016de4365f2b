"""Lightning callbacks the ``organseg`` CLI adds to every run."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

from organseg.errors import ConfigError
from organseg.evaluation.overlays import save_overlays
from organseg.runs import run_dir


class ValidationImages(Callback):
    """After every validation (rank 0), a few axial CT slices of the first validation case with the
    reference (solid) and predicted (dashed) contours, drawn by ``evaluation.overlays.save_overlays``,
    logged as a W&B image under ``key`` and kept as ``<run folder>/val_images/epochNNN.png``.

    Only active when a ``WandbLogger`` is attached; the module (a ``SegmentationModuleBase``) keeps
    just the chosen 2D slices of that case, not volumes.

    Slices are drawn radiologically (anterior up, patient's left on the right, A/P/R/L marked) using
    the case's direction cosines, looked up by case id in the datamodule's caches (the cache keeps
    each scan's direction); where it cannot be found, the identity direction is assumed.

    Args:
        n_slices: slices per image (chosen to show the most organs); 0 turns the images off.
        key: the W&B key.
    """

    def __init__(self, n_slices: int = 3, key: str = "val/contours"):
        if n_slices < 0:
            raise ConfigError(f"val_images.n_slices must be >= 0, got {n_slices}")
        self.n_slices = int(n_slices)
        self.key = key

    def _active(self, trainer, pl_module) -> bool:
        return (
            self.n_slices > 0
            and hasattr(pl_module, "val_image_slices")
            and any(isinstance(lg, WandbLogger) for lg in trainer.loggers)
        )

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self._active(trainer, pl_module):
            pl_module.val_image_slices = self.n_slices

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if hasattr(pl_module, "val_images"):
            pl_module.val_images = None

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        sample = getattr(pl_module, "val_images", None)
        if sample is None or not trainer.is_global_zero or not self._active(trainer, pl_module):
            return
        pl_module.val_images = None

        zs = sample["slices"]
        caption = (
            f"{sample['case_id']} epoch {trainer.current_epoch} step {trainer.global_step}: "
            "solid reference, dashed prediction"
        )
        png = save_overlays(
            sample["image"],
            sample["label"],
            sample["pred"],
            pl_module.classes,
            run_dir(trainer) / "val_images" / f"epoch{trainer.current_epoch:03d}.png",
            spacing=sample["spacing"],
            title=caption,
            slices=range(len(zs)),
            slice_labels=[f"z={z}" for z in zs],
            direction=case_direction(trainer, sample["case_id"]),
        )
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=self.key, images=[str(png)], caption=[caption], step=trainer.global_step)


def case_direction(trainer, case_id: str) -> tuple[float, ...] | None:
    """The cached direction cosines of ``case_id`` from the trainer's datamodule (``CTDataModule``
    readers), or None (the overlay then assumes the identity) when there is no such datamodule, no
    cache holds the case, or two caches hold it with different directions."""
    readers = getattr(getattr(trainer, "datamodule", None), "readers", None)
    if not callable(readers):
        return None
    found = {tuple(r.geometry(case_id)["direction"]) for r in readers() if case_id in r.case_ids}
    return found.pop() if len(found) == 1 else None


class RemoveFailedRun(Callback):
    """A run that fails before it has anything worth keeping removes what it created: the run folder
    (``runs.run_dir``: its config, an empty checkpoints folder) and, in W&B's offline mode, the local W&B run
    (an online run is finished as failed; deleting it needs the W&B API). "Worth keeping": a ``fit`` that
    completed a training step; ``validate``/``test`` write their results only when they end, so any failed
    one. A folder that existed before the run (a resumed or requeued fit, a re-used run id) is never
    removed. :meth:`arm` is called by the CLI right before the Trainer runs (``cli/lightning.py``)."""

    def __init__(self) -> None:
        self.parent: Path | None = None
        self.existing: set[str] = set()
        self.fitting = False
        self.stepped = False

    def arm(self, trainer, fitting: bool) -> None:
        """Note which run folders exist now (the run's own is created in ``setup``)."""
        self.parent = run_dir(trainer).parent
        self.existing = set(os.listdir(self.parent)) if self.parent.is_dir() else set()
        self.fitting, self.stepped = fitting, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.stepped = True

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self.parent is None or (self.fitting and self.stepped) or not trainer.is_global_zero:
            return
        removed = []
        folder = run_dir(trainer)
        if folder.parent == self.parent and folder.name not in self.existing and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(str(folder))
        wandb = sys.modules.get("wandb")  # imported by the WandbLogger when it started a run
        run = getattr(wandb, "run", None)
        if run is not None:
            offline, local = bool(run.offline), Path(run.dir).parent
            wandb.finish(exit_code=1)
            if offline and local.is_dir():
                shutil.rmtree(local, ignore_errors=True)
                for link in local.parent.iterdir():  # latest-run, debug.log, ...: links into the run
                    if link.is_symlink() and not link.exists():
                        link.unlink()
                removed.append(f"the offline W&B run {local}")
        if removed:
            when = " before its first training step" if self.fitting else ""
            print(f"organseg: the run failed{when}; removed {' and '.join(removed)}", flush=True)
        self.parent = None
