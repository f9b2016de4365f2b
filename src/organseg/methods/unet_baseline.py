"""The baseline every method is judged against: a 3D U-Net with weighted focal + Dice loss."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from organseg.losses import FocalDiceLoss, class_weights_from_counts
from organseg.methods.base import SegmentationModuleBase, log_loss_terms
from organseg.networks import build_unet


def resolve_class_weights(module, loss_fn: FocalDiceLoss, mode, stage: str) -> None:
    """At fit start, replace the focal weights of ``loss_fn`` by the weights of ``mode`` (a string:
    ``inverse_sqrt_frequency``, ...) computed from the training cache's voxel counts; a fixed list
    (already given to the loss) or a missing DataModule leaves them as they are. Shared by every
    module trained with ``FocalDiceLoss`` (UNetBaseline, FocusNetV2 S-Net stages)."""
    trainer = getattr(module, "_trainer", None)
    dm = getattr(trainer, "datamodule", None) if trainer is not None else None
    if stage == "fit" and isinstance(mode, str) and dm is not None and hasattr(dm, "class_voxel_counts"):
        counts = dm.class_voxel_counts("train")
        absent = getattr(dm, "absent_class_weight", "zero")
        w = class_weights_from_counts(counts, mode, absent=absent)
        loss_fn.focal.class_weight.copy_(torch.as_tensor(w))
        missing = [str(c) for c, n in zip(getattr(module, "classes", range(len(counts))), counts) if n <= 0]
        if missing and mode != "uniform":
            rule = "the largest weight" if absent == "max" else "weight 0 (never a target)"
            module.print(f"class weights: no training voxels of {missing}: {rule}")


def initial_class_weights(class_weights, num_classes: int) -> list[float]:
    """The loss's initial focal weights: a fixed list as given, uniform for a mode (resolved later)."""
    return list(class_weights) if isinstance(class_weights, (list, tuple)) else [1.0] * num_classes


def stride_product(strides: Sequence[Sequence[int]]) -> tuple[int, int, int]:
    """A U-Net's total downsampling per axis (x, y, z): the product of its levels' strides; patch sizes
    must be multiples of it, or the skip connections' shapes disagree."""
    return tuple(math.prod(int(s[axis]) for s in strides) for axis in range(3))


def adamw_poly(module, params, lr: float, weight_decay: float, max_epochs_for_schedule: int | None):
    """AdamW with nnU-Net's poly decay per epoch (no schedule when the epoch count is unknown)."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    trainer = getattr(module, "_trainer", None)
    epochs = max_epochs_for_schedule or (trainer.max_epochs if trainer else None)
    if not epochs or epochs < 0:
        return opt
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=epochs, power=0.9)  # nnU-Net's poly decay
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def warmup_step_decay(
    total_steps: int, warmup_steps: int, milestones: Sequence[int], gamma: float
) -> Callable[[int], float]:
    """The learning-rate factor per optimiser step for a step budget (``LambdaLR``): upstream FocusNetV2's
    exponential warm-up ``exp(10 (s / warmup - 1))`` over ``warmup_steps`` (``train_backbone.py``: over its
    first 5 epochs), then ``gamma`` per milestone passed (its x0.1 at epochs 200 and 400 of 600). A step
    budget (``--trainer.max_steps``) sets ``total_steps``, so the schedule runs its whole course whatever the
    budget; ``total_steps`` only bounds the milestones."""
    marks = sorted(min(int(m), int(total_steps)) for m in milestones)

    def factor(step: int) -> float:
        warm = math.exp(10.0 * (step / warmup_steps - 1.0)) if warmup_steps and step < warmup_steps else 1.0
        return warm * gamma ** sum(step >= m for m in marks)

    return factor


class UNetBaseline(SegmentationModuleBase):
    """MONAI DynUNet trained on class-balanced patches.

    Args:
        class_weights: focal-loss class weights: a list (one per class), or a mode computed from the
            training cache's voxel counts at fit start (``inverse_sqrt_frequency``, ``inverse_frequency``,
            ``uniform``).
        focal_gamma / focal_weight / dice_weight: the loss ``focal_weight*Focal(gamma) + dice_weight*Dice``.
        spacing: the cache's voxel spacing (mm, x y z; the card's ``target_spacing``, linked by the CLI):
            the kernel sizes follow it by nnU-Net's rule (``networks.unet.kernel_sizes_for_spacing``:
            (3, 3, 1) while z is at least twice the in-plane spacing). None (no data known, and
            checkpoints written before this argument): 3x3x3 at every level.
        kernel_sizes: one (x, y, z) kernel per level; given, it overrides the spacing rule.
    """

    def __init__(
        self,
        num_classes: int,
        classes: Sequence[str] | None = None,
        patch_size: Sequence[int] = (96, 96, 32),
        filters: Sequence[int] = (16, 32, 64, 128),
        strides: Sequence[Sequence[int]] = ((1, 1, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2)),
        lr: float = 2e-3,
        weight_decay: float = 1e-5,
        max_epochs_for_schedule: int | None = None,
        class_weights: str | list[float] = "inverse_sqrt_frequency",
        focal_gamma: float = 2.0,
        focal_weight: float = 1.0,
        dice_weight: float = 1.0,
        sw_overlap: float = 0.5,
        sw_batch_size: int = 2,
        hd95_every_n_epochs: int = 1,
        spacing: Sequence[float] | None = None,
        kernel_sizes: Sequence[Sequence[int]] | None = None,
    ):
        super().__init__(num_classes, classes, patch_size, sw_overlap, sw_batch_size, hd95_every_n_epochs)
        self.save_hyperparameters()
        self.net = build_unet(1, num_classes, filters, strides, kernel_sizes=kernel_sizes, spacing=spacing)
        # a fixed list is used as given; a mode is resolved from the training cache in setup(). The weights
        # live in the focal loss's buffer, so a checkpoint restores exactly what training used.
        weights = initial_class_weights(class_weights, num_classes)
        self.loss_fn = FocalDiceLoss(
            num_classes, weights, gamma=focal_gamma, focal_weight=focal_weight, dice_weight=dice_weight
        )

    def setup(self, stage: str) -> None:
        super().setup(stage)
        resolve_class_weights(self, self.loss_fn, self.hparams.class_weights, stage)

    @property
    def patch_divisor(self) -> tuple[int, int, int]:
        return stride_product(self.hparams.strides)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        terms = self.loss_fn(self(batch["image"]), batch["label"])
        bs = batch["image"].shape[0]
        log_loss_terms(self, terms, bs)
        return terms["loss"]

    def configure_optimizers(self):
        return adamw_poly(
            self,
            self.parameters(),
            self.hparams.lr,
            self.hparams.weight_decay,
            self.hparams.max_epochs_for_schedule,
        )
