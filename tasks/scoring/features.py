"""Inception features of any image input, on Ray actors, cached as feature files.

Features of every image input are cached in object storage under a content hash
(``<storage.root>/eval-cache/<hash>.npz``, a feature file), so a reference or a sample set is
pushed through Inception once. A sharded data set becomes a reference: statistics over all of
its images and features of ``evaluation.reference_images`` of them (a fixed random subset) for
precision/recall.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
from collections.abc import Iterator
from itertools import pairwise
from typing import Any, cast

import numpy as np
import torch

from admflow import storage
from admflow.config import AdmConfig
from admflow.version import code_version
from models import inception as inc
from models import metrics as M
from tasks.scoring.inputs import (
    STAT_KEYS,
    EvaluationInputError,
    Unit,
    describe,
    read_unit,
    read_unit_labels,
)

log = logging.getLogger(__name__)
CACHE_VERSION = 2  # 2: feature files carry the images' class labels
FEATURE_SHAPES = {"pool": inc.POOL_DIM, "spatial": inc.SPATIAL_DIM, "logits": inc.NUM_LOGITS,
                  "softmax": inc.NUM_LOGITS}  # fmt: skip


# ---------------------------------------------------------------------- feature files


def save_features(uri: str, feats: dict[str, Any]) -> None:
    buf = io.BytesIO()
    cast(Any, np.savez)(buf, **{k: np.asarray(v) for k, v in feats.items() if v is not None})
    storage.write_bytes(uri, buf.getvalue())


def load_features(uri: str) -> dict[str, Any]:
    """A feature file as a dict of arrays (shapes checked)."""
    with np.load(io.BytesIO(storage.read_bytes(uri))) as z:
        feats = {k: z[k] for k in z.files}
    for key, dim in FEATURE_SHAPES.items():
        if key in feats and (feats[key].ndim != 2 or feats[key].shape[1] != dim):
            raise EvaluationInputError(
                f"{uri}: {key} must be [N, {dim}], got shape {feats[key].shape}"
            )
    if "spatial" not in feats and "mu_s" not in feats:
        raise EvaluationInputError(f"{uri}: feature file lacks spatial features (sFID)")
    return feats


# --------------------------------------------------------------------------- extraction


def resolve_device(requested: str) -> str:
    """``compute.device`` where Inception runs: resolved in the process that runs it (an
    actor on a GPU node, not a CPU-only driver), ``auto`` meaning CUDA where there is one."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


@contextlib.contextmanager
def _full_fp32() -> Iterator[None]:
    """TF32 off while features are extracted: the reference evaluator's Inception is fp32,
    and cuDNN's TF32 convolutions (on by default) drift from it."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _weights_source(path: str | None) -> str | bytes | None:
    if path is None:
        return None
    return storage.read_bytes(path) if storage.is_remote(path) else storage.local_path(path)


class FeatureWorker:
    """One Inception network; turns work units into features (used locally or as an actor)."""

    def __init__(self, inception: str | None, batch_size: int, device: str, threads: int = 0):
        if threads:
            torch.set_num_threads(threads)
        self.device = resolve_device(device)
        self.model = inc.load_inception(_weights_source(inception), self.device)
        self.batch_size = batch_size

    def info(self) -> dict[str, Any]:
        """The device it runs on and, as a Ray actor, where Ray placed it."""
        from tasks.runtime.ray_session import placement

        return {"device": self.device, "threads": torch.get_num_threads(), **placement()}

    def run(
        self, index: int, unit: Unit, rows: np.ndarray | None = None
    ) -> tuple[int, dict[str, np.ndarray]]:
        """Features of a unit's images (of its ``rows`` only, when given)."""
        images, labels = read_unit(unit), read_unit_labels(unit)
        if rows is not None:
            images = images[rows]
            labels = labels[rows] if labels is not None and len(labels) else labels
        if not len(images):
            return index, {}
        bs = self.batch_size
        with _full_fp32():
            parts = [self.model.features(images[i : i + bs]) for i in range(0, len(images), bs)]
        feats = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        feats["image_hw"] = np.asarray(images.shape[1:3])
        if labels is not None and len(labels) == len(images):
            feats["labels"] = labels  # for the class-accuracy judge (tasks.scoring.judge)
        return index, feats


