"""`organseg bench` (issue 12): a 2-arm x 2-seed toy benchmark end to end, its long-form CSV, the
differences recomputed by hand from that CSV, resuming, and one-line errors for a bad benchmark file."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers.tiny_fit import KEEP, REPO, write_tiny_overlay
from organseg.cli.bench import BenchError, BenchRunner, load_benchmark, select_arms
from organseg.cli.main import main
from organseg.errors import ConfigError

UNET = str(REPO / "experiments/baseline/unet.yaml")
DATA = str(REPO / "data_modules/hn_phantom.yaml")


def toy_benchmark(folder: Path, card: Path) -> Path:
    # the tiny fit overlay, but with the stack's W&B logger: the runner names each run by its id
    overlay = write_tiny_overlay(card, folder, trainer={"max_steps": KEEP, "devices": KEEP, "logger": KEEP})
    spec = {
        "name": "toy",
        "seeds": [0, 1],
        "groups": {"eyes": ["eye_l", "eye_r"]},
        "arms": {
            "short": [{"name": "unet", "configs": [UNET, DATA, str(overlay)], "max_steps": 1}],
            "long": [{"name": "unet", "configs": [UNET, DATA, str(overlay)], "max_steps": 3}],
        },
        "compare": [["long", "short"]],
    }
    path = folder / "toy.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def in_process(calls: list):
    """Each command in this process (the real runner starts a process per command, which also ends its
    W&B run; here the run is finished by hand, or the next fit would log into it)."""
    import wandb

    def execute(args, log_stem):
        calls.append(list(args))
        try:
            return main(list(args))
        finally:
            wandb.finish()
            wandb.teardown()  # this process's wandb service keeps the first run's folder otherwise

    return execute


def test_a_toy_benchmark_runs_resumes_and_its_table_follows_from_the_csv(hn_small, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bench = load_benchmark(toy_benchmark(tmp_path, hn_small["card"]))
    out = tmp_path / "results"
    calls: list = []
    paths = BenchRunner(bench, out, in_process(calls)).run()
    assert [c[0] for c in calls].count("fit") == 4 and [c[0] for c in calls].count("evaluate") == 4
    fits = [c for c in calls if c[0] == "fit"]
    assert all("--seed_everything=0" in c or "--seed_everything=1" in c for c in fits)

    with open(paths["per_case"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["arm", "seed", "case_id", "organ", "dice", "hd95_mm", "assd_mm"]
    organs = sorted({r["organ"] for r in rows})
    cases = sorted({r["case_id"] for r in rows})
    assert len(rows) == 2 * 2 * len(cases) * len(organs) and len(cases) == 1

    summary = json.loads(paths["summary"].read_text())
    for arm, steps in (("short", 1), ("long", 3)):
        assert [r["steps"] for r in summary["arms"][arm]] == [steps, steps]  # optimiser steps, not time

    # the mean difference, by hand from the CSV: per (seed, case), mean over defined organs, long - short
    def grid(arm):
        out = {}
        for r in rows:
            if r["arm"] == arm and r["dice"] != "":
                out.setdefault((r["seed"], r["case_id"]), []).append(float(r["dice"]))
        return {k: np.mean(v) for k, v in out.items()}

    long, short = grid("long"), grid("short")
    by_hand = np.mean([long[k] - short[k] for k in long if k in short])
    got = summary["differences"]["long - short"]["mean (all organs)"]
    assert got["mean"] == pytest.approx(by_hand) and got["low"] <= got["mean"] <= got["high"]
    table = paths["table"].read_text()
    assert "long - short" in table and "eyes (group)" in table and "bootstrap" in table
    assert "2 seed(s) only" in table  # the toy's 2 seeds: too few to claim anything, and it says so
    assert re.search(r"^\| short \| unet 1 \| 1 \| [0-9.]+ \| [0-9.]+-[0-9.]+ \|$", table, re.M)  # budgets
    assert (out / ".gitignore").read_text().split() == ["state/", "logs/", "eval/", "work/"]  # results only
    for png in ("dice_boxplot.png", "forest_long_vs_short.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # resumed: nothing is trained or evaluated again
    calls.clear()
    BenchRunner(bench, out, in_process(calls)).run()
    assert calls == []
    # an (arm, seed) whose evaluation never finished: only that evaluation runs again
    (out / "state" / "long-s1.json").unlink()
    BenchRunner(bench, out, in_process(calls)).run()
    assert [c[0] for c in calls] == ["evaluate"]
    # a changed budget: that arm's runs are trained and evaluated again, the other arm's are kept
    calls.clear()
    spec = yaml.safe_load(bench.path.read_text())
    spec["arms"]["short"][0]["max_steps"] = 2
    bench.path.write_text(yaml.safe_dump(spec, sort_keys=False))
    BenchRunner(load_benchmark(bench.path), out, in_process(calls)).run()
    assert [(c[0], "--trainer.max_steps=2" in c) for c in calls] == [("fit", True), ("evaluate", False)] * 2
    summary = json.loads(paths["summary"].read_text())
    assert [r["steps"] for r in summary["arms"]["short"]] == [2, 2]


@pytest.mark.parametrize(
    "change, key",
    [
        ({"seeds": [-1]}, "seeds"),
        ({"arms": {"a": [{"name": "x", "configs": [UNET], "max_steps": 0}]}}, "arms.a[0].max_steps"),
        ({"arms": {"a": [{"name": "x", "configs": ["nope.yaml"], "max_steps": 2}]}}, "arms.a[0].configs"),
        (
            {"arms": {"a": [{"name": "x", "configs": [UNET], "max_steps": 2, "init_from": "later"}]}},
            "arms.a[0].init_from",
        ),
        ({"compare": [["a", "missing"]]}, "compare"),
        ({"max_time": "00:10:00"}, "(top level)"),
    ],
)
def test_a_bad_benchmark_file_is_one_error_naming_file_and_key(tmp_path, change, key):
    spec = {"name": "bad", "arms": {"a": [{"name": "x", "configs": [UNET], "max_steps": 2}]}, **change}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {key}:")):
        load_benchmark(path)


def test_quick_size_scales_steps_and_seeds(tmp_path):
    spec = {
        "name": "q",
        "seeds": [0, 1, 2, 3, 4],
        "arms": {"a": [{"name": "x", "configs": [UNET], "max_steps": 100}]},
        "args": ["--trainer.limit_val_batches=0"],
        "quick": {
            "seeds": [0, 1, 2],
            "steps_scale": 0.25,
            "args": ["--data.init_args.patch_size=[48,48,16]"],
            "replace_configs": {UNET: DATA},
        },
    }
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump(spec))
    full, quick = load_benchmark(path), load_benchmark(path, quick=True)
    assert full.seeds == [0, 1, 2, 3, 4] and full.arms["a"][0].max_steps == 100
    assert full.fit_args == ["--trainer.limit_val_batches=0"] and full.arms["a"][0].configs == [UNET]
    assert quick.seeds == [0, 1, 2] and quick.arms["a"][0].max_steps == 25
    assert quick.fit_args == ["--trainer.limit_val_batches=0", "--data.init_args.patch_size=[48,48,16]"]
    assert quick.arms["a"][0].configs == [DATA]


def test_quick_replace_configs_with_a_list_puts_several_configs_in_place_of_one(tmp_path):
    """A list value replaces a run's config by several, in order (e.g. the quick data config and an overlay);
    string values still replace text in args; the full size is unchanged."""
    spec = {
        "name": "q",
        "arms": {"a": [{"name": "x", "configs": [UNET, DATA], "max_steps": 10, "args": [f"--x={DATA}"]}]},
        "quick": {"replace_configs": {DATA: [DATA, UNET]}},
    }
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump(spec))
    full, quick = load_benchmark(path), load_benchmark(path, quick=True)
    assert full.arms["a"][0].configs == [UNET, DATA]
    assert quick.arms["a"][0].configs == [UNET, DATA, UNET]
    assert quick.arms["a"][0].args == [f"--x={DATA}"]  # a list value touches configs only


def test_a_stage_identical_in_two_arms_is_trained_once_per_seed(tmp_path):
    run = {"name": "x", "configs": [UNET], "max_steps": 10}
    spec = {
        "name": "share",
        "arms": {
            "a": [run],
            "b": [run, {**run, "name": "y", "init_from": "x"}],
            "c": [{**run, "max_steps": 20}],  # another budget: its own run
        },
    }
    path = tmp_path / "share.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    bench = load_benchmark(path)
    runner = BenchRunner(bench, tmp_path / "out")
    ids = {arm: [runner.run_id(arm, 0, r) for r in runs] for arm, runs in bench.arms.items()}
    assert ids == {"a": ["share-a-s0-x"], "b": ["share-a-s0-x", "share-b-s0-y"], "c": ["share-c-s0-x"]}


def test_one_seed_sets_model_init_data_order_and_patches(hn_small, tmp_path, monkeypatch):
    """Same ``--seed_everything``: the same weights after training (same init, same patches in the same
    order); another seed: other weights. The patch stream follows the run's seed unless data.seed is set."""
    import torch

    from helpers.tiny_fit import tiny_fit_args
    from organseg.data import CTDataModule

    monkeypatch.chdir(tmp_path)

    def weights_after_fit(seed: int, name: str) -> dict:
        root = tmp_path / name
        root.mkdir()
        args = tiny_fit_args(hn_small["card"], root, trainer={"max_steps": 2, "default_root_dir": str(root)})
        assert main([*args, f"--seed_everything={seed}"]) == 0
        (ckpt,) = root.rglob("last.ckpt")
        return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]

    first, again, other = weights_after_fit(3, "a"), weights_after_fit(3, "b"), weights_after_fit(4, "c")
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)

    monkeypatch.setenv("PL_GLOBAL_SEED", "7")  # what seed_everything exports
    assert CTDataModule([str(hn_small["card"])], preprocess=False).stream_seed == 7
    assert CTDataModule([str(hn_small["card"])], preprocess=False, seed=2).stream_seed == 2


