"""Iterable datasets over HDF5 caches: training patches and whole validation/test cases.

Both shard themselves by (DDP rank, DataLoader worker), so Lightning never wraps them in a
DistributedSampler (it does not for IterableDatasets) and no case or patch stream is duplicated.

Sample dict (docs/architecture.md §4.4): ``image`` float32 [1,X,Y,Z], ``label`` [X,Y,Z], ``labeled`` bool [C],
``case_id`` str, ``location`` int64 [6] (start xyz, stop xyz in the cached case), ``dataset`` int;
with ``heatmap_classes`` set (FocusNetV2's small organs), ``heatmap`` [K,X,Y,Z]: a Gaussian
(sigma in mm) at each organ's cached centre, transformed with the patch so it follows augmentation;
with pseudo-labels (``CacheSource.pseudo``), ``pseudo`` [X,Y,Z]: hard pseudo-labels of the organs the
dataset does not annotate, read from the same box and moved by the same spatial transform as ``label``.
Between processes the sample is compact: ``image`` float16 (exact to ~0.1 HU in a 400 HU window, half
the bytes of float32) and ``label`` uint8 (an eighth of int64); ``CTDataModule.on_after_batch_transfer``
restores float32 (image, heatmap) / int64 (label, pseudo) on the training device, so modules see the
batch dtypes of docs/architecture.md §4.4.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torchio as tio
from torch.utils.data import IterableDataset

from organseg.data.augmentation import resample, split_spatial
from organseg.data.sampling import draw_centre, patch_start
from organseg.data.sharding import current_shard, split_evenly
from organseg.errors import ConfigError
from organseg.spatial.heatmaps import gaussian_heatmaps


@dataclass
class CacheSource:
    """One preprocessed dataset: its cache reader, the cases of one split, and what it annotates."""

    name: str
    reader: object  # organseg.cache.reader.CacheReader (picklable, opens h5py per process)
    case_ids: list[str]
    labeled: np.ndarray  # bool [C] in the unified class list
    pseudo: object | None = None  # organseg.data.pseudo_labels.PseudoLabelReader (hard pseudo-labels) or None


# volumes moved as label maps (nearest neighbour) by the augmentation; the others are scalar images
_LABEL_MAPS = frozenset({"label", "pseudo"})

# where organ-centred patches are centred: the union label map the network learns (ground truth for the
# organs a dataset annotates, pseudo-labels for the others) or ground truth only (ours, the earlier rule)
PATCH_CENTRES = ("gt_and_pseudo", "gt")


def _affine(spacing) -> np.ndarray:
    return np.diag([*map(float, spacing), 1.0])


class PatchStream(IterableDataset):
    """Class-balanced training patches read lazily (patch + augmentation margin only) from HDF5.

    Each epoch every (rank, worker) stream yields its share of ``patches_per_epoch`` in whole
    batches, seeded by (seed, epoch, rank, worker): distinct across processes, reproducible across runs.
    Workers must be persistent (the DataModule sets it) so the per-iteration epoch counter advances.

    ``patch_centres``: ``gt_and_pseudo`` (default) draws organ centres per organ, equally, over the
    organs of the union label map: the ground-truth organs of the sample's dataset and, where the source
    has pseudo-labels, the pseudo-labelled organs it does not annotate, so a union network sees each
    organ as often as the expert of that organ; ``gt`` (ours, the earlier rule) draws from the ground
    truth only. Without pseudo-labels both are the same draw.
    """

    def __init__(
        self,
        sources: Sequence[CacheSource],
        patch_size: Sequence[int],
        batch_size: int,
        patches_per_epoch: int,
        foreground_probability: float = 0.67,
        organ_weights: Sequence[float] | None = None,
        dataset_weights: Sequence[float] | None = None,
        transform: tio.Transform | None = None,
        margin: Sequence[int] = (0, 0, 0),
        jitter: float = 0.5,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        heatmap_classes: Sequence[int] = (),
        heatmap_sigma_mm: float = 5.0,
        patch_centres: str = "gt_and_pseudo",
    ):
        if patch_centres not in PATCH_CENTRES:
            raise ConfigError(f"patch_centres must be one of {list(PATCH_CENTRES)}, got {patch_centres!r}")
        self.patch_centres = patch_centres
        self.sources = list(sources)
        if not self.sources or not any(s.case_ids for s in self.sources):
            raise ConfigError("PatchStream: no training cases")
        self.patch_size = np.asarray(patch_size, dtype=np.int64)
        self.batch_size = int(batch_size)
        self.patches_per_epoch = int(patches_per_epoch)
        self.foreground_probability = float(foreground_probability)
        self.organ_weights = None if organ_weights is None else list(organ_weights)
        w = np.ones(len(self.sources)) if dataset_weights is None else np.asarray(dataset_weights, float)
        w = w * np.array([len(s.case_ids) > 0 for s in self.sources])
        self.dataset_p = w / w.sum()
        self.transform = transform
        # a composed spatial transform first in the pipeline (data/augmentation.py) is resampled here,
        # on the smallest box its draw needs; the rest (intensity) runs on the patch
        self.spatial, self.rest = split_spatial(transform)
        self.margin = np.asarray(margin, dtype=np.int64)  # read around the patch for any other transform
        self.jitter = jitter
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.epoch_offset = 0  # set by the DataModule from trainer.current_epoch (resume)
        self._iterations = 0  # advances once per epoch inside each persistent worker
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
        """One training patch: draw a case, then its box (the ``rng`` order), read, augment, pack.

        With a composed spatial transform (``RandomAffineElastic``, the default augmentation) its draw
        comes first and decides the box read: the patch itself when it draws nothing, else the smallest
        box its sampling grid covers, resampled straight to the patch (one ``grid_sample`` per
        interpolation kind for all volumes). Any other transform gets the patch plus ``margin`` read
        around it, and the margin is cut off after it.
        """
        d, case_id = self._draw_case(rng)
        src = self.sources[d]
        centre, _ = self.draw_patch_centre(rng, src, case_id)
        start = patch_start(rng, centre, self.patch_size, self.jitter)
        spacing = src.reader.spacing(case_id)
        if self.transform is not None and self.spatial is None:
            region = self._read_region(
                src, case_id, start - self.margin, self.patch_size + 2 * self.margin, spacing
            )
            patch = self._crop_margin(self._augment(region, spacing, self.transform))
            return self._pack(patch, src, d, case_id, start)
        draw = self.spatial.draw(spacing) if self.spatial is not None else None
        if draw is None:
            patch = self._read_region(src, case_id, start, self.patch_size, spacing)
        else:
            offset, size = draw.input_box(self.patch_size)
            region = self._read_region(src, case_id, start + offset, size, spacing)
            patch = resample(region, _LABEL_MAPS, draw, self.patch_size, in_offset=-offset)
        return self._pack(self._augment(patch, spacing, self.rest), src, d, case_id, start)

    def _draw_case(self, rng: np.random.Generator) -> tuple[int, str]:
        """(dataset index, case id): a dataset by ``dataset_p``, then one of its cases uniformly."""
        d = int(rng.choice(len(self.sources), p=self.dataset_p))
        case_ids = self.sources[d].case_ids
        return d, case_ids[int(rng.integers(len(case_ids)))]

    def draw_patch_centre(
        self, rng: np.random.Generator, src: CacheSource, case_id: str
    ) -> tuple[np.ndarray, int]:
        """(centre voxel, its class): a class-balanced draw over the case's organs (``patch_centres``)
        from the cached foreground coordinates, no scan; class 0 = a uniform voxel of the case."""
        reader = src.reader
        counts = reader.class_counts(case_id)
        from_pseudo = np.zeros(len(counts), dtype=bool)
        if self.patch_centres == "gt_and_pseudo" and src.pseudo is not None:
            from_pseudo = ~np.asarray(src.labeled, dtype=bool)  # organs the dataset does not annotate
            from_pseudo[0] = False
            counts = np.where(from_pseudo, src.pseudo.class_counts(case_id), counts)

        def coords(c: int) -> np.ndarray:  # of the union label map
            return src.pseudo.fg_coords(case_id, c) if from_pseudo[c] else reader.fg_coords(case_id, c)

        return draw_centre(
            rng, reader.shape(case_id), counts, coords, self.foreground_probability, self.organ_weights
        )

    def _read_region(
        self, src: CacheSource, case_id: str, region_start: np.ndarray, region_size: np.ndarray, spacing
    ) -> dict[str, torch.Tensor]:
        """A box of the case (the patch, or what the spatial transform pulls in) as [channel, X, Y, Z]."""
        image, label = src.reader.read_patch(case_id, region_start, region_size)
        region = {"image": torch.from_numpy(image)[None], "label": torch.from_numpy(label)[None]}
        if self.heatmap_classes:
            region["heatmap"] = self._heatmaps(src.reader, case_id, region_start, region_size, spacing)
        if self.with_pseudo:
            region["pseudo"] = torch.from_numpy(
                self._read_pseudo(src, case_id, region_start, region_size, label.shape)
            )[None]
        return region

    def _heatmaps(
        self, reader, case_id: str, region_start: np.ndarray, region_size: np.ndarray, spacing
    ) -> torch.Tensor:
        """[K, X, Y, Z] Gaussians at the small organs' cached centres: FocusNetV2's localisation target."""
        centres = reader.centres(case_id)[self.heatmap_classes] - region_start
        return gaussian_heatmaps(
            torch.as_tensor(centres, dtype=torch.float32),
            region_size.tolist(),
            spacing,
            self.heatmap_sigma_mm,
        )

    @staticmethod
    def _read_pseudo(
        src: CacheSource,
        case_id: str,
        region_start: np.ndarray,
        region_size: np.ndarray,
        shape: tuple[int, ...],
    ) -> np.ndarray:
        """The region's hard pseudo-labels; zeros for a source without a file, so mixed batches collate."""
        if src.pseudo is None:
            return np.zeros(shape, dtype=np.uint8)
        return src.pseudo.read_patch(case_id, region_start, region_size)

    @staticmethod
    def _augment(region: dict[str, torch.Tensor], spacing, transform) -> dict[str, torch.Tensor]:
        """One draw of ``transform`` moves every volume alike (label maps by nearest neighbour)."""
        if transform is None:
            return region
        subject = tio.Subject(
            **{
                name: (tio.LabelMap if name in _LABEL_MAPS else tio.ScalarImage)(
                    tensor=volume, affine=_affine(spacing)
                )
                for name, volume in region.items()
            }
        )
        moved = transform(subject)
        return {name: moved[name].data for name in region}

    def _crop_margin(self, region: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Cut the augmentation margin off: what is left is the patch itself."""
        crop = (slice(None), *(slice(int(m), int(m + p)) for m, p in zip(self.margin, self.patch_size)))
        return {name: volume[crop] for name, volume in region.items()}

    def _pack(
        self, patch: dict[str, torch.Tensor], src: CacheSource, d: int, case_id: str, start: np.ndarray
    ) -> dict:
        """The sample dict in its compact inter-process dtypes (float16 image/heatmap, uint8 label/pseudo)."""
        extra = {} if "heatmap" not in patch else {"heatmap": patch["heatmap"].to(torch.float16).contiguous()}
        if "pseudo" in patch:
            extra["pseudo"] = patch["pseudo"][0].to(torch.uint8).contiguous()
        return {
            **extra,
            "image": patch["image"].to(torch.float16).contiguous(),
            "label": patch["label"][0].to(torch.uint8).contiguous(),
            "labeled": torch.from_numpy(src.labeled.copy()),
            "case_id": case_id,
            "location": torch.as_tensor(np.concatenate([start, start + self.patch_size]), dtype=torch.int64),
            "dataset": d,
        }


class CaseStream(IterableDataset):
    """Whole cached cases (for sliding-window validation/testing), each case exactly once across
    all ranks and workers. Use with ``batch_size=1``."""

    def __init__(
        self, sources: Sequence[CacheSource], rank: int | None = None, world_size: int | None = None
    ):
        self.sources = list(sources)
        self.items = [(d, cid) for d, s in enumerate(self.sources) for cid in s.case_ids]
        self.rank, self.world_size = rank, world_size

    def shard_items(self, shard) -> list[tuple[int, str]]:
        return self.items[shard.index :: shard.count]

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
                "centres": torch.as_tensor(
                    src.reader.centres(case_id), dtype=torch.float32
                ),  # [C,3], NaN absent
                "dataset": d,
            }
