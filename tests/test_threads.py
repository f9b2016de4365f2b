"""Thread counts (issue 11): loader workers single-threaded, the trainer its share of the cores, both
from the ``threads`` section, printed when a fit starts; OpenMP's waiting threads passive for the
``organseg`` command. (Throughput under load is a benchmark, not a test: benchmarks/threads_under_load.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers.tiny_fit import tiny_fit_args
from organseg.cli.main import main
from organseg.errors import ConfigError
from organseg.runtime import threads as threads_module
from organseg.runtime.openmp import WAIT_POLICY_VARS, prefer_passive_waits, wait_policy
from organseg.runtime.threads import Threads, available_cpus, cores_per_process

REPO = Path(__file__).resolve().parents[1]

WORKER_PROBE = """
import json, os, signal
import SimpleITK as sitk, torch
from organseg.data.workers import THREAD_ENV_VARS, init_worker

def state():
    return {
        "torch": torch.get_num_threads(),
        "sitk": sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(),
        "env": {v: os.environ.get(v) for v in THREAD_ENV_VARS},
    }

before = state()
init_worker(0, threads=None)
untouched = state()
init_worker(1)
print(json.dumps({
    "before": before, "untouched": untouched, "after": state(),
    "interop": torch.get_num_interop_threads(),
    "sigusr1_ignored": signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN,
}))
"""


def test_init_worker_makes_a_worker_single_threaded():
    # a fresh process, as a spawned DataLoader worker is (torch's inter-op count can be set only once)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run(
        [sys.executable, "-c", WORKER_PROBE], capture_output=True, text=True, env=env, check=True, timeout=120
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["untouched"] == got["before"]  # threads=None: the libraries' defaults stay
    assert got["after"]["torch"] == 1 and got["interop"] == 1
    assert got["after"]["sitk"] == 1
    assert set(got["after"]["env"].values()) == {"1"}  # OpenMP/BLAS/ITK of anything it starts
    assert got["sigusr1_ignored"]


def test_the_datamodule_hands_its_worker_threads_to_every_loader(hn_small):
    from organseg.data import CTDataModule

    dm = CTDataModule(
        cards=[str(hn_small["card"])],
        patch_size=[48, 48, 16],
        num_workers=1,
        augmentation=None,
        preprocess=False,
    )
    dm.setup("fit")
    assert dm.worker_threads == 1
    assert dm.train_dataloader().worker_init_fn.keywords == {"threads": 1}
    dm.worker_threads = None  # threads.enabled: false
    assert dm.val_dataloader().worker_init_fn.keywords == {"threads": None}


class _WorkerReport(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield torch.tensor([os.getpid(), torch.get_num_threads()])


def test_workers_start_from_a_preloaded_forkserver_and_stay_single_threaded(hn_small):
    """Not forked from the trainer (its thread pools, HDF5 handles), not spawned (re-imports per worker)."""
    import importlib
    from functools import partial

    from organseg.data import CTDataModule
    from organseg.data.workers import WORKER_PRELOAD, init_worker, worker_context

    for name in WORKER_PRELOAD:  # a misspelt module would only fail inside the server
        importlib.import_module(name)
    dm = CTDataModule(cards=[str(hn_small["card"])], patch_size=[48, 48, 16], num_workers=2, preprocess=False)
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        assert loader.multiprocessing_context.get_start_method() == "forkserver"
    loader = torch.utils.data.DataLoader(
        _WorkerReport(),
        batch_size=None,
        num_workers=2,
        worker_init_fn=partial(init_worker, threads=1),
        multiprocessing_context=worker_context(),
    )
    reports = [t.tolist() for t in loader]
    assert len(reports) == 2 and len({pid for pid, _ in reports}) == 2 and os.getpid() not in reports[0]
    assert all(threads == 1 for _, threads in reports)


# ------------------------------------------------------------------------------------ the share
def test_a_process_share_of_the_cores(tmp_path):
    assert cores_per_process(1, env={}, cpus=8) == 8
    assert cores_per_process(2, env={}, cpus=8) == 4  # DDP: 2 ranks on this node
    assert cores_per_process(4, env={}, cpus=3) == 1
    slurm = {"SLURM_NTASKS": "2", "SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "fit", "SLURM_CPUS_PER_TASK": "3"}
    assert cores_per_process(2, env=slurm, cpus=32) == 3  # --cpus-per-task, bound or not
    assert cores_per_process(2, env={**slurm, "SLURM_CPUS_PER_TASK": "64"}, cpus=32) == 32
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")  # 1.5 CPUs
    assert available_cpus(quota) == min(2, len(os.sched_getaffinity(0)))
    quota.write_text("max 100000\n")
    assert available_cpus(quota) == len(os.sched_getaffinity(0))


def test_defaults_and_overrides_per_process(monkeypatch):
    monkeypatch.setattr(threads_module, "available_cpus", lambda: 8)
    dm = SimpleNamespace(hparams={"num_workers": 2}, worker_threads=1)
    one = SimpleNamespace(num_devices=1, datamodule=dm)
    ddp = SimpleNamespace(num_devices=2, datamodule=dm)
    assert Threads().chosen(one) == (8, 1, 8)
    assert Threads().chosen(ddp) == (4, 1, 4)  # each rank its part of the node
    assert Threads(trainer=3, workers=2).chosen(ddp) == (3, 2, 4)
    off = Threads(enabled=False)
    assert off.chosen(one) == (torch.get_num_threads(), None, 8)
    line = Threads().describe(4, 1, 4, ddp)
    assert line.startswith(
        "organseg: threads: trainer 4 intra-op, 2 loader workers x 1 (4 cores per training"
    )
    assert "2 on this node" in line


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"trainer": 0}, "threads.trainer"),
        ({"trainer": -2}, "threads.trainer"),
        ({"workers": 0}, "threads.workers"),
    ],
)
def test_a_bad_count_is_a_config_error_naming_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=rf"^{key}: must be an integer >= 1") as info:
        Threads(**kwargs)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------- OpenMP waits
def test_openmp_waits_passive_unless_the_user_chose(monkeypatch):
    env: dict = {}
    assert prefer_passive_waits(env) and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    for var in WAIT_POLICY_VARS:
        mine = {var: "7"}
        assert not prefer_passive_waits(mine) and mine == {var: "7"}
    assert wait_policy({}) == "OpenMP default waits (spinning)"
    assert wait_policy({"GOMP_SPINCOUNT": "300000"}) == "GOMP_SPINCOUNT=300000"
    # the organseg command sets it first thing (so torch's OpenMP, loaded later, reads it)
    for var in WAIT_POLICY_VARS:
        monkeypatch.setenv(var, "x")  # recorded, so the test's end restores the variable's absence
        monkeypatch.delenv(var)
    assert main([]) == 0
    assert os.environ.get("OMP_WAIT_POLICY") == "PASSIVE"


# ------------------------------------------------------------------------------- fit (in process)
def tiny_fit(hn_small, tmp_path: Path) -> list[str]:
    return tiny_fit_args(hn_small["card"], tmp_path)


def test_fit_sets_and_prints_the_thread_counts(hn_small, tmp_path, monkeypatch, capsys):
    from organseg.methods import UNetBaseline

    monkeypatch.chdir(tmp_path)
    seen = []
    step = UNetBaseline.training_step

    def spy(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return step(self, *args, **kwargs)

    monkeypatch.setattr(UNetBaseline, "training_step", spy)
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    assert main([*tiny_fit(hn_small, tmp_path), f"--threads.trainer={target}", "--threads.workers=2"]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("organseg: threads:")]
    assert len(lines) == 1, out
    assert lines[0].startswith(f"organseg: threads: trainer {target} intra-op, 0 loader workers x 2 (")
    assert seen == [target]  # in effect while training
    assert torch.get_num_threads() == before  # and given back when the fit ends


def test_fit_rejects_a_bad_count_in_one_line(hn_small, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([*tiny_fit(hn_small, tmp_path), "--threads.trainer=0"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith("Seed set")]
    assert len(err) == 1 and err[0].startswith("organseg fit: error: threads.trainer: must be"), err
