"""``layout: dicom_rt``: a planning-system export (CT series + RTSTRUCTs with clinical names) read into the
cache; the phantom's export round-trips; every real-export fault is one line naming patient and file, and
leaves no cache behind."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from organseg.cli.main import main

REPO = Path(__file__).resolve().parents[1]
SHAPE, SPACING = (96, 96, 24), (2.0, 2.0, 6.0)


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> dict:
    """Two phantom patients exported as DICOM CT + RTSTRUCT (messy names), and their nnU-Net labels."""
    root = tmp_path_factory.mktemp("dicom_rt")
    args = ["phantom", "hn", "--out", str(root / "raw"), "--cases", "2", "--quiet", "--workers", "1"]
    args += ["--shape", *map(str, SHAPE), "--spacing", *map(str, SPACING), "--dicom", str(root / "dicom")]
    assert main(args) == 0
    return {"raw": root / "raw", "dicom": root / "dicom"}


def make_card(export: dict, tmp_path: Path, **overrides) -> Path:
    """A copy of the export under ``tmp_path/dicom`` and the repository's dicom_rt card pointing at it."""
    folder = tmp_path / "dicom"
    if not folder.exists():
        shutil.copytree(export["dicom"], folder)
    card = yaml.safe_load((REPO / "data_modules/cards/hn_phantom_dicom_rt.yaml").read_text())
    card.update(path=str(folder), cache=str(tmp_path / "cache" / "rt.h5"), target_spacing=list(SPACING))
    card.update({"split": {"val": 0, "test": 0, "seed": 0}, **overrides})
    path = tmp_path / "card.yaml"
    path.write_text(yaml.safe_dump(card, sort_keys=False))
    return path


def load(card_path: Path):
    from organseg.io.card import DatasetCard

    return DatasetCard.load(card_path)


def rs_file(tmp_path: Path, case: str = "hn_000") -> Path:
    return tmp_path / "dicom" / case / f"RS_{case}.dcm"


def edit_rs(path: Path, edit) -> None:
    import pydicom

    ds = pydicom.dcmread(str(path))
    edit(ds)
    ds.save_as(str(path))


def roi_number(ds, name_test) -> int:
    return next(int(r.ROINumber) for r in ds.StructureSetROISequence if name_test(str(r.ROIName)))


def contours_of(ds, number: int):
    return next(rc for rc in ds.ROIContourSequence if int(rc.ReferencedROINumber) == number)


def assert_one_line_fault(card_path: Path, *needles: str, skip_bad: bool = False) -> None:
    """``organseg preprocess`` stops with one line naming the case and file, and writes no cache."""
    from organseg.cache.build import build_cache
    from organseg.io.layouts import CaseError

    card = load(card_path)
    with pytest.raises(CaseError) as info:
        build_cache(card, workers=1, progress=False)
    message = str(info.value)
    assert "\n" not in message and "hn_000" in message
    for needle in needles:
        assert needle in message, message
    cache = Path(card.cache)
    assert not cache.exists() and not list(cache.parent.glob("*.tmp-*"))


def test_round_trip_phantom_labels_through_rtstruct_and_cache(export, tmp_path):
    """phantom labels -> RTSTRUCT (clinical names) -> dicom_rt -> the same labels, every organ."""
    import h5py
    import SimpleITK as sitk

    from organseg.cache.build import build_cache
    from organseg.io.geometry import image_to_xyz
    from organseg.io.layouts import list_cases, read_case_sitk

    card = load(make_card(export, tmp_path))
    cases = list_cases(card)
    assert [c.case_id for c in cases] == ["hn_000", "hn_001"]
    for case in cases:
        image, label, geom = read_case_sitk(card, case)
        truth_img = sitk.ReadImage(str(export["raw"] / "labelsTr" / f"{case.case_id}.nii.gz"))
        assert geom.shape == tuple(truth_img.GetSize())
        np.testing.assert_allclose(image.GetOrigin(), truth_img.GetOrigin(), atol=1e-3)
        got, truth = image_to_xyz(label), image_to_xyz(truth_img)
        for index, organ in enumerate(card.classes[1:], start=1):
            a, b = got == index, truth == index
            assert b.any(), organ
            dice = 2 * np.count_nonzero(a & b) / (a.sum() + b.sum())
            assert dice >= 0.95, (case.case_id, organ, dice)
    build_cache(card, workers=1, progress=False)
    with h5py.File(card.cache, "r") as h5:
        attrs = h5["cases/hn_000"].attrs
        report = json.loads(attrs["structure_report"])
        assert attrs["orig_shape"].tolist() == list(SHAPE)  # original geometry kept for prediction
    mapping = {s["name"]: s["mapping"] for s in report["structures"]}
    assert mapping["Brainstem_PRV03"].startswith("ignored: planning organ-at-risk volume")
    assert mapping["PTV_7000"].startswith("ignored: target volume")
    assert mapping["z_opt_parotid"].startswith("ignored: helper")
    assert mapping["External"].startswith("ignored: external")
    assert mapping["Parotids"] == "unmatched"
    assert sum(s["class"] is not None for s in report["structures"]) == 17
    assert report["conflicts"] == [] and report["overlaps"] == {}


