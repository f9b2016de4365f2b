"""A real, tiny UNetBaseline checkpoint (one training step, its card riding along as `organseg fit`'s),
for the tests of the commands that read checkpoints (predict, evaluate, error reporting)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch

from organseg.io.card import DatasetCard
from organseg.methods import UNetBaseline


def tiny_unet_checkpoint(card: DatasetCard, folder: Path) -> Path:
    torch.manual_seed(0)
    model = UNetBaseline(
        num_classes=card.num_classes,
        classes=card.classes,
        patch_size=(64, 64, 16),
        filters=[4, 8, 8],
        strides=[[1, 1, 1], [2, 2, 1], [2, 2, 2]],
        class_weights=[1.0] * card.num_classes,
    )
    model.cards = [card.to_dict()]
    batch = {"image": torch.randn(1, 32, 32, 16), "label": torch.randint(0, card.num_classes, (32, 32, 16))}
    trainer = pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=1))
    path = folder / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return path
