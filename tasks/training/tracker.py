"""MLflow logging from the training loop: rank 0 writes metrics and checkpoint tags into the
stage run that the driver opened (:func:`tasks.training.launch.train`)."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from tasks.training import checkpoint as ckpt
from tasks.training.callbacks import Callback, Trainer

log = logging.getLogger(__name__)


class MLflowCallback(Callback):
    """MLflow logging from rank 0 into the stage run, by run id, tolerant of a
    tracking-server hiccup: the checkpoint, not the tracker, is the source of truth."""

    def __init__(self, tracking_uri: str | None, run_id: str):
        import mlflow

        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        self.run_id = run_id

    def _safe(self, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as e:  # keep training
            log.warning("MLflow logging failed: %s", e)

    def on_log(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), now, trainer.step)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ]
        self._safe(lambda: self.client.log_batch(self.run_id, metrics=batch))

    def on_checkpoint(self, step: int, uri: str) -> None:
        self._safe(self.client.set_tag, self.run_id, f"checkpoint.{ckpt.step_dirname(step)}", uri)
        self._safe(self.client.set_tag, self.run_id, "checkpoint.latest", uri)

    def on_error(self, trainer: Trainer, message: str) -> None:
        self._safe(self.client.set_tag, self.run_id, "admflow.error", message[:5000])
