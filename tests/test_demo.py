"""The demo plan (experiments/demo_plan.yaml): valid chaining, configs that compose, the final table."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from organseg.cli.demo import dice_table, load_plan, runs_needed

REPO = Path(__file__).resolve().parents[1]
PLAN = REPO / "experiments/demo_plan.yaml"


def test_plan_runs_all_five_focusnet_stages_in_chain_order():
    plan = load_plan(str(PLAN))
    runs = {r["name"]: r for r in plan["runs"]}
    stages = [Path(r["configs"][0]).stem for r in plan["runs"] if "focusnetv2" in r["configs"][0]]
    assert stages == ["snet", "sol", "sos", "shape_ae", "joint"]
    assert runs["fn_joint"]["init_from"] == "fn_sos" and runs["fn_joint"]["shape_from"] == "fn_shape_ae"
    assert runs_needed(plan, ["fn_joint"]) == {"fn_snet", "fn_sol", "fn_sos", "fn_shape_ae", "fn_joint"}
    assert runs_needed(plan, ["unet"]) == {"unet"}
    with pytest.raises(SystemExit, match="unknown runs"):
        runs_needed(plan, ["nope"])


@pytest.mark.parametrize("steps", [None, 0, "00:00:04:00"])
def test_plan_budgets_every_run_in_optimiser_steps(tmp_path, steps):
    plan = yaml.safe_load(PLAN.read_text())
    assert all(
        isinstance(r["max_steps"], int) and r["max_steps"] % 64 == 0 and "max_time" not in r
        for r in plan["runs"]
    )  # 32 steps an epoch, validated every 2nd: the last step is validated
    plan["runs"][0]["max_steps"] = steps
    bad = tmp_path / "plan.yaml"
    bad.write_text(yaml.safe_dump(plan))
    with pytest.raises(SystemExit, match="needs max_steps"):
        load_plan(str(bad))


def test_plan_rejects_a_run_that_loads_a_later_one(tmp_path):
    plan = yaml.safe_load(PLAN.read_text())
    plan["runs"][1]["init_from"] = plan["runs"][2]["name"]
    bad = tmp_path / "plan.yaml"
    bad.write_text(yaml.safe_dump(plan))
    with pytest.raises(SystemExit, match="must name an earlier run"):
        load_plan(str(bad))


@pytest.mark.slow  # one `organseg fit --print_config` subprocess per run, ~15-20 s each
@pytest.mark.parametrize("run", [r["name"] for r in yaml.safe_load(PLAN.read_text())["runs"]])
def test_every_demo_run_config_composes(run):
    """Each run's config stack parses in LightningCLI (catches a stage config drifting from the plan)."""
    spec = next(r for r in yaml.safe_load(PLAN.read_text())["runs"] if r["name"] == run)
    cmd = [sys.executable, "-m", "organseg.cli.main", "fit", "--print_config"]
    for cfg in spec["configs"]:
        cmd += ["-c", cfg]
    cmd.append(f"--trainer.max_steps={spec['max_steps']}")
    for key in ("init_from", "shape_from"):
        if spec.get(key):
            cmd.append(f"--model.init_args.{key}=some/earlier.ckpt")
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    printed = yaml.safe_load(out.stdout)
    assert printed["trainer"]["max_steps"] == spec["max_steps"] and printed["trainer"]["max_time"] is None
    for key in ("init_from", "shape_from"):
        if spec.get(key):
            assert printed["model"]["init_args"][key] == "some/earlier.ckpt"


def test_dice_table_lists_every_organ_and_the_mean_per_run():
    summaries = {
        "unet": {
            "per_organ": {"eye_l": {"dice_mean": 0.8}, "lens_l": {"dice_mean": None}},
            "mean": {"dice_mean": 0.8},
        },
        "fn_joint": {
            "per_organ": {"eye_l": {"dice_mean": 0.7}, "lens_l": {"dice_mean": 0.25}},
            "mean": {"dice_mean": 0.475},
        },
    }
    lines = dice_table(summaries).splitlines()
    assert lines[0] == "| organ | unet | fn_joint |"
    assert lines[2] == "| eye_l | 0.800 | 0.700 |"
    assert lines[3] == "| lens_l | - | 0.250 |"
    assert lines[4] == "| **mean** | 0.800 | 0.475 |"


def test_each_step_reports_wall_and_cpu_time(capsys):
    """The demo prints each command's CPU seconds beside its wall time: the CPU time hardly depends on
    how busy the machine is, so it gives the idle estimate on a loaded machine too."""
    import sys

    from organseg.cli.demo import children_cpu_seconds, sh

    before = children_cpu_seconds()
    sh(
        [
            sys.executable,
            "-c",
            "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass",
        ]
    )
    assert children_cpu_seconds() - before >= 0.3
    out = capsys.readouterr().out
    assert re.search(r"\(\d+ s wall, \d+ CPU-s, 1-min load \d+\.\d\)", out)


def test_only_the_demo_s_net_swaps_upstream_alphas_for_the_measured_inverse_sqrt_ones():
    """The demo's one S-Net deviation (ours, measured in the quick FocusNetV2 benchmark) is an overlay on the
    S-Net run alone; snet.yaml's default stays upstream's."""
    runs = {r["name"]: r for r in yaml.safe_load(PLAN.read_text())["runs"]}
    overlay = "experiments/focusnetv2/demo_snet.yaml"
    assert [n for n, r in runs.items() if overlay in r["configs"]] == ["fn_snet"]
    assert runs["fn_snet"]["configs"][-1] == overlay  # last: it wins over demo.yaml
    assert yaml.safe_load((REPO / overlay).read_text())["model"]["init_args"] == {
        "class_weights": "inverse_sqrt_frequency"
    }
    snet = yaml.safe_load((REPO / "experiments/focusnetv2/snet.yaml").read_text())
    assert snet["model"]["init_args"]["class_weights"] == "upstream"