def test_dry_run_prints_the_names_table_and_writes_nothing(export, tmp_path, capsys):
    card_path = make_card(export, tmp_path)
    assert main(["preprocess", "--dry-run", str(card_path)]) == 0
    out = capsys.readouterr().out
    assert "2 patient(s)" in out
    assert re.search(r"'Brainstem_PRV03' +2  ignored: planning organ-at-risk volume \(PRV\)", out)
    assert "no contour data in 2" in out  # the empty Cochlea_L
    assert "names: 34 to classes, 5 ignored, 1 unmatched" in out
    assert "'Parotids'" in out and "unmatched" in out
    assert "  lens_l                  2/2 patient(s)" in out
    assert not Path(load(card_path).cache).exists()


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (-1, 0, 0, 0, -1, 0, 0, 0, 1)])
def test_holes_and_islands_in_holes_are_rasterised(tmp_path, direction):
    """An organ with a hole (an inner contour) and an island inside the hole reads back voxel for voxel,
    on an LPS grid and on a flipped (-1, -1, 1) one (common for head-and-neck CT)."""
    import SimpleITK as sitk

    from organseg.io.dicom import read_headers, write_dicom_series
    from organseg.io.dicom_rt import RtStruct, rasterise, read_ct, scan_patient
    from organseg.io.geometry import image_to_xyz, xyz_to_image
    from organseg.io.layouts import CaseFiles
    from organseg.io.rtstruct import write_rtstruct

    ct = sitk.Image([40, 40, 4], sitk.sitkFloat32)
    ct.SetSpacing((1.0, 1.2, 3.0))
    ct.SetDirection(direction)
    ct.SetOrigin((20.0, -7.0, 30.0))
    files = write_dicom_series(ct, tmp_path / "p" / "ct")
    lab = np.zeros((40, 40, 4), np.uint8)
    lab[5:35, 5:35, 1:3] = 1
    lab[10:30, 10:30, 1:3] = 0  # the hole
    lab[17:23, 17:23, 1:3] = 1  # an island in it
    write_rtstruct(
        xyz_to_image(lab, ct), ["background", "Parotid_L"], read_headers(files), tmp_path / "p" / "rs.dcm"
    )
    case = CaseFiles("p", tmp_path / "p", dicom=sorted((tmp_path / "p").rglob("*.dcm")))
    found = scan_patient(case)
    image, _ = read_ct("p", next(iter(found.ct.values())))
    rs: RtStruct = found.rtstructs[0]
    ((name, _, contours),) = rs.rois()
    assert len(contours) == 6  # outer, hole, island on two slices
    mask = rasterise("p", name, contours, image, rs.path)
    np.testing.assert_array_equal(mask, lab == 1)
    assert image_to_xyz(image).shape == lab.shape


# ---------------------------------------------------------------------------------- real-export faults
def test_two_rtstructs_disagreeing_take_the_newest_and_report_it_or_stop(export, tmp_path, capsys):
    import h5py
    import pydicom
    from pydicom.uid import generate_uid

    from organseg.cache.build import build_cache

    card_path = make_card(export, tmp_path)
    older = rs_file(tmp_path)
    newer = older.with_name("RS_hn_000_replan.dcm")
    ds = pydicom.dcmread(str(older))
    number = roi_number(
        ds, lambda n: n in ("Parotid_L", "L Parotid", "PAROTID LT", "Lt_Parotid", "parotid left")
    )
    for contour in contours_of(ds, number).ContourSequence:  # the left parotid 4 mm further left
        points = np.asarray(contour.ContourData, float).reshape(-1, 3) + [4.0, 0.0, 0.0]
        contour.ContourData = [f"{v:.4f}" for v in points.ravel()]
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StructureSetDate, ds.StructureSetTime = "20991231", "235959"
    ds.save_as(str(newer))

    card = load(card_path)
    build_cache(card, workers=1, progress=False)
    out = capsys.readouterr().out
    assert "hn_000: 2 RTSTRUCTs contour parotid_l differently" in out and "RS_hn_000_replan.dcm" in out
    with h5py.File(card.cache, "r") as h5:
        conflicts = json.loads(h5["cases/hn_000"].attrs["structure_report"])["conflicts"]
    assert [(c["class"], c["chosen"], c["policy"]) for c in conflicts] == [
        ("parotid_l", "RS_hn_000_replan.dcm", "newest")
    ]
    strict = make_card(export, tmp_path / "strict", rtstruct_conflict="error")
    shutil.copy(newer, rs_file(tmp_path / "strict").with_name(newer.name))
    assert_one_line_fault(strict, "contour parotid_l differently", "RS_hn_000.dcm", "RS_hn_000_replan.dcm")


