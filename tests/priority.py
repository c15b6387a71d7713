"""How pytest-xdist workers share the CPU: threads split between them, the demo giving way.

With several workers, each of them and everything it starts (CLI runs, Ray's workers) runs
torch on the cores divided between the workers (:func:`threads_per_worker`). Torch's OpenMP
threads spin while they wait for work, and on a machine with more threads than cores the
spinning takes the CPU the others need: three processes of two threads each on two cores drew
a fifth of the network evaluations one process alone did (docs/ARCHITECTURE.md).

The demo's pipeline is CPU-bound for ~9 minutes; most of the rest of the suite waits on the
processes it starts (servers, Ray clusters, CLI runs). With two workers, one runs the demo
while the other works through the rest, and the demo's worker lowers the nice value of every
thread of its process tree (a new thread or process takes its creator's), raised back when the
pipeline is done (raising needs privilege; without it the worker stays low).

Linux schedules each session's processes as one group (autogroup) and a nice value counts only
inside its group, so this is a partial yield: it orders the demo against the other worker's
own threads, while the processes that tests start in sessions of their own share the CPU
evenly with it. Why not lower the demo's whole session, and what each way measured:
docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

LOWEST = 19


def threads_per_worker() -> int | None:
    """Torch threads for each pytest-xdist worker: its share of the cores this process may
    use, at least one; None when the tests run in one process (torch's own default)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers < 2:
        return None
    getaffinity = getattr(os, "sched_getaffinity", None)  # Linux; elsewhere all the cores
    cores = len(getaffinity(0)) if getaffinity else (os.cpu_count() or 1)
    return max(1, cores // workers)


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
