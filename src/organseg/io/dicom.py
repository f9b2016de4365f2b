"""DICOM CT series: find and read one series in a folder (SimpleITK/GDCM), write a volume as a CT series
(pydicom), and read the series' headers for the RTSTRUCT writer.

Geometry mapping (DICOM Image Plane module <-> SimpleITK, LPS in both): a slice's pixel ``[row, col]`` is
voxel ``(x=col, y=row)``; ``ImageOrientationPatient`` = the first two columns of the direction matrix
(the x then y index axes); ``PixelSpacing`` = ``[row spacing, column spacing]`` = ``[sy, sx]``;
``ImagePositionPatient`` of slice ``k`` = the physical position of voxel ``(0, 0, k)``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from organseg.errors import OrgansegError, OutputError
from organseg.io.atomic import make_dirs
from organseg.io.geometry import image_to_xyz

#: CT Image Storage
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
#: stored value = HU - RESCALE_INTERCEPT (the usual CT convention: air is stored near 0)
RESCALE_INTERCEPT = -1024.0


class DicomError(OrgansegError, ValueError):
    """A folder is not exactly one readable DICOM series (one-line message naming the folder)."""


def series_ids(folder: str | os.PathLike) -> list[str]:
    """SeriesInstanceUIDs of the DICOM series directly in ``folder`` (GDCM's scan, no recursion)."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # "No Series were found" is an answer, not a warning
    try:
        return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def series_files(folder: str | os.PathLike) -> list[Path]:
    """The files of the one DICOM series in ``folder``, sorted along the slice normal (GDCM's order).

    Raises :class:`DicomError` when the folder has no series or more than one (a folder per series is
    the only unambiguous input; the message names the series UIDs found)."""
    folder = Path(folder)
    ids = series_ids(folder)
    if not ids:
        raise DicomError(f"{folder}: no readable DICOM series (and no NIfTI/NRRD/MHA images) in this folder")
    if len(ids) > 1:
        raise DicomError(
            f"{folder}: {len(ids)} DICOM series in one folder ({', '.join(ids)}); "
            f"put each series in its own folder"
        )
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0])
    return [Path(f) for f in files]


