"""OpenMP's wait policy for the ``organseg`` process: passive, set before torch loads.

torch's CPU kernels run on an OpenMP thread team. Between parallel regions, and at each region's end
barrier, GNU OpenMP (torch's) lets a waiting thread spin for ~300,000 iterations before it sleeps. On
idle cores that saves a wake-up; on a machine shared with other jobs the spinning thread burns the
time slice its team mate needs, and every region waits for team mates that are not running. Measured
on 2 cores (the U-Net's training step, 48x48x16, 2 threads, no data loading): with 2 busy processes
and other jobs beside it 14.1 s per step spinning against 3.5 s passive; with the cores free 0.80 s
against 0.85 s. In whole fits beside 2 busy processes the trainer spent 5.7 CPU seconds per step
spinning and 1.6 passive, as much as on free cores (``benchmarks/threads_under_load.py``);
``runtime/threads.py`` sets the thread counts.

OpenMP reads its environment once, when the library loads, i.e. at ``import torch``: the ``organseg``
command calls ``prefer_passive_waits`` first thing (``cli/main.py``). A policy the user exported wins
(``OMP_WAIT_POLICY``, or GNU's ``GOMP_SPINCOUNT`` / Intel's ``KMP_BLOCKTIME``); the processes the
command starts (DataLoader workers, DDP ranks) inherit it. This module imports nothing heavy on purpose.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

WAIT_POLICY_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def prefer_passive_waits(env: MutableMapping[str, str] | None = None) -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` in ``env`` (default ``os.environ``) unless one of
    ``WAIT_POLICY_VARS`` is set already; True if it was set here. Effective only for OpenMP runtimes
    loaded afterwards (this process's torch if not imported yet, and child processes)."""
    env = os.environ if env is None else env
    if any(var in env for var in WAIT_POLICY_VARS):
        return False
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def wait_policy(env: MutableMapping[str, str] | None = None) -> str:
    """What the environment asks of OpenMP's waiting threads, for the start-of-run line."""
    env = os.environ if env is None else env
    given = [f"{var}={env[var]}" for var in WAIT_POLICY_VARS if var in env]
    return ", ".join(given) if given else "OpenMP default waits (spinning)"
