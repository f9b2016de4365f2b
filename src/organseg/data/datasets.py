"""Iterable datasets over HDF5 caches: training patches and whole validation/test cases.

Both shard themselves by (DDP rank, DataLoader worker), so Lightning never wraps them in a
DistributedSampler (it does not for IterableDatasets) and no case or patch stream is duplicated.

Sample dict (DESIGN.md): ``image`` float32 [1,X,Y,Z], ``label`` [X,Y,Z], ``labeled`` bool [C],
``case_id`` str, ``location`` int64 [6] (start xyz, stop xyz in the cached case), ``dataset`` int;
with ``heatmap_classes`` set (FocusNetV2's small organs), ``heatmap`` [K,X,Y,Z]: a Gaussian
(sigma in mm) at each organ's cached centre, transformed with the patch so it follows augmentation;
with pseudo-labels (``CacheSource.pseudo``), ``pseudo`` [X,Y,Z]: hard pseudo-labels of the organs the
dataset does not annotate, read from the same box and moved by the same spatial transform as ``label``.
Between processes the sample is compact: ``image`` float16 (exact to ~0.1 HU in a 400 HU window, half
the bytes of float32) and ``label`` uint8 (an eighth of int64); ``CTDataModule.on_after_batch_transfer``
restores float32 (image, heatmap) / int64 (label, pseudo) on the training device, so modules see the DESIGN.md dtypes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torchio as tio
from torch.utils.data import IterableDataset

from organseg.data.sampling import draw_centre, patch_start
from organseg.data.sharding import current_shard, split_evenly


@dataclass
class CacheSource:
    """One preprocessed dataset: its cache reader, the cases of one split, and what it annotates."""
    name: str
    reader: "object"           # organseg.cache.reader.CacheReader (picklable, opens h5py per process)
    case_ids: list[str]
    labeled: np.ndarray        # bool [C] in the unified class list
    pseudo: "object | None" = None  # organseg.data.pseudo_labels.PseudoLabelReader (hard pseudo-labels) or None


def _affine(spacing) -> np.ndarray:
    return np.diag([*map(float, spacing), 1.0])


class PatchStream(IterableDataset):
    """Class-balanced training patches read lazily (patch + augmentation margin only) from HDF5.

    Each epoch every (rank, worker) stream yields its share of ``patches_per_epoch`` in whole
    batches, seeded by (seed, epoch, rank, worker): distinct across processes, reproducible across runs.
    Workers must be persistent (the DataModule sets it) so the per-iteration epoch counter advances.
    """

    def __init__(self, sources: Sequence[CacheSource], patch_size: Sequence[int], batch_size: int,
                 patches_per_epoch: int, foreground_probability: float = 0.67,
                 organ_weights: Sequence[float] | None = None, dataset_weights: Sequence[float] | None = None,
                 transform: tio.Transform | None = None, margin: Sequence[int] = (0, 0, 0),
                 jitter: float = 0.5, seed: int = 0, rank: int | None = None, world_size: int | None = None,
                 heatmap_classes: Sequence[int] = (), heatmap_sigma_mm: float = 5.0):
        self.sources = list(sources)
        if not self.sources or not any(s.case_ids for s in self.sources):
            raise ValueError("PatchStream: no training cases")
        self.patch_size = np.asarray(patch_size, dtype=np.int64)
        self.batch_size = int(batch_size)
        self.patches_per_epoch = int(patches_per_epoch)
        self.foreground_probability = float(foreground_probability)
        self.organ_weights = None if organ_weights is None else list(organ_weights)
        w = np.ones(len(self.sources)) if dataset_weights is None else np.asarray(dataset_weights, float)
        w = w * np.array([len(s.case_ids) > 0 for s in self.sources])
        self.dataset_p = w / w.sum()
        self.transform = transform
        self.margin = np.asarray(margin, dtype=np.int64)
        self.jitter = jitter
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.epoch_offset = 0      # set by the DataModule from trainer.current_epoch (resume)
        self._iterations = 0       # advances once per epoch inside each persistent worker
        self.heatmap_classes = list(heatmap_classes)
        self.heatmap_sigma_mm = heatmap_sigma_mm
        # every sample carries ``pseudo`` once any source has pseudo-labels (zeros = "no pseudo organ"
        # for the others), so batches from mixed datasets collate
        self.with_pseudo = any(s.pseudo is not None for s in self.sources)

    # batches per rank: patches_per_epoch split over ranks, rounded up to whole batches
    def _rank_batches(self, world_size: int) -> int:
        per_rank = -(-self.patches_per_epoch // world_size)
        return max(1, -(-per_rank // self.batch_size))

    def __len__(self) -> int:
        world = self.world_size or 1
        return self._rank_batches(world) * self.batch_size

    def __iter__(self) -> Iterator[dict]:
        shard = current_shard(self.rank, self.world_size)
        epoch = self.epoch_offset + self._iterations
        self._iterations += 1
        start, stop = split_evenly(self._rank_batches(shard.world_size), shard.num_workers, shard.worker)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, shard.rank, shard.worker]))
        for _ in range((stop - start) * self.batch_size):
            yield self.sample(rng)

    def sample(self, rng: np.random.Generator) -> dict:
        d = int(rng.choice(len(self.sources), p=self.dataset_p))
        src = self.sources[d]
        case_id = src.case_ids[int(rng.integers(len(src.case_ids)))]
        reader = src.reader
        centre, _ = draw_centre(rng, reader.shape(case_id), reader.class_counts(case_id),
                                lambda c: reader.fg_coords(case_id, c), self.foreground_probability,
                                self.organ_weights)
        start = patch_start(rng, centre, self.patch_size, self.jitter)
        region_start, region_size = start - self.margin, self.patch_size + 2 * self.margin
        image, label = reader.read_patch(case_id, region_start, region_size)
        spacing = reader.spacing(case_id)
        heatmap = None
        if self.heatmap_classes:
            from organseg.models.sol import gaussian_heatmaps

            centres = torch.as_tensor(reader.centres(case_id)[self.heatmap_classes] - region_start, dtype=torch.float32)
            heatmap = gaussian_heatmaps(centres, region_size.tolist(), spacing, self.heatmap_sigma_mm)
        pseudo = None
        if self.with_pseudo:
            pseudo = (src.pseudo.read_patch(case_id, region_start, region_size) if src.pseudo is not None
                      else np.zeros(label.shape, dtype=np.uint8))
        if self.transform is not None:
            images = {"image": tio.ScalarImage(tensor=torch.from_numpy(image)[None], affine=_affine(spacing)),
                      "label": tio.LabelMap(tensor=torch.from_numpy(label)[None], affine=_affine(spacing))}
            if heatmap is not None:
                images["heatmap"] = tio.ScalarImage(tensor=heatmap, affine=_affine(spacing))
            if pseudo is not None:   # a LabelMap: moved with the label (nearest neighbour)
                images["pseudo"] = tio.LabelMap(tensor=torch.from_numpy(pseudo)[None], affine=_affine(spacing))
            subject = self.transform(tio.Subject(**images))
            image_t, label_t = subject["image"].data[0], subject["label"].data[0]
            heatmap = subject["heatmap"].data if heatmap is not None else None
            pseudo_t = subject["pseudo"].data[0] if pseudo is not None else None
        else:
            image_t, label_t = torch.from_numpy(image), torch.from_numpy(label)
            pseudo_t = torch.from_numpy(pseudo) if pseudo is not None else None
        m, p = self.margin, self.patch_size
        crop = tuple(slice(int(a), int(a + b)) for a, b in zip(m, p))
        extra = {} if heatmap is None else {"heatmap": heatmap[(slice(None), *crop)].to(torch.float16).contiguous()}
        if pseudo_t is not None:
            extra["pseudo"] = pseudo_t[crop].to(torch.uint8).contiguous()
        return {**extra,
            "image": image_t[crop].to(torch.float16).unsqueeze(0).contiguous(),
            "label": label_t[crop].to(torch.uint8).contiguous(),
            "labeled": torch.from_numpy(src.labeled.copy()),
            "case_id": case_id,
            "location": torch.as_tensor(np.concatenate([start, start + p]), dtype=torch.int64),
            "dataset": d,
        }


class CaseStream(IterableDataset):
    """Whole cached cases (for sliding-window validation/testing), each case exactly once across
    all ranks and workers. Use with ``batch_size=1``."""

    def __init__(self, sources: Sequence[CacheSource], rank: int | None = None, world_size: int | None = None):
        self.sources = list(sources)
        self.items = [(d, cid) for d, s in enumerate(self.sources) for cid in s.case_ids]
        self.rank, self.world_size = rank, world_size

    def shard_items(self, shard) -> list[tuple[int, str]]:
        return self.items[shard.index::shard.count]

    def __iter__(self) -> Iterator[dict]:
        for d, case_id in self.shard_items(current_shard(self.rank, self.world_size)):
            src = self.sources[d]
            image, label = src.reader.read_case(case_id)
            shape = image.shape
            yield {
                "image": torch.from_numpy(image).to(torch.float16).unsqueeze(0),
                "label": torch.from_numpy(label),
                "labeled": torch.from_numpy(src.labeled.copy()),
                "case_id": case_id,
                "location": torch.as_tensor([0, 0, 0, *shape], dtype=torch.int64),
                "spacing": torch.as_tensor(src.reader.spacing(case_id), dtype=torch.float64),
                "centres": torch.as_tensor(src.reader.centres(case_id), dtype=torch.float32),   # [C,3], NaN absent
                "dataset": d,
            }
