"""Synthetic CT phantoms: determinism, file formats, anatomy statistics, few-organ datasets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from organseg.cli.main import main
from organseg.phantom import (
    ABDOMEN_CLASSES,
    HN_CLASSES,
    HN_SMALL,
    PDDCA_NAMES,
    generate_hn_case,
    keep_stream,
    keep_tag,
)

SMALL_HN = ["--shape", "64", "64", "24", "--spacing", "3", "3", "6"]  # same FOV as the default
SMALL_ABD = ["--shape", "64", "48", "16", "--spacing", "4", "4", "9"]
CARD_DIR = Path(__file__).resolve().parents[1] / "data_modules" / "cards"


def _phantom(*argv: str) -> None:
    assert main(["phantom", *argv, "--quiet"]) == 0


def _read(path: Path) -> tuple[np.ndarray, sitk.Image]:
    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img).transpose(2, 1, 0), img  # -> (x, y, z)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def hn_small(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hn_small")
    out = {"a": root / "a", "b": root / "b", "seed1": root / "seed1", "pddca": root / "pddca"}
    _phantom("hn", "--out", str(out["a"]), "--cases", "3", "--seed", "0", "--workers", "1", *SMALL_HN)
    _phantom("hn", "--out", str(out["b"]), "--cases", "3", "--seed", "0", "--workers", "2", *SMALL_HN)
    _phantom("hn", "--out", str(out["seed1"]), "--cases", "3", "--seed", "1", "--workers", "1", *SMALL_HN)
    _phantom(
        "hn",
        "--out",
        str(out["pddca"]),
        "--cases",
        "3",
        "--seed",
        "0",
        "--workers",
        "1",
        "--layout",
        "pddca",
        *SMALL_HN,
    )
    return out


@pytest.fixture(scope="module")
def hn_default(tmp_path_factory) -> list[tuple[np.ndarray, np.ndarray]]:
    """Three cases at the default shape/spacing, read back from disk: [(image, label), ...]."""
    out = tmp_path_factory.mktemp("hn_default")
    _phantom("hn", "--out", str(out), "--cases", "3", "--seed", "7", "--workers", "2")
    cases = []
    for i in range(3):
        img, _ = _read(out / "imagesTr" / f"hn_{i:03d}_0000.nii.gz")
        lab, _ = _read(out / "labelsTr" / f"hn_{i:03d}.nii.gz")
        cases.append((img, lab))
    return cases


@pytest.fixture(scope="module")
def abdomen(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("abdomen")
    out = {
        "full": root / "full",
        "liver": root / "liver",
        "pancreas": root / "pancreas",
        "kidneys": root / "kidneys",
    }
    common = ["--cases", "3", "--seed", "0", "--workers", "1", *SMALL_ABD]
    _phantom("abdomen", "--out", str(out["full"]), *common)
    _phantom("abdomen", "--out", str(out["liver"]), "--keep", "liver", *common)
    _phantom("abdomen", "--out", str(out["pancreas"]), "--keep", "pancreas", *common)
    _phantom("abdomen", "--out", str(out["kidneys"]), "--keep", "kidney_r", "kidney_l", *common)
    return out


# ----------------------------------------------------------------------------- determinism
def test_same_seed_is_byte_identical_whatever_the_worker_count(hn_small):
    a, b = _files(hn_small["a"]), _files(hn_small["b"])
    assert sorted(a) == sorted(b)
    assert len([k for k in a if k.startswith("labelsTr/")]) == 3
    for name in a:
        assert a[name] == b[name], name  # labels, images and dataset.json
    # gzip streams carry no timestamp (mtime field, bytes 4..8, is zero)
    lab = a["labelsTr/hn_000.nii.gz"]
    assert lab[:2] == b"\x1f\x8b" and lab[4:8] == b"\x00\x00\x00\x00"


def test_different_seed_gives_different_cases(hn_small):
    for i in range(3):
        la, _ = _read(hn_small["a"] / "labelsTr" / f"hn_{i:03d}.nii.gz")
        lc, _ = _read(hn_small["seed1"] / "labelsTr" / f"hn_{i:03d}.nii.gz")
        assert (la != lc).mean() > 0.001


def test_cases_of_one_dataset_differ(hn_small):
    l0, _ = _read(hn_small["a"] / "labelsTr" / "hn_000.nii.gz")
    l1, _ = _read(hn_small["a"] / "labelsTr" / "hn_001.nii.gz")
    assert (l0 != l1).mean() > 0.001


def test_anatomy_does_not_depend_on_the_grid_extent():
    """A larger field of view rasterises the same physical case (only the noise differs)."""
    small = generate_hn_case(3, 5, (48, 48, 20), (4.0, 4.0, 7.0))
    big = generate_hn_case(3, 5, (60, 56, 24), (4.0, 4.0, 7.0))
    # both grids are centred on the same physical point with the same spacing: the small one is
    # the big one's centre
    crop = big.label[6:54, 4:52, 2:22]
    assert np.array_equal(crop, small.label)


# ----------------------------------------------------------------------------- file format
def test_dataset_json_and_geometry(hn_small):
    root = hn_small["a"]
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"}
    assert meta["file_ending"] == ".nii.gz"
    assert meta["numTraining"] == 3
    assert meta["labels"] == {name: i for i, name in enumerate(HN_CLASSES)}
    assert meta["labels"]["background"] == 0
    assert all(isinstance(v, int) for v in meta["labels"].values())
    assert meta["organseg"]["seed"] == 0
    assert sorted(p.name for p in (root / "imagesTr").iterdir()) == [
        f"hn_{i:03d}_0000.nii.gz" for i in range(3)
    ]
    assert sorted(p.name for p in (root / "labelsTr").iterdir()) == [f"hn_{i:03d}.nii.gz" for i in range(3)]
    img, im = _read(root / "imagesTr" / "hn_001_0000.nii.gz")
    lab, lm = _read(root / "labelsTr" / "hn_001.nii.gz")
    for arr, itk in ((img, im), (lab, lm)):
        assert arr.shape == (64, 64, 24)
        assert itk.GetSize() == (64, 64, 24)
        assert np.allclose(itk.GetSpacing(), (3.0, 3.0, 6.0))
        assert np.allclose(itk.GetDirection(), np.eye(3).ravel())
        assert np.allclose(itk.GetOrigin(), [-(64 - 1) / 2 * 3, -(64 - 1) / 2 * 3, -(24 - 1) / 2 * 6])
    assert im.GetPixelID() == sitk.sitkInt16 and lm.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(lab)) <= set(range(len(HN_CLASSES)))


def test_classes_match_the_dataset_cards():
    yaml = pytest.importorskip("yaml")
    hn = yaml.safe_load((CARD_DIR / "hn_phantom.yaml").read_text())
    ab = yaml.safe_load((CARD_DIR / "abdomen_phantom.yaml").read_text())
    assert hn["classes"] == HN_CLASSES and sorted(hn["small"]) == sorted(HN_SMALL)
    assert ab["classes"] == ABDOMEN_CLASSES
    assert sorted(PDDCA_NAMES.values()) == sorted(HN_CLASSES[1:])


def test_pddca_layout_matches_nnunet_layout(hn_small):
    root = hn_small["pddca"]
    assert not (root / "dataset.json").exists()
    assert sorted(p.name for p in root.iterdir()) == ["hn_000", "hn_001", "hn_002"]
    for must in (
        "BrainStem",
        "Chiasm",
        "Mandible",
        "OpticNerve_L",
        "OpticNerve_R",
        "Parotid_L",
        "Parotid_R",
        "Submandible_L",
        "Submandible_R",
    ):
        assert must in PDDCA_NAMES
    for i in range(3):
        case = root / f"hn_{i:03d}"
        assert sorted(p.name for p in (case / "structures").iterdir()) == sorted(
            f"{s}.nrrd" for s in PDDCA_NAMES
        )
        img, im = _read(case / "img.nrrd")
        ref_img, _ = _read(hn_small["a"] / "imagesTr" / f"hn_{i:03d}_0000.nii.gz")
        ref_lab, _ = _read(hn_small["a"] / "labelsTr" / f"hn_{i:03d}.nii.gz")
        assert np.array_equal(img, ref_img)
        assert np.allclose(im.GetSpacing(), (3.0, 3.0, 6.0))
        for stem, cls in PDDCA_NAMES.items():
            mask, mm = _read(case / "structures" / f"{stem}.nrrd")
            assert mm.GetPixelID() == sitk.sitkUInt8
            assert set(np.unique(mask)) <= {0, 1}
            assert np.array_equal(mask.astype(bool), ref_lab == HN_CLASSES.index(cls)), (case.name, stem)


# ----------------------------------------------------------------------------- HN anatomy
def test_hn_every_organ_in_every_case_and_small_organs_are_small(hn_default, hn_small):
    for _img, lab in hn_default:
        assert lab.shape == (192, 192, 48)
        counts = np.bincount(lab.ravel(), minlength=len(HN_CLASSES))
        assert (counts[1:] > 0).all(), dict(zip(HN_CLASSES, counts))
        for organ in HN_SMALL:
            m = lab == HN_CLASSES.index(organ)
            n_slices = int(m.any(axis=(0, 1)).sum())
            assert 1 <= n_slices <= 4, (organ, n_slices)
            assert m.sum() < 1000, (organ, m.sum())
        for organ in ("temporal_lobe_l", "temporal_lobe_r", "mandible", "brainstem"):
            assert counts[HN_CLASSES.index(organ)] > 3000
    # coarse 3x3x6 mm grids: small organs may shrink to a voxel but never vanish
    for i in range(3):
        lab, _ = _read(hn_small["a"] / "labelsTr" / f"hn_{i:03d}.nii.gz")
        assert (np.bincount(lab.ravel(), minlength=len(HN_CLASSES))[1:] > 0).all()


def test_hn_volume_ratio(hn_default):
    ratios = []
    for _, lab in hn_default:
        counts = np.bincount(lab.ravel(), minlength=len(HN_CLASSES))[1:]
        ratios.append(counts.max() / counts.min())
    assert np.median(ratios) > 1000, ratios


def test_hn_intensities(hn_default):
    for img, lab in hn_default:
        assert img.dtype == np.int16
        assert (img > 700).sum() > 5000  # skull, mandible, vertebrae
        assert (img < -950).mean() > 0.1  # air around the head
        assert abs(np.median(img[(img < -900)]) + 1000) < 15
        body = (lab == 0) & (img > -200) & (img < 200)
        assert 0 < np.median(img[body]) < 60  # soft tissue / brain
        # the chiasm is barely visible against its in-plane surroundings
        chiasm = lab == HN_CLASSES.index("chiasm")
        shell = ndimage.binary_dilation(chiasm, np.ones((7, 7, 1), bool)) & ~chiasm & (lab == 0)
        assert shell.sum() > 100
        assert abs(img[chiasm].mean() - img[shell].mean()) < 15
        # the lens is clearly brighter than the vitreous of its eye
        for side in ("l", "r"):
            lens = lab == HN_CLASSES.index(f"lens_{side}")
            eye = lab == HN_CLASSES.index(f"eye_{side}")
            vitreous = ndimage.binary_erosion(eye, np.ones((5, 5, 1), bool))
            vitreous &= ~ndimage.binary_dilation(lens, np.ones((5, 5, 3), bool))
            assert img[lens].mean() - img[vitreous].mean() > 30
        # parotids are darker (fatty) than the submandibular glands
        par = np.isin(lab, [HN_CLASSES.index("parotid_l"), HN_CLASSES.index("parotid_r")])
        smg = np.isin(lab, [HN_CLASSES.index("submandibular_l"), HN_CLASSES.index("submandibular_r")])
        assert img[par].mean() < img[smg].mean()


def test_hn_layout_and_variability(hn_default):
    def centre(lab, organ):
        return np.argwhere(lab == HN_CLASSES.index(organ)).mean(axis=0) * np.array([1.0, 1.0, 3.0])

    for _, lab in hn_default:
        # patient left is +x; anterior is -y; superior is +z
        assert centre(lab, "eye_l")[0] > centre(lab, "eye_r")[0]
        assert centre(lab, "parotid_l")[0] > centre(lab, "parotid_r")[0]
        assert centre(lab, "lens_l")[1] < centre(lab, "eye_l")[1]  # lens at the front
        assert centre(lab, "eye_l")[1] < centre(lab, "chiasm")[1] < centre(lab, "brainstem")[1]
        assert centre(lab, "chiasm")[2] > centre(lab, "pituitary")[2]
        assert centre(lab, "brainstem")[2] > centre(lab, "spinal_cord")[2]
        assert centre(lab, "submandibular_l")[2] < centre(lab, "eye_l")[2]
    # per-case variability: organ centres move by millimetres between cases
    for organ in ("brainstem", "eye_l", "chiasm", "mandible"):
        c = [centre(lab, organ) for _, lab in hn_default]
        assert max(np.linalg.norm(c[0] - c[1]), np.linalg.norm(c[0] - c[2])) > 2.0, organ


# ----------------------------------------------------------------------------- abdomen
def test_abdomen_full_set(abdomen):
    root = abdomen["full"]
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["labels"] == {n: i for i, n in enumerate(ABDOMEN_CLASSES)}
    assert meta["numTraining"] == 3 and meta["channel_names"] == {"0": "CT"}
    for i in range(3):
        lab, lm = _read(root / "labelsTr" / f"abd_{i:03d}.nii.gz")
        img, _ = _read(root / "imagesTr" / f"abd_{i:03d}_0000.nii.gz")
        assert lab.shape == (64, 48, 16) and np.allclose(lm.GetSpacing(), (4, 4, 9))
        assert set(np.unique(lab)) == set(range(7))
        liver, spleen = lab == 1, lab == 2
        assert liver.sum() > spleen.sum() > 0
        assert np.argwhere(liver).mean(0)[0] < np.argwhere(spleen).mean(0)[0]  # liver right, spleen left
        assert 40 < img[liver].mean() < 75
        assert img[lab == 3].mean() > 100  # enhanced kidneys
        assert (img > 700).any() and (img < -950).any()


def test_abdomen_keep_sets(abdomen):
    for key, kept, tag in (
        ("liver", {1}, "abd-liver"),
        ("pancreas", {5}, "abd-pancreas"),
        ("kidneys", {3, 4}, "abd-kidney_l-kidney_r"),
    ):
        root = abdomen[key]
        meta = json.loads((root / "dataset.json").read_text())
        assert meta["labels"] == {"background": 0, **{ABDOMEN_CLASSES[k]: k for k in sorted(kept)}}
        assert meta["numTraining"] == 3 and meta["file_ending"] == ".nii.gz"
        assert sorted(p.name for p in (root / "labelsTr").iterdir()) == [
            f"{tag}_{i:03d}.nii.gz" for i in range(3)
        ]
        for i in range(3):
            lab, _ = _read(root / "labelsTr" / f"{tag}_{i:03d}.nii.gz")
            assert set(np.unique(lab)) == {0} | kept


def test_abdomen_keep_sets_share_no_anatomy(abdomen):
    streams = {
        keep_stream(None),
        keep_stream(["liver"]),
        keep_stream(["pancreas"]),
        keep_stream(["kidney_l", "kidney_r"]),
        keep_stream(["kidney_r", "kidney_l"]),
    }
    assert len(streams) == 4 and keep_stream(None) == 0
    assert keep_stream(ABDOMEN_CLASSES[1:]) == 0 and keep_tag(ABDOMEN_CLASSES[1:]) == "abd"
    images = {}
    livers = {}
    for key, tag in (("full", "abd"), ("liver", "abd-liver"), ("pancreas", "abd-pancreas")):
        for i in range(3):
            images[(key, i)], _ = _read(abdomen[key] / "imagesTr" / f"{tag}_{i:03d}_0000.nii.gz")
            if key in ("full", "liver"):
                lab, _ = _read(abdomen[key] / "labelsTr" / f"{tag}_{i:03d}.nii.gz")
                livers[(key, i)] = lab == 1
    keys = list(images)
    for a in range(len(keys)):
        for b in range(a + 1, len(keys)):
            assert not np.array_equal(images[keys[a]], images[keys[b]]), (keys[a], keys[b])
    for i in range(3):
        for j in range(3):
            x, y = livers[("full", i)], livers[("liver", j)]
            dice = 2 * (x & y).sum() / (x.sum() + y.sum())
            assert dice < 0.995, (i, j, dice)


# ----------------------------------------------------------------------------- CLI
def test_cli_errors_and_stale_cases(tmp_path, capsys):
    out = tmp_path / "x"
    tiny = ["--shape", "24", "24", "8", "--spacing", "8", "8", "18"]
    assert main(["phantom", "hn", "--out", str(out), "--cases", "3", "--seed", "0", "--quiet", *tiny]) == 0
    assert "wrote 3 case(s)" in capsys.readouterr().out
    assert main(["phantom", "hn", "--out", str(out), "--cases", "2", "--seed", "0", "--quiet", *tiny]) == 0
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["hn_000.nii.gz", "hn_001.nii.gz"]
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 2
    assert main(["phantom", "hn", "--out", str(out), "--cases", "0", "--seed", "0"]) == 2
    assert "--cases" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["phantom", "abdomen", "--out", str(out), "--cases", "1", "--keep", "heart"])
