"""The demo's pipeline yields the CPU to the other pytest-xdist worker.

After the demo, most of the suite waits on processes it started (servers, Ray clusters, CLI
runs): on 2 cores about a third of the CPU sits idle while it runs. The demo's pipeline is the
opposite, CPU-bound for ~9 minutes. Run beside the rest at the lowest priority, it takes
only that idle CPU, and the rest runs about as fast as it would alone.

Linux schedules a session's processes as one group (autogroup) against other sessions, and a
nice value counts only inside its group. So each xdist worker starts its own session
(:func:`own_session`, from ``tests/conftest.py``), which its Ray session and every process it
starts join, and the demo lowers that whole group (``/proc/self/autogroup``). Without
autogroups, the nice value of every thread of the worker's process tree does the same (a new
thread or process takes its creator's). Both are raised back when the pipeline is done; that
needs privilege, so without it the worker stays low for its remaining tests.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

LOWEST = 19
AUTOGROUP = Path("/proc/self/autogroup")


def beside_other_workers() -> bool:
    return int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1


def own_session() -> None:
    """An xdist worker's own session, hence its own scheduling group (see the module)."""
    if beside_other_workers() and os.environ.get("PYTEST_XDIST_WORKER"):
        with contextlib.suppress(OSError):  # already a session or group leader
            os.setsid()


def _threads() -> list[int]:
    import psutil

    me = psutil.Process()
    ids: list[int] = []
    for proc in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            ids.extend(t.id for t in proc.threads())
    return ids


def _set(niceness: int) -> None:
    with contextlib.suppress(OSError):  # no autogroups, or raising needs privilege
        AUTOGROUP.write_text(str(niceness))
    for tid in _threads():
        with contextlib.suppress(OSError):  # gone meanwhile, or raising needs privilege
            os.setpriority(os.PRIO_PROCESS, tid, niceness)


@contextlib.contextmanager
def background_while_other_workers_run() -> Iterator[bool]:
    """Lowest priority for this worker's process tree inside the block when pytest-xdist runs
    other workers beside it; yields whether it did."""
    if not beside_other_workers():
        yield False
        return
    before = os.getpriority(os.PRIO_PROCESS, 0)
    _set(LOWEST)
    try:
        yield True
    finally:
        _set(before)
