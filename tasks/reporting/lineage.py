"""Lineage in MLflow: one parent run per flow run, upstream links as tags on child runs,
and registration of the final EMA models."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from admflow.config import AdmConfig
from admflow.tracking import flat_params, setup_mlflow
from admflow.uris import mask_text
from tasks.reporting.report import discard_local_files

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


# ------------------------------------------------------------------ names
def train_run_name(kind: str, cfg: AdmConfig) -> str:
    """``train diffusion 16px``, ``train upsampler 16->32px``: what the run trains."""
    if kind == "upsampler":
        return f"train upsampler {cfg.upsampler.small_size}->{cfg.upsampler.unet.image_size}px"
    size = cfg.classifier.image_size if kind == "classifier" else cfg.model.image_size
    return f"train {kind} {size}px"


def set_run_name(stage: str, metadata: dict) -> str:
    """``sample s=2 ddpm-50 16px``: the stage, the guidance scale, sampler and steps, size."""
    scale = float(metadata.get("classifier_scale") or 0.0)
    sampler = f"{metadata.get('sampler')}-{metadata.get('steps')}"
    return f"{stage} s={scale:g} {sampler} {metadata.get('image_size')}px"


def set_stage(sset: dict) -> str:
    """A set's stage as the report names it: base, upsampler or bilinear."""
    return sset.get("stage") or ("upsampler" if sset.get("upsampled") else "base")


def evaluation_run(cfg: AdmConfig, sset: dict) -> tuple[str, dict[str, str]]:
    """An evaluation's run name (``evaluate upsampler s=2 32px``) and the params that say
    what it scored."""
    stage = set_stage(sset)
    size = cfg.model.image_size if stage == "base" else cfg.upsampler.unet.image_size
    scale = float(sset.get("classifier_scale") or 0.0)
    params = {"set.stage": stage, "set.classifier_scale": str(scale), "set.image_size": str(size)}
    return f"evaluate {stage} s={scale:g} {size}px", params


# ------------------------------------------------------------------ descriptions
NOTE = "mlflow.note.content"  # the run's description in the MLflow UI, rendered as markdown


def note(title: str, items: list[tuple[str, str | None, str | None]]) -> str:
    """Markdown: ``title``, then one line per upstream item, its run a link the UI follows
    (``#/experiments/E/runs/R``, relative to the UI's own address) and its URI as code."""
    import mlflow

    client = None  # made only for a run to look up: a client opens (or creates) its store
    lines = [title, ""]
    for label, run_id, uri in items:
        parts = [f"- {label}:"]
        if run_id:
            client = client or mlflow.MlflowClient()
            info = client.get_run(run_id).info
            name = info.run_name or run_id[:8]
            parts.append(f"[{name}](#/experiments/{info.experiment_id}/runs/{run_id})")
        if uri:
            parts.append(f"`{mask_text(uri)}`")
        lines.append(" ".join(parts))
    return "\n".join(lines)


def describe(run_id: str | None, title: str, items: list[tuple[str, str | None, str | None]]):
    """Set ``run_id``'s description to ``title`` and its upstream links."""
    if run_id:
        import mlflow

        mlflow.MlflowClient().set_tag(run_id, NOTE, note(title, items))


def link_training(run: dict, data: dict) -> None:
    """A training run and the shards it trained on (its own: the upsampler's are the
    larger ones)."""
    run_id = run.get("mlflow_run_id")
    link(run_id, data_manifest=data["manifest_uri"], shard_run_id=data.get("mlflow_run_id"))
    items = [("shards", data.get("mlflow_run_id"), data["manifest_uri"])]
    describe(
        run_id, f"Trained on the shards below; final checkpoint `{run.get('checkpoint')}`.", items
    )


