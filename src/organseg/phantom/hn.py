"""Synthetic head-and-neck CT with 17 organs at risk (``organseg phantom hn``).

The anatomy is a set of analytic solids defined in millimetres around the head (canonical
space: x = patient left, y = posterior, z = superior; z = 0 is the middle of the default
144 mm field of view, which runs from the neck below the submandibular glands to the top of the
temporal lobes).  Each case draws, from its own random stream (see :mod:`.common`):

* a global pose: scale +-10 %, translation +-10 mm in-plane and +-6 mm (two default slices) in z,
  rotation up to 3 degrees about x and y and 4 degrees about z;
* per-organ size (+-12 %, small organs +-8 %) and position (a few mm) jitter, drawn separately
  for left and right organs;
* tissue intensities (a few HU each) and the noise level (10-15 HU);
* a smooth elastic displacement (B-spline, 36 mm lattice, up to 4 mm in-plane, 2.5 mm in z)
  shared by labels and intensities.

Intensities (HU, before jitter): air -1000, subcutaneous fat -100, muscle 45, brain 33,
CSF 9, cortical bone 1150-1350 (mandible marrow 500, vertebral bodies 750), vitreous 10 with a
50 HU sclera, lens 105, parotid 5 (fatty), submandibular 50 in a fat pad, pituitary 50 in the
bony sella.  The optic nerves (brain + 2-5 HU, in ~28 HU orbital tissue) and the chiasm
(brain + 3-6 HU, surrounded by brain) are deliberately low-contrast.

Labels never overlap: organs are painted in a fixed priority (small organs last, i.e. on top),
and an organ that rasterises to zero voxels (very coarse grids) receives the voxel deepest inside
its solid, so every organ is present in every case whose field of view contains it.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    write_image,
)

HN_CLASSES = [
    "background",
    "brainstem",
    "spinal_cord",
    "mandible",
    "parotid_l",
    "parotid_r",
    "submandibular_l",
    "submandibular_r",
    "temporal_lobe_l",
    "temporal_lobe_r",
    "eye_l",
    "eye_r",
    "lens_l",
    "lens_r",
    "optic_nerve_l",
    "optic_nerve_r",
    "chiasm",
    "pituitary",
]
HN_SMALL = ["lens_l", "lens_r", "optic_nerve_l", "optic_nerve_r", "chiasm", "pituitary"]
HN_DEFAULT_SHAPE = (192, 192, 48)
HN_DEFAULT_SPACING = (1.0, 1.0, 3.0)

# PDDCA structure file stem -> organseg class name (the first nine are PDDCA's own names)
PDDCA_NAMES = {
    "BrainStem": "brainstem",
    "Chiasm": "chiasm",
    "Mandible": "mandible",
    "OpticNerve_L": "optic_nerve_l",
    "OpticNerve_R": "optic_nerve_r",
    "Parotid_L": "parotid_l",
    "Parotid_R": "parotid_r",
    "Submandible_L": "submandibular_l",
    "Submandible_R": "submandibular_r",
    "SpinalCord": "spinal_cord",
    "TemporalLobe_L": "temporal_lobe_l",
    "TemporalLobe_R": "temporal_lobe_r",
    "Eye_L": "eye_l",
    "Eye_R": "eye_r",
    "Lens_L": "lens_l",
    "Lens_R": "lens_r",
    "Pituitary": "pituitary",
}

HN_TAG = "hn"
_C = {name: i for i, name in enumerate(HN_CLASSES)}


def hn_case_id(index: int) -> str:
    return f"{HN_TAG}_{index:03d}"


def _skull_base(x, y):
    """Height (canonical z, mm) of the cranial-cavity floor over (x, y): anterior fossa above the
    orbits, sella/middle fossa (lower laterally for the temporal lobes), the clivus ramp and the
    posterior fossa, with the foramen magnum as a hole."""
    ax = np.abs(x)
    zmid = np.float32(12.0) + np.float32(-14.0) * np.clip((ax - 10.0) / 12.0, 0.0, 1.0)
    a = np.clip((y + 32.0) / 12.0, 0.0, 1.0)
    b = np.clip((y - 4.0) / 12.0, 0.0, 1.0)
    zb = np.float32(33.0) + (zmid - np.float32(33.0)) * a
    zb = zb + (np.float32(-24.0) - zb) * b
    hole = x * x + (y - 28.0) ** 2 < 14.0**2
    return np.where(hole, np.float32(-300.0), zb)


def _build(canvas: Canvas, rng: np.random.Generator) -> None:
    """Draw the case's anatomy from ``rng`` (fixed order) and paint it on ``canvas``."""

    def sc(sd=0.05, lim=0.12):
        return 1.0 + jitter(rng, sd, lim, 3)

    def sh(sd=1.2, lim=3.0):
        return jitter(rng, sd, lim, 3)

    def hu(base, sd=3.0):
        return float(base + jitter(rng, sd, 2 * sd))

    # ---------------------------------------------------------------- tissue intensities
    fat, soft, bone = hu(-100, 8), hu(45, 4), hu(1150, 60)
    brain, csf, orbit_t = hu(33, 1.5), hu(9, 2), hu(28, 2)
    chiasm_hu = brain + rng.uniform(3.0, 6.0)
    nerve_hu = brain + rng.uniform(2.0, 5.0)
    lens_hu, vitreous, sclera = hu(105, 6), hu(10, 2), hu(50, 4)
    parotid_hu, smg_hu, pit_hu = hu(5, 5), hu(50, 4), hu(50, 4)
    stem_hu, cord_hu, temporal_hu = hu(37, 2), hu(38, 2), brain + rng.uniform(2.0, 5.0)
    mandible = Tissue(hu(1350, 80), core=hu(500, 50), split=0.55)

    # ---------------------------------------------------------------- body, fat, airways
    b = sc(0.03, 0.06)
    f = float(np.clip(rng.normal(5.0, 1.0), 3.0, 8.0))  # subcutaneous fat thickness
    head_c, head_a = (0, 5, 30), np.array([73, 89, 84]) * b
    face_c, face_a = (0, -40, 10), np.array([55, 48, 40]) * b
    jaw_c, jaw_a = (0, -8, -22), np.array([64, 72, 36]) * b
    neck_pts, neck_r, neck_x = [(0, 10, -30), (0, 10, -600)], 49 * b[1], 58 * b[0]
    outer = [
        Ellipsoid(head_c, head_a),
        Ellipsoid(face_c, face_a),
        Ellipsoid(jaw_c, jaw_a),
        Tube(neck_pts, neck_r, (neck_x / neck_r, 1, 1)),
    ]
    inner = [
        Ellipsoid(head_c, head_a - f),
        Ellipsoid(face_c, face_a - f),
        Ellipsoid(jaw_c, jaw_a - f),
        Tube(neck_pts, neck_r - f, ((neck_x - f) / (neck_r - f), 1, 1)),
    ]
    canvas.paint(outer, Tissue(fat))
    canvas.paint(inner, Tissue(soft))
    canvas.paint(
        Ellipsoid((0, -40, -24), np.array([22, 26, 11]) * sc(0.04, 0.08)), Tissue(hu(62, 4))
    )  # tongue
    for s in (-1, 1):  # maxillary sinuses with bony walls
        c = np.array([24 * s, -44, 0]) + sh()
        a = np.array([12, 15, 13]) * sc()
        canvas.paint(Ellipsoid(c, a + 2.5), Tissue(bone))
        canvas.paint(Ellipsoid(c, a), Tissue(-1000.0))
    canvas.paint(
        Ellipsoid((0, -55, 2), np.array([7, 24, 14]) * sc(0.04, 0.08)), Tissue(-1000.0)
    )  # nasal cavity
    canvas.paint(
        Ellipsoid((0, -20, -4), np.array([12, 10, 8]) * sc(0.04, 0.08)), Tissue(-1000.0)
    )  # nasopharynx
    canvas.paint(
        Tube([(0, -18, -6), (0, -13, -40), (0, -15, -600)], 6.5 * sc(0.05, 0.1)[0]), Tissue(-1000.0)
    )  # pharynx / trachea

    # ---------------------------------------------------------------- skull and brain
    skull_c, skull_a = np.array([0, 6, 40]), np.array([67, 83, 70]) * b
    thick = float(np.clip(rng.normal(6.5, 0.7), 5.0, 8.0))
    e_out, e_in = Ellipsoid(skull_c, skull_a), Ellipsoid(skull_c, skull_a - thick)

    def skull_where(x, y, z):
        zb = _skull_base(x, y)
        return (z > zb - 6.0) & (zb > -100)

    canvas.paint(e_out, Tissue(bone), where=skull_where)
    canvas.paint(e_in, Tissue(brain), where=lambda x, y, z: z > _skull_base(x, y))
    for s in (-1, 1):  # lateral ventricles
        canvas.paint(Ellipsoid((9 * s, 8, 52), np.array([6, 24, 8]) * sc()), Tissue(csf))
    canvas.paint(Ellipsoid((0, 8, 36), (2.5, 10, 7)), Tissue(csf))  # third ventricle

    # sphenoid body with its sinus, clivus (the skull-base plate) and the sella
    canvas.paint(Ellipsoid((0, -10, 2), np.array([15, 16, 9]) * sc(0.03, 0.06)), Tissue(bone))
    canvas.paint(Ellipsoid((0, -15, 1), np.array([10, 9, 5.5]) * sc(0.04, 0.08)), Tissue(-1000.0))

    # ---------------------------------------------------------------- organ geometry
    # (all geometry is drawn before painting the organs, in a fixed order)
    stem_c = np.array([0, 26, 5]) + sh()
    stem_a = np.array([14, 13, 27]) * sc()
    stem_rot = rotation_matrix(15 + jitter(rng, 2, 4), 0, 0)  # top tilted anteriorly
    cord_r = 4.6 * sc(0.04, 0.08)[0]
    cy = 29.5 + jitter(rng, 1.0, 2.0)
    cord_pts = [(0, cy, -14), (0, cy + 1.5, -60), (0, cy, -600)]

    temporal = {}
    for s in (1, -1):
        temporal[s] = (np.array([40 * s, 6, 29]) + sh(), np.array([19, 42, 27]) * sc(0.04, 0.1))
    parotid = {}
    for s in (1, -1):
        parotid[s] = (np.array([48 * s, 17, -22]) + sh(), np.array([10, 15, 16]) * sc())
    smg = {}
    for s in (1, -1):
        smg[s] = (np.array([27 * s, -22, -48]) + sh(), np.array([10, 13, 9]) * sc())

    # mandible: U-shaped body (a tube along a parabola) and two rami
    chin_y = -66 + jitter(rng, 1.5, 3.0)
    half_w = 42 * b[0] + jitter(rng, 1.0, 2.0)
    body_z = -32 + jitter(rng, 1.0, 2.0)
    xs = np.linspace(-half_w, half_w, 15)
    arch = [(x, chin_y + (-4 - chin_y) * (x / half_w) ** 2, body_z) for x in xs]
    mand_body = Tube(arch, 5.0 * sc(0.04, 0.08)[0], (1, 1, 2.4))
    rami = [
        Ellipsoid(
            np.array([(half_w + 1) * s, 2, body_z + 10]) + sh(0.8, 1.5),
            np.array([3.5, 12, 18]) * sc(),
            rotation_matrix(-12, 0, 5 * s),
        )
        for s in (1, -1)
    ]

    eyes, lenses, nerves = {}, {}, {}
    for s in (1, -1):
        ec = np.array([31 * s, -62, 17]) + sh(0.8, 1.5)
        ea = np.full(3, 12.0) * (1 + jitter(rng, 0.04, 0.08))
        eyes[s] = (ec, ea)
        la = np.array([3.2, 1.4, 3.2]) * (1 + jitter(rng, 0.03, 0.06))
        lenses[s] = (ec + np.array([0, -(ea[1] - la[1] - 1.0), 0]), la)
    chiasm_c = np.array([0, -10, 19]) + sh(0.8, 1.5)
    chiasm_a = np.array([7.5, 4.5, 2.5]) * sc(0.04, 0.08)
    pit_c = np.array([0, -3, 11]) + sh(0.6, 1.2)
    pit_a = np.array([6, 4.5, 3.0]) * sc(0.04, 0.08)
    gap = (chiasm_c[2] - chiasm_a[2]) - (pit_c[2] + pit_a[2])
    if gap < 1.5:  # keep the chiasm above the pituitary (the stalk between them)
        chiasm_c[2] += 1.5 - gap
    nerve_r = 1.6 * (1 + jitter(rng, 0.04, 0.08))
    for s in (1, -1):
        ec, ea = eyes[s]
        start = ec + np.array([-2.0 * s, ea[1] - 1.0, 0])
        end = chiasm_c + np.array([(chiasm_a[0] - 2.0) * s, -chiasm_a[1] + 1.0, 0])
        mid = 0.5 * (start + end) + np.array([3.0 * s, 0, 0.5])
        nerves[s] = Tube([start, mid, end], nerve_r)

    # ---------------------------------------------------------------- tissue around organs
    canvas.paint(
        Ellipsoid(pit_c, pit_a + np.array([3.5, 3.5, 3.0])),
        Tissue(bone),
        where=lambda x, y, z: z < pit_c[2] + pit_a[2] * 0.6,
    )  # sella turcica
    for s in (1, -1):  # orbits: bony wall open anteriorly, then orbital tissue
        ec = eyes[s][0]
        oc = ec + np.array([-2.0 * s, 8.0, 0])
        canvas.paint(Ellipsoid(oc, (19, 25, 18)), Tissue(bone), where=lambda x, y, z, ey=ec[1]: y > ey - 4)
        canvas.paint(Ellipsoid(oc, (16, 22, 15)), Tissue(orbit_t))
    for s in (1, -1):  # sylvian fissure / CSF around the temporal lobes
        c, a = temporal[s]
        canvas.paint(Ellipsoid(c, a + 2.5), Tissue(csf), where=lambda x, y, z: z > _skull_base(x, y))
    canvas.paint(Ellipsoid(stem_c, stem_a + 3.0, stem_rot), Tissue(csf))  # prepontine cistern
    for s in (1, -1):
        c, a = smg[s]
        canvas.paint(Ellipsoid(c, a + 3.0), Tissue(hu(-70, 8)))  # fat pads

    # cervical spine: arch ring, vertebral bodies with discs, spinous processes, canal
    disc_phase = rng.uniform(0, 16)
    spine_top = -26.0
    body_pts = [(0, cy - 19, spine_top), (0, cy - 18, -60), (0, cy - 19, -600)]
    canvas.paint(Tube([(0, cy, spine_top), (0, cy + 1.5, -60), (0, cy, -600)], 12.0), Tissue(bone))
    canvas.paint(Tube([(0, cy + 16, spine_top - 4), (0, cy + 17, -600)], 3.0, (1, 2.5, 1)), Tissue(bone))

    def discs(x, y, z):
        return np.mod(z - disc_phase, 16.0) < 4.0

    canvas.paint(Tube(body_pts, 9.0, (1.4, 1, 1)), Tissue(1150.0, core=hu(750, 40), split=0.8))
    canvas.paint(Tube(body_pts, 9.0, (1.4, 1, 1)), Tissue(hu(90, 5)), where=discs)
    canvas.paint(Tube([(0, cy, -12), (0, cy + 1.5, -60), (0, cy, -600)], 7.5), Tissue(csf))

    # ---------------------------------------------------------------- labelled organs
    # priority (low -> high): later organs win, small organs last
    organs: list[tuple[str, list, Tissue]] = [
        ("spinal_cord", [Tube(cord_pts, cord_r, (1.15, 1, 1))], Tissue(cord_hu)),
        ("brainstem", [Ellipsoid(stem_c, stem_a, stem_rot)], Tissue(stem_hu)),
        ("temporal_lobe_l", [Ellipsoid(*temporal[1])], Tissue(temporal_hu)),
        ("temporal_lobe_r", [Ellipsoid(*temporal[-1])], Tissue(temporal_hu)),
        ("parotid_l", [Ellipsoid(*parotid[1])], Tissue(parotid_hu)),
        ("parotid_r", [Ellipsoid(*parotid[-1])], Tissue(parotid_hu)),
        ("submandibular_l", [Ellipsoid(*smg[1])], Tissue(smg_hu)),
        ("submandibular_r", [Ellipsoid(*smg[-1])], Tissue(smg_hu)),
        ("mandible", [mand_body, *rami], mandible),
        ("optic_nerve_l", [nerves[1]], Tissue(nerve_hu)),
        ("optic_nerve_r", [nerves[-1]], Tissue(nerve_hu)),
        ("chiasm", [Ellipsoid(chiasm_c, chiasm_a)], Tissue(chiasm_hu)),
        ("eye_l", [Ellipsoid(*eyes[1])], Tissue(sclera, core=vitreous, split=0.85)),
        ("eye_r", [Ellipsoid(*eyes[-1])], Tissue(sclera, core=vitreous, split=0.85)),
        ("lens_l", [Ellipsoid(*lenses[1])], Tissue(lens_hu)),
        ("lens_r", [Ellipsoid(*lenses[-1])], Tissue(lens_hu)),
        ("pituitary", [Ellipsoid(pit_c, pit_a)], Tissue(pit_hu)),
    ]
    for name, prims, tissue in organs:
        canvas.paint(prims, tissue, label=_C[name])
    # organs that vanished (coarse grids, or overdrawn by a higher-priority organ): highest
    # priority first so a rescued voxel is never overwritten by a later rescue
    rescued: list[int] = []
    for name, prims, tissue in reversed(organs):
        n_before = int((canvas.label == _C[name]).any())
        if not canvas.ensure_present(_C[name], prims, tissue, protect=rescued):
            canvas.missing.append(name)
        elif not n_before:
            rescued.append(_C[name])


