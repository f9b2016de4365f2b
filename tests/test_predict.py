"""`organseg predict`: label maps in the ORIGINAL geometry (NIfTI) and DICOM RTSTRUCT for a CT series.

A tiny UNetBaseline checkpoint (one training step) exercises the real command; the checks of *where*
labels land use an oracle model whose ``predict_case`` returns the preprocessed ground truth, so a
geometry bug (crop, resampling, direction cosines, DICOM axis order) shows as a wrong label map.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from helpers.checkpoints import tiny_unet_checkpoint
from organseg.cache.build import preprocess_volume
from organseg.cli.main import main
from organseg.io.card import DatasetCard
from organseg.io.geometry import Geometry, image_to_xyz, resample_to_grid, resampled_size

REPO = Path(__file__).resolve().parents[1]
ORGANSEG = str(Path(sys.executable).with_name("organseg"))
CASE = "hn_000"  # the first phantom case of the hn_small fixture
LARGE = ("brainstem", "mandible", "parotid_l", "parotid_r", "temporal_lobe_l", "temporal_lobe_r")


def _rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    """Rotation about x, then y, then z (degrees)."""
    a, b, c = np.deg2rad([rx, ry, rz])
    rx_ = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry_ = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz_ = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz_ @ ry_ @ rx_


def _regrid(
    image: sitk.Image, spacing, direction: np.ndarray, interpolation: str, default: float
) -> sitk.Image:
    """``image``'s content on a grid with new spacing and direction cosines, covering its field of view
    (the phantom rotated in its own frame: same anatomy, another grid)."""
    size = resampled_size(image.GetSize(), image.GetSpacing(), spacing)
    centre = np.asarray(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    origin = centre - direction @ ((np.asarray(size) - 1) / 2 * np.asarray(spacing))
    return resample_to_grid(image, size, spacing, origin, direction.ravel(), interpolation, default)


def _case(hn_small, spacing=(1.2, 1.9, 3.7), direction=None) -> tuple[sitk.Image, sitk.Image]:
    """(CT, label) of the phantom case on an anisotropic grid with non-identity direction cosines."""
    image = sitk.ReadImage(str(hn_small["raw"] / "imagesTr" / f"{CASE}_0000.nii.gz"), sitk.sitkFloat32)
    label = sitk.ReadImage(str(hn_small["raw"] / "labelsTr" / f"{CASE}.nii.gz"))
    if direction is None:
        direction = _rotation(8, -12, 25) @ np.diag([-1.0, 1.0, 1.0])  # oblique and left-handed
    return (
        _regrid(image, spacing, direction, "linear", -1024.0),
        _regrid(label, spacing, direction, "nearest", 0),
    )


def _oracle(card, image, label):
    """A stand-in model whose whole-case prediction is the ground truth preprocessed like the input."""
    _, truth, _ = preprocess_volume(card, image, label)

    def predict_case(x, progress=False):
        assert tuple(x.shape[2:]) == truth.shape, "the input was cropped differently from the cache"
        return torch.from_numpy(truth)[None]

    return predict_case


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


def _geometry_equal(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


@pytest.fixture(scope="module")
def card(hn_small) -> DatasetCard:
    """The fixture's card with a target spacing unlike any input grid (so predict must resample)."""
    c = DatasetCard.load(hn_small["card"])
    c.target_spacing = [1.5, 1.5, 4.5]
    return c


@pytest.fixture(scope="module")
def tiny_ckpt(card, tmp_path_factory) -> Path:
    """A real UNetBaseline checkpoint after one training step (tests/helpers/checkpoints.py)."""
    return tiny_unet_checkpoint(card, tmp_path_factory.mktemp("ckpt"))


