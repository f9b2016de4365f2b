"""Dataset layouts on disk -> cases, and validated reading of one case with SimpleITK.

Layouts (``card.layout``):

* ``nnunet`` / ``msd``: ``<root>/imagesTr/<case>_0000.<ending>`` (nnU-Net) or
  ``<root>/imagesTr/<case>.<ending>`` (Medical Segmentation Decathlon) and
  ``<root>/labelsTr/<case>.<ending>``; ``<ending>`` is ``dataset.json``'s ``file_ending`` when given,
  else any of ``.nii.gz .nii .nrrd .nhdr .mha .mhd``.
* ``pddca``: ``<root>/<case>/img.nrrd`` plus ``<root>/<case>/structures/<Stem>.nrrd`` binary masks
  (values only {0, 1} or only {0, 255}; anything else is a CaseError); ``card.class_map`` maps a file
  stem to a class name. The masks are merged into one label map in class index order (the later class
  index wins where masks overlap; reported once per process).
* ``dicom_rt``: ``<root>/<patient>/**`` holding one CT series and RTSTRUCT file(s) from a planning system,
  structure names mapped to classes through TG-263 (see :mod:`organseg.io.dicom_rt`, ``io/tg263.py``).

Every problem with a case is a :class:`CaseError` whose message is one line, ``"<case>: <problem> (<file>)"``.
"""

from __future__ import annotations

import json
import os
import re
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from organseg.errors import OrgansegError
from organseg.io.card import DatasetCard
from organseg.io.geometry import Geometry, image_to_xyz

IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


class CaseError(OrgansegError, ValueError):
    """A case (or the dataset folder) cannot be used; the message is one line naming it and the problem."""

    def __init__(self, message: str, case_id: str | None = None):
        super().__init__(" ".join(str(message).split("\n")))
        self.case_id = case_id


class OverlapWarning(UserWarning):
    """PDDCA structure masks overlap; the later class index wins (reported once per dataset and process)."""


@dataclass
class CaseFiles:
    """The files of one case. ``image``/``label`` are None when missing (reported by ``read_case``)."""

    case_id: str
    image: Path | None
    label: Path | None = None
    structures: dict[str, Path] = field(default_factory=dict)  # pddca: file stem -> mask file
    dicom: list[Path] = field(default_factory=list)  # dicom_rt: every file of the patient (image: its folder)

    @property
    def files(self) -> list[Path]:
        """Every input file of the case (for fingerprints)."""
        out = [p for p in (self.image, self.label) if p is not None]
        return out + [self.structures[k] for k in sorted(self.structures)] + list(self.dicom)


# ---------------------------------------------------------------------------------- listing
def _split_ending(name: str, endings: tuple[str, ...]) -> tuple[str, str] | None:
    low = name.lower()
    for e in sorted(endings, key=len, reverse=True):
        if low.endswith(e):
            return name[: -len(e)], name[-len(e) :]
    return None


def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file())


def dataset_root(card: DatasetCard) -> Path:
    root = Path(card.path).expanduser()
    where = card.source or card.name
    if not root.exists():
        raise CaseError(f"{root}: dataset folder not found (path in {where})")
    if not root.is_dir():
        raise CaseError(f"{root}: dataset path is not a folder (path in {where})")
    return root


def list_cases(card: DatasetCard) -> list[CaseFiles]:
    """The cases of ``card``'s dataset, sorted by case id. Raises CaseError if the folder is missing/empty."""
    root = dataset_root(card)
    if card.layout in ("nnunet", "msd"):
        cases = _list_nnunet(root)
    elif card.layout == "pddca":
        cases = _list_pddca(root, card)
    elif card.layout == "dicom_rt":
        from organseg.io.dicom_rt import list_patients  # noqa: PLC0415 - pydicom/matplotlib for dicom_rt only

        cases = list_patients(root)
    else:  # pragma: no cover - the card validates the layout
        raise CaseError(f"{card.source or card.name}: unknown layout {card.layout!r}")
    if not cases:
        raise CaseError(f"{root}: no cases found for layout {card.layout!r}")
    return cases