def test_structure_without_contour_data_stops_or_is_a_recorded_skip(export, tmp_path):
    import h5py

    from organseg.cache.build import build_cache

    card_path = make_card(export, tmp_path)

    def empty_brainstem(ds):
        number = roi_number(ds, lambda n: n.lower().replace(" ", "") == "brainstem")
        del contours_of(ds, number).ContourSequence

    edit_rs(rs_file(tmp_path), empty_brainstem)
    assert_one_line_fault(card_path, "(brainstem) has no contour data", "RS_hn_000.dcm")
    card = load(card_path)
    build_cache(card, workers=1, progress=False, skip_bad=True)
    with h5py.File(card.cache, "r") as h5:
        assert json.loads(h5.attrs["case_ids"]) == ["hn_001"]
        assert "no contour data" in json.loads(h5.attrs["skipped_errors"])["hn_000"]


def test_rtstruct_whose_referenced_series_is_missing(export, tmp_path):
    card_path = make_card(export, tmp_path)

    def other_series(ds):
        ref = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
        ref.RTReferencedSeriesSequence[0].SeriesInstanceUID = "1.2.3.4.5"

    edit_rs(rs_file(tmp_path), other_series)
    assert_one_line_fault(
        card_path, "references CT series 1.2.3.4.5, which is not in the patient folder", "RS_hn_000"
    )


def test_rtstruct_naming_no_series_is_matched_by_frame_of_reference(export, tmp_path):
    from organseg.io.layouts import list_cases, read_case_sitk

    card_path = make_card(export, tmp_path)
    edit_rs(
        rs_file(tmp_path),
        lambda ds: delattr(ds.ReferencedFrameOfReferenceSequence[0], "RTReferencedStudySequence"),
    )
    card = load(card_path)
    report: dict = {}
    _, label, _ = read_case_sitk(card, list_cases(card)[0], report)
    assert (
        report["ct_slices"] == SHAPE[2]
        and len(np.unique(__import__("SimpleITK").GetArrayViewFromImage(label))) == 18
    )

    def other_frame(ds):  # (the series reference is gone already)
        ds.FrameOfReferenceUID = ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID = "1.2.3.9"

    edit_rs(rs_file(tmp_path), other_frame)
    assert_one_line_fault(card_path, "no CT series has its frame of reference 1.2.3.9", "RS_hn_000.dcm")


def test_missing_slice_stops_and_is_never_interpolated(export, tmp_path):
    card_path = make_card(export, tmp_path)
    (tmp_path / "dicom" / "hn_000" / "CT_0010.dcm").unlink()
    assert_one_line_fault(card_path, "1 missing slice(s)", "CT_0009.dcm and CT_0011.dcm")


def test_uneven_slice_spacing_stops(export, tmp_path):
    import pydicom

    card_path = make_card(export, tmp_path)
    path = tmp_path / "dicom" / "hn_000" / "CT_0010.dcm"
    ds = pydicom.dcmread(str(path))
    ipp = [float(v) for v in ds.ImagePositionPatient]
    ds.ImagePositionPatient = [ipp[0], ipp[1], ipp[2] + 2.0]
    ds.save_as(str(path))
    assert_one_line_fault(card_path, "uneven slice spacing", "CT_0010.dcm")


@pytest.mark.parametrize("fault", ["tilt_tag", "sheared", "sagittal"])
def test_gantry_tilted_or_non_axial_series_is_a_clear_error(export, tmp_path, fault):
    import pydicom

    card_path = make_card(export, tmp_path)
    for path in sorted((tmp_path / "dicom" / "hn_000").glob("CT_*.dcm")):
        ds = pydicom.dcmread(str(path))
        k = int(ds.InstanceNumber)
        if fault == "tilt_tag":
            ds.GantryDetectorTilt = "15"
        elif fault == "sheared":  # what a tilted gantry's slices look like: each shifted in y
            ipp = [float(v) for v in ds.ImagePositionPatient]
            ds.ImagePositionPatient = [ipp[0], ipp[1] + 1.5 * k, ipp[2]]
        else:
            ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.save_as(str(path))
    expected = "not an axial CT series" if fault == "sagittal" else "gantry-tilted CT series"
    assert_one_line_fault(card_path, expected)


