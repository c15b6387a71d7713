"""The demo's independent judge and its yardsticks.

* **Judge**: an ensemble of small CNNs (:mod:`models.judge`) trained on 80% of the labelled
  real images of the base model's data set, at its resolution, clean and degraded; its
  accuracy on the other 20% is reported so the reader knows how far to trust it, clean and
  softened step by step (the ladder in the summary). Each judged sample set gets its
  sharpness and the ladder's accuracy at that sharpness: how well the judge reads real
  images as soft as the samples. It never sees the guidance classifier nor a sample.
* **FID floor**: the FID between two disjoint halves of the real reference images, each as
  large as a sample set. FID is biased upwards at small N, so this is the best score a perfect
  model could get at the demo's sample count: the number to read every other FID against.

Both are stored under ``<root>/eval-cache/`` (``judge-<key>.pt`` with the weights,
``judge-<key>.json`` with the summary), computed once per data set, reference and sample count.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from admflow import storage
from admflow.config import AdmConfig
from models import metrics as M
from models.judge import (
    JudgeCNN,
    JudgeEnsemble,
    fit_judge,
    holdout_split,
    image_sharpness,
    judge_accuracy,
    judge_predict,
    match_softness,
    softening_ladder,
)
from tasks.resources import JUDGE_BATCH
from tasks.scoring.features import load_features
from tasks.scoring.inputs import Unit, describe, read_unit, read_unit_labels

JUDGE_VERSION = 4  # 3: an ensemble of JUDGE_MEMBERS networks; 4: trained on degraded copies too
JUDGE_MEMBERS = 4
JUDGE_MAX_IMAGES = 20_000  # a larger data set trains the judge on this many of its images


def _judge_uri(cfg: AdmConfig, data_uri: str, reference_features: str, num_samples: int) -> str:
    payload = (
        f"{JUDGE_VERSION}:{data_uri}:{reference_features}:{num_samples}:{cfg.evaluation.fid_method}"
    )
    key = hashlib.sha256(payload.encode()).hexdigest()[:24]
    return storage.join(cfg.storage.root, "eval-cache", f"judge-{key}")


def read_images(uri: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Images (uint8 NHWC) and labels (None if unlabelled) of a data or sample set; of a set
    larger than ``limit``, that many from units taken in a fixed random order (so that a
    class-sorted data set does not give only its first classes)."""
    units = describe(uri)["units"]
    total = sum(stop - start for _, _, start, stop in units)
    order = np.arange(len(units))
    if limit is not None and total > limit:
        order = np.random.default_rng(0).permutation(len(units))
    images, labels = [], []
    for x, y in _read_units([units[i] for i in order]):
        images.append(x)
        labels.append(y)
        if limit is not None and sum(len(i) for i in images) >= limit:
            break
    if not images:
        raise ValueError(f"{uri}: holds no images")
    x_all = np.concatenate(images)[:limit]
    if any(lab is None for lab in labels):
        return x_all, None
    return x_all, np.concatenate(labels)[:limit]  # type: ignore[arg-type]


def _read_units(units: list[Unit]) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """(images, labels) of each work unit in turn."""
    for unit in units:
        yield read_unit(unit), read_unit_labels(unit)


def build_judge(
    cfg: AdmConfig, data_uri: str, reference_features: str, num_samples: int
) -> dict[str, Any]:
    """Train the judge on ``data_uri`` and compute the FID floor of ``reference_features``."""

    uri = _judge_uri(cfg, data_uri, reference_features, num_samples)
    if storage.exists(uri + ".json"):
        return storage.read_json(uri + ".json")
    images, labels = read_images(data_uri, limit=JUDGE_MAX_IMAGES)
    if labels is None or (labels < 0).any():
        raise ValueError(
            f"{data_uri}: the images carry no class labels; the judge needs a labelled data set "
            "(data.class_cond: true)"
        )
    train, held = holdout_split(len(images), 0.2, seed=0)
    num_classes = int(cfg.model.num_classes or labels.max() + 1)
    model = fit_judge(  # in this process, as tasks.resources plans the judge stage
        images[train],
        labels[train],
        num_classes,
        members=JUDGE_MEMBERS,
        batch_size=JUDGE_BATCH,
        seed=cfg.training.seed,
    )
    summary = {
        "uri": uri,
        "judge_heldout_accuracy": judge_accuracy(model, images[held], labels[held]),
        "judge_softening": softening_ladder(model, images[held], labels[held]),
        "judge_train_images": int(len(train)),
        "judge_heldout_images": int(len(held)),
        "judge_image_size": int(model.image_size),
        "judge_members": len(model.members),
        "num_classes": num_classes,
        **reference_floor(cfg, reference_features, num_samples),
    }
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    storage.write_bytes(uri + ".pt", buf.getvalue())
    storage.write_json(uri + ".json", summary)  # last: its presence means the judge is complete
    return summary


