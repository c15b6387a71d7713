"""How pytest-xdist workers share the CPU: torch's threads split between them.

With several workers, each of them and everything it starts (CLI runs, Ray's workers) runs
torch on the cores divided between the workers (:func:`threads_per_worker`). Torch's OpenMP
threads spin while they wait for work, and on a machine with more threads than cores the
spinning takes the CPU the others need: three processes of two threads each on two cores drew
a fifth of the network evaluations one process alone did (docs/ARCHITECTURE.md).

No worker changes its scheduling priority: how a lowered nice value weighs depends on the
kernel's grouping of sessions (autogroup), and where it counts across the whole machine a
lowered worker starves until the others are done (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (Linux; elsewhere every core),
    capped by a cgroup CPU quota where a container sets one."""
    getaffinity = getattr(os, "sched_getaffinity", None)
    cores = len(getaffinity(0)) if getaffinity else (os.cpu_count() or 1)
    quota = _cgroup_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def _cgroup_quota() -> float | None:
    """CPUs granted by the cgroup quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), if any."""
    for quota_file, period_file in (
        ("/sys/fs/cgroup/cpu.max", None),
        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
    ):
        try:
            fields = Path(quota_file).read_text().split()
            if period_file:
                fields.append(Path(period_file).read_text().strip())
        except OSError:
            continue
        if fields[0] in ("max", "-1") or len(fields) < 2:
            return None
        return int(fields[0]) / int(fields[1])
    return None


def threads_per_worker() -> int | None:
    """Torch threads for each pytest-xdist worker: its share of the usable cores, at least
    one; None when the tests run in one process (torch's own default)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers < 2:
        return None
    return max(1, usable_cores() // workers)