def _file_ending(root: Path) -> tuple[str, ...]:
    meta = root / "dataset.json"
    if meta.is_file():
        try:
            ending = json.loads(meta.read_text()).get("file_ending")
        except (ValueError, UnicodeDecodeError) as exc:
            raise CaseError(f"{meta}: not valid JSON ({exc})") from None
        if ending:
            ending = str(ending) if str(ending).startswith(".") else "." + str(ending)
            return (ending.lower(),)
    return IMAGE_ENDINGS


def _list_nnunet(root: Path) -> list[CaseFiles]:
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir():
        raise CaseError(f"{root}: no imagesTr folder (expected an nnU-Net/MSD layout)")
    endings = _file_ending(root)
    images: dict[str, Path] = {}
    extra_channels: list[str] = []
    for p in _visible_files(images_dir):
        split = _split_ending(p.name, endings)
        if split is None:
            continue
        stem = split[0]
        m = _CHANNEL.match(stem)
        if m:  # nnU-Net: <case>_0000
            if m["channel"] != "0000":
                extra_channels.append(p.name)
                continue
            images[m["case"]] = p
        else:  # MSD: <case>.nii.gz (an nnU-Net _0000 file takes precedence)
            images.setdefault(stem, p)
    if extra_channels:
        warnings.warn(
            f"{images_dir}: only channel _0000 (CT) is used; ignoring {len(extra_channels)} other "
            f"channel file(s) such as {extra_channels[0]}",
            stacklevel=3,
        )
    labels: dict[str, Path] = {}
    if labels_dir.is_dir():
        for p in _visible_files(labels_dir):
            split = _split_ending(p.name, endings)
            if split is not None:
                labels[split[0]] = p
    cases = []
    for case_id in sorted(set(images) | set(labels)):
        cases.append(CaseFiles(case_id, images.get(case_id), labels.get(case_id)))
    return cases


def _list_pddca(root: Path, card: DatasetCard) -> list[CaseFiles]:
    bad = {stem: c for stem, c in card.class_map.items() if c not in card.classes[1:]}
    if bad:
        raise CaseError(f"{card.source or card.name}: class_map maps to unknown class(es) {bad}")
    lower = {stem.lower(): stem for stem in card.class_map}
    cases = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        image = d / "img.nrrd"
        structures: dict[str, Path] = {}
        sdir = d / "structures"
        if sdir.is_dir():
            for p in _visible_files(sdir):
                split = _split_ending(p.name, (".nrrd", ".nhdr", ".nii.gz", ".nii", ".mha"))
                if split is None:
                    continue
                stem = split[0] if split[0] in card.class_map else lower.get(split[0].lower())
                if stem is not None:
                    structures[stem] = p
        if not image.is_file() and not structures and not sdir.is_dir():
            continue  # not a case folder
        cases.append(CaseFiles(d.name, image if image.is_file() else None, None, structures))
    return cases