def stream_features(
    cfg: AdmConfig,
    units: list[Unit],
    workers: int,
    inception: str | None,
    rows: list[np.ndarray] | None = None,
    stage: str = "score",
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Features of each unit as ``(unit index, feats)``, in completion order (of ``rows[i]``
    of unit ``i`` only, when given). ``workers`` 0 runs in this process; otherwise one
    Inception per Ray actor of ``stage`` (``reference`` or ``score``), placed as
    :mod:`tasks.resources` plans it, fed unit by unit."""
    args = (inception, cfg.evaluation.batch_size, cfg.compute.device, cfg.compute.torch_threads)
    work = [(i, u, rows[i] if rows is not None else None) for i, u in enumerate(units)]
    if workers <= 0:
        worker = FeatureWorker(*args)
        for item in work:
            yield worker.run(*item)
        return
    from ray.util import ActorPool

    from tasks.resources import Cluster, actors
    from tasks.runtime import warm
    from tasks.runtime.ray_session import ensure_ray

    ray = ensure_ray(cfg, stage)
    n = max(1, min(workers, len(units)))
    options = actors(cfg, Cluster.from_ray(ray, cfg), stage, n).ray_options()

    def start() -> list[Any]:
        actor_cls = ray.remote(**options)(FeatureWorker)
        started = [actor_cls.remote(*args) for _ in range(n)]
        log.info("%s: Inception actors %s", stage, ray.get([a.info.remote() for a in started]))
        return started

    def end(started: list[Any]) -> None:
        for a in started:
            ray.kill(a)

    # inside tasks.runtime.warm.keep_warm the same Inceptions score set after set
    key = ("inception", stage, n, repr(sorted(options.items())), args)
    held = warm.lease(key, start, end)
    ok = False
    try:
        yield from ActorPool(held.pool).map_unordered(lambda a, v: a.run.remote(*v), work)
        ok = True
    finally:
        held.release(ok)


def _gather(cfg: AdmConfig, info: dict, workers: int, inception: str | None) -> dict[str, Any]:
    """All features of an image input, in input order."""
    parts: dict[int, dict[str, np.ndarray]] = {}
    for index, feats in stream_features(cfg, info["units"], workers, inception):
        parts[index] = feats
    ordered = [parts[i] for i in range(len(info["units"])) if parts[i]]
    _check_sizes(info, [tuple(p.pop("image_hw")) for p in ordered])
    out: dict[str, Any] = {k: np.concatenate([p[k] for p in ordered]) for k in ordered[0]}
    if info.get("has_stats"):  # the paper's reference batches carry statistics over all data
        with np.load(io.BytesIO(storage.read_bytes(info["uri"]))) as z:
            out.update({k: z[k] for k in STAT_KEYS})
    return out


def _check_sizes(info: dict, sizes: list[tuple]) -> None:
    if not sizes:
        raise EvaluationInputError(f"{info['uri']}: holds no images")
    if len(set(sizes)) > 1:
        raise EvaluationInputError(f"{info['uri']}: images of different sizes {sorted(set(sizes))}")
    info["image_size"] = int(sizes[0][0])


def _gather_reference(
    cfg: AdmConfig, info: dict, workers: int, inception: str | None
) -> dict[str, Any]:
    """Statistics over every image of a data set (``evaluation.reference_statistics: all``) or
    over the kept subset only (``kept``: only those pass through Inception); features of a
    fixed random subset of ``evaluation.reference_images``."""
    n = int(info["num_images"])
    keep = min(cfg.evaluation.reference_images, n)
    chosen = np.sort(np.random.default_rng(0).choice(n, size=keep, replace=False))
    starts = np.cumsum([0] + [u[3] - u[2] for u in info["units"]])
    kept_rows = [chosen[(chosen >= lo) & (chosen < hi)] - lo for lo, hi in pairwise(starts)]
    only_kept = cfg.evaluation.reference_statistics == "kept"
    pool_stats, spatial_stats = (
        M.RunningStatistics(inc.POOL_DIM),
        M.RunningStatistics(inc.SPATIAL_DIM),
    )
    kept: dict[int, dict[str, np.ndarray]] = {}
    sizes = []
    subset = kept_rows if only_kept else None
    stream = stream_features(cfg, info["units"], workers, inception, subset, stage="reference")
    for index, feats in stream:
        if not feats:
            continue
        sizes.append(tuple(feats.pop("image_hw")))
        pool_stats.update(feats["pool"])
        spatial_stats.update(feats["spatial"])
        rows = slice(None) if only_kept else kept_rows[index]
        kept[index] = {k: v[rows] for k, v in feats.items()}
    _check_sizes(info, sizes)
    out: dict[str, Any] = {
        k: np.concatenate([kept[i][k] for i in sorted(kept)]) for k in kept[min(kept)]
    }
    out["mu"], out["sigma"] = pool_stats.result()
    out["mu_s"], out["sigma_s"] = spatial_stats.result()
    return out


def _cache_key(cfg: AdmConfig, info: dict, inception: str | None) -> str:
    weights = (
        f"default:{inc.DEFAULT_SHA1}" if inception is None else storage.content_hash(inception)
    )
    payload = {"v": CACHE_VERSION, "kind": info["kind"], "id": info["identity"], "w": weights}
    payload["code"] = code_version()  # the Inception port and feature code live in models/
    if info["kind"] == "shards":
        payload["keep"] = cfg.evaluation.reference_images
        payload["stats"] = cfg.evaluation.reference_statistics
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def features_for(
    cfg: AdmConfig,
    uri: str,
    workers: int | None = None,
    inception: str | None = None,
    use_cache: bool = True,
) -> tuple[dict[str, Any], str]:
    """Features (and statistics where known) of any input; returns ``(feats, feature_uri)``."""
    info = describe(uri)
    if info["kind"] == "features":
        return load_features(uri), uri
    inception = inception or cfg.evaluation.inception_weights
    workers = cfg.evaluation.workers if workers is None else workers
    cache_uri = storage.join(
        cfg.storage.root, "eval-cache", f"{_cache_key(cfg, info, inception)}.npz"
    )
    if use_cache and storage.exists(cache_uri):
        log.info("features of %s from cache %s", uri, cache_uri)
        return load_features(cache_uri), cache_uri
    gather = _gather_reference if info["kind"] == "shards" else _gather
    feats = gather(cfg, info, workers, inception)
    feats["image_size"] = np.asarray(info["image_size"])
    feats["num_images"] = np.asarray(info["num_images"])
    save_features(cache_uri, feats)
    return feats, cache_uri


def build_reference(cfg: AdmConfig, data_uri: str, workers: int | None = None) -> str:
    """Reference statistics + P/R features of a sharded data set; returns the feature file URI."""
    return features_for(cfg, data_uri, workers)[1]