def test_overlapping_organs_the_smaller_wins_and_is_counted(export, tmp_path, capsys):
    import h5py

    from organseg.cache.build import build_cache
    from organseg.io.layouts import list_cases, read_case_sitk

    card_path = make_card(export, tmp_path)

    def ptv_becomes_mandible(ds):  # the PTV around the left parotid now contoured as the mandible
        for roi in ds.StructureSetROISequence:
            if "mandible" in str(roi.ROIName).lower():
                roi.ROIName = "z_old_mandible"
        for roi in ds.StructureSetROISequence:
            if roi.ROIName == "PTV_7000":
                roi.ROIName = "Mandible"

    edit_rs(rs_file(tmp_path), ptv_becomes_mandible)
    card = load(card_path)
    report: dict = {}
    _, label, _ = read_case_sitk(card, list_cases(card)[0], report)
    overlaps = report["overlaps"]  # {"<smaller> over <larger>": voxels}
    assert overlaps["parotid_l over mandible"] > 0 and min(overlaps.values()) > 0
    import SimpleITK as sitk

    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(export["raw"] / "labelsTr" / "hn_000.nii.gz")))
    got = sitk.GetArrayFromImage(label)
    parotid = card.index("parotid_l")
    np.testing.assert_array_equal(got == parotid, truth == parotid)  # the smaller organ kept every voxel
    build_cache(card, workers=1, progress=False)
    total = sum(overlaps.values())
    assert f"hn_000: {total} voxel(s) in two organs, the smaller organ wins" in capsys.readouterr().out
    with h5py.File(card.cache, "r") as h5:
        assert json.loads(h5["cases/hn_000"].attrs["structure_report"])["overlaps"] == overlaps


def test_cli_fault_is_one_line_and_exit_2(export, tmp_path, capsys):
    card_path = make_card(export, tmp_path)
    rs_file(tmp_path).unlink()
    assert main(["preprocess", "--no-progress", "--workers", "1", str(card_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("organseg preprocess: error: hn_000: no RTSTRUCT file in the patient folder")
    assert not Path(load(card_path).cache).exists()


def test_messy_export_trains_through_organseg_fit(export, tmp_path, monkeypatch):
    """Done-when: the phantom's planning export trains the baseline with the same `organseg fit` command."""
    from helpers.tiny_fit import tiny_fit_args

    card_path = make_card(export, tmp_path)
    monkeypatch.chdir(tmp_path)
    stack = ("experiments/baseline/unet.yaml", "data_modules/hn_phantom_dicom_rt.yaml")
    assert main(tiny_fit_args(card_path, tmp_path, stack, trainer={"max_steps": 2})) == 0
    assert Path(load(card_path).cache).is_file()
    assert list(tmp_path.rglob("*.ckpt"))


def test_pddca_phantom_export_carries_its_nine_organs(tmp_path):
    """`phantom hn --layout pddca --dicom`: the RTSTRUCT holds the PDDCA structures, read back exactly."""
    import SimpleITK as sitk

    from organseg.io.geometry import image_to_xyz
    from organseg.io.layouts import list_cases, read_case_sitk
    from organseg.phantom.hn import PDDCA_NAMES

    args = ["phantom", "hn", "--out", str(tmp_path / "raw"), "--cases", "1", "--quiet", "--layout", "pddca"]
    args += ["--shape", *map(str, SHAPE), "--spacing", *map(str, SPACING), "--dicom", str(tmp_path / "src")]
    assert main(args) == 0
    card = load(make_card({"dicom": tmp_path / "src"}, tmp_path))
    _, label, _ = read_case_sitk(card, list_cases(card)[0])
    got = image_to_xyz(label)
    for stem, organ in PDDCA_NAMES.items():
        truth = image_to_xyz(sitk.ReadImage(str(tmp_path / "raw" / "hn_000" / "structures" / f"{stem}.nrrd")))
        np.testing.assert_array_equal(got == card.index(organ), truth > 0, err_msg=organ)
    assert set(np.unique(got)) == {0, *(card.index(o) for o in PDDCA_NAMES.values())}
