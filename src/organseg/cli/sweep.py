"""``organseg sweep <sweep.yaml> [--count N] [--out DIR] [--seed S]``: run a W&B sweep locally, no server.

The YAML is W&B's sweep format, the same file ``wandb sweep`` takes for an online sweep
(experiments/sweeps/*.yaml): ``method`` grid | random | bayes, ``metric`` {name, goal},
``parameters`` with flat dotted LightningCLI keys (``model.init_args.lr``), and
``command: [${env}, ${program}, fit, -c, <config>, ..., ${args}]`` with ``program: organseg``.

- **Proposals** come from W&B's own open-source engine (PyPI ``sweeps``, ``sweeps.next_run``) given
  the finished trials, as on the W&B server; failed trials are passed on as failed (bayes imputes them).
- **Trials** are real ``organseg fit`` subprocesses, one after another, built from ``command:``
  exactly as ``wandb agent`` builds them (wandb's ``create_sweep_command_args``: ``--key=value``
  with Python's ``str()`` of the value, e.g. ``--data.init_args.patch_size=[48, 48, 16]``). The
  ``organseg`` program runs with this interpreter (``python -m organseg.cli.main``); ``WANDB_RUN_ID`` /
  ``WANDB_RUN_GROUP`` name the trial's W&B run (as the agent does), so its files are
  ``lightning_logs/organseg/<trial id>/``.
- **The metric** of a trial is its W&B run summary (the last logged value, read from the run's
  ``.wandb`` log by ``organseg.runtime.wandb_runs``): the number the W&B server would optimise. A trial that
  exits non-zero or logs no metric is recorded as failed; the sweep goes on.
- **Before any trial**: the engine's schema check, then every parameter key is looked up in the config
  the command composes (LightningCLI ``--print_config``, in this process) and every listed value is
  parsed by it; an unknown key or unparsable value is a one-line error (exit 2).
- **Results**: ``results.md`` and ``results.csv`` (trials ranked by the metric, failed last), rewritten
  after every trial, plus each trial's log ``trial-NN.log``, in ``--out`` (default
  ``lightning_logs/sweeps/<sweep>-<sweep id>/``); the table is printed at the end.

Not supported locally: ``early_terminate`` (no running-trial heartbeat; ignored with a note).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import difflib
import io
import json
import math
import os
import random
import re
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from organseg.errors import ConfigError
from organseg.io.atomic import atomic_open, make_dirs
from organseg.io.yaml_files import read_yaml_mapping

MACRO = re.compile(r"^\$\{(\w+)\}$")
ORGANSEG = [sys.executable, "-m", "organseg.cli.main"]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="run a W&B sweep YAML locally (no server): trials are `organseg fit` runs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("sweep", help="sweep YAML in W&B's format (experiments/sweeps/*.yaml)")
    p.add_argument(
        "--count",
        type=int,
        default=None,
        help="number of trials (required for random/bayes; grid: all combinations by default)",
    )
    p.add_argument("--out", default=None, help="results folder (default: lightning_logs/sweeps/<sweep>-<id>)")
    p.add_argument(
        "--seed", type=int, default=None, help="seed the engine's proposals (random/bayes/grid order)"
    )
    p.add_argument(
        "--trial-timeout", type=float, default=None, help="seconds after which a trial is killed (failed)"
    )
    p.add_argument("--check", action="store_true", help="validate the YAML and its parameters, run nothing")
    p.set_defaults(func=run)


# ---------------------------------------------------------------------------------------- the YAML
def _engine():
    with warnings.catch_warnings():  # sweeps 0.2 declares pydantic-v1 style models
        warnings.simplefilter("ignore")
        import sweeps  # noqa: PLC0415 - lazy: `organseg --help` imports this module
    return sweeps


def load_sweep(path: str | Path) -> dict:
    """The sweep config, schema-checked by the W&B engine, with the engine's defaults filled in."""

    path = Path(path)
    cfg = read_yaml_mapping(
        path, prefix="sweep ", not_mapping="expected a mapping (method, metric, parameters, command)"
    )
    sweeps = _engine()
    violations = sweeps.schema_violations_from_proposed_config(cfg)
    if violations:
        more = f" (+{len(violations) - 1} more)" if len(violations) > 1 else ""
        raise ConfigError(f"sweep {path}: not a valid W&B sweep config: {_one_line(violations[0])}{more}")
    if not (cfg.get("metric") or {}).get("name"):
        raise ConfigError(
            f"sweep {path}: needs metric: {{name: ..., goal: maximize|minimize}} (trials are ranked by it)"
        )
    return sweeps.SweepConfig(cfg)