def test_an_unfinished_result_folder_is_continued_on_another_day(tmp_path):
    from organseg.cli.bench import default_out

    today = default_out("fn", True, tmp_path)
    assert today.parent == tmp_path and today.name.startswith("fn-quick-20")
    unfinished = tmp_path / "fn-quick-2026-11-29"
    (unfinished / "state").mkdir(parents=True)
    (tmp_path / "fn-2026-11-30" / "state").mkdir(parents=True)  # the full size: another folder
    assert default_out("fn", True, tmp_path) == unfinished
    (unfinished / "table.md").write_text("done")
    assert default_out("fn", True, tmp_path) == today  # finished: a new run starts a new folder


def test_a_runs_checkpoint_best_newest_else_last(tmp_path):
    import os

    from organseg.runs import run_checkpoint

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    assert run_checkpoint(tmp_path) is None and run_checkpoint(tmp_path, "last") is None
    (folder / "last.ckpt").write_text("")
    assert run_checkpoint(tmp_path) == folder / "last.ckpt"
    for i, name in enumerate(("epoch001-dice0.500.ckpt", "epoch003-dice0.400.ckpt")):
        (folder / name).write_text("")
        os.utime(folder / name, (1000 + i, 1000 + i))
    assert run_checkpoint(tmp_path) == folder / "epoch003-dice0.400.ckpt"  # newest, as ModelCheckpoint keeps
    assert run_checkpoint(tmp_path, "last") == folder / "last.ckpt"


