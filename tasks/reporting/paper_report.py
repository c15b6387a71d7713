"""Ours beside the paper's numbers for one row: the table, its JSON, and where they are kept
(object storage, the MLflow parent run, a Prefect markdown artifact)."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from admflow import storage
from admflow.config import AdmConfig
from admflow.paper import METRICS, PaperRow

LABELS = {
    "fid": "FID",
    "sfid": "sFID",
    "inception_score": "IS",
    "precision": "precision",
    "recall": "recall",
}
FULL_SIZE = 50_000  # the paper scores 50K samples; FID is biased upwards on fewer
NO_IS = (
    "IS n/a: the Inception weights in use have no 1008-way logits; pass the paper's network "
    "with --set evaluation.inception_weights=PATH (see `admflow paper run --help`)"
)


def start_parent_run(
    cfg: AdmConfig, row: PaperRow, files: dict[str, str], overrides: list[str], flow_run_id: Any
) -> str:
    """The MLflow parent run of a row: tagged with the row id and linked to its input files."""
    import mlflow

    from tasks.reporting import lineage

    parent = lineage.start_parent_run(cfg, "paper", flow_run_id, row.preset, overrides)
    mlflow.MlflowClient().set_tag(parent, "admflow.paper_row", row.id)
    lineage.link(parent, **files)
    return parent


def compare(row: PaperRow, ours: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per metric: ours, published and ours - published (None where either is)."""
    out = []
    for m in METRICS:
        mine, theirs = ours.get(m), getattr(row.published, m)
        diff = mine - theirs if mine is not None and theirs is not None else None
        out.append({"metric": m, "ours": mine, "published": theirs, "difference": diff})
    return out


def _cell(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def to_markdown(row: PaperRow, entries: list[dict[str, Any]], num_samples: int) -> str:
    lines = [
        f"### {row.id}: {row.description}",
        "",
        f"{row.settings()}, {num_samples} samples; published: {row.published.cited()}",
        "",
        "| metric | ours | published | ours - published |",
        "|---|---|---|---|",
    ]
    for e in entries:
        lines.append(
            f"| {LABELS[e['metric']]} | {_cell(e['ours'])} | {_cell(e['published'])} "
            f"| {_cell(e['difference'], signed=True)} |"
        )
    if num_samples < FULL_SIZE:
        lines += ["", f"({num_samples} < {FULL_SIZE} samples: not comparable with the paper)"]
    if any(e["metric"] == "inception_score" and e["ours"] is None for e in entries):
        lines += ["", f"({NO_IS})"]
    if row.note:
        lines += ["", f"note: {row.note}"]
    return "\n".join(lines) + "\n"


def record(
    cfg: AdmConfig, row: PaperRow, ours: dict[str, Any], num_samples: int, parent: str
) -> dict[str, Any]:
    """Write table + JSON under ``<root>/reports/<parent>/``, log them and the metrics to the
    MLflow parent run, and publish the table as a Prefect artifact when in a flow run."""
    entries = compare(row, ours)
    table = to_markdown(row, entries, num_samples)
    result = {"row": row.id, "num_samples": num_samples, "metrics": entries, "table": table}
    local = {"paper.md": table, "paper.json": json.dumps(result, indent=2)}
    uris = []
    with tempfile.TemporaryDirectory(prefix="admflow-paper-") as tmp:
        for name, text in local.items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
            uri = storage.join(cfg.storage.root, "reports", parent, name)
            storage.write_bytes(uri, text.encode())
            uris.append(uri)
        _log_parent(parent, entries, [os.path.join(tmp, n) for n in local])
    _artifact(row, table)
    return {**result, "report_uris": uris}


def _log_parent(parent: str, entries: list[dict[str, Any]], files: list[str]) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    for e in entries:
        for col in ("ours", "published", "difference"):
            if e[col] is not None:
                client.log_metric(parent, f"{col}/{e['metric']}", float(e[col]))
    for path in files:
        client.log_artifact(parent, path)


def _artifact(row: PaperRow, table: str) -> None:
    try:
        from prefect.artifacts import create_markdown_artifact
        from prefect.context import get_run_context

        get_run_context()
    except Exception:
        return  # not inside a Prefect run
    create_markdown_artifact(key=f"paper-{row.id}", markdown=table, description=row.description)
