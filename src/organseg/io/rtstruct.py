"""DICOM RTSTRUCT from a label map on a CT series' grid, with rt-utils (one ROI per organ present).

rt-utils builds the RTSTRUCT dataset (references to every CT slice, frame of reference, patient/study
tags) and turns each slice of a binary mask into closed contours (OpenCV). Its masks are indexed
``(rows, cols, slices)`` = organ-seg's ``(y, x, z)``, with slices in its own order (sorted along the slice
normal); we hand it the series headers ourselves rather than a folder path, because
``RTStructBuilder.create_new(path)`` walks sub-folders too and would mix in any other series found there.

Two rt-utils 1.2.7 defects are worked around here, on an in-memory copy of the first slice's header
(which is all it reads them from), so the file written is right for any CT grid:
* it multiplies the row direction by ``PixelSpacing[0]`` (the row spacing, i.e. the y spacing) instead of
  ``PixelSpacing[1]`` (qurit/rt-utils#92): with non-square pixels contours would be stretched;
* it reads ``StudyID``/``StudyDate``/``StudyTime`` unconditionally: anonymised series often lack them.
(Its reader, ``RTStructBuilder.create_from``, has the same spacing defect and also assumes
``Rows == Columns`` (qurit/rt-utils#88): read such files with another tool.)

rt-utils' dataset is also completed so that a DICOM validator (dicom3tools' ``dciodvfy``) finds no error
and its entity checker (``dcentvfy``) finds the RTSTRUCT consistent with the CT, as planning systems expect:
* Patient and Study information entities (Patient, Clinical Trial Subject, General Study, Patient Study,
  Clinical Trial Study modules) are the CT's own attributes, copied from its header, and nothing else
  (rt-utils adds empty PatientAge/Size/Weight and StudyDescription that the CT may not have);
* the Frame of Reference module (``FrameOfReferenceUID``, ``PositionReferenceIndicator``) is the CT's;
  rt-utils only puts the UID inside ``ReferencedFrameOfReferenceSequence``;
* Type 2 attributes the CT lacks (``ReferringPhysicianName``, ``AccessionNumber``, ``StudyID``, ...) and
  the RT Series' ``OperatorsName`` are written empty (Type 2: present, value unknown);
* ``SpecificCharacterSet`` is the CT's where it has one (the copied names are in its encoding); the RT
  series' date and time are when the structure set was made, not the CT series'.

Contours run along the *edges* of an organ's voxels (``edge_contours``), not through the centres of its
boundary voxels (what rt-utils' OpenCV contours do): there, whether a reader counts a boundary voxel was a
tie-break, and on a grid with direction (-1, -1, 1) (common for head-and-neck CT) dcmrtstruct2nii read
masks back smaller than written and dicompyler-core's polygon volumes were 12-64 % too small. Along the
edges, each slice's polygon area (holes subtracted) is exactly its voxel area in every orientation and
pixel aspect, and every voxel centre lies strictly inside or outside. rt-utils still builds each ROI's
entries (names, numbers, observations); its ContourSequence is replaced by these polygons.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.tag import BaseTag

from organseg.io.atomic import atomic_open
from organseg.io.geometry import image_to_xyz


def rt_utils_slice_order(headers: Sequence) -> list[int]:
    """Indices of ``headers`` in rt-utils' slice order (ascending position along the slice normal)."""
    from rt_utils.image_helper import get_slice_position  # noqa: PLC0415 - lazy: OpenCV/libGL (build_rtstruct)

    return sorted(range(len(headers)), key=lambda i: float(get_slice_position(headers[i])))


def slice_indices(label: sitk.Image, headers: Sequence) -> list[int]:
    """The z index of ``label`` that each header's slice is (from ImagePositionPatient), checking that the
    series and the label map share one grid."""
    out = []
    for ds in headers:
        ipp = [float(v) for v in ds.ImagePositionPatient]
        idx = np.asarray(label.TransformPhysicalPointToContinuousIndex(ipp))
        k = int(round(idx[2]))
        if np.any(np.abs(idx - [0.0, 0.0, k]) > 0.05) or not 0 <= k < label.GetSize()[2]:
            raise ValueError(
                f"{getattr(ds, 'filename', '?')}: slice position {ipp} is not on the label map's "
                f"grid (continuous index {np.round(idx, 3).tolist()})"
            )
        out.append(k)
    return out


