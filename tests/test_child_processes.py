"""Worker processes end with their parent (organseg.child_processes): a ``kill -9`` of ``organseg
preprocess`` leaves none of its workers, nor multiprocessing's resource tracker, running under init."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers.synthetic_cases import make_card, make_nnunet_dataset

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")

ORGANSEG = str(Path(sys.executable).with_name("organseg"))


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else int(fields[1])  # a zombie has exited already


def _children(pid: int) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _ppid(int(p.name)) == pid]


def _alive(pids) -> list[int]:
    return [p for p in pids if _ppid(p) is not None]


def _wait_gone(pids, timeout: float) -> list[int]:
    end = time.monotonic() + timeout
    while _alive(pids) and time.monotonic() < end:
        time.sleep(0.1)
    return _alive(pids)


# a parent that starts one grandchild-to-be with exit_with_parent, prints its pid and waits to be killed
PARENT = textwrap.dedent(
    """
    import multiprocessing as mp, os, sys, time
    import organseg.child_processes as cp

    def child(parent, no_prctl):
        if no_prctl:
            cp._arm_pdeathsig = lambda: False  # the fallback: polling alone
        how = cp.exit_with_parent(parent, poll_s=0.2)
        print(os.getpid(), how, flush=True)
        time.sleep(600)

    if __name__ == "__main__":
        p = mp.get_context("spawn").Process(target=child, args=(os.getpid(), sys.argv[1] == "poll"))
        p.start()
        time.sleep(600)
    """
)


@pytest.mark.parametrize("mode", ["prctl", "poll"])
def test_a_worker_ends_when_its_parent_is_killed(tmp_path, mode):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script), mode], stdout=subprocess.PIPE, text=True)
    try:
        pid_text, how = parent.stdout.readline().split()
        worker = int(pid_text)
        assert how == ("prctl+poll" if mode == "prctl" else "poll")
        assert _alive([worker]) == [worker]
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        assert _wait_gone([worker], 5.0) == [], f"worker {worker} outlived its parent ({mode})"
    finally:
        parent.kill()


def test_a_parent_already_gone_is_noticed_at_once(tmp_path):
    """A worker whose parent died before it armed the check (a pid that is not its parent) leaves at once."""
    from organseg.child_processes import ORPHAN_EXIT_STATUS

    code = (
        "import os, time, organseg.child_processes as cp\n"
        "cp.exit_with_parent(1 if os.getppid() != 1 else 2)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], timeout=30)

    assert proc.returncode == ORPHAN_EXIT_STATUS


def test_kill_9_of_preprocess_leaves_no_worker_running(tmp_path):
    """``organseg preprocess --workers 2`` killed while its pool runs: its workers and the resource
    tracker (every process it started) are gone within seconds, not left under init."""
    root = tmp_path / "raw"
    make_nnunet_dataset(root, tuple(f"hn_{i:03d}" for i in range(40)), shape=(96, 96, 40))
    card = make_card(tmp_path, root)
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.Popen(
        [ORGANSEG, "preprocess", str(card.source), "--workers", "2", "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        seen: set[int] = set()
        end = time.monotonic() + 120
        while time.monotonic() < end and proc.poll() is None:
            seen |= set(_children(proc.pid))
            workers = [p for p in _alive(seen) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
            if len(workers) == 2 and list(Path(card.cache).parent.glob("*.tmp-*")):
                time.sleep(1.0)  # the workers hold cases now, or wait on the queue for the next
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"the pool never started (exit {proc.poll()}): {proc.stderr.read()[-2000:]}")
        seen |= set(_children(proc.pid))
        assert len(_alive(seen)) >= 3, "two workers and the resource tracker"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert _wait_gone(seen, 10.0) == [], "processes of the killed preprocess still running"
    finally:
        proc.kill()