def fake_organseg(calls: list):
    """Records each command and leaves what the real one would: a fit its checkpoint (with its step
    count), a pseudolabel its file, an evaluation its per_case.csv (Dice 0.5 for every organ)."""
    import torch

    def execute(args, log_stem):
        calls.append(list(args))
        if args[0] == "fit":
            run_id = next(a.split("=", 1)[1] for a in args if a.startswith("--trainer.logger.init_args.id="))
            steps = int(next(a.split("=", 1)[1] for a in args if a.startswith("--trainer.max_steps=")))
            ckpt = Path("lightning_logs/organseg") / run_id / "checkpoints" / "last.ckpt"
            ckpt.parent.mkdir(parents=True)
            torch.save({"global_step": steps, "state_dict": {}, "organseg": {}}, ckpt)
        elif args[0] == "pseudolabel":
            Path(args[args.index("--out") + 1]).parent.mkdir(parents=True, exist_ok=True)
            Path(args[args.index("--out") + 1]).write_text("labels")
        elif args[0] == "evaluate":
            out = Path(args[args.index("--out") + 1])
            out.mkdir(parents=True, exist_ok=True)  # an arm evaluated again writes over its working folder
            lines = ["case_id,organ,dice,hd95,assd"] + [f"c{i},liver,0.5,1.0,0.5" for i in range(8)]
            (out / "per_case.csv").write_text("\n".join(lines) + "\n")
        return 0

    return execute


