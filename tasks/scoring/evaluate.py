"""Evaluation stage: FID, sFID, IS and precision/recall as in ADM's evaluator, from the
Inception features of :mod:`tasks.scoring.features`, logged to MLflow with both inputs as
lineage.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from typing import Any

import numpy as np

from admflow.config import AdmConfig
from models import inception as inc
from models import metrics as M
from tasks.scoring.features import features_for
from tasks.scoring.inputs import EvaluationInputError
from tasks.scoring.judge import judge_reading
from tasks.scoring.preflight import check_same_resolution

log = logging.getLogger(__name__)
EVALUATION_ERRORS = (EvaluationInputError, M.MetricError, inc.InceptionError)


# ------------------------------------------------------------------------------ metrics


def _stats(feats: dict, key: str, mu: str, sigma: str) -> tuple[np.ndarray, np.ndarray]:
    if mu in feats and sigma in feats:
        return feats[mu], feats[sigma]
    if key not in feats:
        raise EvaluationInputError(f"neither {key} features nor {mu}/{sigma} statistics")
    return M.feature_statistics(feats[key])


def compute_metrics(
    ref: dict[str, Any], sample: dict[str, Any], fid_method: str = "sqrtm"
) -> dict[str, float | None]:
    """The evaluator's five numbers from two feature dicts; IS is None without logits."""
    r_size, s_size = ref.get("image_size"), sample.get("image_size")
    if r_size is not None and s_size is not None and int(r_size) != int(s_size):
        raise EvaluationInputError(
            f"reference images are {int(r_size)}px but samples are {int(s_size)}px: compare sets "
            "of the same resolution (e.g. the paper's reference batch for that resolution)"
        )
    if "logits" in sample:
        inception_score: float | None = M.inception_score(M.softmax(sample["logits"]))
    elif "softmax" in sample:
        inception_score = M.inception_score(np.asarray(sample["softmax"], np.float32))
    else:
        inception_score = None
    fid = _distance(ref, sample, "pool", "mu", "sigma", fid_method)
    sfid = _distance(ref, sample, "spatial", "mu_s", "sigma_s", fid_method)
    precision, recall = M.precision_recall(ref["pool"], sample["pool"])
    return {
        "inception_score": inception_score,
        "fid": fid,
        "sfid": sfid,
        "precision": precision,
        "recall": recall,
    }


def _distance(ref: dict, sample: dict, key: str, mu: str, sigma: str, method: str) -> float:
    """The Frechet distance of the sample set to the reference, from the samples' own
    features where there are no precomputed statistics (fewer samples than feature
    dimensions then skip the D×D decomposition, see models.metrics)."""
    r_stats = _stats(ref, key, mu, sigma)
    if (mu in sample and sigma in sample) or key not in sample:
        return M.frechet_distance(*_stats(sample, key, mu, sigma), *r_stats, method=method)
    return M.frechet_distance_to_features(*r_stats, sample[key], method=method)


def format_metrics(m: dict[str, Any]) -> str:
    """The evaluator's printout."""
    is_text = (
        m["inception_score"] if m["inception_score"] is not None else "unavailable (no logits)"
    )
    return "\n".join(
        [
            f"Inception Score: {is_text}",
            f"FID: {m['fid']}",
            f"sFID: {m['sfid']}",
            f"Precision: {m['precision']}",
            f"Recall: {m['recall']}",
        ]
    )


def _log_input(mlflow: Any, feats: dict, uri: str, feature_uri: str, context: str) -> None:
    try:
        digest = hashlib.sha256(feature_uri.encode()).hexdigest()[:16]
        with warnings.catch_warnings():  # "a local path can be read two ways": both the same
            warnings.simplefilter("ignore", UserWarning)
            ds = mlflow.data.from_numpy(
                np.asarray(feats["pool"][:1000]), source=feature_uri, name=uri, digest=digest
            )
        mlflow.log_input(ds, context=context)
    except Exception as e:  # lineage is still in the tags
        log.warning("could not log %s as an MLflow dataset: %s", uri, e)


def evaluate_sets(
    cfg: AdmConfig,
    ref: str,
    samples: str,
    *,
    workers: int | None = None,
    inception: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    log_mlflow: bool = True,
    judge: str | None = None,
    run_name: str | None = None,
    params: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Score ``samples`` against ``ref`` (each an .npz, feature file, sample set or data set).

    Returns the metrics (``inception_score``, ``fid``, ``sfid``, ``precision``, ``recall``;
    ``class_accuracy``, ``sharpness`` and ``softened_real_accuracy`` when a ``judge`` file is
    given, tasks.scoring.judge.judge_reading) plus ``mlflow_run_id`` (None when not
    logged) and the feature-file URIs used.
    """
    if log_mlflow:  # an unreachable or misplaced store fails now, not after the features
        from admflow.tracking import check_experiment

        check_experiment(cfg)
    check_same_resolution(ref, samples)  # from the headers, before Inception runs on either
    ref_feats, ref_fu = features_for(cfg, ref, workers, inception)
    smp_feats, smp_fu = features_for(cfg, samples, workers, inception)
    metrics: dict[str, Any] = compute_metrics(ref_feats, smp_feats, cfg.evaluation.fid_method)
    if judge:  # the demo's independent class-fidelity judge
        metrics.update(judge_reading(judge, samples))
    metrics.update(reference_features=ref_fu, sample_features=smp_fu, mlflow_run_id=None)
    if not log_mlflow:
        return metrics
    import mlflow

    from admflow.tracking import stage_run

    run_tags = {"admflow.reference": ref, "admflow.samples": samples, **(tags or {})}
    sections = ("evaluation",)
    with stage_run(cfg, "evaluate", parent_run_id, run_tags, sections, run_name) as run:
        mlflow.log_params(params or {})
        mlflow.log_metrics(
            {k: float(v) for k, v in metrics.items() if k in _METRICS and v is not None}
        )
        if metrics["inception_score"] is None:
            mlflow.set_tag(
                "admflow.inception_score", "unavailable: Inception weights have no logits"
            )
        _log_input(mlflow, ref_feats, ref, ref_fu, "reference")
        _log_input(mlflow, smp_feats, samples, smp_fu, "samples")
        metrics["mlflow_run_id"] = run.info.run_id
    return metrics


_METRICS = ("inception_score", "fid", "sfid", "precision", "recall", "class_accuracy")