def read_series_volume(files: Sequence[str | os.PathLike]) -> sitk.Image:
    """SimpleITK's volume of the slice files, in order; a DicomError holding the first error line of
    ITK's multi-line message (at most 200 characters) when it cannot be read, for the caller to name."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    try:
        return reader.Execute()
    except RuntimeError as exc:
        line = next((ln.strip() for ln in str(exc).splitlines() if "rror" in ln), str(exc).strip())
        raise DicomError(line[:200]) from None


def read_dicom_series(folder: str | os.PathLike) -> tuple[sitk.Image, list[Path]]:
    """``(image in HU as float32, its files in slice order)`` of the one CT series in ``folder``.

    Rescale slope/intercept are applied by GDCM; the image carries the series' full geometry. A non-CT
    modality or a series whose slices do not form a 3D grid is a :class:`DicomError`."""

    folder = Path(folder)
    files = series_files(folder)
    try:
        first = pydicom.dcmread(str(files[0]), stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable header is the same user error
        raise DicomError(f"{files[0]}: unreadable DICOM header ({type(exc).__name__})") from None
    modality = str(getattr(first, "Modality", "CT") or "CT")
    if modality != "CT":
        raise DicomError(f"{folder}: series modality is {modality}; organseg predicts on CT")
    if len(files) < 2:
        raise DicomError(f"{folder}: the series has a single slice; expected a 3D CT volume")
    try:
        image = read_series_volume(files)
    except DicomError as exc:
        raise DicomError(f"{folder}: the DICOM series cannot be read as a volume ({exc})") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise DicomError(f"{folder}: the DICOM series is not a scalar 3D volume")
    return sitk.Cast(image, sitk.sitkFloat32), files


def read_headers(files: Sequence[str | os.PathLike]) -> list:
    """pydicom datasets of ``files`` without pixel data (what the RTSTRUCT writer references)."""

    return [pydicom.dcmread(str(f), stop_before_pixels=True) for f in files]


def write_dicom_series(
    image: sitk.Image,
    folder: str | os.PathLike,
    *,
    patient_id: str = "ORGANSEG-PHANTOM",
    patient_name: str = "Phantom^Organseg",
    series_description: str = "organseg phantom CT",
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    body_part: str | None = None,
    patient_position: str = "HFS",
) -> list[Path]:
    """Write a 3D HU image as a CT Image Storage series, one file per z slice (``CT_0001.dcm``, ...).

    Proper CT tags: modality CT, one SeriesInstanceUID / StudyInstanceUID / FrameOfReferenceUID,
    ImagePositionPatient / ImageOrientationPatient / PixelSpacing from the image's geometry (any
    direction cosines), HU stored as ``HU - RESCALE_INTERCEPT`` with RescaleSlope 1. The folder is filled
    atomically (written beside it, then renamed); it must not exist yet. Returns the files in z order.

    Every Type 1/2 attribute of the CT Image IOD is written, so dicom3tools' ``dciodvfy`` finds no error:
    Type 2 ones with no meaning for a synthetic image (``KVP``, ``AccessionNumber``, ...) empty.
    ``body_part`` (a DICOM BodyPartExamined term, e.g. ``HEADNECK``, ``ABDOMEN``) says what is imaged;
    without it ``Laterality`` is written empty (unknown), which ``dciodvfy`` reports as a warning.
    ``patient_position`` is the General Series' ``PatientPosition`` (the image's geometry cannot tell it).
    """

    folder = Path(folder)
    if folder.exists():
        raise OutputError(f"{folder}: already exists; not overwriting a DICOM folder")
    if image.GetDimension() != 3:
        raise ValueError(f"expected a 3D image, got {image.GetDimension()}D")
    hu = image_to_xyz(image).astype(np.float64)
    stored = np.clip(np.rint(hu - RESCALE_INTERCEPT), -32768, 32767).astype(np.int16)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    sx, sy, sz = (float(v) for v in image.GetSpacing())
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = frame_of_reference_uid or generate_uid()
    iop = [f"{v:.10g}" for v in (*direction[:, 0], *direction[:, 1])]
    date, time = "20260101", "120000"

    make_dirs(folder.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    except OSError as exc:  # e.g. no write permission: the user's to fix, one line
        raise OutputError.from_os_error(exc) from exc
    try:
        names = []
        for k in range(stored.shape[2]):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
            meta.MediaStorageSOPInstanceUID = generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            name = f"CT_{k + 1:04d}.dcm"
            ds = FileDataset(name, {}, file_meta=meta, preamble=b"\0" * 128)
            ds.SOPClassUID = CT_IMAGE_STORAGE
            ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
            ds.Modality = "CT"
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.PatientName, ds.PatientID = patient_name, patient_id
            ds.PatientBirthDate, ds.PatientSex = "", "O"
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
            ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
            ds.StudyTime = ds.SeriesTime = ds.ContentTime = time
            ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
            ds.SeriesNumber, ds.InstanceNumber, ds.AcquisitionNumber = 1, k + 1, 1
            ds.PatientPosition, ds.KVP = patient_position, ""
            if body_part:  # then Laterality (Type 2C) is needed only for a paired part: left to the caller
                ds.BodyPartExamined = body_part
            else:
                ds.Laterality = ""  # Type 2C, required while the body part may be a paired one: unknown
            ds.SeriesDescription, ds.Manufacturer = series_description, "organseg"
            ds.ImagePositionPatient = [f"{v:.10g}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))]
            ds.ImageOrientationPatient = iop
            ds.PixelSpacing = [f"{sy:.10g}", f"{sx:.10g}"]  # [row spacing, column spacing]
            ds.SliceThickness = f"{sz:.10g}"
            ds.SpacingBetweenSlices = f"{sz:.10g}"
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.Rows, ds.Columns = int(stored.shape[1]), int(stored.shape[0])
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = f"{RESCALE_INTERCEPT:g}", "1", "HU"
            ds.WindowCenter, ds.WindowWidth = "40", "400"
            ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # [row, col] = (y, x)
            pydicom.dcmwrite(str(tmp / name), ds, enforce_file_format=True)
            names.append(name)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [folder / n for n in names]
