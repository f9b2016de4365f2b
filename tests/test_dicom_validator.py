"""The DICOM organseg writes passes dicom3tools' validators, as planning systems require: the phantom's CT
series (`organseg phantom hn --dicom`) and the RTSTRUCT `organseg predict` writes for it have no error from
`dciodvfy`, and `dcentvfy` finds the RTSTRUCT's patient and study attributes the CT's own.

dicom3tools is installed with apt-get when missing (tests/helpers/dicom3tools.py); the tests skip, saying
why, only where it cannot be installed."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
import SimpleITK as sitk
import torch

from conftest import write_card
from helpers import dicom3tools
from helpers.checkpoints import tiny_unet_checkpoint
from organseg.cli.main import main
from organseg.io.card import DatasetCard
from organseg.phantom.hn import HN_CLASSES

# Rows != Columns and non-square pixels: the general grid, not only what rt-utils' reader supports
SHAPE, SPACING = (100, 90, 24), (1.8, 2.2, 6.0)
CASE = "hn_000"
#: the only warnings allowed on an RTSTRUCT of a CT without study date/time/ID (nothing to copy)
DICOMDIR_WARNING = "Missing attribute or value that would be needed to build DICOMDIR"


@pytest.fixture(scope="module")
def validators() -> None:
    try:
        dicom3tools.ensure_installed()
    except dicom3tools.Dicom3toolsUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def phantom(tmp_path_factory, validators) -> dict:
    """One head-and-neck phantom case, also written as a DICOM CT series by `organseg phantom --dicom`."""
    root = tmp_path_factory.mktemp("dicom_validator")
    args = ["phantom", "hn", "--out", str(root / "raw"), "--cases", "1", "--workers", "1", "--quiet"]
    args += ["--shape", *map(str, SHAPE), "--spacing", *map(str, SPACING), "--dicom", str(root / "dicom")]
    assert main(args) == 0
    series = root / "dicom" / CASE
    return {"root": root, "series": series, "label": root / "raw" / "labelsTr" / f"{CASE}.nii.gz"}


def _label_on_series(phantom) -> tuple[sitk.Image, list[Path]]:
    """The phantom's label map on the DICOM series' grid (as read back), and the series' files."""
    from organseg.io.dicom import read_dicom_series

    image, files = read_dicom_series(phantom["series"])
    label = sitk.ReadImage(str(phantom["label"]))
    label.CopyInformation(image)
    return label, files


def test_phantom_ct_series_passes_dciodvfy(phantom):
    files = sorted(phantom["series"].glob("CT_*.dcm"))  # RS_<case>.dcm beside them: its own test
    assert len(files) == SHAPE[2]
    for f in files:
        report = dicom3tools.dciodvfy(f)
        assert report.info == ["CTImage"], report.text
        assert report.errors == [], f"{f.name}:\n{report.text}"
        assert report.warnings == [], f"{f.name}:\n{report.text}"
    ds = pydicom.dcmread(str(files[0]), stop_before_pixels=True)
    assert (
        ds.PatientPosition == "HFS" and ds["KVP"].is_empty and ds.BodyPartExamined == "HEADNECK"
    )  # Type 2/2C
    assert "Laterality" not in ds  # an unpaired body part: absent, not empty


def test_phantom_planning_export_rtstruct_passes_dciodvfy(phantom):
    """The RTSTRUCT `phantom hn --dicom` writes beside the CT (clinical names, PRV, PTV, an ROI without
    contours) is a valid RT Structure Set for dicom3tools, as a planning system's export would be."""
    rs = phantom["series"] / f"RS_{CASE}.dcm"
    report = dicom3tools.dciodvfy(rs)
    assert report.info == ["RTStructureSet"], report.text
    assert report.errors == [], report.text
    names = [str(r.ROIName) for r in pydicom.dcmread(str(rs)).StructureSetROISequence]
    assert {"Brainstem_PRV03", "PTV_7000", "z_opt_parotid", "Cochlea_L", "Parotids"} <= set(names)


