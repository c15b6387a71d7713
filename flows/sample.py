"""Sample from released OpenAI checkpoints (or ours) and score against a reference batch:
the path to the paper's tables without training."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from admflow.config import load_config
from flows import stages
from flows.hooks import PARENT_RUN_HOOKS
from tasks.plan import evaluate_key, set_key


@flow(name="sample", log_prints=True, **PARENT_RUN_HOOKS)
def sample_released(
    preset: str,
    checkpoint: str,
    classifier: str | None = None,
    classifier_scale: float | None = None,
    upsampler: str | None = None,
    overrides: list[str] | None = None,
    parent_run_id: str | None = None,
    final_only: bool = False,
) -> list[dict]:
    """E.g. preset=imagenet64, checkpoint=64x64_diffusion.pt, classifier=64x64_classifier.pt,
    overrides=["evaluation.reference=VIRTUAL_imagenet64_labeled.npz"] (the paper's reference
    batch: every flow reads its reference from evaluation.reference).

    ``parent_run_id``: log under a caller's MLflow run (left open for it to finish);
    ``final_only``: score only the last stage (the reference is at the upsampler's size).
    Without ``classifier_scale`` a classifier guides at the preset's first non-zero scale
    (:func:`tasks.sampling.spec.default_scale`)."""
    from tasks.plan import released_set_spec
    from tasks.reporting import lineage, report
    from tasks.runtime.warm import keep_warm
    from tasks.sampling.build import build_upsample_spec
    from tasks.scoring.inputs import check_reference

    cfg = load_config(preset, overrides or [])
    reference = cfg.evaluation.reference
    check_reference(reference, required=True)
    assert reference is not None
    spec = released_set_spec(cfg, checkpoint, classifier, classifier_scale)
    log = get_run_logger()
    own_parent = parent_run_id is None
    parent = parent_run_id or lineage.start_parent_run(
        cfg, "sample", flow_run.get_id(), preset, overrides
    )
    s_key = set_key(spec, cfg.storage.root)
    base = stages.sample(cfg, spec, s_key, parent)
    sets = [(s_key, base)]
    if upsampler:
        up_spec = build_upsample_spec(cfg, base["uri"], upsampler)
        u_key = set_key(up_spec, cfg.storage.root)
        sets.append((u_key, stages.upsample(cfg, up_spec, base, u_key, parent)))
    ref = {"uri": reference}
    rows = []
    with keep_warm():  # one Inception pool scores both stages
        for key, sset in sets[-1:] if final_only else sets:
            e_key = evaluate_key(cfg, reference, key)
            tags = {"admflow.upstream.samples": sset["uri"],
                    "admflow.upstream.checkpoint": checkpoint}  # fmt: skip
            rows.append(stages.evaluate(cfg, ref, sset, e_key, parent, tags))
    summary = report.write_report(cfg, rows, parent_run_id=parent)
    if own_parent:
        lineage.finish_parent_run(parent, summary)
    else:  # the caller's parent run ends with its own report
        report.discard_local_files(summary)
    log.info("metrics:\n%s", summary["table"])
    return rows
