"""The paper-style results table and the guidance trade-off plots (FID/IS vs scale,
precision vs recall), saved to object storage and logged to MLflow and Prefect."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from admflow import storage
from admflow.config import AdmConfig

COLUMNS = (
    "model",
    "resolution",
    "sampler",
    "steps",
    "scale",
    "FID",
    "sFID",
    "IS",
    "precision",
    "recall",
)


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def rows_to_markdown(
    cfg: AdmConfig, rows: list[dict], run_links: dict[str, str] | None = None
) -> str:
    head = "| " + " | ".join(COLUMNS) + " | run |\n|" + "---|" * (len(COLUMNS) + 1) + "\n"
    lines = []
    for r in rows:
        upsampled = r.get("upsampled", False)
        res = cfg.upsampler.unet.image_size if upsampled else cfg.model.image_size
        model = f"{cfg.name}{' +U' if upsampled else ''}"
        link = (run_links or {}).get(r.get("mlflow_run_id", ""), r.get("mlflow_run_id", ""))
        cells = [
            model,
            str(res),
            cfg.sampling.sampler,
            cfg.sampling.timestep_respacing or str(cfg.diffusion.steps),
            _fmt(r.get("classifier_scale"), 1),
            _fmt(r.get("fid")),
            _fmt(r.get("sfid")),
            _fmt(r.get("inception_score")),
            _fmt(r.get("precision")),
            _fmt(r.get("recall")),
        ]
        lines.append("| " + " | ".join(cells) + f" | {link} |")
    return head + "\n".join(lines) + "\n"


def plot_guidance_sweep(rows: list[dict], path: str) -> str:
    """FID and IS against classifier scale, and precision against recall (paper Fig. 4/5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = sorted((r for r in rows if not r.get("upsampled")), key=lambda r: r["classifier_scale"])
    scales = [r["classifier_scale"] for r in base]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(scales, [r.get("fid") for r in base], "o-")
    axes[0].set(xlabel="classifier scale", ylabel="FID", title="FID vs guidance scale")
    is_vals = [r.get("inception_score") for r in base]
    if all(v is not None for v in is_vals):
        axes[1].plot(scales, is_vals, "o-")
    else:
        axes[1].text(0.5, 0.5, "IS unavailable\n(no Inception logits)", ha="center", va="center")
    axes[1].set(xlabel="classifier scale", ylabel="Inception Score", title="IS vs guidance scale")
    axes[2].plot([r.get("recall") for r in base], [r.get("precision") for r in base], "o-")
    for r in base:
        axes[2].annotate(f"s={r['classifier_scale']:g}", (r.get("recall"), r.get("precision")))
    axes[2].set(xlabel="recall", ylabel="precision", title="precision vs recall")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(cfg: AdmConfig, rows: list[dict], parent_run_id: str | None = None) -> dict:
    """Write table + plots under ``<root>/reports/<run>``; return paths and the table."""
    for i, r in enumerate(rows):
        r.setdefault(
            "label", f"scale{r['classifier_scale']:g}{'-up' if r.get('upsampled') else ''}"
        )
        rows[i] = r
    links = _run_links(cfg, rows)
    table = rows_to_markdown(cfg, rows, links)
    out_dir = storage.join(cfg.storage.root, "reports", parent_run_id or "latest")
    tmp = tempfile.mkdtemp(prefix="admflow-report-")
    local = [
        os.path.join(tmp, "results.md"),
        plot_guidance_sweep(rows, os.path.join(tmp, "guidance_sweep.png")),
    ]
    with open(local[0], "w") as f:
        f.write(table)
    uris = []
    for path in local:
        uri = storage.join(out_dir, os.path.basename(path))
        with open(path, "rb") as f:
            storage.write_bytes(uri, f.read())
        uris.append(uri)
    _prefect_artifact(table)
    grids = [storage.join(r["samples"], "grid.png") for r in rows if r.get("samples")]
    return {"table": table, "report_uris": uris, "local_files": local, "grids": grids, "rows": rows}


def _run_links(cfg: AdmConfig, rows: list[dict]) -> dict[str, str]:
    from admflow.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(cfg)
    if not uri.startswith("http"):
        return {}
    import mlflow

    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    out = {}
    for r in rows:
        rid = r.get("mlflow_run_id")
        if rid and exp:
            out[rid] = (
                f"[{rid[:8]}]({uri.rstrip('/')}/#/experiments/{exp.experiment_id}/runs/{rid})"
            )
    return out


def _prefect_artifact(table: str) -> None:
    try:
        from prefect.artifacts import create_markdown_artifact
        from prefect.context import get_run_context

        get_run_context()
    except Exception:
        return  # not inside a Prefect run
    create_markdown_artifact(key="reproduce-results", markdown=table, description="ADM results")
