"""FocusNetV2 vs the baseline U-Net at one fixed training budget on the demo-size H&N phantom.

Every compared method gets the same M minutes of training (Lightning's ``--trainer.max_time``, summed
over its stages), trained through the real ``organseg fit`` CLI and scored with ``organseg evaluate
--split test`` (the commands are printed as they run):

    unet           baseline 3D U-Net                          100% of M
    snet           FocusNetV2 stage 1 alone (S-Net)           100% of M
    snet+sol+sos   S-Net 50%, SOL-Net 20%, SOS-Nets 30%       (SOS checkpoint: locate-zoom-paste)
    full           S-Net 50%, SOL 20%, SOS 15%, shape AE 5%, joint fine-tuning with the shape constraint 10%

Stage-1 runs are never shared between ``snet`` (all of M on S-Net) and the chains (half of M): each
method's total is M. ``full`` reuses the S-Net (50%) and SOL (20%) runs of ``snet+sol+sos`` -- the
same command, seed and budget, counted in full in both totals -- so the benchmark trains 3.7 x M
instead of 4.4 x M (about 40 min on 2 CPU cores at the default M = 8, start-up, evaluation and
timing included); ``--no-share`` reruns them. Each later stage starts from the previous stage's
selected checkpoint (the best by its validation monitor, else last.ckpt), the same rule that picks the
checkpoint evaluated for every method.

Data: data/raw/hn_phantom (``organseg phantom hn``, made if missing) preprocessed with the demo card
(2 x 2 x 3 mm, data_modules/cards/hn_phantom_demo.yaml), patch 64 x 64 x 32; with ``--cases N`` other
than the 20 found there, N cases go to data/raw/hn_phantom_n<N> with a derived card in the output folder.

Writes OUT/focusnet_phantom.md and .json: per-organ Dice and HD95 (rows organs, columns methods), the
means over large and over small organs, inference seconds per case (``predict_case`` timed directly:
one untimed warm-up case, then the fastest of ``--timing-repeats`` runs per case) and the budget split.
A failed method is reported with its stderr tail; the others still run.

    .venv/bin/python benchmarks/focusnet_phantom.py [--minutes 8] [--cases 20] [--out DIR]
    .venv/bin/python benchmarks/focusnet_phantom.py --minutes 0.5 --cases 6  # smoke test (~6 min, 2 cores)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CARD = "data_modules/cards/hn_phantom_demo.yaml"
RAW = "data/raw/hn_phantom"
DEFAULT_CASES = 20
UNET_DATA = "data_modules/hn_phantom_demo.yaml"
FN_DATA = "data_modules/hn_phantom_focusnet_demo.yaml"
LOGS = Path("lightning_logs/organseg")

# stage -> (model config, data config key, budget overlay, {init argument: stage it is loaded from})
STAGES = {
    "unet": ("experiments/baseline/unet.yaml", "unet", "experiments/demo.yaml", {}),
    "snet": ("experiments/focusnetv2/snet.yaml", "fn", "experiments/focusnetv2/demo.yaml", {}),
    "sol": (
        "experiments/focusnetv2/sol.yaml",
        "fn",
        "experiments/focusnetv2/demo.yaml",
        {"init_from": "snet"},
    ),
    "sos": (
        "experiments/focusnetv2/sos.yaml",
        "fn",
        "experiments/focusnetv2/demo.yaml",
        {"init_from": "sol"},
    ),
    "shape_ae": (
        "experiments/focusnetv2/shape_ae.yaml",
        "fn",
        "experiments/focusnetv2/demo.yaml",
        {"init_from": "sos"},
    ),
    "joint": (
        "experiments/focusnetv2/joint.yaml",
        "fn",
        "experiments/focusnetv2/demo.yaml",
        {"init_from": "sos", "shape_from": "shape_ae"},
    ),
}
# (name, run-id slug, [(stage, share of the budget)]); shares sum to 1 per method
VARIANTS = [
    ("unet", "unet", [("unet", 1.0)]),
    ("snet", "snet", [("snet", 1.0)]),
    ("snet+sol+sos", "snet-sol-sos", [("snet", 0.5), ("sol", 0.2), ("sos", 0.3)]),
    ("full", "full", [("snet", 0.5), ("sol", 0.2), ("sos", 0.15), ("shape_ae", 0.05), ("joint", 0.10)]),
]
TAIL_LINES = 25


# ------------------------------------------------------------------------------------------- helpers
def fmt_time(seconds: float) -> str:
    """Lightning's ``max_time`` string DD:HH:MM:SS (whole seconds, at least 1)."""
    s = max(1, int(round(seconds)))
    return f"{s // 86400:02d}:{s % 86400 // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def mmss(seconds: float) -> str:
    s = max(1, int(round(seconds)))
    return f"{s // 60}:{s % 60:02d}"


