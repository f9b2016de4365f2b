"""``make demo``: phantom -> preprocess -> fit the baseline and the five FocusNetV2 stages -> evaluate ->
one per-organ Dice table.

Runs the plan in ``experiments/demo_plan.yaml`` with the same ``organseg`` commands a user would type
(printed before each step), so the demo doubles as a walkthrough of the staged method: each later
FocusNetV2 stage names the previous stage's selected checkpoint (``init_from`` / ``shape_from``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

from organseg.runs import run_checkpoint

PLAN = "experiments/demo_plan.yaml"
LOGS = Path("lightning_logs/organseg")
IDLE_OVERHEAD_MIN = 1.1  # phantom, preprocessing and the 4 evaluations: ~130 CPU-s / 2 cores (measured)


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def sh(args: list[str]) -> None:
    """Run one printed command (progress lines as they come), then its wall time, CPU time and load:
    the CPU seconds hardly depend on how busy the machine is, the wall time does."""
    print(f"\n$ {' '.join(shlex.quote(a) for a in args)}", flush=True)
    wall, cpu = time.perf_counter(), children_cpu_seconds()
    subprocess.run(args, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall, cpu = time.perf_counter() - wall, children_cpu_seconds() - cpu
    print(f"  ({wall:.0f} s wall, {cpu:.0f} CPU-s, 1-min load {os.getloadavg()[0]:.1f})", flush=True)


def selected_checkpoint(run_id: str) -> Path:
    """The run's best checkpoint by its validation monitor (newest if several), else ``last.ckpt``."""
    ckpt = run_checkpoint(LOGS / run_id, "best")
    if ckpt is None:
        raise SystemExit(f"demo: run {run_id} wrote no checkpoint under {LOGS / run_id / 'checkpoints'}")
    return ckpt


def load_plan(path: str) -> dict:
    plan = yaml.safe_load(Path(path).read_text())
    names = [r["name"] for r in plan["runs"]]
    for run in plan["runs"]:
        for key in ("init_from", "shape_from"):
            dep = run.get(key)
            if dep is not None and (dep not in names or names.index(dep) >= names.index(run["name"])):
                raise SystemExit(f"demo: {path}: run {run['name']} {key}={dep!r} must name an earlier run")
    for run in plan["runs"]:
        steps = run.get("max_steps")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise SystemExit(
                f"demo: {path}: run {run['name']} needs max_steps, a positive number of optimiser steps"
            )
    unknown = set(plan.get("evaluate", [])) - set(names)
    if unknown:
        raise SystemExit(f"demo: {path}: evaluate names unknown runs {sorted(unknown)}")
    return plan


def runs_needed(plan: dict, only: list[str] | None) -> set[str]:
    """The plan's runs to train: ``only`` (all if None) plus every earlier run they load."""
    names = [r["name"] for r in plan["runs"]]
    wanted = set(names) if not only else set(only)
    unknown = wanted - set(names)
    if unknown:
        raise SystemExit(f"demo: --only names unknown runs {sorted(unknown)} (plan has {names})")
    for run in reversed(plan["runs"]):
        if run["name"] in wanted:
            wanted |= {run[k] for k in ("init_from", "shape_from") if run.get(k)}
    return wanted


def dice_table(summaries: dict[str, dict]) -> str:
    """Markdown: organs x runs, mean test-set Dice (``summary.json`` of ``organseg evaluate``)."""
    runs = list(summaries)
    organs = list(next(iter(summaries.values()))["per_organ"])
    lines = ["| organ | " + " | ".join(runs) + " |", "|---|" + "---:|" * len(runs)]

    def cell(entry: dict | None) -> str:
        value = (entry or {}).get("dice_mean")
        return "-" if value is None or not math.isfinite(value) else f"{value:.3f}"

    for organ in organs:
        lines.append(
            f"| {organ} | " + " | ".join(cell(summaries[r]["per_organ"].get(organ)) for r in runs) + " |"
        )
    lines.append("| **mean** | " + " | ".join(cell(summaries[r]["mean"]) for r in runs) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--plan", default=PLAN, help="demo plan YAML (default: %(default)s)")
    parser.add_argument(
        "--only", nargs="*", default=None, help="run only these runs of the plan (and what they need)"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    plan = load_plan(args.plan)
    exe = str(Path(sys.executable).with_name("organseg"))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    t0, cpu0 = time.time(), children_cpu_seconds()
    wanted = runs_needed(plan, args.only)
    idle = sum(float(r.get("idle_min", 0)) for r in plan["runs"] if r["name"] in wanted)
    total, extra = idle + IDLE_OVERHEAD_MIN, IDLE_OVERHEAD_MIN
    print(
        f"demo: {len(wanted)} training run(s), budgets in optimiser steps; expected ~{total:.0f} min on 2 "
        f"idle CPU cores ({idle:.1f} training + ~{extra:.1f} data and evaluation), longer on a busy "
        "machine (same results)",
        flush=True,
    )
    ph = plan["phantom"]
    sh(
        [
            exe,
            "phantom",
            ph["kind"],
            "--out",
            ph["out"],
            "--cases",
            str(ph["cases"]),
            "--seed",
            str(ph["seed"]),
        ]
    )
    sh([exe, "preprocess", plan["card"]])

    run_ids: dict[str, str] = {}
    for run in plan["runs"]:
        if run["name"] not in wanted:
            continue
        run_id = run_ids[run["name"]] = f"demo-{stamp}-{run['name']}"
        cmd = [exe, "fit"]
        for cfg in run["configs"]:
            cmd += ["-c", cfg]
        cmd += [f"--trainer.max_steps={run['max_steps']}", f"--trainer.logger.init_args.id={run_id}"]
        idle = run.get("idle_min", "?")
        print(f"\n# {run['name']}: {run['max_steps']} optimiser steps, ~{idle} min on 2 idle CPU cores")
        for key in ("init_from", "shape_from"):
            if run.get(key):
                cmd.append(f"--model.init_args.{key}={selected_checkpoint(run_ids[run[key]])}")
        sh(cmd)

    summaries: dict[str, dict] = {}
    for name in plan.get("evaluate", []):
        if name not in run_ids:
            continue
        out = LOGS / run_ids[name] / "eval_test"
        sh(
            [
                exe,
                "evaluate",
                "--ckpt",
                str(selected_checkpoint(run_ids[name])),
                "--split",
                "test",
                "--out",
                str(out),
            ]
        )
        summaries[name] = json.loads((out / "summary.json").read_text())
    if summaries:
        table = dice_table(summaries)
        report = LOGS / f"demo-{stamp}-dice.md"
        report.write_text(f"# make demo, {stamp}: test-set Dice (phantom, demo budget)\n\n{table}\n")
        print(f"\nTest-set Dice per organ (mean over the test cases):\n{table}\n\nwritten to {report}")
    cpu = children_cpu_seconds() - cpu0
    print(
        f"\ndemo finished in {(time.time() - t0) / 60:.1f} min wall, {cpu / 60:.1f} CPU-min "
        f"(about {cpu / 120:.1f} min on 2 idle cores: the wall time if both were free)"
    )
    print(
        f"  runs:        {LOGS}/demo-{stamp}-*  (config_fit.yaml, checkpoints/, eval_test/ with report.md, "
        "per_case.csv, summary.json, overlays/*.png)"
    )
    print("  W&B (offline): lightning_logs/wandb/  -> `wandb sync` it to upload")
    return 0


if __name__ == "__main__":
    sys.exit(main())
