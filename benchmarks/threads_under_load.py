"""Training throughput under CPU load, with and without organseg's thread settings (issue 11).

The demo's baseline U-Net (experiments/baseline/unet.yaml with data_modules/hn_phantom_demo.yaml's data:
H&N phantom at 2 x 2 x 3 mm, batch 2, its augmentation) with ``--workers`` 2 DataLoader workers and
``--patch`` 48x48x16 (the demo's 64x64x32 costs ~6 s per step on 2 loaded cores: too long for a
benchmark of minutes) is trained in each of these settings:

    old              every library's default (before issue 11): ``--threads.enabled=false``, and
                     ``GOMP_SPINCOUNT=300000`` (GNU OpenMP's default, given explicitly, so the
                     ``organseg`` command leaves OpenMP's waiting threads spinning)
    new              the defaults: loader workers 1 thread each, the trainer its share of the cores
                     (``runtime/threads.py``), OpenMP's waiting threads passive (``runtime/openmp.py``)
    new, trainer N   the same with ``--threads.trainer=N`` (``--trainer-threads N``, repeatable)

Each setting is one fresh ``organseg fit`` process (``python -m organseg.cli.main``: thread pools and
OpenMP's policy are per process; the commands are printed) of a FIXED number of optimiser steps:
``--warmup`` untimed steps, a window of ``--window`` steps idle, one untimed step, a window of
``--window`` steps with ``--hogs`` busy-loop processes running beside it (started by a callback in this
module one step before the window, stopped after it). So idle and loaded are measured side by side in
one process, worker start-up not counted; every other repeat times the loaded window first and runs
the settings in reverse order, so drift on a shared machine falls on all of them alike.

The check (issue 11): under load, steps/s falls by no more than the CPU share lost. With C cores and
H single-threaded hogs, a fit that competes fairly gets about C / (C + H) of the machine, so the
printed ratio loaded / idle should be >= that share. Background load from other jobs (printed) makes
"idle" less idle: compare ratios and settings measured in the same run, not absolute steps/s.

Writes OUT/threads_under_load_cpu_<date>.md and .json (OUT: benchmarks/results).

    .venv/bin/python benchmarks/threads_under_load.py [--window 8] [--hogs 2] [--repeats 2]
    .venv/bin/python benchmarks/threads_under_load.py --trainer-threads 1   # also: new, trainer 1 thread
    .venv/bin/python benchmarks/threads_under_load.py --window 2 --repeats 1 --out /tmp   # smoke test
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parent.parent
MODEL = "experiments/baseline/unet.yaml"
DATA = "data_modules/hn_phantom_demo.yaml"
CARD = "data_modules/cards/hn_phantom_demo.yaml"
HOG = "while True:\n    pass\n"
OLD_ENV = {"GOMP_SPINCOUNT": "300000"}  # GNU OpenMP's own default spin count, given explicitly
LOADS = ("idle", "loaded")


class StepTimer(Callback):
    """Times two windows of ``window`` optimiser steps in one fit, idle and loaded, after ``warmup``
    untimed steps: ``hogs`` busy-loop processes (children of this process, so in its process group) run
    during the loaded window (``loaded_first``: the first one) and the step before it; one untimed step
    separates the windows. Per window: wall and trainer-process CPU seconds; written as JSON to ``out``."""

    def __init__(self, out: str, warmup: int, window: int, hogs: int, loaded_first: bool = False):
        self.out, self.warmup, self.window, self.hogs = out, warmup, window, hogs
        self.loads = ["loaded", "idle"] if loaded_first else ["idle", "loaded"]
        self.starts = [warmup, warmup + window + 1]
        self.procs: list[subprocess.Popen] = []
        self.results: dict = {}
        self._t0 = self._c0 = 0.0

    def _load(self, on: bool) -> None:
        if on and not self.procs:
            self.procs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(self.hogs)]
        elif not on:
            for proc in self.procs:
                proc.kill()
                proc.wait()
            self.procs = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import torch

        step = trainer.global_step  # optimiser steps done
        print(f"step {step} at {time.perf_counter():.2f} s", flush=True)  # progress, in the fit's log
        for i, first in enumerate(self.starts):
            if step == first - 1:  # the load of the coming window, one step ahead
                self._load(self.loads[i] == "loaded")
            if step == first:
                self._t0, self._c0 = time.perf_counter(), time.process_time()
            if step == first + self.window:
                wall, cpu = time.perf_counter() - self._t0, time.process_time() - self._c0
                self.results[self.loads[i]] = {
                    "steps": self.window,
                    "wall_s": wall,
                    "steps_per_s": self.window / wall,
                    "trainer_cpu_s": cpu,
                    "loadavg_1min": os.getloadavg()[0],  # the machine's, hogs included
                }
        if len(self.results) == 2:
            self._load(False)
            self.results["torch_threads"] = torch.get_num_threads()
            Path(self.out).write_text(json.dumps(self.results))
            self.results = {}

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._load(False)


# ------------------------------------------------------------------------------------------- data
def prepare(work: Path, args: argparse.Namespace) -> Path:
    """Phantom cases, a card derived from the demo's (cache under ``work``) and the budget config."""
    from organseg.cache.build import build_cache
    from organseg.cli.main import main as organseg
    from organseg.io.card import DatasetCard

    raw = work / "raw"
    if len(list((raw / "imagesTr").glob("*_0000.nii.gz"))) != args.cases:
        organseg(["phantom", "hn", "--out", str(raw), "--cases", str(args.cases), "--seed", "0", "--quiet"])
    spec = yaml.safe_load((ROOT / CARD).read_text())
    spec.update(
        name="bench_threads",
        path=str(raw),
        cache=str(work / "bench_threads.h5"),
        split={"val": 1, "test": 0, "seed": 0},
    )
    card = work / "card.yaml"
    card.write_text(f"# derived from {CARD} by benchmarks/threads_under_load.py\n" + yaml.safe_dump(spec))
    build_cache(DatasetCard.load(card), workers=args.workers, progress=False)
    steps = total_steps(args)
    budget = {
        "trainer": {
            "max_steps": steps,
            "max_epochs": 1,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "accelerator": "cpu",
            "devices": 1,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(work / "runs"),
        },
        "data": {
            "init_args": {
                "cards": [str(card)],
                "patch_size": list(args.patch),
                "batch_size": args.batch_size,
                "patches_per_epoch": args.batch_size * (steps + 4),  # one epoch: no epoch end in the timing
                "num_workers": args.workers,
                "preprocess": False,
            }
        },
    }
    cfg = work / "budget.yaml"
    cfg.write_text("# by benchmarks/threads_under_load.py\n" + yaml.safe_dump(budget, sort_keys=False))
    return cfg


