"""Sample from released OpenAI checkpoints (or ours) and score against a reference batch:
the path to the paper's tables without training."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from admflow.config import load_config
from flows import stages
from flows.hooks import PARENT_RUN_HOOKS
from flows.stages import chain_key


@flow(name="sample", log_prints=True, **PARENT_RUN_HOOKS)
def sample_released(
    preset: str,
    checkpoint: str,
    reference: str,
    classifier: str | None = None,
    classifier_scale: float | None = None,
    upsampler: str | None = None,
    overrides: list[str] | None = None,
    parent_run_id: str | None = None,
    final_only: bool = False,
) -> list[dict]:
    """E.g. preset=imagenet64, checkpoint=64x64_diffusion.pt, classifier=64x64_classifier.pt,
    reference=VIRTUAL_imagenet64_labeled.npz (the paper's reference batch).

    ``parent_run_id``: log under a caller's MLflow run (left open for it to finish);
    ``final_only``: score only the last stage (the reference is at the upsampler's size)."""
    from tasks.reporting import lineage, report

    cfg = load_config(preset, overrides or [])
    scale = cfg.sampling.classifier_scales[0] if classifier_scale is None else classifier_scale
    cfg.sampling.guided(scale, classifier is not None)  # a scale without a classifier: fail now
    log = get_run_logger()
    own_parent = parent_run_id is None
    parent = parent_run_id or lineage.start_parent_run(
        cfg, "sample", flow_run.get_id(), preset, overrides
    )
    diffusion = {"checkpoint": checkpoint, "cache_key": checkpoint}
    clf = {"checkpoint": classifier} if classifier else None
    s_key = chain_key("sample", cfg, ("sampling",), checkpoint, classifier or "", scale=scale)
    base = stages.sample(cfg, diffusion, clf, scale, s_key, parent)
    sets = [(s_key, base)]
    if upsampler:
        u_key = chain_key("upsample", cfg, ("sampling",), s_key, upsampler)
        sets.append((u_key, stages.upsample(cfg, base, {"checkpoint": upsampler}, u_key, parent)))
    ref = {"uri": reference}
    rows = []
    for key, sset in sets[-1:] if final_only else sets:
        e_key = chain_key("evaluate", cfg, ("evaluation",), reference, key)
        tags = {"admflow.upstream.samples": sset["uri"], "admflow.upstream.checkpoint": checkpoint}
        rows.append(stages.evaluate(cfg, ref, sset, e_key, parent, tags))
    summary = report.write_report(cfg, rows, parent_run_id=parent)
    if own_parent:
        lineage.finish_parent_run(parent, summary)
    log.info("metrics:\n%s", summary["table"])
    return rows
