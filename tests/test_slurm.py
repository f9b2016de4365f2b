"""`organseg fit` on a real (localhost) SLURM cluster through experiments/slurm/fit_single_node.sbatch:
a 2-task DDP fit, then pre-emption (SLURM's warning signal) -> HPC checkpoint -> requeue -> resume
into the same run folder and W&B run id, training continuing from the checkpoint's global step.

Acceptance test: it installs Debian's slurm-wlm + munge when sbatch is missing and FAILS (does
not skip) when that is impossible. Every daemon it starts is stopped, all state is under tmp."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from helpers.slurm_cluster import LocalSlurm, SlurmUnavailable

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "experiments/slurm/fit_single_node.sbatch"
VENV_BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.ddp, pytest.mark.timeout(600)]


JOB_ENV = {"SLURM_JOB_ID": "123", "SLURM_NTASKS": "2", "SLURM_JOB_NAME": "organseg-fit"}


def wandb_fit_config(**init_args):
    from jsonargparse import Namespace

    args = Namespace(
        id=None, version=None, resume=None, project="organseg", save_dir="lightning_logs", dir=None
    )
    for key, value in init_args.items():
        args[key] = value
    return Namespace(
        trainer=Namespace(
            default_root_dir="lightning_logs",
            logger=Namespace(class_path="lightning.pytorch.loggers.WandbLogger", init_args=args),
        )
    )


def test_job_defaults_give_a_run_id_and_folder_that_survive_a_requeue():
    from organseg.runtime import slurm

    assert slurm.job_id({}) is None and slurm.job_id({**JOB_ENV, "SLURM_JOB_NAME": "interactive"}) is None
    assert slurm.job_id({**JOB_ENV, "SLURM_ARRAY_JOB_ID": "120", "SLURM_ARRAY_TASK_ID": "3"}) == "120_3"
    config = wandb_fit_config()
    assert slurm.apply_job_defaults(config, JOB_ENV) == "123"
    assert (
        config.trainer.logger.init_args.id == "slurm-123"
        and config.trainer.logger.init_args.resume == "allow"
    )
    assert config.trainer.default_root_dir == "lightning_logs/organseg/slurm-123"
    given = wandb_fit_config(id="mine", resume="must")
    given.trainer.default_root_dir = "/scratch/runs"
    slurm.apply_job_defaults(given, JOB_ENV)  # what the user set is kept
    assert (given.trainer.logger.init_args.id, given.trainer.logger.init_args.resume) == ("mine", "must")
    assert given.trainer.default_root_dir == "/scratch/runs"
    trial = wandb_fit_config()  # a sweep trial inside a SLURM job
    slurm.apply_job_defaults(trial, {**JOB_ENV, "WANDB_RUN_ID": "sweep1-t03"})
    assert trial.trainer.logger.init_args.id == "sweep1-t03"
    assert trial.trainer.default_root_dir == "lightning_logs/organseg/sweep1-t03"
    outside = wandb_fit_config()
    assert slurm.apply_job_defaults(outside, {}) is None and outside.trainer.logger.init_args.id is None


def test_resume_picks_the_newest_of_hpc_and_last_checkpoint(tmp_path):
    from organseg.runtime import slurm

    assert slurm.resume_checkpoint(tmp_path, tmp_path) is None  # a fresh job starts from scratch
    (tmp_path / "checkpoints").mkdir()
    for i, name in enumerate(["hpc_ckpt_2.ckpt", "hpc_ckpt_10.ckpt", "checkpoints/last.ckpt"]):
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    assert [p.name for p in slurm.hpc_checkpoints(tmp_path)] == ["hpc_ckpt_2.ckpt", "hpc_ckpt_10.ckpt"]
    assert (
        slurm.resume_checkpoint(tmp_path, tmp_path) == tmp_path / "checkpoints/last.ckpt"
    )  # killed without warning
    os.utime(tmp_path / "hpc_ckpt_10.ckpt", (2000, 2000))
    assert (
        slurm.resume_checkpoint(tmp_path, tmp_path) == tmp_path / "hpc_ckpt_10.ckpt"
    )  # the pre-emption save


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        slurm = LocalSlurm(tmp_path_factory.mktemp("slurm")).__enter__()
    except SlurmUnavailable as exc:  # an acceptance test: fail, never skip
        pytest.fail(str(exc), pytrace=False)
    try:
        yield slurm
    finally:
        slurm.stop()  # every daemon it started, also when a test failed


def job_folder(
    tmp: Path, hn_small, max_epochs: int, steps_per_epoch: int, num_workers: int = 0
) -> tuple[Path, Path]:
    """A submit dir with a tiny fit config (2 ranks x batch 2); returns (submit dir, its config)."""
    (tmp / "lightning_logs").mkdir(parents=True)  # sbatch --output goes there
    cfg = {
        "trainer": {
            "max_epochs": max_epochs,
            "check_val_every_n_epoch": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "log_every_n_steps": 1,
            "callbacks": [
                {
                    "class_path": "helpers.slurm_probe.StepRecorder",
                    "init_args": {"out_dir": str(tmp / "steps")},
                }
            ],
        },
        "model": {
            "init_args": {
                "filters": [8, 16, 32],
                "strides": [[1, 1, 1], [2, 2, 1], [2, 2, 2]],
                "hd95_every_n_epochs": 1000,
                "sw_overlap": 0.25,
            }
        },
        "data": {
            "init_args": {
                "cards": [str(hn_small["card"])],
                "patch_size": [48, 48, 16],
                "batch_size": 2,
                "patches_per_epoch": 4 * steps_per_epoch,
                "num_workers": num_workers,
                "augmentation": None,
            }
        },
    }
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    return tmp, tmp / "tiny.yaml"


def submit(cluster: LocalSlurm, folder: Path, config: Path) -> str:
    env = {
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "ORGANSEG": str(VENV_BIN / "organseg"),
        "PYTHONPATH": str(REPO / "tests"),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "OMP_NUM_THREADS": "1",
    }
    # the template's #SBATCH lines ask for 4 GPUs x 8 CPUs; this node has CPUs only
    return cluster.sbatch(
        "--ntasks-per-node=2",
        "--cpus-per-task=1",
        "--gres=none",
        str(SBATCH),
        "-c",
        str(REPO / "experiments/baseline/unet.yaml"),
        "-c",
        str(REPO / "data_modules/hn_phantom.yaml"),
        "-c",
        str(config),
        "--trainer.accelerator=cpu",
        env=env,
        cwd=folder,
    )


def records(folder: Path, what: str) -> dict[tuple[int, int], dict]:
    out = {}
    for f in (folder / "steps").glob(f"{what}-*.json"):
        r = json.loads(f.read_text())
        out[(r["restart"], r["rank"])] = r
    return out


def job_log(folder: Path, job: str) -> str:
    log = folder / f"lightning_logs/slurm-{job}.out"
    return log.read_text(errors="replace") if log.exists() else "(no job output)"


def finished(cluster, folder, job, timeout, what="COMPLETED"):
    try:
        return cluster.wait(
            job,
            lambda i: (
                i.get("JobState")
                in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
            ),
            timeout,
            what,
        )
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n--- job output\n{job_log(folder, job)[-6000:]}") from None


@pytest.mark.slow
def test_sbatch_template_runs_a_two_task_ddp_fit(cluster, hn_small, tmp_path):
    folder, cfg = job_folder(tmp_path, hn_small, max_epochs=1, steps_per_epoch=2)
    job = submit(cluster, folder, cfg)
    info = finished(cluster, folder, job, timeout=240)
    log = job_log(folder, job)
    assert info["JobState"] == "COMPLETED", log[-6000:]
    ends = records(folder, "end")
    assert set(ends) == {(0, 0), (0, 1)}, log[-6000:]  # both ranks of one start
    assert {r["world"] for r in ends.values()} == {2} and ends[0, 0]["pid"] != ends[0, 1]["pid"]
    run = folder / f"lightning_logs/organseg/slurm-{job}"  # default W&B id slurm-<job>
    ckpt = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2
    assert ends[0, 0]["default_root_dir"].endswith(f"lightning_logs/organseg/slurm-{job}")
    config = yaml.safe_load((run / "config_fit.yaml").read_text())
    assert config["trainer"]["logger"]["init_args"]["id"] == f"slurm-{job}"
    assert config["trainer"]["logger"]["init_args"]["resume"] == "allow"  # W&B continues that run
    assert (
        str(config["trainer"]["devices"]) == "2" and config["trainer"]["num_nodes"] == 1
    )  # from the allocation


@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_and_resumes_the_same_run(cluster, hn_small, tmp_path):
    max_epochs, steps_per_epoch = 2, 4
    folder, cfg = job_folder(
        tmp_path, hn_small, max_epochs, steps_per_epoch, num_workers=1
    )  # workers get the signal too
    job = submit(cluster, folder, cfg)
    run = folder / f"lightning_logs/organseg/slurm-{job}"
    # once epoch 0 is checkpointed, training is in progress: warn the job as SLURM does before
    # pre-empting it (--signal=SIGUSR1@90 signals every task of its steps; the batch shell is spared)
    deadline = time.monotonic() + 180
    while not (run / "checkpoints/last.ckpt").exists():
        state = cluster.job(job).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), (
            f"job {job} {state} before it was signalled:\n{job_log(folder, job)[-6000:]}"
        )
        assert time.monotonic() < deadline, f"no last.ckpt after 180 s:\n{job_log(folder, job)[-6000:]}"
        time.sleep(0.5)
    cluster.run("scancel", "--signal=USR1", job)
    # the job requeues itself; SLURM holds a requeued job for ~2 min (Reason=BeginTime): release it now
    try:
        cluster.wait(
            job,
            lambda i: (
                i.get("JobState")
                not in ("RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "CONFIGURING")
            ),
            120,
            "requeue",
        )
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n--- job output\n{job_log(folder, job)[-6000:]}") from None
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
    info = finished(cluster, folder, job, timeout=300)
    log = job_log(folder, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-6000:]

    hpc = run / "hpc_ckpt_1.ckpt"  # Lightning's name, in default_root_dir = the run folder
    assert hpc.exists(), log[-6000:]
    saved_step = torch.load(hpc, map_location="cpu", weights_only=False)["global_step"]
    assert steps_per_epoch < saved_step < max_epochs * steps_per_epoch  # saved in epoch 1, mid-training
    starts, ends = records(folder, "start"), records(folder, "end")
    assert {k: r["global_step"] for k, r in starts.items()} == {
        (0, 0): 0,
        (0, 1): 0,
        (1, 0): saved_step,
        (1, 1): saved_step,
    }
    assert Path(folder, starts[1, 0]["ckpt_path"]).resolve() == hpc.resolve()  # relative to the submit dir
    assert set(ends) == {(1, 0), (1, 1)}  # the first start exited on the signal, the restart finished
    assert all(r["global_step"] == max_epochs * steps_per_epoch for r in ends.values())
    assert f"resumes from {hpc.relative_to(folder)}" in log and "Restored all states" in log
    # one run folder and one W&B run id for both starts (offline: one folder per start, same id)
    assert [p.name for p in (folder / "lightning_logs/organseg").iterdir()] == [f"slurm-{job}"]
    wandb_runs = sorted((folder / "lightning_logs/wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and all(p.name.endswith(f"-slurm-{job}") for p in wandb_runs), wandb_runs
    last = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == max_epochs * steps_per_epoch
