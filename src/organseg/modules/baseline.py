"""The baseline every method is judged against: a 3D U-Net with weighted focal + Dice loss."""
from __future__ import annotations

from typing import Sequence

import torch

from organseg.losses import FocalDiceLoss, class_weights_from_counts
from organseg.models import build_unet
from organseg.modules.base import SegmentationModuleBase


class UNetBaseline(SegmentationModuleBase):
    """MONAI DynUNet trained on class-balanced patches.

    Args:
        class_weights: focal-loss class weights: a list (one per class), or a mode computed from the
            training cache's voxel counts at fit start (``inverse_sqrt_frequency``, ``inverse_frequency``,
            ``uniform``).
        focal_gamma / focal_weight / dice_weight: the loss ``focal_weight*Focal(gamma) + dice_weight*Dice``.
    """

    def __init__(self, num_classes: int, classes: Sequence[str] | None = None,
                 patch_size: Sequence[int] = (96, 96, 32),
                 filters: Sequence[int] = (16, 32, 64, 128),
                 strides: Sequence[Sequence[int]] = ((1, 1, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2)),
                 lr: float = 2e-3, weight_decay: float = 1e-5, max_epochs_for_schedule: int | None = None,
                 class_weights: str | list[float] = "inverse_sqrt_frequency", focal_gamma: float = 2.0,
                 focal_weight: float = 1.0, dice_weight: float = 1.0,
                 sw_overlap: float = 0.5, sw_batch_size: int = 2, hd95_every_n_epochs: int = 1):
        super().__init__(num_classes, classes, patch_size, sw_overlap, sw_batch_size, hd95_every_n_epochs)
        self.save_hyperparameters()
        self.net = build_unet(1, num_classes, filters, strides)
        # a fixed list is used as given; a mode is resolved from the training cache in setup(). The weights
        # live in the focal loss's buffer, so a checkpoint restores exactly what training used.
        weights = list(class_weights) if isinstance(class_weights, (list, tuple)) else [1.0] * num_classes
        self.loss_fn = FocalDiceLoss(num_classes, weights, gamma=focal_gamma, focal_weight=focal_weight,
                                     dice_weight=dice_weight)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        mode = self.hparams.class_weights
        dm = getattr(self.trainer, "datamodule", None)
        if stage == "fit" and isinstance(mode, str) and dm is not None and hasattr(dm, "class_voxel_counts"):
            w = class_weights_from_counts(dm.class_voxel_counts("train"), mode)
            self.loss_fn.focal.class_weight.copy_(torch.as_tensor(w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        terms = self.loss_fn(self(batch["image"]), batch["label"])
        bs = batch["image"].shape[0]
        for k, v in terms.items():
            self.log(f"train/{k}", v, prog_bar=k == "loss", on_step=True, on_epoch=True, batch_size=bs)
        return terms["loss"]

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        epochs = self.hparams.max_epochs_for_schedule or (self.trainer.max_epochs if self.trainer else None)
        if not epochs or epochs < 0:
            return opt
        sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=epochs, power=0.9)  # nnU-Net's poly decay
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
