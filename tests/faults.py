"""Fault injection for the recovery tests: a training-loop callback that makes one worker
raise once, at the start of a given step."""

from __future__ import annotations

from admflow import storage
from tasks.training.callbacks import Callback


class FailOnce(Callback):
    """Rank 1 (rank 0 alone) raises at the start of ``step``, once per run: a marker file in
    the run directory stops the restarted group from failing again."""

    def __init__(self, step: int):
        self.step = step

    def on_step_start(self, trainer) -> None:
        session = trainer.session
        if trainer.step != self.step or session.rank != min(1, session.world_size - 1):
            return
        marker = storage.join(trainer.spec.run_uri, f"_fault-injected-{self.step}")
        if storage.exists(marker):
            return
        storage.write_bytes(marker, b"")
        raise RuntimeError(f"injected fault at step {self.step} (tests.faults.FailOnce)")