# ---------------------------------------------------------------------------------- preprocessing
def test_predict_preprocessing_is_the_caches(hn_small):
    """No drift: the model input and grid attrs equal what the training cache stored for the same file."""
    from organseg.cache.reader import CacheReader
    from organseg.inference.raw_images import preprocess_for_model

    card = DatasetCard.load(hn_small["card"])
    image = sitk.ReadImage(str(hn_small["raw"] / "imagesTr" / f"{CASE}_0000.nii.gz"), sitk.sitkFloat32)
    x, attrs = preprocess_for_model(image, card)
    reader = CacheReader(hn_small["cache"])
    cached, _ = reader.read_case(CASE)
    np.testing.assert_array_equal(x, cached)
    geometry = reader.geometry(CASE)
    for key in ("crop_start", "crop_stop", "spacing", "origin", "direction", "orig_shape", "resampled_shape"):
        np.testing.assert_allclose(attrs[key], geometry[key], err_msg=key)


# ---------------------------------------------------------------------------------- NIfTI geometry
def test_labels_land_in_the_original_geometry(hn_small, card):
    """Oracle model on an oblique, left-handed, anisotropic grid: the restored map has the input's exact
    grid and equals the original labels up to nearest-neighbour resampling at organ borders."""
    from organseg.inference.raw_images import predict_image

    image, label = _case(hn_small)
    assert not np.allclose(np.asarray(image.GetDirection()).reshape(3, 3), np.eye(3))
    out = predict_image(SimpleNamespace(predict_case=_oracle(card, image, label)), image, card)
    assert out.GetPixelID() == sitk.sitkUInt8
    _geometry_equal(out, image)
    pred, truth = image_to_xyz(out), image_to_xyz(label)
    assert np.mean(pred == truth) > 0.99  # measured 0.995 (nearest-neighbour there and back)
    for organ in LARGE:
        c = card.index(organ)
        assert _dice(pred == c, truth == c) > 0.85, organ
    # a mirrored or shifted map would not agree: the check has teeth
    assert np.mean(pred[::-1] == truth) < 0.95  # measured 0.89