def reference_floor(cfg: AdmConfig, reference_features: str, num_samples: int) -> dict[str, Any]:
    """The FID between two disjoint halves of the reference images, ``num_samples`` each
    (fewer if the reference holds fewer than twice that)."""
    pool = np.asarray(load_features(reference_features)["pool"], np.float64)
    method = cfg.evaluation.fid_method
    half = min(num_samples, len(pool) // 2)
    order = np.random.default_rng(1).permutation(len(pool))
    a, b = pool[order[:half]], pool[order[half : 2 * half]]
    fid = M.frechet_distance_to_features(*M.feature_statistics(a), b, method=method)
    return {"fid_floor": float(fid), "fid_floor_images": int(half)}


def read_judge(uri: str) -> tuple[JudgeEnsemble, dict[str, Any]]:
    summary = storage.read_json(uri + ".json")
    members = int(summary.get("judge_members", 1))
    size, classes = summary["judge_image_size"], summary["num_classes"]
    model = JudgeEnsemble([JudgeCNN(classes, size) for _ in range(members)])
    state = torch.load(io.BytesIO(storage.read_bytes(uri + ".pt")), weights_only=True)
    model.load_state_dict(state)
    return model.eval(), summary


def judged_set(samples_uri: str) -> str:
    """The set the judge reads for ``samples_uri``: a bilinear upscale (tasks.sampling.bilinear) is
    judged on the base set it was made from: upscaling adds nothing the judge could use, and
    reducing it back to the judge's size blurs every edge (docs/trade-offs.md)."""
    meta_uri = storage.join(samples_uri, "metadata.json")
    if not storage.exists(meta_uri):
        return samples_uri
    meta = storage.read_json(meta_uri)
    return str(meta["base"]) if meta.get("kind") == "bilinear" and meta.get("base") else samples_uri


def class_accuracy(judge_uri: str, samples_uri: str) -> float | None:
    """The judge's accuracy on a sample set (labels: the classes the samples were drawn for)."""
    return judge_reading(judge_uri, samples_uri)["class_accuracy"]


def judge_reading(judge_uri: str, samples_uri: str) -> dict[str, Any]:
    """``class_accuracy`` of a sample set (None for unconditional samples), its mean
    ``sharpness`` as the judge sees it, and ``softened_real_accuracy``: the judge's accuracy
    on held-out real images softened to that sharpness (``softened_real``: how, from
    :func:`models.judge.match_softness`). Read one unit at a time, so a 50K-image set never
    sits in memory at once."""
    model, summary = read_judge(judge_uri)
    hits = total = 0
    sharp = 0.0
    unlabelled = False
    for images, labels in _read_units(describe(judged_set(samples_uri))["units"]):
        sharp += float(image_sharpness(images, model.image_size).sum())
        total += len(images)
        if labels is None or (labels < 0).any():
            unlabelled = True  # unconditional samples have no class to judge
        else:
            hits += int((judge_predict(model, images) == labels).sum())
    if not total:
        return {"class_accuracy": None}
    out: dict[str, Any] = {
        "class_accuracy": None if unlabelled else hits / total,
        "sharpness": sharp / total,
    }
    if summary.get("judge_softening"):
        matched = match_softness(summary["judge_softening"], out["sharpness"])
        out["softened_real_accuracy"] = matched["accuracy"]
        out["softened_real"] = matched
    return out