def tail(path: Path, n: int = TAIL_LINES) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def run_logged(args: list[str], log_stem: Path, timeout: float) -> tuple[int, float]:
    """Run ``args`` with stdout/stderr to ``<log_stem>.out/.err``; (return code, wall s). A run past
    ``timeout`` is stopped (its whole process group: DataLoader workers included) and returns 124."""
    print(f"\n$ {' '.join(shlex.quote(a) for a in args)}", flush=True)
    log_stem.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    with open(f"{log_stem}.out", "w") as out, open(f"{log_stem}.err", "w") as err:
        proc = subprocess.Popen(args, stdout=out, stderr=err, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            err.write(f"\n[focusnet_phantom] stopped after {timeout:.0f} s (timeout)\n")
            rc = 124
        except BaseException:
            _stop(proc)
            raise
    return rc, time.perf_counter() - t0


def _stop(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=20)
            return
        except subprocess.TimeoutExpired:
            continue


def pick_checkpoint(run_id: str) -> Path | None:
    """The run's best checkpoint by its validation monitor (epoch*.ckpt, newest if several), else
    last.ckpt."""
    folder = LOGS / run_id / "checkpoints"
    best = sorted(folder.glob("epoch*.ckpt"), key=lambda p: p.stat().st_mtime)
    if best:
        return best[-1]
    last = folder / "last.ckpt"
    return last if last.is_file() else None


def count_cases(raw: Path) -> int:
    return len(list((raw / "imagesTr").glob("*_0000.nii.gz"))) if (raw / "dataset.json").is_file() else 0


def clean(x):
    """JSON-safe: NaN/inf -> None, Paths -> str."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def mean(values) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else math.nan


# ------------------------------------------------------------------------------------------- data
def prepare_data(exe: str, cases: int, out: Path) -> tuple[str, dict[str, str]]:
    """Phantom + cache; returns (card path, {"unet": data config, "fn": data config})."""
    raw = Path(RAW)
    have = count_cases(raw)
    if have == cases or (have == 0 and cases == DEFAULT_CASES):
        card, configs = CARD, {"unet": UNET_DATA, "fn": FN_DATA}
    else:  # another case count: its own raw folder, card and cache; data configs pointing at that card
        raw = Path(f"{RAW}_n{cases}")
        spec = yaml.safe_load(Path(CARD).read_text())
        spec.update(
            name=f"{spec['name']}_n{cases}", path=str(raw), cache=f"data/cache/{spec['name']}_n{cases}.h5"
        )
        cfg_dir = out / "configs"
        cfg_dir.mkdir(parents=True, exist_ok=True)
        card = str(cfg_dir / f"{spec['name']}.yaml")
        Path(card).write_text(
            f"# derived from {CARD} by benchmarks/focusnet_phantom.py\n"
            + yaml.safe_dump(spec, sort_keys=False)
        )
        configs = {}
        for key, src in (("unet", UNET_DATA), ("fn", FN_DATA)):
            data = yaml.safe_load(Path(src).read_text())
            data["data"]["init_args"]["cards"] = [card]
            dst = cfg_dir / f"data_{Path(src).stem}_n{cases}.yaml"
            dst.write_text(f"# {src} with the card {card}\n" + yaml.safe_dump(data, sort_keys=False))
            configs[key] = str(dst)
    if count_cases(raw) != cases:
        cmd = [exe, "phantom", "hn", "--out", str(raw), "--cases", str(cases), "--seed", "0"]
        print(f"\n$ {' '.join(shlex.quote(a) for a in cmd)}", flush=True)
        subprocess.run(cmd, check=True)
    cmd = [exe, "preprocess", card]
    print(f"\n$ {' '.join(shlex.quote(a) for a in cmd)}", flush=True)
    subprocess.run(cmd, check=True)
    return card, configs


# ------------------------------------------------------------------------------------------- training
def plan_runs(variants, minutes: float, stamp: str, share: bool) -> tuple[dict, dict]:
    """Unique stage runs (keyed by the chain prefix they continue) and each method's list of run keys."""
    runs: dict[tuple, dict] = {}
    chains: dict[str, list[tuple]] = {}
    for name, slug, stages in variants:
        keys, prefix = [], ()
        for stage, share_of_m in stages:
            prefix = prefix + ((stage, share_of_m),)
            key = prefix if share else (slug,) + prefix
            if key not in runs:
                deps = {arg: keys[[s for s, _ in stages].index(src)] for arg, src in STAGES[stage][3].items()}
                run_id = f"bench-fn-{stamp}-{slug}" + (f"-{stage}" if len(stages) > 1 else "")
                runs[key] = {
                    "stage": stage,
                    "share": share_of_m,
                    "seconds": share_of_m * minutes * 60.0,
                    "run_id": run_id,
                    "owner": name,
                    "deps": deps,
                    "status": "pending",
                }
            keys.append(key)
        chains[name] = keys
    return runs, chains


def train(run: dict, runs: dict, exe: str, data_cfgs: dict, out: Path) -> None:
    model_cfg, data_key, overlay, _ = STAGES[run["stage"]]
    args = [
        exe,
        "fit",
        "-c",
        model_cfg,
        "-c",
        data_cfgs[data_key],
        "-c",
        overlay,
        f"--trainer.max_time={fmt_time(run['seconds'])}",
        f"--trainer.logger.init_args.id={run['run_id']}",
    ]
    for arg, dep_key in run["deps"].items():
        dep = runs[dep_key]
        if dep["status"] != "ok":
            run.update(status="failed", error=f"needs {dep['stage']} ({dep['run_id']}), which failed")
            print(f"  skipped {run['run_id']}: {run['error']}", flush=True)
            return
        args.append(f"--model.init_args.{arg}={dep['checkpoint']}")
    print(
        f"\n[{run['owner']}] stage {run['stage']}: {run['share']:.0%} of the budget = {mmss(run['seconds'])} "
        f"min:s of training",
        flush=True,
    )
    rc, wall = run_logged(args, out / "logs" / run["run_id"], timeout=1.5 * run["seconds"] + 900)
    run["wall_s"] = wall
    run["command"] = " ".join(shlex.quote(a) for a in args)
    ckpt = pick_checkpoint(run["run_id"])
    if rc != 0 or ckpt is None:
        run.update(
            status="failed",
            error=f"organseg fit exited with {rc}" if rc else "no checkpoint written",
            stderr_tail=tail(out / "logs" / f"{run['run_id']}.err"),
        )
        print(f"  FAILED ({run['error']}); stderr tail:\n{run['stderr_tail']}", flush=True)
        return
    run.update(status="ok", checkpoint=str(ckpt))
    print(f"  done in {wall:.0f} s wall; selected checkpoint {ckpt}", flush=True)


# ------------------------------------------------------------------------------------------- evaluation
def evaluate(result: dict, exe: str, out: Path, device: str) -> None:
    eval_dir = out / f"eval_{result['slug']}"
    args = [
        exe,
        "evaluate",
        "--ckpt",
        result["checkpoint"],
        "--split",
        "test",
        "--out",
        str(eval_dir),
        "--overlays",
        "1",
        "--device",
        device,
    ]
    rc, wall = run_logged(args, out / "logs" / f"evaluate-{result['slug']}", timeout=3600)
    summary_path = eval_dir / "summary.json"
    if rc != 0 or not summary_path.is_file():
        result.update(
            status="failed",
            error=f"organseg evaluate exited with {rc}",
            stderr_tail=tail(out / "logs" / f"evaluate-{result['slug']}.err"),
        )
        print(f"  FAILED ({result['error']}); stderr tail:\n{result['stderr_tail']}", flush=True)
        return
    summary = json.loads(summary_path.read_text())
    n = max(1, int(summary.get("n_cases") or len(summary.get("cases", [])) or 1))
    result.update(
        status="ok",
        eval_dir=str(eval_dir),
        eval_wall_s=wall,
        eval_s_per_case=wall / n,
        test_cases=summary.get("cases", []),
        per_organ={
            o: {"dice": _num(v.get("dice_mean")), "hd95": _num(v.get("hd95_mean"))}
            for o, v in summary["per_organ"].items()
        },
    )
    print(f"  evaluated {n} test case(s) in {wall:.0f} s wall -> {eval_dir}", flush=True)


def _num(v) -> float:
    return math.nan if v is None else float(v)


def time_inference(ckpt: str, device: str, repeats: int = 2) -> dict:
    """Seconds per test case of ``predict_case`` (what evaluate calls): one untimed warm-up case, then the
    fastest of ``repeats`` runs per case (robust to other load on a shared machine), averaged over cases."""
    import torch

    from organseg.cache.reader import CacheReader
    from organseg.io.card import DatasetCard
    from organseg.methods.checkpoints import load_module

    model, extra = load_module(ckpt, device)
    raw = extra["cards"][0]
    card = DatasetCard.from_dict(
        {k: v for k, v in raw.items() if k != "source"}, source=raw.get("source", "")
    )
    reader = CacheReader(card.cache)
    ids = card.split_cases(reader.case_ids)["test"] or list(reader.case_ids)[:1]

    def one(cid: str) -> float:
        image, _ = reader.read_case(cid)
        x = torch.from_numpy(image)[None, None].to(device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.predict_case(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    load_before = os.getloadavg()[0]
    one(ids[0])  # warm-up: allocator, kernels, first-call overheads
    times = [min(one(c) for _ in range(max(1, repeats))) for c in ids]
    return {
        "s_per_case": sum(times) / len(times),
        "per_case_s": times,
        "cases": len(times),
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "shapes": [list(reader.shape(c)) for c in ids],
        "loadavg_1min": [load_before, os.getloadavg()[0]],
    }


# ------------------------------------------------------------------------------------------- report
def report(meta: dict, runs: dict, chains: dict, results: dict, card) -> str:
    names = list(results)
    small = [o for o in card.small if o in card.labeled]
    large = [o for o in card.labeled if o not in small]
    for r in results.values():
        if r.get("per_organ"):
            po = r["per_organ"]
            r["means"] = {
                group: {m: mean(po.get(o, {}).get(m, math.nan) for o in organs) for m in ("dice", "hd95")}
                for group, organs in (("large", large), ("small", small), ("all", large + small))
            }

    def cell(name, organ, metric, digits):
        r = results[name]
        if r["status"] != "ok":
            return "failed"
        v = r["per_organ"].get(organ, {}).get(metric, math.nan)
        return "-" if math.isnan(v) else f"{v:.{digits}f}"

    def mcell(name, group, metric, digits):
        r = results[name]
        if r["status"] != "ok":
            return "failed"
        v = r["means"][group][metric]
        return "-" if math.isnan(v) else f"**{v:.{digits}f}**"

    md = [
        f"# FocusNetV2 vs baseline U-Net on the H&N phantom, {meta['minutes']:g} min of training per method",
        "",
        f"Dataset {meta['dataset']} ({meta['spacing']} mm, {meta['cases']} cases: {meta['split']}), patch "
        f"{meta['patch']}, device {meta['device']}; started {meta['started']}, "
        f"wall {meta.get('wall_min', math.nan):.1f} min.",
        "Scores: `organseg evaluate --split test`, mean over test cases (missed organ: Dice 0, HD95 = image "
        "diagonal). Small organs (*) are the card's `small` list; large = the other labelled organs.",
        "",
    ]
    for metric, title, digits in (("dice", "Dice", 3), ("hd95", "HD95 (mm)", 1)):
        md += [f"## {title}", "", "| organ | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for organ in large + small:
            md.append(
                f"| {organ}{' *' if organ in small else ''} | "
                + " | ".join(cell(n, organ, metric, digits) for n in names)
                + " |"
            )
        for group, organs in (("large", large), ("small", small), ("all", large + small)):
            md.append(
                f"| **mean {group}** ({len(organs)}) | "
                + " | ".join(mcell(n, group, metric, digits) for n in names)
                + " |"
            )
        md.append("")
    md += [
        "## Inference",
        "",
        "| method | predict_case s/case | evaluate wall s/case (incl. metrics, start-up) | checkpoint |",
        "|---|---:|---:|---|",
    ]
    for n in names:
        r = results[n]
        inf = r.get("inference") or {}
        pc = (
            f"{inf['s_per_case']:.2f}"
            if inf
            else ("failed" if r["status"] != "ok" or "inference" in r else "-")
        )
        ev = f"{r['eval_s_per_case']:.1f}" if r.get("eval_s_per_case") else "failed"
        md.append(f"| {n} | {pc} | {ev} | `{r.get('checkpoint', '-')}` |")
    loads = [x for r in results.values() for x in (r.get("inference") or {}).get("loadavg_1min", [])]
    md += [
        "",
        f"predict_case timed after all training, in one process ({meta.get('threads', '?')} torch threads): "
        "one untimed warm-up case, then the fastest of "
        f"{meta.get('timing_repeats', '?')} runs per test case, averaged over the test cases; "
        "1-min load average "
        f"during timing {min(loads, default=math.nan):.1f}-{max(loads, default=math.nan):.1f} (other work on "
        "the machine inflates these numbers). FocusNetV2's SOS/joint checkpoints run locate-zoom-paste, "
        "`snet` S-Net only. The evaluate column adds process start-up, HD95/ASSD and overlays.",
        "",
    ]
    md += [
        "## Budget split",
        "",
        f"Each method: {meta['minutes']:g} min of `--trainer.max_time` in total (fit wall time adds start-up "
        "and the last validation).",
        "",
        "| method | stages: share of the budget (max_time) | fit wall s (its stages, shared ones included) |",
        "|---|---|---:|",
    ]
    for name, keys in chains.items():
        parts, wall = [], 0.0
        for k in keys:
            r = runs[k]
            shared = f", run of {r['owner']}" if r["owner"] != name else ""
            parts.append(f"{r['stage']} {r['share']:.0%} ({mmss(r['seconds'])}{shared})")
            wall += r.get("wall_s", 0.0)
        md.append(f"| {name} | {' -> '.join(parts)} | {wall:.0f} |")
    md += ["", meta["sharing"], ""]
    failed = {n: r for n, r in results.items() if r["status"] != "ok"}
    if failed:
        md += ["## Failures", ""]
        for n, r in failed.items():
            md += [f"- **{n}**: {r.get('error', 'failed')}", ""]
            if r.get("stderr_tail"):
                md += ["```", r["stderr_tail"], "```", ""]
    return "\n".join(md)


# ------------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--minutes", type=float, default=8.0, help="training budget per method, minutes (default 8)"
    )
    ap.add_argument(
        "--cases", type=int, default=DEFAULT_CASES, help="phantom cases (default 20, as make demo)"
    )
    ap.add_argument("--out", default=None, help="output folder (default lightning_logs/bench-fn-<time>)")
    ap.add_argument(
        "--device",
        default=None,
        help="inference device for evaluate/timing (default: cuda:0 if "
        "available, else cpu); training uses accelerator auto",
    )
    ap.add_argument(
        "--variants",
        default=",".join(v[0] for v in VARIANTS),
        help="comma-separated subset of: " + ", ".join(v[0] for v in VARIANTS),
    )
    ap.add_argument(
        "--timing-repeats",
        type=int,
        default=2,
        help="predict_case runs per test case for the inference time; the fastest counts (default 2)",
    )
    ap.add_argument(
        "--no-share",
        action="store_true",
        help="rerun full's S-Net and SOL stages instead of reusing snet+sol+sos's",
    )
    args = ap.parse_args()
    if args.minutes <= 0 or args.cases < 3:
        ap.error("--minutes must be > 0 and --cases >= 3 (train/val/test)")
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in wanted if v not in {n for n, _, _ in VARIANTS}]
    if unknown or not wanted:
        ap.error(f"unknown variant(s) {unknown}; choose from {[n for n, _, _ in VARIANTS]}")
    variants = [v for v in VARIANTS if v[0] in wanted]

    os.chdir(ROOT)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    exe = str(Path(sys.executable).with_name("organseg"))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or f"lightning_logs/bench-fn-{stamp}")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    card_path, data_cfgs = prepare_data(exe, args.cases, out)
    from organseg.cache.reader import CacheReader
    from organseg.io.card import DatasetCard

    card = DatasetCard.load(card_path)
    split = card.split_cases(list(CacheReader(card.cache).case_ids))
    device = args.device
    if device is None:
        import torch

        device = "cuda:0" if torch.cuda.is_available() else "cpu"

    share = not args.no_share
    runs, chains = plan_runs(variants, args.minutes, stamp, share)
    sharing = (
        "Stage-1 runs are not shared between `snet` (100% of the budget on S-Net) and the chains (50%), so "
        "every method trains exactly its budget. "
    )
    sharing += (
        "`full` reuses the S-Net (50%) and SOL (20%) runs of `snet+sol+sos` (same command, seed and "
        "budget; counted in full in both methods' totals)."
        if share and "full" in chains and "snet+sol+sos" in chains
        else "No stage run is shared between methods."
    )
    meta = {
        "minutes": args.minutes,
        "cases": args.cases,
        "dataset": card.name,
        "card": card_path,
        "spacing": "x".join(f"{s:g}" for s in card.target_spacing),
        "split": ", ".join(f"{k} {len(split[k])}" for k in ("train", "val", "test")),
        "patch": "64x64x32",
        "device": device,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "sharing": sharing,
        "data_configs": data_cfgs,
        "stamp": stamp,
        "timing_repeats": args.timing_repeats,
    }
    print(f"\nbudget {args.minutes:g} min per method; {sharing}", flush=True)
    results = {name: {"slug": slug, "status": "pending"} for name, slug, _ in variants}
    try:
        for name, keys in chains.items():
            for key in keys:
                if runs[key]["status"] == "pending":
                    train(runs[key], runs, exe, data_cfgs, out)
            final = runs[keys[-1]]
            res = results[name]
            if final["status"] != "ok":
                bad = next(runs[k] for k in keys if runs[k]["status"] != "ok")
                res.update(
                    status="failed",
                    error=f"stage {bad['stage']} ({bad['run_id']}): {bad.get('error')}",
                    stderr_tail=bad.get("stderr_tail", ""),
                )
                continue
            res["checkpoint"] = final["checkpoint"]
            evaluate(res, exe, out, device)
        for name, res in results.items():  # all training done: time inference on a quiet machine
            if res["status"] == "ok":
                try:
                    res["inference"] = time_inference(res["checkpoint"], device, args.timing_repeats)
                    meta["threads"] = res["inference"]["threads"]
                    inf = res["inference"]
                    print(
                        f"  {name}: predict_case {inf['s_per_case']:.2f} s/case (1-min load average "
                        f"{inf['loadavg_1min'][0]:.1f} -> {inf['loadavg_1min'][1]:.1f})",
                        flush=True,
                    )
                except Exception as exc:  # noqa: BLE001 - report it, keep the other methods
                    res["inference"] = {}
                    res["inference_error"] = f"{type(exc).__name__}: {exc}"
                    print(f"  {name}: inference timing failed: {res['inference_error']}", flush=True)
    finally:
        meta["wall_min"] = (time.time() - t0) / 60
        text = report(meta, runs, chains, results, card)
        (out / "focusnet_phantom.md").write_text(text + "\n")
        doc = {
            "meta": meta,
            "budget": {
                name: [{k: v for k, v in runs[key].items() if k != "deps"} for key in keys]
                for name, keys in chains.items()
            },
            "variants": results,
        }
        (out / "focusnet_phantom.json").write_text(json.dumps(clean(doc), indent=2, allow_nan=False) + "\n")
        print("\n" + text)
        print(
            f"\nwritten: {out / 'focusnet_phantom.md'}, {out / 'focusnet_phantom.json'} "
            f"(logs: {out / 'logs'}); total {meta['wall_min']:.1f} min"
        )
    return 0 if all(r["status"] == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