#: Study-level attributes (General Study, Patient Study and Clinical Trial Study modules) outside groups
#: 0x0010/0x0012, copied from the CT where it has them.
STUDY_KEYWORDS = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence",
    "ConsultingPhysicianName",
    "ConsultingPhysicianIdentificationSequence",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
    "PhysiciansOfRecord",
    "PhysiciansOfRecordIdentificationSequence",
    "NameOfPhysiciansReadingStudy",
    "PhysiciansReadingStudyIdentificationSequence",
    "RequestingServiceCodeSequence",
    "ReferencedStudySequence",
    "ProcedureCodeSequence",
    "ReasonForPerformedProcedureCodeSequence",
    "AdmittingDiagnosesDescription",
    "AdmittingDiagnosesCodeSequence",
    "AdmissionID",
    "IssuerOfAdmissionIDSequence",
    "ServiceEpisodeID",
    "IssuerOfServiceEpisodeIDSequence",
    "ServiceEpisodeDescription",
    "ReasonForVisit",
    "ReasonForVisitCodeSequence",
)
#: Clinical-trial attributes in group 0x0012 that belong to the series (Clinical Trial Series module), not
#: to the patient or study: not copied (the RTSTRUCT is a series of its own).
CLINICAL_TRIAL_SERIES_KEYWORDS = (
    "ClinicalTrialCoordinatingCenterName",
    "ClinicalTrialSeriesID",
    "ClinicalTrialSeriesDescription",
    "IssuerOfClinicalTrialSeriesID",
)
#: Type 2 attributes of the RT Structure Set IOD's Patient, General Study, RT Series and Frame of Reference
#: modules: present even when unknown (empty), where the CT has none.
TYPE2_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "OperatorsName",
    "PositionReferenceIndicator",
)


def _is_patient_or_study(tag: BaseTag, keyword: str) -> bool:
    """Whether an attribute belongs to the Patient or Study information entity (see module doc)."""
    if tag.is_private or tag.element == 0:  # group lengths are the writer's business
        return False
    if tag.group == 0x0010:  # Patient and Patient Study modules
        return True
    if tag.group == 0x0012:  # Clinical Trial Subject / Study modules, and the de-identification flags
        return keyword not in CLINICAL_TRIAL_SERIES_KEYWORDS
    return keyword in STUDY_KEYWORDS


def _complete_from_ct(ds, ct) -> None:
    """Make ``ds`` (rt-utils' RTSTRUCT dataset) carry the CT's patient, study and frame-of-reference
    attributes and every Type 2 attribute (see module doc); ``ct`` is one header of the series."""
    for elem in list(ds):  # rt-utils' copies (some invented): replaced by exactly the CT's
        if _is_patient_or_study(elem.tag, elem.keyword):
            del ds[elem.tag]
    if "SpecificCharacterSet" in ct:
        ds.SpecificCharacterSet = ct.SpecificCharacterSet
    for elem in ct:
        if _is_patient_or_study(elem.tag, elem.keyword):
            ds[elem.tag] = copy.deepcopy(elem)
    # rt-utils took the UID from the CT (or made one up where the CT has none): the ROIs reference it
    ds.FrameOfReferenceUID = ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID
    ds.PositionReferenceIndicator = ct.get("PositionReferenceIndicator", "")
    ds.SeriesDate, ds.SeriesTime = ds.StructureSetDate, ds.StructureSetTime
    for keyword in TYPE2_KEYWORDS:
        if keyword not in ds:
            setattr(ds, keyword, "")


def _rt_utils_view(headers: list) -> list:
    """The series as rt-utils should see it: the first header replaced by a patched copy (see module doc)."""
    first = copy.deepcopy(headers[0])
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    first.PixelSpacing = [col_spacing, row_spacing]  # rt-utils#92: it reads them in (x, y) order
    for key, default in (("StudyID", ""), ("StudyDate", ""), ("StudyTime", "")):
        if key not in first:
            setattr(first, key, default)
    return [first, *headers[1:]]