# ---------------------------------------------------------------------------------- reading
def _first_line(exc: BaseException) -> str:
    """The informative line of a (multi-line) ITK exception."""
    lines = [re.sub(r"\(0x[0-9a-fA-F]+\)", "", ln.strip()) for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("ITK ERROR") or ("rror" in ln and "Exception thrown" not in ln):
            return ln[:300]
    return (lines[-1] if lines else type(exc).__name__)[:300]


def _check_nifti(path: Path) -> str | None:
    """ITK's NIfTI reader silently zero-fills truncated files and turns NaN/inf into 0: check with nibabel.

    Returns a problem description, or None. Integer files cost O(1) (the gzip trailer's size field is
    compared with the header); float files are decoded once more to look for non-finite voxels."""

    problem = _check_nifti_complete(path)
    if problem:
        return problem
    try:
        nii = nib.load(str(path))
        if nii.header.get_data_dtype().kind != "f":
            return None
        data = np.asarray(nii.dataobj)
    except Exception as exc:  # noqa: BLE001
        return f"cannot decode the NIfTI data ({type(exc).__name__}: {' '.join(str(exc).split())[:150]})"
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    return f"{bad} non-finite voxel(s) (NaN/inf)" if bad else None


def _gzip_length(path: Path) -> tuple[int, str | None]:
    """(decompressed length, problem): streams through a (possibly multi-member) gzip file."""
    total, d = 0, zlib.decompressobj(wbits=31)
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                while chunk:
                    total += len(d.decompress(chunk))
                    chunk = b""
                    if d.eof and d.unused_data:  # next gzip member
                        chunk, d = d.unused_data, zlib.decompressobj(wbits=31)
    except zlib.error as exc:
        return total, f"corrupt gzip data ({exc})"
    if not d.eof:
        return total, f"truncated file (gzip stream ends after {total} bytes)"
    return total, None


def _check_nifti_complete(path: Path) -> str | None:
    """Truncation check; None if the file is whole."""

    gz = str(path).lower().endswith(".gz")
    try:
        header = nib.load(str(path)).header
        shape = header.get_data_shape()
        itemsize = header.get_data_dtype().itemsize
        offset = max(int(header["vox_offset"]), int(header["sizeof_hdr"]) + 4)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for broken headers
        if gz:
            _, problem = _gzip_length(path)
            if problem:
                return problem
        msg = " ".join(str(exc).replace(str(path), Path(path).name).split())[:150]
        return f"cannot read the NIfTI header ({type(exc).__name__}: {msg})"
    expected = offset + int(np.prod(shape, dtype=np.int64)) * itemsize
    if gz:
        if os.path.getsize(path) >= 18:
            with open(path, "rb") as fh:
                fh.seek(-4, os.SEEK_END)
                isize = struct.unpack("<I", fh.read(4))[0]
            if isize == expected % 2**32:  # the gzip trailer agrees with the header: O(1) fast path
                return None
        # slow path (multi-member gzip, extra data, or a broken file): stream through the whole file
        total, problem = _gzip_length(path)
        if problem:
            return problem.replace(" bytes)", f" of {expected} bytes)")
        if total < expected:
            return f"truncated file ({total} of {expected} bytes)"
        return None
    size = os.path.getsize(path)
    if size < expected:
        return f"truncated file ({size} of {expected} bytes)"
    return None


def read_validated_image(path: Path, case_id: str, what: str) -> sitk.Image:
    """One scalar 3-D image, checked the way every layout reads its files (complete NIfTI, finite voxels,
    one component, 3-D): any problem is a :class:`CaseError` naming the case, ``what`` and the file."""
    if path is None or not Path(path).is_file():
        raise CaseError(f"{case_id}: {what} file missing ({path})", case_id)
    low = str(path).lower()
    if low.endswith(".nii") or low.endswith(".nii.gz"):
        problem = _check_nifti(Path(path))
        if problem and "non-finite" in problem:
            raise CaseError(f"{case_id}: {what} has {problem} ({path})", case_id)
        if problem:
            raise CaseError(f"{case_id}: unreadable {what}: {problem} ({path})", case_id)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise CaseError(f"{case_id}: unreadable {what}: {_first_line(exc)} ({path})", case_id) from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CaseError(
            f"{case_id}: {what} has {image.GetNumberOfComponentsPerPixel()} components per "
            f"voxel; expected a scalar 3D volume ({path})",
            case_id,
        )
    dim = image.GetDimension()
    if dim == 4 and image.GetSize()[3] == 1:  # a 3D volume stored with a singleton 4th axis
        size = list(image.GetSize())
        image = sitk.Extract(image, size[:3] + [0], [0, 0, 0, 0])
        dim = 3
    if dim != 3:
        raise CaseError(
            f"{case_id}: {what} is {dim}D (size {tuple(image.GetSize())}); expected a 3D volume ({path})",
            case_id,
        )
    if min(image.GetSize()) < 2:
        raise CaseError(
            f"{case_id}: {what} is a single slice (size {tuple(image.GetSize())}); expected a 3D "
            f"volume ({path})",
            case_id,
        )
    return image


def _check_grid(case_id: str, image: sitk.Image, other: sitk.Image, what: str, path: Path) -> None:
    g, h = Geometry.of(image), Geometry.of(other)
    if g.shape != h.shape:
        raise CaseError(f"{case_id}: image shape {g.shape} != {what} shape {h.shape} ({path})", case_id)
    problem = g.mismatch(h)
    if problem:
        raise CaseError(f"{case_id}: image and {what} geometry differ ({problem}) ({path})", case_id)
    other.CopyInformation(image)  # equal within tolerance: make them identical for resampling


def _label_values(arr: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an integer array (bincount when the range is small: much faster)."""
    if arr.size and arr.dtype.kind in "ui":
        lo, hi = int(arr.min()), int(arr.max())
        if lo >= 0 and hi < 1 << 16:
            return np.flatnonzero(np.bincount(arr.ravel(), minlength=hi + 1))
    return np.unique(arr)


def _map_labels(case_id: str, raw: np.ndarray, mapping: dict[int, int], path: Path) -> np.ndarray:
    if raw.dtype.kind == "f":
        if not np.all(np.isfinite(raw)) or np.any(raw != np.round(raw)):
            raise CaseError(f"{case_id}: label map has non-integer values ({path})", case_id)
        raw = raw.astype(np.int64)
    values = _label_values(raw)
    unknown = sorted(int(v) for v in values if int(v) not in mapping)
    if unknown:
        shown = "{" + ", ".join(map(str, unknown[:10])) + (", ..." if len(unknown) > 10 else "") + "}"
        raise CaseError(f"{case_id}: label values {shown} not in the card's classes ({path})", case_id)
    if all(mapping.get(int(v)) == int(v) for v in values):
        return raw.astype(np.uint8, copy=False)
    lut = np.zeros(int(values.max()) + 1 if values.size else 1, dtype=np.uint8)
    for v in values:
        lut[int(v)] = mapping[int(v)]
    return lut[raw]


_overlap_warned: set[str] = set()  # dataset roots already warned about (once per process)


def read_case_sitk(
    card: DatasetCard, case: CaseFiles, report: dict | None = None
) -> tuple[sitk.Image, sitk.Image, Geometry]:
    """Read and validate a case: (float32 HU image, uint8 class-index label map on the same grid, geometry).

    Raises :class:`CaseError` (one line naming the case, the problem and the file) for unreadable or
    truncated files, 2D/4D/multi-component images, non-finite voxels, a missing label, image/label
    shape or geometry mismatches, and label values the card does not know. ``report`` (a dict) receives
    what a ``dicom_rt`` case's reading decided (structure mapping, conflicts, overlaps).
    """
    cid = case.case_id
    if card.layout == "dicom_rt":
        from organseg.io.dicom_rt import read_dicom_rt_case  # noqa: PLC0415 - see list_cases

        image, label, found = read_dicom_rt_case(card, case)
        if report is not None:
            report.update(found)
        return image, label, Geometry.of(image)
    if case.image is None:
        expected = "img.nrrd" if card.layout == "pddca" else f"imagesTr/{cid}_0000.*"
        raise CaseError(f"{cid}: no image file (expected {expected} in {card.path})", cid)
    image = read_validated_image(case.image, cid, "image")
    image = sitk.Cast(image, sitk.sitkFloat32)
    geom = Geometry.of(image)
    view = sitk.GetArrayViewFromImage(image)
    if not np.all(np.isfinite(view)):
        n = int(view.size - np.count_nonzero(np.isfinite(view)))
        raise CaseError(f"{cid}: image has {n} non-finite voxel(s) (NaN/inf) ({case.image})", cid)

    if card.layout == "pddca":
        label_zyx = _merge_structures(card, case, image)
    else:
        if case.label is None:
            raise CaseError(
                f"{cid}: no label file (expected labelsTr/{cid}{_ending_of(case.image)}) ({case.image})", cid
            )
        raw = read_validated_image(case.label, cid, "label")
        _check_grid(cid, image, raw, "label", case.label)
        label_zyx = _map_labels(cid, sitk.GetArrayFromImage(raw), card.raw_to_class(), case.label)
    label = sitk.GetImageFromArray(np.ascontiguousarray(label_zyx))
    label.CopyInformation(image)
    return image, label, geom


def _ending_of(path: Path) -> str:
    split = _split_ending(Path(path).name, IMAGE_ENDINGS)
    return split[1] if split else Path(path).suffix


def _binary_mask(case_id: str, stem: str, mask: np.ndarray, path: Path) -> np.ndarray:
    """A structure mask as bool. It must hold only {0, 1} or only {0, 255} (the two binary encodings in
    use); anything else (all 7s, a probability map, a label map with several organs) is a CaseError:
    reading it as ``mask != 0`` would silently turn every non-zero voxel into the organ."""
    if mask.dtype.kind == "f" and not np.all(np.isfinite(mask)):
        raise CaseError(f"{case_id}: structure {stem} has non-finite values ({path})", case_id)
    if mask.dtype.kind == "b":
        return np.asarray(mask)
    values = _label_values(mask) if mask.dtype.kind in "ui" else np.unique(mask)
    present = {float(v) for v in values}
    if not (present <= {0.0, 1.0} or present <= {0.0, 255.0}):
        odd = sorted(v for v in values if float(v) not in (0.0, 1.0, 255.0)) or list(values)
        shown = ", ".join(f"{v:g}" for v in odd[:5]) + (", ..." if len(odd) > 5 else "")
        raise CaseError(
            f"{case_id}: structure {stem} is not a binary mask (values {{{shown}}}; expected only "
            f"{{0, 1}} or only {{0, 255}}) ({path})",
            case_id,
        )
    return mask != 0


def _merge_structures(card: DatasetCard, case: CaseFiles, image: sitk.Image) -> np.ndarray:
    cid = case.case_id
    if not case.structures:
        raise CaseError(
            f"{cid}: no label file (no structure masks named in class_map under "
            f"{Path(card.path) / cid / 'structures'})",
            cid,
        )
    by_index = sorted(case.structures.items(), key=lambda kv: card.index(card.class_map[kv[0]]))
    size = image.GetSize()
    label = np.zeros((size[2], size[1], size[0]), dtype=np.uint8)
    for stem, path in by_index:
        mask_img = read_validated_image(path, cid, f"structure {stem}")
        _check_grid(cid, image, mask_img, f"structure {stem}", path)
        mask = _binary_mask(cid, stem, sitk.GetArrayViewFromImage(mask_img), path)
        index = card.index(card.class_map[stem])
        if str(card.path) not in _overlap_warned:
            overlap = int(np.count_nonzero(label[mask]))
            if overlap:
                _overlap_warned.add(str(card.path))
                warnings.warn(
                    f"{cid}: structure masks overlap ({overlap} voxels under {stem}); the later "
                    f"class index wins (further overlaps are not reported)",
                    OverlapWarning,
                    stacklevel=3,
                )
        label[mask] = index
    return label


def read_case(card: DatasetCard, case: CaseFiles) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """``(image_xyz float32 HU, label_xyz uint8 class indices, Geometry)`` of one validated case."""
    image, label, geom = read_case_sitk(card, case)
    return image_to_xyz(image), image_to_xyz(label), geom