def generate_hn_case(
    seed: int,
    index: int,
    shape: Sequence[int] = HN_DEFAULT_SHAPE,
    spacing: Sequence[float] = HN_DEFAULT_SPACING,
    stream: int = 0,
) -> PhantomCase:
    """Generate head-and-neck case ``index`` of the dataset with this ``seed``.

    The anatomy depends only on (seed, stream, index); ``shape``/``spacing`` choose the voxel
    grid (centred on the head) it is rasterised on.
    """
    grid = Grid(tuple(int(n) for n in shape), tuple(float(s) for s in spacing))
    rng = case_rng(seed, "hn", stream, index)
    pose = Pose.random(rng, scale=0.10, shift_mm=(10.0, 10.0, 6.0), rot_deg=(3.0, 3.0, 4.0))
    noise_sd = rng.uniform(10.0, 15.0)
    elastic = ElasticField.random(rng, sd_mm=(2.0, 2.0, 1.2), max_mm=(4.0, 4.0, 2.5))
    anatomy_rng = np.random.Generator(np.random.PCG64(rng.integers(0, 2**63)))
    noise_rng = np.random.Generator(np.random.PCG64(rng.integers(0, 2**63)))
    canvas = Canvas(grid, pose, elastic)
    _build(canvas, anatomy_rng)
    image = canvas.finish(noise_rng, noise_sd)
    return PhantomCase(hn_case_id(index), image, canvas.label, grid, list(HN_CLASSES), list(canvas.missing))


