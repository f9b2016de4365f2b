"""FocusNetV2's trained chains re-scored: the three merge rules, SOL's localisation and inference time.

Issue 13 asks what the merge alone does to a trained chain, how often SOL finds each small organ and how far
its centre is from the truth. This script loads the last checkpoint of one arm's final stage for every seed
of a finished ``organseg bench`` run (default: the quick FocusNetV2 benchmark's ``focusnetv2`` arm, stage
``joint``), runs the locate-zoom-paste pipeline (``organseg.inference.locate_zoom_paste.predict_focusnet``)
once per test case and merge rule, and scores:

- Dice per organ for S-Net's argmax alone (``snet``, no paste) and each merge rule (``upstream``: S-Net's map
  kept, the SOS mask written over it in each found ROI; ``replace_in_roi``; ``runner_up``: S-Net's
  small-organ votes moved to its second choice), with paired bootstrap intervals (seeds x cases, as
  ``organseg bench``) of each rule against ``upstream``;
- per small organ: SOL's found rate (heatmap peak > the checkpoint's ``loc_threshold``, over the cases where
  the organ is present) and centre error in mm (found cases), mean over seeds and cases;
- seconds per case of the whole pipeline (wall and CPU), with the machine's load.

    PYTHONPATH=src .venv/bin/python benchmarks/focusnet_merge_and_localisation.py \\
        --runs /path/to/lightning_logs/organseg --card data_modules/cards/hn_phantom_bench_quick.yaml \\
        --md benchmarks/results/focusnet_phantom-quick-<date>/merge_and_localisation.md
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from organseg.cache.build import build_cache
from organseg.cache.reader import CacheReader
from organseg.evaluation.cached_split import split_case_ids
from organseg.evaluation.metrics import case_metrics
from organseg.evaluation.statistics import paired_difference, seed_summary
from organseg.inference.locate_zoom_paste import MERGES, predict_focusnet
from organseg.io.card import DatasetCard
from organseg.methods.checkpoints import load_segmenter

RULES = ("snet", *MERGES)


def score_seed(model, card: DatasetCard, reader: CacheReader, case_ids, seed: int):
    """(Dice rows for every rule, localisation rows, per-case seconds) of one seed's model."""
    rows, loc, seconds = [], [], []
    small = list(model.small_organs)
    small_classes = [card.classes.index(o) for o in small]
    spacing = tuple(float(s) for s in card.target_spacing)
    for cid in case_ids:
        image, label = reader.read_case(cid)
        x = torch.from_numpy(image)[None, None]
        outs = {}
        for merge in MERGES:
            wall, cpu = time.perf_counter(), time.process_time()
            out = predict_focusnet(
                model.focusnet,
                x,
                model.patch_size,
                overlap=model.sw_overlap,
                threshold=model.loc_threshold,
                sw_batch_size=model.sw_batch_size,
                merge=merge,
                return_snet_labels=merge == "upstream",
            )
            if merge == "upstream":
                seconds.append((time.perf_counter() - wall, time.process_time() - cpu))
            outs[merge] = out
        preds = {"snet": outs["upstream"]["snet_labels"], **{m: outs[m]["labels"] for m in MERGES}}
        for rule, pred in preds.items():
            for r in case_metrics(
                np.asarray(pred), label, spacing, card.classes, case_id=cid, distances=False
            ):
                rows.append(
                    {"arm": rule, "seed": seed, "case_id": cid, "organ": r["organ"], "dice": r["dice"]}
                )
        true = reader.centres(cid)
        found, centres = outs["upstream"]["found"], outs["upstream"]["centres"]
        for k, (organ, cls) in enumerate(zip(small, small_classes)):
            present = bool(np.isfinite(true[cls]).all())
            if not present:
                continue
            err = (
                float(np.linalg.norm((np.asarray(centres[k]) - true[cls]) * spacing))
                if found[k]
                else math.nan
            )
            loc.append(
                {"seed": seed, "case_id": cid, "organ": organ, "found": bool(found[k]), "error_mm": err}
            )
    return rows, loc, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default="lightning_logs/organseg", help="the bench runs' folder")
    p.add_argument("--name", default="focusnet_phantom", help="the benchmark's name")
    p.add_argument("--arm", default="focusnetv2")
    p.add_argument("--stage", default="joint", help="the arm's final stage (its last.ckpt is scored)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--card", default="data_modules/cards/hn_phantom_bench_quick.yaml")
    p.add_argument("--split", default="test")
    p.add_argument("--md", default=None, help="write the Markdown report here")
    args = p.parse_args()

    card = DatasetCard.load(args.card)
    build_cache(card, progress=False)
    reader = CacheReader(card.cache)
    case_ids = split_case_ids(card, reader, args.split)
    rows, loc, seconds, small, thresholds = [], [], [], [], set()
    load_before = os.getloadavg()[0]
    for seed in args.seeds:
        ckpt = Path(args.runs) / f"{args.name}-{args.arm}-s{seed}-{args.stage}" / "checkpoints" / "last.ckpt"
        model, _, _ = load_segmenter(ckpt, "cpu", args.card)
        model.eval()
        small, thresholds = list(model.small_organs), thresholds | {model.loc_threshold}
        with torch.inference_mode():
            r, lrows, secs = score_seed(model, card, reader, case_ids, seed)
        rows, loc, seconds = rows + r, loc + lrows, seconds + secs
        print(f"seed {seed}: {len(case_ids)} cases scored", flush=True)
    load_after = os.getloadavg()[0]

    large = [c for c in card.classes[1:] if c not in small]
    groups = {"mean (all organs)": list(card.classes[1:]), "large": large, "small": small}
    lines = [
        f"# FocusNetV2 merge rules and SOL localisation: `{args.name}` arm `{args.arm}`, "
        f"stage `{args.stage}`",
        "",
        f"Seeds {args.seeds}, {len(case_ids)} `{args.split}` cases of `{args.card}`; loc_threshold "
        f"{sorted(thresholds)}. Command: `PYTHONPATH=src .venv/bin/python benchmarks/"
        f"focusnet_merge_and_localisation.py --runs {args.runs} --card {args.card}`.",
        "",
        "### Dice by merge rule: mean ± SD over seeds",
        "",
        "| | " + " | ".join(RULES) + " |",
        "|---|" + "---:|" * len(RULES),
    ]
    for gname, organs in [*groups.items(), *((o, [o]) for o in card.classes[1:])]:
        cells = []
        for rule in RULES:
            s = seed_summary(rows, rule, organs)
            cells.append(f"{s.mean:.3f} ± {s.sd:.3f}")
        lines.append(f"| {gname} | " + " | ".join(cells) + " |")
    others = [r for r in RULES if r != "upstream"]
    lines += [
        "",
        "### Dice: each rule - upstream [95 % paired bootstrap interval, seeds x cases]",
        "",
        "| | " + " | ".join(f"{r} - upstream" for r in others) + " |",
        "|---|" + "---:|" * len(others),
    ]
    for gname, organs in [*groups.items(), *((o, [o]) for o in card.classes[1:])]:
        cells = []
        for rule in others:
            d = paired_difference(rows, rule, "upstream", organs)
            text = f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"
            cells.append(f"**{text}**" if d.win else text)
        lines.append(f"| {gname} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Bold: the interval excludes 0.",
        "",
        "### SOL localisation (cases where the organ is present)",
        "",
        "| organ | found rate | centre error mm (found): mean | median | max | per-seed found rate |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for organ in small:
        mine = [r for r in loc if r["organ"] == organ]
        errs = [r["error_mm"] for r in mine if r["found"]]
        per_seed = [
            np.mean([r["found"] for r in mine if r["seed"] == s])
            for s in args.seeds
            if any(r["seed"] == s for r in mine)
        ]
        lines.append(
            f"| {organ} | {np.mean([r['found'] for r in mine]):.2f} | "
            + (f"{np.mean(errs):.1f} | {np.median(errs):.1f} | {np.max(errs):.1f}" if errs else "- | - | -")
            + f" | {', '.join(f'{v:.2f}' for v in per_seed)} |"
        )
    wall = np.array([s[0] for s in seconds])
    cpu = np.array([s[1] for s in seconds])
    lines += [
        "",
        f"Inference (the whole locate-zoom-paste pipeline, merge `upstream`, on the cached case grid): "
        f"{wall.mean():.1f} s/case wall (SD {wall.std(ddof=1):.1f}), {cpu.mean():.1f} CPU-s/case, "
        f"{len(seconds)} case runs, 1-min load {load_before:.1f} before and {load_after:.1f} after.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.md:
        Path(args.md).write_text(text)


if __name__ == "__main__":
    main()
