"""One row of the paper (or of its ancestors) from the released checkpoints: the `sample` flow with the row's
settings (two stages where the row has an upsampler), scored against the paper's reference
batch, and a table of ours beside the published numbers."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from admflow.config import ConfigError, load_config
from admflow.paper import find_row, locate_files
from flows.hooks import PARENT_RUN_HOOKS
from flows.sample import sample_released


@flow(name="paper", log_prints=True, **PARENT_RUN_HOOKS)
def paper(
    row: str,
    checkpoints: str,
    num_samples: int | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """E.g. row=imagenet256-adm-g, checkpoints=s3://models/openai (holding 256x256_diffusion.pt
    and 256x256_classifier.pt), overrides=["evaluation.reference=s3://models/openai"]: the
    reference batch itself or a directory holding it under its released name."""
    from tasks.reporting import lineage, paper_report
    from tasks.scoring.inputs import check_reference

    urls, entry = find_row(row)
    reference = load_config(entry.preset, overrides or []).evaluation.reference
    if not reference:
        wanted = (
            f"the reference batch .npz or a directory holding {entry.reference}"
            if entry.reference
            else "the training set's reference (an .npz, a feature file or a shard folder)"
        )
        raise ConfigError(
            f"evaluation.reference: give {wanted} (--reference or --set evaluation.reference=...)"
        )
    files = locate_files(urls, entry, checkpoints, reference)
    check_reference(files["reference"])  # before the parent run opens
    settings = entry.overrides(num_samples) + list(overrides or [])
    settings.append(f"evaluation.reference={files['reference']}")
    cfg = load_config(entry.preset, settings)
    parent = paper_report.start_parent_run(cfg, entry, files, settings, flow_run.get_id())

    scored = sample_released(
        preset=entry.preset,
        checkpoint=files["diffusion"],
        classifier=files.get("classifier"),
        classifier_scale=entry.classifier_scale,
        upsampler=files.get("upsampler"),
        overrides=settings,
        parent_run_id=parent,
        final_only=True,
    )
    final = scored[-1]
    lineage.link(parent, samples=final["samples"], evaluate_run_id=final.get("mlflow_run_id"))
    result = paper_report.record(cfg, entry, final, cfg.sampling.num_samples, parent)
    lineage.finish_parent_run(parent, {})
    get_run_logger().info("paper row %s:\n%s", entry.id, result["table"])
    return {**result, "samples": final["samples"], "mlflow_parent_run_id": parent}
