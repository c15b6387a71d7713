"""Periodic evaluation: score every checkpoint of a training run exactly once and log FID
against the training step on that run, so the MLflow UI shows FID over training."""

from __future__ import annotations

from prefect import flow, get_run_logger, task

from admflow.config import load_config
from flows import stages
from flows.hooks import PARENT_RUN_HOOKS
from tasks.plan import plan_reproduce


@task(name="find-new-checkpoints", **stages.RETRY)  # type: ignore[arg-type]
def find_new_checkpoints(cfg, run_uri: str) -> list[dict]:
    from tasks.scoring.periodic import unevaluated_checkpoints

    return unevaluated_checkpoints(cfg, run_uri)


@task(name="evaluate-checkpoint", **stages.RETRY)  # type: ignore[arg-type]
def evaluate_checkpoint(cfg, ckpt: dict, reference_uri: str, num_samples: int) -> dict:
    from tasks.scoring.periodic import evaluate_checkpoint as run

    return run(cfg, ckpt, reference_uri, num_samples)


@flow(name="evaluate-periodic", log_prints=True, **PARENT_RUN_HOOKS)
def evaluate_periodic(
    preset: str = "tiny",
    overrides: list[str] | None = None,
    run_name: str | None = None,
    num_samples: int = 100,
) -> list[dict]:
    """Evaluate the checkpoints of ``run_name`` (default: every diffusion run under the
    storage root) that have not been evaluated yet, against the reproduce flow's reference."""
    from admflow import storage
    from tasks.scoring.periodic import training_runs

    cfg = load_config(preset, overrides or [])
    log = get_run_logger()
    runs = [storage.join(cfg.storage.root, "runs", run_name)] if run_name else training_runs(cfg)
    new = [ckpt for run_uri in runs for ckpt in find_new_checkpoints(cfg, run_uri)]
    if not new:  # the usual scheduled tick: no reference features to compute
        log.info("evaluated 0 new checkpoint(s)")
        return []
    # The reproduce flow's reference for the base model (same cache keys): real images at the
    # model's own resolution, also in a two-stage pipeline.
    keys = plan_reproduce(cfg).keys
    data = stages.shard(cfg, cache_key=keys["data"])
    ref = stages.reference(cfg, data, cache_key=keys["reference"])
    results = [evaluate_checkpoint(cfg, c, ref["uri"], num_samples) for c in new]
    log.info("evaluated %d new checkpoint(s)", len(results))
    return results
