"""RTSTRUCTs that read back right in tools nobody here wrote (issue 15 item 1).

Phantom head-and-neck organs are written (``organseg.io.rtstruct.write_rtstruct``, the writer of
``organseg predict``) beside a DICOM CT series on three grids -- identity, flipped (-1, -1, 1) as
head-and-neck CT often is, and 0.8 x 1.2 mm pixels -- and read back by two independent readers,
pip-installed at test time into a temporary folder from this machine's configured package index:

* **dcmrtstruct2nii** rasterises each ROI onto the CT grid: Dice >= 0.95 with the written mask for every
  organ of >= 100 voxels.
* **dicompyler-core** parses the contours: each contour's polygon area (shoelace) is the area of the voxels
  it encloses, and each plane's signed sum (holes run the other way) is the organ's voxel area on that
  slice. Its structure volume (``DicomParser.CalculateStructureVolume``, 0.5.6) is not the voxel volume,
  by design: it multiplies polygon areas by the plane spacing but counts the structure's first and last
  planes at HALF their area (``p.area // 2``: floored to whole mm^2), as if the organ ended at the first
  and last contour planes rather than half a slice beyond them -- so an organ two slices thick reads half
  its voxel volume, and a one-slice organ 0 (its plane spacing is 0). "First" and "last" are in the order
  of its plane keys, ``str(round(z, 2)) + "0"`` sorted as STRINGS: the numeric ends only when every z has
  the same sign and number of digits (the flipped grid here starts at negative z, so it exercises that).
  The test computes the voxel volume under that convention and requires agreement to the flooring.

Both need a shim for pydicom 3, which removed ``pydicom.read_file`` (aliased to ``dcmread`` inside this
test only), and dicompyler-core needs shapely for volumes. They are installed with ``--no-deps``: numpy,
scipy, pydicom, SimpleITK and matplotlib are the venv's; the few others they import are named. When pip
cannot install them, the test skips with pip's reason, as a warning too (it is never silently green).
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from organseg.io.geometry import image_to_xyz, xyz_to_image

#: the readers and what they import that the venv lacks (installed with --no-deps, see the module doc)
READERS = ("dcmrtstruct2nii", "dicompyler-core", "shapely", "scikit-image", "lazy_loader", "termcolor", "six")
_TOP_LEVEL = ("dcmrtstruct2nii", "dicompylercore", "shapely", "skimage", "lazy_loader", "termcolor", "six")
MIN_VOXELS = 100  # Dice is asserted for organs at least this big (a 30-voxel lens loses a lot to one voxel)

GRIDS = {
    # name: (spacing, direction, origin)
    "identity": ((1.0, 1.0, 2.5), (1, 0, 0, 0, 1, 0, 0, 0, 1), (-100.0, -100.0, 100.0)),
    "flipped": ((1.0, 1.0, 2.5), (-1, 0, 0, 0, -1, 0, 0, 0, 1), (100.0, 100.0, -60.0)),
    "aspect": ((0.8, 1.2, 2.5), (1, 0, 0, 0, 1, 0, 0, 0, 1), (-100.0, -100.0, 100.0)),
}
FIELD_MM = (200.0, 200.0, 120.0)


@pytest.fixture(scope="module")
def readers(tmp_path_factory):
    """dcmrtstruct2nii and dicompyler-core importable, with the pydicom 3 shim; everything undone after."""
    target = tmp_path_factory.mktemp("rtstruct_readers")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), *READERS]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        problem = None if proc.returncode == 0 else (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    except (OSError, subprocess.TimeoutExpired) as exc:
        problem = [str(exc)]
    if problem:
        msg = (
            f"RTSTRUCT READ-BACK NOT TESTED: `pip install --no-deps {' '.join(READERS)}` failed: "
            + " | ".join(problem)
        )
        warnings.warn(msg, pytest.PytestWarning, stacklevel=1)
        print(msg, file=sys.stderr)
        pytest.skip(msg)
    import pydicom
    import pydicom.dicomio

    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(target))
        mp.setattr(pydicom, "read_file", pydicom.dcmread, raising=False)  # removed in pydicom 3
        mp.setattr(pydicom.dicomio, "read_file", pydicom.dcmread, raising=False)
        try:
            d2n = importlib.import_module("dcmrtstruct2nii")
            parser = importlib.import_module("dicompylercore.dicomparser")
            config = importlib.import_module("dicompylercore.config")
        except ImportError as exc:
            msg = f"RTSTRUCT READ-BACK NOT TESTED: installed readers do not import: {exc}"
            warnings.warn(msg, pytest.PytestWarning, stacklevel=1)
            pytest.skip(msg)
        assert config.shapely_available, "dicompyler-core computes volumes only with shapely"
        yield d2n.dcmrtstruct2nii, parser.DicomParser
        for name in [m for m in sys.modules if m.split(".")[0] in _TOP_LEVEL]:
            del sys.modules[name]


def _phantom_series(grid: str, folder: Path):
    """(CT image read back, its files, label (x, y, z), classes): phantom case 0 rasterised on ``grid``
    (the anatomy at that spacing; the direction and origin stamped on), written as a DICOM series."""
    from organseg.io.dicom import read_dicom_series, write_dicom_series
    from organseg.phantom.hn import generate_hn_case

    spacing, direction, origin = GRIDS[grid]
    shape = tuple(int(round(f / s)) for f, s in zip(FIELD_MM, spacing))
    case = generate_hn_case(0, 0, shape=shape, spacing=spacing)
    assert not case.missing
    image = xyz_to_image(
        case.image.astype(np.float32), {"spacing": spacing, "origin": origin, "direction": direction}
    )
    write_dicom_series(image, folder)
    ct, files = read_dicom_series(folder)
    return ct, files, case.label, case.classes


def _shoelace(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def dicompyler_convention_volume(plane_mm2: dict[str, float], n_end_contours: int, thickness: float):
    """The voxel volume (cc) as dicompyler-core 0.5.6 counts a structure, and its flooring tolerance.
    ``plane_mm2``: voxel area per plane, keyed by its plane key (``str(round(z, 2)) + "0"``). The volume is
    ``thickness * sum(area)`` with the first and last keys IN STRING ORDER at half area (none halved when
    there is one plane); ``p.area // 2`` floors each end contour's half area to whole mm^2, so dicompyler
    may read up to ``thickness`` mm^3 per end contour less: that is the tolerance returned."""
    keys = sorted(plane_mm2)
    total = 0.0
    for i, key in enumerate(keys):
        end = i in (0, len(keys) - 1) and len(keys) > 1
        total += plane_mm2[key] / 2 if end else plane_mm2[key]
    return total * thickness / 1000, n_end_contours * thickness / 1000


@pytest.mark.slow
@pytest.mark.parametrize("grid", list(GRIDS))
def test_rtstruct_reads_back_in_independent_readers(readers, grid, tmp_path, capsys):
    from matplotlib.path import Path as MPath

    from organseg.io.dicom import read_headers
    from organseg.io.rtstruct import write_rtstruct

    dcmrtstruct2nii, DicomParser = readers
    ct, files, label, classes = _phantom_series(grid, tmp_path / "ct")
    names = write_rtstruct(xyz_to_image(label, ct), classes, read_headers(files), tmp_path / "rs.dcm")
    assert len(names) >= 15
    spacing = ct.GetSpacing()
    pixel_mm2 = spacing[0] * spacing[1]

    dcmrtstruct2nii(
        str(tmp_path / "rs.dcm"), str(tmp_path / "ct"), str(tmp_path / "nii"), convert_original_dicom=False
    )
    parser = DicomParser(str(tmp_path / "rs.dcm"))
    structures = {s["name"]: number for number, s in parser.GetStructures().items()}
    assert sorted(structures) == sorted(names)

    xs, ys = np.meshgrid(np.arange(label.shape[0]), np.arange(label.shape[1]), indexing="ij")
    centres = np.stack([xs.ravel(), ys.ravel()], 1).astype(float)
    rows, failures = [], []
    for name in names:
        mine = label == classes.index(name)
        voxels = int(mine.sum())
        # --- dcmrtstruct2nii: its mask on the CT grid
        mask = sitk.ReadImage(str(tmp_path / "nii" / f"mask_{name}.nii.gz"))
        assert mask.GetSize() == ct.GetSize()
        np.testing.assert_allclose(mask.GetDirection(), ct.GetDirection(), atol=1e-6)
        back = image_to_xyz(mask) > 0
        dice = 2.0 * np.count_nonzero(back & mine) / (np.count_nonzero(back) + voxels)
        if voxels >= MIN_VOXELS and dice < 0.95:
            failures.append(f"{grid} {name}: dcmrtstruct2nii Dice {dice:.3f}")
        # --- dicompyler-core: its parsed contours, per contour and per plane, and its volume
        coords = parser.GetStructureCoordinates(structures[name])
        thickness = parser.CalculatePlaneThickness(coords)
        volume = parser.CalculateStructureVolume(coords, thickness)
        plane_area: dict[str, float] = {}
        for key, plane in coords.items():
            signed = 0.0
            for contour in plane:
                pts = np.asarray(contour["data"], float)
                idx = np.array([ct.TransformPhysicalPointToContinuousIndex(p.tolist()) for p in pts])
                k = int(round(idx[0, 2]))
                area = _shoelace(pts[:, :2])  # axial planes: x, y in mm
                inside = MPath(idx[:, :2]).contains_points(centres).reshape(label.shape[:2])
                enclosed = np.count_nonzero(inside) * pixel_mm2  # the voxels this contour encloses
                if abs(abs(area) - enclosed) > 1e-6 * max(enclosed, 1):
                    failures.append(
                        f"{grid} {name} z={k}: contour area {abs(area):.4f} != {enclosed:.4f} mm2"
                    )
                signed += area
            slice_mm2 = np.count_nonzero(mine[:, :, k]) * pixel_mm2
            if abs(abs(signed) - slice_mm2) > 1e-6 * max(slice_mm2, 1):
                failures.append(
                    f"{grid} {name} z={k}: plane area {abs(signed):.4f} != voxels {slice_mm2:.4f}"
                )
            plane_area[key] = slice_mm2
        keys = sorted(coords)
        n_end = len(coords[keys[0]]) + len(coords[keys[-1]]) if len(keys) > 1 else 0
        want, tol = dicompyler_convention_volume(plane_area, n_end, thickness)
        if abs(volume - want) > tol + 1e-9:
            failures.append(f"{grid} {name}: dicompyler volume {volume:.4f} cc, its convention {want:.4f}")
        voxel_cc = voxels * spacing[0] * spacing[1] * spacing[2] / 1000
        slices = int(np.count_nonzero(mine.any(axis=(0, 1))))
        rows.append(
            f"| {grid} | {name} | {voxels} | {slices} | {dice:.4f} | {voxel_cc:.4f} | {volume:.4f} | "
            f"{volume / voxel_cc:.3f} | {want:.4f} |"
        )
    with capsys.disabled():
        print(
            "\n| grid | organ | voxels | slices | dcmrtstruct2nii Dice | voxel cc | dicompyler cc | "
            "dicompyler / voxel | its convention cc |\n|---|---|---:|---:|---:|---:|---:|---:|---:|"
        )
        print("\n".join(rows))
    assert not failures, "\n".join(failures)
