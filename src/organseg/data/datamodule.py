"""The LightningDataModule every method shares: one or several HDF5 caches, one label space.

Several cards (few-organ datasets) must declare the same ``classes`` list (the unified label
space) and differ in ``labeled``; each sample carries its dataset's ``labeled[C]`` vector, so a
loss can tell "background" from "not annotated here".
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
from torch.utils.data import DataLoader

from organseg.cache.build import build_cache
from organseg.cache.reader import CacheReader
from organseg.data.augmentation import AugmentationConfig
from organseg.data.datasets import CacheSource, CaseStream, PatchStream
from organseg.data.pseudo_labels import PseudoLabelReader
from organseg.data.workers import init_worker
from organseg.io.card import CardError, DatasetCard


class CTDataModule(pl.LightningDataModule):
    """Class-balanced training patches and whole-case validation/test from HDF5 caches.

    Args:
        cards: dataset card files (``data_modules/cards/*.yaml``), one per dataset.
        patch_size: training patch (x, y, z voxels); also the sliding-window size at evaluation.
        batch_size: patches per batch and per process.
        patches_per_epoch: patches per epoch summed over all DDP ranks.
        num_workers: DataLoader worker processes per rank (each opens the caches itself).
        foreground_probability: chance that a patch is centred on an organ voxel (rest: anywhere).
        organ_weights: optional {organ: relative weight} for the organ centre draw (default equal).
        dataset_weights: optional relative weight per card (default equal: balanced across datasets).
        augmentation: torchio augmentation settings (``AugmentationConfig`` fields) or null for none.
        preprocess: build/refresh each card's cache in ``prepare_data`` (a no-op when up to date).
        heatmap_sigma_mm: if set, training samples carry ``heatmap`` targets (FocusNetV2 SOL-Net) for the
            cards' small organs (``small_organs`` order), Gaussians of this sigma (mm) at the organ centres.
        pseudo_labels: optional hard pseudo-label files (``organseg pseudolabel``), one per card in order
            (null for a card without); training batches then carry ``pseudo`` int64 [B,X,Y,Z] (0 where
            none), augmented with the label. A file stale for its card's cache is an error.
        seed: base seed of the patch streams.

    A split name may also be ``all`` (every cached case of each card, e.g. ``test_split: all`` for a
    dataset used only for testing).
    """

    def __init__(
        self,
        cards: Sequence[str],
        patch_size: Sequence[int] = (96, 96, 32),
        batch_size: int = 2,
        patches_per_epoch: int = 200,
        num_workers: int = 2,
        foreground_probability: float = 0.67,
        organ_weights: dict[str, float] | None = None,
        dataset_weights: Sequence[float] | None = None,
        augmentation: dict[str, Any] | None = None,
        preprocess: bool = True,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "test",
        val_max_cases: int | None = None,
        heatmap_sigma_mm: float | None = None,
        pseudo_labels: Sequence[str | None] | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        if isinstance(cards, (str, Path)):
            cards = [cards]
        self.cards = [DatasetCard.load(c) for c in cards]
        classes = self.cards[0].classes
        for card in self.cards[1:]:
            if card.classes != classes:
                raise CardError(
                    f"{card.source}: classes differ from {self.cards[0].source}; cards in one "
                    f"DataModule must share the unified class list"
                )
        self.classes = list(classes)
        self.patch_size = [int(p) for p in patch_size]
        if organ_weights:
            bad = sorted(set(organ_weights) - set(self.classes[1:]))
            if bad:
                raise CardError(f"organ_weights names unknown organ(s) {bad}")
        self.augmentation = AugmentationConfig.from_any(augmentation)
        if pseudo_labels is not None and len(pseudo_labels) != len(self.cards):
            raise CardError(
                f"pseudo_labels has {len(pseudo_labels)} entries for {len(self.cards)} cards "
                f"(one file or null per card, in the cards' order)"
            )
        self.pseudo_labels = list(pseudo_labels) if pseudo_labels is not None else [None] * len(self.cards)
        self._pseudo_readers: list | None = None
        self._readers: list | None = None
        self._splits: list[dict[str, list[str]]] = []
        self.train_stream: PatchStream | None = None

    # ---------------------------------------------------------------- label space
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def small_organs(self) -> list[str]:
        return sorted({o for c in self.cards for o in c.small}, key=self.classes.index)

    @property
    def target_spacing(self) -> list[float]:
        """The (first) card's target spacing: the voxel size every cached case has (mm, x y z)."""
        return [float(v) for v in self.cards[0].target_spacing]

    @property
    def card_dicts(self) -> list[dict]:
        return [c.to_dict() for c in self.cards]

    # ---------------------------------------------------------------- caches
    def prepare_data(self) -> None:
        # Lightning calls this on one process per node before setup(): the place to build caches.
        if self.hparams.preprocess:
            for card in self.cards:
                build_cache(card, workers=max(1, self.hparams.num_workers))

    def readers(self) -> list:
        if self._readers is None:
            self._readers = [CacheReader(card.cache) for card in self.cards]
            self._splits = [card.split_cases(r.case_ids) for card, r in zip(self.cards, self._readers)]
        return self._readers

    def pseudo_readers(self) -> list:
        """One PseudoLabelReader (or None) per card, validated against the card's cache."""
        if self._pseudo_readers is None:
            self._pseudo_readers = [
                None
                if p is None
                else PseudoLabelReader(p, cache_fingerprint=r.fingerprint, case_ids=r.case_ids)
                for p, r in zip(self.pseudo_labels, self.readers())
            ]
        return self._pseudo_readers

    def sources(self, split: str) -> list[CacheSource]:
        readers = self.readers()
        pseudo = self.pseudo_readers() if split == self.hparams.train_split else [None] * len(readers)
        return [
            CacheSource(
                card.name,
                r,
                list(r.case_ids) if split == "all" else s[split],
                np.asarray(card.labeled_mask, dtype=bool),
                q,
            )
            for card, r, s, q in zip(self.cards, readers, self._splits, pseudo)
        ]

    def class_voxel_counts(self, split: str = "train") -> np.ndarray:
        """Voxels per class summed over a split's cases (for inverse-frequency loss weights)."""
        total = np.zeros(self.num_classes, dtype=np.float64)
        for src in self.sources(split):
            for cid in src.case_ids:
                total += src.reader.class_counts(cid)
        return total

    # ---------------------------------------------------------------- loaders
    def _rank_world(self) -> tuple[int | None, int | None]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return None, None
        return trainer.global_rank, trainer.world_size

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # samples travel compactly from the loader workers (float16 image, uint8 label; see
        # organseg.data.datasets); modules get float32 / int64 on their device
        if isinstance(batch, dict):
            for key in ("image", "heatmap"):
                if key in batch:
                    batch[key] = batch[key].float()
            for key in ("label", "pseudo"):
                if key in batch:
                    batch[key] = batch[key].long()
        return batch

    def setup(self, stage: str | None = None) -> None:
        self.readers()

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        rank, world = self._rank_world()
        weights = None
        if hp.organ_weights:
            weights = [1.0] + [float(hp.organ_weights.get(o, 1.0)) for o in self.classes[1:]]
        aug = self.augmentation
        self.train_stream = PatchStream(
            self.sources(hp.train_split),
            self.patch_size,
            hp.batch_size,
            hp.patches_per_epoch,
            foreground_probability=hp.foreground_probability,
            organ_weights=weights,
            dataset_weights=hp.dataset_weights,
            transform=aug.build() if aug else None,
            margin=aug.margin(self.patch_size) if aug else (0, 0, 0),
            seed=hp.seed,
            rank=rank,
            world_size=world,
            heatmap_classes=[self.classes.index(o) for o in self.small_organs] if hp.heatmap_sigma_mm else (),
            heatmap_sigma_mm=hp.heatmap_sigma_mm or 5.0,
        )
        trainer = getattr(self, "trainer", None)
        self.train_stream.epoch_offset = trainer.current_epoch if trainer is not None else 0
        return DataLoader(
            self.train_stream,
            batch_size=hp.batch_size,
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
            worker_init_fn=init_worker,
            multiprocessing_context="spawn" if hp.num_workers > 0 else None,
        )

    def _case_loader(self, split: str, max_cases: int | None = None) -> DataLoader:
        rank, world = self._rank_world()
        sources = self.sources(split)
        if max_cases:
            sources = [CacheSource(s.name, s.reader, s.case_ids[:max_cases], s.labeled) for s in sources]
        # whole cases are big: at most one worker, which reads the next case while this one is inferred
        workers = min(1, self.hparams.num_workers)
        return DataLoader(
            CaseStream(sources, rank=rank, world_size=world),
            batch_size=1,
            num_workers=workers,
            persistent_workers=workers > 0,
            multiprocessing_context="spawn" if workers else None,
            worker_init_fn=init_worker,
        )

    def val_dataloader(self) -> DataLoader:
        return self._case_loader(self.hparams.val_split, self.hparams.val_max_cases)

    def test_dataloader(self) -> DataLoader:
        return self._case_loader(self.hparams.test_split)

    def predict_dataloader(self) -> DataLoader:
        return self._case_loader(self.hparams.test_split)