@pytest.mark.slow
def test_predict_cli_on_nifti_files(hn_small, card, tiny_ckpt, tmp_path):
    """The real command on two files (NIfTI and NRRD): one uint8 map per input with the input's grid,
    labels.json, and no overwrite without --overwrite."""
    image, _ = _case(hn_small)
    inputs = tmp_path / "in"
    inputs.mkdir()
    sitk.WriteImage(image, str(inputs / "oblique_0000.nii.gz"))
    sitk.WriteImage(
        _case(hn_small, spacing=(1.0, 1.0, 5.0), direction=np.eye(3))[0], str(inputs / "plain.nrrd")
    )
    out = tmp_path / "out"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [ORGANSEG, "predict", "--ckpt", str(tiny_ckpt), "--input", str(inputs), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["labels.json", "oblique_seg.nii.gz", "plain_seg.nii.gz"]
    for name, src in (("oblique", "oblique_0000.nii.gz"), ("plain", "plain.nrrd")):
        seg, ref = sitk.ReadImage(str(out / f"{name}_seg.nii.gz")), sitk.ReadImage(str(inputs / src))
        assert seg.GetPixelID() == sitk.sitkUInt8
        _geometry_equal(seg, ref)
        assert image_to_xyz(seg).max() < card.num_classes
    labels = json.loads((out / "labels.json").read_text())["labels"]
    assert labels["background"] == 0 and labels["brainstem"] == card.index("brainstem") and len(labels) == 18


# ---------------------------------------------------------------------------------- DICOM + RTSTRUCT
def test_dicom_series_gives_rtstruct_that_rasterises_back(
    hn_small, card, tiny_ckpt, tmp_path, monkeypatch, capsys
):
    """A phantom CT written as a DICOM series (rotated in-plane): predict writes a NIfTI on the series'
    grid and an RTSTRUCT whose ROIs are the organs present and whose contours rasterise back (rt-utils)
    to the predicted masks within one voxel."""
    import pydicom
    from rt_utils import RTStructBuilder

    from organseg.io.dicom import read_dicom_series, write_dicom_series
    from organseg.methods import UNetBaseline

    # square pixels and Rows == Columns: what rt-utils' *reader* supports (see organseg.io.rtstruct)
    image, label = _case(hn_small, spacing=(1.5, 1.5, 4.5), direction=_rotation(0, 0, 20))
    series = tmp_path / "patient1"
    files = write_dicom_series(image, series)
    assert len(files) == image.GetSize()[2]
    ds = pydicom.dcmread(str(files[0]))
    assert ds.Modality == "CT" and float(ds.RescaleIntercept) == -1024.0 and ds.SeriesInstanceUID
    dicom_image, _ = read_dicom_series(series)
    _geometry_equal(dicom_image, image)
    np.testing.assert_allclose(image_to_xyz(dicom_image), np.rint(image_to_xyz(image)), atol=0.5)

    label.CopyInformation(dicom_image)
    monkeypatch.setattr(
        UNetBaseline, "predict_case", lambda self, x, progress=False: _oracle(card, dicom_image, label)(x)
    )
    out = tmp_path / "out"
    assert main(["predict", "--ckpt", str(tiny_ckpt), "--input", str(series), "--out", str(out)]) == 0
    seg = sitk.ReadImage(str(out / "patient1_seg.nii.gz"))
    _geometry_equal(seg, dicom_image)
    pred = image_to_xyz(seg)
    np.testing.assert_array_equal(pred, image_to_xyz(label))  # target spacing == series spacing: exact

    rs = pydicom.dcmread(str(out / "patient1_rtstruct.dcm"))
    assert rs.Modality == "RTSTRUCT" and rs.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3"
    present = [card.classes[c] for c in np.unique(pred) if c]
    assert sorted(r.ROIName for r in rs.StructureSetROISequence) == sorted(present)
    assert rs.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == ds.FrameOfReferenceUID

    rt = RTStructBuilder.create_from(str(series), str(out / "patient1_rtstruct.dcm"))
    # rt-utils' slices are sorted along the normal, like GDCM's: masks are (rows, cols, slices) = (y, x, z)
    from scipy import ndimage

    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[:, :, 1] = True
    for organ in present:
        mine = pred == card.index(organ)
        # rt-utils' reader rounds the polygon corners (on voxel edges, at half-integer indices) half to even
        # before filling them, so it may move a boundary by one voxel either way; the exact read-back (voxel
        # centres inside the polygons) is test_rtstruct_contours_on_non_square_anisotropic_oblique_grid's
        back = rt.get_roi_mask_by_name(organ).transpose(1, 0, 2)
        assert back.shape == mine.shape
        assert not np.any(back & ~ndimage.binary_dilation(mine, in_plane)), organ  # within one voxel
        assert not np.any(mine & ~ndimage.binary_dilation(back, in_plane)), organ


@pytest.mark.parametrize(
    "spacing, direction",
    [
        ((1.0, 1.0, 2.5), np.eye(3)),  # identity
        ((1.0, 1.0, 2.5), np.diag([-1.0, -1.0, 1.0])),  # flipped, as head-and-neck CT often is
        ((0.8, 1.2, 2.5), np.eye(3)),  # 0.8 x 1.2 mm pixels
        ((0.7, 1.3, 2.5), _rotation(0, 0, 35) @ np.diag([-1.0, 1.0, 1.0])),  # non-square, oblique, flipped
    ],
    ids=["identity", "flipped", "aspect", "oblique"],
)
def test_rtstruct_contours_on_voxel_edges_read_back_exactly(tmp_path, spacing, direction):
    """Contours run along voxel edges: in every orientation and pixel aspect each slice's polygon area
    (shoelace, holes subtracted) is its voxel area (polygon volume == voxel volume), every corner is a voxel
    corner, and the voxel centres inside the polygons (even-odd, as a planning system fills them) are
    exactly the mask, small organs, holes and corner-touching voxels included."""
    import pydicom
    from matplotlib.path import Path as MPath

    from organseg.io.dicom import read_dicom_series, read_headers, write_dicom_series
    from organseg.io.geometry import xyz_to_image
    from organseg.io.rtstruct import write_rtstruct

    grid = xyz_to_image(
        np.full((30, 22, 6), 40.0, np.float32),
        {"spacing": spacing, "origin": (5.0, -9.0, 20.0), "direction": np.asarray(direction).ravel()},
    )
    ct, files = read_dicom_series(write_dicom_series(grid, tmp_path / "ct")[0].parent)
    lab = np.zeros(ct.GetSize(), np.uint8)
    lab[3:12, 4:18, 1:4] = 1
    lab[6:9, 8:12, 2] = 0  # a hole
    lab[18:27, 2:9, 2:6] = 2
    lab[20, 12, 1] = lab[21, 13, 1] = 2  # two voxels touching at a corner
    lab[25, 17, 3] = 3  # an organ that is one voxel
    names = write_rtstruct(
        xyz_to_image(lab, ct),
        ["background", "left", "right", "dot"],
        read_headers(files),
        tmp_path / "rs.dcm",
    )
    assert names == ["left", "right", "dot"]
    rs = pydicom.dcmread(str(tmp_path / "rs.dcm"))
    xs, ys = np.meshgrid(np.arange(lab.shape[0]), np.arange(lab.shape[1]), indexing="ij")
    centres = np.stack([xs.ravel(), ys.ravel()], 1).astype(float)
    for roi, c in zip(rs.ROIContourSequence, (1, 2, 3)):
        back = np.zeros(lab.shape, bool)
        area_mm2 = 0.0
        for contour in roi.ContourSequence:
            points = np.reshape(np.asarray(contour.ContourData, float), (-1, 3))
            idx = np.array([ct.TransformPhysicalPointToContinuousIndex(p.tolist()) for p in points])
            np.testing.assert_allclose(np.abs(idx[:, :2] - np.floor(idx[:, :2])), 0.5, atol=1e-3)  # corners
            k = int(round(idx[0, 2]))
            assert np.allclose(idx[:, 2], k, atol=1e-3) and int(contour.NumberOfContourPoints) == len(points)
            x, y = idx[:, 0], idx[:, 1]
            area_mm2 += (
                0.5 * (np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)) * spacing[0] * spacing[1]
            )
            back[:, :, k] ^= MPath(idx[:, :2]).contains_points(centres).reshape(lab.shape[:2])
        voxels = np.count_nonzero(lab == c)
        assert abs(abs(area_mm2) - voxels * spacing[0] * spacing[1]) < 1e-3 * voxels, roi.ReferencedROINumber
        np.testing.assert_array_equal(back, lab == c)


