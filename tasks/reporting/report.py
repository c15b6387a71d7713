"""The paper-style results table and the guidance trade-off plots (FID/IS vs scale,
precision vs recall), saved to object storage and logged to MLflow and Prefect."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from admflow import storage
from admflow.config import AdmConfig

COLUMNS = (
    "model",
    "stage",
    "resolution",
    "sampler",
    "steps",
    "scale",
    "FID",
    "sFID",
    "IS",
    "class acc",
    "precision",
    "recall",
)
STAGES = {"base": "", "upsampler": " +U", "bilinear": " +bilinear"}


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _stage(r: dict) -> str:
    return r.get("stage") or ("upsampler" if r.get("upsampled") else "base")


def _resolution(cfg: AdmConfig, stage: str) -> int:
    """The size a stage's sets are scored at: the base model's, or the upsampler's."""
    return cfg.model.image_size if stage == "base" else cfg.upsampler.unet.image_size


def _sampler_cells(cfg: AdmConfig, stage: str) -> tuple[str, str]:
    """The sampler and steps of a stage's sets; an upsampled set names both of its stages."""
    base = (cfg.sampling.sampler, cfg.sampling.timestep_respacing or str(cfg.diffusion.steps))
    if stage != "upsampler":
        return base
    up = cfg.sampling.upsampler_steps()
    return f"{base[0]} + {up[0]}", f"{base[1]} + {up[1]}"


def discard_local_files(summary: dict) -> None:
    """Remove the report's temp dir (its files are in the store) when no MLflow run takes them."""
    for folder in {os.path.dirname(p) for p in summary.get("local_files", [])}:
        if os.path.basename(folder).startswith("admflow-report-"):
            shutil.rmtree(folder, ignore_errors=True)


def rows_to_markdown(
    cfg: AdmConfig, rows: list[dict], run_links: dict[str, str] | None = None
) -> str:
    head = "| " + " | ".join(COLUMNS) + " | run |\n|" + "---|" * (len(COLUMNS) + 1) + "\n"
    lines = []
    for r in rows:
        stage = _stage(r)
        res = _resolution(cfg, stage)
        link = (run_links or {}).get(r.get("mlflow_run_id", ""), r.get("mlflow_run_id", ""))
        cells = [
            f"{cfg.name}{STAGES.get(stage, ' ' + stage)}",
            stage,
            str(res),
            *_sampler_cells(cfg, stage),
            _fmt(r.get("classifier_scale"), 1),
            _fmt(r.get("fid")),
            _fmt(r.get("sfid")),
            _fmt(r.get("inception_score")),
            _fmt(r.get("class_accuracy")),
            _fmt(r.get("precision")),
            _fmt(r.get("recall")),
        ]
        lines.append("| " + " | ".join(cells) + f" | {link} |")
    return head + "\n".join(lines) + "\n"


def yardsticks_to_markdown(yardsticks: dict[str, dict | None]) -> str:
    """What "good" is: the judge's accuracy on held-out real images, clean and softened as
    much as the unguided samples (:func:`softened_yardstick`), and the FID floor."""
    lines = ["| reference | judge accuracy on held-out real images | on them softened as the "
             "unguided samples | FID floor (N) |", "|---|---|---|---|"]  # fmt: skip
    notes = []
    for name, y in yardsticks.items():
        if not y:
            continue
        judge = soft = "-"  # a reference scored without a judge trained at its size
        if y.get("judge_heldout_accuracy") is not None:
            judge = f"{_fmt(y['judge_heldout_accuracy'])} ({y.get('judge_heldout_images')} images)"
        m = y.get("judge_softened_real")
        if m:
            soft = _fmt(m["accuracy"])
            notes.append(
                f"{name}: real images softened by a Gaussian blur of {m['blur']:.2f} px and "
                f"contrast x{m['contrast']:.2f}, until their mean gradient magnitude "
                f"({m['sharpness']:.3f}; clean {m['real_sharpness']:.3f}) is the unguided "
                "samples' as the judge sees them" + (f" ({m['clipped']})" if m["clipped"] else "")
            )
        lines.append(
            f"| {name} | {judge} | {soft} | {_fmt(y.get('fid_floor'))} "
            f"({y.get('fid_floor_images')}) |"
        )
    return "\n".join(lines) + "\n" + "".join(f"\n{n}.\n" for n in notes)


def softened_yardstick(
    rows: list[dict], yardsticks: dict[str, dict | None]
) -> dict[str, dict | None]:
    """The yardsticks, the one with a judge given its accuracy on real images softened as
    much as the unguided base samples (the row's ``softened_real``, tasks.scoring.judge)."""
    unguided = [r for r in rows if _stage(r) == "base" and r.get("classifier_scale") == 0.0]
    matched = unguided[0].get("softened_real") if unguided else None
    out: dict[str, dict | None] = {}
    for name, y in yardsticks.items():
        if y and y.get("judge_heldout_accuracy") is not None and matched:
            y = {**y, "judge_softened_real": matched,
                 "judge_softened_real_accuracy": matched["accuracy"]}  # fmt: skip
        out[name] = y
    return out


