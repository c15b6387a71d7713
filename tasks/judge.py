"""The demo's independent judge and its yardsticks, built from a reference feature file.

* **Judge**: a linear probe (:mod:`models.probe`) on the Inception pool features of the
  labelled reference images, fitted on 80% of them; its accuracy on the other 20% is reported
  so the reader knows how far to trust it. It never sees the guidance classifier.
* **FID floor**: the FID between two disjoint halves of the real reference images, each as
  large as a sample set. FID is biased upwards at small N, so this is the best score a perfect
  model could get at the demo's sample count: the number to read every other FID against.

Both are stored beside the reference features (``<root>/eval-cache/judge-<key>.npz``) and
computed once per reference and sample count.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any, cast

import numpy as np

from admflow import storage
from admflow.config import AdmConfig
from models import metrics as M
from models.probe import LinearProbe, fit_linear_probe, holdout_split

JUDGE_VERSION = 1


def _judge_uri(cfg: AdmConfig, reference_features: str, num_samples: int) -> str:
    payload = f"{JUDGE_VERSION}:{reference_features}:{num_samples}:{cfg.evaluation.fid_method}"
    key = hashlib.sha256(payload.encode()).hexdigest()[:24]
    return storage.join(cfg.storage.root, "eval-cache", f"judge-{key}.npz")


def build_judge(cfg: AdmConfig, reference_features: str, num_samples: int) -> dict[str, Any]:
    """Fit the judge and the FID floor on a reference feature file; returns their summary."""
    from tasks.evaluate import load_features

    uri = _judge_uri(cfg, reference_features, num_samples)
    if storage.exists(uri):
        return read_judge(uri)[1]
    feats = load_features(reference_features)
    labels = feats.get("labels")
    if labels is None or (np.asarray(labels) < 0).any():
        raise ValueError(
            f"{reference_features}: the reference images carry no class labels; the judge needs "
            "a labelled data set (data.class_cond: true)"
        )
    pool = np.asarray(feats["pool"], np.float64)
    train, held = holdout_split(len(pool), 0.2, seed=0)
    num_classes = int(cfg.model.num_classes or labels.max() + 1)
    probe = fit_linear_probe(pool[train], labels[train], num_classes)
    summary = {
        "uri": uri,
        "judge_heldout_accuracy": probe.accuracy(pool[held], labels[held]),
        "judge_train_images": int(len(train)),
        "judge_heldout_images": int(len(held)),
        **_fid_floor(pool, num_samples, cfg.evaluation.fid_method),
    }
    buf = io.BytesIO()
    numbers = {k: np.asarray(v) for k, v in summary.items() if k != "uri"}
    cast(Any, np.savez)(buf, **probe.to_arrays(), **numbers)
    storage.write_bytes(uri, buf.getvalue())
    return summary


def _fid_floor(pool: np.ndarray, num_samples: int, method: str) -> dict[str, Any]:
    half = min(num_samples, len(pool) // 2)
    order = np.random.default_rng(1).permutation(len(pool))
    a, b = pool[order[:half]], pool[order[half : 2 * half]]
    fid = M.frechet_distance(*M.feature_statistics(a), *M.feature_statistics(b), method=method)
    return {"fid_floor": float(fid), "fid_floor_images": int(half)}


def read_judge(uri: str) -> tuple[LinearProbe, dict[str, Any]]:
    with np.load(io.BytesIO(storage.read_bytes(uri))) as z:
        arrays = {k: z[k] for k in z.files}
    probe = LinearProbe.from_arrays(arrays)
    summary: dict[str, Any] = {"uri": uri}
    for k in ("judge_heldout_accuracy", "fid_floor"):
        summary[k] = float(arrays[k])
    for k in ("judge_train_images", "judge_heldout_images", "fid_floor_images"):
        summary[k] = int(arrays[k])
    return probe, summary


def class_accuracy(judge_uri: str, sample_features: dict[str, Any]) -> float | None:
    """The judge's accuracy on a sample set (labels: the classes the samples were drawn for)."""
    labels = sample_features.get("labels")
    if labels is None or (np.asarray(labels) < 0).any():
        return None  # unconditional samples have no class to judge
    probe, _ = read_judge(judge_uri)
    return probe.accuracy(sample_features["pool"], labels)
