"""``layout: dicom_rt``: a folder of patients exported from a planning system, each one CT series plus
RTSTRUCT file(s), read into a class-index label map on the CT's own grid.

``<root>/<patient>/**``: any files, in any sub-folders (non-DICOM files and other modalities such as RTPLAN
or RTDOSE are passed over). An RTSTRUCT belongs to the CT series it references
(``ReferencedFrameOfReferenceSequence > RTReferencedStudySequence > RTReferencedSeriesSequence``), or,
when it names no series, to the one CT series with its ``FrameOfReferenceUID``; folder position is never
used. Every RTSTRUCT of a patient must reference the same CT series.

Structure names go to the card's classes through :class:`organseg.io.tg263.StructureNames` (TG-263 names
and the synonym table; PRV/PTV/helpers/external never become organs). Contours are rasterised onto the CT
grid here: each ``CLOSED_PLANAR`` contour is mapped into the CT's continuous voxel index with the series'
geometry and filled at the voxel centres (matplotlib's ``Path.contains_points``), and the contours of one
slice are combined by exclusive or, so inner contours (holes) are cut out and islands inside holes come back.
We do not use rt-utils' reader (``RTStructBuilder.create_from``) for this: it scales rows by the wrong
pixel spacing (qurit/rt-utils#92), assumes ``Rows == Columns`` (#88), rounds polygon vertices to whole pixels
(a half-voxel shift for contours along voxel edges, as organseg writes them) and finds a slice's
contours only through ``ContourImageSequence`` UIDs, which some exports omit; the geometry here is the
CT's own, the same SimpleITK image the cache resamples.

What goes wrong in real exports is a :class:`CaseError` naming the patient and the file (``--skip-bad``
skips the patient and records why): no CT / no RTSTRUCT, an RTSTRUCT whose referenced series is missing,
RTSTRUCTs of different CT series, a CT with a missing slice or uneven slice spacing (from
``ImagePositionPatient``; never interpolated), a non-axial or gantry-tilted CT, a structure mapped to a class
with no contour data, two structures of one RTSTRUCT mapped to one class, a contour off the CT's slices.
Two RTSTRUCTs contouring one organ differently follow the card's ``rtstruct_conflict`` (``newest``, by
StructureSetDate/Time, reported; or ``error``). A voxel in two organs goes to the smaller organ (counted).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from matplotlib.path import Path as PolygonPath
from pydicom.errors import InvalidDicomError

from organseg.io.card import DatasetCard
from organseg.io.dicom import DicomError, read_series_volume
from organseg.io.geometry import Geometry, xyz_to_image
from organseg.io.layouts import CaseError, CaseFiles
from organseg.io.tg263 import NameMatch, StructureNames

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
CONFLICT_POLICIES = ("newest", "error")
#: |slice normal . z| below this is a non-axial series (cos 2.6 degrees)
AXIAL_COS = 0.999
#: slice spacings may differ by this fraction of the median (and at least 0.01 mm) before they are uneven
SPACING_RTOL = 0.01
#: a contour's points may lie this far (in slices) off a CT slice's plane
PLANE_TOL = 0.1


# ---------------------------------------------------------------------------------- listing
def list_patients(root: Path) -> list[CaseFiles]:
    """One case per patient folder (sorted), with every visible file below it (for the fingerprint)."""
    cases = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(
            p
            for p in d.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(d).parts)
        )
        if files:
            cases.append(CaseFiles(d.name, d, None, dicom=files))
    return cases


# ---------------------------------------------------------------------------------- scanning
@dataclass
class RtStruct:
    path: Path
    ds: pydicom.Dataset

    @property
    def stamp(self) -> tuple[str, str]:
        """(date, time) the structure set was made (StructureSetDate/Time, else the instance's or series')."""
        for d, t in (
            ("StructureSetDate", "StructureSetTime"),
            ("InstanceCreationDate", "InstanceCreationTime"),
            ("SeriesDate", "SeriesTime"),
        ):
            if str(self.ds.get(d, "") or ""):
                return str(self.ds.get(d)), str(self.ds.get(t, "") or "")
        return "", ""

    def referenced_series(self) -> set[str]:
        out = set()
        for fr in self.ds.get("ReferencedFrameOfReferenceSequence", []) or []:
            for st in fr.get("RTReferencedStudySequence", []) or []:
                for se in st.get("RTReferencedSeriesSequence", []) or []:
                    if se.get("SeriesInstanceUID"):
                        out.add(str(se.SeriesInstanceUID))
        return out

    def frame_of_reference(self) -> str:
        uid = str(self.ds.get("FrameOfReferenceUID", "") or "")
        if not uid:
            for fr in self.ds.get("ReferencedFrameOfReferenceSequence", []) or []:
                uid = uid or str(fr.get("FrameOfReferenceUID", "") or "")
        return uid

    def rois(self) -> list[tuple[str, str, list]]:
        """``(name, RT ROI interpreted type, contour datasets)`` per structure."""
        contours = {
            int(rc.ReferencedROINumber): list(rc.get("ContourSequence", []) or [])
            for rc in self.ds.get("ROIContourSequence", []) or []
        }
        kinds = {
            int(ob.ReferencedROINumber): str(ob.get("RTROIInterpretedType", "") or "")
            for ob in self.ds.get("RTROIObservationsSequence", []) or []
        }
        return [
            (
                str(roi.get("ROIName", "") or ""),
                kinds.get(int(roi.ROINumber), ""),
                contours.get(int(roi.ROINumber), []),
            )
            for roi in self.ds.get("StructureSetROISequence", []) or []
        ]


@dataclass
class PatientFiles:
    ct: dict[str, list[tuple[Path, pydicom.Dataset]]] = field(default_factory=dict)  # series uid -> slices
    rtstructs: list[RtStruct] = field(default_factory=list)


def _read_header(cid: str, path: Path, full: bool = False) -> pydicom.Dataset | None:
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=not full)
    except InvalidDicomError:
        return None  # not DICOM (a README, a checksum file): not the export's
    except Exception as exc:  # noqa: BLE001 - a broken DICOM file is the user's to fix, in one line
        raise CaseError(
            f"{cid}: unreadable DICOM file ({type(exc).__name__}: {str(exc)[:120]}) ({path})", cid
        ) from None


def scan_patient(case: CaseFiles) -> PatientFiles:
    """The CT series and RTSTRUCTs among a patient's files (headers only for CT)."""
    out = PatientFiles()
    for path in case.dicom:
        ds = _read_header(case.case_id, path)
        if ds is None:
            continue
        sop, modality = str(ds.get("SOPClassUID", "")), str(ds.get("Modality", ""))
        if sop == RTSTRUCT_STORAGE or modality == "RTSTRUCT":
            out.rtstructs.append(RtStruct(path, ds))
        elif sop == CT_IMAGE_STORAGE or modality == "CT":
            out.ct.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((path, ds))
    return out


