"""Training on Ray Train: the diffusion model, the noisy classifier and the upsampler.

One ``TorchTrainer`` per job, placed as :mod:`tasks.resources` plans it: the workers, their
CPUs and GPUs, and the process group (NCCL where torch runs on the GPUs Ray gives, gloo where
it stays on the CPU); the global batch is split across them. Each checkpoint is written once, to
``<storage.root>/runs/<run_name>/checkpoints/step-NNNNNN``, and recorded by Ray Train (see
tasks.training.checkpoint: uploaded in the background on object storage, the newest
``training.keep_checkpoints`` kept plus the scored ones). Calling a job again with the
same run name continues from the newest checkpoint; a lost worker is survived by restarting
the group from the last checkpoint (``max_failures``). MLflow: the driver opens the stage
run; rank 0 logs metrics and checkpoint tags into it; the driver logs the final EMA model.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import torch

from admflow import storage
from admflow.config import AdmConfig, ConfigError
from admflow.tracking import stage_run
from tasks.reporting.lineage import train_run_name
from tasks.training import checkpoint as ckpt
from tasks.training.callbacks import Callback
from tasks.training.checkpoint import latest_checkpoint, list_checkpoints
from tasks.training.jobs import KINDS, make_job
from tasks.training.loop import LoopSpec, NonFiniteLossError
from tasks.training.sessions import train_loop_per_worker
from tasks.training.stream import data_root, load_manifest

__all__ = [
    "KINDS",
    "NonFiniteLossError",
    "latest_checkpoint",
    "list_checkpoints",
    "train",
    "train_classifier",
    "train_diffusion",
    "train_upsampler",
]

log = logging.getLogger(__name__)

# Where the object store is (no secrets): the workers need it to read shards and write
# checkpoints. Credentials never go through Ray (its runtime env is logged in plain text):
# workers of the local Ray that admflow starts inherit them from the driver's environment,
# the nodes of a cluster hold their own (environment or ~/.aws/credentials, see README).
_FORWARD_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "MLFLOW_S3_ENDPOINT_URL",
)


def train_diffusion(
    cfg: AdmConfig, data_uri: str, run_name: str, parent_run_id: str | None = None, **kw: Any
) -> dict[str, Any]:
    """Train the ADM diffusion UNet (L_hybrid, EMA); see :func:`train`."""
    return train("diffusion", cfg, data_uri, run_name, parent_run_id, **kw)


def train_classifier(
    cfg: AdmConfig, data_uri: str, run_name: str, parent_run_id: str | None = None, **kw: Any
) -> dict[str, Any]:
    """Train the noisy classifier p(y | x_t, t); see :func:`train`."""
    return train("classifier", cfg, data_uri, run_name, parent_run_id, **kw)


def train_upsampler(
    cfg: AdmConfig, data_uri: str, run_name: str, parent_run_id: str | None = None, **kw: Any
) -> dict[str, Any]:
    """Train the super-resolution model on area-downsampled inputs; see :func:`train`."""
    return train("upsampler", cfg, data_uri, run_name, parent_run_id, **kw)


def run_uri(cfg: AdmConfig, run_name: str) -> str:
    return storage.join(cfg.storage.root, "runs", run_name)


def check_data(kind: str, cfg: AdmConfig, manifest: dict) -> None:
    job = make_job(kind, cfg)
    if manifest["image_size"] != job.image_size:
        raise ConfigError(
            f"the shards hold {manifest['image_size']}px images but the {kind} model is "
            f"{job.image_size}px; re-shard with data.image_size={job.image_size} or pick a "
            "matching preset"
        )
    field, classes = job.classes_field, job.num_classes
    found = manifest.get("num_classes")
    if found and classes and found > classes:  # labels would index past the embedding
        raise ConfigError(
            f"the shards at {manifest.get('uri', 'the data set')} hold labels 0..{found - 1} but "
            f"{field} is {classes}; set {field}={found} or shard data with fewer classes"
        )


def train(
    kind: str,
    cfg: AdmConfig,
    data_uri: str,
    run_name: str,
    parent_run_id: str | None = None,
    *,
    max_failures: int = 3,
    callbacks: Sequence[Callback] = (),
    progress: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Run (or continue) one training job; returns checkpoint URIs, step, run id, metrics.

    ``callbacks`` join the standard ones (MLflow, progress) on every worker; they are pickled
    into the workers. ``progress`` takes the driver's progress lines (a flow's run logger).
    """
    make_job(kind, cfg)  # fail early on an impossible job
    data_uri = data_root(data_uri)
    manifest = load_manifest(data_uri)
    check_data(kind, cfg, manifest)
    uri = run_uri(cfg, run_name)
    tags = {"admflow.run_name": run_name, "admflow.run_uri": uri, "admflow.kind": kind}
    title = train_run_name(kind, cfg)
    with stage_run(cfg, f"train-{kind}", parent_run_id, tags=tags, run_name=title) as run:
        import mlflow

        log_dataset(manifest, data_uri)
        spec = LoopSpec(
            kind=kind,
            config=cfg.model_dump(mode="json"),
            data_uri=data_uri,
            run_uri=uri,
            run_name=run_name,
            tracking_uri=mlflow.get_tracking_uri(),
            mlflow_run_id=run.info.run_id,
        )
        result = fit(spec, cfg, max_failures, callbacks, progress)
        metrics = dict(result.metrics or {})
        if metrics.get("error"):
            raise NonFiniteLossError(metrics["error"])
        latest = latest_checkpoint(uri)
        if latest is None:
            raise RuntimeError(f"training {run_name} ended without a checkpoint under {uri}")
        step = ckpt.read_meta(latest)["step"]
        mlflow.set_tags({"checkpoint.final": latest, "admflow.final_step": str(step)})
        model_uri = log_final_model(kind, cfg, latest)
        return {
            "kind": kind,
            "run_name": run_name,
            "run_uri": uri,
            "checkpoint": latest,
            "checkpoints": [c["uri"] for c in list_checkpoints(uri)],
            "step": step,
            "mlflow_run_id": run.info.run_id,
            "model_uri": model_uri,
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        }