# ----------------------------------------------------------------------------- writing
def _write_hn_case(out: str, seed: int, index: int, shape, spacing, layout: str) -> CaseResult:
    case = generate_hn_case(seed, index, shape, spacing)
    out_p = Path(out)
    files = []
    if layout == "nnunet":
        img_p = out_p / "imagesTr" / f"{case.case_id}_0000.nii.gz"
        lab_p = out_p / "labelsTr" / f"{case.case_id}.nii.gz"
        write_image(case.image, case.grid, img_p)
        write_image(case.label, case.grid, lab_p)
        files = [str(img_p), str(lab_p)]
    elif layout == "pddca":
        d = out_p / case.case_id
        write_image(case.image, case.grid, d / "img.nrrd")
        files.append(str(d / "img.nrrd"))
        for stem, cls in PDDCA_NAMES.items():
            p = d / "structures" / f"{stem}.nrrd"
            write_image((case.label == _C[cls]).astype(np.uint8), case.grid, p)
            files.append(str(p))
    else:
        raise ConfigError(f"unknown layout {layout!r} (nnunet or pddca)")
    return CaseResult(case.case_id, label_counts(case.label, HN_CLASSES), case.missing, files)


def write_hn_dataset(
    out: str | Path,
    cases: int,
    seed: int,
    shape: Sequence[int] = HN_DEFAULT_SHAPE,
    spacing: Sequence[float] = HN_DEFAULT_SPACING,
    layout: str = "nnunet",
    workers: int | None = None,
    quiet: bool = False,
) -> list[CaseResult]:
    """Write ``cases`` head-and-neck cases to ``out`` in the nnU-Net raw layout
    (``imagesTr/hn_000_0000.nii.gz``, ``labelsTr/hn_000.nii.gz``, ``dataset.json``) or the PDDCA
    layout (``hn_000/img.nrrd``, ``hn_000/structures/<PDDCA name>.nrrd``, see ``PDDCA_NAMES``)."""

    check_args(cases, shape, spacing)
    if layout not in ("nnunet", "pddca"):
        raise ConfigError(f"unknown layout {layout!r} (nnunet or pddca)")
    out = make_dirs(out)
    workers = default_workers() if workers is None else max(1, int(workers))
    jobs = [
        (str(out), int(seed), i, tuple(int(n) for n in shape), tuple(float(s) for s in spacing), layout)
        for i in range(cases)
    ]
    results = run_cases(_write_hn_case, jobs, workers, f"hn phantom ({cases} cases)", quiet=quiet)
    if layout == "nnunet":
        remove_stale_cases(out, HN_TAG, {r.case_id for r in results})
        write_dataset_json(
            out,
            "hn_phantom",
            {name: i for i, name in enumerate(HN_CLASSES)},
            cases,
            {
                "description": "organseg synthetic head-and-neck CT phantom",
                "generator": "organseg.phantom.hn",
                "version": 1,
                "seed": int(seed),
                "stream": 0,
                "shape": list(map(int, shape)),
                "spacing": list(map(float, spacing)),
                "classes": list(HN_CLASSES),
                "kept": list(HN_CLASSES[1:]),
                "small": list(HN_SMALL),
                "case_ids": [r.case_id for r in results],
            },
        )
    return results


