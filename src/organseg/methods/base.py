"""What every segmentation LightningModule shares: whole-case sliding-window validation/test with
per-organ metrics gathered across DDP ranks, the names of docs/architecture.md §4.7, and checkpoints
that carry their dataset cards (so ``organseg evaluate --ckpt X`` needs nothing else)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from organseg.errors import ConfigError
from organseg.evaluation.metrics import case_metrics, summarize
from organseg.evaluation.overlays import choose_slices, slice_areas
from organseg.evaluation.report import write_report
from organseg.inference.sliding_window import predict_labels
from organseg.methods.checkpoints import CHECKPOINT_KEY
from organseg.runs import run_dir


def log_loss_terms(module: pl.LightningModule, terms: dict, batch_size: int, prefix: str = "train") -> None:
    """Log each loss term under its logged name per step (``train/loss``, ``train/loss_focal``, ...)
    and its epoch mean as ``<name>_epoch``. Two calls, because one ``self.log(on_step, on_epoch)``
    renames both to ``_step``/``_epoch`` and the plain name a sweep or dashboard expects would not exist."""
    for k, v in terms.items():
        module.log(
            f"{prefix}/{k}", v, prog_bar=k == "loss", on_step=True, on_epoch=False, batch_size=batch_size
        )
        module.log(f"{prefix}/{k}_epoch", v, on_step=False, on_epoch=True, batch_size=batch_size)


class SegmentationModuleBase(pl.LightningModule):
    """Subclasses build ``self.net`` (or override ``forward``) and ``training_step``."""

    # whether ``training_step`` reads ``batch["heatmap"]``: the DataModule builds and warps those targets
    # only for modules that do (they cost a third of the loader's time for an S-Net stage that ignores them)
    uses_heatmap_targets = False

    def __init__(
        self,
        num_classes: int,
        classes: Sequence[str] | None = None,
        patch_size: Sequence[int] = (96, 96, 32),
        sw_overlap: float = 0.5,
        sw_batch_size: int = 2,
        hd95_every_n_epochs: int = 1,
    ):
        super().__init__()
        self.num_classes = int(num_classes)
        self.classes = (
            list(classes) if classes else ["background"] + [f"class_{i}" for i in range(1, num_classes)]
        )
        if len(self.classes) != self.num_classes:
            raise ConfigError(f"classes has {len(self.classes)} names but num_classes={num_classes}")
        self.patch_size = [int(p) for p in patch_size]
        self.sw_overlap = sw_overlap
        self.sw_batch_size = sw_batch_size
        self.hd95_every_n_epochs = hd95_every_n_epochs
        self._rows: list[dict] = []
        self.best_dice = -math.inf
        self.cards: list[dict] = []  # filled from the DataModule, saved in checkpoints
        self.run_config: str | None = None  # resolved CLI config, saved in checkpoints
        # organseg.runtime.callbacks.ValidationImages sets how many axial slices of the first validation case
        # (rank 0) to keep for W&B images; 0 keeps nothing
        self.val_image_slices = 0
        self.val_images: dict | None = None

    @property
    def patch_divisor(self) -> tuple[int, int, int] | None:
        """What every patch (and sliding window) size must be a multiple of, per axis (x, y, z), for this
        module's network to accept it (its total downsampling); None when any size works. ``organseg
        fit|validate|test`` checks ``data.init_args.patch_size`` against it before any work starts."""
        return None

    # ---------------------------------------------------------------- data plumbing
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and getattr(dm, "card_dicts", None):
            self.cards = dm.card_dicts

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "cards": self.cards,
            "classes": self.classes,
            "config": self.run_config,
            "best_dice": self.best_dice,
            "module": f"{type(self).__module__}.{type(self).__qualname__}",
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        extra = checkpoint.get(CHECKPOINT_KEY, {})
        self.cards = extra.get("cards", self.cards)
        self.run_config = extra.get("config", self.run_config)
        best = extra.get("best_dice")
        self.best_dice = -math.inf if best is None else best

    # ---------------------------------------------------------------- inference
    def predict_case(
        self,
        image: torch.Tensor,
        progress: bool = False,
        window_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Label map [B,*S] for whole cases [B,1,*S] (sliding window, Gaussian blending).
        ``window_transform``: applied to each window before the network, e.g. the HU normalisation of an
        int16 case (``organseg predict``: no float32 copy of the whole case is held)."""
        return predict_labels(
            self,
            image,
            self.patch_size,
            overlap=self.sw_overlap,
            sw_batch_size=self.sw_batch_size,
            progress=progress,
            window_transform=window_transform,
        )

    # ---------------------------------------------------------------- evaluation
    def _evaluate_batch(self, batch: dict, with_hd95: bool) -> list[dict]:
        pred = self.predict_case(batch["image"]).cpu().numpy()
        label = batch["label"].cpu().numpy()
        self._keep_val_images(batch, pred, label)
        rows = []
        for i in range(pred.shape[0]):
            spacing = tuple(float(s) for s in batch["spacing"][i])
            labeled = batch["labeled"][i].cpu().numpy().tolist()
            rows += case_metrics(
                pred[i],
                label[i],
                spacing,
                self.classes,
                labeled=labeled,
                case_id=batch["case_id"][i],
                distances=with_hd95,
            )
        return rows

    def _keep_val_images(self, batch: dict, pred, label) -> None:
        """On rank 0, keep ``val_image_slices`` axial slices (image, label, prediction) of the epoch's
        first validation case: the slices showing the most organs (``choose_slices``), 2D, not volumes."""
        trainer = self._trainer
        if (
            not self.val_image_slices
            or self.val_images is not None
            or trainer is None
            or not trainer.validating
            or not trainer.is_global_zero
        ):
            return

        zs = choose_slices(slice_areas(label[0], self.num_classes), self.val_image_slices)
        self.val_images = {
            "case_id": str(batch["case_id"][0]),
            "slices": zs,
            "spacing": [float(s) for s in batch["spacing"][0]],
            "image": batch["image"][0, 0][..., zs].float().cpu().numpy(),
            "label": label[0][..., zs],
            "pred": pred[0][..., zs],
        }

    def _with_hd95(self) -> bool:
        return self.hd95_every_n_epochs > 0 and (self.current_epoch + 1) % self.hd95_every_n_epochs == 0

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._rows += self._evaluate_batch(batch, with_hd95=self._with_hd95())

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._rows += self._evaluate_batch(batch, with_hd95=True)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Whole-case label maps in the cache geometry (Lightning's ``trainer.predict``); label maps in the
        original geometry (NIfTI/RTSTRUCT) come from the ``organseg predict`` tool (``cli/predict.py``)."""
        return {"case_id": batch["case_id"], "labels": self.predict_case(batch["image"]).cpu()}

    def _gather_rows(self) -> list[dict]:
        rows, self._rows = self._rows, []
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, rows)  # every rank calls it: no rank-0-only collectives
            rows = [r for part in gathered for r in part]
        return rows

    def _log_summary(self, prefix: str, rows: list[dict]) -> list[dict]:
        summary = summarize(rows)
        for s in summary:
            if s["organ"] == "mean":
                continue
            self.log(f"{prefix}/dice/{s['organ']}", _f(s["dice_mean"]), sync_dist=False, rank_zero_only=False)
            if not math.isnan(_f(s.get("hd95_mean"))):
                self.log(f"{prefix}/hd95/{s['organ']}", _f(s["hd95_mean"]), sync_dist=False)
        mean = next(s for s in summary if s["organ"] == "mean")
        self.log(f"{prefix}/dice_mean", _f(mean["dice_mean"]), prog_bar=True, sync_dist=False)
        self.log(f"{prefix}/cases", float(len({r["case_id"] for r in rows})), sync_dist=False)
        return summary

    def on_validation_epoch_end(self) -> None:
        rows = self._gather_rows()
        if not rows or self.trainer.sanity_checking:
            return
        summary = self._log_summary("val", rows)
        dice = _f(next(s for s in summary if s["organ"] == "mean")["dice_mean"])
        if not math.isnan(dice):
            self.best_dice = max(self.best_dice, dice)
        self.log("val/dice_best", self.best_dice, sync_dist=False)  # sweeps optimise the best, not the last
        organs = sorted(
            (s for s in summary if s["organ"] != "mean" and not math.isnan(_f(s["dice_mean"]))),
            key=lambda s: _f(s["dice_mean"]),
        )
        worst = ", ".join(f"{s['organ']} {_f(s['dice_mean']):.2f}" for s in organs[:3])
        self.print(
            f"epoch {self.current_epoch} step {self.global_step}: val/dice_mean {dice:.3f} "
            f"(best {self.best_dice:.3f}; lowest: {worst})"
        )

    def on_test_epoch_end(self) -> None:
        rows = self._gather_rows()
        if not rows:
            return
        self._log_summary("test", rows)
        if self.trainer.is_global_zero:
            out = run_dir(self.trainer) / "test_report"
            write_report(rows, out, title="test")
            self.print(f"test report: {out}")


def _f(x) -> float:
    return float("nan") if x is None else float(x)
