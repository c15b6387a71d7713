"""Prefect tasks: thin, cached, retried wrappers around the stages in ``tasks/``.

Every task takes an explicit ``cache_key`` from :mod:`tasks.plan` (the config sections the
stage depends on plus the keys of its upstream stages, a hash chain; for a sample set its
spec's fingerprint), so a rerun with the same settings is all cache hits and a changed
setting reruns only what depends on it.
Each stage is also idempotent on its own (finished shards, checkpoints and sample shards
are skipped), so a lost cache record costs time, not correctness.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from prefect import get_run_logger, task

from admflow.config import AdmConfig
from admflow.storage import join
from flows.hooks import transient
from tasks.sampling.spec import SampleSetSpec

# Transient storage/network errors get retried with backoff.
RETRY = dict(
    retries=2, retry_delay_seconds=[5, 30], retry_jitter_factor=0.5, retry_condition_fn=transient
)


def _by_key(ctx: Any, params: dict[str, Any]) -> str:
    """The Prefect cache key of a stage: its chain key plus a nonce kept in the object store.

    Prefect keeps its cache records apart from the object store, so a store that was wiped
    (or a new store at the same root) would otherwise answer with results whose files are
    gone. The nonce lives in the store itself (``<root>/cache/<key>.json``): with the store,
    the cache hits; without it, a new nonce makes every stage run again."""
    import uuid

    from admflow import storage

    key = params["cache_key"]
    marker = join(params["cfg"].storage.root, "cache", f"{key}.json")
    if storage.exists(marker):
        nonce = storage.read_json(marker)["nonce"]
    else:
        nonce = uuid.uuid4().hex[:12]
        storage.write_json(marker, {"key": key, "nonce": nonce})
    return f"admflow-{key}-{nonce}"


class _QuietCompleted(logging.Filter):
    """Drops Prefect's "Finished in state Completed()" of each task run: the stage's own
    "done" line says it, with its time. Cached, failed and retried states still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Finished in state Completed(")


logging.getLogger("prefect.task_runs").addFilter(_QuietCompleted())


def _log() -> Any:
    """The flow run's logger; this module's outside a run (a stage's ``.fn`` called alone)."""
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def _stage_task(name: str, label: Callable[[dict[str, Any]], str] | None = None):
    """A stage as a Prefect task: cached by its key, retried on transient faults, its run
    named by ``label(parameters)`` (``train diffusion``, ``sample s=2``), and its start and
    end in the flow run's log (so in the Prefect UI and `prefect flow-run logs`)."""

    def run_name(parameters: dict[str, Any]) -> str:
        return label(parameters) if label else name

    def wrap(fn):
        @functools.wraps(fn)
        def logged(*args: Any, **kwargs: Any) -> Any:
            from prefect.runtime import task_run

            log, what = _log(), task_run.get_name() or name
            log.info("%s: started", what)
            t0 = time.monotonic()
            out = fn(*args, **kwargs)
            log.info("%s: done in %.1f s", what, time.monotonic() - t0)
            return out

        return task(
            name=name, task_run_name=run_name, cache_key_fn=_by_key, persist_result=True,
            **RETRY,  # type: ignore[arg-type]
        )(logged)  # fmt: skip

    return wrap


def _scale(s: float) -> str:
    return f"s={float(s or 0.0):g}"


@_stage_task("shard", lambda p: f"shard {p['cfg'].data.image_size}px")
def shard(cfg: AdmConfig, cache_key: str, parent_run_id: str | None = None) -> dict:
    from tasks.data.shard import shard_dataset
    from tasks.reporting.lineage import log_shard_run

    dest = join(cfg.storage.root, "data", cache_key)
    manifest = shard_dataset(cfg, cfg.data.source, dest)
    run_id = log_shard_run(cfg, manifest, dest, parent_run_id)
    return {
        "uri": dest,
        "manifest_uri": join(dest, "manifest.json"),
        "num_images": manifest["num_images"],
        "mlflow_run_id": run_id,
    }


@_stage_task("train", lambda p: f"train {p['kind']}")
def train(cfg: AdmConfig, kind: str, data: dict, cache_key: str, parent_run_id: str | None) -> dict:
    from tasks.training import launch as training

    fn = {
        "diffusion": training.train_diffusion,
        "classifier": training.train_classifier,
        "upsampler": training.train_upsampler,
    }[kind]
    from tasks.reporting.lineage import link_training

    log = _log()  # the progress lines, from the driver's polling thread
    out = fn(
        cfg, data["uri"], run_name=f"{kind}-{cache_key}", parent_run_id=parent_run_id,
        progress=log.info,
    )  # fmt: skip
    link_training(out, data)
    return {**out, "kind": kind, "cache_key": cache_key}


@_stage_task("reference", lambda p: f"reference {p['cfg'].data.image_size}px")
def reference(cfg: AdmConfig, data: dict, cache_key: str, workers: int | None = None) -> dict:
    from tasks.scoring.features import build_reference

    if cfg.evaluation.reference:  # e.g. the paper's reference batch, instead of our shards
        return {"uri": cfg.evaluation.reference}
    uri = build_reference(cfg, data["uri"], workers)
    return {"uri": uri, "shards": data}


@_stage_task("sample", lambda p: f"sample {_scale(p['spec'].classifier_scale)}")
def sample(cfg: AdmConfig, spec: SampleSetSpec, cache_key: str, parent_run_id: str | None) -> dict:
    """The base set ``spec`` (its key: the spec's fingerprint)."""
    from tasks.sampling.sample_set import sample_set
    from tasks.sampling.spec import ExecutionOptions

    out = join(cfg.storage.root, "samples", cache_key)
    result = sample_set(
        cfg, spec, out, ExecutionOptions.from_config(cfg), parent_run_id=parent_run_id
    )
    return {**result, "uri": out, "classifier_scale": spec.classifier_scale}


@_stage_task("upsample", lambda p: f"upsample {_scale(p['base']['classifier_scale'])}")
def upsample(
    cfg: AdmConfig, spec: SampleSetSpec, base: dict, cache_key: str, parent_run_id: str | None
) -> dict:
    """The upsampler's set ``spec``, conditioned on the base set ``base``."""
    from tasks.sampling.sample_set import upsample_set
    from tasks.sampling.spec import ExecutionOptions

    out = join(cfg.storage.root, "samples", cache_key)
    options = ExecutionOptions.from_config(cfg)
    result = upsample_set(cfg, spec, base["uri"], out, options, parent_run_id=parent_run_id)
    return {**result, "uri": out, "classifier_scale": base["classifier_scale"], "upsampled": True}


@_stage_task("bilinear", lambda p: f"bilinear {_scale(p['base']['classifier_scale'])}")
def bilinear(cfg: AdmConfig, base: dict, cache_key: str) -> dict:
    """The two-stage baseline: the base samples upscaled bilinearly to the upsampler's size."""
    from tasks.sampling.bilinear import bilinear_set

    out = join(cfg.storage.root, "samples", cache_key)
    result = bilinear_set(base["uri"], out, cfg.upsampler.unet.image_size)
    return {
        **result,
        "uri": out,
        "classifier_scale": base["classifier_scale"],
        "upsampled": True,
        "stage": "bilinear",
        "mlflow_run_id": base.get("mlflow_run_id"),  # lineage: the run that drew the base set
    }


@_stage_task("judge")
def judge(cfg: AdmConfig, data: dict, ref: dict, cache_key: str) -> dict:
    """The class-accuracy judge (trained on ``data``) and the FID floor of ``ref``."""
    from tasks.scoring.judge import build_judge

    return build_judge(cfg, data["uri"], ref["uri"], cfg.sampling.num_samples)


@_stage_task("floor")
def floor(cfg: AdmConfig, ref: dict, cache_key: str) -> dict:
    """The FID floor of ``ref`` at the sample count (a reference with no judge of its own)."""
    from tasks.scoring.judge import reference_floor

    return reference_floor(cfg, ref["uri"], cfg.sampling.num_samples)


@_stage_task("training-curve")
def training_curve(
    cfg: AdmConfig,
    diffusion_run: dict,
    ref: dict,
    judge: dict | None,
    cache_key: str,
    scored: dict[str, dict] | None = None,
) -> list[dict]:
    """Periodic evaluation of every checkpoint of the diffusion run (FID against step);
    ``scored``: checkpoint URI -> its unguided set's metrics, already drawn and scored."""
    from tasks.scoring.periodic import evaluate_checkpoints
    from tasks.training.checkpoint import list_checkpoints

    ckpts = list_checkpoints(diffusion_run["run_uri"])
    judge_uri = judge["uri"] if judge else None
    n = cfg.evaluation.checkpoint_samples
    return evaluate_checkpoints(cfg, ckpts, ref["uri"], n, judge=judge_uri, scored=scored)


@_stage_task("evaluate", lambda p: _evaluation_name(p))
def evaluate(
    cfg: AdmConfig,
    ref: dict,
    samples: dict,
    cache_key: str,
    parent_run_id: str | None,
    tags: dict,
    judge: dict | None = None,
) -> dict:
    from tasks.reporting.lineage import evaluation_run
    from tasks.scoring.evaluate import evaluate_sets

    run_name, params = evaluation_run(cfg, samples)
    metrics = evaluate_sets(
        cfg,
        ref["uri"],
        samples["uri"],
        parent_run_id=parent_run_id,
        tags=tags,
        judge=judge["uri"] if judge else None,
        run_name=run_name,
        params=params,
    )
    return {
        **metrics,
        "samples": samples["uri"],
        "classifier_scale": samples["classifier_scale"],
        "upsampled": samples.get("upsampled", False),
        "stage": samples.get("stage", "upsampler" if samples.get("upsampled") else "base"),
    }


def _evaluation_name(p: dict[str, Any]) -> str:
    from tasks.reporting.lineage import evaluation_run

    return evaluation_run(p["cfg"], p["samples"])[0]
