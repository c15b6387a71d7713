"""Training progress on the driver's terminal.

Ray Train runs the loop in worker processes whose output does not reach the driver (and on a
cluster, not even its machine). Rank 0 therefore writes a small ``progress.json`` next to its
checkpoints at every log step (:func:`write_progress`), and the driver polls it
(:class:`ProgressPrinter`) and prints one line whenever it moved, or a heartbeat while nothing
moved (start-up, checkpointing), so a long training never leaves the terminal silent.
:class:`ProgressCallback` is the loop's side: it writes that record at every log step.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from admflow import storage
from tasks.training.callbacks import Callback, Trainer

POLL_S = 5.0
HEARTBEAT_S = 45.0


def progress_uri(run_uri: str) -> str:
    return storage.join(run_uri, "progress.json")


def write_progress(run_uri: str, record: dict[str, Any]) -> None:
    try:
        storage.write_json(progress_uri(run_uri), record)
    except Exception:  # progress is cosmetic; never let it stop training
        pass


class ProgressCallback(Callback):
    """Leaves the progress record of a run for the driver's terminal (rank 0)."""

    def __init__(self, run_uri: str):
        self.run_uri = run_uri

    def on_log(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        job = trainer.job
        rate = metrics.get("images_per_s") or 0.0
        left = (job.steps - trainer.step) * trainer.global_batch / rate if rate else None
        record = {
            "kind": job.kind,
            "step": trainer.step,
            "steps": job.steps,
            "loss": metrics.get("loss"),
            "images_per_s": rate,
            "eta_s": left,
            "time": time.time(),
        }
        write_progress(self.run_uri, record)


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def format_progress(p: dict[str, Any]) -> str:
    parts = [f"[train {p.get('kind', '?')}] step {p.get('step')}/{p.get('steps')}"]
    if p.get("loss") is not None:
        parts.append(f"loss {p['loss']:.4f}")
    if p.get("images_per_s"):
        parts.append(f"{p['images_per_s']:.1f} img/s")
    if p.get("eta_s") is not None:
        parts.append(f"~{_duration(p['eta_s'])} left")
    return "  ".join(parts)


class ProgressPrinter:
    """Prints the progress of one training run from a background thread while it lives."""

    def __init__(self, run_uri: str, kind: str, steps: int, printer: Any = print):
        self.uri = progress_uri(run_uri)
        self.kind, self.steps, self.print = kind, steps, printer
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"progress-{kind}")

    def __enter__(self) -> ProgressPrinter:
        self.print(f"[train {self.kind}] starting Ray Train workers ({self.steps} steps)")
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=POLL_S + 1)

    def _read(self) -> dict[str, Any] | None:
        try:
            return storage.read_json(self.uri) if storage.exists(self.uri) else None
        except Exception:  # a half-visible write on some stores: try again next poll
            return None

    def _run(self) -> None:
        last_step, last_print = None, time.monotonic()
        while not self._stop.wait(POLL_S):
            p = self._read()
            now = time.monotonic()
            if p and p.get("step") != last_step:
                last_step, last_print = p.get("step"), now
                self.print(format_progress(p))
            elif now - last_print > HEARTBEAT_S:
                last_print = now
                where = f"at step {last_step}" if last_step is not None else "starting up"
                self.print(f"[train {self.kind}] still running ({where})")
