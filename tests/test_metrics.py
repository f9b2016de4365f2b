"""Per-organ metrics (MONAI agreement, analytic geometry, crop invariance, empty-mask policy),
reports and overlay PNGs."""

from __future__ import annotations

import json
import math
import re
import warnings

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
    case_metrics,
    format_table,
    image_diagonal_mm,
    save_overlays,
    summarize,
    write_report,
)
from organseg.evaluation.metrics import ROW_KEYS, SUMMARY_KEYS, binary_metrics
from organseg.evaluation.overlays import choose_slices, slice_areas

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
    assert EMPTY_MASK_POLICY in md
    assert re.search(r"\| brainstem \| 0\.\d{3} ± 0\.\d{3} \| \d+\.\d{2} ± \d+\.\d{2} \| ", md)
    assert "| chiasm | n/a | n/a | n/a | 0 |" in md


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
