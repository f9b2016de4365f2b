"""Worker processes that end with their parent.

A process-pool worker (``organseg preprocess``'s and ``organseg phantom``'s ``ProcessPoolExecutor``, a
DataLoader worker) waits for work on a queue whose write end it holds itself, so when its parent is
killed (``kill -9``, the OOM killer, a cluster's time limit) nothing ever tells it to stop: it lives on
under init with its imports (~190 MB each), and keeps multiprocessing's resource tracker alive too (the
tracker exits once the last process holding its pipe is gone). :func:`exit_with_parent`, called first
in every worker, ends the worker when its parent dies:

* on Linux, ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` (through ctypes): the kernel kills the worker the moment
  the parent goes. The kernel means the parent *thread* that started the worker, so a pool must be
  started (its ``submit`` calls, which start the processes) from a thread that lives as long as the pool:
  organseg's pools are, from the main thread;
* everywhere, a daemon thread that polls ``os.getppid()`` (once a second by default) and leaves with
  ``os._exit`` when the parent has changed: the fallback where ``prctl`` is not available, and a check
  that does not depend on which thread started the worker;
* a parent that died before either was in place is noticed at once (the parent pid is passed in).

This module imports nothing from organseg, so any layer may use it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

#: exit status of a worker that found its parent gone
ORPHAN_EXIT_STATUS = 75


def _arm_pdeathsig() -> bool:
    """``prctl(PR_SET_PDEATHSIG, SIGKILL)`` on Linux; False where it is not available."""
    if not sys.platform.startswith("linux"):
        return False
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    return False


def _watch_parent(parent_pid: int, poll_s: float) -> None:
    while True:
        time.sleep(poll_s)
        if os.getppid() != parent_pid:
            os._exit(ORPHAN_EXIT_STATUS)


def exit_with_parent(parent_pid: int | None = None, poll_s: float = 1.0) -> str:
    """End this process when ``parent_pid`` (default: the current parent) dies (module doc). Returns how:
    ``"prctl+poll"`` on Linux, ``"poll"`` elsewhere. Exits at once (``ORPHAN_EXIT_STATUS``) if the parent
    is already gone."""
    parent = os.getppid() if parent_pid is None else int(parent_pid)
    armed = _arm_pdeathsig()
    if os.getppid() != parent:  # died before the signal was armed: nobody will send it
        os._exit(ORPHAN_EXIT_STATUS)
    threading.Thread(
        target=_watch_parent, args=(parent, float(poll_s)), name="organseg-parent-watch", daemon=True
    ).start()
    return "prctl+poll" if armed else "poll"
