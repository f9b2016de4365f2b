"""Synthetic abdominal CT with six organs (``organseg phantom abdomen``).

Canonical space as in :mod:`.hn` (millimetres, x = patient left, y = posterior, z = superior,
z = 0 mid-field): an elliptic body cross-section with a subcutaneous fat ring and abdominal
wall muscle, lower ribs, the lumbar/thoracolumbar spine (vertebral bodies with discs, arch,
canal), aorta and IVC, a textured mesenteric/bowel background (~35 HU, with a few gas pockets),
and the organs: liver (right-anterior, ~60 HU, with a left lobe across the midline), spleen
(left-posterior, ~50 HU), kidneys (paravertebral, contrast-enhanced cortex ~170 HU around a
~110 HU medulla), pancreas (a ribbon from the head in the duodenal C-loop across the midline in
front of the aorta to the tail at the splenic hilum, ~42 HU against 30-50 HU surroundings), and
stomach (left-anterior: 50 HU wall, fluid, and an anterior gas cap).  Per-case pose, per-organ
size/position jitter, intensity jitter, elastic deformation and noise as in :mod:`.common`.

Few-organ ("partially labelled") datasets
-----------------------------------------
``keep=[...]`` labels only the kept organs, with their *unified* class indices (liver stays 1,
pancreas stays 5); every other organ is written as background 0, as in LiTS or KiTS.  Each keep
set draws its cases from its own random stream, so different keep sets -- and the full set --
never share anatomy even with the same ``seed``:

* the full set (no ``keep``, or every organ kept) uses stream 0 and case ids ``abd_000`` ...;
* a keep set uses ``stream = keep_stream(keep)``, a stable hash (SHA-256) of the sorted organ
  names (never 0), and case ids carry the set tag: ``abd-liver_000``,
  ``abd-kidney_l-kidney_r_000``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from organseg.errors import ConfigError
from organseg.io.atomic import make_dirs
from organseg.phantom.common import default_workers, remove_stale_cases, run_cases, write_dataset_json

from .common import (
    Canvas,
    CaseResult,
    ElasticField,
    Ellipsoid,
    Grid,
    PhantomCase,
    Pose,
    Tissue,
    Tube,
    case_rng,
    check_args,
    jitter,
    label_counts,
    rotation_matrix,
    smooth_texture,
    write_image,
)

ABDOMEN_CLASSES = ["background", "liver", "spleen", "kidney_l", "kidney_r", "pancreas", "stomach"]
ABDOMEN_SMALL = ["pancreas"]
ABDOMEN_DEFAULT_SHAPE = (160, 128, 48)
ABDOMEN_DEFAULT_SPACING = (1.5, 1.5, 3.0)
ABDOMEN_TAG = "abd"
_C = {name: i for i, name in enumerate(ABDOMEN_CLASSES)}


def normalize_keep(keep: Iterable[str] | None) -> list[str] | None:
    """Sorted, de-duplicated kept organs; None for the full set (no keep, or all organs)."""
    if not keep:
        return None
    names = sorted(set(keep))
    bad = [n for n in names if n not in ABDOMEN_CLASSES[1:]]
    if bad:
        raise ConfigError(f"--keep: unknown organ(s) {bad}; choose from {ABDOMEN_CLASSES[1:]}")
    return None if len(names) == len(ABDOMEN_CLASSES) - 1 else names


def keep_stream(keep: Iterable[str] | None) -> int:
    """Random stream of a keep set: 0 for the full set, else a stable nonzero hash of the
    sorted organ names (identical on every machine and Python run)."""
    names = normalize_keep(keep)
    if names is None:
        return 0
    h = int.from_bytes(hashlib.sha256(",".join(names).encode()).digest()[:4], "little")
    return (h & 0x7FFFFFFF) | 1


def keep_tag(keep: Iterable[str] | None) -> str:
    """Case-id prefix: ``abd`` for the full set, ``abd-liver``, ``abd-kidney_l-kidney_r``, ..."""
    names = normalize_keep(keep)
    return ABDOMEN_TAG if names is None else "-".join([ABDOMEN_TAG, *names])


def abdomen_case_id(index: int, keep: Iterable[str] | None = None) -> str:
    return f"{keep_tag(keep)}_{index:03d}"


def _build(canvas: Canvas, rng: np.random.Generator) -> None:
    def sc(sd=0.05, lim=0.12):
        return 1.0 + jitter(rng, sd, lim, 3)

    def sh(sd=2.0, lim=4.0):
        return jitter(rng, sd, lim, 3)

    def hu(base, sd=3.0):
        return float(base + jitter(rng, sd, 2 * sd))

    # ---------------------------------------------------------------- intensities
    fat, muscle, bone = hu(-100, 8), hu(50, 4), hu(900, 60)
    mesentery, csf, blood = hu(35, 3), hu(10, 2), hu(150, 15)
    liver_hu, spleen_hu = hu(60, 5), hu(50, 4)
    cortex, medulla = hu(170, 12), hu(110, 10)
    pancreas_hu, stomach_wall, stomach_fluid = hu(42, 3), hu(50, 4), hu(15, 4)

    # ---------------------------------------------------------------- body wall
    b = sc(0.04, 0.08)
    fat_t = float(np.clip(rng.normal(15.0, 3.0), 8.0, 22.0))
    body_c, body_a = np.array([0, 4, 0]), np.array([112, 84, 1e4]) * np.array([b[0], b[1], 1])
    inner_a = body_a - np.array([fat_t, fat_t * 0.9, 0])
    cavity_a = inner_a - np.array([9, 8, 0])
    canvas.paint(Ellipsoid(body_c, body_a), Tissue(fat))
    canvas.paint(Ellipsoid(body_c, inner_a), Tissue(muscle))
    # peritoneal cavity: mesenteric fat mixed with collapsed bowel loops (a smooth field
    # around -30 HU, roughly -110..50)
    texture = smooth_texture(rng, amp=40.0, wavelength_mm=30.0, n=10)
    cavity = Ellipsoid(body_c, cavity_a)
    canvas.paint(cavity, Tissue(mesentery - 65.0))
    canvas.add_field(lambda x, y, z: cavity.radius(x, y, z) <= 1.0, texture, bbox_from=cavity)

    # lower ribs in the body wall (arcs of the inner ellipse, periodic in z)
    rib_phase = rng.uniform(0, 26)

    def ribs(x, y, z):
        rr = np.sqrt((x / inner_a[0]) ** 2 + ((y - body_c[1]) / inner_a[1]) ** 2)
        return (rr > 0.9) & (rr < 0.97) & (np.mod(z - rib_phase, 26.0) < 9.0) & (y > -45) & (z > -30)

    canvas.paint_region(ribs, Tissue(bone), bbox_from=Ellipsoid(body_c, inner_a))

    # paraspinal muscles and psoas
    for s in (-1, 1):
        canvas.paint(Ellipsoid((28 * s, 64, 0), (24, 17, 1e4)), Tissue(muscle))
        canvas.paint(
            Tube([(20 * s, 36, 40), (24 * s, 34, -200)], 9.0 * sc(0.05, 0.1)[0], (1, 1, 1)), Tissue(muscle)
        )

    # spine: arch ring, canal, spinous process, vertebral bodies with discs
    disc_phase = rng.uniform(0, 30)
    canvas.paint(Ellipsoid((0, 62, 0), (14, 13, 1e4)), Tissue(bone))
    canvas.paint(Ellipsoid((0, 72, 0), (4, 13, 1e4)), Tissue(bone))
    canvas.paint(Ellipsoid((0, 62, 0), (8, 8, 1e4)), Tissue(csf))
    vertebra = Ellipsoid((0, 40, 0), (19, 15, 1e4))
    canvas.paint(vertebra, Tissue(bone, core=hu(300, 30), split=0.82))
    canvas.paint(vertebra, Tissue(hu(90, 5)), where=lambda x, y, z: np.mod(z - disc_phase, 30.0) < 8.0)
    # great vessels
    aorta = Ellipsoid((6, 15, 0), np.array([10, 10, 1e4]) * sc(0.05, 0.1))
    ivc = Ellipsoid((-22, 16, 0), np.array([12, 9, 1e4]) * sc(0.05, 0.1))
    canvas.paint(aorta, Tissue(blood))
    canvas.paint(ivc, Tissue(blood - 25))
    keep_out = (vertebra, aorta, ivc)
    # bowel gas pockets (lower, anterior abdomen)
    n_gas = int(rng.integers(3, 8))
    for _ in range(n_gas):
        c = np.array([rng.uniform(-60, 70), rng.uniform(-60, -20), rng.uniform(-70, -10)])
        canvas.paint(Ellipsoid(c, rng.uniform(4, 11, 3)), Tissue(-950.0))

    # ---------------------------------------------------------------- organ geometry
    liver_c, liver_a = np.array([-46, -4, 14]) + sh(), np.array([50, 56, 56]) * sc()
    liver_rot = rotation_matrix(0, 0, jitter(rng, 4, 8))
    lobe_c, lobe_a = np.array([8, -38, 30]) + sh(), np.array([32, 20, 24]) * sc()
    spleen_c, spleen_a = np.array([64, 38, 24]) + sh(), np.array([18, 36, 40]) * sc()
    spleen_rot = rotation_matrix(0, 0, -40 + jitter(rng, 5, 10))
    kid = {}
    for s, z0 in ((1, -4), (-1, -14)):  # left kidney higher than the right
        c = np.array([52 * s, 46, z0]) + sh()
        a = np.array([22, 18, 50]) * sc()
        rot = rotation_matrix(0, 8 * s + jitter(rng, 3, 6), -20 * s + jitter(rng, 5, 10))
        kid[s] = (c, a, rot)
    st_c, st_a = np.array([44, -36, 30]) + sh(), np.array([34, 26, 38]) * sc()
    st_rot = rotation_matrix(0, 0, -30 + jitter(rng, 6, 12))
    pan_shift = sh(1.5, 3.0)
    pan_pts = np.array([(-22, 6, -6), (-2, -6, -2), (26, -2, 2), (56, 18, 6)], float) + pan_shift
    pan_r = np.array([12, 9, 8, 7]) * (1 + jitter(rng, 0.06, 0.12))
    pancreas = Tube(pan_pts, pan_r, (1, 1, 0.9))
    gas_level = float(rng.uniform(0.3, 0.6))

    # ---------------------------------------------------------------- tissue around organs
    duo = [(-34, -10, 14), (-40, 4, -4), (-30, 14, -22), (-8, 8, -28), (8, 2, -24)]
    # peripancreatic soft tissue (duodenum, jejunal loops, vessels): 30-50 HU around the pancreas
    peri = Tube(pan_pts, pan_r + 8.0, (1, 1, 0.9))

    def not_vessel(x, y, z):
        out = np.ones(x.shape, bool)
        for p in keep_out:
            out &= p.radius(x, y, z) > 1.0
        return out

    canvas.paint(peri, Tissue(mesentery + 3.0), where=not_vessel)
    peri_tex = smooth_texture(rng, amp=5.0, wavelength_mm=12.0)
    canvas.add_field(
        lambda x, y, z: (peri.radius(x, y, z) <= 1.0) & not_vessel(x, y, z), peri_tex, bbox_from=peri
    )
    canvas.paint(Tube(pan_pts + np.array([0, pan_r[1] * 0.9, 0]), 3.5), Tissue(blood - 10))  # splenic vein
    canvas.paint(
        Tube(np.array(duo, float) + pan_shift, 8.0), Tissue(hu(28, 4), core=stomach_fluid, split=0.6)
    )

    # ---------------------------------------------------------------- labelled organs
    def gas(x, y, z):  # anterior (non-dependent) part of the stomach lumen holds gas
        return y < st_c[1] - gas_level * st_a[1]

    organs = [
        ("stomach", [Ellipsoid(st_c, st_a, st_rot)], Tissue(stomach_wall, core=stomach_fluid, split=0.82)),
        ("liver", [Ellipsoid(liver_c, liver_a, liver_rot), Ellipsoid(lobe_c, lobe_a)], Tissue(liver_hu)),
        ("spleen", [Ellipsoid(spleen_c, spleen_a, spleen_rot)], Tissue(spleen_hu)),
        ("kidney_l", [Ellipsoid(*kid[1])], Tissue(cortex, core=medulla, split=0.7)),
        ("kidney_r", [Ellipsoid(*kid[-1])], Tissue(cortex, core=medulla, split=0.7)),
        ("pancreas", [pancreas], Tissue(pancreas_hu)),
    ]
    for name, prims, tissue in organs:
        canvas.paint(prims, tissue, label=_C[name])
        if name == "stomach":
            st = Ellipsoid(st_c, st_a * 0.82, st_rot)
            canvas.paint(st, Tissue(-1000.0), label=None, where=gas)
    # pancreas texture (lobulation) -- a few HU, keeps its contrast modest
    lob = smooth_texture(rng, amp=4.0, wavelength_mm=8.0)
    canvas.add_field(lambda x, y, z: pancreas.radius(x, y, z) <= 1.0, lob, bbox_from=pancreas)
    rescued: list[int] = []
    for name, prims, tissue in reversed(organs):
        had = bool((canvas.label == _C[name]).any())
        if not canvas.ensure_present(_C[name], prims, tissue, protect=rescued):
            canvas.missing.append(name)
        elif not had:
            rescued.append(_C[name])


def generate_abdomen_case(
    seed: int,
    index: int,
    keep: Iterable[str] | None = None,
    shape: Sequence[int] = ABDOMEN_DEFAULT_SHAPE,
    spacing: Sequence[float] = ABDOMEN_DEFAULT_SPACING,
) -> PhantomCase:
    """Generate abdominal case ``index``; with ``keep``, only those organs are labelled (unified
    indices) and the anatomy comes from the keep set's own stream (see the module docstring)."""
    names = normalize_keep(keep)
    grid = Grid(tuple(int(n) for n in shape), tuple(float(s) for s in spacing))
    rng = case_rng(seed, "abdomen", keep_stream(names), index)
    pose = Pose.random(rng, scale=0.08, shift_mm=(8.0, 6.0, 6.0), rot_deg=(2.0, 2.0, 4.0))
    noise_sd = rng.uniform(10.0, 15.0)
    elastic = ElasticField.random(rng, sd_mm=(2.5, 2.5, 1.5), max_mm=(5.0, 5.0, 3.0))
    anatomy_rng = np.random.Generator(np.random.PCG64(rng.integers(0, 2**63)))
    noise_rng = np.random.Generator(np.random.PCG64(rng.integers(0, 2**63)))
    canvas = Canvas(grid, pose, elastic)
    _build(canvas, anatomy_rng)
    image = canvas.finish(noise_rng, noise_sd)
    label = canvas.label
    classes = list(ABDOMEN_CLASSES)
    if names is not None:
        lut = np.zeros(256, np.uint8)
        for n in names:
            lut[_C[n]] = _C[n]
        label = lut[label]
    missing = [m for m in canvas.missing if names is None or m in names]
    return PhantomCase(abdomen_case_id(index, names), image, label, grid, classes, missing)


