"""Per-organ metrics (MONAI agreement, analytic geometry, crop invariance, empty-mask policy),
reports and overlay PNGs."""

from __future__ import annotations

import json
import math
import re
import warnings
from types import SimpleNamespace

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.metrics import (
    compute_average_surface_distance,
    compute_dice,
    compute_hausdorff_distance,
)

from organseg.evaluation import (
    EMPTY_MASK_POLICY,
    HD95_DEFINITION,
    case_metrics,
    format_table,
    image_diagonal_mm,
    save_overlays,
    summarize,
    write_report,
)
from organseg.evaluation.metrics import ROW_KEYS, SUMMARY_KEYS, binary_metrics
from organseg.evaluation.overlays import axial_view, choose_slices, organ_colors, slice_areas
from organseg.runtime.callbacks import case_direction

CLASSES = ["background", "brainstem", "parotid_l", "lens_l", "mandible", "chiasm"]


def _ball(shape, center, radius, spacing=(1.0, 1.0, 1.0)):
    """Boolean ball in physical (mm) coordinates; center given in voxel units."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    d2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grids, center, spacing))
    return d2 <= radius**2


def _monai_reference(pred, label, spacing, n_classes):
    """MONAI on full, uncropped one-hot tensors (1, C, X, Y, Z), background excluded."""
    p = F.one_hot(torch.from_numpy(pred.astype(np.int64)), n_classes).permute(3, 0, 1, 2)[None]
    g = F.one_hot(torch.from_numpy(label.astype(np.int64)), n_classes).permute(3, 0, 1, 2)[None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dice = compute_dice(p, g, include_background=False)[0]
        hd95 = compute_hausdorff_distance(p, g, percentile=95, spacing=list(spacing))[0]
        assd = compute_average_surface_distance(p, g, symmetric=True, spacing=list(spacing))[0]
    return dice.numpy(), hd95.numpy(), assd.numpy()


@pytest.fixture(scope="module")
def handmade():
    """Two-case-ish label/pred pair with cubes and spheres on an anisotropic grid."""
    shape = (40, 36, 14)
    spacing = (0.8, 0.8, 3.0)
    label = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    label[5:15, 6:18, 3:9] = 1  # cube
    pred[6:16, 6:17, 4:10] = 1  # shifted, one voxel thinner
    label[_ball(shape, (27, 20, 7), 6.0, spacing)] = 2  # sphere
    pred[_ball(shape, (28, 19, 7), 5.0, spacing)] = 2  # smaller, shifted
    label[_ball(shape, (30, 6, 5), 2.0, spacing)] = 3  # tiny "lens"
    pred[_ball(shape, (30, 7, 5), 2.0, spacing)] = 3
    label[0:6, 28:36, 8:14] = 4  # touches the image border
    pred[0:5, 27:36, 9:14] = 4
    pred[20, 30, 2] = 4  # stray false-positive voxel
    return label, pred, spacing


def test_rows_match_monai_on_full_one_hot(handmade):
    label, pred, spacing = handmade
    n = 5  # classes 0..4
    rows = case_metrics(pred, label, spacing, CLASSES[:n], case_id="c1")
    assert [r["organ"] for r in rows] == CLASSES[1:n]
    assert all(tuple(r) == ROW_KEYS and r["status"] == "ok" and r["case_id"] == "c1" for r in rows)
    dice, hd95, assd = _monai_reference(pred, label, spacing, n)
    for i, r in enumerate(rows):
        assert r["dice"] == pytest.approx(float(dice[i]), abs=1e-6)
        assert r["hd95"] == pytest.approx(float(hd95[i]), rel=1e-6)
        assert r["assd"] == pytest.approx(float(assd[i]), rel=1e-6)
        assert r["n_ref"] == int((label == i + 1).sum())
        assert r["n_pred"] == int((pred == i + 1).sum())
    # sanity: the distances are in mm, not voxels (the z shift of the cube costs 3 mm, not 1)
    assert rows[0]["hd95"] >= 3.0 - 1e-6


def test_crop_is_identical_to_uncropped(handmade):
    label, pred, spacing = handmade
    rows = case_metrics(pred, label, spacing, CLASSES[:5])
    for c, r in enumerate(rows, start=1):
        full = binary_metrics(pred == c, label == c, spacing)  # MONAI on the whole volume
        assert (r["dice"], r["hd95"], r["assd"]) == pytest.approx(full, rel=1e-12, abs=1e-12)


def test_torch_and_channel_inputs_accepted(handmade):
    label, pred, spacing = handmade
    a = case_metrics(pred, label, spacing, CLASSES[:5])
    b = case_metrics(torch.from_numpy(pred[None].astype(np.int64)), label[None], list(spacing), CLASSES[:5])
    assert [(r["dice"], r["hd95"]) for r in a] == [(r["dice"], r["hd95"]) for r in b]
    with pytest.raises(ValueError):
        case_metrics(pred[:-1], label, spacing, CLASSES[:5])
    with pytest.raises(ValueError):
        case_metrics(pred, label, (1.0, 1.0), CLASSES[:5])


def test_offset_spheres_dice_matches_analytic_overlap():
    r, d = 15.0, 6.0
    shape = (56, 40, 40)
    c = (20.3, 19.6, 19.4)  # off-grid centres avoid lucky symmetric voxelisations
    label = _ball(shape, c, r).astype(np.uint8)
    pred = _ball(shape, (c[0] + d, c[1], c[2]), r).astype(np.uint8)
    (row,) = case_metrics(pred, label, (1.0, 1.0, 1.0), ["background", "organ"])
    v_overlap = math.pi * (4 * r + d) * (2 * r - d) ** 2 / 12
    v = 4 / 3 * math.pi * r**3
    analytic = 2 * v_overlap / (2 * v)
    assert row["status"] == "ok"
    assert row["dice"] == pytest.approx(analytic, rel=0.02)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 0.8, 2.0)])
def test_concentric_spheres_surface_distances_are_radius_difference(spacing):
    r1, r2 = 9.0, 15.0
    shape = tuple(int(math.ceil(2 * (r2 + 3) / s)) for s in spacing)
    center = tuple((n - 1) / 2 + 0.13 for n in shape)
    label = _ball(shape, center, r2, spacing).astype(np.uint8)
    pred = _ball(shape, center, r1, spacing).astype(np.uint8)
    (row,) = case_metrics(pred, label, spacing, ["background", "organ"])
    tol = max(spacing)  # about one voxel
    assert row["assd"] == pytest.approx(r2 - r1, abs=tol)
    assert row["hd95"] == pytest.approx(r2 - r1, abs=tol)
    if spacing[2] != spacing[0]:
        # ignoring the spacing gives voxel units and breaks the physical answer
        (wrong,) = case_metrics(pred, label, (1.0, 1.0, 1.0), ["background", "organ"])
        assert abs(wrong["assd"] - (r2 - r1)) > 1.0
        assert abs(row["assd"] - (r2 - r1)) < abs(wrong["assd"] - (r2 - r1))


def test_empty_mask_policy_and_unlabelled_classes():
    shape = (24, 20, 10)
    spacing = (0.8, 0.8, 3.0)
    label = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    label[2:8, 2:8, 2:6] = 1
    pred[3:8, 2:8, 2:6] = 1  # brainstem: ok
    label[12:16, 12:16, 3:5] = 2  # parotid_l: missed
    pred[18:20, 2:4, 7:9] = 3  # lens_l: false positive
    # mandible (4): absent in both
    label[15:20, 5:9, 1:3] = 5  # chiasm: present, but not labelled by this dataset
    pred[15:20, 5:9, 1:3] = 5
    labeled = [True, True, True, True, True, False]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no MONAI "all 0 -> nan/inf" warnings may leak
        rows = case_metrics(pred, label, spacing, CLASSES, labeled=labeled, case_id="a")
    by = {r["organ"]: r for r in rows}
    assert list(by) == ["brainstem", "parotid_l", "lens_l", "mandible"]  # no chiasm row
    diag = image_diagonal_mm(shape, spacing)
    assert diag == pytest.approx(math.sqrt((24 * 0.8) ** 2 + (20 * 0.8) ** 2 + (10 * 3.0) ** 2))

    assert by["brainstem"]["status"] == "ok" and 0 < by["brainstem"]["dice"] < 1
    m = by["parotid_l"]
    assert (m["status"], m["dice"], m["hd95"], m["assd"], m["n_ref"], m["n_pred"]) == (
        "missed",
        0.0,
        diag,
        diag,
        32,
        0,
    )
    fp = by["lens_l"]
    assert (fp["status"], fp["dice"], fp["hd95"], fp["assd"], fp["n_ref"], fp["n_pred"]) == (
        "false_positive",
        0.0,
        diag,
        diag,
        0,
        8,
    )
    ab = by["mandible"]
    assert ab["status"] == "absent" and (ab["n_ref"], ab["n_pred"]) == (0, 0)
    assert all(math.isnan(ab[k]) for k in ("dice", "hd95", "assd"))

    # a second case where everything is perfect, mandible included
    label2 = label.copy()
    label2[10:14, 14:18, 6:9] = 4
    rows2 = case_metrics(label2, label2, spacing, CLASSES, labeled=labeled, case_id="b")
    assert all(
        r["status"] == "ok" and r["dice"] == 1.0 and r["hd95"] == 0.0 for r in rows2 if r["organ"] != "lens_l"
    )
    assert next(r for r in rows2 if r["organ"] == "lens_l")["status"] == "absent"

    summary = summarize(rows + rows2)
    assert [s["organ"] for s in summary] == ["brainstem", "parotid_l", "lens_l", "mandible", "mean"]
    assert all(tuple(s) == SUMMARY_KEYS for s in summary)
    s = {x["organ"]: x for x in summary}
    # the absent mandible of case a does not count; the perfect case b does
    assert s["mandible"]["n"] == 1 and s["mandible"]["dice_mean"] == 1.0 and s["mandible"]["dice_std"] == 0.0
    # failures count: missed parotid (dice 0, diag) averaged with the perfect case b
    assert s["parotid_l"]["n"] == 2
    assert s["parotid_l"]["dice_mean"] == pytest.approx(0.5)
    assert s["parotid_l"]["hd95_mean"] == pytest.approx(diag / 2)
    assert s["parotid_l"]["dice_std"] == pytest.approx(0.5)
    # false positive in a, absent in b -> one counted case with the penalty
    assert s["lens_l"]["n"] == 1 and s["lens_l"]["dice_mean"] == 0.0 and s["lens_l"]["assd_mean"] == diag
    organ_means = [s[o]["dice_mean"] for o in ("brainstem", "parotid_l", "lens_l", "mandible")]
    assert s["mean"]["dice_mean"] == pytest.approx(np.mean(organ_means))
    assert s["mean"]["n"] == 4


def test_summarize_all_absent_organ_is_nan_without_warnings():
    rows = [
        {
            "case_id": "a",
            "organ": "x",
            "dice": math.nan,
            "hd95": math.nan,
            "assd": math.nan,
            "status": "absent",
        },
        {"case_id": "a", "organ": "y", "dice": 0.8, "hd95": 2.0, "assd": 1.0, "status": "ok"},
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = summarize(rows)
    x, y, mean = summary
    assert x["n"] == 0 and math.isnan(x["dice_mean"]) and math.isnan(x["hd95_std"])
    assert mean["organ"] == "mean" and mean["dice_mean"] == pytest.approx(0.8) and mean["n"] == 1


def test_write_report_files_and_valid_json(tmp_path, handmade):
    label, pred, spacing = handmade
    rows = case_metrics(pred, label, spacing, CLASSES, case_id="c1")  # chiasm absent
    rows += case_metrics(label, label, spacing, CLASSES, case_id="c2")
    paths = write_report(rows, tmp_path / "eval", title="Phantom test", extra={"checkpoint": "last.ckpt"})
    assert set(paths) == {"per_case", "per_organ", "report", "summary"}
    assert [p.name for p in paths.values()] == ["per_case.csv", "per_organ.csv", "report.md", "summary.json"]
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())
    assert sorted(x.name for x in (tmp_path / "eval").iterdir()) == sorted(p.name for p in paths.values())

    def no_nan(token):
        raise AssertionError(f"non-JSON constant {token}")

    doc = json.loads(paths["summary"].read_text(), parse_constant=no_nan)
    assert doc["policy"] == EMPTY_MASK_POLICY and doc["checkpoint"] == "last.ckpt"
    assert list(doc["per_organ"]) == CLASSES[1:]
    assert doc["per_organ"]["chiasm"]["dice_mean"] is None and doc["per_organ"]["chiasm"]["n"] == 0
    assert 0 < doc["per_organ"]["brainstem"]["dice_mean"] < 1
    assert doc["mean"]["dice_mean"] == pytest.approx(summarize(rows)[-1]["dice_mean"])

    lines = paths["per_case"].read_text().splitlines()
    assert lines[0].split(",") == list(ROW_KEYS) and len(lines) == 1 + len(rows)
    organ_lines = paths["per_organ"].read_text().splitlines()
    assert organ_lines[0].split(",") == list(SUMMARY_KEYS) and len(organ_lines) == 1 + 5 + 1

    md = paths["report"].read_text()
    assert md.startswith("# Phantom test")
    assert "| organ | Dice | HD95 (mm) | ASSD (mm) | n |" in md
    assert f"{EMPTY_MASK_POLICY}\n\n{HD95_DEFINITION}\n" in md  # the definition beside the policy
    assert doc["hd95_definition"] == HD95_DEFINITION
    assert re.search(r"\| brainstem \| 0\.\d{3} ± 0\.\d{3} \| \d+\.\d{2} ± \d+\.\d{2} \| ", md)
    assert "| chiasm | n/a | n/a | n/a | 0 |" in md


def _stated_hd95_assd(pred, ref, spacing):
    """HD95 and ASSD exactly as HD95_DEFINITION states them, with scipy and numpy only."""
    from scipy import ndimage

    def surface(m):
        return m & ~ndimage.binary_erosion(m)  # scipy's default structure: 6-connected

    sp, sr = surface(pred), surface(ref)
    to_ref = ndimage.distance_transform_edt(~sr, sampling=spacing)[sp]  # each pred surface voxel -> ref
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)[sr]
    hd95 = max(np.percentile(to_ref, 95), np.percentile(to_pred, 95))  # numpy's default: linear
    return hd95, np.concatenate([to_ref, to_pred]).mean()


@pytest.mark.parametrize("seed", range(6))
def test_hd95_is_what_the_reports_say(seed):
    """The definition printed in every report is the one computed, checked on the degenerate predictions
    where HD95 conventions part (tens of voxels, scattered) and on balls, on an anisotropic grid."""
    rng = np.random.default_rng(seed)
    spacing = (0.9, 1.3, 2.5)
    shape = (24, 22, 12)
    ref = _ball(shape, (11, 10, 6), 6.0, spacing)
    pred = np.zeros(shape, bool)
    if seed % 2:
        pred[tuple(rng.integers(0, s, 30) for s in shape)] = True  # a few tens of scattered voxels
    else:
        pred = _ball(shape, (11 + seed, 9, 6), 4.0 + seed / 2, spacing) | (rng.random(shape) < 0.01)
    _, hd95, assd = binary_metrics(pred, ref, spacing)
    want_hd95, want_assd = _stated_hd95_assd(pred, ref, spacing)
    assert hd95 == pytest.approx(want_hd95, rel=1e-5)
    assert assd == pytest.approx(want_assd, rel=1e-5)
    assert "larger of the two directed 95th percentiles" in HD95_DEFINITION
    assert "6-connected" in HD95_DEFINITION and "linear interpolation" in HD95_DEFINITION


def test_format_table_cells():
    table = format_table(
        [
            {
                "organ": "parotid_l",
                "n": 3,
                "dice_mean": 0.9123,
                "dice_std": 0.0214,
                "hd95_mean": 4.5,
                "hd95_std": 1.25,
                "assd_mean": 1.0,
                "assd_std": 0.5,
            },
            {
                "organ": "mean",
                "n": 1,
                "dice_mean": 0.9123,
                "dice_std": 0.0,
                "hd95_mean": 4.5,
                "hd95_std": 0.0,
                "assd_mean": 1.0,
                "assd_std": 0.0,
            },
        ]
    )
    lines = table.splitlines()
    assert lines[0] == "| organ | Dice | HD95 (mm) | ASSD (mm) | n |"
    assert lines[2] == "| parotid_l | 0.912 ± 0.021 | 4.50 ± 1.25 | 1.00 ± 0.50 | 3 |"
    assert lines[3].startswith("| mean | 0.912 ± 0.000 |")


def test_choose_slices_reaches_small_organs():
    areas = np.zeros((30, 4), np.int64)
    areas[5:25, 1] = 400  # big organ on many slices
    areas[8:12, 2] = 50  # medium organ
    areas[27, 3] = 3  # tiny organ on a single slice
    zs = choose_slices(areas, 2)
    assert len(zs) == 2 and 27 in zs and any(8 <= z < 12 for z in zs)
    assert choose_slices(np.zeros((10, 4), np.int64), 3) == [2, 4, 7]


def test_save_overlays_png(tmp_path, handmade):
    import matplotlib.image as mpimg

    label, pred, spacing = handmade
    rng = np.random.default_rng(0)
    image = (rng.normal(0, 30, label.shape) + 40.0 * label - 200).astype(np.float32)  # HU-ish
    areas = slice_areas(label, len(CLASSES))
    out = save_overlays(image, label, pred, CLASSES, tmp_path / "ov" / "c1.png", n_slices=3, spacing=spacing)
    assert out == tmp_path / "ov" / "c1.png" and out.is_file()
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    img = mpimg.imread(out)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 600
    assert float(img[..., :3].std()) > 0.05  # not a blank canvas
    assert areas[:, 1:].sum() > 0
    assert [p.name for p in (tmp_path / "ov").iterdir()] == ["c1.png"]  # no temp file left
    # normalised image, no prediction, explicit slices
    out2 = save_overlays(image / 1000.0, label, None, CLASSES, tmp_path / "c1b.png", slices=[5])
    assert mpimg.imread(out2).shape[0] > 100


IDENTITY = (1, 0, 0, 0, 1, 0, 0, 0, 1)
FLIPPED_XY = (-1, 0, 0, 0, -1, 0, 0, 0, 1)  # index x -> patient's right, y -> anterior
# index x -> anterior (-P), y -> patient's left (+L): a grid rotated 90 degrees in-plane
ROTATED = (0, 1, 0, -1, 0, 0, 0, 0, 1)


def test_axial_view_follows_the_direction_cosines():
    ident = axial_view(None)
    assert ident == axial_view(IDENTITY)
    assert (ident.horizontal, ident.flip_h, ident.flip_v) == (0, False, True)  # y=0 (anterior) on top
    assert (ident.left, ident.right, ident.top, ident.bottom) == ("R", "L", "A", "P")
    assert ident.radiological_axial
    flipped = axial_view(FLIPPED_XY)
    assert (flipped.horizontal, flipped.flip_h, flipped.flip_v) == (0, True, False)
    assert flipped.radiological_axial
    rot = axial_view(ROTATED)
    assert (rot.horizontal, rot.flip_h, rot.flip_v) == (1, False, False)
    assert rot.radiological_axial
    # a slightly oblique grid gets the nearest letters
    c, s_ = np.cos(0.2), np.sin(0.2)
    assert axial_view((c, -s_, 0, s_, c, 0, 0, 0, 1)) == ident
    # a sagittal acquisition (z index along left-right): anterior left, superior up
    sag = axial_view((0, 0, 1, 1, 0, 0, 0, -1, 0))
    assert (sag.left, sag.right, sag.top, sag.bottom) == ("A", "P", "S", "I")
    assert not sag.radiological_axial
    with pytest.raises(ValueError, match="direction"):
        axial_view((1, 0, 0))


def _panel(img):
    """Pixel box (r0, r1, c0, c1) of the single black image panel in a saved overlay."""
    dark = img[..., :3].max(axis=2) < 0.1
    rows, cols = dark.sum(axis=1), dark.sum(axis=0)
    r = np.flatnonzero(rows > 0.5 * rows.max())
    c = np.flatnonzero(cols > 0.5 * cols.max())
    return r[0], r[-1] + 1, c[0], c[-1] + 1


@pytest.mark.parametrize(
    "direction, where",
    [
        (None, "upper-right"),  # identity: anterior-left of the patient
        (IDENTITY, "upper-right"),
        (FLIPPED_XY, "lower-left"),  # the same voxels are now posterior-right
        (ROTATED, "upper-left"),  # large x = anterior, small y = patient's right
    ],
)
def test_overlay_is_radiological_and_contours_stay_on_the_image(tmp_path, direction, where):
    """A white marker at small y, large x (anterior-left for an identity LPS grid) lands where a
    clinician expects it; the reference contour hugs it; the panel keeps the physical aspect."""
    shape, spacing = (24, 16, 3), (1.0, 2.0, 2.5)
    image = np.zeros(shape, np.float32)
    label = np.zeros(shape, np.uint8)
    image[18:21, 2:4, :] = 1.0
    label[18:21, 2:4, :] = 1
    out = save_overlays(
        image, label, None, CLASSES[:2], tmp_path / "o.png", spacing=spacing, slices=[1], direction=direction
    )
    img = mpimg.imread(out)[..., :3]
    r0, r1, c0, c1 = _panel(img)
    ph, pw = r1 - r0, c1 - c0
    # physical aspect: 24 mm x 32 mm, drawn rotated for the rotated grid
    width, height = (24.0, 32.0) if where != "upper-left" else (32.0, 24.0)
    assert pw / ph == pytest.approx(width / height, rel=0.03)

    panel = img[r0:r1, c0:c1]
    white = np.argwhere(panel.min(axis=2) > 0.9)
    assert len(white) > 50
    fy, fx = white.mean(axis=0) / (ph, pw)  # blob centre as a fraction of the panel, from top-left
    vertical, horizontal = where.split("-")
    assert (fy < 0.5) == (vertical == "upper") and (fx > 0.5) == (horizontal == "right")
    # exact place: voxels 18..20 of 24 in x (centre 19.5), 2..3 of 16 in y (centre 3)
    expected = {"upper-right": (3 / 16, 19.5 / 24), "lower-left": (13 / 16, 4.5 / 24)}
    expected["upper-left"] = (4.5 / 24, 3 / 16)
    assert (fy, fx) == pytest.approx(expected[where], abs=0.02)

    # the class-1 contour (solid reference) traces the blob's edge to within 3 px (voxel >= 12 px)
    color = np.asarray(organ_colors(2)[1][:3])
    line = np.argwhere(np.abs(panel - color).max(axis=2) < 0.12)
    assert len(line) > 20
    (lr0, lc0), (lr1, lc1) = line.min(axis=0), line.max(axis=0)
    (wr0, wc0), (wr1, wc1) = white.min(axis=0), white.max(axis=0)
    assert lr0 <= wr0 and lc0 <= wc0 and lr1 >= wr1 and lc1 >= wc1
    assert max(wr0 - lr0, wc0 - lc0, lr1 - wr1, lc1 - wc1) <= 3
    assert pw / 24 >= 12 or ph / 24 >= 12

    # A/P/R/L markers: yellow text at the middle of each panel edge
    yellow = (panel[..., 0] > 0.8) & (panel[..., 1] > 0.8) & (panel[..., 2] < 0.3)
    band_h, band_w = max(ph // 12, 4), max(pw // 12, 4)
    mid_r, mid_c = slice(ph // 2 - band_h, ph // 2 + band_h), slice(pw // 2 - band_w, pw // 2 + band_w)
    for region in (
        yellow[:band_h, mid_c],
        yellow[-band_h:, mid_c],
        yellow[mid_r, :band_w],
        yellow[mid_r, -band_w:],
    ):
        assert region.sum() >= 5


def test_validation_images_use_the_cached_direction():
    """The W&B validation images look the case's direction up in the datamodule's caches."""

    class Reader:
        def __init__(self, directions):
            self.case_ids = list(directions)
            self._d = directions

        def geometry(self, case_id):
            return {"direction": self._d[case_id]}

    def trainer(*readers):
        return SimpleNamespace(datamodule=SimpleNamespace(readers=lambda: list(readers)))

    a = Reader({"c1": FLIPPED_XY, "c2": IDENTITY})
    assert case_direction(trainer(a), "c1") == FLIPPED_XY
    assert case_direction(trainer(a, Reader({"c1": FLIPPED_XY})), "c1") == FLIPPED_XY
    assert case_direction(trainer(a, Reader({"c1": IDENTITY})), "c1") is None  # ambiguous
    assert case_direction(trainer(a), "nope") is None
    assert case_direction(SimpleNamespace(datamodule=None), "c1") is None


def test_dice_only_mode_matches_full_dice_and_skips_distances():
    import math

    import numpy as np

    from organseg.evaluation.metrics import case_metrics

    rng = np.random.default_rng(3)
    label = np.zeros((24, 24, 8), np.uint8)
    label[4:14, 5:15, 2:6] = 1
    label[16:20, 16:21, 3:5] = 2
    pred = np.roll(label, 2, axis=0)
    pred[rng.random(pred.shape) < 0.01] = 2
    full = case_metrics(pred, label, (1.0, 1.0, 3.0), ["background", "a", "b"])
    quick = case_metrics(pred, label, (1.0, 1.0, 3.0), ["background", "a", "b"], distances=False)
    for f, q in zip(full, quick):
        assert math.isclose(f["dice"], q["dice"], rel_tol=1e-9)
        assert math.isnan(q["hd95"]) and math.isnan(q["assd"]) and not math.isnan(f["hd95"])