def match_series(cid: str, files: PatientFiles, folder: Path) -> str:
    """The SeriesInstanceUID of the one CT series every RTSTRUCT references."""
    if not files.rtstructs:
        raise CaseError(f"{cid}: no RTSTRUCT file in the patient folder ({folder})", cid)
    if not files.ct:
        raise CaseError(f"{cid}: no CT series in the patient folder ({folder})", cid)
    chosen: dict[str, Path] = {}
    for rs in files.rtstructs:
        refs = rs.referenced_series()
        if refs:
            found = sorted(refs & set(files.ct))
            if not found:
                raise CaseError(
                    f"{cid}: the RTSTRUCT references CT series {sorted(refs)[0]}, which is not in the "
                    f"patient folder ({rs.path})",
                    cid,
                )
            uid = found[0]
        else:
            frame = rs.frame_of_reference()
            same = sorted(
                u for u, sl in files.ct.items() if str(sl[0][1].get("FrameOfReferenceUID", "")) == frame
            )
            if not same:
                raise CaseError(
                    f"{cid}: the RTSTRUCT names no CT series and no CT series has its frame of reference "
                    f"{frame or '(none)'} ({rs.path})",
                    cid,
                )
            if len(same) > 1:
                raise CaseError(
                    f"{cid}: the RTSTRUCT names no CT series and {len(same)} CT series share its frame of "
                    f"reference ({rs.path})",
                    cid,
                )
            uid = same[0]
        ct_frame = str(files.ct[uid][0][1].get("FrameOfReferenceUID", ""))
        if rs.frame_of_reference() and ct_frame and rs.frame_of_reference() != ct_frame:
            raise CaseError(
                f"{cid}: the RTSTRUCT's frame of reference differs from its CT series' ({rs.path})", cid
            )
        chosen[uid] = rs.path
    if len(chosen) > 1:
        shown = ", ".join(p.name for p in chosen.values())
        raise CaseError(
            f"{cid}: the RTSTRUCTs reference {len(chosen)} different CT series ({shown}); a case is one CT "
            f"({folder})",
            cid,
        )
    return next(iter(chosen))


