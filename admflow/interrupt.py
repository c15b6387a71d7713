"""Ctrl-C and SIGTERM stop a command that runs flows: every stage, within seconds.

The flows run stages in threads (Prefect's task runner) and Ray Train blocks in them, but a
signal only reaches the main thread, and Prefect swaps in its own SIGTERM handler while a
flow runs; a plain KeyboardInterrupt would unwind the main thread and then wait for the
trainings to end. So :func:`guard` watches for the signals itself: Python's C-level handler
writes each signal's number to a pipe (``signal.set_wakeup_fd``) the moment it arrives,
whatever Python handler is installed, and a watcher thread reads it. On the first SIGINT or
SIGTERM the watcher

1. sets :data:`STOP` (stages that loop may poll :func:`stopping`; retries stop),
2. prints one line saying how to resume,
3. runs the stop actions registered with :func:`on_stop` (the flows close their MLflow runs
   as KILLED and their Prefect flow runs as crashed), for at most ``ACTIONS_S``,
4. terminates the processes this one started (the local Ray session, Prefect's server)
   and exits with 128 + the signal's number (see :func:`finish` for why at once).

A rerun resumes: finished stages are cache hits, a training continues from its newest
checkpoint and a sample set from its finished shards.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

STOP = threading.Event()
SIGNALS = (signal.SIGINT, signal.SIGTERM)
ACTIONS_S = 5.0  # the stop actions' time limit: the whole stop stays within 10 s

_actions: dict[object, Callable[[], None]] = {}
_lock = threading.Lock()
_state: dict[str, object] = {}


def stopping() -> bool:
    """True once SIGINT or SIGTERM asked this process to stop."""
    return STOP.is_set()


def on_stop(key: object, action: Callable[[], None]) -> None:
    """Run ``action`` when the process is asked to stop (once per ``key``; a later
    registration under the same key replaces it). Actions run in the watcher thread, in
    registration order, each on its own: one that fails does not keep the others from running."""
    with _lock:
        _actions.pop(key, None)
        _actions[key] = action


def exit_code() -> int:
    """128 + the number of the signal that stopped the process (130 for Ctrl-C)."""
    return 128 + int(_state.get("signum", signal.SIGINT))  # type: ignore[call-overload]


@contextlib.contextmanager
def guard(command: str) -> Iterator[None]:
    """Turn SIGINT and SIGTERM into an orderly stop of everything ``command`` started.

    Must be entered in the main thread, before any stage starts. The body sees a
    KeyboardInterrupt (or Prefect's TerminationSignal) as usual; :func:`finish` ends it."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous = {s: signal.signal(s, _raise_interrupt) for s in SIGNALS}
    old_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    _state["command"] = command
    watcher = threading.Thread(target=_watch, args=(read_fd,), daemon=True, name="interrupt")
    watcher.start()
    try:
        yield
    except BaseException as e:
        if _from_a_signal(e):
            STOP.wait(1.0)  # for a signal on its way to the watcher: then this is a stop
        raise
    finally:
        if not STOP.is_set():  # while stopping, a second signal must stay harmless
            signal.set_wakeup_fd(old_fd)
            for s, handler in previous.items():
                signal.signal(s, handler)
            os.close(write_fd)  # the watcher reads end of file and returns


def _from_a_signal(e: BaseException) -> bool:
    """What the main thread sees of SIGINT or SIGTERM: a KeyboardInterrupt, Prefect's
    TerminationSignal, or the SystemExit(15) of the handler Ray installs in a driver."""
    if isinstance(e, SystemExit):
        return e.code in SIGNALS
    return isinstance(e, KeyboardInterrupt) or type(e).__name__ == "TerminationSignal"


def _raise_interrupt(signum: int, frame: object) -> None:
    """The main thread's side: unwind (the watcher does the stopping)."""
    _state.setdefault("signum", signum)
    STOP.set()  # at once: the main thread must see a stop, not a plain KeyboardInterrupt
    if not _state.get("raised"):  # once: a second Ctrl-C must not break the unwinding
        _state["raised"] = True
        raise KeyboardInterrupt


def _watch(read_fd: int) -> None:
    while True:
        try:
            data = os.read(read_fd, 64)
        except InterruptedError:
            continue
        if not data:
            os.close(read_fd)
            return
        for signum in data:
            if signum in SIGNALS and not _state.get("begun"):
                _state["begun"] = True
                _state.setdefault("signum", signum)
                _stop()


def _stop() -> None:
    STOP.set()
    print(f"admflow {_state.get('command')}: interrupted; rerun to resume", file=sys.stderr)
    sys.stderr.flush()
    with _lock:
        actions = list(_actions.values())
    runner = threading.Thread(target=_run_all, args=(actions,), daemon=True, name="stop-actions")
    runner.start()
    runner.join(ACTIONS_S)  # an unreachable tracking server must not hold the stop up
    _state["stopped"] = True
    finish()


def _run_all(actions: list[Callable[[], None]]) -> None:
    for action in actions:
        with contextlib.suppress(Exception):
            action()


def finish() -> None:
    """End the process after a stop: wait for the stop actions (if the main thread got here
    first), terminate every process this one started and exit with 128 + the signal.

    The stages' threads are not unwound: a training blocks in Ray Train until its workers
    are gone, and a driver whose Ray session is killed under it may hang on the lost
    connection. So the process ends right after signalling its children: the local Ray
    session's reaper (tasks.runtime.ray_reaper) sees the driver go and kills whatever of
    Ray ignored the SIGTERM; on a cluster, Ray ends the actors of a driver that is gone."""
    deadline = time.monotonic() + ACTIONS_S + 1.0
    while not _state.get("stopped") and time.monotonic() < deadline:
        time.sleep(0.05)
    with _lock:  # one caller ends the process
        terminate_children()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(exit_code())


def terminate_children() -> None:
    """SIGTERM to every descendant of this process that shares its session. A child in a
    session of its own (the Ray reaper) is left to do its job once this process is gone."""
    import psutil

    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    own = os.getsid(0)
    for child in children:
        with contextlib.suppress(psutil.Error, OSError):
            if os.getsid(child.pid) == own:
                child.terminate()