# ---------------------------------------------------------------------------------- bad input
def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def test_bad_inputs_are_one_line_errors(hn_small, tiny_ckpt, tmp_path, capsys):
    from organseg.io.dicom import write_dicom_series

    image, _ = _case(hn_small, spacing=(3.0, 3.0, 9.0), direction=np.eye(3))
    nifti = tmp_path / "ct.nii.gz"
    sitk.WriteImage(image, str(nifti))
    out = tmp_path / "out"

    foreign = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, foreign)
    assert main(["predict", "--ckpt", str(foreign), "--input", str(nifti), "--out", str(out)]) == 2
    assert "not an organseg checkpoint" in _err(capsys)
    assert not out.exists()  # nothing written

    assert (
        main(
            ["predict", "--ckpt", str(tiny_ckpt), "--input", str(tmp_path / "nope.nii.gz"), "--out", str(out)]
        )
        == 2
    )
    assert "no such file or folder" in _err(capsys)

    assert (
        main(
            [
                "predict",
                "--ckpt",
                str(tiny_ckpt),
                "--input",
                str(nifti),
                "--out",
                str(out),
                "--rtstruct",
                "always",
            ]
        )
        == 2
    )
    assert "not a DICOM series" in _err(capsys) and not out.exists()

    two = tmp_path / "two_series"
    a, b = write_dicom_series(image, tmp_path / "a"), write_dicom_series(image, tmp_path / "b")
    two.mkdir()
    for i, f in enumerate(a + b):
        shutil.copy(f, two / f"{i:03d}.dcm")
    assert main(["predict", "--ckpt", str(tiny_ckpt), "--input", str(two), "--out", str(out)]) == 2
    err = _err(capsys)
    uids = {
        str(__import__("pydicom").dcmread(str(f), stop_before_pixels=True).SeriesInstanceUID)
        for f in (a[0], b[0])
    }
    assert "2 DICOM series" in err and str(two) in err and all(u in err for u in uids)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    assert main(["predict", "--ckpt", str(tiny_ckpt), "--input", str(empty), "--out", str(out)]) == 2
    assert "no readable images" in _err(capsys)

    out.mkdir()
    (out / "ct_seg.nii.gz").write_bytes(b"old")
    assert main(["predict", "--ckpt", str(tiny_ckpt), "--input", str(nifti), "--out", str(out)]) == 2
    assert "--overwrite" in _err(capsys) and (out / "ct_seg.nii.gz").read_bytes() == b"old"
    assert (
        main(["predict", "--ckpt", str(tiny_ckpt), "--input", str(nifti), "--out", str(out), "--overwrite"])
        == 0
    )
    assert Geometry.of(sitk.ReadImage(str(out / "ct_seg.nii.gz"))).shape == tuple(image.GetSize())