# ---------------------------------------------------------------------------------- the CT series
def read_ct(cid: str, slices: list[tuple[Path, pydicom.Dataset]]) -> tuple[sitk.Image, list[Path]]:
    """The CT (float32 HU, the series' geometry) after checking it is an evenly spaced axial stack."""
    if len(slices) < 2:
        raise CaseError(f"{cid}: the CT series has a single slice ({slices[0][0]})", cid)
    paths = [p for p, _ in slices]
    try:
        iop = np.asarray([[float(v) for v in ds.ImageOrientationPatient] for _, ds in slices])
        ipp = np.asarray([[float(v) for v in ds.ImagePositionPatient] for _, ds in slices])
    except (AttributeError, ValueError, TypeError):
        raise CaseError(
            f"{cid}: CT slices without ImagePositionPatient/ImageOrientationPatient ({paths[0]})", cid
        ) from None
    if np.any(np.abs(iop - iop[0]) > 1e-4):
        k = int(np.argmax(np.abs(iop - iop[0]).max(axis=1)))
        raise CaseError(f"{cid}: CT slices with different orientations ({paths[k]})", cid)
    row, col = iop[0, :3], iop[0, 3:]
    normal = np.cross(row, col)
    if abs(normal[2]) < AXIAL_COS:
        raise CaseError(
            f"{cid}: not an axial CT series (slice normal {np.round(normal, 3).tolist()}); organseg reads "
            f"axial CT only ({paths[0].parent})",
            cid,
        )
    tilt = max(abs(float(ds.get("GantryDetectorTilt", 0) or 0)) for _, ds in slices)
    order = np.argsort(ipp @ normal, kind="stable")
    ipp, paths = ipp[order], [paths[i] for i in order]
    along = (ipp - ipp[0]) @ normal
    sideways = np.linalg.norm((ipp - ipp[0]) - np.outer(along, normal), axis=1)
    if tilt > 0.01 or sideways.max() > 0.01 + 1e-3 * abs(along[-1]):
        angle = tilt or float(np.degrees(np.arctan2(sideways[-1], abs(along[-1]) or 1.0)))
        raise CaseError(
            f"{cid}: gantry-tilted CT series ({angle:.1f} degrees: slices shifted sideways along the stack); "
            f"resample it to an axial grid first ({paths[0].parent})",
            cid,
        )
    steps = np.diff(along)
    if np.any(steps < 1e-3):
        k = int(np.argmin(steps))
        raise CaseError(
            f"{cid}: two CT slices at one position ({paths[k].name}, {paths[k + 1].name}) "
            f"({paths[0].parent})",
            cid,
        )
    spacing = float(np.median(steps))
    bad = np.flatnonzero(np.abs(steps - spacing) > max(0.01, SPACING_RTOL * spacing))
    if bad.size:
        k = int(bad[0])
        gap = float(steps[k])
        ratio = gap / spacing
        what = (
            f"{int(round(ratio)) - 1} missing slice(s)"
            if ratio > 1.5 and abs(ratio - round(ratio)) < 0.1
            else f"uneven slice spacing ({steps.min():.3g} to {steps.max():.3g} mm)"
        )
        raise CaseError(
            f"{cid}: CT series has {what}: {gap:.3g} mm between {paths[k].name} and {paths[k + 1].name}, "
            f"{spacing:.3g} mm elsewhere; not interpolating ({paths[0].parent})",
            cid,
        )
    try:
        image = read_series_volume(paths)
    except DicomError as exc:
        where = paths[0].parent
        raise CaseError(f"{cid}: the CT series cannot be read as a volume ({exc}) ({where})", cid) from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise CaseError(f"{cid}: the CT series is not a scalar 3D volume ({paths[0].parent})", cid)
    return sitk.Cast(image, sitk.sitkFloat32), paths