def build_rtstruct(
    label: sitk.Image,
    classes: Sequence[str],
    headers: Sequence,
    *,
    description: str = "organseg prediction",
    extra: Sequence[tuple[str, np.ndarray | None]] = (),
):
    """An rt-utils ``RTStruct`` with one ROI (contours) per class present in ``label``.

    ``label`` is a class-index map on exactly the series' grid (as read by
    :func:`organseg.io.dicom.read_dicom_series`), ``headers`` the series' pydicom datasets in any order,
    ``classes`` the class names (index 0, background, gets no ROI). ``extra`` adds ROIs after those:
    ``(name, boolean (x, y, z) mask on the label's grid)``, which may overlap the classes (a PRV, a PTV);
    an empty mask (or None) gives an ROI without contour data, as planning systems export one."""
    # lazy: rt-utils imports OpenCV, which needs libGL; only RTSTRUCT output should need it
    from rt_utils import RTStruct, ds_helper  # noqa: PLC0415

    headers = list(headers)
    if len(headers) != label.GetSize()[2]:
        raise ValueError(f"the series has {len(headers)} slices but the label map {label.GetSize()[2]}")
    order = rt_utils_slice_order(headers)
    series = _rt_utils_view([headers[i] for i in order])
    z = slice_indices(label, [headers[i] for i in order])
    labels_yxz = image_to_xyz(label).transpose(1, 0, 2)[:, :, z]  # rt-utils: (rows, cols, its slices)
    with _quiet_pydicom():  # rt-utils sets Dataset.is_little_endian/is_implicit_VR, deprecated in pydicom 3
        ds = ds_helper.create_rtstruct_dataset(series)
    _complete_from_ct(ds, headers[0])
    ds.Manufacturer, ds.ManufacturerModelName = "organseg", "organseg predict (rt-utils)"
    ds.InstitutionName = str(getattr(headers[0], "InstitutionName", ""))
    ds.StructureSetLabel = "organseg"
    ds.SeriesDescription = description
    rt = RTStruct(series, ds)
    present = np.flatnonzero(np.bincount(labels_yxz.ravel(), minlength=len(classes)))
    rois = []
    for c in present:
        if c == 0:
            continue
        if c >= len(classes):
            raise ValueError(f"label value {c} has no class name ({len(classes)} classes)")
        rois.append((str(classes[c]), labels_yxz == c, f"organseg class {c}"))
    for name, mask_xyz in extra:
        mask = np.zeros(labels_yxz.shape, bool) if mask_xyz is None else np.asarray(mask_xyz, bool)
        if mask_xyz is not None:
            mask = mask.transpose(1, 0, 2)[:, :, z]
        rois.append((str(name), mask, ""))
    for name, mask, roi_description in rois:
        seed = np.zeros_like(mask)  # rt-utils builds the ROI's entries; its contours are replaced below
        seed[tuple(np.argwhere(mask)[0]) if mask.any() else (0, 0, 0)] = True
        rt.add_roi(mask=seed, name=name, description=roi_description, roi_generation_algorithm="AUTOMATIC")
        if mask.any():
            rt.ds.ROIContourSequence[-1].ContourSequence = _edge_contour_sequence(mask, series, z, label)
        else:  # ContourSequence is Type 3: an ROI without contours simply has none
            del rt.ds.ROIContourSequence[-1].ContourSequence
    return rt


# ---------------------------------------------------------------------------------- voxel-edge contours
# a pixel's four sides as (start corner, end corner) offsets (row, col), one orientation around the pixel;
# a side is a boundary edge where the neighbour across it (the offset) is outside the mask
_SIDES = (
    ((0, 1), (0, 0), (-1, 0)),  # top: (r, c+1) -> (r, c)
    ((0, 0), (1, 0), (0, -1)),  # left: (r, c) -> (r+1, c)
    ((1, 0), (1, 1), (1, 0)),  # bottom: (r+1, c) -> (r+1, c+1)
    ((1, 1), (0, 1), (0, 1)),  # right: (r+1, c+1) -> (r, c+1)
)


