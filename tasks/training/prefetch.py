"""Batches made ahead of the step that needs them, on a background thread.

Reading and decoding a batch's PNGs (and augmenting it) is host work that would otherwise
stall the device at the start of every step. A batch is a pure function of its step (see
:mod:`tasks.training.stream`), so making it early, on another thread, changes nothing in
what the step computes; the queue is short so memory holds only a couple of batches.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

_POLL_S = 0.1  # how often a blocked producer checks whether it was closed


class Prefetcher(Generic[T]):
    """``get(step)`` returns ``make(step)``, made ``depth`` steps ahead on one thread.

    Steps are expected in order; a request for another step (a resumed or rewound loop)
    restarts the producer there. An exception in ``make`` is raised by ``get``.
    """

    def __init__(self, make: Callable[[int], T], depth: int = 2):
        self.make = make
        self.depth = max(1, depth)
        self._next = -1
        self._queue: queue.Queue[tuple[int, T | None, BaseException | None]] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def get(self, step: int) -> T:
        if self._queue is None or step != self._next:
            self._start(step)
        assert self._queue is not None
        got, item, error = self._queue.get()
        assert got == step
        if error is not None:
            self.close()
            raise error
        self._next = step + 1
        return item  # type: ignore[return-value]

    def _start(self, step: int) -> None:
        self.close()
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.depth)
        self._next = step
        self._thread = threading.Thread(
            target=self._produce,
            args=(step, self._queue, self._stop),
            name="batch-prefetch",
            daemon=True,
        )
        self._thread.start()

    def _produce(self, step: int, out: queue.Queue, stop: threading.Event) -> None:
        while not stop.is_set():
            entry: tuple[int, T | None, BaseException | None]
            try:
                entry = (step, self.make(step), None)
            except BaseException as e:  # handed to the consumer, which raises it
                entry = (step, None, e)
            while not stop.is_set():
                try:
                    out.put(entry, timeout=_POLL_S)
                    break
                except queue.Full:
                    continue
            if entry[2] is not None:
                return
            step += 1

    def close(self) -> None:
        """Stop the producer (it finishes the batch in hand) and drop what it made."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._thread, self._queue = None, None