# ---------------------------------------------------------------------------------- contours
def rasterise(cid: str, name: str, contours: list, image: sitk.Image, path: Path) -> np.ndarray:
    """A structure's CLOSED_PLANAR contours as a boolean (x, y, z) mask on ``image``'s grid (module doc)."""
    size = np.asarray(image.GetSize())
    d = np.asarray(image.GetDirection(), float).reshape(3, 3)
    to_index = np.linalg.inv(d * np.asarray(image.GetSpacing(), float))  # physical offset -> index
    origin = np.asarray(image.GetOrigin(), float)
    mask = np.zeros(tuple(size), dtype=bool)
    for contour in contours:
        if str(contour.get("ContourGeometricType", "CLOSED_PLANAR")) != "CLOSED_PLANAR":
            continue  # POINT / OPEN_PLANAR / OPEN_NONPLANAR enclose nothing
        points = np.asarray([float(v) for v in contour.get("ContourData", [])], float).reshape(-1, 3)
        if len(points) < 3:
            continue
        index = (points - origin) @ to_index.T
        k = int(round(float(index[:, 2].mean())))
        if np.abs(index[:, 2] - k).max() > PLANE_TOL:
            raise CaseError(
                f"{cid}: a contour of structure {name!r} is not on a CT slice plane (slice index "
                f"{index[:, 2].min():.2f} to {index[:, 2].max():.2f}) ({path})",
                cid,
            )
        if not 0 <= k < size[2]:
            raise CaseError(f"{cid}: structure {name!r} has a contour outside the CT's slices ({path})", cid)
        lo = np.clip(np.floor(index[:, :2].min(axis=0)).astype(int), 0, size[:2] - 1)
        hi = np.clip(np.ceil(index[:, :2].max(axis=0)).astype(int), 0, size[:2] - 1)
        xs, ys = np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1), indexing="ij")
        inside = PolygonPath(index[:, :2]).contains_points(np.stack([xs.ravel(), ys.ravel()], 1))
        mask[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, k] ^= inside.reshape(xs.shape)
    return mask


# ---------------------------------------------------------------------------------- one patient
def structure_rows(
    card: DatasetCard, rtstructs: list[RtStruct]
) -> list[tuple[RtStruct, str, NameMatch, list]]:
    """``(rtstruct, name, match, contours)`` for every structure of the patient's RTSTRUCTs."""
    names = StructureNames(card.classes, card.class_map)
    return [
        (rs, name, names.match(name, kind), contours)
        for rs in rtstructs
        for name, kind, contours in rs.rois()
    ]


