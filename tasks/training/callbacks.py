"""Hooks the training loop calls at fixed points, so that tracking, progress reporting (and,
in tests, fault injection) stay out of the loop itself.

Each hook gets the running :class:`tasks.training.loop.Trainer` to read (its step, job, spec
and session), never to change: a callback must not alter what the loop computes. Each worker
builds the standard ones (:func:`tasks.training.sessions.standard_callbacks`: MLflow, progress);
the launcher may add more, which are pickled into the workers.
"""

from __future__ import annotations

from typing import Any

# The trainer is typed loosely: naming its class here would make the loop and its callbacks
# import each other.
Trainer = Any


class Callback:
    """No-op hooks; subclasses override what they need."""

    def on_step_start(self, trainer: Trainer) -> None:
        """Before step ``trainer.step`` draws its batch."""

    def on_log(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        """At a log step (and every checkpoint), before the metrics are reported to the session."""

    def on_checkpoint(self, step: int, uri: str) -> None:
        """The checkpoint of ``step`` is durable at ``uri`` (may run on an upload thread)."""

    def on_error(self, trainer: Trainer, message: str) -> None:
        """The run stops: a non-finite loss without loss scaling, or too many skipped steps."""
