"""Stopping services by process group: each signalled at once, SIGKILL after its grace."""

from __future__ import annotations

import os
import signal
import time


def stop_groups(groups: list[tuple[int, int, float]]) -> None:
    """Signal each (process group, signal, grace seconds) at once, SIGKILL each group still
    there after its grace, and return only when no process of any group is left (reaping
    our own children)."""
    start = time.time()
    for pid, sig, _grace in groups:
        _signal_group(pid, sig)
    left = {pid: grace for pid, _sig, grace in groups}
    killed: set[int] = set()
    while left:
        waited = time.time() - start
        for pid, grace in list(left.items()):
            if _group_gone(pid) or waited > grace + 10.0:  # past that: nothing we can end
                del left[pid]
            elif waited > grace and pid not in killed:
                _signal_group(pid, signal.SIGKILL)
                killed.add(pid)
        if left:
            time.sleep(0.2)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _group_gone(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False