def edge_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed polygons along the pixel *edges* of a 2-D boolean mask ``(rows, cols)``: each an ``(n, 2)``
    array of corner coordinates ``(row, col)`` (pixel ``(r, c)`` spans corners ``r..r+1``, ``c..c+1``),
    collinear corners dropped. Outer boundaries and holes run in opposite senses, so the signed areas sum
    to the pixel count: a polygon-area volume equals the voxel volume, and every pixel centre lies strictly
    inside or outside (no reader has a tie to break). Pixels that touch only at a corner get separate
    polygons (4-connectivity)."""
    mask = np.asarray(mask, dtype=bool)
    padded = np.pad(mask, 1)
    starts, ends, owners = [], [], []
    rows, cols = np.nonzero(mask)
    for (sr, sc), (er, ec), (nr, nc) in _SIDES:
        open_side = ~padded[rows + 1 + nr, cols + 1 + nc]
        r, c = rows[open_side], cols[open_side]
        starts.append(np.stack([r + sr, c + sc], 1))
        ends.append(np.stack([r + er, c + ec], 1))
        owners.append(r * mask.shape[1] + c)
    if not rows.size:
        return []
    start, end, owner = np.concatenate(starts), np.concatenate(ends), np.concatenate(owners)
    width = mask.shape[1] + 1
    start_key, end_key = start[:, 0] * width + start[:, 1], end[:, 0] * width + end[:, 1]
    order = np.argsort(start_key, kind="stable")
    lo = np.searchsorted(start_key[order], end_key, "left")
    hi = np.searchsorted(start_key[order], end_key, "right")
    nxt = order[lo]  # the one edge leaving the corner where this one ends ...
    two = np.flatnonzero(hi - lo == 2)  # ... or, where two pixels touch at a corner, the same pixel's
    alt = order[lo[two] + 1]
    nxt[two] = np.where(owner[alt] == owner[two], alt, nxt[two])
    seen = np.zeros(len(start), dtype=bool)
    polygons = []
    for first in range(len(start)):
        if seen[first]:
            continue
        loop, e = [], first
        while not seen[e]:
            seen[e] = True
            loop.append(e)
            e = nxt[e]
        direction = end[loop] - start[loop]
        turn = np.any(direction != np.roll(direction, 1, axis=0), axis=1)
        polygons.append(start[loop][turn].astype(float))
    return polygons


def polygon_area(points: np.ndarray) -> float:
    """Signed shoelace area of a closed polygon ``(n, 2)``."""
    a, b = points[:, 0], points[:, 1]
    return 0.5 * float(np.dot(a, np.roll(b, -1)) - np.dot(np.roll(a, -1), b))


def _edge_contour_sequence(mask_yxz: np.ndarray, series: Sequence, z: Sequence[int], label: sitk.Image):
    """The ContourSequence of one ROI: voxel-edge polygons (``edge_contours``) of every slice, in patient
    coordinates, each referencing its CT slice (``series`` in rt-utils' order, ``z`` their label indices)."""
    from pydicom.dataset import Dataset  # noqa: PLC0415
    from pydicom.sequence import Sequence as DicomSequence  # noqa: PLC0415

    d = np.asarray(label.GetDirection(), dtype=float).reshape(3, 3)
    spacing, origin = np.asarray(label.GetSpacing(), float), np.asarray(label.GetOrigin(), float)
    out = DicomSequence()
    for j, (ds, k) in enumerate(zip(series, z)):
        for poly in edge_contours(mask_yxz[:, :, j]):
            # corner (row, col) = continuous index (x = col - 0.5, y = row - 0.5) on slice k
            index = np.stack([poly[:, 1] - 0.5, poly[:, 0] - 0.5, np.full(len(poly), float(k))], 1)
            points = origin + (index * spacing) @ d.T
            image = Dataset()
            image.ReferencedSOPClassUID = ds.SOPClassUID
            image.ReferencedSOPInstanceUID = ds.SOPInstanceUID
            contour = Dataset()
            contour.ContourImageSequence = DicomSequence([image])
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(points)
            contour.ContourData = [f"{v:.4f}" for v in points.ravel()]  # DS: at most 16 characters
            out.append(contour)
    return out


def write_rtstruct(
    label: sitk.Image,
    classes: Sequence[str],
    headers: Sequence,
    path: str | os.PathLike,
    *,
    description: str = "organseg prediction",
    extra: Sequence[tuple[str, np.ndarray | None]] = (),
) -> list[str]:
    """Write the RTSTRUCT of ``label`` (and ``extra`` ROIs, see :func:`build_rtstruct`) to ``path``
    atomically; returns the ROI names written."""

    rt = build_rtstruct(label, classes, headers, description=description, extra=extra)
    with _quiet_pydicom(), atomic_open(Path(path), "wb") as f:
        rt.ds.save_as(f, implicit_vr=True, little_endian=True, enforce_file_format=True)
    return rt.get_roi_names()


@contextlib.contextmanager
def _quiet_pydicom():
    """Silence pydicom 3's deprecation notices about the attributes rt-utils 1.2.7 sets (it both warns
    and logs them); anything else still gets through."""

    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*(is_little_endian|is_implicit_VR).*")
            yield
    finally:
        logger.setLevel(level)
