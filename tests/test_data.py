"""Patch streams and the DataModule over a real (small) phantom cache."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from conftest import write_card
from organseg.cache.reader import CacheReader
from organseg.data import CTDataModule
from organseg.data.datasets import CacheSource, CaseStream, PatchStream
from organseg.data.sharding import Shard
from organseg.io.card import CardError, DatasetCard

PATCH = (48, 48, 16)


def _source(hn_small, labeled=None) -> CacheSource:
    card = DatasetCard.load(hn_small["card"])
    reader = CacheReader(hn_small["cache"])
    mask = np.asarray(card.labeled_mask if labeled is None else labeled, dtype=bool)
    return CacheSource(card.name, reader, list(reader.case_ids), mask)


def _stream(hn_small, **kw) -> PatchStream:
    kw.setdefault("patches_per_epoch", 24)
    return PatchStream([_source(hn_small)], PATCH, batch_size=2, **kw)


def _iterate_as(stream, shard: Shard, monkeypatch) -> list[dict]:
    monkeypatch.setattr("organseg.data.datasets.current_shard", lambda *a, **k: shard)
    return list(iter(stream))


def test_patch_matches_the_cached_case_at_its_location(hn_small):
    stream = _stream(hn_small)
    reader = stream.sources[0].reader
    for sample in list(iter(stream))[:8]:
        assert (
            sample["image"].shape == (1, *PATCH) and sample["image"].dtype == torch.float16
        )  # float32 after transfer
        assert (
            sample["label"].shape == PATCH and sample["label"].dtype == torch.uint8
        )  # int64 after transfer (see test below)
        assert sample["labeled"].dtype == torch.bool and sample["labeled"].all()
        start = sample["location"][:3].numpy()
        assert (sample["location"][3:].numpy() - start == PATCH).all()
        image, label = reader.read_case(sample["case_id"])
        pad = [(48, 48)] * 3  # compare against the zero-padded full case (patches may cross borders)
        img_p = np.pad(image, pad, constant_values=-1.0)
        lbl_p = np.pad(label, pad)
        sl = tuple(slice(s + 48, s + 48 + p) for s, p in zip(start, PATCH))
        np.testing.assert_array_equal(sample["label"].numpy(), lbl_p[sl])
        np.testing.assert_allclose(
            sample["image"][0].float().numpy(), img_p[sl], atol=1e-3
        )  # float16 in transit


def test_class_balanced_sampling_feeds_small_organs(hn_small):
    stream = _stream(hn_small, patches_per_epoch=120, foreground_probability=0.9)
    card = DatasetCard.load(hn_small["card"])
    small = card.small_indices
    samples = list(iter(stream))
    with_small = np.mean([np.isin(s["label"].numpy(), small).any() for s in samples])
    reader = stream.sources[0].reader
    counts = sum(reader.class_counts(c) for c in reader.case_ids)
    volume_fraction = counts[small].sum() / counts.sum()
    assert volume_fraction < 1e-3
    assert with_small > 0.3  # 6 of 17 organs drawn as centres at p=0.9: about a third of patches or more


def test_streams_are_distinct_across_ranks_and_workers_and_reproducible(hn_small, monkeypatch):
    shards = [Shard(r, 2, w, 2) for r in range(2) for w in range(2)]
    per_shard = {}
    for sh in shards:
        stream = _stream(hn_small, patches_per_epoch=40, rank=sh.rank, world_size=2)
        per_shard[sh] = [
            (s["case_id"], tuple(s["location"].tolist())) for s in _iterate_as(stream, sh, monkeypatch)
        ]
    all_draws = [d for v in per_shard.values() for d in v]
    assert len(all_draws) == 40  # 20 per rank, split over workers in whole batches
    assert len(set(all_draws)) > 0.9 * len(all_draws)  # no duplicated streams (rare coincidences allowed)
    for a in shards:
        for b in shards:
            if a != b:
                assert per_shard[a] != per_shard[b]
    again = _stream(hn_small, patches_per_epoch=40, rank=0, world_size=2)
    assert [
        (s["case_id"], tuple(s["location"].tolist())) for s in _iterate_as(again, shards[0], monkeypatch)
    ] == per_shard[shards[0]]
    # the next epoch draws new patches
    second = [
        (s["case_id"], tuple(s["location"].tolist())) for s in _iterate_as(again, shards[0], monkeypatch)
    ]
    assert second != per_shard[shards[0]]


def test_rank_batch_counts_are_equal_for_ddp(hn_small, monkeypatch):
    counts = []
    for rank in range(2):
        n = sum(
            len(
                _iterate_as(
                    _stream(hn_small, patches_per_epoch=13, rank=rank, world_size=2),
                    Shard(rank, 2, w, 3),
                    monkeypatch,
                )
            )
            for w in range(3)
        )
        counts.append(n)
    assert counts[0] == counts[1] == 8  # ceil(13/2)=7 patches -> 4 batches of 2 per rank


def test_case_stream_covers_each_case_once_across_ranks_and_workers(hn_small, monkeypatch):
    seen = []
    for rank in range(2):
        for w in range(2):
            stream = CaseStream([_source(hn_small)], rank=rank, world_size=2)
            for s in _iterate_as(stream, Shard(rank, 2, w, 2), monkeypatch):
                assert s["image"].shape[1:] == s["label"].shape
                seen.append(s["case_id"])
    assert sorted(seen) == sorted(CacheReader(hn_small["cache"]).case_ids)


def test_stream_pickles_for_spawned_workers(hn_small):
    stream = _stream(hn_small)
    next(iter(stream))  # opens the HDF5 file in this process
    clone = pickle.loads(pickle.dumps(stream))
    assert next(iter(clone))["image"].shape == (1, *PATCH)


def test_datamodule_several_few_organ_cards_share_one_label_space(hn_small, tmp_path):
    a = write_card(
        tmp_path / "a.yaml",
        name="a",
        path=str(hn_small["raw"]),
        cache=str(hn_small["cache"]),
        target_spacing=[1.5, 1.5, 4.5],
        labeled=["brainstem", "mandible"],
        split={"val": 1, "test": 1},
    )
    b = write_card(
        tmp_path / "b.yaml",
        name="b",
        path=str(hn_small["raw"]),
        cache=str(hn_small["cache"]),
        target_spacing=[1.5, 1.5, 4.5],
        labeled=["eye_l", "eye_r"],
        split={"val": 1, "test": 1},
    )
    dm = CTDataModule(
        [str(a), str(b)],
        patch_size=PATCH,
        batch_size=2,
        patches_per_epoch=40,
        num_workers=0,
        augmentation=None,
        preprocess=False,
    )
    dm.setup("fit")
    assert dm.num_classes == 18 and dm.classes[0] == "background"
    batches = list(dm.train_dataloader())
    assert len(batches) == 20
    labeled = torch.cat([b["labeled"] for b in batches])
    datasets = torch.cat([b["dataset"] for b in batches])
    idx = {n: dm.classes.index(n) for n in ("brainstem", "eye_l")}
    assert (
        labeled[datasets == 0][:, idx["brainstem"]].all()
        and not labeled[datasets == 0][:, idx["eye_l"]].any()
    )
    assert (
        labeled[datasets == 1][:, idx["eye_l"]].all()
        and not labeled[datasets == 1][:, idx["brainstem"]].any()
    )
    assert 0.25 < (datasets == 0).float().mean() < 0.75  # balanced across datasets
    val = list(dm.val_dataloader())
    assert len(val) == 2 and {v["case_id"][0] for v in val} == {dm._splits[0]["val"][0]}


def test_datamodule_rejects_cards_with_different_classes(hn_small, tmp_path):
    a = write_card(tmp_path / "a.yaml", name="a", path=str(hn_small["raw"]), cache=str(hn_small["cache"]))
    b = write_card(
        tmp_path / "b.yaml",
        name="b",
        path=str(hn_small["raw"]),
        cache=str(hn_small["cache"]),
        classes=["background", "liver"],
        labeled="all",
        small=[],
    )
    with pytest.raises(CardError, match="unified class list"):
        CTDataModule([str(a), str(b)], preprocess=False)


def test_augmented_patches_keep_shape_and_valid_labels(hn_small):
    from organseg.data.augmentation import AugmentationConfig

    aug = AugmentationConfig(affine_p=1.0, noise_p=1.0, blur_p=0.5)
    stream = _stream(hn_small, transform=aug.build(), margin=aug.margin(PATCH))
    for s in list(iter(stream))[:6]:
        assert s["image"].shape == (1, *PATCH) and s["label"].shape == PATCH
        assert set(np.unique(s["label"].numpy())) <= set(range(18))
        assert torch.isfinite(s["image"]).all()


def test_datamodule_hands_float32_images_and_int64_labels_to_the_module_after_transfer(hn_small):
    dm = CTDataModule(
        [str(hn_small["card"])], patch_size=PATCH, num_workers=0, augmentation=None, preprocess=False
    )
    batch = {
        "image": torch.full((1, 1, 8, 8, 4), 0.25, dtype=torch.float16),
        "heatmap": torch.zeros(1, 2, 8, 8, 4, dtype=torch.float16),
        "label": torch.ones(1, 8, 8, 4, dtype=torch.uint8),
    }
    out = dm.on_after_batch_transfer(batch, 0)
    assert out["label"].dtype == torch.int64 and out["label"].sum() == 256
    assert out["image"].dtype == torch.float32 and out["heatmap"].dtype == torch.float32
    assert torch.all(out["image"] == 0.25)


def test_heatmap_targets_peak_at_small_organ_centres_and_follow_augmentation(hn_small):
    from organseg.data.augmentation import AugmentationConfig
    from organseg.spatial.heatmaps import decode_centres

    card = DatasetCard.load(hn_small["card"])
    small = card.small_indices
    plain = _stream(
        hn_small,
        heatmap_classes=small,
        heatmap_sigma_mm=4.0,
        foreground_probability=1.0,
        organ_weights=[1.0 if i in small else 0.0 for i in range(18)],
    )
    reader = plain.sources[0].reader
    for s in list(iter(plain))[:6]:
        assert s["heatmap"].shape == (len(small), *PATCH) and s["heatmap"].dtype == torch.float16
        centres = reader.centres(s["case_id"])[small] - s["location"][:3].numpy()
        inside = np.all((centres >= 1) & (centres <= np.array(PATCH) - 2), axis=1)
        found_c, found = decode_centres(s["heatmap"][None], threshold=0.5)
        assert found[0][torch.as_tensor(inside)].all()
        np.testing.assert_allclose(found_c[0][torch.as_tensor(inside)].numpy(), centres[inside], atol=0.6)
    # with a random affine, the heatmap moves with the label: its peak stays on the organ
    aug = AugmentationConfig(affine_p=1.0, degrees=(8, 8, 8), noise_p=1.0, blur_p=0.0)
    moved = _stream(
        hn_small,
        heatmap_classes=small,
        heatmap_sigma_mm=4.0,
        foreground_probability=1.0,
        organ_weights=[1.0 if i in small else 0.0 for i in range(18)],
        transform=aug.build(),
        margin=aug.margin(PATCH),
    )
    hits = total = 0
    for s in list(iter(moved))[:8]:
        c, ok = decode_centres(s["heatmap"][None], threshold=0.5)
        for k, cls in enumerate(small):
            if ok[0, k]:
                v = (
                    torch.round(c[0, k])
                    .long()
                    .clamp(min=torch.zeros(3, dtype=torch.long), max=torch.tensor(PATCH) - 1)
                )
                window = s["label"][
                    max(v[0] - 2, 0) : v[0] + 3, max(v[1] - 2, 0) : v[1] + 3, max(v[2] - 1, 0) : v[2] + 2
                ]
                hits += int((window == cls).any())
                total += 1
        assert s["heatmap"].max() <= 1.0 + 1e-4
    assert total > 0 and hits / total > 0.8


def test_heatmap_targets_reach_only_modules_that_train_on_them(hn_small):
    """S-Net's stage ignores ``heatmap``: the loader must not build and warp those channels for it."""
    from types import SimpleNamespace

    from organseg.methods.focusnet_stages import JointStage, ShapeAEStage, SNetStage, SOLStage, SOSStage
    from organseg.methods.unet_baseline import UNetBaseline

    assert not SNetStage.uses_heatmap_targets and not UNetBaseline.uses_heatmap_targets
    assert SOLStage.uses_heatmap_targets and ShapeAEStage.uses_heatmap_targets
    # SOS and joint decide per instance (a property): only their true-centred ROIs (sos_centres=true_jittered)
    # and the joint stage's S-Net + SOL fine-tuning read them (tests/test_focusnet_upstream.py)
    assert isinstance(SOSStage.uses_heatmap_targets, property) and JointStage.uses_heatmap_targets is not None

    def first_batch(module) -> dict:
        dm = CTDataModule(
            [str(hn_small["card"])],
            patch_size=PATCH,
            batch_size=2,
            patches_per_epoch=2,
            num_workers=0,
            augmentation=None,
            preprocess=False,
            heatmap_sigma_mm=4.0,
        )
        dm.setup("fit")
        if module is not None:
            dm.trainer = SimpleNamespace(
                lightning_module=module, global_rank=0, world_size=1, current_epoch=0
            )
        return next(iter(dm.train_dataloader()))

    k = len(DatasetCard.load(hn_small["card"]).small_indices)
    assert "heatmap" not in first_batch(SimpleNamespace(uses_heatmap_targets=False))
    assert first_batch(SimpleNamespace(uses_heatmap_targets=True))["heatmap"].shape == (2, k, *PATCH)
    assert first_batch(None)["heatmap"].shape == (2, k, *PATCH)  # no trainer: the config decides