def _upstream(
    sset: dict, runs: dict[str, dict], train_data: dict[str, dict], base: dict | None
) -> dict[str, Any]:
    """What a set was made from: the training runs and checkpoints, the base set of an
    upsampled (or upscaled) one, and the shards behind each training."""
    stage = set_stage(sset)
    used = ["diffusion"]
    if float(sset.get("classifier_scale") or 0.0) > 0 and "classifier" in runs:
        used.append("classifier")
    if stage == "upsampler" and "upsampler" in runs:
        used.append("upsampler")
    out: dict[str, Any] = {"stage": stage, "kinds": used, "tags": {}}
    tags = out["tags"]
    for kind in used:
        prefix = "" if kind == "diffusion" else f"{kind}_"
        tags[f"{prefix}checkpoint"] = runs[kind].get("checkpoint")
        tags[f"{prefix}train_run_id"] = runs[kind].get("mlflow_run_id")
        tags[f"{prefix}data_manifest"] = train_data[kind]["manifest_uri"]
    if base is not None and stage != "base":
        tags["base_samples"] = base["uri"]
        tags["base_sample_run_id"] = base.get("mlflow_run_id")
    return out


def _items(up: dict, runs: dict, train_data: dict, base: dict | None) -> list:
    items: list[tuple[str, str | None, str | None]] = []
    if up["tags"].get("base_samples") and base is not None:
        items.append(("base samples", base.get("mlflow_run_id"), base["uri"]))
    for kind in up["kinds"]:
        run = runs[kind]
        items.append((f"{kind} checkpoint", run.get("mlflow_run_id"), run.get("checkpoint")))
    seen = set()
    for kind in up["kinds"]:
        data = train_data[kind]
        if data["manifest_uri"] not in seen:
            seen.add(data["manifest_uri"])
            items.append(("shards", data.get("mlflow_run_id"), data["manifest_uri"]))
    return items


def sample_tags(
    sset: dict,
    runs: dict[str, dict],
    train_data: dict[str, dict],
    base: dict | None = None,
    reference_data: dict | None = None,
) -> dict[str, str]:
    """Tags (with a description linking every upstream run) for the evaluation of ``sset``;
    the run that drew the set gets its own upstream links. ``base``: the base set of an
    upsampled or upscaled set; ``reference_data``: the shards its reference was built from."""
    up = _upstream(sset, runs, train_data, base)
    items = _items(up, runs, train_data, base)
    own_run = sset.get("mlflow_run_id") if up["stage"] != "bilinear" else None
    if own_run:  # a bilinear upscale has no run of its own: its base set's run drew it
        link(own_run, **up["tags"])
        describe(own_run, f"Samples `{mask_text(sset['uri'])}`, drawn from:", items)
    tags = {
        UPSTREAM + "samples": sset["uri"],
        UPSTREAM + "sample_run_id": sset.get("mlflow_run_id") or "",
        **{UPSTREAM + k: v or "" for k, v in up["tags"].items()},
    }
    head = [("samples", sset.get("mlflow_run_id"), sset["uri"])]
    if reference_data is not None:
        tags[UPSTREAM + "reference_data_manifest"] = reference_data["manifest_uri"]
        tags[UPSTREAM + "reference_shard_run_id"] = reference_data.get("mlflow_run_id") or ""
        ref = ("reference built from", reference_data.get("mlflow_run_id"),
               reference_data["manifest_uri"])  # fmt: skip
        items = [*items, ref]
    tags[NOTE] = note(f"Scores of the {up['stage']} samples below against the reference.",
                       head + items)  # fmt: skip
    return {k: mask_text(v) for k, v in tags.items() if v}


def register_models(
    cfg: AdmConfig,
    runs: dict[str, dict],
    train_data: dict[str, dict] | None = None,
    overrides: list | None = None,
) -> dict[str, str]:
    """Register each final EMA model in the MLflow model registry, each version tagged with
    its data, checkpoint, training run and the overrides; returns name -> version."""
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
        data = (train_data or {}).get(kind) or {}
        tags = {
            "admflow.preset": cfg.name,
            "admflow.overrides": " ".join(overrides or []) or "-",
            "admflow.checkpoint": run.get("checkpoint") or "",
            "admflow.train_run_id": run_id or "",
            "admflow.data_manifest": data.get("manifest_uri") or "",
        }
        tags = {k: mask_text(v) for k, v in tags.items() if v}
        version = mlflow.register_model(uri, name, tags=tags).version
        client.update_model_version(name, version, description=_model_note(tags))
        out[name] = str(version)
    return out


