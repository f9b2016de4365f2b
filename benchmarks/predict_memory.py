"""Peak memory of ``organseg predict`` on a whole CT: this checkout against an earlier commit, side by side.

Writes a synthetic 512 x 512 x 300 CT (0.98 x 0.98 x 2.5 mm, int16 NIfTI: an elliptic body of soft tissue
and bone in air, so the body crop removes what a real scan's would) and a tiny UNetBaseline checkpoint
with the phantom card (18 classes, target spacing 1 x 1 x 3 mm; the weights are one training step from
random, which changes neither time nor memory), then runs the real command
``python -m organseg.cli.main predict --ckpt ... --input ct.nii --out ...`` once per source tree, each in
its own process, and reads that process's peak RSS (``ru_maxrss`` from ``os.wait4``). The earlier tree
is ``git archive <--old-rev> src`` (default: ``git merge-base HEAD main``, where this branch began),
run with ``PYTHONPATH`` pointing at it; the new one
is this checkout's ``src``. It also measures the interpreter alone (``import`` of the predict command's
modules, torch, MONAI, SimpleITK), and counts the voxels whose label differs between the two outputs.

"The input" is the CT's voxels as stored, int16: 512 x 512 x 300 x 2 bytes = 150 MiB; ratios are peak
RSS / that (the previous commit read it into a float32 image, twice that).

    PYTHONPATH=src .venv/bin/python benchmarks/predict_memory.py                      # 512 x 512 x 300
    PYTHONPATH=src .venv/bin/python benchmarks/predict_memory.py --shape 256 256 80   # quick
    PYTHONPATH=src .venv/bin/python benchmarks/predict_memory.py \\
        --md benchmarks/results/predict_memory_cpu_$(date +%F).md

The last line printed is the results as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
CARD = REPO / "data_modules" / "cards" / "hn_phantom.yaml"
IMPORTS = (
    "import organseg.cli.main, organseg.cli.predict, organseg.inference.raw_images, "
    "organseg.methods.checkpoints, torch, monai, SimpleITK"
)


def write_ct(path: Path, shape, spacing, seed: int = 0) -> None:
    """An int16 CT: air (-1000 +- 20 HU) around an elliptic cylinder of soft tissue (40 +- 30 HU) spanning
    80 % x 70 % of the field of view, with a bony ring inside (700 HU), on every slice."""
    rng = np.random.default_rng(seed)
    x, y, z = shape
    xs = (np.arange(x) - (x - 1) / 2) / (0.4 * x)
    ys = (np.arange(y) - (y - 1) / 2) / (0.35 * y)
    r2 = xs[:, None] ** 2 + ys[None, :] ** 2
    body = r2 <= 1.0
    bone = (r2 > 0.30) & (r2 < 0.36)
    arr = np.empty((z, y, x), dtype=np.int16)  # SimpleITK's (z, y, x)
    for k in range(z):
        sl = np.where(body, 40.0, -1000.0) + rng.normal(0.0, 20.0, (x, y))
        sl[body] += rng.normal(0.0, 22.0, int(body.sum()))
        sl[bone] = 700.0
        arr[k] = np.rint(sl).T.astype(np.int16)
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin((-250.0, -250.0, -400.0))
    sitk.WriteImage(image, str(path))


def write_checkpoint(folder: Path, patch) -> Path:
    """A tiny UNetBaseline (filters 4, 8, 8) after one training step, with the phantom card riding along
    as ``organseg fit`` stores it (the cache path points nowhere, so predict uses linear interpolation)."""
    import lightning.pytorch as pl
    import torch

    from organseg.io.card import DatasetCard
    from organseg.methods import UNetBaseline

    card = DatasetCard.load(CARD)
    card.cache = str(folder / "no_cache.h5")
    torch.manual_seed(0)
    model = UNetBaseline(
        num_classes=card.num_classes,
        classes=card.classes,
        patch_size=tuple(patch),
        filters=[4, 8, 8],
        strides=[[1, 1, 1], [2, 2, 1], [2, 2, 2]],
        class_weights=[1.0] * card.num_classes,
    )
    model.cards = [card.to_dict()]
    batch = {"image": torch.randn(1, *patch), "label": torch.randint(0, card.num_classes, tuple(patch))}
    trainer = pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=1))
    path = folder / "tiny_unet.ckpt"
    trainer.save_checkpoint(path)
    return path


def export_src(rev: str, folder: Path) -> str:
    """``git archive rev src`` unpacked into ``folder``; the commit hash."""
    commit = subprocess.check_output(["git", "-C", str(REPO), "rev-parse", rev], text=True).strip()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", commit, "src"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return commit


#: run by a fresh, small interpreter: Linux carries a process's peak RSS across fork + exec, so the command
#: must be forked from a process smaller than it (not from this one, which holds the CT and torch)
_WAIT4 = """
import json, os, sys, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "peak_rss_mib": usage.ru_maxrss / 1024,
                  "wall_s": time.perf_counter() - t0, "cpu_s": usage.ru_utime + usage.ru_stime}))
"""


def _thp() -> str:
    """The kernel's transparent-huge-page mode (``always`` can raise RSS of sparsely touched memory)."""
    try:
        return Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        return "unknown"


