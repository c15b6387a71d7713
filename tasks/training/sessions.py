"""Where the training loop runs: one local process, or a Ray Train worker (and the callbacks
each worker runs it with).

A session gives the loop its rank, world size and device, wraps the network for data
parallelism, hands over the checkpoint Ray restored (if any) and takes each step's report,
writing the checkpoint once (see :meth:`RaySession.report`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import torch

from admflow import storage
from tasks.training import checkpoint as ckpt
from tasks.training.callbacks import Callback
from tasks.training.distributed import training_device
from tasks.training.loop import LoopSpec, Trainer
from tasks.training.progress import ProgressCallback
from tasks.training.tracker import MLflowCallback


class LocalSession:
    """One process, no Ray: for unit tests and the benchmark."""

    rank = 0
    world_size = 1

    def __init__(self, device: str = "cpu"):
        self.device = torch.device(device)
        self.reports: list[dict[str, Any]] = []

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    @contextlib.contextmanager
    def restored(self) -> Iterator[str | None]:
        yield None

    def report(self, metrics: dict[str, Any], pending: ckpt.Pending | None, step: int) -> None:
        if pending is not None:  # written once, in place
            pending.write(pending.uri)
            pending.durable()
        self.reports.append(dict(metrics))


class RaySession:
    def __init__(self, device: str = "auto") -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = training_device(device)  # compute.device, decided in one place

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=self.device)

    @contextlib.contextmanager
    def restored(self) -> Iterator[str | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as d:
            yield d

    def report(self, metrics: dict[str, Any], pending: ckpt.Pending | None, step: int) -> None:
        """Report; with a checkpoint, write it once: in place when the run directory is a
        local (or shared) path, Ray only recording it; else to local disk, from where Ray
        uploads it in the background (meta.json last) and then deletes the local copy."""
        import ray.train
        from ray.train import Checkpoint, CheckpointUploadMode

        if pending is None:
            ray.train.report(metrics)
            return
        run = ray.train.get_context().get_storage()  # Ray's run directory is our run_uri
        name = f"checkpoints/{ckpt.step_dirname(step)}"

        def recorded() -> Checkpoint:
            return Checkpoint(f"{run.experiment_fs_path}/{name}", run.storage_filesystem)

        if not storage.is_remote(pending.uri):
            pending.write(pending.uri)
            pending.durable()
            ray.train.report(
                metrics,
                checkpoint=recorded(),
                checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD,
            )
            return

        def upload(local: Checkpoint, _name: str) -> Checkpoint:
            ckpt.copy_checkpoint(local.path, pending.uri)
            pending.durable()
            return recorded()

        local = tempfile.mkdtemp(prefix="admflow-ckpt-")
        pending.write(local)
        ray.train.report(
            metrics,
            checkpoint=Checkpoint.from_directory(local),
            checkpoint_dir_name=name,
            checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
            checkpoint_upload_fn=upload,
        )


def standard_callbacks(spec: LoopSpec, rank: int) -> list[Callback]:
    """Rank 0 logs to the MLflow run named by ``spec`` and leaves progress records."""
    if rank != 0:
        return []
    found: list[Callback] = []
    if spec.mlflow_run_id:
        found.append(MLflowCallback(spec.tracking_uri, spec.mlflow_run_id))
    found.append(ProgressCallback(spec.run_uri))
    return found


def _quiet_ray_train_info() -> None:
    """Ray Train's INFO lines on a worker (the worker group's set-up, and each report with its
    whole metrics dict) stay out of the driver's output: its RunConfig log level reaches only
    the controller, and the report line's logger is named by its file's path, outside
    ``ray.train``. The driver's progress lines say the same in one line
    (tasks.training.progress)."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    tail = os.path.join("ray", "train", "v2", "_internal", "execution", "context.py")
    for name in list(logging.root.manager.loggerDict):
        if name.endswith(tail):
            logging.getLogger(name).setLevel(logging.WARNING)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: ``config = {"spec": asdict(LoopSpec), "torch_threads": n,
    "callbacks": [...]}``; the extra callbacks join the standard ones on every worker."""
    torch.set_num_threads(int(config.get("torch_threads", 1)))
    os.environ.setdefault("OMP_NUM_THREADS", str(config.get("torch_threads", 1)))
    _quiet_ray_train_info()
    spec = LoopSpec(**config["spec"])
    session = RaySession(spec.config["compute"]["device"])
    callbacks = [*standard_callbacks(spec, session.rank), *config.get("callbacks", ())]
    Trainer(spec, session, callbacks).run()
