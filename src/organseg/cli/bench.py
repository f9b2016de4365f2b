"""``organseg bench BENCH.yaml``: run every arm of a benchmark for every seed, evaluate each on the test
split, and write one result folder with intervals (``evaluation/benchmark_report.py``).

A benchmark YAML (``benchmarks/*.yaml``)::

    name: focusnet_phantom              # results go to benchmarks/results/<name>-<date>/ (or --out)
    prepare:                            # optional: commands run first, e.g. the phantom and its cache
      - [phantom, hn, --out, data/raw/hn_phantom, --cases, "24", --seed, "0"]
      - [preprocess, data_modules/cards/hn_phantom_demo.yaml]
    seeds: [0, 1, 2]                    # every arm runs every seed (model init, data order, patches)
    split: test                         # evaluated split of the data config's card
    checkpoint: last                    # last | best (best: by the run's validation monitor)
    groups: {large: [brainstem, ...], small: [chiasm, ...]}
    arms:
      unet:
        - {name: unet, configs: [experiments/baseline/unet.yaml, ...], max_steps: 256}
      focusnetv2:                       # a chain: each run may load an earlier run of its arm
        - {name: snet, configs: [...], max_steps: 128}
        - {name: sol, configs: [...], max_steps: 128, init_from: snet}
      multi_model:                      # an arm may be a mapping: its runs and what is evaluated
        runs:
          - {name: kidneys, configs: [...], max_steps: 300}
          - {name: pancreas, configs: [...], max_steps: 300}
          - {name: pseudo, pseudolabel: {ckpts: [kidneys, pancreas], cards: [a.yaml, b.yaml]}}
          - {name: union, configs: [...], max_steps: 300, pseudo_from: pseudo}
        evaluate: [kidneys, pancreas]   # several checkpoints: evaluated together (MultiModel)
    compare: [[focusnetv2, unet]]       # paired differences A - B, with bootstrap intervals
    args: [--trainer.limit_val_batches=0]   # appended to every fit; {max_steps} / {max_steps*0.5}: the run's
                                        # budget / a fraction of it (so schedules follow --quick's scaling)
    test_data: cards/test.yaml          # optional: evaluate on this card (default: the checkpoint's first)
    quick:                              # --quick: what changes for the small CPU size
      seeds: [0, 1, 2]
      steps_scale: 0.25                 # every max_steps x this (at least 1)
      args: [--data.init_args.patch_size=[48,48,16]]   # appended to every fit after the args above
      replace_configs: {data_modules/hn_phantom_focusnet.yaml: data_modules/hn_phantom_focusnet_demo.yaml}
      prepare: [...]                    # instead of the prepare above

A ``pseudolabel`` run writes ``organseg pseudolabel`` files of the named runs' checkpoints, one per card,
under ``<out>/work/``; a later fit with ``pseudo_from`` trains on them (``--data.init_args.pseudo_labels``,
in the cards' order). ``quick.replace_configs`` replaces a path wherever it appears: configs, args, cards,
``test_data``; a list value (``a.yaml: [b.yaml, overlay.yaml]``) replaces a run's config by several, in order
(configs only: args, cards and ``test_data`` take string values).

Budgets are optimiser steps (``max_steps`` per run; an arm's budget is the sum over its runs), never
wall time; each run's steps, wall time and machine load are recorded. Resumable: a run is skipped when
its state file says it finished with the same command and config files and its checkpoint is there, and
an (arm, seed) is not evaluated again while its runs are unchanged; kill the command and start it again
and it continues (edit a budget or a config and what depends on it is trained again). The runs' own
folders are ``lightning_logs/organseg/<name>-<arm>-s<seed>-<run>``. A run whose chain up to it is
identical in two arms (same configs, steps and loads) is trained once per seed and shared by both.
A run made again (e.g. pseudo-labels gone stale because ``prepare`` rebuilt a cache) retrains what loads it.

``--arms A B`` runs some arms only; the table still shows every arm on record in ``--out``: its state
files, else the result files themselves (``summary.json`` + ``per_case.csv``, as committed), so a fresh
clone can add an arm to a committed benchmark without training the others again. ``--report-only`` reads
the same records. Each (arm, seed) keeps the git commit it ran at.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from organseg.errors import ConfigError, OrgansegError
from organseg.runs import run_checkpoint

LOGS = Path("lightning_logs/organseg")
KNOWN_KEYS = {
    "name",
    "prepare",
    "seeds",
    "split",
    "checkpoint",
    "groups",
    "arms",
    "compare",
    "args",
    "quick",
    "test_data",
}
QUICK_KEYS = {"seeds", "steps_scale", "args", "replace_configs", "prepare"}
RUN_KEYS = {"name", "configs", "max_steps", "init_from", "shape_from", "pseudo_from", "args"}
PSEUDO_RUN_KEYS = {"name", "pseudolabel"}
ARM_KEYS = {"runs", "evaluate"}


class BenchError(OrgansegError):
    """A command of the benchmark failed (its log is named) or left no checkpoint."""


@dataclass
class Run:
    """One ``organseg fit`` of ``max_steps`` optimiser steps, or (``pseudo`` set, no steps) one
    ``organseg pseudolabel`` per card from earlier runs' checkpoints."""

    name: str
    configs: list[str]
    max_steps: int
    loads: dict[str, str] = field(default_factory=dict)  # init_from / shape_from / pseudo_from -> earlier run
    args: list[str] = field(default_factory=list)
    pseudo: dict[str, list[str]] | None = None  # {"ckpts": [earlier run names], "cards": [card paths]}
    # the first arm (YAML order) whose chain up to and including this run is identical: that arm's run is
    # trained once per seed and shared (same seed, same configs and steps = the same run)
    owner: str = ""


