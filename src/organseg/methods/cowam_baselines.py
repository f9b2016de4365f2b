"""Baselines of the co-training WAM comparison (few-organ datasets, one unified label space).

- naive union: :class:`~organseg.methods.UNetBaseline` on all few-organ cards (unannotated organs = 0);
- single-dataset models: UNetBaseline on one card each; combined at inference by :class:`MultiModel`
  (N forward passes), which is also the pseudo-label generator of ``organseg pseudolabel``;
- self-training: :class:`SelfTrainingUNet`, ground truth + fixed hard pseudo-labels (batch ``pseudo``);
- marginal loss: :class:`MarginalUNet`, Shi et al. 2021's merged-background focal + Dice, with their
  exclusion loss (``exclusion_weight``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from organseg.errors import CheckpointError, ConfigError
from organseg.inference.sliding_window import predict_probabilities
from organseg.losses.partial_labels import MarginalFocalDiceLoss, merge_pseudo_labels
from organseg.methods.base import SegmentationModuleBase, log_loss_terms
from organseg.methods.checkpoints import load_module
from organseg.methods.unet_baseline import UNetBaseline


class MarginalUNet(UNetBaseline):
    """UNetBaseline trained with the marginal loss: per sample, background and the classes its dataset
    does not annotate share one merged-background probability (``batch["labeled"]``), plus Shi et al.'s
    exclusion loss (an unannotated organ's probability on the annotated organs' ground truth, as a soft
    Dice overlap, ``organseg.losses.partial_labels.exclusion_dice``).

    Args:
        exclusion_weight: weight of the exclusion loss; default 2.0, the published pairing (marginal +
            exclusion, the authors' code adds ``2 * ex_loss``); 0 = marginal loss only (ours, the
            project's earlier baseline). Other args: ``UNetBaseline``.
    """

    # the signature is UNetBaseline's, spelled out: LightningCLI links arguments and restores checkpoints
    # by the class's own signature, which *args/**kwargs would hide
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
        exclusion_weight: float = 2.0,
    ):
        if exclusion_weight < 0:
            raise ConfigError(f"model exclusion_weight must be >= 0, got {exclusion_weight}")
        super().__init__(
            num_classes,
            classes,
            patch_size,
            filters,
            strides,
            lr,
            weight_decay,
            max_epochs_for_schedule,
            class_weights,
            focal_gamma,
            focal_weight,
            dice_weight,
            sw_overlap,
            sw_batch_size,
            hd95_every_n_epochs,
            spacing,
            kernel_sizes,
        )
        self.loss_fn = MarginalFocalDiceLoss(
            self.num_classes,
            list(self.loss_fn.focal.class_weight.tolist()),
            gamma=focal_gamma,
            focal_weight=focal_weight,
            dice_weight=dice_weight,
            exclusion_weight=exclusion_weight,
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        terms = self.loss_fn(self(batch["image"]), batch["label"], batch["labeled"])
        return _log_terms(self, terms, batch)


class SelfTrainingUNet(UNetBaseline):
    """UNetBaseline trained on ground truth + fixed hard pseudo-labels of the unannotated organs
    (:func:`~organseg.losses.partial_labels.merge_pseudo_labels`; data ``pseudo_labels`` must be set)."""

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if "pseudo" not in batch:
            raise ConfigError(
                "SelfTrainingUNet needs pseudo-labels in the batch: set "
                "data.init_args.pseudo_labels (files from `organseg pseudolabel`)"
            )
        target = merge_pseudo_labels(batch["label"], batch["labeled"], batch["pseudo"])
        return _log_terms(self, self.loss_fn(self(batch["image"]), target), batch)


def _log_terms(module, terms: dict, batch: dict) -> torch.Tensor:
    bs = batch["image"].shape[0]
    log_loss_terms(module, terms, bs)
    return terms["loss"]


def checkpoint_organs(extra: dict, where: str) -> list[str]:
    """Organs a checkpoint's model was trained to segment: the union of its cards' ``labeled``."""
    cards = extra.get("cards") or []
    if not cards:
        raise CheckpointError(
            f"checkpoint {where}: carries no dataset card, so which organs it annotates is unknown"
        )
    organs: list[str] = []
    for c in cards:
        organs += [o for o in c.get("labeled", []) if o not in organs]
    return organs


class MultiModel(SegmentationModuleBase):
    """N single-dataset models combined at inference (N forward passes), each contributing only the
    organs its own dataset annotates; a voxel claimed by several experts goes to the most confident
    (highest softmax probability of its organ). Not trainable: use with ``organseg test``/``validate``.

    Args:
        checkpoints: the single-dataset models' checkpoints (each carries its cards: ``labeled``).
        exclude_organs: organs no expert may contribute (``organseg pseudolabel`` passes the organs the
            pseudo-labelled dataset annotates itself); experts left with none are not loaded.
        device: where the experts are loaded (Lightning moves them afterwards).
    """

    def __init__(
        self,
        num_classes: int,
        classes: Sequence[str] | None = None,
        patch_size: Sequence[int] = (96, 96, 32),
        checkpoints: Sequence[str] = (),
        exclude_organs: Iterable[str] = (),
        device: str = "cpu",
        sw_overlap: float = 0.5,
        sw_batch_size: int = 2,
        hd95_every_n_epochs: int = 1,
    ):
        super().__init__(num_classes, classes, patch_size, sw_overlap, sw_batch_size, hd95_every_n_epochs)
        self.save_hyperparameters()

        if not checkpoints:
            raise ConfigError(
                "MultiModel: checkpoints is empty (give the single-dataset models' checkpoints)"
            )
        exclude = set(exclude_organs)
        experts, self.expert_organs, self.expert_organ_names, self.expert_checkpoints = [], [], [], []
        for path in checkpoints:
            model, extra = load_module(path, device)
            if list(model.classes) != self.classes:
                raise CheckpointError(
                    f"checkpoint {path}: classes {model.classes} differ from {self.classes}"
                )
            organs = [o for o in checkpoint_organs(extra, str(path)) if o not in exclude]
            if not organs:
                continue
            experts.append(model)
            self.expert_organ_names.append(organs)
            self.expert_organs.append([self.classes.index(o) for o in organs])
            self.expert_checkpoints.append(os.fspath(path))
        self.experts = nn.ModuleList(experts)
        for p in self.experts.parameters():
            p.requires_grad_(False)

    @classmethod
    def from_checkpoints(
        cls,
        checkpoints: Sequence[str],
        classes: Sequence[str],
        exclude_organs: Iterable[str] = (),
        device: str = "cpu",
    ) -> MultiModel:
        return (
            cls(
                len(classes),
                list(classes),
                checkpoints=[os.fspath(c) for c in checkpoints],
                exclude_organs=list(exclude_organs),
                device=device,
            )
            .eval()
            .to(device)
        )

    @torch.no_grad()
    def predict_case(self, image: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """uint8 label map [B,*S]: each expert's argmax restricted to its organs, conflicts to the
        higher probability; voxels no expert claims are background."""
        out = torch.zeros((image.shape[0], *image.shape[2:]), dtype=torch.uint8, device=image.device)
        best = torch.zeros(out.shape, dtype=torch.float32, device=image.device)
        for expert, organs in zip(self.experts, self.expert_organs):
            probs = predict_probabilities(
                expert,
                image,
                expert.patch_size,
                overlap=expert.sw_overlap,
                sw_batch_size=expert.sw_batch_size,
                progress=progress,
            )
            winner = probs.argmax(1)
            for c in organs:
                take = (winner == c) & (probs[:, c] > best)
                out[take] = c
                best = torch.where(take, probs[:, c], best)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("MultiModel has no single forward pass; use predict_case")

    def training_step(self, batch: dict, batch_idx: int):
        raise ConfigError(
            "MultiModel combines trained checkpoints and cannot be trained; train each "
            "single-dataset model with experiments/cowam/single_dataset.yaml"
        )

    def configure_optimizers(self):
        return None
