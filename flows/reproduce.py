"""One-trigger reproduction: shard -> train (diffusion, classifier, upsampler) -> sample at
each guidance scale -> upsample -> evaluate -> report, with lineage in MLflow."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from admflow.config import AdmConfig, load_config
from flows import stages
from flows.hooks import PARENT_RUN_HOOKS
from flows.stages import chain_key

DIFFUSION_SECTIONS = ("data", "model", "diffusion", "training")
CLASSIFIER_SECTIONS = ("data", "classifier", "diffusion", "training")
UPSAMPLER_SECTIONS = ("data", "upsampler", "training")


def _sampling_key(cfg: AdmConfig) -> dict:
    # The scale list is not part of one set's identity: each scale is its own set.
    return cfg.sampling.model_dump(mode="json", exclude={"classifier_scales", "workers"})


@flow(name="reproduce", log_prints=True, **PARENT_RUN_HOOKS)
def reproduce(preset: str = "tiny", overrides: list[str] | None = None) -> dict[str, Any]:
    """Run the paper's pipeline for one preset; returns the metrics rows and report paths."""
    from tasks import lineage, report

    cfg = load_config(preset, overrides or [])
    cfg.check_pipeline()
    log = get_run_logger()
    parent = lineage.start_parent_run(cfg, "reproduce", flow_run.get_id(), preset, overrides)

    data_key = chain_key("shard", cfg, ("data",))
    data = stages.shard(cfg, cache_key=data_key, parent_run_id=parent)

    train_keys = {
        "diffusion": chain_key("train", cfg, DIFFUSION_SECTIONS, data_key),
        "classifier": chain_key("train", cfg, CLASSIFIER_SECTIONS, data_key),
        "upsampler": chain_key("train", cfg, UPSAMPLER_SECTIONS, data_key),
    }
    wanted = ["diffusion"]
    wanted += ["classifier"] if cfg.classifier.enabled else []
    wanted += ["upsampler"] if cfg.upsampler.enabled else []
    futures = {
        kind: stages.train.submit(cfg, kind, data, cache_key=train_keys[kind], parent_run_id=parent)
        for kind in wanted
    }
    ref_key = chain_key("reference", cfg, ("evaluation",), data_key)
    ref = stages.reference(cfg, data, cache_key=ref_key)
    runs = {kind: f.result() for kind, f in futures.items()}

    rows = []
    for scale in cfg.sampling.classifier_scales:
        guided = cfg.sampling.guided(scale, "classifier" in runs)
        clf_key = train_keys["classifier"] if guided else ""
        s_key = chain_key(
            "sample",
            cfg,
            (),
            train_keys["diffusion"],
            clf_key,
            sampling=_sampling_key(cfg),
            scale=scale,
        )
        base = stages.sample(cfg, runs["diffusion"], runs.get("classifier"), scale, s_key, parent)
        sets = [(s_key, base)]
        if "upsampler" in runs:
            u_key = chain_key("upsample", cfg, ("sampling",), s_key, train_keys["upsampler"])
            sets.append((u_key, stages.upsample(cfg, base, runs["upsampler"], u_key, parent)))
        for set_key, sset in sets:
            e_key = chain_key("evaluate", cfg, ("evaluation",), ref_key, set_key)
            tags = lineage.sample_tags(sset, runs, data)
            rows.append(stages.evaluate(cfg, ref, sset, e_key, parent, tags))

    summary = report.write_report(cfg, rows, parent_run_id=parent)
    lineage.register_models(cfg, runs)
    lineage.finish_parent_run(parent, summary)
    log.info("metrics:\n%s", summary["table"])
    return {"rows": rows, **summary, "mlflow_parent_run_id": parent, "mlflow_ui": ui_hint(cfg)}


def ui_hint(cfg: AdmConfig) -> str:
    """How to open the MLflow UI on these results."""
    from admflow.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(cfg)
    if uri.startswith("http"):
        return uri
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
