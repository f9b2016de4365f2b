"""The composed spatial augmentation (one resampling per sample) against torchio's RandomAffine, and
in the patch stream: identity is exact, fixed parameters agree with torchio, anisotropic voxels rotate
in millimetres, every volume moves alike, and the old torchio path stays a named option."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchio as tio

from organseg.cache.reader import CacheReader
from organseg.data.augmentation import (
    AugmentationConfig,
    RandomAffineElastic,
    affine_draw,
    resample,
    split_spatial,
)
from organseg.data.datasets import CacheSource, PatchStream
from organseg.errors import ConfigError
from organseg.io.card import DatasetCard

SPACING = (1.0, 1.5, 3.0)  # anisotropic on purpose: a rotation in voxels would differ from one in mm
SHAPE = (48, 40, 20)


def _volumes() -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth image and a label map of two ellipsoids, in mm, on an anisotropic grid."""
    x, y, z = np.meshgrid(*[np.arange(n) * s for n, s in zip(SHAPE, SPACING)], indexing="ij")
    c = [(n - 1) * s / 2 for n, s in zip(SHAPE, SPACING)]
    r = np.sqrt(((x - c[0]) / 18) ** 2 + ((y - c[1]) / 12) ** 2 + ((z - c[2]) / 20) ** 2)
    label = (r < 0.6).astype(np.uint8) + 2 * (
        ((x - c[0] - 8) ** 2 + (y - c[1]) ** 2 < 30) & (abs(z - c[2]) < 15)
    )
    image = np.sin(x / 7) + np.cos(y / 5) + z / 30
    return torch.tensor(image, dtype=torch.float32)[None], torch.tensor(label.astype(np.uint8))[None]


def _subject(image, label) -> tio.Subject:
    affine = np.diag([*SPACING, 1.0])
    return tio.Subject(
        image=tio.ScalarImage(tensor=image, affine=affine), label=tio.LabelMap(tensor=label, affine=affine)
    )


def test_identity_parameters_reproduce_the_input_exactly():
    image, label = _volumes()
    heat = torch.rand(2, *SHAPE)
    draw = affine_draw((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), SPACING)
    out = resample({"image": image, "heatmap": heat, "label": label}, {"label"}, draw, SHAPE)
    assert torch.equal(out["image"], image) and torch.equal(out["heatmap"], heat)
    assert torch.equal(out["label"], label) and out["label"].dtype == torch.uint8
    # a patch inside a larger region: the crop at the offset, bit for bit
    part = resample({"image": image, "label": label}, {"label"}, draw, (20, 16, 8), in_offset=(5, 7, 3))
    assert torch.equal(part["image"], image[:, 5:25, 7:23, 3:11])
    assert torch.equal(part["label"], label[:, 5:25, 7:23, 3:11])
    # as a torchio transform that draws nothing
    subject = _subject(image, label)
    moved = RandomAffineElastic(affine_p=0.0, elastic_p=0.0)(subject)
    assert torch.equal(moved.image.data, image) and torch.equal(moved.label.data, label)


@pytest.mark.parametrize(
    ("scales", "degrees"),
    [
        ((1.1, 0.9, 1.05), (8.0, -6.0, 12.0)),
        ((0.8, 1.2, 1.0), (20.0, 15.0, -25.0)),
        ((1.0, 1.0, 1.0), (0.0, 0.0, 30.0)),
    ],
)
def test_fixed_parameters_agree_with_torchio_random_affine(scales, degrees):
    image, label = _volumes()
    expected = tio.Affine(scales=scales, degrees=degrees, translation=(0, 0, 0), default_pad_value="minimum")(
        _subject(image, label)
    )
    draw = affine_draw(scales, degrees, SPACING)
    out = resample({"image": image, "label": label}, {"label"}, draw, SHAPE)
    assert (out["label"] == expected.label.data).float().mean() >= 0.99
    assert not torch.equal(out["label"], label)  # it did move
    # images: equal where both sample inside the volume (SimpleITK pads its last half voxel, we do not)
    # (voxels that sample the volume by nearest neighbour, less 2 voxels at the rim of that region)
    sampled = resample({"ones": torch.ones(1, *SHAPE, dtype=torch.uint8)}, {"ones"}, draw, SHAPE)["ones"]
    inside = torch.nn.functional.max_pool3d(1.0 - sampled.float()[None], 5, stride=1, padding=2)[0] == 0
    inside[:, :2] = inside[:, -2:] = inside[:, :, :2] = inside[:, :, -2:] = False
    inside[:, :, :, :2] = inside[:, :, :, -2:] = False
    diff = (out["image"] - expected.image.data).abs()[inside]
    assert inside.float().mean() > 0.2 and diff.max() < 1e-3


def test_rotation_is_done_in_millimetres_not_voxels():
    """On 1 x 1.5 x 3 mm voxels a voxel-space rotation (what a plain grid rotation would do) differs
    visibly from torchio's; the composed transform does not."""
    image, label = _volumes()
    scales, degrees = (1.0, 1.0, 1.0), (20.0, 15.0, -25.0)
    expected = tio.Affine(scales=scales, degrees=degrees, translation=(0, 0, 0))(
        _subject(image, label)
    ).label.data
    ours = resample({"label": label}, {"label"}, affine_draw(scales, degrees, SPACING), SHAPE)["label"]
    in_voxels = resample({"label": label}, {"label"}, affine_draw(scales, degrees, (1, 1, 1)), SHAPE)["label"]
    assert (ours == expected).float().mean() > (in_voxels == expected).float().mean() + 0.01