def _write_abdomen_case(out: str, seed: int, index: int, keep, shape, spacing) -> CaseResult:
    case = generate_abdomen_case(seed, index, keep, shape, spacing)
    out_p = Path(out)
    img_p = out_p / "imagesTr" / f"{case.case_id}_0000.nii.gz"
    lab_p = out_p / "labelsTr" / f"{case.case_id}.nii.gz"
    write_image(case.image, case.grid, img_p)
    write_image(case.label, case.grid, lab_p)
    return CaseResult(
        case.case_id, label_counts(case.label, ABDOMEN_CLASSES), case.missing, [str(img_p), str(lab_p)]
    )


def write_abdomen_dataset(
    out: str | Path,
    cases: int,
    seed: int,
    keep: Iterable[str] | None = None,
    shape: Sequence[int] = ABDOMEN_DEFAULT_SHAPE,
    spacing: Sequence[float] = ABDOMEN_DEFAULT_SPACING,
    workers: int | None = None,
    quiet: bool = False,
) -> list[CaseResult]:
    """Write ``cases`` abdominal cases to ``out`` in the nnU-Net raw layout.  With ``keep``,
    ``dataset.json`` lists background plus the kept organs (unified indices) only."""

    check_args(cases, shape, spacing)
    names = normalize_keep(keep)
    out = make_dirs(out)
    workers = default_workers() if workers is None else max(1, int(workers))
    tag = keep_tag(names)
    jobs = [
        (str(out), int(seed), i, names, tuple(int(n) for n in shape), tuple(float(s) for s in spacing))
        for i in range(cases)
    ]
    results = run_cases(
        _write_abdomen_case, jobs, workers, f"abdomen phantom {tag} ({cases} cases)", quiet=quiet
    )
    remove_stale_cases(out, tag, {r.case_id for r in results})
    kept = list(ABDOMEN_CLASSES[1:]) if names is None else names
    labels = {"background": 0, **{n: _C[n] for n in ABDOMEN_CLASSES[1:] if n in kept}}
    write_dataset_json(
        out,
        "abdomen_phantom" if names is None else f"abdomen_phantom-{'-'.join(names)}",
        labels,
        cases,
        {
            "description": "organseg synthetic abdominal CT phantom"
            + ("" if names is None else f" (only {', '.join(names)} labelled)"),
            "generator": "organseg.phantom.abdomen",
            "version": 1,
            "seed": int(seed),
            "stream": keep_stream(names),
            "tag": tag,
            "shape": list(map(int, shape)),
            "spacing": list(map(float, spacing)),
            "classes": list(ABDOMEN_CLASSES),
            "kept": kept,
            "small": list(ABDOMEN_SMALL),
            "case_ids": [r.case_id for r in results],
        },
    )
    return results