def run_measured(cmd: list[str], pythonpath: str) -> dict:
    """Run ``cmd`` with ``PYTHONPATH=pythonpath``; its peak RSS (MiB, ``ru_maxrss``), wall and CPU seconds."""
    env = dict(os.environ, PYTHONPATH=pythonpath)
    with tempfile.TemporaryFile() as log:
        proc = subprocess.run(
            [sys.executable, "-c", _WAIT4, *cmd], env=env, stdout=subprocess.PIPE, stderr=log, text=True
        )
        log.seek(0)
        text = log.read().decode(errors="replace")
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1]) if lines else {"rc": proc.returncode}
    if result["rc"] != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({result['rc']}):\n{proc.stdout[-2000:]}{text[-3000:]}")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=(512, 512, 300))
    p.add_argument("--spacing", type=float, nargs=3, default=(0.98, 0.98, 2.5))
    p.add_argument("--patch", type=int, nargs=3, default=(64, 64, 16), help="the tiny U-Net's patch")
    p.add_argument(
        "--old-rev", default=None, help="the commit to compare against (default: where HEAD left main)"
    )
    p.add_argument("--skip-old", action="store_true", help="measure this checkout only")
    p.add_argument("--md", default=None, help="also write the results table to this Markdown file")
    args = p.parse_args()

    new_src = str(REPO / "src")
    results: dict = {
        "shape": list(args.shape),
        "spacing": list(args.spacing),
        "patch": list(args.patch),
        "input_mib": int(np.prod(args.shape)) * 2 / 2**20,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "thp": _thp(),
        "date": time.strftime("%Y-%m-%d"),
    }
    with tempfile.TemporaryDirectory(prefix="predict-memory-") as tmp:
        tmp = Path(tmp)
        ct = tmp / "ct.nii"
        write_ct(ct, args.shape, args.spacing)
        ckpt = write_checkpoint(tmp, args.patch)
        trees = {
            "new": (
                new_src,
                subprocess.check_output(["git", "-C", str(REPO), "rev-parse", "HEAD"], text=True).strip(),
            )
        }
        if not args.skip_old:
            (tmp / "old").mkdir()
            rev = (
                args.old_rev
                or subprocess.check_output(
                    ["git", "-C", str(REPO), "merge-base", "HEAD", "main"], text=True
                ).strip()
            )
            trees = {"old": (str(tmp / "old" / "src"), export_src(rev, tmp / "old")), **trees}
        results["interpreter"] = run_measured([sys.executable, "-c", IMPORTS], new_src)
        outputs = {}
        for name, (src, commit) in trees.items():
            out = tmp / f"out_{name}"
            cmd = [
                sys.executable,
                "-m",
                "organseg.cli.main",
                "predict",
                "--ckpt",
                str(ckpt),
                "--input",
                str(ct),
                "--out",
                str(out),
            ]
            r = run_measured(cmd, src)
            r["commit"] = commit
            r["ratio"] = r["peak_rss_mib"] / results["input_mib"]
            results[name] = r
            outputs[name] = out / "ct_seg.nii.gz"
            print(
                f"{name} ({commit[:10]}): peak RSS {r['peak_rss_mib']:.0f} MiB = {r['ratio']:.2f} x the "
                f"input, {r['wall_s']:.0f} s wall, {r['cpu_s']:.0f} CPU-s",
                flush=True,
            )
        if "old" in outputs:
            a = sitk.GetArrayFromImage(sitk.ReadImage(str(outputs["old"])))
            b = sitk.GetArrayFromImage(sitk.ReadImage(str(outputs["new"])))
            results["labels_differ"] = int(np.count_nonzero(a != b))
            results["labels_total"] = int(a.size)
            results["label_counts"] = np.bincount(b.ravel(), minlength=18).tolist()
    if args.md:
        write_markdown(Path(args.md), results)
    print(json.dumps(results))


def write_markdown(path: Path, r: dict) -> None:
    shape = " x ".join(map(str, r["shape"]))
    rows = [("interpreter + imports only", r["interpreter"], "-")]
    for name in ("old", "new"):
        if name in r:
            rows.append((f"{name} `organseg predict` ({r[name]['commit'][:10]})", r[name], None))
    lines = [
        f"| run | peak RSS (MiB) | x input ({r['input_mib']:.0f} MiB int16) | wall (s) | CPU (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, v, _ in rows:
        ratio = v["peak_rss_mib"] / r["input_mib"]
        lines.append(
            f"| {label} | {v['peak_rss_mib']:.0f} | {ratio:.2f} | {v['wall_s']:.0f} | {v['cpu_s']:.0f} |"
        )
    if "labels_differ" in r:
        lines.append("")
        lines.append(
            f"Labels differing between old and new: {r['labels_differ']} of {r['labels_total']} voxels."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"CT {shape} at {r['spacing']} mm, tiny U-Net patch {r['patch']}, {r['cpus']} CPUs, {r['date']}"
    table = "\n".join(lines)
    path.write_text(f"<!-- generated by benchmarks/predict_memory.py -->\n{header}\n\n{table}\n")


if __name__ == "__main__":
    main()