def read_dicom_rt_case(card: DatasetCard, case: CaseFiles) -> tuple[sitk.Image, sitk.Image, dict]:
    """``(CT float32 HU, uint8 class-index label map on its grid, report)`` of one patient; the report
    (recorded in the cache) lists each structure's mapping, RTSTRUCT conflicts and organ overlaps."""
    cid, folder = case.case_id, Path(case.image)
    files = scan_patient(case)
    uid = match_series(cid, files, folder)
    image, ct_paths = read_ct(cid, files.ct[uid])
    report: dict = {
        "ct_series": uid,
        "ct_folder": str(ct_paths[0].parent),
        "ct_slices": len(ct_paths),
        "rtstructs": [{"file": str(rs.path), "stamp": " ".join(rs.stamp).strip()} for rs in files.rtstructs],
        "structures": [],
        "conflicts": [],
        "overlaps": {},
    }
    masks: dict[str, list[tuple[RtStruct, np.ndarray]]] = defaultdict(list)
    for rs, name, match, contours in structure_rows(card, files.rtstructs):
        report["structures"].append(
            {
                "file": rs.path.name,
                "name": name,
                "mapping": match.describe(),
                "class": match.cls,
                "contours": len(contours),
            }
        )
        if match.status != "class":
            continue
        if not contours:
            raise CaseError(f"{cid}: structure {name!r} ({match.cls}) has no contour data ({rs.path})", cid)
        if any(other is rs for other, _ in masks[match.cls]):
            raise CaseError(
                f"{cid}: two structures of one RTSTRUCT map to {match.cls} ({name!r} and another); name one "
                f"in the card's class_map ({rs.path})",
                cid,
            )
        masks[match.cls].append((rs, rasterise(cid, name, contours, image, rs.path)))
    chosen = {cls: _resolve_conflict(card, cid, cls, found, report) for cls, found in masks.items()}
    label = _merge(card, chosen, report)
    return image, _label_image(label, image), report


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total


def _resolve_conflict(card: DatasetCard, cid: str, cls: str, found: list, report: dict) -> np.ndarray:
    if len(found) == 1 or all(np.array_equal(found[0][1], m) for _, m in found[1:]):
        return found[0][1]
    files = ", ".join(rs.path.name for rs, _ in found)
    dice = min(_dice(found[0][1], m) for _, m in found[1:])
    policy = getattr(card, "rtstruct_conflict", "newest")
    if policy == "error":
        raise CaseError(
            f"{cid}: {len(found)} RTSTRUCTs contour {cls} differently (Dice {dice:.3f}: {files}); keep one, "
            f"or set rtstruct_conflict: newest in the card ({found[0][0].path.parent})",
            cid,
        )
    ranked = sorted(found, key=lambda f: f[0].stamp, reverse=True)
    if ranked[0][0].stamp == ranked[1][0].stamp:
        raise CaseError(
            f"{cid}: {len(found)} RTSTRUCTs contour {cls} differently (Dice {dice:.3f}: {files}) and none is "
            f"newer by StructureSetDate/Time; keep one ({found[0][0].path.parent})",
            cid,
        )
    newest = ranked[0][0]
    report["conflicts"].append(
        {
            "class": cls,
            "files": [rs.path.name for rs, _ in found],
            "dice": round(dice, 4),
            "chosen": newest.path.name,
            "stamp": " ".join(newest.stamp).strip(),
            "policy": policy,
        }
    )
    return ranked[0][1]


def _merge(card: DatasetCard, masks: dict[str, np.ndarray], report: dict) -> np.ndarray:
    """One uint8 (x, y, z) label map: larger organs first, so where two overlap the smaller one wins."""
    shape = next(iter(masks.values())).shape if masks else None
    if shape is None:
        return None
    label = np.zeros(shape, dtype=np.uint8)
    order = sorted(masks, key=lambda c: (-int(masks[c].sum()), card.index(c)))
    for cls in order:
        mask = masks[cls]
        under = np.bincount(label[mask], minlength=card.num_classes)
        for other in np.flatnonzero(under[1:]) + 1:
            report["overlaps"][f"{cls} over {card.classes[other]}"] = int(under[other])
        label[mask] = card.index(cls)
    return label


