"""Work items on a pool of Ray actors whose dead members are replaced.

The sampling and likelihood stages both cut their work into shards, keep every actor busy
with one shard at a time and, when an actor dies (a preempted node, an out-of-memory kill),
start a replacement in its slot and send the shard again. :class:`ActorSlots` holds the
actors; :func:`each_result` is the loop.
"""

from __future__ import annotations

import logging
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

log = logging.getLogger(__name__)


class ActorSlots:
    """``workers`` actors of ``cls(*args)`` with Ray ``options``; a dead one is replaced in
    its slot, at most ``max_restarts`` times in all. ``name`` (optional) prefixes the
    actors' Ray names, so a test or an operator can find them."""

    def __init__(
        self,
        cls: type,
        args: tuple,
        options: dict[str, Any],
        workers: int,
        *,
        max_restarts: int,
        what: str,
        name: str | None = None,
    ):
        import ray

        self.ray = ray
        self.cls: Any = ray.remote(cls)
        self.args = args
        self.options = options
        self.what = what
        self.name = f"{name}-{uuid.uuid4().hex[:8]}" if name else None
        self.restarts = 0
        self.max_restarts = self._budget = max_restarts
        self.actors = [self._new(slot) for slot in range(workers)]
        # Fail fast (and clearly) on weights that do not fit, before any work is sent.
        self.info: list[dict[str, Any]] = ray.get([a.info.remote() for a in self.actors])

    def _new(self, slot: int) -> Any:
        options = dict(self.options)
        if self.name:
            options["name"] = f"{self.name}-{slot}-{self.restarts}"
        return self.cls.options(**options).remote(*self.args)

    def replace(self, slot: int, err: Exception) -> None:
        self.restarts += 1
        if self.restarts > self.max_restarts:
            raise RuntimeError(
                f"{self.what} actors died {self.restarts} times; last: {err}"
            ) from err
        log.warning("%s actor %d died (%s); starting a replacement", self.what, slot,
                    type(err).__name__)  # fmt: skip
        self.ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self._new(slot)

    def reload(self, args: tuple, method: str = "load") -> None:
        """Hand the actors new constructor ``args`` (a pool kept warm for another stage, see
        :mod:`tasks.runtime.warm`): each runs ``method(*args)``, which returns its info;
        replacements from now on start with ``args``, and the new stage has its own budget
        of replacements."""
        self.args = args
        self.max_restarts = self.restarts + self._budget
        self.info = self.ray.get([getattr(a, method).remote(*args) for a in self.actors])

    def shutdown(self) -> None:
        for a in self.actors:
            self.ray.kill(a, no_restart=True)


def each_result(
    slots: ActorSlots, todo: Iterable[int], call: Callable[[Any, int], Any]
) -> Iterator[tuple[int, Any]]:
    """``(index, result)`` for every index of ``todo``, in completion order: ``call(actor,
    index)`` sends one item to a free actor and returns its object ref. An item whose actor
    died goes to the replacement first; any other error is raised. The caller shuts the
    slots down."""
    from ray.exceptions import RayActorError

    ray = slots.ray
    pending = deque(todo)
    inflight: dict[Any, tuple[int, int]] = {}

    def submit(slot: int) -> None:
        if pending:
            index = pending.popleft()
            inflight[call(slots.actors[slot], index)] = (slot, index)

    for slot in range(len(slots.actors)):
        submit(slot)
    while inflight:
        [ref], _ = ray.wait(list(inflight), num_returns=1)
        slot, index = inflight.pop(ref)
        try:
            result = ray.get(ref)
        except RayActorError as err:
            slots.replace(slot, err)
            pending.appendleft(index)
            submit(slot)
            continue
        yield index, result
        submit(slot)