def _model_note(tags: dict[str, str]) -> str:
    return "\n".join(f"- {k.removeprefix('admflow.')}: `{v}`" for k, v in tags.items())


def finish_parent_run(run_id: str, summary: dict) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    local = summary.get("local_files", [])
    try:
        for path in local:
            client.log_artifact(run_id, path)
    finally:  # the report's temp dir: its files are in the store and now in MLflow
        discard_local_files(summary)
    describe_stages(
        run_id, [r["mlflow_run_id"] for r in summary.get("rows", []) if r.get("mlflow_run_id")]
    )
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


def describe_stages(parent_run_id: str, scored: Sequence[str] = ()) -> None:
    """The parent run's description: a link to each stage run under it, in the order they
    ran, evaluations with their FID; ``scored``: the evaluation runs of the report's rows,
    listed too when an earlier flow run made them (cached stages make no new run)."""
    import mlflow

    client = mlflow.MlflowClient()
    eid = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs(
        [eid],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=1000,
    )
    mine = {r.info.run_id for r in runs}
    runs += [client.get_run(rid) for rid in dict.fromkeys(scored) if rid not in mine]
    lines = ["Stage runs of this flow run (earlier runs' where its stages were cached):", ""]
    for run in runs:
        fid = run.data.metrics.get("fid")
        score = f" (FID {fid:.2f})" if fid is not None else ""
        url = f"#/experiments/{eid}/runs/{run.info.run_id}"
        lines.append(f"- [{run.info.run_name}]({url}){score}")
    client.set_tag(parent_run_id, NOTE, "\n".join(lines))


def log_shard_run(cfg: AdmConfig, manifest: dict, data_uri: str, parent_run_id: str | None) -> str:
    """A child run for the sharding stage (``shard 16px``): the data set as the run's input."""
    import mlflow

    from admflow.tracking import stage_run

    name = f"shard {manifest['image_size']}px"
    with stage_run(cfg, "shard", parent_run_id, sections=("data",), run_name=name) as run:
        log_shards_input(manifest, data_uri, "sharding")
        manifest_uri = f"{data_uri.rstrip('/')}/manifest.json"
        mlflow.set_tag(UPSTREAM + "data_manifest", manifest_uri)
        mlflow.set_tag(
            NOTE, f"Shards `{mask_text(manifest_uri)}` of `{mask_text(_source(manifest))}`."
        )
        mlflow.log_metrics(
            {"num_images": manifest["num_images"], "skipped": len(manifest.get("skipped", []))}
        )
        mlflow.log_dict(manifest, "manifest.json")
        return run.info.run_id


def _source(manifest: dict) -> str:
    return str((manifest.get("source") or {}).get("uri") or "?")


def shards_dataset(manifest: dict, data_uri: str):
    """The shard set as an MLflow dataset: one name and digest (its shards' hashes) wherever
    it is logged, so the shard run and every training on it show the same data set."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    from admflow.storage import sha256_bytes

    digest = sha256_bytes("".join(s["sha256"] for s in manifest.get("shards", [])).encode())[:16]
    name = f"shards-{manifest.get('image_size')}px-{manifest.get('num_images')}-{digest[:8]}"
    with warnings.catch_warnings():  # "local path can be read two ways": both are the same
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(data_uri)
    return MetaDataset(source, name=name, digest=digest)  # type: ignore[abstract]


def log_shards_input(manifest: dict, data_uri: str, context: str) -> None:
    """Log the shard set as the active run's input (``context``: sharding, training)."""
    import mlflow

    dataset = shards_dataset(manifest, data_uri)
    tags = {"num_images": str(manifest.get("num_images"))}
    try:
        mlflow.log_input(dataset, context=context, tags=tags)
    except mlflow.exceptions.MlflowException as e:
        # Parallel runs register the same data set at once on a sqlite store: the loser of
        # that race finds the row there on a second try.
        if "UNIQUE constraint" not in str(e):
            raise
        mlflow.log_input(dataset, context=context, tags=tags)


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
