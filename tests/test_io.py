"""organseg.io: dataset layouts, validated case reading, geometry helpers."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from helpers.synthetic_cases import (
    CLASSES,
    DIRECTION,
    ORIGIN,
    SPACING,
    make_card,
    make_nnunet_dataset,
    make_pddca_dataset,
    phantom,
    to_sitk,
    truncate,
    write,
)
from organseg.io.card import DatasetCard
from organseg.io.geometry import (
    Geometry,
    cropped_origin,
    image_to_xyz,
    resample_image,
    resample_label,
    resample_to_grid,
    resampled_size,
    restore_original_geometry,
    xyz_to_image,
)
from organseg.io.layouts import CaseError, CaseFiles, OverlapWarning, list_cases, read_case


def _assert_geometry(geom: Geometry, spacing=SPACING, origin=ORIGIN, direction=DIRECTION, shape=(40, 36, 12)):
    assert geom.shape == tuple(shape)
    np.testing.assert_allclose(geom.spacing, spacing, rtol=1e-6)
    np.testing.assert_allclose(geom.origin, origin, atol=1e-4)
    np.testing.assert_allclose(geom.direction, direction, atol=1e-6)


# ---------------------------------------------------------------------------------- axis convention
def test_xyz_transposition_matches_sitk_indexing():
    arr = np.arange(4 * 3 * 2, dtype=np.int16).reshape(4, 3, 2)
    img = xyz_to_image(arr, Geometry(SPACING, ORIGIN, DIRECTION, (4, 3, 2)))
    assert img.GetSize() == (4, 3, 2)
    for idx in [(0, 0, 0), (3, 1, 0), (2, 2, 1), (1, 0, 1)]:
        assert img.GetPixel(idx) == arr[idx]
    np.testing.assert_array_equal(image_to_xyz(img), arr)
    assert image_to_xyz(img).flags.c_contiguous
    assert Geometry.of(img) == Geometry(
        tuple(map(float, SPACING)), tuple(map(float, ORIGIN)), tuple(map(float, DIRECTION)), (4, 3, 2)
    )


# ---------------------------------------------------------------------------------- layouts
def test_nnunet_layout_reads_images_labels_and_geometry(tmp_path):
    expected = make_nnunet_dataset(tmp_path / "raw")
    (tmp_path / "raw" / "imagesTr" / "._hn_000_0000.nii.gz").write_bytes(b"macOS junk")  # ignored
    card = make_card(tmp_path, tmp_path / "raw")
    cases = list_cases(card)
    assert [c.case_id for c in cases] == ["hn_000", "hn_001", "hn_002"]
    assert cases[1].image.name == "hn_001_0000.nii.gz" and cases[1].label.name == "hn_001.nii.gz"
    for case in cases:
        image, label, geom = read_case(card, case)
        assert image.dtype == np.float32 and label.dtype == np.uint8
        np.testing.assert_array_equal(image, expected[case.case_id][0])
        np.testing.assert_array_equal(label, expected[case.case_id][1])
        _assert_geometry(geom)


@pytest.mark.parametrize("ending", [".nii", ".nrrd", ".mha"])
def test_msd_layout_without_channel_suffix_and_label_values(tmp_path, ending):
    expected = make_nnunet_dataset(tmp_path / "raw", ("liver_0", "liver_1"), ending=ending, msd=True)
    # raw label 1 -> mandible (2), 2 -> brainstem (1), 3 -> parotid_l (3)
    card = make_card(
        tmp_path, tmp_path / "raw", layout="msd", label_values={1: "mandible", 2: "brainstem", 3: "parotid_l"}
    )
    cases = list_cases(card)
    assert [c.case_id for c in cases] == ["liver_0", "liver_1"]
    assert cases[0].image.name == f"liver_0{ending}"
    image, label, geom = read_case(card, cases[1])
    raw = expected["liver_1"][1]
    want = np.choose(raw, [0, 2, 1, 3]).astype(np.uint8)
    np.testing.assert_array_equal(label, want)
    np.testing.assert_array_equal(image, expected["liver_1"][0])
    _assert_geometry(geom)


def test_nnunet_layout_without_dataset_json_accepts_any_ending(tmp_path):
    make_nnunet_dataset(tmp_path / "raw", ("a", "b"), ending=".nrrd", dataset_json=False)
    card = make_card(tmp_path, tmp_path / "raw")
    assert [c.case_id for c in list_cases(card)] == ["a", "b"]


def test_pddca_layout_merges_structures_with_class_map(tmp_path):
    expected = make_pddca_dataset(tmp_path / "pddca")
    (tmp_path / "pddca" / "README.txt").write_text("not a case")
    card = make_card(tmp_path, tmp_path / "pddca", layout="pddca")
    cases = list_cases(card)
    assert [c.case_id for c in cases] == ["0522c0001", "0522c0002"]
    assert set(cases[0].structures) == {"BrainStem", "Mandible", "Parotid_L"}  # Unlisted_Structure ignored
    assert cases[0].label is None and cases[0].image.name == "img.nrrd"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [read_case(card, c) for c in cases]
    overlap = [w for w in caught if issubclass(w.category, OverlapWarning)]
    assert len(overlap) == 1, "overlapping masks are reported once"
    assert "0522c0001" in str(overlap[0].message) and "later class index wins" in str(overlap[0].message)
    for case, (image, label, geom) in zip(cases, results):
        np.testing.assert_array_equal(label, expected[case.case_id][1])
        np.testing.assert_array_equal(image, expected[case.case_id][0])
        _assert_geometry(geom)
    # the overlap really was resolved in favour of parotid_l (index 3) over brainstem (index 1)
    brainstem = phantom((40, 36, 12), seed=0)[1] == 1
    merged = results[0][1][brainstem]
    assert (merged == CLASSES.index("parotid_l")).any() and (merged == CLASSES.index("brainstem")).any()


def test_pddca_unknown_class_in_class_map(tmp_path):
    make_pddca_dataset(tmp_path / "pddca", ("c1",))
    card = make_card(tmp_path, tmp_path / "pddca", layout="pddca", class_map={"BrainStem": "brain_stem"})
    with pytest.raises(CaseError, match="unknown class"):
        list_cases(card)


def test_missing_and_empty_dataset_folders(tmp_path):
    card = make_card(tmp_path, tmp_path / "nowhere")
    with pytest.raises(CaseError, match="dataset folder not found"):
        list_cases(card)
    (tmp_path / "empty").mkdir()
    card = make_card(tmp_path, tmp_path / "empty")
    with pytest.raises(CaseError, match="no imagesTr folder"):
        list_cases(card)
    (tmp_path / "empty" / "imagesTr").mkdir()
    with pytest.raises(CaseError, match="no cases found"):
        list_cases(card)
    (tmp_path / "pd").mkdir()
    with pytest.raises(CaseError, match="no cases found"):
        list_cases(make_card(tmp_path, tmp_path / "pd", layout="pddca"))


# ---------------------------------------------------------------------------------- bad cases
def _corrupt(kind: str, root: Path) -> None:
    """Break case hn_001 of an nnU-Net dataset in one way."""
    img_p, lab_p = root / "imagesTr" / "hn_001_0000.nii.gz", root / "labelsTr" / "hn_001.nii.gz"
    image, label = phantom((40, 36, 12), seed=1)
    if kind == "truncated_image":
        truncate(img_p)
    elif kind == "truncated_label":
        truncate(lab_p)
    elif kind == "garbage_image":
        img_p.write_bytes(b"\x1f\x8b not really gzip" * 10)
    elif kind == "shape":
        write(label[:, :, :10], lab_p)
    elif kind == "spacing":
        write(label, lab_p, spacing=(0.8, 0.9, 3.0))
    elif kind == "origin":
        write(label, lab_p, origin=(-20.5, 12.0, -31.0))
    elif kind == "direction":
        write(label, lab_p, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    elif kind == "label_values":
        label[5, 5, 5] = 7
        write(label, lab_p)
    elif kind == "nan":
        image[3, 4, 5] = np.nan
        write(image, img_p)
    elif kind == "2d":
        write2 = sitk.GetImageFromArray(image[:, :, 0].T.copy())
        sitk.WriteImage(write2, str(img_p))
    elif kind == "4d":
        vol = to_sitk(image)
        sitk.WriteImage(sitk.JoinSeries([vol, vol]), str(img_p))
    elif kind == "vector":
        vec = sitk.Compose([to_sitk(image)] * 3)
        sitk.WriteImage(vec, str(img_p))
    elif kind == "no_label":
        lab_p.unlink()
    elif kind == "no_image":
        img_p.unlink()
    else:  # pragma: no cover
        raise AssertionError(kind)


BAD = {
    "truncated_image": "unreadable image: truncated",
    "truncated_label": "unreadable label: truncated",
    "garbage_image": "unreadable image",
    "shape": "image shape (40, 36, 12) != label shape (40, 36, 10)",
    "spacing": "geometry differ (spacing",
    "origin": "geometry differ (origin",
    "direction": "geometry differ (direction",
    "label_values": "label values {7} not in the card's classes",
    "nan": "1 non-finite voxel",
    "2d": "image is 2D",
    "4d": "image is 4D",
    "vector": "3 components per voxel",
    "no_label": "no label file",
    "no_image": "no image file",
}


@pytest.fixture(scope="module")
def good_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("good") / "raw"
    make_nnunet_dataset(root, ("hn_000", "hn_001"))
    return root


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_case_gives_one_line_error_naming_case_and_problem(tmp_path, good_dataset, kind):
    root = tmp_path / "raw"
    shutil.copytree(good_dataset, root)
    _corrupt(kind, root)
    card = make_card(tmp_path, root)
    cases = {c.case_id: c for c in list_cases(card)}
    read_case(card, cases["hn_000"])  # the good case is still fine
    with pytest.raises(CaseError) as info:
        read_case(card, cases["hn_001"])
    msg = str(info.value)
    assert msg.startswith("hn_001: "), msg
    assert BAD[kind] in msg, msg
    assert "\n" not in msg
    assert info.value.case_id == "hn_001"
    if kind in ("truncated_image", "label_values", "spacing"):
        assert "hn_001" in msg.rsplit("(", 1)[-1], "names the offending file"


def test_truncated_nrrd_is_a_case_error(tmp_path):
    make_pddca_dataset(tmp_path / "pddca", ("c1",), overlap=False)
    truncate(tmp_path / "pddca" / "c1" / "structures" / "Mandible.nrrd")
    card = make_card(tmp_path, tmp_path / "pddca", layout="pddca")
    with pytest.raises(CaseError, match=r"^c1: unreadable structure Mandible"):
        read_case(card, list_cases(card)[0])


@pytest.mark.parametrize(
    "values, dtype, shown",
    [
        ((7,), np.uint8, "{7}"),  # every voxel 7: was read as "the whole volume is mandible"
        ((0, 7), np.uint8, "{7}"),
        ((0, 1, 2), np.uint8, "{2}"),
        ((0, 1, 255), np.uint8, "{0, 1, 255}"),  # the two encodings mixed
        ((0, -1), np.int16, "{-1}"),
        ((0, 0.5, 1), np.float32, "{0.5}"),  # a probability map
    ],
)
def test_pddca_non_binary_structure_mask_is_a_case_error(tmp_path, values, dtype, shown):
    make_pddca_dataset(tmp_path / "pddca", ("c1",), overlap=False)
    path = tmp_path / "pddca" / "c1" / "structures" / "Mandible.nrrd"
    mask = np.full((40, 36, 12), values[0], dtype=dtype)
    for i, v in enumerate(values[1:], start=1):
        mask[i :: len(values)] = v
    write(mask, path, compress=True)
    card = make_card(tmp_path, tmp_path / "pddca", layout="pddca")
    with pytest.raises(CaseError) as info:
        read_case(card, list_cases(card)[0])
    msg = str(info.value)
    assert msg.startswith("c1: structure Mandible is not a binary mask"), msg
    assert f"values {shown}" in msg and "{0, 1} or only {0, 255}" in msg, msg
    assert msg.endswith(f"({path})") and "\n" not in msg


@pytest.mark.parametrize("one", [1, 255])
def test_pddca_structure_masks_in_0_1_or_0_255_are_accepted(tmp_path, one):
    expected = make_pddca_dataset(tmp_path / "pddca", ("c1",), overlap=False)
    sdir = tmp_path / "pddca" / "c1" / "structures"
    for p in sdir.glob("*.nrrd"):
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(p))).transpose(2, 1, 0)
        write((mask * one).astype(np.uint8), p, compress=True)
    write(np.zeros((40, 36, 12), np.uint8), sdir / "Parotid_L.nrrd", compress=True)  # empty: fine
    card = make_card(tmp_path, tmp_path / "pddca", layout="pddca")
    _, label, _ = read_case(card, list_cases(card)[0])
    want = expected["c1"][1].copy()
    want[want == CLASSES.index("parotid_l")] = 0
    np.testing.assert_array_equal(label, want)


def test_pddca_case_without_structures(tmp_path):
    make_pddca_dataset(tmp_path / "pddca", ("c1",), overlap=False)
    shutil.rmtree(tmp_path / "pddca" / "c1" / "structures")
    card = make_card(tmp_path, tmp_path / "pddca", layout="pddca")
    with pytest.raises(CaseError, match=r"^c1: no label file"):
        read_case(card, list_cases(card)[0])


def test_small_origin_jitter_is_tolerated(tmp_path, good_dataset):
    root = tmp_path / "raw"
    shutil.copytree(good_dataset, root)
    _, label = phantom((40, 36, 12), seed=1)
    write(label, root / "labelsTr" / "hn_001.nii.gz", origin=(ORIGIN[0] + 1e-5, ORIGIN[1], ORIGIN[2]))
    card = make_card(tmp_path, root)
    read_case(card, list_cases(card)[1])


# ---------------------------------------------------------------------------------- geometry
def test_resample_sizes_and_interpolators():
    image, label = phantom((40, 36, 12))
    img = to_sitk(image)
    for interp in ("linear", "bspline"):
        out = resample_image(img, (1.0, 1.0, 3.0), interp)
        assert out.GetSize() == resampled_size((40, 36, 12), SPACING, (1.0, 1.0, 3.0)) == (32, 32, 10)
        np.testing.assert_allclose(out.GetOrigin(), img.GetOrigin())
        np.testing.assert_allclose(out.GetDirection(), img.GetDirection())
        assert out.GetSpacing() == (1.0, 1.0, 3.0)
        arr = image_to_xyz(out)
        assert -1100 < float(np.median(arr)) < 100
    lab = resample_label(to_sitk(label), (1.0, 1.0, 3.0))
    assert set(np.unique(image_to_xyz(lab))) <= {0, 1, 2, 3}
    with pytest.raises(ValueError, match="interpolation"):
        resample_image(img, (1, 1, 3), "cubic")
    assert resample_image(img, SPACING) is img  # nothing to do at the same spacing


def _restore_attrs(label_img: sitk.Image, target, start, stop):
    res = resample_label(label_img, target)
    return res, {
        "spacing": target,
        "crop_start": start,
        "crop_stop": stop,
        "resampled_origin": res.GetOrigin(),
        "resampled_shape": res.GetSize(),
        "orig_spacing": label_img.GetSpacing(),
        "orig_origin": label_img.GetOrigin(),
        "orig_direction": label_img.GetDirection(),
        "orig_shape": label_img.GetSize(),
    }


def test_restore_original_geometry_is_exact_at_the_same_spacing():
    _, label = phantom((40, 36, 12))
    img = to_sitk(label)
    res, attrs = _restore_attrs(img, SPACING, (2, 3, 1), (38, 34, 12))
    cropped = image_to_xyz(res)[2:38, 3:34, 1:12]
    back = restore_original_geometry(cropped, attrs)
    assert back.GetSize() == img.GetSize()
    assert back.GetSpacing() == img.GetSpacing() and back.GetOrigin() == img.GetOrigin()
    assert back.GetDirection() == img.GetDirection()
    np.testing.assert_array_equal(image_to_xyz(back), label)  # everything labelled lies inside the crop


def _dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_restore_original_geometry_anisotropic_rotated_round_trip():
    shape = (60, 50, 20)
    spacing, origin = (0.7, 0.85, 2.4), (-31.2, 17.9, -80.5)
    x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    blob = (((x - 30) / 12.0) ** 2 + ((y - 24) / 9.0) ** 2 + ((z - 9) / 5.0) ** 2) <= 1
    label = blob.astype(np.uint8) * 2
    img = to_sitk(label, spacing, origin, DIRECTION)
    target = (1.0, 1.0, 3.0)
    res, attrs = _restore_attrs(img, target, (5, 4, 1), (40, 38, 15))
    cropped = image_to_xyz(res)[5:40, 4:38, 1:15]
    assert cropped.sum() == image_to_xyz(res).sum(), "the crop keeps the whole blob"
    back = restore_original_geometry(cropped, attrs)
    assert back.GetSize() == shape
    assert back.GetSpacing() == img.GetSpacing()
    assert back.GetOrigin() == img.GetOrigin()
    assert back.GetDirection() == img.GetDirection()
    restored = image_to_xyz(back)
    assert restored.dtype == np.uint8 and set(np.unique(restored)) == {0, 2}
    assert _dice(restored == 2, blob) > 0.9
    with pytest.raises(ValueError, match="does not match the cached crop"):
        restore_original_geometry(cropped[:-1], attrs)


def test_cropped_origin_is_the_physical_point_of_the_crop_start():
    img = to_sitk(np.zeros((10, 12, 8), np.uint8))
    start = (3, 2, 5)
    expected = img.TransformIndexToPhysicalPoint(start)
    np.testing.assert_allclose(
        cropped_origin(img.GetOrigin(), img.GetDirection(), img.GetSpacing(), start), expected, atol=1e-9
    )


def test_resample_to_grid_onto_a_reference():
    img = to_sitk(phantom((20, 18, 8))[1])
    out = resample_to_grid(img, (20, 18, 8), img.GetSpacing(), img.GetOrigin(), img.GetDirection(), "nearest")
    np.testing.assert_array_equal(image_to_xyz(out), image_to_xyz(img))


def test_casefiles_lists_all_files(tmp_path):
    c = CaseFiles(
        "x", tmp_path / "a.nii", tmp_path / "b.nii", {"Z": tmp_path / "z.nrrd", "A": tmp_path / "q.nrrd"}
    )
    assert c.files == [tmp_path / "a.nii", tmp_path / "b.nii", tmp_path / "q.nrrd", tmp_path / "z.nrrd"]
    assert json.dumps([str(p) for p in c.files])
    assert isinstance(DatasetCard, type)


def test_atomic_writes_get_normal_permissions_and_leave_nothing_on_error(tmp_path):
    """mkstemp's private 0600 must not leak into results that colleagues on a cluster need to read."""
    import os

    from organseg.io.atomic import atomic_open

    old = os.umask(0o022)
    try:
        with atomic_open(tmp_path / "report.md") as f:
            f.write("ok")
        assert (tmp_path / "report.md").stat().st_mode & 0o777 == 0o644
        with pytest.raises(RuntimeError):
            with atomic_open(tmp_path / "report.md") as f:
                f.write("half")
                raise RuntimeError("interrupted")
    finally:
        os.umask(old)
    assert (tmp_path / "report.md").read_text() == "ok"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]
