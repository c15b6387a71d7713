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
    from tasks.reporting import lineage, report

    cfg = load_config(preset, overrides or [])
    cfg.check_pipeline()
    log = get_run_logger()
    parent = lineage.start_parent_run(cfg, "reproduce", flow_run.get_id(), preset, overrides)

    data_key = chain_key("shard", cfg, ("data",))
    data = stages.shard(cfg, cache_key=data_key, parent_run_id=parent)
    # Two stages (ADM-G + ADM-U): the upsampler trains on the data at its own resolution.
    # The base model is scored where it works (the sweep and the FID curve against real images
    # at its size, as the paper scores ADM-G at 64 or 128); the upsampled sets against real
    # images at the upsampler's size, its output beside the same base samples upscaled
    # bilinearly (the baseline ADM-U must beat).
    up_cfg, up_key, up_data = cfg, data_key, data
    if cfg.two_stage:
        up_cfg = cfg.upsampler_data()
        up_key = chain_key("shard", up_cfg, ("data",))
        up_data = stages.shard(up_cfg, cache_key=up_key, parent_run_id=parent)

    train_keys = {
        "diffusion": chain_key("train", cfg, DIFFUSION_SECTIONS, data_key),
        "classifier": chain_key("train", cfg, CLASSIFIER_SECTIONS, data_key),
        "upsampler": chain_key("train", cfg, UPSAMPLER_SECTIONS, up_key),
    }
    wanted = ["diffusion"]
    wanted += ["classifier"] if cfg.classifier.enabled else []
    wanted += ["upsampler"] if cfg.upsampler.enabled else []
    train_data = {"diffusion": data, "classifier": data, "upsampler": up_data}

    def submit(kind: str) -> Any:
        return stages.train.submit(
            cfg, kind, train_data[kind], cache_key=train_keys[kind], parent_run_id=parent
        )

    # The diffusion model is the long pole: it is asked for first, and the reference features
    # (half the evaluation workers) and the shorter trainings queue for what is left.
    futures = {"diffusion": submit("diffusion")}
    ref_workers = max(1, cfg.evaluation.workers // 2)
    ref_key = chain_key("reference", cfg, ("evaluation",), data_key)
    ref = stages.reference(cfg, data, cache_key=ref_key, workers=ref_workers)
    judge = None
    if cfg.data.class_cond and not cfg.evaluation.reference:
        j_key = chain_key("judge", cfg, (), data_key, ref_key, num_samples=cfg.sampling.num_samples)
        judge = stages.judge(cfg, data, ref, cache_key=j_key)
    futures.update({kind: submit(kind) for kind in wanted[1:]})
    up_ref, up_ref_key = ref, ref_key
    if cfg.two_stage:  # (every upsample_sets choice takes at least the largest scale up)
        up_ref_key = chain_key("reference", up_cfg, ("evaluation",), up_key)
        up_ref = stages.reference(up_cfg, up_data, cache_key=up_ref_key, workers=ref_workers)
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
        sets = [(s_key, base, ref, ref_key)]
        if "upsampler" in runs and cfg.sampling.upsampled(scale):
            if cfg.two_stage:
                b_key = chain_key("bilinear", cfg, ("upsampler",), s_key)
                sets.append(
                    (b_key, stages.bilinear(cfg, base, cache_key=b_key), up_ref, up_ref_key)
                )
            # (like a sample set's, without the scale list: another list redraws nothing here)
            u_key = chain_key(
                "upsample", cfg, (), s_key, train_keys["upsampler"], sampling=_sampling_key(cfg)
            )
            upsampled = stages.upsample(cfg, base, runs["upsampler"], u_key, parent)
            sets.append((u_key, upsampled, up_ref, up_ref_key))
        for set_key, sset, set_ref, set_ref_key in sets:
            e_key = chain_key("evaluate", cfg, ("evaluation",), set_ref_key, set_key)
            tags = lineage.sample_tags(sset, runs, data)
            row = stages.evaluate(cfg, set_ref, sset, e_key, parent, tags, judge=judge)
            rows.append({**row, "base_samples": base["uri"]})

    curve: list[dict] = []
    if cfg.evaluation.checkpoint_samples:
        c_key = chain_key("curve", cfg, ("evaluation",), train_keys["diffusion"], ref_key)
        scored = _final_unguided(cfg, runs["diffusion"], rows)
        curve = stages.training_curve(cfg, runs["diffusion"], ref, judge, c_key, scored)

    yardsticks = {f"{cfg.data.image_size}px": judge}
    if cfg.two_stage:  # the upsampled pair has a reference of its own
        f_key = chain_key("floor", cfg, (), up_ref_key, num_samples=cfg.sampling.num_samples)
        yardsticks[f"{up_cfg.data.image_size}px"] = stages.floor(cfg, up_ref, cache_key=f_key)
    summary = report.write_report(cfg, rows, parent, curve=curve, yardsticks=yardsticks)
    lineage.register_models(cfg, runs)
    lineage.finish_parent_run(parent, summary)
    log.info("metrics:\n%s", summary["table"])
    return {"rows": rows, **summary, "mlflow_parent_run_id": parent, "mlflow_ui": ui_hint(cfg)}


def _final_unguided(cfg: AdmConfig, diffusion_run: dict, rows: list[dict]) -> dict[str, dict]:
    """The final checkpoint's unguided row, which the FID curve takes as its last point
    instead of drawing and scoring the same set twice."""
    if not cfg.curve_reuses_unguided_set:
        return {}
    for row in rows:
        if row["classifier_scale"] == 0.0 and row["stage"] == "base":
            return {diffusion_run["checkpoint"]: row}
    return {}


def ui_hint(cfg: AdmConfig) -> str:
    """How to open the MLflow UI on these results."""
    from admflow.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(cfg)
    if uri.startswith("http"):
        return uri
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