# ----------------------------------------------------------------------------- a planning-system export
#: how people type each organ's structure name in planning systems (TG-263 names, sides before/after,
#: Lt/Left/L, upper case, spaces): case ``i`` uses variant ``(i + organ index) % len`` so a folder of
#: exports mixes them, as real ones do (``organseg phantom hn --dicom``; read back by ``layout: dicom_rt``)
CLINICAL_NAMES = {
    "brainstem": ["Brainstem", "BrainStem", "BRAIN STEM"],
    "spinal_cord": ["SpinalCord", "Spinal Cord", "CORD"],
    "mandible": ["Bone_Mandible", "Mandible", "MANDIBLE"],
    "parotid_l": ["Parotid_L", "L Parotid", "PAROTID LT", "Lt_Parotid", "parotid left"],
    "parotid_r": ["Parotid_R", "R Parotid", "PAROTID RT", "Rt_Parotid", "parotid right"],
    "submandibular_l": ["Glnd_Submand_L", "L Submandibular", "SMG_Lt"],
    "submandibular_r": ["Glnd_Submand_R", "R Submandibular", "SMG_Rt"],
    "temporal_lobe_l": ["Lobe_Temporal_L", "Temporal Lobe L", "LT TEMPORAL LOBE"],
    "temporal_lobe_r": ["Lobe_Temporal_R", "Temporal Lobe R", "RT TEMPORAL LOBE"],
    "eye_l": ["Eye_L", "L Eye", "Globe Left"],
    "eye_r": ["Eye_R", "R Eye", "Globe Right"],
    "lens_l": ["Lens_L", "LENS LT", "lens left"],
    "lens_r": ["Lens_R", "LENS RT", "lens right"],
    "optic_nerve_l": ["OpticNrv_L", "L Optic Nerve", "OPTIC NERVE LT"],
    "optic_nerve_r": ["OpticNrv_R", "R Optic Nerve", "OPTIC NERVE RT"],
    "chiasm": ["OpticChiasm", "Chiasm", "optic chiasm"],
    "pituitary": ["Pituitary", "Hypophysis", "PITUITARY GLAND"],
}