def test_pseudolabel_runs_feed_later_fits_and_several_checkpoints_are_evaluated_together(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    cards = []
    for name in ("a", "b"):
        (tmp_path / f"{name}.yaml").write_text("name: x\n")
        cards.append(str(tmp_path / f"{name}.yaml"))
    expert = {"configs": [UNET], "max_steps": 30}
    spec = {
        "name": "pl",
        "seeds": [0],
        "test_data": cards[0],
        "split": "all",
        "arms": {
            "experts": {
                "runs": [{"name": "ea", **expert}, {"name": "eb", **expert}],
                "evaluate": ["ea", "eb"],
            },
            "selftrain": [
                {"name": "ea", **expert},
                {"name": "eb", **expert},
                {"name": "pseudo", "pseudolabel": {"ckpts": ["ea", "eb"], "cards": cards}},
                {
                    "name": "union",
                    "configs": [UNET],
                    "max_steps": 30,
                    "pseudo_from": "pseudo",
                    "args": ["--model.init_args.ramp={max_steps*0.5}"],
                },
            ],
        },
    }
    path = tmp_path / "pl.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    bench = load_benchmark(path)
    calls: list = []
    stale: list = []  # what the pseudo-label files' validity check answers (the real one reads the caches)

    def runner():
        return BenchRunner(
            bench,
            tmp_path / "out",
            fake_organseg(calls),
            stale_pseudo_labels=lambda f, c: (stale or [None])[0],
        )

    runner().run()
    kinds = [c[0] for c in calls]
    # the experts are trained once per seed and shared; one pseudolabel call per card
    assert kinds == ["fit", "fit", "evaluate", "pseudolabel", "pseudolabel", "fit", "evaluate"]
    ea = "lightning_logs/organseg/pl-experts-s0-ea/checkpoints/last.ckpt"
    eb = "lightning_logs/organseg/pl-experts-s0-eb/checkpoints/last.ckpt"
    assert calls[2][:4] == ["evaluate", "--ckpt", ea, eb] and calls[2][4:6] == ["--data", cards[0]]
    files = [str(tmp_path / "out" / "work" / "pl-selftrain-s0-pseudo" / f"{c}.h5") for c in ("a", "b")]
    assert calls[3][:4] == ["pseudolabel", "--ckpt", ea, eb] and calls[3][5:8] == [
        cards[0],
        "--out",
        files[0],
    ]
    union = calls[5]
    assert f"--data.init_args.pseudo_labels=[{files[0]},{files[1]}]" in union
    assert "--model.init_args.ramp=15" in union  # {max_steps*0.5}
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["steps"] for r in summary["arms"]["experts"]] == [60]
    assert [r["steps"] for r in summary["arms"]["selftrain"]] == [90]  # pseudo-labelling: no steps
    assert "work/" in (tmp_path / "out" / ".gitignore").read_text().split()
    # resumed: nothing again; a lost pseudo-label file: made again, and so the fit on them and its evaluation
    calls.clear()
    runner().run()
    assert calls == []
    Path(files[1]).unlink()
    runner().run()
    assert [c[0] for c in calls] == ["pseudolabel", "pseudolabel", "fit", "evaluate"]
    # files still there but stale (their cache was rebuilt, e.g. by prepare): the same again
    calls.clear()
    stale.append("a.h5: stale pseudo-labels (made from another build of the cache)")
    runner().run()
    assert [c[0] for c in calls] == ["pseudolabel", "pseudolabel", "fit", "evaluate"]
    assert "--trainer.logger.init_args.id=pl-selftrain-s0-union" in calls[2]
    # --report-only: the result files again from the evaluations on record, nothing run; each arm's commit
    calls.clear()
    for name in ("experts-s0", "selftrain-s0"):
        state = tmp_path / "out" / "state" / f"{name}.json"
        state.write_text(json.dumps(json.loads(state.read_text()) | {"git_commit": f"abc{name[0]}"}))
    (tmp_path / "out" / "table.md").unlink()
    per_case = (tmp_path / "out" / "per_case.csv").read_text()
    BenchRunner(bench, tmp_path / "out", fake_organseg(calls)).report_only()
    assert calls == [] and "`abce, abcs`" in (tmp_path / "out" / "table.md").read_text()
    assert (tmp_path / "out" / "per_case.csv").read_text() == per_case
    # a fresh clone has the committed result files but no state: the same report from the result files
    shutil.rmtree(tmp_path / "out" / "state")
    shutil.rmtree(tmp_path / "out" / "eval")
    BenchRunner(bench, tmp_path / "out", fake_organseg(calls)).report_only()
    assert calls == [] and (tmp_path / "out" / "per_case.csv").read_text() == per_case
    assert [
        r["git_commit"]
        for r in json.loads((tmp_path / "out" / "summary.json").read_text())["arms"]["experts"]
    ] == ["abce"]
    (tmp_path / "out" / "per_case.csv").write_text("arm,seed,case_id,organ,dice,hd95_mm,assd_mm\n")
    with pytest.raises(BenchError, match="experts seed 0 has not been evaluated"):
        BenchRunner(bench, tmp_path / "out", fake_organseg(calls)).report_only()


