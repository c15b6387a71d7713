"""One-trigger reproduction: shard -> train (diffusion, classifier, upsampler) -> sample at
each guidance scale -> upsample -> evaluate -> report, with lineage in MLflow.

What runs, and under which cache keys, is :func:`tasks.plan.plan_reproduce`'s plan; this
flow only executes it.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from admflow.config import AdmConfig, load_config
from flows import stages
from flows.hooks import PARENT_RUN_HOOKS
from tasks.plan import PipelinePlan, SetPlan, bilinear_key, evaluate_key, plan_reproduce, set_key
from tasks.resources import checked_plan


@flow(name="reproduce", log_prints=True, **PARENT_RUN_HOOKS)
def reproduce(preset: str = "tiny", overrides: list[str] | None = None) -> dict[str, Any]:
    """Run the paper's pipeline for one preset; returns the metrics rows and report paths."""
    from tasks.reporting import lineage, report
    from tasks.scoring.inputs import check_reference

    cfg = load_config(preset, overrides or [])
    cfg.check_pipeline()
    check_reference(cfg.evaluation.reference)
    plan = plan_reproduce(cfg)
    keys = plan.keys
    log = get_run_logger()
    parent = lineage.start_parent_run(cfg, "reproduce", flow_run.get_id(), preset, overrides)

    up_cfg = cfg.upsampler_data() if plan.two_stage else cfg
    data = stages.shard(cfg, cache_key=keys["data"], parent_run_id=parent)
    up_data = data
    if plan.two_stage:
        up_data = stages.shard(up_cfg, cache_key=keys["up_data"], parent_run_id=parent)
    train_data = {"diffusion": data, "classifier": data, "upsampler": up_data}

    def submit(kind: str) -> Any:
        return stages.train.submit(
            cfg, kind, train_data[kind], cache_key=keys[f"train.{kind}"], parent_run_id=parent
        )

    # The diffusion model is the long pole: it is asked for first, and the reference features
    # and the shorter trainings queue for what is left; unless the reference features could
    # not run beside it (tasks.resources): then they go first, minutes before days.
    first = checked_plan(cfg).reference_first
    futures = {} if first else {"diffusion": submit("diffusion")}
    workers = plan.reference_workers
    ref = stages.reference(cfg, data, cache_key=keys["reference"], workers=workers)
    if first:
        futures["diffusion"] = submit("diffusion")
    judge = stages.judge(cfg, data, ref, cache_key=keys["judge"]) if plan.judge else None
    futures.update({kind: submit(kind) for kind in plan.trainings[1:]})
    up_ref = ref
    if plan.two_stage:
        up_ref = stages.reference(up_cfg, up_data, cache_key=keys["up_reference"], workers=workers)
    runs = {kind: f.result() for kind, f in futures.items()}

    refs = {"base": (ref, keys["reference"]), "up": (up_ref, keys["up_reference"])}
    rows = _sample_and_score(cfg, plan, runs, refs, judge, train_data, parent)
    curve: list[dict] = []
    if plan.curve:
        scored = _final_unguided(runs["diffusion"], rows) if plan.curve_reuses_unguided else {}
        curve = stages.training_curve(cfg, runs["diffusion"], ref, judge, keys["curve"], scored)

    yardsticks = {f"{cfg.data.image_size}px": judge}
    if plan.floor:  # the upsampled pair has a reference of its own
        yardsticks[f"{up_cfg.data.image_size}px"] = stages.floor(
            cfg, up_ref, cache_key=keys["floor"]
        )
    summary = report.write_report(cfg, rows, parent, curve=curve, yardsticks=yardsticks)
    lineage.register_models(cfg, runs, train_data, overrides)
    lineage.finish_parent_run(parent, summary)
    log.info("metrics:\n%s", summary["table"])
    return {"rows": rows, **summary, "mlflow_parent_run_id": parent, "mlflow_ui": ui_hint(cfg)}


def _sample_and_score(
    cfg: AdmConfig,
    plan: PipelinePlan,
    runs: dict[str, dict],
    refs: dict[str, tuple[dict, str]],
    judge: dict | None,
    train_data: dict[str, dict],
    parent: str,
) -> list[dict]:
    """Every planned set drawn (keyed by its spec), then each scored against its reference:
    all drawing first and all scoring after, so one sampling pool serves the base sets and one
    Inception pool every evaluation (tasks.runtime.warm). ``train_data``: each training's
    shards, for the sets' lineage."""
    from tasks.reporting import lineage
    from tasks.runtime.warm import keep_warm

    with keep_warm():
        drawn = [_draw(cfg, set_plan, runs, refs, parent) for set_plan in plan.sets]
    rows = []
    with keep_warm():
        for base, sets in drawn:
            for key, sset, (set_ref, ref_key) in sets:
                shards = set_ref.get("shards")  # what a reference built here was built from
                tags = lineage.sample_tags(sset, runs, train_data, base, shards)
                e_key = evaluate_key(cfg, ref_key, key)
                row = stages.evaluate(cfg, set_ref, sset, e_key, parent, tags, judge=judge)
                rows.append({**row, "base_samples": base["uri"]})
    return rows


def _draw(
    cfg: AdmConfig,
    set_plan: SetPlan,
    runs: dict[str, dict],
    refs: dict[str, tuple[dict, str]],
    parent: str,
) -> tuple[dict, list[tuple[str, dict, tuple[dict, str]]]]:
    """One planned base set and what is made of it (its bilinear upscale, its upsampled
    set), each with its key and the reference it is scored against."""
    from tasks.plan import reproduce_set_spec
    from tasks.sampling.build import build_upsample_spec

    root = cfg.storage.root
    spec = reproduce_set_spec(cfg, set_plan, runs)
    s_key = set_key(spec, root)
    base = stages.sample(cfg, spec, s_key, parent)
    sets = [(s_key, base, refs["base"])]
    if set_plan.bilinear:
        b_key = bilinear_key(s_key, cfg.upsampler.unet.image_size, root)
        sets.append((b_key, stages.bilinear(cfg, base, cache_key=b_key), refs["up"]))
    if set_plan.upsample:
        up_spec = build_upsample_spec(cfg, base["uri"], runs["upsampler"]["checkpoint"])
        u_key = set_key(up_spec, root)
        upsampled = stages.upsample(cfg, up_spec, base, u_key, parent)
        sets.append((u_key, upsampled, refs["up"]))
    return base, sets


def _final_unguided(diffusion_run: dict, rows: list[dict]) -> dict[str, dict]:
    """The final checkpoint's unguided row, which the FID curve takes as its last point
    instead of drawing and scoring the same set twice."""
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