def test_predicted_rtstruct_passes_dciodvfy_and_agrees_with_its_ct(phantom, tmp_path, monkeypatch):
    """`organseg predict` on the series (a stand-in model predicting the phantom's labels): its RTSTRUCT has
    no error and no warning from dciodvfy, and carries the CT's patient, study and frame of reference."""
    from organseg.cache.build import preprocess_volume
    from organseg.methods import UNetBaseline

    card_file = write_card(tmp_path / "card.yaml", path=str(phantom["root"] / "raw"), target_spacing=SPACING)
    card = DatasetCard.load(card_file)
    ckpt = tiny_unet_checkpoint(card, tmp_path)
    label, files = _label_on_series(phantom)
    image = sitk.ReadImage([str(f) for f in files], sitk.sitkFloat32)
    _, truth, _ = preprocess_volume(card, image, label)
    monkeypatch.setattr(
        UNetBaseline, "predict_case", lambda self, x, progress=False: torch.from_numpy(truth)[None]
    )
    out = tmp_path / "out"
    assert main(["predict", "--ckpt", str(ckpt), "--input", str(phantom["series"]), "--out", str(out)]) == 0
    rs_file = out / f"{CASE}_rtstruct.dcm"

    report = dicom3tools.dciodvfy(rs_file)
    assert report.info == ["RTStructureSet"], report.text
    assert report.errors == [] and report.warnings == [], report.text
    # the CT has every Type 2 attribute: the RTSTRUCT's copies agree with it, none missing or invented
    entities = dicom3tools.dcentvfy([*files, rs_file])
    assert entities.errors == [] and entities.warnings == [], entities.text

    rs = pydicom.dcmread(str(rs_file))
    ct = pydicom.dcmread(str(files[0]), stop_before_pixels=True)
    assert len(rs.StructureSetROISequence) >= 10  # the organs present, so the contours were validated too
    for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID"):
        assert rs[key].value == ct[key].value, key
    for key in ("StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName"):
        assert rs[key].value == ct[key].value, key
    assert rs.FrameOfReferenceUID == ct.FrameOfReferenceUID
    assert rs.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == ct.FrameOfReferenceUID
    assert {r.ReferencedFrameOfReferenceUID for r in rs.StructureSetROISequence} == {ct.FrameOfReferenceUID}
    assert rs.PositionReferenceIndicator == ct.PositionReferenceIndicator
    assert rs["OperatorsName"].is_empty and rs.SeriesInstanceUID != ct.SeriesInstanceUID
    assert "PatientAge" not in rs and "StudyDescription" not in rs  # not in the CT: not invented


SPARSE = (
    "StudyID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "PatientBirthDate",
    "PatientSex",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
)


@pytest.mark.parametrize("variant", ["sparse", "utf8"])
def test_rtstruct_of_other_ct_headers_passes_dciodvfy(phantom, tmp_path, variant):
    """An anonymised CT that lacks optional and Type 2 attributes (even its frame of reference) still
    gives a valid RTSTRUCT, with the Type 2 ones empty; a UTF-8 CT's names keep their character set."""
    from organseg.io.dicom import read_headers
    from organseg.io.rtstruct import write_rtstruct

    label, files = _label_on_series(phantom)
    headers = read_headers(files)
    for h in headers:
        if variant == "sparse":
            for key in SPARSE:
                del h[key]
        else:
            h.SpecificCharacterSet, h.PatientName = "ISO_IR 192", "Müller^Jörg"
            h.StudyDescription = "Kopf/Hals 頭頸部"
    path = tmp_path / "rs.dcm"
    assert len(write_rtstruct(label, HN_CLASSES, headers, path)) >= 10

    report = dicom3tools.dciodvfy(path)
    assert report.info == ["RTStructureSet"], report.text
    assert report.errors == [], report.text
    rs = pydicom.dcmread(str(path))
    if variant == "sparse":
        assert all(DICOMDIR_WARNING in w for w in report.warnings), report.text  # empty study date/time/ID
        for key in set(SPARSE) - {"FrameOfReferenceUID"}:
            assert key in rs and rs[key].is_empty, key
        assert rs.FrameOfReferenceUID == rs.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID
        refs = {r.ReferencedFrameOfReferenceUID for r in rs.StructureSetROISequence}
        assert refs == {rs.FrameOfReferenceUID}
    else:
        assert report.warnings == [], report.text
        assert rs.SpecificCharacterSet == "ISO_IR 192"
        assert rs.PatientName == "Müller^Jörg" and rs.StudyDescription == "Kopf/Hals 頭頸部"
