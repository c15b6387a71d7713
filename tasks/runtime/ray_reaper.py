"""Ends a local Ray session together with the driver that started it.

A driver killed with SIGKILL takes Ray's GCS and raylet with it (Ray starts them with a
parent-death signal), but the raylet's dashboard and runtime-env agents, on noticing, block
for a minute trying to report the death to the GCS that is already gone. The reaper is a
small process in a session of its own that holds the read end of a pipe whose write end
only the driver holds: end of file means the driver is gone, however it ended. It then
terminates every process of the Ray session it has seen, each checked by PID and start
time so that a reused PID is never hit.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys

import psutil

POLL_S = 2.0  # how often the process tree is re-read (the raylet starts workers later)
# SIGTERM, then SIGKILL for what is left: a Ray process either exits on SIGTERM at once or
# hangs reporting to a GCS that is gone, and an interrupted run must be down within 10 s.
GRACE_S = 1.0


def start(root_pids: list[int]) -> int:
    """Watch ``root_pids`` and their descendants; returns the reaper's PID.

    The pipe's write end is left open on purpose for the rest of the driver's life (it is
    not inherited by programs the driver starts): its closing is the signal."""
    read_fd, _write_fd = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tasks.runtime.ray_reaper", str(read_fd), *map(str, root_pids)],
        pass_fds=(read_fd,),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C or kill of the driver's group does not reach it
    )
    os.close(read_fd)
    return proc.pid


def _tree(roots: list[int]) -> dict[int, float]:
    """PID -> start time of the live roots and all their descendants."""
    found: dict[int, float] = {}
    for pid in roots:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            for p in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    found[p.pid] = p.create_time()
    return found


def _terminate(seen: dict[int, float]) -> None:
    alive = []
    for pid, started in seen.items():
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            if p.create_time() == started:
                p.terminate()
                alive.append(p)
    _gone, left = psutil.wait_procs(alive, timeout=GRACE_S)
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()


def main(argv: list[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fd, roots = int(argv[0]), [int(a) for a in argv[1:]]
    seen: dict[int, float] = {}
    while True:
        seen.update(_tree(roots))
        ready, _, _ = select.select([fd], [], [], POLL_S)
        if ready and not os.read(fd, 1):  # end of file: the driver has exited
            break
    _terminate(seen)


if __name__ == "__main__":
    main(sys.argv[1:])
