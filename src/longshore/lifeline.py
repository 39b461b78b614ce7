"""Processes the master forks (workers, helpers) do not outlive it.

A master killed outright (``kill -9``, the OOM killer) cannot stop its children. Each
child therefore asks the kernel for SIGTERM when the master dies (``PR_SET_PDEATHSIG``,
Linux) and so stops as on ``stop``; everywhere, it also notices that it was handed to
another parent (``getppid()`` changed) on its periodic checks.
"""

from __future__ import annotations

import os
import signal
import sys

try:  # loaded before the master forks, not in every child
    import ctypes
except ImportError:  # pragma: no cover
    ctypes = None  # type: ignore[assignment]

#: prctl option: the signal this process gets when its parent dies.
_PR_SET_PDEATHSIG = 1


def follow_master(master_pid: int) -> bool:
    """In a process the master forked: get SIGTERM when the master dies.

    Returns True when the master has already gone (it died before this was set up, so
    no signal will come). Call again after changing user: the kernel forgets the
    setting when a process's credentials change.
    """
    _set_parent_death_signal(signal.SIGTERM)
    return master_gone(master_pid)


def master_gone(master_pid: int) -> bool:
    """True once the master has died (this process now has another parent)."""
    return os.getppid() != master_pid


def _set_parent_death_signal(signum: int) -> None:
    if ctypes is None or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(ctypes.c_int(_PR_SET_PDEATHSIG), ctypes.c_ulong(signum), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
    except (OSError, AttributeError):  # no prctl here: the periodic check remains
        pass