def test_arms_run_alone_join_the_arms_on_record_in_one_table(tmp_path, monkeypatch):
    """``--arms`` on a folder with committed results (no state: a fresh clone) trains the named arm only and
    reports it beside the others; an arm never run is left out of the table, and said so."""
    monkeypatch.chdir(tmp_path)
    spec = {
        "name": "two",
        "seeds": [0, 1],
        "arms": {a: [{"name": "x", "configs": [UNET], "max_steps": 2}] for a in ("a", "b", "c")},
        "compare": [["a", "b"], ["c", "a"]],
    }
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    whole = load_benchmark(path)
    calls: list = []
    out = tmp_path / "out"
    BenchRunner(select_arms(whole, ["a"]), out, fake_organseg(calls), whole=whole).run()
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["arms"]) == ["a"] and summary["differences"] == {}
    shutil.rmtree(out / "state")
    calls.clear()
    BenchRunner(select_arms(whole, ["b"]), out, fake_organseg(calls), whole=whole).run()
    assert [c[0] for c in calls] == ["fit", "evaluate"] * 2  # b's two seeds only; a is read from the results
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["arms"]) == ["a", "b"] and list(summary["differences"]) == ["a - b"]
    rows = (out / "per_case.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["a"] * 16 + ["b"] * 16  # 2 seeds x 8 cases each


@pytest.mark.parametrize(
    "arm, key",
    [
        ({"runs": [{"name": "x", "configs": [UNET], "max_steps": 2}], "evaluate": ["y"]}, "arms.a.evaluate"),
        ({"runs": [], "other": 1}, "arms.a"),
        ([{"name": "p", "pseudolabel": {"ckpts": ["x"], "cards": [UNET]}}], "arms.a[0].pseudolabel.ckpts"),
        (
            [
                {"name": "x", "configs": [UNET], "max_steps": 2},
                {"name": "y", "configs": [UNET], "max_steps": 2, "pseudo_from": "x"},
            ],
            "arms.a[1].pseudo_from",
        ),
    ],
)
def test_a_bad_arm_mapping_or_pseudolabel_run_is_one_error(tmp_path, arm, key):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "arms": {"a": arm}}))
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {key}:")):
        load_benchmark(path)


def test_some_arms_run_alone_keep_their_shared_run_ids_and_comparisons(tmp_path):
    run = {"name": "x", "configs": [UNET], "max_steps": 10}
    spec = {
        "name": "sub",
        "arms": {
            "a": [run],
            "b": [run, {**run, "name": "y", "init_from": "x"}],
            "c": [{**run, "max_steps": 5}],
        },
        "compare": [["b", "a"], ["c", "b"]],
    }
    path = tmp_path / "sub.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    bench = select_arms(load_benchmark(path), ["c", "b"])
    assert list(bench.arms) == ["b", "c"] and bench.compare == [("c", "b")]
    runner = BenchRunner(bench, tmp_path / "out")
    assert [runner.run_id("b", 0, r) for r in bench.arms["b"]] == [
        "sub-a-s0-x",
        "sub-b-s0-y",
    ]  # a's run, shared
    with pytest.raises(ConfigError, match=re.escape(f"{path}: --arms: unknown arm(s) ['d']")):
        select_arms(load_benchmark(path), ["d"])