@dataclass
class Benchmark:
    path: Path
    name: str
    seeds: list[int]
    arms: dict[str, list[Run]]
    prepare: list[list[str]] = field(default_factory=list)
    split: str = "test"
    checkpoint: str = "last"
    groups: dict[str, list[str]] = field(default_factory=dict)
    compare: list[tuple[str, str]] = field(default_factory=list)
    fit_args: list[str] = field(default_factory=list)
    evaluate: dict[str, list[str]] = field(default_factory=dict)  # arm -> runs evaluated together
    test_data: str | None = None


BUDGET = re.compile(r"\{max_steps(?:\*([0-9]*\.?[0-9]+))?\}")


def _with_budget(arg: str, max_steps: int) -> str:
    """``{max_steps}`` -> the run's budget, ``{max_steps*0.5}`` -> that fraction of it (rounded, >= 1), so a
    schedule follows the budget at every size (``--quick`` scales the steps)."""
    return BUDGET.sub(lambda m: str(max(1, round(max_steps * float(m.group(1) or 1)))), arg)


def _replaced(text: str, replace: dict[str, str]) -> str:
    for old, new in replace.items():
        text = text.replace(old, new)
    return text


def load_benchmark(path: str | Path, quick: bool = False) -> Benchmark:
    """Parse and check a benchmark YAML; every problem is one ConfigError naming the file and key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such benchmark file")
    spec = yaml.safe_load(path.read_text()) or {}

    def bad(key: str, problem: str) -> ConfigError:
        return ConfigError(f"{path}: {key}: {problem}")

    if not isinstance(spec, dict):
        raise bad("(top level)", "must be a mapping")
    unknown = set(spec) - KNOWN_KEYS
    if unknown:
        raise bad("(top level)", f"unknown key(s) {sorted(unknown)}; known: {sorted(KNOWN_KEYS)}")
    for key in ("name", "arms"):
        if key not in spec:
            raise bad(key, "missing")
    quick_spec = spec.get("quick") or {}
    unknown = set(quick_spec) - QUICK_KEYS
    if unknown:
        raise bad("quick", f"unknown key(s) {sorted(unknown)}; known: {sorted(QUICK_KEYS)}")
    replace_spec = (quick_spec.get("replace_configs") or {}) if quick else {}
    if not isinstance(replace_spec, dict):
        raise bad("quick.replace_configs", "must map a path to a path or a list of paths")
    # string values replace text everywhere; list values replace a run's config by several (configs only)
    replace = {str(k): str(v) for k, v in replace_spec.items() if not isinstance(v, list)}
    expand = {str(k): [str(x) for x in v] for k, v in replace_spec.items() if isinstance(v, list)}
    seeds = quick_spec.get("seeds", spec.get("seeds", [0])) if quick else spec.get("seeds", [0])
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise bad("seeds", f"must be a list of non-negative integers, got {seeds!r}")
    scale = float(quick_spec.get("steps_scale", 1.0)) if quick else 1.0
    if scale <= 0:
        raise bad("quick.steps_scale", f"must be > 0, got {scale}")
    arms: dict[str, list[Run]] = {}
    evaluate: dict[str, list[str]] = {}
    if not isinstance(spec["arms"], dict) or not spec["arms"]:
        raise bad("arms", "must map arm names to lists of runs")
    for arm, runs in spec["arms"].items():
        arm = str(arm)
        chosen = None
        if isinstance(runs, dict):
            unknown = set(runs) - ARM_KEYS
            if unknown or "runs" not in runs:
                raise bad(
                    f"arms.{arm}", f"a mapping needs runs (and optionally evaluate), got {sorted(runs)}"
                )
            runs, chosen = runs["runs"], runs.get("evaluate")
        arms[arm] = _runs(runs, scale, replace, lambda k, p, a=arm: bad(f"arms.{a}{k}", p), expand)
        fits = [r.name for r in arms[arm] if r.pseudo is None]
        chosen = [str(c) for c in (chosen if chosen is not None else fits[-1:])]
        if not chosen or any(c not in fits for c in chosen):
            raise bad(f"arms.{arm}.evaluate", f"must name trained runs of the arm ({fits}), got {chosen}")
        evaluate[arm] = chosen
    test_data = spec.get("test_data")
    if test_data is not None:
        test_data = _replaced(str(test_data), replace)
        if not Path(test_data).is_file():
            raise bad("test_data", f"no such card {test_data}")
    compare = []
    for pair in spec.get("compare") or []:
        if not (isinstance(pair, list) and len(pair) == 2 and all(p in arms for p in pair)):
            raise bad("compare", f"each entry must name two arms of {sorted(arms)}, got {pair!r}")
        compare.append((pair[0], pair[1]))
    _assign_owners(arms)
    checkpoint = spec.get("checkpoint", "last")
    if checkpoint not in ("last", "best"):
        raise bad("checkpoint", f"must be last or best, got {checkpoint!r}")
    return Benchmark(
        path=path,
        name=str(spec["name"]),
        seeds=[int(s) for s in seeds],
        arms=arms,
        prepare=[
            [str(a) for a in cmd]
            for cmd in (quick_spec.get("prepare", spec.get("prepare")) if quick else spec.get("prepare"))
            or []
        ],
        split=str(spec.get("split", "test")),
        checkpoint=checkpoint,
        groups={str(k): list(v) for k, v in (spec.get("groups") or {}).items()},
        compare=compare,
        fit_args=[
            _replaced(str(a), replace)
            for a in [*(spec.get("args") or []), *((quick_spec.get("args") or []) if quick else [])]
        ],
        evaluate=evaluate,
        test_data=test_data,
    )


def select_arms(bench: Benchmark, names: Sequence[str]) -> Benchmark:
    """The benchmark restricted to some arms (and the comparisons among them). Shared runs keep the
    owner they have in the whole YAML, so their run ids, and so what is on record, stay the same."""
    unknown = [n for n in names if n not in bench.arms]
    if unknown:
        raise ConfigError(f"{bench.path}: --arms: unknown arm(s) {unknown}; the file has {list(bench.arms)}")
    keep = [a for a in bench.arms if a in names]
    return dataclasses.replace(
        bench,
        arms={a: bench.arms[a] for a in keep},
        compare=[(a, b) for a, b in bench.compare if a in keep and b in keep],
        evaluate={a: e for a, e in bench.evaluate.items() if a in keep},
    )


def _assign_owners(arms: dict[str, list[Run]]) -> None:
    first: dict[tuple, str] = {}
    for arm, runs in arms.items():
        prefix: tuple = ()
        for run in runs:
            prefix += (
                (
                    run.name,
                    tuple(run.configs),
                    run.max_steps,
                    tuple(sorted(run.loads.items())),
                    tuple(run.args),
                    repr(run.pseudo),
                ),
            )
            run.owner = first.setdefault(prefix, arm)


def _runs(
    runs,
    scale: float,
    replace: dict[str, str],
    bad: Callable[[str, str], ConfigError],
    expand: dict[str, list[str]] | None = None,
) -> list[Run]:
    if not isinstance(runs, list) or not runs:
        raise bad("", "must be a non-empty list of runs")
    out: list[Run] = []
    for i, run in enumerate(runs):
        where = f"[{i}]"
        if isinstance(run, dict) and "pseudolabel" in run:
            out.append(_pseudo_run(run, out, replace, lambda k, p, w=where: bad(f"{w}{k}", p)))
            continue
        if not isinstance(run, dict) or "name" not in run or "configs" not in run:
            raise bad(where, "each run needs name and configs (or name and pseudolabel)")
        unknown = set(run) - RUN_KEYS
        if unknown:
            raise bad(where, f"unknown key(s) {sorted(unknown)}; known: {sorted(RUN_KEYS)}")
        steps = run.get("max_steps")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise bad(f"{where}.max_steps", f"must be a positive number of optimiser steps, got {steps!r}")
        configs = [
            new for c in run["configs"] for new in (expand or {}).get(str(c), [replace.get(str(c), str(c))])
        ]
        for cfg in configs:
            if not Path(cfg).is_file():
                raise bad(f"{where}.configs", f"no such config file {cfg}")
        loads = {k: run[k] for k in ("init_from", "shape_from", "pseudo_from") if run.get(k)}
        for key, dep in loads.items():
            kinds = [r.name for r in out if (r.pseudo is not None) == (key == "pseudo_from")]
            if dep not in kinds:
                what = "pseudolabel" if key == "pseudo_from" else "trained"
                raise bad(
                    f"{where}.{key}", f"must name an earlier {what} run of the arm ({kinds}), got {dep!r}"
                )
        out.append(
            Run(
                str(run["name"]),
                configs,
                max(1, round(steps * scale)),
                loads,
                [_replaced(str(a), replace) for a in run.get("args", [])],
            )
        )
    return out


def _pseudo_run(run: dict, earlier: list[Run], replace: dict[str, str], bad) -> Run:
    unknown = set(run) - PSEUDO_RUN_KEYS
    if unknown or "name" not in run:
        raise bad("", f"a pseudolabel run has name and pseudolabel only, got {sorted(run)}")
    spec = run["pseudolabel"]
    if not isinstance(spec, dict) or set(spec) != {"ckpts", "cards"}:
        raise bad(".pseudolabel", "must be {ckpts: [earlier runs], cards: [dataset cards]}")
    fits = [r.name for r in earlier if r.pseudo is None]
    ckpts = [str(c) for c in spec["ckpts"] or []]
    if not ckpts or any(c not in fits for c in ckpts):
        raise bad(".pseudolabel.ckpts", f"must name earlier trained runs of the arm ({fits}), got {ckpts}")
    cards = [_replaced(str(c), replace) for c in spec["cards"] or []]
    for card in cards:
        if not Path(card).is_file():
            raise bad(".pseudolabel.cards", f"no such card {card}")
    if not cards:
        raise bad(".pseudolabel.cards", "must list at least one dataset card")
    return Run(str(run["name"]), [], 0, pseudo={"ckpts": ckpts, "cards": cards})


# ---------------------------------------------------------------------------------------------- running
def organseg_subprocess(args: Sequence[str], log_stem: Path) -> int:
    """Run ``organseg ARGS`` as a child process, stdout/stderr to ``log_stem.{out,err}``."""
    exe = shutil.which("organseg") or str(Path(sys.executable).with_name("organseg"))
    log_stem.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{log_stem}.out", "w") as out, open(f"{log_stem}.err", "w") as err:
        return subprocess.run(
            [exe, *args], stdout=out, stderr=err, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        ).returncode


def _quote(args: Sequence[str]) -> str:
    return "organseg " + " ".join(shlex.quote(a) for a in args)


def _write_json(path: Path, data: dict) -> None:
    from organseg.io.atomic import atomic_open  # noqa: PLC0415

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w") as f:
        json.dump(data, f, indent=2)


def _inputs_digest(configs: Sequence[str], made: Sequence[str] = ()) -> str:
    """What the config files of a run say (their bytes) and which making of each earlier run it loads
    (``made``), so that an edited config, or a dependency made again, retrains the run."""
    digest = hashlib.sha256()
    for cfg in configs:
        digest.update(str(cfg).encode() + b"\0" + Path(cfg).read_bytes() + b"\0")
    for stamp in made:
        digest.update(stamp.encode() + b"\0")
    return digest.hexdigest()[:16]


def _stale_pseudo_labels(files: Sequence[str], cards: Sequence[str]) -> str | None:
    """Why pseudo-label files on record can no longer be used (their card's cache was rebuilt since,
    e.g. by ``prepare`` after the raw data was regenerated, or an expert checkpoint changed), else None:
    the check the fit that reads them makes, run here so that the bench makes them again instead."""
    from organseg.data.pseudo_labels import pseudo_label_problem  # noqa: PLC0415  (h5py: only when running)

    return next((p for f, c in zip(files, cards) if (p := pseudo_label_problem(f, c))), None)


def _global_step(ckpt: Path) -> int | None:
    from organseg.methods.checkpoints import read_checkpoint  # noqa: PLC0415  (torch: only when running)

    return read_checkpoint(ckpt).get("global_step")


class BenchRunner:
    """Runs a :class:`Benchmark` into ``out`` (state files in ``out/state``, logs in ``out/logs``).
    ``execute(args, log_stem) -> exit status`` runs one ``organseg`` command (a subprocess by default)."""

    def __init__(
        self,
        bench: Benchmark,
        out: Path,
        execute: Callable[[Sequence[str], Path], int] | None = None,
        command: str | None = None,
        stale_pseudo_labels: Callable[[Sequence[str], Sequence[str]], str | None] = _stale_pseudo_labels,
        whole: Benchmark | None = None,
    ):
        self.bench, self.out, self.command = bench, out, command
        self.whole = whole or bench  # the YAML's every arm: what the report shows (``bench``: what runs)
        self.execute = execute or organseg_subprocess
        self.stale_pseudo_labels = stale_pseudo_labels

    def run_id(self, arm: str, seed: int, run: Run) -> str:
        """``<bench>-<arm>-s<seed>-<run>``, named after the run's owner arm when the run is shared."""
        return f"{self.bench.name}-{run.owner or arm}-s{seed}-{run.name}"

    def _state(self, key: str) -> Path:
        return self.out / "state" / f"{key}.json"

    def _call(self, args: list[str], log_name: str) -> None:
        print(f"\n$ {_quote(args)}", flush=True)
        rc = self.execute(args, self.out / "logs" / log_name)
        if rc != 0:
            log = self.out / "logs" / f"{log_name}.err"
            raise BenchError(f"{self.bench.path}: `{_quote(args)}` exited with status {rc}; see {log}")

    def fit(self, arm: str, seed: int, run: Run, done: dict[str, dict]) -> dict:
        """Train one run, or reuse it when its state file records the same command and config files
        (another ``max_steps``, config or checkpoint to load: trained again) and its checkpoint is there."""
        run_id = self.run_id(arm, seed, run)
        args = ["fit"] + [a for cfg in run.configs for a in ("-c", cfg)]
        args += [
            f"--trainer.max_steps={run.max_steps}",
            f"--seed_everything={seed}",
            f"--data.init_args.seed={seed}",
            f"--trainer.logger.init_args.id={run_id}",
            *(_with_budget(a, run.max_steps) for a in [*self.bench.fit_args, *run.args]),
        ]
        for key, dep in run.loads.items():
            if key == "pseudo_from":
                args.append(f"--data.init_args.pseudo_labels=[{','.join(done[dep]['files'])}]")
            else:
                args.append(f"--model.init_args.{key}={done[dep]['checkpoint']}")
        inputs = _inputs_digest(run.configs, [done[dep].get("made", "") for dep in run.loads.values()])
        record = self._finished(run_id, args, inputs, "checkpoint")
        if record:
            print(f"= {run_id}: finished before ({record['steps']} steps), skipped", flush=True)
            return record
        shutil.rmtree(LOGS / run_id, ignore_errors=True)  # an unfinished or outdated attempt: ours to remove
        load_before, t0 = os.getloadavg()[0], time.perf_counter()
        self._call(args, run_id)
        wall = time.perf_counter() - t0
        ckpt = run_checkpoint(LOGS / run_id, self.bench.checkpoint)
        if ckpt is None:
            raise BenchError(f"{self.bench.path}: run {run_id} wrote no checkpoint under {LOGS / run_id}")
        record = {
            "run_id": run_id,
            "command": _quote(args),
            "inputs": inputs,
            "made": uuid.uuid4().hex[:12],  # which making of this run a later run loaded
            "checkpoint": str(ckpt),
            "max_steps": run.max_steps,
            "steps": _global_step(ckpt),
            "wall_s": round(wall, 1),
            "load_before": load_before,
            "load_after": os.getloadavg()[0],
        }
        _write_json(self._state(run_id), record)
        return record

    def _finished(self, run_id: str, args: list[str], inputs: str, output: str) -> dict | None:
        """The run's record when it finished with the same command and config files and its ``output``
        (a checkpoint, or pseudo-label ``files``) is still there; else None (it runs, again)."""
        state = self._state(run_id)
        if not state.is_file():
            return None
        record = json.loads(state.read_text())
        same = record["command"] == _quote(args) and record.get("inputs", inputs) == inputs
        outputs = record[output] if isinstance(record.get(output), list) else [record.get(output, "")]
        if same and all(Path(o).is_file() for o in outputs):
            return record
        print(f"~ {run_id}: its command or configs changed since it ran: run again", flush=True)
        return None

    def pseudolabel(self, arm: str, seed: int, run: Run, done: dict[str, dict]) -> dict:
        """``organseg pseudolabel`` of each card from the named runs' checkpoints, into ``out/work``."""
        run_id = self.run_id(arm, seed, run)
        ckpts = [done[name]["checkpoint"] for name in run.pseudo["ckpts"]]
        files = [str(self.out / "work" / run_id / f"{Path(card).stem}.h5") for card in run.pseudo["cards"]]
        commands = [
            ["pseudolabel", "--ckpt", *ckpts, "--card", card, "--out", dst, "--force", "--no-progress"]
            for card, dst in zip(run.pseudo["cards"], files)
        ]
        flat = [a for cmd in commands for a in cmd]
        inputs = _inputs_digest(run.pseudo["cards"])
        record = self._finished(run_id, flat, inputs, "files")
        if record and (stale := self.stale_pseudo_labels(record["files"], run.pseudo["cards"])):
            print(f"~ {run_id}: {stale}: made again", flush=True)
            record = None
        if record:
            print(f"= {run_id}: pseudo-labels made before, skipped", flush=True)
            return record
        load_before, t0 = os.getloadavg()[0], time.perf_counter()
        for i, cmd in enumerate(commands):
            self._call(cmd, f"{run_id}-{i}")
        record = {
            "run_id": run_id,
            "command": _quote(flat),
            "inputs": inputs,
            "made": uuid.uuid4().hex[:12],
            "files": files,
            "steps": 0,  # inference only: no optimiser steps
            "wall_s": round(time.perf_counter() - t0, 1),
            "load_before": load_before,
            "load_after": os.getloadavg()[0],
        }
        _write_json(self._state(run_id), record)
        return record

    def arm_seed(self, arm: str, seed: int) -> dict:
        key = f"{arm}-s{seed}"
        done: dict[str, dict] = {}
        for run in self.bench.arms[arm]:
            step = self.fit if run.pseudo is None else self.pseudolabel
            done[run.name] = step(arm, seed, run, done)
        state = self._state(key)
        if state.is_file():
            record = json.loads(state.read_text())
            made = {name: (r["command"], r.get("made")) for name, r in record["runs"].items()}
            if made == {name: (r["command"], r.get("made")) for name, r in done.items()}:
                print(f"= {key}: evaluated before, skipped", flush=True)
                return record
        chosen = self.bench.evaluate.get(arm) or [self.bench.arms[arm][-1].name]
        eval_dir = self.out / "eval" / key
        args = ["evaluate", "--ckpt", *(done[name]["checkpoint"] for name in chosen)]
        args += ["--data", self.bench.test_data] if self.bench.test_data else []
        args += ["--split", self.bench.split, "--out", str(eval_dir)]
        args += ["--overlays", "1" if seed == self.bench.seeds[0] else "0"]
        t0 = time.perf_counter()
        self._call(args, f"evaluate-{key}")
        record = {
            "arm": arm,
            "seed": seed,
            "runs": done,
            "evaluated": chosen,
            "steps": sum(r["steps"] or 0 for r in done.values()),
            "train_wall_s": round(sum(r["wall_s"] for r in done.values()), 1),
            "eval_wall_s": round(time.perf_counter() - t0, 1),
            "per_case": str(eval_dir / "per_case.csv"),
            "git_commit": _git_commit(),
        }
        _write_json(state, record)
        return record

    def run(self) -> dict[str, Path]:
        self.out.mkdir(parents=True, exist_ok=True)
        # the result folder is committed as it is: its working files (resume state, command logs, each
        # (arm, seed)'s evaluation folder with overlays) stay out of git
        (self.out / ".gitignore").write_text("state/\nlogs/\neval/\nwork/\n")
        for cmd in self.bench.prepare:
            self._call(cmd, "prepare-" + "-".join(cmd[:1]))
        records = [self.arm_seed(arm, seed) for arm in self.bench.arms for seed in self.bench.seeds]
        ran = {(r["arm"], r["seed"]) for r in records}
        earlier = self._earlier_records()
        for arm in self.whole.arms:  # the other arms of the YAML, as they are on record: one table for all
            for seed in self.whole.seeds:
                if (arm, seed) not in ran and (rec := self._on_record(arm, seed, earlier)):
                    records.append(rec)
        missing = [a for a in self.whole.arms if not any(r["arm"] == a for r in records)]
        if missing:
            print(f"bench: not in the table (never run into {self.out}): {', '.join(missing)}", flush=True)
        return self.report(records)

    def _earlier_records(self) -> dict[tuple[str, int], dict]:
        """(arm, seed) -> record of the result files already in ``out`` (summary.json with its per_case.csv),
        so that a fresh clone, which has the committed results but not the (uncommitted) state files, can
        add arms to a benchmark or rewrite its report without training the arms on record again."""
        from organseg.evaluation.benchmark_report import read_rows  # noqa: PLC0415

        summary, per_case = self.out / "summary.json", self.out / "per_case.csv"
        if not (summary.is_file() and per_case.is_file()):
            return {}
        data = json.loads(summary.read_text())
        rows: dict[tuple[str, int], list[dict]] = {}
        for row in read_rows(per_case):
            rows.setdefault((row["arm"], int(row["seed"])), []).append(row)
        return {
            (arm, rec["seed"]): rec
            | {
                "arm": arm,
                "rows": rows[(arm, rec["seed"])],
                "git_commit": rec.get("git_commit", data.get("git_commit")),
            }
            for arm, recs in data.get("arms", {}).items()
            for rec in recs
            if (arm, rec["seed"]) in rows
        }

    def _on_record(self, arm: str, seed: int, earlier: dict[tuple[str, int], dict]) -> dict | None:
        """The evaluation of (arm, seed): its state file, else the result files' (``_earlier_records``)."""
        state = self._state(f"{arm}-s{seed}")
        if state.is_file():
            return json.loads(state.read_text())
        return earlier.get((arm, seed))

    def report_only(self) -> dict[str, Path]:
        """The result files again from the evaluations on record (state files, else the result files
        themselves), running nothing (e.g. after a change to the report): every (arm, seed) must have
        finished; each keeps the git commit it ran at."""
        earlier, records = self._earlier_records(), []
        for arm in self.bench.arms:
            for seed in self.bench.seeds:
                record = self._on_record(arm, seed, earlier)
                if record is None:
                    raise BenchError(
                        f"{self.out}: {arm} seed {seed} has not been evaluated; run without --report-only"
                    )
                records.append(record)
        return self.report(records)

    def report(self, records: list[dict]) -> dict[str, Path]:
        from organseg.evaluation.benchmark_report import read_rows, write_benchmark_report  # noqa: PLC0415

        arms = [a for a in self.whole.arms if any(r["arm"] == a for r in records)]
        bench = select_arms(self.whole, arms)
        records = sorted(records, key=lambda r: (arms.index(r["arm"]), r["seed"]))
        rows, organs = [], []
        for rec in records:
            table = rec["rows"] if "rows" in rec else read_rows(Path(rec["per_case"]))
            for row in table:
                if row["organ"] not in organs:
                    organs.append(row["organ"])
                rows.append(
                    {
                        "arm": rec["arm"],
                        "seed": rec["seed"],
                        "case_id": row["case_id"],
                        "organ": row["organ"],
                        "dice": row.get("dice", ""),
                        "hd95_mm": row.get("hd95", row.get("hd95_mm", "")),
                        "assd_mm": row.get("assd", row.get("assd_mm", "")),
                    }
                )
        commits = list(dict.fromkeys(str(r.get("git_commit")) for r in records if r.get("git_commit")))
        meta = {
            "name": bench.name,
            "command": self.command or f"organseg bench {bench.path}",
            "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "benchmark": str(bench.path),
            "seeds": bench.seeds,
            "test_cases": len({r["case_id"] for r in rows}),
            "git_commit": ", ".join(commits) or None,  # the commits the arms ran at (each arm's: in "arms")
            "versions": _versions(),
            "machine": f"{os.cpu_count()} CPU cores ({sys.platform})",
            "arms": {
                arm: [
                    {k: r.get(k) for k in ("seed", "steps", "train_wall_s", "eval_wall_s", "git_commit")}
                    | {
                        "runs": {
                            n: {k: v for k, v in run.items() if k not in ("checkpoint", "files")}
                            for n, run in r["runs"].items()
                        }
                    }
                    for r in records
                    if r["arm"] == arm
                ]
                for arm in bench.arms
            },
        }
        return write_benchmark_report(
            rows, list(bench.arms), organs, bench.groups, bench.compare, meta, self.out
        )


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        )
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    out = {"python": sys.version.split()[0]}
    for pkg in ("organseg", "torch", "lightning", "monai", "torchio", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


# ------------------------------------------------------------------------------------------------- CLI
def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="run a benchmark YAML: arms x seeds, paired intervals, plots (resumable)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("benchmark", help="benchmark YAML, e.g. benchmarks/focusnet_phantom.yaml")
    p.add_argument("--quick", action="store_true", help="the YAML's quick size (CPU; see its quick: section)")
    p.add_argument(
        "--out", default=None, help="result folder (default benchmarks/results/<name>[-quick]-<date>)"
    )
    p.add_argument(
        "--arms", nargs="+", default=None, help="run (or report) only these arms of the YAML; the rest later"
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite table, CSV, summary and plots of --out from its finished evaluations; run nothing",
    )
    p.set_defaults(func=run)


def default_out(name: str, quick: bool, results: Path = Path("benchmarks/results")) -> Path:
    """``results/<name>[-quick]-<today>``, or the newest such folder a run started and did not finish
    (state files, no table yet), so that running the command again continues it on another day too."""
    stem = f"{name}{'-quick' if quick else ''}-"
    unfinished = [
        d
        for d in sorted(results.glob(f"{stem}[0-9]*"))
        if (d / "state").is_dir() and not (d / "table.md").is_file()
    ]
    if unfinished:
        print(f"bench: continuing the unfinished {unfinished[-1]} (--out to start a new one)")
        return unfinished[-1]
    return results / f"{stem}{time.strftime('%Y-%m-%d')}"


def run(args) -> int:
    whole = bench = load_benchmark(args.benchmark, quick=args.quick)
    if args.arms:
        bench = select_arms(whole, args.arms)
    out = Path(args.out) if args.out else default_out(bench.name, args.quick)
    runs = len({(run.owner, run.name) for arm in bench.arms.values() for run in arm}) * len(bench.seeds)
    print(
        f"bench {bench.name}: {len(bench.arms)} arm(s) x {len(bench.seeds)} seed(s), {runs} fit(s) -> {out}"
    )
    command = f"organseg bench {args.benchmark}" + (" --quick" if args.quick else "")
    if args.report_only:
        if not args.out:
            raise ConfigError("bench --report-only: give the result folder with --out")
        paths = BenchRunner(bench, out, command=command, whole=whole).report_only()
    else:
        paths = BenchRunner(bench, out, command=command, whole=whole).run()
    print(f"\nwrote {paths['table']}, {paths['per_case']}, {paths['summary']} and the plots beside them")
    return 0
