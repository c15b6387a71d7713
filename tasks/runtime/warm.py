"""Actor pools kept warm across the stages of one phase of a flow.

Starting a sampling or an Inception actor costs a process, torch's import and a model load:
3-5 CPU-seconds on a CPU core, more where a CUDA context is made, for seconds of work on a
small set. A flow that draws (or scores) several sets in a row opens :func:`keep_warm`: inside
it, a stage that asks for a pool with the same key as the pool kept last gets that pool back
(and loads its own weights into it); a pool with another key replaces the kept one, whose
actors end first. So at most one kept pool holds resources at a time, and no stage ever waits
on resources a kept pool holds. A stage that fails discards the pool it used. Outside
:func:`keep_warm` every stage starts its own pool and ends it, as a single stage should.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Hashable, Iterator
from contextvars import ContextVar
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)
P = TypeVar("P")


def _end(end: Callable[[Any], None], pool: Any) -> None:
    """End a pool; a failure to (Ray already gone on a stop) is logged, never raised over
    the error that is on its way out."""
    try:
        end(pool)
    except Exception as e:
        log.warning("ending an actor pool failed: %s", e)


class WarmPools:
    """The pool kept by one :func:`keep_warm` block, with its key and how to end it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: tuple[Hashable, Any, Callable[[Any], None]] | None = None
        self.started = 0  # pools started inside the block
        self.reused = 0  # times a stage got the kept pool back

    def take(self, key: Hashable) -> Any | None:
        """The kept pool if its key is ``key`` (it leaves the shelf while a stage uses it);
        otherwise the kept pool, if any, is ended and None is returned."""
        with self._lock:
            kept, self._kept = self._kept, None
        if kept is None:
            return None
        if kept[0] == key:
            self.reused += 1
            return kept[1]
        _end(kept[2], kept[1])
        return None

    def keep(self, key: Hashable, pool: Any, end: Callable[[Any], None]) -> None:
        with self._lock:
            old, self._kept = self._kept, (key, pool, end)
        if old is not None:  # two stages at once in one block: keep the newer pool only
            _end(old[2], old[1])

    def close(self) -> None:
        with self._lock:
            kept, self._kept = self._kept, None
        if kept is not None:
            _end(kept[2], kept[1])


_current: ContextVar[WarmPools | None] = ContextVar("admflow_warm_pools", default=None)


@contextlib.contextmanager
def keep_warm() -> Iterator[WarmPools]:
    """Pools of the stages run inside the block are handed from stage to stage (see module
    docstring) and ended when it ends, however it ends."""
    pools = WarmPools()
    token = _current.set(pools)
    try:
        yield pools
    finally:
        _current.reset(token)
        pools.close()
        if pools.started or pools.reused:
            log.info("actor pools: %d started, %d reused", pools.started, pools.reused)


class Lease(Generic[P]):
    """A pool for one stage: fresh or handed on. ``fresh`` tells the stage whether it must
    load its own state into the pool's actors. :meth:`release` keeps the pool for the next
    stage inside :func:`keep_warm` (when the stage succeeded) or ends it."""

    def __init__(self, key: Hashable, pool: P, fresh: bool, end: Callable[[P], None]):
        self.key, self.pool, self.fresh, self._end = key, pool, fresh, end
        self._pools = _current.get()

    def release(self, ok: bool) -> None:
        if ok and self._pools is not None:
            self._pools.keep(self.key, self.pool, self._end)
        else:
            _end(self._end, self.pool)


def lease(key: Hashable, start: Callable[[], P], end: Callable[[P], None]) -> Lease[P]:
    """The pool for ``key``: the kept one inside :func:`keep_warm` when its key matches,
    otherwise ``start()``."""
    pools = _current.get()
    kept = pools.take(key) if pools is not None else None
    if kept is not None:
        return Lease(key, kept, False, end)
    pool = start()
    if pools is not None:
        pools.started += 1
    return Lease(key, pool, True, end)