def curve_to_markdown(curve: list[dict]) -> str:
    lines = ["| training step | FID | sFID | class acc | precision | recall |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for c in sorted(curve, key=lambda c: c["step"]):
        lines.append(
            f"| {c['step']} | {_fmt(c.get('fid'))} | {_fmt(c.get('sfid'))} | "
            f"{_fmt(c.get('class_accuracy'))} | {_fmt(c.get('precision'))} | "
            f"{_fmt(c.get('recall'))} |"
        )
    return "\n".join(lines) + "\n"


def two_stage_verdict(rows: list[dict]) -> str:
    """Per scale, whether the upsampler's set scores a lower FID than the same base samples
    upscaled bilinearly (ADM Table 6's question), said plainly either way."""
    by_scale: dict[float, dict[str, dict]] = {}
    for r in rows:
        by_scale.setdefault(r["classifier_scale"], {})[_stage(r)] = r
    lines = []
    for scale, st in sorted(by_scale.items()):
        if "upsampler" in st and "bilinear" in st:
            up, bi = st["upsampler"]["fid"], st["bilinear"]["fid"]
            word = "beats" if up < bi else "does not beat"
            lines.append(
                f"- scale {scale:g}: the upsampler {word} bilinear (FID {up:.2f} vs {bi:.2f})"
            )
    return "\n".join(lines) + "\n" if lines else ""


def _by_stage(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: r["classifier_scale"]):
        out.setdefault(_stage(r), []).append(r)
    return out


def plot_guidance_sweep(rows: list[dict], path: str, sizes: dict[str, int] | None = None) -> str:
    """FID, class fidelity (IS where Inception logits exist, else the judge's class accuracy)
    against the classifier scale, and precision against recall (paper Fig. 4/5). ``sizes``:
    the resolution each stage is scored at, for the legend (an FID at 16px and one at 32px are
    measured against different references)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = _by_stage(rows)
    has_is = all(r.get("inception_score") is not None for r in rows)
    has_acc = any(r.get("class_accuracy") is not None for r in rows)
    panels = (
        ["fid"] + (["inception_score"] if has_is else []) + (["class_accuracy"] if has_acc else [])
    )
    panels += ["pr"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 3.8))
    titles = {"fid": "FID (lower is better)", "inception_score": "Inception Score",
              "class_accuracy": "class accuracy (judge)"}  # fmt: skip
    labels = {st: f"{st} ({sizes[st]}px)" if sizes and st in sizes else st for st in stages}
    for ax, key in zip(axes, panels, strict=True):
        for stage, rs in stages.items():
            if key == "pr":
                xs, ys = [r.get("recall") for r in rs], [r.get("precision") for r in rs]
                ax.plot(xs, ys, "o-", label=labels[stage])
                for r in rs:
                    ax.annotate(f"s={r['classifier_scale']:g}", (r.get("recall"), r.get("precision")),
                                fontsize=8, xytext=(3, 3), textcoords="offset points")  # fmt: skip
            else:
                pts = [(r["classifier_scale"], r.get(key)) for r in rs if r.get(key) is not None]
                if pts:
                    ax.plot(*zip(*pts, strict=True), "o-", label=labels[stage])
        if key == "pr":
            ax.set(xlabel="recall", ylabel="precision", title="precision vs recall")
        else:
            ax.set(xlabel="classifier scale", ylabel=key, title=titles[key])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_training_curve(curve: list[dict], floor: float | None, path: str) -> str:
    """FID of each diffusion checkpoint against its training step, with the FID floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted((c["step"], c["fid"]) for c in curve if c.get("fid") is not None)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    if pts:
        ax.plot(*zip(*pts, strict=True), "o-", label="samples of the checkpoint")
    if floor is not None:
        ax.axhline(floor, color="grey", ls="--", label="floor: real vs real")
    ax.set(xlabel="training step", ylabel="FID", title="FID over training", yscale="log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(
    cfg: AdmConfig,
    rows: list[dict],
    parent_run_id: str | None = None,
    *,
    curve: list[dict] | None = None,
    yardsticks: dict[str, dict | None] | None = None,
) -> dict:
    """Write table + plots under ``<root>/reports/<run>``; return paths and the table."""
    for r in rows:
        r.setdefault("label", f"scale{r['classifier_scale']:g}-{_stage(r)}")
    links = _run_links(cfg, rows)
    table = rows_to_markdown(cfg, rows, links)
    text = "## Results\n\n" + table
    yardsticks = softened_yardstick(rows, yardsticks or {})
    if yardsticks and any(yardsticks.values()):
        text += "\n## Yardsticks\n\n" + yardsticks_to_markdown(yardsticks)
    if curve:
        text += "\n## FID over training (unguided, conditional)\n\n" + curve_to_markdown(curve)
    floor = next((y["fid_floor"] for y in (yardsticks or {}).values() if y), None)
    if curve and floor is not None:
        text += f"\nFloor (real vs real at the same N): FID {floor:.2f}.\n"
    verdict = two_stage_verdict(rows)
    if verdict:
        text += "\n## Two stages: upsampler against bilinear\n\n" + verdict
    out_dir = storage.join(cfg.storage.root, "reports", parent_run_id or "latest")
    tmp = tempfile.mkdtemp(prefix="admflow-report-")
    local = [
        os.path.join(tmp, "results.md"),
        plot_guidance_sweep(
            rows,
            os.path.join(tmp, "guidance_sweep.png"),
            {st: _resolution(cfg, st) for st in STAGES},
        ),
    ]
    if curve:
        local.append(plot_training_curve(curve, floor, os.path.join(tmp, "training_curve.png")))
    with open(local[0], "w") as f:
        f.write(text)
    uris = []
    for path in local:
        uri = storage.join(out_dir, os.path.basename(path))
        with open(path, "rb") as f:
            storage.write_bytes(uri, f.read())
        uris.append(uri)
    _prefect_artifact(text)
    grids = [storage.join(r["samples"], "grid.png") for r in rows if r.get("samples")]
    return {
        "table": table,
        "report": text,
        "report_uris": uris,
        "local_files": local,
        "grids": grids,
        "rows": rows,
        "curve": curve or [],
        "yardsticks": yardsticks or {},
    }


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