def clinical_names(index: int) -> list[str]:
    """``HN_CLASSES`` as case ``index``'s export names them (index 0, background, stays)."""
    return ["background"] + [
        CLINICAL_NAMES[c][(index + k) % len(CLINICAL_NAMES[c])] for k, c in enumerate(HN_CLASSES[1:])
    ]


def write_hn_rtstruct(label, ct_files: Sequence, path: str | Path, index: int) -> list[str]:
    """An RTSTRUCT for the CT series ``ct_files`` as a planning system exports it: every organ of ``label``
    (an HN_CLASSES label map on the series' grid) under a clinical name (``clinical_names``), plus what
    such exports also hold and no organ-at-risk model should learn: a brainstem PRV, a PTV around the
    left parotid, a "z_" optimisation helper, the external outline, both parotids as one structure (no
    side: "unmatched") and an empty structure."""
    from scipy import ndimage  # noqa: PLC0415 - only the DICOM export needs it

    from organseg.io.dicom import read_headers  # noqa: PLC0415 - pydicom/rt-utils for --dicom only
    from organseg.io.geometry import image_to_xyz  # noqa: PLC0415
    from organseg.io.rtstruct import write_rtstruct  # noqa: PLC0415

    lab = image_to_xyz(label)
    ball = ndimage.generate_binary_structure(3, 1)
    extra = [
        ("Brainstem_PRV03", ndimage.binary_dilation(lab == _C["brainstem"], ball, iterations=2)),
        ("PTV_7000", ndimage.binary_dilation(lab == _C["parotid_l"], ball, iterations=3)),
        ("z_opt_parotid", ndimage.binary_dilation(lab == _C["parotid_r"], ball, iterations=1)),
        ("External", ndimage.binary_dilation(lab > 0, ball, iterations=6)),
        ("Parotids", (lab == _C["parotid_l"]) | (lab == _C["parotid_r"])),  # both sides: no one organ
        ("Cochlea_L", None),  # contoured in the template, never drawn: an ROI without contour data
    ]
    return write_rtstruct(
        label,
        clinical_names(index),
        read_headers(ct_files),
        path,
        description="organseg phantom planning export",
        extra=extra,
    )
