"""Large-scale sampling on Ray: a sample set is cut into fixed-size shards, each sampled by
one of a pool of actors (one model replica each) and written atomically by the driver.

The driver records every finished shard in ``OUT/manifest.json`` right away, so a rerun
skips shards that exist with the recorded checksum; a shard whose actor dies is sampled
again by a replacement actor. Shard contents depend only on the set's spec and ``(seed, i)``
(see :mod:`tasks.sampling.worker`), so the set is byte-identical however it was scheduled.

Build the spec with :mod:`tasks.sampling.build`; ``sample_set`` and ``upsample_set`` take it
with the execution options.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from admflow import storage
from admflow.config import AdmConfig
from tasks.runtime.actor_pool import each_result
from tasks.runtime.ray_session import ensure_ray
from tasks.sampling import files as sample_io
from tasks.sampling.finish import finish
from tasks.sampling.manifest import open_manifest, record_shard
from tasks.sampling.pool import sampling_pool
from tasks.sampling.spec import (
    ExecutionOptions,
    NonFiniteSampleError,
    SampleSetSpec,
    draw_labels,
    sampler_spec,
)


@dataclass
class ShardJob:
    """One sample set to produce: its spec, where it goes and each shard's inputs."""

    out: str
    spec: SampleSetSpec
    labels_for: Callable[[int, int], np.ndarray]  # (shard index, rows) -> labels
    low_res_for: Callable[[int], np.ndarray] | None = None  # upsampling: base images

    def weights(self) -> dict[str, str | None]:
        clf = self.spec.classifier
        return {"model": self.spec.model.weights, "classifier": clf.weights if clf else None}


def run_job(cfg: AdmConfig, job: ShardJob, options: ExecutionOptions) -> dict[str, Any]:
    """Sample every missing shard of ``job`` (at most ``options.max_shards``); returns stats."""
    from tqdm.auto import tqdm

    spec = job.spec
    manifest = open_manifest(job.out, spec)
    done = {s["index"] for s in manifest["shards"]}
    todo = [i for i in range(spec.num_shards) if i not in done][: options.max_shards]
    stats: dict[str, Any] = {"shards_sampled": 0, "shards_skipped": len(done), "actor_restarts": 0}
    if not todo:
        sample_io.write_manifest(job.out, manifest)
        return {**stats, "manifest": manifest, "sampling_seconds": 0.0}
    stage = "upsample" if spec.kind == "upsample" else "sample"
    ensure_ray(cfg, stage)
    workers = max(1, min(options.workers, len(todo)))
    held = sampling_pool(sampler_spec(spec, options), job.weights(), cfg, workers, stage)
    pool, restarts_before, ok = held.pool, held.pool.restarts, False
    bar = tqdm(
        total=spec.num_samples,
        initial=sum(s["rows"] for s in manifest["shards"]),
        unit="img",
        desc=f"sampling {job.out.rsplit('/', 1)[-1]}",
        disable=not options.progress,
    )

    def call(actor: Any, i: int) -> Any:
        low = job.low_res_for(i) if job.low_res_for else None
        return actor.sample.remote(i, job.labels_for(i, spec.rows(i)), low)

    start = time.perf_counter()
    try:
        for index, (images, labels) in each_result(pool, todo, call):
            record_shard(job.out, spec, manifest, index, images, labels)
            stats["shards_sampled"] += 1
            bar.update(len(images))
        ok = True
    except NonFiniteSampleError as err:  # Ray's error wraps it; raise the cause alone
        raise NonFiniteSampleError(str(getattr(err, "cause", err))) from None
    finally:
        bar.close()
        held.release(ok)  # a pool that failed is never handed on
    stats["sampling_seconds"] = time.perf_counter() - start
    stats["actor_restarts"] = pool.restarts - restarts_before
    stats["actors"] = pool.info
    manifest["complete"] = len(manifest["shards"]) == manifest["num_shards"]
    sample_io.write_manifest(job.out, manifest)
    return {**stats, "manifest": manifest}


