"""``organseg phantom {hn,abdomen}``: write synthetic CT datasets (nnU-Net raw layout; PDDCA too
for hn).  See :mod:`organseg.phantom.hn` and :mod:`organseg.phantom.abdomen` for the anatomy and
the few-organ (``--keep``) streams."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import SimpleITK as sitk
from rich.console import Console

from organseg.io.dicom import write_dicom_series
from organseg.phantom.abdomen import (
    ABDOMEN_CLASSES,
    ABDOMEN_DEFAULT_SHAPE,
    ABDOMEN_DEFAULT_SPACING,
    write_abdomen_dataset,
)
from organseg.phantom.hn import (
    HN_CLASSES,
    HN_DEFAULT_SHAPE,
    HN_DEFAULT_SPACING,
    PDDCA_NAMES,
    write_hn_dataset,
    write_hn_rtstruct,
)


def _common(p: argparse.ArgumentParser, shape, spacing) -> None:
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--cases", type=int, required=True, help="number of cases")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.add_argument(
        "--shape",
        type=int,
        nargs=3,
        metavar=("X", "Y", "Z"),
        default=list(shape),
        help=f"grid size in voxels, (x, y, z) (default {' '.join(map(str, shape))})",
    )
    p.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        metavar=("SX", "SY", "SZ"),
        default=list(spacing),
        help=f"voxel spacing in mm (default {' '.join(map(str, spacing))})",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="parallel processes (default min(2, cpu count)); never changes the output",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--dicom",
        metavar="DIR",
        default=None,
        help="also write each case's CT as a DICOM CT series in DIR/<case>/ (input for `organseg predict`); "
        "hn adds DIR/<case>/RS_<case>.dcm, an RTSTRUCT with clinical structure names (a planning-system "
        "export, read by a `layout: dicom_rt` card)",
    )


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "phantom",
        help="write synthetic CT phantom datasets (hn, abdomen)",
        description="Write synthetic CT datasets with organ labels (the project's built-in data).",
    )
    sub = parser.add_subparsers(dest="phantom_command", metavar="{hn,abdomen}", required=True)
    hn = sub.add_parser(
        "hn",
        help="head-and-neck CT, 17 organs at risk",
        description="Head-and-neck phantom: 17 OARs incl. lenses, optic nerves, chiasm.",
    )
    _common(hn, HN_DEFAULT_SHAPE, HN_DEFAULT_SPACING)
    hn.add_argument(
        "--layout",
        choices=("nnunet", "pddca"),
        default="nnunet",
        help="nnunet: imagesTr/labelsTr/dataset.json; pddca: <case>/img.nrrd + structures/*.nrrd",
    )
    ab = sub.add_parser(
        "abdomen",
        help="abdominal CT: liver, spleen, kidneys, pancreas, stomach",
        description="Abdominal phantom. --keep writes a few-organ dataset (other organs = "
        "background) with its own cases, disjoint from the full set's.",
    )
    _common(ab, ABDOMEN_DEFAULT_SHAPE, ABDOMEN_DEFAULT_SPACING)
    ab.add_argument(
        "--keep",
        nargs="+",
        metavar="ORGAN",
        choices=ABDOMEN_CLASSES[1:],
        default=None,
        help=f"label only these organs ({', '.join(ABDOMEN_CLASSES[1:])})",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    console = Console()
    t0 = time.perf_counter()
    out = Path(args.out)
    if args.phantom_command == "hn":
        results = write_hn_dataset(
            out,
            args.cases,
            args.seed,
            args.shape,
            args.spacing,
            layout=args.layout,
            workers=args.workers,
            quiet=args.quiet,
        )
        where = (
            f"{out}/imagesTr, {out}/labelsTr, {out}/dataset.json"
            if args.layout == "nnunet"
            else f"{out}/<case>/img.nrrd and {out}/<case>/structures/*.nrrd"
        )
    else:
        results = write_abdomen_dataset(
            out,
            args.cases,
            args.seed,
            keep=args.keep,
            shape=args.shape,
            spacing=args.spacing,
            workers=args.workers,
            quiet=args.quiet,
        )
        where = f"{out}/imagesTr, {out}/labelsTr, {out}/dataset.json"
    dt = time.perf_counter() - t0
    ids = [r.case_id for r in results]
    console.print(
        f"phantom {args.phantom_command}: wrote {len(results)} case(s) "
        f"({ids[0]} .. {ids[-1]}) in {dt:.1f} s to {where}",
        highlight=False,
        soft_wrap=True,
    )
    if args.dicom:
        body_part = "HEADNECK" if args.phantom_command == "hn" else "ABDOMEN"
        _write_dicom(out, ids, Path(args.dicom), getattr(args, "layout", "nnunet"), body_part)
        console.print(
            f"phantom {args.phantom_command}: DICOM CT series in {args.dicom}/<case>/",
            highlight=False,
            soft_wrap=True,
        )
    missing = {r.case_id: r.missing for r in results if r.missing}
    if missing:
        console.print(
            f"[yellow]warning:[/] organs outside the field of view (grid too small): {missing}",
            soft_wrap=True,
        )
    return 0


def _write_dicom(out: Path, case_ids: list[str], dicom_root: Path, layout: str, body_part: str) -> None:
    """Each written case's CT again as a DICOM series (one StudyInstanceUID per case); BodyPartExamined
    (DICOM's defined terms HEADNECK / ABDOMEN) instead of an empty Laterality, which validators flag."""
    for cid in case_ids:
        src = out / cid / "img.nrrd" if layout == "pddca" else out / "imagesTr" / f"{cid}_0000.nii.gz"
        image = sitk.ReadImage(str(src))
        files = write_dicom_series(
            image,
            dicom_root / cid,
            patient_id=cid,
            series_description=f"organseg phantom {cid}",
            body_part=body_part,
        )
        if body_part == "HEADNECK":
            label = _hn_label(out, cid, layout)
            label.CopyInformation(image)
            write_hn_rtstruct(label, files, dicom_root / cid / f"RS_{cid}.dcm", int(cid.rsplit("_", 1)[-1]))


def _hn_label(out: Path, cid: str, layout: str) -> sitk.Image:
    """The case's HN_CLASSES label map (PDDCA: its nine structure masks merged)."""
    if layout != "pddca":
        return sitk.ReadImage(str(out / "labelsTr" / f"{cid}.nii.gz"))
    label = None
    for stem, cls in PDDCA_NAMES.items():
        mask = sitk.ReadImage(str(out / cid / "structures" / f"{stem}.nrrd")) > 0
        value = sitk.Cast(mask, sitk.sitkUInt8) * HN_CLASSES.index(cls)
        label = value if label is None else sitk.Maximum(label, value)
    return label