# ---------------------------------------------------------------------------------- inference settings
def test_inference_settings_reach_the_model(hn_small, card, tiny_ckpt, tmp_path, monkeypatch, capsys):
    """--sw-overlap / --sw-batch-size replace the checkpoint's sliding-window settings on the loaded model,
    --precision autocasts its predict_case (fp32: none); out-of-range values are one-line errors."""
    import organseg.inference.raw_images as raw_images
    from organseg.cli.predict import PRECISIONS
    from organseg.inference.precision import PRECISIONS as INFERENCE_PRECISIONS

    assert PRECISIONS == INFERENCE_PRECISIONS  # the CLI's copy (kept torch-free for --help)
    image, _ = _case(hn_small, spacing=(3.0, 3.0, 9.0), direction=np.eye(3))
    nifti = tmp_path / "ct.nii.gz"
    sitk.WriteImage(image, str(nifti))
    seen = []
    real = raw_images.predict_image

    def spy(model, *args, **kwargs):
        inner = model.predict_case

        def predict_case(x, progress=False, window_transform=None):
            dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
            seen.append((model.sw_overlap, model.sw_batch_size, dtype, x.dtype))
            return inner(x, window_transform=window_transform)

        model.predict_case = predict_case
        return real(model, *args, **kwargs)

    monkeypatch.setattr(raw_images, "predict_image", spy)
    base = ["predict", "--ckpt", str(tiny_ckpt), "--input", str(nifti), "--overwrite"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--out", str(tmp_path / "b"), "--sw-overlap", "0.25", "--sw-batch-size", "3"]) == 0
    assert main([*base, "--out", str(tmp_path / "c"), "--precision", "bf16"]) == 0
    i16 = torch.int16  # the U-Net gets the int16 crop and normalises each window
    assert seen == [(0.5, 2, None, i16), (0.25, 3, None, i16), (0.5, 2, torch.bfloat16, i16)]
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "d"), "--sw-overlap", "1"]) == 2
    assert "--sw-overlap must be in [0, 1)" in _err(capsys)
    assert main([*base, "--out", str(tmp_path / "d"), "--sw-batch-size", "0"]) == 2
    assert "--sw-batch-size must be at least 1" in _err(capsys)


# ---------------------------------------------------------------------------- PDDCA inputs (issue 15)
def test_pddca_cases_are_named_after_their_folders(hn_small, tiny_ckpt, tmp_path, capsys):
    """Every PDDCA image is <case>/img.nrrd: two of them in one call are two cases named after their
    folders (given as files, as case folders, or as the folder of case folders), not a name collision."""
    image, _ = _case(hn_small, spacing=(3.0, 3.0, 9.0), direction=np.eye(3))
    root = tmp_path / "pddca"
    for cid in ("0522c0001", "0522c0002"):
        (root / cid / "structures").mkdir(parents=True)
        sitk.WriteImage(image, str(root / cid / "img.nrrd"))
    want = ["0522c0001_seg.nii.gz", "0522c0002_seg.nii.gz", "labels.json"]
    ways = {
        "files_and_a_case_folder": [str(root / "0522c0001" / "img.nrrd"), str(root / "0522c0002")],
        "root": [str(root)],
    }
    for way, inputs in ways.items():
        out = tmp_path / f"out_{way}"
        assert main(["predict", "--ckpt", str(tiny_ckpt), "--input", *inputs, "--out", str(out)]) == 0, way
        assert sorted(p.name for p in out.iterdir()) == want, way
        _geometry_equal(sitk.ReadImage(str(out / "0522c0002_seg.nii.gz")), image)
    out = capsys.readouterr().out
    assert "predict: model organseg.methods.unet_baseline.UNetBaseline (the class recorded in" in out


