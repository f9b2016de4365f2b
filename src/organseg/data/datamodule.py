"""The LightningDataModule every method shares: one or several HDF5 caches, one label space.

Several cards (few-organ datasets) must declare the same ``classes`` list (the unified label
space) and differ in ``labeled``; each sample carries its dataset's ``labeled[C]`` vector, so a
loss can tell "background" from "not annotated here".
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
from torch.utils.data import DataLoader

from organseg.cache.build import build_cache
from organseg.cache.reader import CacheReader
from organseg.data.augmentation import SPATIAL_MODES, AugmentationConfig
from organseg.data.datasets import PATCH_CENTRES, CacheSource, CaseStream, PatchStream
from organseg.data.pseudo_labels import PseudoLabelError, PseudoLabelReader
from organseg.data.workers import init_worker, worker_context
from organseg.errors import ConfigError
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
            cards' small organs (``small_organs`` order), Gaussians of this sigma (mm) at the organ centres,
            when the trainer's module reads them (its ``uses_heatmap_targets``; S-Net's stage does not).
        pseudo_labels: optional hard pseudo-label files (``organseg pseudolabel``), one per card in order
            (null for a card without); training batches then carry ``pseudo`` int64 [B,X,Y,Z] (0 where
            none), augmented with the label. A file stale for its card's cache is an error.
        class_counts: how ``class_voxel_counts`` (the focal loss's inverse-frequency class weights) counts,
            the same way for every method on these cards (:func:`count_class_voxels`): ``annotated``
            (default) = each organ's frequency over the datasets that annotate it; ``gt_and_pseudo`` =
            ground truth plus the pseudo-labels of the organs a dataset does not annotate (needs
            ``pseudo_labels`` for every card with such organs); ``gt`` (ours, the earlier rule) = ground
            truth only, unannotated organs counted as background, and a class with no voxels gets the
            largest weight (the other two give it weight 0: it is never a target).
        patch_centres: ``gt_and_pseudo`` (default): with pseudo-labels, organ-centred patches are drawn per
            organ, equally, over the ground-truth organs and the pseudo-labelled organs a dataset does not
            annotate (the union label map the network learns); ``gt`` (ours, the earlier rule): ground-truth
            organs only. Without pseudo-labels the two are the same.
        seed: base seed of the patch streams; null (default) follows the run's seed (``seed_everything``,
            which Lightning exports as ``PL_GLOBAL_SEED``; 0 without one), so one seed sets model init, data
            order and patches alike.

    A split name may also be ``all`` (every cached case of each card, e.g. ``test_split: all`` for a
    dataset used only for testing).

    Each loader worker runs ``worker_threads`` threads per library (torch, SimpleITK, OpenMP/BLAS;
    ``data/workers.py``): 1 unless the ``threads`` section of ``organseg fit`` (``runtime/threads.py``,
    ``threads.workers``) sets it before the loaders are made; None leaves the libraries' defaults.
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
        patch_centres: str = "gt_and_pseudo",
        class_counts: str = "annotated",
        seed: int | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        check_arguments(self.hparams)  # the CLI checked them already, naming the config keys
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
        self.worker_threads: int | None = 1

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
        """Voxels per class over a split's cases, counted as ``class_counts`` says (for inverse-frequency
        loss weights); pseudo-labels exist for the training split only."""
        mode = self.hparams.class_counts
        sources = self.sources(split)
        if mode == "gt_and_pseudo" and split != self.hparams.train_split:
            mode = "annotated"
        return count_class_voxels(sources, self.num_classes, mode)

    @property
    def absent_class_weight(self) -> str:
        """What a class with no counted voxels weighs (``class_weights_from_counts``'s ``absent``):
        ``max`` under ``class_counts: gt`` (the earlier rule), else ``zero``."""
        return "max" if self.hparams.class_counts == "gt" else "zero"

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
            seed=self.stream_seed,
            rank=rank,
            world_size=world,
            heatmap_classes=self._heatmap_classes(),
            heatmap_sigma_mm=hp.heatmap_sigma_mm or 5.0,
            patch_centres=hp.patch_centres,
        )
        trainer = getattr(self, "trainer", None)
        self.train_stream.epoch_offset = trainer.current_epoch if trainer is not None else 0
        return DataLoader(
            self.train_stream,
            batch_size=hp.batch_size,
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
            worker_init_fn=partial(init_worker, threads=self.worker_threads),
            multiprocessing_context=worker_context() if hp.num_workers > 0 else None,
        )

    @property
    def stream_seed(self) -> int:
        """The patch streams' base seed: ``seed``, else the run's (``PL_GLOBAL_SEED``), else 0."""
        if self.hparams.seed is not None:
            return int(self.hparams.seed)
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def _heatmap_classes(self) -> list[int]:
        """Small-organ class indices to build ``heatmap`` targets for: none without ``heatmap_sigma_mm``,
        and none when the trainer's module says its ``training_step`` does not read them
        (``uses_heatmap_targets``, e.g. FocusNetV2's S-Net stage), since building and warping K extra
        channels per patch costs loader time for nothing. Without a trainer (a loader made by hand) the
        config decides."""
        if not self.hparams.heatmap_sigma_mm:
            return []
        trainer = getattr(self, "trainer", None)
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        if module is not None and not getattr(module, "uses_heatmap_targets", True):
            return []
        return [self.classes.index(o) for o in self.small_organs]

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
            multiprocessing_context=worker_context() if workers else None,
            worker_init_fn=partial(init_worker, threads=self.worker_threads),
        )

    def val_dataloader(self) -> DataLoader:
        return self._case_loader(self.hparams.val_split, self.hparams.val_max_cases)

    def test_dataloader(self) -> DataLoader:
        return self._case_loader(self.hparams.test_split)

    def predict_dataloader(self) -> DataLoader:
        return self._case_loader(self.hparams.test_split)


# ------------------------------------------------------------------------------- class counts
CLASS_COUNTS = ("annotated", "gt_and_pseudo", "gt")


def count_class_voxels(
    sources: Sequence[CacheSource], num_classes: int, mode: str = "annotated"
) -> np.ndarray:
    """float64 [C]: voxels per class over the sources' cases (V = all their voxels), for class weights.

    - ``annotated``: organ c's frequency f_c = n_c / V_c over the cases of the datasets that annotate c
      (V_c their voxels), returned as f_c V; background = V - sum_c f_c V. It needs no pseudo-labels, so
      every method on the same cards (naive union, marginal, self-training, co-training, an expert on
      one card) counts alike; on fully labelled data it is the ground-truth count. An organ no dataset
      annotates counts 0.
    - ``gt_and_pseudo``: the union label map the pseudo-label methods learn: ground truth for the organs
      a dataset annotates, its pseudo-labels for the others; background = V - organs (a pseudo voxel on a
      ground-truth organ, rare, is counted for both). A source with unannotated organs and no
      pseudo-labels is an error.
    - ``gt`` (ours, the earlier rule): ground truth only; unannotated organs count as background.
    """
    if mode not in CLASS_COUNTS:
        raise ConfigError(f"class_counts must be one of {list(CLASS_COUNTS)}, got {mode!r}")
    organs = np.zeros(num_classes, dtype=np.float64)
    gt = np.zeros(num_classes, dtype=np.float64)
    annotated_voxels = np.zeros(num_classes, dtype=np.float64)
    total = 0.0
    for src in sources:
        labeled = np.asarray(src.labeled, dtype=bool)
        unannotated = ~labeled
        unannotated[0] = False
        if mode == "gt_and_pseudo" and unannotated.any() and src.case_ids and src.pseudo is None:
            raise ConfigError(
                f"class_counts=gt_and_pseudo: card {src.name} does not annotate every organ and has no "
                f"pseudo_labels; use class_counts=annotated"
            )
        for cid in src.case_ids:
            counts = np.asarray(src.reader.class_counts(cid), dtype=np.float64)
            voxels = float(np.prod(src.reader.shape(cid)))
            total += voxels
            gt += counts
            annotated_voxels += labeled * voxels
            if mode == "gt_and_pseudo":
                pseudo = (
                    np.asarray(src.pseudo.class_counts(cid), dtype=np.float64) if unannotated.any() else 0.0
                )
                organs += np.where(labeled, counts, 0.0) + np.where(unannotated, pseudo, 0.0)
    if mode == "gt":
        return gt
    if mode == "annotated":
        freq = np.divide(gt, annotated_voxels, out=np.zeros_like(gt), where=annotated_voxels > 0)
        organs = freq * total
    organs[0] = 0.0
    organs[0] = max(total - organs.sum(), 0.0)  # background: every voxel no organ claims
    return organs


# ------------------------------------------------------------------------------- argument checks
SPLITS = ("train", "val", "test", "all")


def check_arguments(args: Mapping[str, Any], where: str = "CTDataModule.", training: bool = False) -> None:
    """Check ``CTDataModule``'s arguments (parameter name -> value; absent names are skipped) before
    anything is built or read: every card exists, every size and count is in range, every split is one
    the cards define; with ``training``, also the pseudo-label files (only training reads them). A problem
    is a one-line error naming ``<where><name>`` (``ConfigError``; a missing card or pseudo-label file:
    ``CardError``/``PseudoLabelError``). ``organseg fit|validate|test`` calls it on the parsed config with
    ``where="data.init_args."`` before it instantiates anything, e.g.
    ``data.init_args.patch_size: must be 3 positive integers (x, y, z voxels), got [-48, 48, 16]``."""

    def bad(name: str, problem: str) -> ConfigError:
        return ConfigError(f"{where}{name}: {problem}")

    cards = args.get("cards")
    if cards is not None:
        cards = [cards] if isinstance(cards, (str, Path)) else list(cards)
        if not cards:
            raise bad("cards", "is empty; give at least one dataset card (data_modules/cards/*.yaml)")
        for card in cards:
            if not Path(card).is_file():
                raise CardError(f"{where}cards: {card}: dataset card not found")
    size = args.get("patch_size")
    if size is not None:
        sized = isinstance(size, Sequence | np.ndarray) and not isinstance(size, str)
        values = list(size) if sized else [size]
        if len(values) != 3 or not all(_is_int(v) and v > 0 for v in values):
            shown = [int(v) if _is_int(v) else v for v in values]
            raise bad("patch_size", f"must be 3 positive integers (x, y, z voxels), got {shown}")
    for name, low in (("batch_size", 1), ("patches_per_epoch", 1), ("num_workers", 0), ("seed", 0)):
        value = args.get(name)
        if value is not None and not (_is_int(value) and value >= low):
            raise bad(name, f"must be an integer >= {low}, got {value!r}")
    value = args.get("val_max_cases")
    if value is not None and not (_is_int(value) and value >= 1):
        raise bad("val_max_cases", f"must be an integer >= 1 or null (all cases), got {value!r}")
    value = args.get("foreground_probability")
    if value is not None and not (_is_number(value) and 0.0 <= value <= 1.0):
        raise bad("foreground_probability", f"must be a probability in [0, 1], got {value!r}")
    value = args.get("class_counts")
    if value is not None and value not in CLASS_COUNTS:
        raise bad("class_counts", f"must be one of {list(CLASS_COUNTS)}, got {value!r}")
    value = args.get("patch_centres")
    if value is not None and value not in PATCH_CENTRES:
        raise bad("patch_centres", f"must be one of {list(PATCH_CENTRES)}, got {value!r}")
    value = args.get("heatmap_sigma_mm")
    if value is not None and not (_is_number(value) and value > 0):
        raise bad("heatmap_sigma_mm", f"must be > 0 (mm) or null (no heatmap targets), got {value!r}")
    weights = args.get("organ_weights")
    if weights and not all(_is_number(w) and w >= 0 for w in dict(weights).values()):
        raise bad("organ_weights", f"weights must be numbers >= 0, got {dict(weights)}")
    weights = args.get("dataset_weights")
    if weights is not None:
        weights = list(weights)
        if cards is not None and len(weights) != len(cards):
            raise bad("dataset_weights", f"has {len(weights)} entries for {len(cards)} cards (one per card)")
        if not all(_is_number(w) and w >= 0 for w in weights) or not sum(weights) > 0:
            raise bad("dataset_weights", f"must be numbers >= 0, not all 0, got {weights}")
    augmentation = args.get("augmentation")
    if isinstance(augmentation, Mapping):
        known = [f.name for f in dataclasses.fields(AugmentationConfig)]
        unknown = sorted(set(augmentation) - set(known))
        if unknown:
            raise bad("augmentation", f"unknown key(s) {unknown}; known: {known}")
        spatial = augmentation.get("spatial", "composed")
        if spatial not in SPATIAL_MODES:
            raise bad("augmentation", f"spatial must be one of {list(SPATIAL_MODES)}, got {spatial!r}")
    for path in (args.get("pseudo_labels") or ()) if training else ():
        if path is not None and not Path(path).is_file():
            raise PseudoLabelError(
                f"{where}pseudo_labels: {path}: pseudo-label file not found; create it with "
                f"`organseg pseudolabel --ckpt ... --card ... --out {path}`"
            )
    if cards is not None:
        defined = set(SPLITS)
        for card in cards:
            defined |= {k for k in (DatasetCard.load(card).split or {}) if k != "seed"}
        for name in ("train_split", "val_split", "test_split"):
            value = args.get(name)
            if value is not None and value not in defined:
                raise bad(name, f"unknown split {value!r}; the cards define {sorted(defined)}")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