def sample_set(
    cfg: AdmConfig,
    spec: SampleSetSpec,
    out: str,
    options: ExecutionOptions | None = None,
    *,
    merge: bool = False,
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """Sample the base set ``spec`` (see :func:`tasks.sampling.build.build_spec`) into ``out``.

    Returns ``{"uri", "num_samples", "complete", "shards", "shards_sampled", ...}``;
    ``options.max_shards`` stops after that many new shards (a rerun continues).
    """
    if spec.kind != "base":
        raise ValueError(f"sample_set draws base sets; {spec.kind} sets go to upsample_set")
    options = options or ExecutionOptions.from_config(cfg)
    classes = list(spec.classes) if spec.classes else None
    job = ShardJob(out, spec, lambda i, rows: draw_labels(spec.seed, i, rows, classes))
    stats = run_job(cfg, job, options)
    return finish(cfg, spec, out, stats, extra={}, merge=merge, parent_run_id=parent_run_id)


class _BaseSet:
    """Upsample shard i's inputs: base images and labels [i*S, (i+1)*S), read shard by shard."""

    def __init__(self, base: str, manifest: dict, shard_size: int):
        self.base = base
        self.entries = sorted(manifest["shards"], key=lambda e: e["index"])
        self.starts = np.cumsum([0] + [e["rows"] for e in self.entries])
        self.shard_size = shard_size
        self._last: tuple[int, tuple[np.ndarray, np.ndarray]] | None = None

    def slice(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        # labels_for and low_res_for ask for the same shard one after the other: read it once
        if self._last is None or self._last[0] != index:
            self._last = (index, self._read(index))
        return self._last[1]

    def _read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        lo = index * self.shard_size
        hi = min(lo + self.shard_size, int(self.starts[-1]))
        images, labels = [], []
        for k, e in enumerate(self.entries):
            a, b = int(self.starts[k]), int(self.starts[k + 1])
            if b > lo and a < hi:
                imgs, labs = sample_io.read_shard(self.base, e["index"])
                images.append(imgs[max(lo - a, 0) : hi - a])
                labels.append(labs[max(lo - a, 0) : hi - a])
        return np.concatenate(images), np.concatenate(labels)

    def labels(self, index: int, rows: int) -> np.ndarray:
        return self.slice(index)[1][:rows]

    def images(self, index: int) -> np.ndarray:
        return self.slice(index)[0]


def upsample_set(
    cfg: AdmConfig,
    spec: SampleSetSpec,
    base: str,
    out: str,
    options: ExecutionOptions | None = None,
    *,
    merge: bool = False,
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """Second stage: the upsampler ``spec`` (see
    :func:`tasks.sampling.build.build_upsample_spec`) conditioned on every image of ``base``."""
    base_manifest = sample_io.read_manifest(base)
    if base_manifest is None or not base_manifest.get("complete"):
        raise storage.StorageError(f"{base}: no complete sample set to upsample")
    if spec.kind != "upsample" or base_manifest["fingerprint"] != spec.base_fingerprint:
        raise ValueError(f"{base} is not the base set this upsample spec was built for")
    options = options or ExecutionOptions.from_config(cfg)
    base_set = _BaseSet(base, base_manifest, spec.shard_size)
    job = ShardJob(out, spec, base_set.labels, base_set.images)
    stats = run_job(cfg, job, options)
    extra = {
        "classifier_scale": _base_scale(base),
        "base": base,
        "base_fingerprint": spec.base_fingerprint,
        "base_image_size": base_manifest["image_size"],
        "low_res_size": spec.network["small_size"],
    }
    return finish(cfg, spec, out, stats, extra=extra, merge=merge, parent_run_id=parent_run_id)


def _base_scale(base: str) -> float | None:
    uri = storage.join(base, "metadata.json")
    return storage.read_json(uri).get("classifier_scale") if storage.exists(uri) else None