def test_one_draw_moves_every_volume_alike_and_reads_only_the_box_it_needs():
    image, label = _volumes()
    torch.manual_seed(0)
    transform = RandomAffineElastic(scales=(0.9, 1.1), degrees=(10, 10, 5), affine_p=1.0)
    draw = transform.draw(SPACING)
    patch = (24, 20, 8)
    start, size = draw.input_box(patch)
    assert (start <= 0).all() and (start + size >= np.array(patch)).all()
    assert (size <= np.array(patch) * 1.6 + 3).all()  # the box covering the rotated patch, not the case
    region = slice(None), *(slice(int(a), int(a + n)) for a, n in zip(start + 10, size))
    # the label as a scalar image moves exactly as the label map (same grid), up to interpolation
    vols = {"image": label[region].float(), "label": label[region]}
    out = resample(vols, {"label"}, draw, patch, in_offset=-start)
    assert out["image"].shape == (1, *patch) and out["label"].shape == (1, *patch)
    agree = (out["image"].round() == out["label"].float()).float().mean()
    assert agree > 0.9


def test_elastic_displacement_composes_into_the_same_resampling():
    image, label = _volumes()
    torch.manual_seed(1)
    transform = RandomAffineElastic(affine_p=0.0, elastic_p=1.0, max_displacement=(6.0, 6.0, 6.0))
    subject = transform(_subject(image, label))
    assert subject.image.data.shape == image.shape and subject.label.data.dtype == label.dtype
    assert set(subject.label.data.unique().tolist()) <= set(label.unique().tolist())
    changed = (subject.label.data != label).float().mean()
    assert 0.0 < changed < 0.2
    # the displacement bound widens the box read
    draw = transform.draw(SPACING)
    assert draw.displacement is not None and (draw.max_displacement > 0).all()
    assert (draw.input_box((16, 16, 8))[1] > np.array([16, 16, 8]) + 1).any()


def test_config_builds_the_composed_transform_by_default_and_torchio_as_a_named_option():
    spatial, rest = split_spatial(AugmentationConfig().build())
    assert isinstance(spatial, RandomAffineElastic) and spatial.affine_p == 0.3
    assert [type(t).__name__ for t in rest.transforms] == ["RandomBlur", "RandomNoise"]
    old = AugmentationConfig(spatial="torchio", elastic_p=0.5).build()
    assert split_spatial(old)[0] is None
    assert [type(t).__name__ for t in old.transforms][:2] == ["RandomAffine", "RandomElasticDeformation"]
    assert AugmentationConfig(spatial="torchio").margin((96, 96, 32)) == AugmentationConfig().margin(
        (96, 96, 32)
    )
    with pytest.raises(ConfigError, match="augmentation.spatial"):
        AugmentationConfig(spatial="sitk")


PATCH = (48, 48, 16)


def _stream(hn_small, transform, margin=(0, 0, 0)):
    card = DatasetCard.load(hn_small["card"])
    reader = CacheReader(hn_small["cache"])
    src = CacheSource(card.name, reader, list(reader.case_ids), np.asarray(card.labeled_mask, bool))
    return PatchStream(
        [src],
        PATCH,
        batch_size=2,
        patches_per_epoch=8,
        transform=transform,
        margin=margin,
        heatmap_classes=card.small_indices,
        heatmap_sigma_mm=4.0,
    )


def test_patch_stream_with_an_identity_draw_returns_the_unaugmented_patches(hn_small):
    identity = tio.Compose([RandomAffineElastic(scales=(1.0, 1.0), degrees=(0, 0, 0), affine_p=1.0)])
    plain, moved = list(iter(_stream(hn_small, None))), list(iter(_stream(hn_small, identity)))
    for a, b in zip(plain, moved):
        assert a.keys() == b.keys() and a["case_id"] == b["case_id"]
        for key in ("image", "label", "heatmap", "location"):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("spatial", ["composed", "torchio"])
def test_patch_stream_augments_with_either_spatial_path_keeping_the_sample_dict(hn_small, spatial):
    aug = AugmentationConfig(affine_p=1.0, noise_p=0.5, blur_p=0.5, spatial=spatial)
    torch.manual_seed(0)
    plain = list(iter(_stream(hn_small, None)))
    samples = list(iter(_stream(hn_small, aug.build(), aug.margin(PATCH))))
    for s, p in zip(samples, plain):
        assert s["image"].shape == (1, *PATCH) and s["image"].dtype == torch.float16
        assert s["label"].shape == PATCH and s["label"].dtype == torch.uint8
        assert s["heatmap"].shape == p["heatmap"].shape and s["heatmap"].dtype == torch.float16
        assert set(np.unique(s["label"].numpy())) <= set(range(18)) and torch.isfinite(s["image"]).all()
        assert torch.equal(s["location"], p["location"])  # the same boxes, moved
    assert any(not torch.equal(s["label"], p["label"]) for s, p in zip(samples, plain))
