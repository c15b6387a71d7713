"""The demo's pipeline yields the CPU to the other pytest-xdist worker.

After the demo, most of the suite waits on processes it started (servers, Ray clusters, CLI
runs): on 2 cores about a third of the CPU sits idle while it runs. The demo's pipeline is the
opposite, CPU-bound for ~9 minutes. Run beside the rest at the lowest priority, it takes
only that idle CPU, and the rest runs as fast as it would alone.

Linux sets priorities per thread, and a new thread or process takes its creator's: every
thread of this worker and of every process under it (its Ray session's raylet, whose workers
start later) is lowered, and raised back when the pipeline is done (lowering needs no
privilege; raising it back does, so without it the worker stays low for its remaining tests).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

LOWEST = 19


def _threads() -> list[int]:
    import psutil

    me = psutil.Process()
    ids: list[int] = []
    for proc in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            ids.extend(t.id for t in proc.threads())
    return ids


def _set(niceness: int) -> None:
    for tid in _threads():
        with contextlib.suppress(OSError):  # gone meanwhile, or raising needs privilege
            os.setpriority(os.PRIO_PROCESS, tid, niceness)


@contextlib.contextmanager
def background_while_other_workers_run() -> Iterator[bool]:
    """Lowest priority for this worker's process tree inside the block when pytest-xdist runs
    other workers beside it; yields whether it did."""
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) < 2:
        yield False
        return
    before = os.getpriority(os.PRIO_PROCESS, 0)
    _set(LOWEST)
    try:
        yield True
    finally:
        _set(before)