# ---------------------------------------------------------------------- nothing left behind (issue 15)
def _bad_input(kind: str, path: Path, image: sitk.Image) -> Path:
    if kind == "2d":
        sitk.WriteImage(image[:, :, 0], str(path))
    elif kind == "4d":
        sitk.WriteImage(sitk.JoinSeries([image, image]), str(path))
    elif kind == "nan":
        arr = sitk.GetArrayFromImage(image)
        arr[2, 3, 4] = np.nan
        bad = sitk.GetImageFromArray(arr)
        bad.CopyInformation(image)
        sitk.WriteImage(bad, str(path))
    elif kind == "text":
        path.write_text("not an image\n")
    return path


@pytest.mark.parametrize(
    "kind, problem",
    [("2d", "image is 2D"), ("4d", "image is 4D"), ("nan", "non-finite"), ("text", "unreadable image")],
)
def test_a_bad_input_among_good_ones_writes_nothing(hn_small, tiny_ckpt, tmp_path, capsys, kind, problem):
    """A good file first, then a bad one: one line naming the bad file, exit 2, and --out as it was
    (not created when it did not exist; an existing one keeps exactly its files: no labels.json, no
    result for the good case)."""
    image, _ = _case(hn_small, spacing=(3.0, 3.0, 9.0), direction=np.eye(3))
    good = tmp_path / "a_good.nii.gz"
    sitk.WriteImage(image, str(good))
    bad = _bad_input(kind, tmp_path / "b_bad.nii.gz", image)
    out = tmp_path / "out"
    args = ["predict", "--ckpt", str(tiny_ckpt), "--input", str(good), str(bad), "--out", str(out)]
    assert main(args) == 2
    err = _err(capsys)
    assert err.startswith("organseg predict: error: b_bad: ") and problem in err and str(bad) in err, err
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(args) == 2
    assert problem in _err(capsys)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_a_run_that_fails_part_way_leaves_out_as_it_was(hn_small, tiny_ckpt, tmp_path, monkeypatch, capsys):
    """A failure while predicting the second case (here a bug, with its traceback) leaves no result of the
    first case and no labels.json; with --overwrite the old outputs stay untouched."""
    import organseg.inference.raw_images as raw_images

    image, _ = _case(hn_small, spacing=(3.0, 3.0, 9.0), direction=np.eye(3))
    inputs = [tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"]
    for p in inputs:
        sitk.WriteImage(image, str(p))
    real, calls, fail = raw_images.predict_image, [], [True]

    def second_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2 and fail[0]:
            raise RuntimeError("out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(raw_images, "predict_image", second_fails)
    out = tmp_path / "out"
    args = ["predict", "--ckpt", str(tiny_ckpt), "--input", *map(str, inputs), "--out", str(out)]
    with pytest.raises(RuntimeError, match="simulated"):
        main(args)
    assert not out.exists()
    out.mkdir()
    (out / "a_seg.nii.gz").write_bytes(b"old")
    calls.clear()
    with pytest.raises(RuntimeError, match="simulated"):
        main([*args, "--overwrite"])
    assert [p.name for p in out.iterdir()] == ["a_seg.nii.gz"]
    assert (out / "a_seg.nii.gz").read_bytes() == b"old"
    calls.clear()
    fail[0] = False
    assert main([*args, "--overwrite"]) == 0 and len(calls) == 2
    assert sorted(p.name for p in out.iterdir()) == ["a_seg.nii.gz", "b_seg.nii.gz", "labels.json"]
    assert Geometry.of(sitk.ReadImage(str(out / "a_seg.nii.gz"))).shape == tuple(image.GetSize())