def fit(
    spec: LoopSpec,
    cfg: AdmConfig,
    max_failures: int = 3,
    callbacks: Sequence[Callback] = (),
    progress: Callable[[str], Any] = print,
):
    """One TorchTrainer.fit; resumes when ``<runs>/<run_name>`` already holds checkpoints."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from tasks.resources import Cluster, resource_plan
    from tasks.runtime.ray_session import ensure_ray

    stage = f"train-{spec.kind}"
    ray = ensure_ray(cfg, stage)
    placement = resource_plan(cfg, Cluster.from_ray(ray, cfg)).stage(stage)
    runs = storage.join(cfg.storage.root, "runs")
    storage.makedirs(runs)
    if storage.is_remote(runs):  # endpoint and credentials bound in (see storage)
        filesystem, storage_path = storage.pyarrow_filesystem(runs)
    else:
        filesystem, storage_path = None, storage.local_path(runs)
    env = {k: os.environ[k] for k in _FORWARD_ENV if os.environ.get(k)}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "spec": asdict(spec),
            "torch_threads": cfg.compute.threads_for(spec.kind),
            "callbacks": list(callbacks),
        },
        scaling_config=ScalingConfig(
            num_workers=placement.workers,
            use_gpu=placement.gpus > 0,
            resources_per_worker=placement.resources_per_worker(),
        ),
        torch_config=TorchConfig(backend=placement.backend),
        run_config=RunConfig(  # type: ignore[call-arg]  # train V2 RunConfig
            name=spec.run_name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=max_failures),
            # Ray records our checkpoint directories; retention is training.keep_checkpoints
            # (which spares the periodically scored ones), so Ray itself deletes nothing.
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            worker_runtime_env={"env_vars": env} if env else None,
            # Ray Train's INFO lines (each report's whole metrics dict, the worker group's
            # set-up) stay in its session logs: the progress lines below say what matters.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    from tasks.training.progress import ProgressPrinter

    steps = make_job(spec.kind, cfg).steps
    with ProgressPrinter(spec.run_uri, spec.kind, steps, printer=progress):
        return trainer.fit()


def log_dataset(manifest: dict, data_uri: str) -> None:
    """Record the shard manifest as the run's training input, and point the run at it."""
    import mlflow

    from tasks.reporting.lineage import UPSTREAM, log_shards_input

    log_shards_input(manifest, data_uri, "training")
    mlflow.set_tag(UPSTREAM + "data_manifest", storage.join(data_uri, "manifest.json"))
    mlflow.log_dict(manifest, "data/manifest.json")


def log_final_model(kind: str, cfg: AdmConfig, checkpoint_uri: str) -> str:
    """Log the final EMA weights: the state dict as an artifact and a pickled model
    (``mlflow.pytorch.load_model`` gives back the torch module; registrable by URI)."""
    import mlflow
    import mlflow.pytorch

    job = make_job(kind, cfg)
    state = ckpt.load_ema(checkpoint_uri)
    buf = io.BytesIO()
    torch.save(state, buf)
    name = f"ema_{job.ema_rates[0]}.pt" if job.ema_rates else "model.pt"
    _log_artifact_bytes(buf.getvalue(), f"checkpoint/{name}")
    model = job.build_model()
    model.load_state_dict(state)
    info = mlflow.pytorch.log_model(
        model.eval(),
        name=f"{kind}_ema",
        serialization_format="pickle",
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
    )
    return info.model_uri


def _log_artifact_bytes(data: bytes, artifact_path: str) -> None:
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, os.path.basename(artifact_path))
        with open(path, "wb") as f:
            f.write(data)
        mlflow.log_artifact(path, artifact_path=os.path.dirname(artifact_path) or None)
