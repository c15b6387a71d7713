"""Finishing a complete sample set: its metadata, grid, optional merged .npz and MLflow run."""

from __future__ import annotations

from typing import Any

from admflow import storage
from admflow.config import AdmConfig
from tasks.sampling import files as sample_io
from tasks.sampling.spec import SampleSetSpec


def describe(spec: SampleSetSpec) -> dict[str, Any]:
    """The set's metadata.json fields that come from its spec."""
    clf = spec.classifier
    return {
        "kind": spec.kind,
        "sampler": spec.sampler,
        "steps": spec.respacing or str(spec.diffusion["steps"]),
        "eta": spec.eta,
        "classifier_scale": spec.classifier_scale,
        "guidance": spec.guidance,
        "cfg_scale": spec.cfg_scale,
        "checkpoint": spec.model.source,
        "weights": spec.model.weights,
        "checkpoint_step": spec.model.step,
        "weights_sha256": spec.model.sha256,
        "classifier": clf.source if clf else None,
        "classifier_weights": clf.weights if clf else None,
        "classifier_sha256": clf.sha256 if clf else None,
        "seed": spec.seed,
        "use_ema": spec.model.ema,
        "classes": list(spec.classes) if spec.classes else None,
        "code_version": spec.code_version,
    }


def finish(
    cfg: AdmConfig,
    spec: SampleSetSpec,
    out: str,
    stats: dict[str, Any],
    *,
    extra: dict[str, Any],
    merge: bool,
    parent_run_id: str | None,
) -> dict[str, Any]:
    """The caller's result; for a complete set also its metadata, grid, merge and run."""
    manifest = stats.pop("manifest")
    result: dict[str, Any] = {
        "uri": out,
        "num_samples": spec.num_samples,
        "complete": manifest["complete"],
        "shards": len(manifest["shards"]),
        "workers": len(stats.get("actors", [])),
        "fingerprint": manifest["fingerprint"],
        **{k: v for k, v in stats.items() if k != "actors"},
    }
    if not manifest["complete"]:
        return result
    sampled = min(stats["shards_sampled"] * spec.shard_size, spec.num_samples)
    secs = stats["sampling_seconds"]
    metadata = {
        **describe(spec),
        **extra,
        "N": spec.num_samples,
        "num_samples": spec.num_samples,
        "image_size": spec.image_size,
        "shard_size": spec.shard_size,
        "fingerprint": manifest["fingerprint"],
        "images_per_second_last_run": round(sampled / secs, 3) if secs else None,
    }
    storage.write_json(storage.join(out, "metadata.json"), metadata)
    result["grid"] = sample_io.write_grid(out, manifest)
    if merge:
        result["merged"] = sample_io.merge_set(out)
    if parent_run_id:
        stage = "upsample" if spec.kind == "upsample" else "sample"
        result["mlflow_run_id"] = log_mlflow(cfg, out, metadata, parent_run_id, stage)
    return result


def log_mlflow(cfg: AdmConfig, out: str, metadata: dict, parent_run_id: str, stage: str) -> str:
    """A child run of ``parent_run_id`` with the set's metadata as params and its grid."""
    import os
    import tempfile

    import mlflow

    from admflow.tracking import stage_run
    from tasks.reporting.lineage import set_run_name

    tags, name = {"admflow.samples": out}, set_run_name(stage, metadata)
    with stage_run(cfg, stage, parent_run_id, tags, sections=("sampling",), run_name=name):
        params = {f"set.{k}": str(v)[:500] for k, v in metadata.items() if v is not None}
        mlflow.log_params(params)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "grid.png")
            with open(path, "wb") as f:
                f.write(storage.read_bytes(storage.join(out, "grid.png")))
            mlflow.log_artifact(path)
        return mlflow.active_run().info.run_id