def total_steps(args: argparse.Namespace) -> int:
    return args.warmup + 2 * args.window + 1


# ------------------------------------------------------------------------------------------- runs
def stop(proc: subprocess.Popen) -> None:
    """End a fit and everything in its process group (its session: loader workers, hogs)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def run_fit(timer: dict, fit_args: list[str], extra_env: dict, log: Path, timeout: float) -> dict:
    """One ``organseg fit`` in a fresh process, started as the ``organseg`` command starts (so its
    OpenMP wait policy is chosen before torch loads), with this module's StepTimer added."""
    result = log.with_suffix(".json")
    result.unlink(missing_ok=True)
    callback = {"class_path": "threads_under_load.StepTimer", "init_args": {**timer, "out": str(result)}}
    cmd = [sys.executable, "-m", "organseg.cli.main", *fit_args]
    cmd.append(f"--trainer.callbacks+={json.dumps(callback)}")
    shown = " ".join(f"{k}={v}" for k, v in extra_env.items())
    print(f"$ {shown + ' ' if shown else ''}{' '.join(shlex.quote(a) for a in cmd)}", flush=True)
    path = os.pathsep.join([str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "PYTHONPATH": path, **extra_env}
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = 124
        finally:
            stop(proc)
    wall = time.perf_counter() - t0
    lines = log.read_text(errors="replace").splitlines()
    threads_line = next((ln for ln in lines if ln.startswith("organseg: threads:")), "")
    if rc != 0 or not result.is_file():
        return {"ok": False, "rc": rc, "process_wall_s": wall, "tail": "\n".join(lines[-15:])}
    timing = json.loads(result.read_text())
    return {"ok": True, **timing, "process_wall_s": wall, "threads_line": threads_line}


# ------------------------------------------------------------------------------------------- report
def spread(values: list[float], digits: int = 3) -> str:
    if not values:
        return "failed"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def summarise(rows: list[dict], modes: list[str], share: float) -> tuple[list[str], dict]:
    """One table row per setting; per fit: steps/s, trainer CPU (cores) and CPU seconds per step for
    each window, and the loaded / idle ratios of steps/s and of CPU; then mean (min-max) over fits."""
    table = [
        "| setting | threads (printed at fit start) | idle steps/s | loaded steps/s | **loaded / idle "
        "steps/s** | trainer CPU idle / loaded (cores) | loaded / idle CPU | CPU s per step idle / loaded |",
        "|---|---|---|---|---|---|---|---|",
    ]
    summary = {}
    for mode in modes:
        fits = [r for r in rows if r["mode"] == mode and r["ok"]]
        rate = {load: [r[load]["steps_per_s"] for r in fits] for load in LOADS}
        cores = {load: [r[load]["trainer_cpu_s"] / r[load]["wall_s"] for r in fits] for load in LOADS}
        per_step = {load: [r[load]["trainer_cpu_s"] / r[load]["steps"] for r in fits] for load in LOADS}
        ratios = [r["loaded"]["steps_per_s"] / r["idle"]["steps_per_s"] for r in fits]
        cpu_ratios = [lo / idle for idle, lo in zip(cores["idle"], cores["loaded"])]
        line = next((r["threads_line"] for r in fits if r.get("threads_line")), "")
        line = line.removeprefix("organseg: threads: ")
        summary[mode] = {
            "threads": line,
            "idle_steps_per_s": rate["idle"],
            "loaded_steps_per_s": rate["loaded"],
            "loaded_over_idle": ratios,
            "loaded_over_idle_mean": statistics.mean(ratios) if ratios else None,
            "trainer_cpu_cores": cores,
            "cpu_loaded_over_idle": cpu_ratios,
            "cpu_s_per_step": per_step,
            "expected_share": share,
        }
        table.append(
            f"| {mode} | {line} | {spread(rate['idle'])} | {spread(rate['loaded'])} | "
            f"**{spread(ratios, 2)}** | "
            f"{spread(cores['idle'], 2)} / {spread(cores['loaded'], 2)} | {spread(cpu_ratios, 2)} | "
            f"{spread(per_step['idle'], 2)} / {spread(per_step['loaded'], 2)} |"
        )
    return table, summary


def versus(summary: dict, modes: list[str]) -> list[str]:
    """Each setting's mean steps/s over the first (old) one's, idle and loaded."""
    old = summary[modes[0]]
    out = []
    for mode in modes[1:]:
        parts = [
            f"{load} {statistics.mean(summary[mode][key]) / statistics.mean(old[key]):.2f}x"
            for load, key in (("idle", "idle_steps_per_s"), ("loaded", "loaded_steps_per_s"))
            if summary[mode][key] and old[key]
        ]
        out.append(f"- {mode} / {modes[0]}: " + ", ".join(parts))
    return out


def verdicts(summary: dict, share: float) -> list[str]:
    """Per setting: did steps/s fall by no more than the CPU share lost (nominal and measured)?"""
    out = []
    for mode, got in summary.items():
        if not got["loaded_over_idle"]:
            continue
        steps = statistics.mean(got["loaded_over_idle"])
        cpu = statistics.mean(got["cpu_loaded_over_idle"])
        per_step = {load: statistics.mean(v) for load, v in got["cpu_s_per_step"].items()}
        out.append(
            f"- {mode}: steps/s fell to {steps:.2f} of idle (nominal share {share:.2f}: "
            f"{'met' if steps >= share else 'not met'}) while the trainer's CPU fell to {cpu:.2f}: "
            f"{'no more' if steps >= 0.9 * cpu else 'more'} than the CPU it lost (steps per CPU second "
            f"loaded / idle {steps / cpu:.2f}; CPU s per step {per_step['idle']:.2f} idle, "
            f"{per_step['loaded']:.2f} loaded)"
        )
    return out


def render(report: dict) -> str:
    """The Markdown of a run (``report``: what the .json holds)."""
    meta, rows = report["meta"], report["runs"]
    modes = list(dict.fromkeys(r["mode"] for r in sorted(rows, key=lambda r: r["repeat"] % 2)))
    share = meta["expected_share"]
    table, summary = summarise(rows, modes, share)
    report["summary"] = summary
    cores, hogs = meta["cores"], meta["hogs"]
    loads = [r[w]["loadavg_1min"] for r in rows if r["ok"] for w in LOADS if "loadavg_1min" in r[w]]
    background = (
        f", {min(loads):.1f}-{max(loads):.1f} at the ends of the windows (hogs included)" if loads else ""
    )
    patch = "x".join(map(str, meta["patch"]))
    lines = [
        "# Training throughput under CPU load: thread settings old vs new",
        "",
        f"Generated by `{meta['command']}` on {meta['date']} ({cores} CPU cores; a shared machine: "
        f"load average {meta['loadavg_before']:.2f} before the run{background}).",
        "",
        f"steps/s of the demo's baseline U-Net in `organseg fit` ({MODEL}, {DATA} with patch {patch}, "
        f"batch {meta['batch']}, {meta['workers']} DataLoader workers), one fit per setting and repeat: "
        f"{meta['warmup']} untimed steps, {meta['window']} steps idle, 1 untimed, {meta['window']} steps "
        f"with {hogs} busy-loop processes beside it (the loaded window first in odd repeats); mean (min-max) "
        f"over {meta['repeats']} repeats, ratios taken per fit. old = `--threads.enabled=false` with "
        "`GOMP_SPINCOUNT=300000` (OpenMP's default spinning); new = the defaults (loader workers 1 thread, "
        "trainer its share of the cores, `OMP_WAIT_POLICY=PASSIVE` set by the `organseg` command). Trainer "
        "CPU: CPU seconds of the trainer process (loader workers not counted) per wall second, and per step.",
        "",
        *table,
        "",
        f"The check (issue 11): steps/s falls by no more than the CPU share lost. Nominal share: cores / "
        f"(cores + hogs) = {cores} / {cores + hogs} = {share:.2f}, what a fit holding all cores keeps under "
        "per-thread fair scheduling; other jobs on the machine (in their own sessions, which Linux "
        "schedules as groups) take their part too, so the measured CPU ratio is the share the fit got:",
        "",
        *verdicts(summary, share),
        "",
        "Each setting's steps/s over the old one's (means over the repeats):",
        "",
        *versus(summary, modes),
        "",
        f"Total wall time {meta['total_wall_s'] / 60:.1f} min.",
    ]
    return "\n".join(lines) + "\n"


def write(report: dict, out: Path, name: str) -> None:
    text = render(report)
    print("\n" + text)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {out / name}.md and .json")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--window", type=int, default=8, help="timed optimiser steps per load (default 8)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps at the start (default 3, >= 2)")
    ap.add_argument("--hogs", type=int, default=2, help="busy-loop processes during the loaded window")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cases", type=int, default=4, help="phantom cases (3 train + 1 val)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers per fit (default 2)")
    ap.add_argument("--patch", type=int, nargs=3, default=[48, 48, 16], metavar=("X", "Y", "Z"))
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument(
        "--trainer-threads",
        type=int,
        action="append",
        default=[],
        help="also time the new settings with this many trainer threads (repeatable)",
    )
    ap.add_argument("--work", default="data/bench_threads", help="phantom, cache, logs and run folders")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--timeout", type=float, default=900, help="seconds before one fit is stopped")
    ap.add_argument("--render", metavar="JSON", help="only rewrite the .md of a run's .json (no fits)")
    args = ap.parse_args()
    if args.render:
        path = Path(args.render)
        write(json.loads(path.read_text()), path.parent, path.stem)
        return 0
    if args.warmup < 2 or args.window < 1:
        ap.error("need --warmup >= 2 and --window >= 1")
    # a SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C: the running fit and its hogs are stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    os.chdir(ROOT)
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    work = Path(args.work).resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    budget = prepare(work, args)
    from organseg.runtime.threads import available_cpus

    cores = available_cpus()
    share = cores / (cores + args.hogs)
    # setting -> (organseg fit arguments, environment); OLD_ENV keeps the organseg command from choosing
    # OpenMP's wait policy (runtime/openmp.py: a policy given in the environment wins)
    modes = {"old (library defaults)": (["--threads.enabled=false"], OLD_ENV), "new (defaults)": ([], {})}
    for n in args.trainer_threads:
        modes[f"new, trainer {n}"] = ([f"--threads.trainer={n}"], {})
    base = ["fit", "-c", MODEL, "-c", DATA, "-c", str(budget)]
    print(
        f"\n{cores} cores, {args.hogs} hogs (CPU share expected under load {share:.2f}), load average "
        f"before {load_before[0]:.2f}; per fit {total_steps(args)} optimiser steps: {args.warmup} untimed, "
        f"{args.window} idle, 1 untimed, {args.window} loaded (loaded first in odd repeats)",
        flush=True,
    )

    rows: list[dict] = []
    for rep in range(args.repeats):
        timer = {
            "warmup": args.warmup,
            "window": args.window,
            "hogs": args.hogs,
            "loaded_first": rep % 2 == 1,
        }
        for mode in list(modes) if rep % 2 == 0 else list(modes)[::-1]:
            fit_args, env = modes[mode]
            log = work / "logs" / f"r{rep}-{list(modes).index(mode)}.log"
            res = run_fit(timer, [*base, *fit_args], env, log, args.timeout)
            res.update(mode=mode, repeat=rep, loaded_first=timer["loaded_first"])
            rows.append(res)
            if not res["ok"]:
                print(f"  repeat {rep} {mode}: FAILED rc={res['rc']}\n{res['tail']}", flush=True)
                continue
            idle, loaded = res["idle"]["steps_per_s"], res["loaded"]["steps_per_s"]
            print(
                f"  repeat {rep} {mode:24s} idle {idle:.3f}, loaded {loaded:.3f} steps/s: ratio "
                f"{loaded / idle:.2f} ({res['threads_line']})",
                flush=True,
            )

    stamp = dt.datetime.now(dt.timezone.utc)
    meta = {
        "command": " ".join(["python benchmarks/threads_under_load.py", *map(shlex.quote, sys.argv[1:])]),
        "date": f"{stamp:%Y-%m-%d %H:%M} UTC",
        "cores": cores,
        "hogs": args.hogs,
        "expected_share": share,
        "warmup": args.warmup,
        "window": args.window,
        "repeats": args.repeats,
        "workers": args.workers,
        "patch": args.patch,
        "batch": args.batch_size,
        "loadavg_before": load_before[0],
        "total_wall_s": time.perf_counter() - t_start,
    }
    write({"meta": meta, "runs": rows}, Path(args.out), f"threads_under_load_cpu_{stamp:%Y-%m-%d}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
