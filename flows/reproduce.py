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
    return cfg.sampling.model_dump(
        mode="json", exclude={"classifier_scales", "upsample_sets", "workers"}
    )


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
    # Two stages (ADM-G + ADM-U): the upsampler trains on the data at its own resolution, and
    # every set is scored there, the base samples upscaled bilinearly (the baseline ADM-U must
    # beat) beside the upsampler's output.
    two_stage = cfg.two_stage
    eval_cfg = cfg.evaluation_data()
    eval_key = chain_key("shard", eval_cfg, ("data",))
    eval_data = stages.shard(eval_cfg, cache_key=eval_key, parent_run_id=parent)

    train_keys = {
        "diffusion": chain_key("train", cfg, DIFFUSION_SECTIONS, data_key),
        "classifier": chain_key("train", cfg, CLASSIFIER_SECTIONS, data_key),
        "upsampler": chain_key("train", cfg, UPSAMPLER_SECTIONS, eval_key),
    }
    wanted = ["diffusion"]
    wanted += ["classifier"] if cfg.classifier.enabled else []
    wanted += ["upsampler"] if cfg.upsampler.enabled else []
    train_data = {"diffusion": data, "classifier": data, "upsampler": eval_data}

    def submit(kind: str) -> Any:
        return stages.train.submit(
            cfg, kind, train_data[kind], cache_key=train_keys[kind], parent_run_id=parent
        )

    # The diffusion model is the long pole: it is asked for first, and the reference features
    # (half the evaluation workers) and the shorter trainings queue for what is left.
    futures = {"diffusion": submit("diffusion")}
    ref_key = chain_key("reference", eval_cfg, ("evaluation",), eval_key)
    ref_workers = max(1, cfg.evaluation.workers // 2)
    ref = stages.reference(eval_cfg, eval_data, cache_key=ref_key, workers=ref_workers)
    judge = None
    if eval_cfg.data.class_cond and not cfg.evaluation.reference:
        j_key = chain_key("judge", cfg, (), data_key, ref_key, num_samples=cfg.sampling.num_samples)
        judge = stages.judge(eval_cfg, data, ref, cache_key=j_key)
    futures.update({kind: submit(kind) for kind in wanted[1:]})
    runs = {kind: f.result() for kind, f in futures.items()}

    rows = []
    for scale in cfg.sampling.classifier_scales:
        clf_key = train_keys["classifier"] if scale and "classifier" in runs else ""
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
        sets = [] if two_stage else [(s_key, base)]
        if two_stage:
            b_key = chain_key("bilinear", cfg, ("upsampler",), s_key)
            sets.append((b_key, stages.bilinear(cfg, base, cache_key=b_key)))
        if "upsampler" in runs and cfg.sampling.upsampled(scale):
            u_key = chain_key("upsample", cfg, ("sampling",), s_key, train_keys["upsampler"])
            sets.append((u_key, stages.upsample(cfg, base, runs["upsampler"], u_key, parent)))
        for set_key, sset in sets:
            e_key = chain_key("evaluate", cfg, ("evaluation",), ref_key, set_key)
            tags = lineage.sample_tags(sset, runs, data)
            row = stages.evaluate(cfg, ref, sset, e_key, parent, tags, judge=judge)
            rows.append({**row, "base_samples": base["uri"]})

    curve: list[dict] = []
    if cfg.evaluation.checkpoint_samples:
        c_key = chain_key("curve", cfg, ("evaluation",), train_keys["diffusion"], ref_key)
        scored = _final_unguided(cfg, runs["diffusion"], rows)
        curve = stages.training_curve(cfg, runs["diffusion"], ref, judge, c_key, scored)

    yardsticks = {f"{eval_cfg.data.image_size}px": judge}
    summary = report.write_report(cfg, rows, parent, curve=curve, yardsticks=yardsticks)
    lineage.register_models(cfg, runs)
    lineage.finish_parent_run(parent, summary)
    log.info("metrics:\n%s", summary["table"])
    return {"rows": rows, **summary, "mlflow_parent_run_id": parent, "mlflow_ui": ui_hint(cfg)}


def _final_unguided(cfg: AdmConfig, diffusion_run: dict, rows: list[dict]) -> dict[str, dict]:
    """The final checkpoint's unguided row (bilinear when two-stage), which the FID curve
    takes as its last point instead of drawing and scoring the same set twice."""
    if not cfg.curve_reuses_unguided_set:
        return {}
    stage = "bilinear" if cfg.two_stage else "base"
    for row in rows:
        if row["classifier_scale"] == 0.0 and row["stage"] == stage:
            return {diffusion_run["checkpoint"]: row}
    return {}


def ui_hint(cfg: AdmConfig) -> str:
    """How to open the MLflow UI on these results."""
    from admflow.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(cfg)
    if uri.startswith("http"):
        return uri
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
