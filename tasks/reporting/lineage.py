"""Lineage in MLflow: one parent run per flow run, upstream links as tags on child runs,
and registration of the final EMA models."""

from __future__ import annotations

import warnings
from typing import Any

from admflow.config import AdmConfig
from admflow.tracking import flat_params, setup_mlflow
from admflow.uris import mask_text

UPSTREAM = "admflow.upstream."


def start_parent_run(
    cfg: AdmConfig, flow_name: str, flow_run_id: str | None, preset: str, overrides: list | None
) -> str:
    import mlflow

    experiment_id = setup_mlflow(cfg)
    client = mlflow.MlflowClient()
    run = client.create_run(
        experiment_id,
        run_name=f"{flow_name}-{preset}",
        tags={
            "admflow.flow": flow_name,
            "admflow.preset": preset,
            "admflow.overrides": mask_text(" ".join(overrides or [])) or "-",
            "prefect.flow_run_id": str(flow_run_id),
        },
    )
    params = flat_params(cfg)
    items = list(params.items())
    for i in range(0, len(items), 100):
        for k, v in items[i : i + 100]:
            client.log_param(run.info.run_id, k, v)
    return run.info.run_id


def link(run_id: str | None, **upstream: Any) -> None:
    """Tag ``run_id`` with the URIs / run ids it was made from."""
    if not run_id:
        return
    import mlflow

    client = mlflow.MlflowClient()
    for key, value in upstream.items():
        if value is not None:
            client.set_tag(run_id, UPSTREAM + key, mask_text(str(value)))


def sample_tags(sset: dict, runs: dict[str, dict], data: dict) -> dict[str, str]:
    """Tags for an evaluation run: the sample set it scored and everything behind it."""
    diffusion = runs["diffusion"]
    tags = {
        UPSTREAM + "samples": sset["uri"],
        UPSTREAM + "sample_run_id": sset.get("mlflow_run_id") or "",
        UPSTREAM + "checkpoint": diffusion.get("checkpoint", ""),
        UPSTREAM + "train_run_id": diffusion.get("mlflow_run_id") or "",
        UPSTREAM + "data_manifest": data["manifest_uri"],
    }
    # The sample run itself points at its checkpoint and training run.
    link(
        sset.get("mlflow_run_id"),
        checkpoint=diffusion.get("checkpoint"),
        train_run_id=diffusion.get("mlflow_run_id"),
        data_manifest=data["manifest_uri"],
    )
    for _kind, run in runs.items():
        link(run.get("mlflow_run_id"), data_manifest=data["manifest_uri"])
    return {k: mask_text(v) for k, v in tags.items() if v}


def register_models(cfg: AdmConfig, runs: dict[str, dict]) -> dict[str, str]:
    """Register each final EMA model in the MLflow model registry; returns name -> version."""
    if not cfg.tracking.register_models:
        return {}
    import mlflow

    setup_mlflow(cfg)
    client = mlflow.MlflowClient()
    out = {}
    for kind, run in runs.items():
        uri, run_id = run.get("model_uri"), run.get("mlflow_run_id")
        if not uri:
            continue
        name = f"admflow-{cfg.name}-{kind}"
        known = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        if known:  # a cached stage: its model is registered already
            out[name] = str(known[0].version)
            continue
        out[name] = str(mlflow.register_model(uri, name).version)
    return out


def finish_parent_run(run_id: str, summary: dict) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    for path in summary.get("local_files", []):
        client.log_artifact(run_id, path)
    for row in summary.get("rows", []):
        label = row.get("label", "set")
        for metric in ("fid", "sfid", "inception_score", "precision", "recall", "class_accuracy"):
            if row.get(metric) is not None:
                client.log_metric(run_id, f"{label}/{metric}", float(row[metric]))
    for name, y in (summary.get("yardsticks") or {}).items():
        for metric in ("judge_heldout_accuracy", "judge_softened_real_accuracy", "fid_floor"):
            if y and y.get(metric) is not None:
                client.log_metric(run_id, f"{name}/{metric}", float(y[metric]))
    for point in summary.get("curve") or []:
        if point.get("fid") is not None:
            client.log_metric(run_id, "training/fid", float(point["fid"]), step=int(point["step"]))
    client.set_terminated(run_id)


def log_shard_run(cfg: AdmConfig, manifest: dict, data_uri: str, parent_run_id: str | None) -> str:
    """A child run for the sharding stage: the data set as the run's input."""
    import mlflow

    from admflow.tracking import stage_run

    with stage_run(cfg, "shard", parent_run_id, sections=("data",)) as run:
        mlflow.log_input(_manifest_dataset(manifest, data_uri), context="sharding")
        mlflow.set_tag(UPSTREAM + "data_manifest", f"{data_uri.rstrip('/')}/manifest.json")
        mlflow.log_metrics(
            {"num_images": manifest["num_images"], "skipped": len(manifest.get("skipped", []))}
        )
        mlflow.log_dict(manifest, "manifest.json")
        return run.info.run_id


def _manifest_dataset(manifest: dict, data_uri: str):
    import mlflow.data
    import pandas as pd

    rows = pd.DataFrame(
        [{"shard": s["name"], "rows": s["rows"], "sha256": s["sha256"]} for s in manifest["shards"]]
    )
    fingerprint = (manifest.get("source") or {}).get("fingerprint", "")
    with warnings.catch_warnings():
        # "a local path can be read two ways" (both the same) and "integer columns cannot
        # hold missing values" (these never miss one): noise in the user's terminal
        warnings.simplefilter("ignore", UserWarning)
        return mlflow.data.from_pandas(  # type: ignore[attr-defined]
            rows, source=data_uri, name=f"shards-{manifest['image_size']}px-{fingerprint[:8]}"
        )


def close_parent_runs(cfg: AdmConfig, flow_run_id: str, status: str) -> list[str]:
    """End the still-RUNNING parent runs of a Prefect flow run with ``status`` (FAILED,
    KILLED), and every stage run under them that is still RUNNING too, so that a flow that
    died (or was interrupted while a training ran in another thread) leaves nothing RUNNING
    in MLflow; returns the ids of the parents."""
    import mlflow

    experiment_id = setup_mlflow(cfg)
    client = mlflow.MlflowClient()
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}' and "
        "attributes.status = 'RUNNING'",
    )
    parents = [r.info.run_id for r in runs if "admflow.flow" in r.data.tags]
    pending, seen = list(parents), set(parents)
    while pending:  # the stage runs below, depth first (a sample run's evaluation, ...)
        run_id = pending.pop()
        children = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{run_id}' and "
            "attributes.status = 'RUNNING'",
        )
        for child in children:
            if child.info.run_id not in seen:
                seen.add(child.info.run_id)
                pending.append(child.info.run_id)
        client.set_terminated(run_id, status)
    return parents