def fit_command(cfg: dict, path: str | Path) -> list[str]:
    """The ``organseg fit`` arguments of ``command:`` before and after ``${args}`` (macros other than
    ``${args}`` expanded as the agent does); a command that is not ``organseg fit ... ${args}`` is an
    error."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command  # noqa: PLC0415 - lazy: wandb is slow to import

    command = [str(c) for c in (cfg.get("command") or [])]
    if "${args}" not in command:
        raise ConfigError(
            f"sweep {path}: command must pass the parameters as ${{args}} (--key=value, what "
            f"LightningCLI parses), e.g. [${{env}}, ${{program}}, fit, -c, <config>, ${{args}}]"
        )
    command = create_sweep_command(command)  # ${envvar:NAME}
    words = {"env": [], "interpreter": [sys.executable], "program": [str(cfg.get("program", "organseg"))]}
    argv: list[str] = []
    for c in command:
        m = MACRO.match(c)
        if m and m.group(1) != "args":
            if m.group(1) not in words:
                raise ConfigError(f"sweep {path}: command macro {c} is not supported here (use ${{args}})")
            argv += words[m.group(1)]
        else:
            argv.append(c)
    if "fit" not in argv:
        raise ConfigError(
            f"sweep {path}: command must run `organseg fit ... ${{args}}` (got {' '.join(command)})"
        )
    launcher, rest = argv[: argv.index("fit")], argv[argv.index("fit") + 1 :]
    names = [Path(w).name for w in launcher]
    if not (
        names == ["organseg"]
        or names[-2:] == ["-m", "organseg.cli.main"]
        or (names and names[-1] == "cli/main.py")
    ):
        raise ConfigError(
            f"sweep {path}: command must run `organseg fit ... ${{args}}` (got {' '.join(command)})"
        )
    return rest


def trial_args(fit_args: list[str], params: dict[str, Any]) -> list[str]:
    """``fit_args`` with ``${args}`` replaced by wandb's own ``--key=value`` rendering of ``params``
    (``{key: {"value": v}}``, the engine's proposal), so a local trial equals the agent's."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args  # noqa: PLC0415 - lazy: as above

    flags = create_sweep_command_args({"args": params})["args"]
    out: list[str] = []
    for a in fit_args:
        out += flags if a == "${args}" else [a]
    return out


# ------------------------------------------------------------------------------ parameter checks
def print_config(args: list[str]) -> tuple[int, str, str]:
    """``organseg fit <args> --print_config`` in this process: (exit code, stdout, stderr)."""
    from organseg.cli.lightning import run_lightning_cli  # noqa: PLC0415 - lazy: Lightning/torch

    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_lightning_cli(["fit", *args, "--print_config"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def _flatten(tree: Any, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    if isinstance(tree, dict):
        for k, v in tree.items():
            key = f"{prefix}{k}"
            keys.add(key)
            keys |= _flatten(v, key + ".")
    return keys


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _cli_error(stderr: str) -> str:
    """The innermost part of a jsonargparse error (``Parser key "x": Expected ... Got value: ...``)."""
    lines = [
        ln.strip() for ln in (stderr.split("error:", 1)[-1] if "error:" in stderr else stderr).splitlines()
    ]
    keyed = [i for i, ln in enumerate(lines) if ln.startswith('Parser key "') or "Option '" in ln]
    if keyed:
        lines = lines[keyed[-1] :]
        stop = [
            i
            for i, ln in enumerate(lines)
            if ln.startswith(("- Expected a <class 'NoneType'>", "Given value"))
        ]
        lines = lines[: stop[0]] if stop else lines
    return _one_line(" ".join(lines))


def _samples(spec: dict) -> list[Any]:
    """Values that represent a parameter spec: every listed value, else the bounds/value."""
    if "values" in spec:
        return list(spec["values"])
    if "value" in spec:
        return [spec["value"]]
    return [spec[k] for k in ("min", "max") if k in spec] or [spec.get("mu", 0.0)]


def check_parameters(cfg: dict, fit_args: list[str], path: str | Path) -> dict:
    """Every parameter key exists in the config ``fit_args`` composes and every listed value parses;
    returns the composed config. One-line ConfigError otherwise."""
    base = [a for a in fit_args if a != "${args}"]
    code, out, err = print_config(base)
    if code != 0:
        raise ConfigError(f"sweep {path}: its command's config does not parse: {_cli_error(err)}")
    composed = yaml.safe_load(out)
    known = _flatten(composed)
    for key in cfg["parameters"]:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(
                f"sweep {path}: unknown parameter {key!r}: not a key of the config "
                f"`organseg fit {' '.join(base)}` composes{hint}"
            )
    samples = {k: _samples(v) for k, v in cfg["parameters"].items()}
    for i in range(max(len(s) for s in samples.values())):
        params = {k: {"value": s[i % len(s)]} for k, s in samples.items()}
        code, _, err = print_config(trial_args(fit_args, params))
        if code != 0:
            shown = ", ".join(f"{k}={v['value']!r}" for k, v in params.items())
            raise ConfigError(
                f"sweep {path}: a parameter value does not parse ({shown}): {_cli_error(err)} "
                f"[${{args}} passes str(value): use null-free values, lists as [a, b]]"
            )
    logger = (composed.get("trainer") or {}).get("logger") or {}
    if not (isinstance(logger, dict) and str(logger.get("class_path", "")).endswith("WandbLogger")):
        raise ConfigError(
            f"sweep {path}: trainer.logger must be a WandbLogger (a trial's metric is read from its W&B run)"
        )
    return composed


# ---------------------------------------------------------------------------------- the trials
@dataclass
class Trial:
    index: int
    run_id: str
    params: dict[str, Any]  # {key: value}
    state: str = "running"  # finished | failed
    metric: float | None = None
    seconds: float = 0.0
    note: str = ""
    run_dir: str = ""


def read_metric(wandb_dir: Path, run_id: str, name: str) -> tuple[float | None, str]:
    """The trial's summary value of ``name`` (None + why when missing)."""
    from organseg.runtime.wandb_runs import find_run_file, read_run  # noqa: PLC0415 - lazy: wandb

    path = find_run_file(wandb_dir, run_id)
    if path is None:
        return None, f"no W&B run {run_id} under {wandb_dir}"
    try:
        value = read_run(path).summary.get(name)
    except ValueError as exc:
        return None, str(exc)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return None, f"{name} not logged (summary: {value!r})"
    return float(value), ""


def run_trial(
    trial: Trial,
    fit_args: list[str],
    out: Path,
    save_dir: Path,
    metric: str,
    group: str,
    timeout: float | None,
    project: str = "organseg",
) -> None:
    """Run one ``organseg fit`` trial (log: ``out/trial-NN.log``) and read its metric from the W&B run
    under ``save_dir`` (the WandbLogger's ``save_dir``; its run folder is ``save_dir/project/<run id>``)."""
    argv = [*ORGANSEG, "fit", *trial_args(fit_args, {k: {"value": v} for k, v in trial.params.items()})]
    # WANDB_SERVICE would attach the trial to this process's wandb service (if it has one), not its own
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update(WANDB_RUN_ID=trial.run_id, WANDB_RUN_GROUP=group)
    log = out / f"trial-{trial.index:02d}.log"
    start = time.monotonic()
    with open(log, "w") as f:
        f.write(" ".join(argv) + "\n\n")
        f.flush()
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code, trial.note = -9, f"killed after {timeout:g} s"
        except KeyboardInterrupt:
            proc.kill()
            proc.wait()
            trial.state, trial.note = "failed", "interrupted"
            raise
        finally:
            trial.seconds = time.monotonic() - start
    trial.run_dir = str(Path(save_dir) / project / trial.run_id)
    if code != 0:
        trial.state = "failed"
        trial.note = trial.note or f"exit {code}; see {log}: {_last_error(log)}"
        return
    trial.metric, why = read_metric(Path(save_dir) / "wandb", trial.run_id, metric)
    trial.state = "finished" if trial.metric is not None else "failed"
    trial.note = why


def _last_error(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return _one_line(lines[-1] if lines else "", 200)


# ---------------------------------------------------------------------------------- the table
def _short(key: str) -> str:
    return key.replace(".init_args.", ".")


def _native(v: Any) -> Any:
    """The engine proposes numpy scalars; the agent gets JSON from the server. Plain Python values keep
    ``str()`` in ``${args}`` and the results table the same under numpy 2 (whose repr is
    ``np.float64(x)``)."""
    if isinstance(v, (list, tuple)):
        return [_native(x) for x in v]
    if isinstance(v, dict):
        return {k: _native(x) for k, x in v.items()}
    return v.item() if hasattr(v, "item") and type(v).__module__ == "numpy" else v


def _fmt(v: Any, full: bool = False) -> str:
    if isinstance(v, float):
        return repr(v) if full else f"{v:.4g}"
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def ranked(trials: list[Trial], goal: str) -> list[Trial]:
    done = [t for t in trials if t.metric is not None]
    done.sort(key=lambda t: t.metric, reverse=goal == "maximize")
    return done + [t for t in trials if t.metric is None]


def write_results(trials: list[Trial], cfg: dict, out: Path) -> str:
    """Write results.csv + results.md (ranked) and return the Markdown."""

    metric, goal = cfg["metric"]["name"], cfg["metric"].get("goal", "maximize")
    keys = list(cfg["parameters"])
    order = ranked(trials, goal)
    with atomic_open(out / "results.csv", "w") as f:
        w = csv.writer(f)
        w.writerow(["rank", "trial", "run_id", "state", metric, *keys, "seconds", "run_dir", "note"])
        for r, t in enumerate(order, 1):
            w.writerow(
                [
                    r if t.metric is not None else "",
                    t.index,
                    t.run_id,
                    t.state,
                    "" if t.metric is None else t.metric,
                    *[_fmt(t.params.get(k), full=True) for k in keys],
                    f"{t.seconds:.1f}",
                    t.run_dir,
                    t.note,
                ]
            )
    head = ["rank", "run", metric, *[_short(k) for k in keys], "s", "state"]
    lines = [
        f"Sweep `{cfg.get('name', '')}` ({cfg['method']}, {goal} {metric}): {len(trials)} trials",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r, t in enumerate(order, 1):
        state = t.state if not t.note else f"{t.state}: {t.note}".replace("|", "/")
        lines.append(
            "| "
            + " | ".join(
                [
                    str(r) if t.metric is not None else "-",
                    t.run_id,
                    "" if t.metric is None else f"{t.metric:.4f}",
                    *[_fmt(t.params.get(k)) for k in keys],
                    f"{t.seconds:.0f}",
                    state,
                ]
            )
            + " |"
        )
    text = "\n".join(lines) + "\n"
    with atomic_open(out / "results.md", "w") as f:
        f.write(text)
    return text


# ---------------------------------------------------------------------------------- the command
def run(args) -> int:
    path = Path(args.sweep)
    cfg = load_sweep(path)
    fit_args = fit_command(cfg, path)
    if args.count is not None and args.count < 1:
        raise ConfigError(f"--count must be >= 1, got {args.count}")
    if args.count is None and cfg["method"] != "grid" and not args.check:
        raise ConfigError(f"sweep {path}: --count is required for method {cfg['method']}")
    composed = check_parameters(cfg, fit_args, path)
    print(
        f"sweep {path}: {len(cfg['parameters'])} parameters checked against the composed config", flush=True
    )
    if args.check:
        return 0
    if cfg.get("early_terminate"):
        print("note: early_terminate is ignored by the local runner (every trial runs to its end)")
    sweeps = _engine()
    from wandb.sdk.lib.runid import generate_id  # noqa: PLC0415 - lazy: wandb

    if args.seed is not None:
        random.seed(args.seed)

        np.random.seed(args.seed)
    sweep_id = generate_id(8)
    name = str(cfg.get("name") or path.stem)
    out = Path(args.out) if args.out else Path("lightning_logs/sweeps") / f"{path.stem}-{sweep_id}"
    make_dirs(out)
    (out / "sweep.yaml").write_text(path.read_text())
    logger_args = composed["trainer"]["logger"].get("init_args") or {}
    save_dir = Path(logger_args.get("save_dir") or "lightning_logs")
    project = str(logger_args.get("project") or "lightning_logs")
    metric, goal = cfg["metric"]["name"], cfg["metric"].get("goal", "maximize")
    caps = [c for c in (args.count, cfg.get("run_cap")) if c]
    cap = min(caps) if caps else None

    trials: list[Trial] = []
    engine_runs: list = []
    index = 0
    while cap is None or index < cap:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sklearn GP convergence chatter on tiny sweeps
            proposal = sweeps.next_run(cfg, engine_runs)
        if proposal is None:
            print("the grid is exhausted", flush=True)
            break
        params = {k: _native(v["value"]) for k, v in proposal.config.items()}
        trial = Trial(index, f"{sweep_id}-t{index:02d}", params)
        trials.append(trial)
        shown = " ".join(f"{_short(k)}={_fmt(v)}" for k, v in params.items())
        print(f"trial {index + 1}{'/' + str(cap) if cap else ''} {trial.run_id}: {shown}", flush=True)
        try:
            run_trial(
                trial,
                fit_args,
                out,
                save_dir,
                metric,
                f"sweep-{name}-{sweep_id}",
                args.trial_timeout,
                project,
            )
        except KeyboardInterrupt:
            write_results(trials, cfg, out)
            print(f"interrupted; results so far: {out / 'results.md'}", file=sys.stderr)
            return 130
        result = f"{metric} {trial.metric:.4f}" if trial.metric is not None else f"FAILED ({trial.note})"
        print(f"  -> {result} ({trial.seconds:.0f} s)", flush=True)
        proposal.name = trial.run_id
        proposal.state = sweeps.RunState.finished if trial.state == "finished" else sweeps.RunState.failed
        proposal.summary_metrics = {metric: trial.metric} if trial.metric is not None else {}
        engine_runs.append(proposal)
        write_results(trials, cfg, out)
        index += 1

    print()
    print(write_results(trials, cfg, out))
    print(f"results: {out / 'results.md'} and {out / 'results.csv'} (trial logs: {out}/trial-NN.log)")
    order = ranked(trials, goal)
    best = order[0] if order else None
    if best is None or best.metric is None:
        print(f"organseg sweep: all {len(trials)} trials failed; see {out}/trial-NN.log", file=sys.stderr)
        return 1
    print(f"best: {best.run_id} {metric}={best.metric:.4f} ({best.run_dir})")
    return 0