def _label_image(label: np.ndarray | None, image: sitk.Image) -> sitk.Image:
    if label is None:
        label = np.zeros(tuple(image.GetSize()), dtype=np.uint8)
    return xyz_to_image(label, Geometry.of(image))


def report_notes(case_id: str, report: dict) -> list[str]:
    """The lines ``organseg preprocess`` prints about a patient: conflicts settled and overlaps counted."""
    notes = []
    for c in report.get("conflicts", []):
        notes.append(
            f"{case_id}: {len(c['files'])} RTSTRUCTs contour {c['class']} differently (Dice {c['dice']}); "
            f"took the newest, {c['chosen']} ({c['stamp']})"
        )
    overlaps = report.get("overlaps", {})
    if overlaps:
        shown = ", ".join(f"{k}: {v}" for k, v in sorted(overlaps.items()))
        notes.append(
            f"{case_id}: {sum(overlaps.values())} voxel(s) in two organs, the smaller organ wins ({shown})"
        )
    return notes


# ---------------------------------------------------------------------------------- the names table
def names_table(card: DatasetCard, cases: list[CaseFiles]) -> str:
    """Every structure name in the folder's RTSTRUCTs -> class / "ignored: reason" / "unmatched", with the
    number of patients it occurs in, then per class the patients that have it (``preprocess --dry-run``)."""
    seen: dict[str, set[str]] = defaultdict(set)
    mapping: dict[str, NameMatch] = {}
    empty: dict[str, set[str]] = defaultdict(set)
    per_class: dict[str, set[str]] = defaultdict(set)
    for case in cases:
        rtstructs = [
            RtStruct(p, ds) for p in case.dicom if (ds := _modality_header(case.case_id, p)) is not None
        ]
        for _rs, name, match, contours in structure_rows(card, rtstructs):
            seen[name].add(case.case_id)
            mapping[name] = match
            if not contours:
                empty[name].add(case.case_id)
            if match.status == "class":
                per_class[match.cls].add(case.case_id)
    rank = {"class": 0, "ignored": 1, "unmatched": 2}
    rows = sorted(seen, key=lambda n: (rank[mapping[n].status], mapping[n].cls or "", n.lower()))
    width = max([len("structure"), *(len(repr(n)) for n in rows)])
    lines = [f"{card.name}: {len(cases)} patient(s), {len(rows)} distinct structure name(s)", ""]
    lines.append(f"{'structure':<{width}}  {'patients':>8}  mapping")
    for n in rows:
        note = f"  [no contour data in {len(empty[n])}]" if empty.get(n) else ""
        lines.append(f"{n!r:<{width}}  {len(seen[n]):>8}  {mapping[n].describe()}{note}")
    counts = {s: sum(1 for n in rows if mapping[n].status == s) for s in rank}
    lines.append("")
    lines.append(
        f"names: {counts['class']} to classes, {counts['ignored']} ignored, {counts['unmatched']} unmatched"
    )
    for cls in card.classes[1:]:
        if cls in card.labeled:
            lines.append(f"  {cls:<20} {len(per_class.get(cls, ())):>4}/{len(cases)} patient(s)")
    return "\n".join(lines)


def _modality_header(cid: str, path: Path) -> pydicom.Dataset | None:
    """The whole dataset of an RTSTRUCT file; None for anything else (other files: SOP class only)."""
    try:
        head = pydicom.dcmread(str(path), specific_tags=["SOPClassUID", "Modality"])
    except InvalidDicomError:
        return None
    except Exception as exc:  # noqa: BLE001
        raise CaseError(f"{cid}: unreadable DICOM file ({type(exc).__name__}) ({path})", cid) from None
    if str(head.get("SOPClassUID", "")) != RTSTRUCT_STORAGE and str(head.get("Modality", "")) != "RTSTRUCT":
        return None
    return _read_header(cid, path, full=True)
