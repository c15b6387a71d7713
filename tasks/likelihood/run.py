"""The driver: cut the test set into shards, have a pool of Ray actors (one network each)
compute each shard's bounds, and write every finished shard at once.

``OUT/shards/bound_<i>.npz`` holds shard i's per-image bounds; ``OUT/manifest.json`` lists the
finished shards with their checksums (the sample sets' manifest, :mod:`tasks.sampling.files`),
so a rerun computes only the missing ones. When all are there, ``OUT/result.json`` holds the
set's bound: the mean over images of each image's bits/dim, and its per-timestep breakdown.
"""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np

from admflow import storage
from admflow.config import AdmConfig
from tasks.likelihood.spec import FORMAT, NllOptions, NllSpec
from tasks.likelihood.testset import TestSet
from tasks.sampling import files as sample_io


def shard_name(index: int) -> str:
    return f"bound_{index:06d}.npz"


def open_manifest(out: str, spec: NllSpec) -> dict:
    """The finished, verified shards of this same evaluation (or a new manifest)."""
    fp = spec.fingerprint()
    manifest = {
        "format": FORMAT,
        "fingerprint": fp,
        "num_images": spec.num_images,
        "shard_size": spec.shard_size,
        "num_shards": spec.num_shards,
        "complete": False,
        "shards": [],
    }
    uri = storage.join(out, "manifest.json")
    if not storage.exists(uri):
        return manifest
    old = storage.read_json(uri)
    if old.get("format") != FORMAT or old.get("fingerprint") != fp:
        raise storage.StorageError(
            f"{out} already holds another result ({old.get('format')}, fingerprint "
            f"{old.get('fingerprint')}; this one is {fp}); choose another --out or remove it"
        )
    manifest["shards"] = sample_io.verified_shards(out, old)
    return manifest


def record_shard(out: str, manifest: dict, index: int, result: dict[str, np.ndarray]) -> None:
    """Write the shard's file atomically, then list it (a listed shard always exists)."""
    buf = io.BytesIO()
    np.savez(
        buf, total_bpd=result["total_bpd"], prior_bpd=result["prior_bpd"], vb_sum=result["vb_sum"]
    )
    data = buf.getvalue()
    name = shard_name(index)
    storage.write_bytes(storage.join(out, "shards", name), data)
    entry = {
        "index": index,
        "name": name,
        "rows": len(result["total_bpd"]),
        "sha256": storage.sha256_bytes(data),
    }
    manifest["shards"] = [s for s in manifest["shards"] if s["index"] != index] + [entry]
    sample_io.write_manifest(out, manifest)


def read_shard(out: str, entry: dict) -> dict[str, np.ndarray]:
    data = storage.read_bytes(storage.join(out, "shards", entry["name"]))
    with np.load(io.BytesIO(data)) as z:
        return {k: z[k] for k in z.files}


def summarise(out: str, spec: NllSpec, manifest: dict) -> dict[str, Any]:
    """The set's bound from its shards: means over every image (shards weigh by their rows)."""
    parts = [read_shard(out, e) for e in sorted(manifest["shards"], key=lambda e: e["index"])]
    totals = np.concatenate([p["total_bpd"] for p in parts])
    priors = np.concatenate([p["prior_bpd"] for p in parts])
    vb_mean: np.ndarray = np.sum([p["vb_sum"] for p in parts], axis=0) / len(totals)
    return {
        "nll_bpd": float(totals.mean()),
        "nll_bpd_stderr": float(totals.std(ddof=1) / np.sqrt(len(totals)))
        if len(totals) > 1
        else None,
        "prior_bpd": float(priors.mean()),
        "num_images": int(len(totals)),
        "num_timesteps": int(len(vb_mean)),
        "vb_bpd_per_timestep": [float(v) for v in vb_mean],
        "fingerprint": manifest["fingerprint"],
    }


class _Worker:
    """The Ray actor: a :class:`tasks.likelihood.worker.ShardBound` that says where it runs."""

    def __init__(self, *args: Any):
        from tasks.likelihood.worker import ShardBound

        self.inner = ShardBound(*args)

    def info(self) -> dict[str, Any]:
        from tasks.runtime.ray_session import placement

        return {**self.inner.info(), **placement()}

    def bound(self, *args: Any) -> dict[str, np.ndarray]:
        return self.inner.bound(*args)


def _in_process(spec: NllSpec, test: TestSet, todo: list[int], options: NllOptions):
    from tasks.likelihood.worker import ShardBound

    weights = storage.read_bytes(spec.weights)
    worker = ShardBound(spec, options.device, options.torch_threads, weights)
    for index in todo:
        yield index, worker.bound(index, *test.rows(*spec.bounds(index)))


def _on_ray(cfg: AdmConfig, spec: NllSpec, test: TestSet, todo: list[int], options: NllOptions):
    """Shards to a pool of actors, placed like the sampling actors; a dead actor is replaced
    and its shard computed again."""
    from tasks.runtime.actor_pool import ActorSlots, each_result
    from tasks.runtime.ray_session import ensure_ray
    from tasks.sampling.pool import actor_options

    ray = ensure_ray(cfg, "sample")
    workers = max(1, min(options.workers, len(todo)))
    # read once by the driver, shared with every (replacement) actor through the object store
    args = (spec, options.device, options.torch_threads, ray.put(storage.read_bytes(spec.weights)))
    opts = actor_options(cfg, workers, "sample")
    pool = ActorSlots(_Worker, args, opts, workers, max_restarts=2 * workers + 2, what="likelihood")
    try:
        yield from each_result(
            pool, todo, lambda actor, i: actor.bound.remote(i, *test.rows(*spec.bounds(i)))
        )
    finally:
        pool.shutdown()


def describe(spec: NllSpec) -> dict[str, Any]:
    """The evaluation's settings, as result.json and MLflow params hold them."""
    return {
        "checkpoint": spec.checkpoint,
        "weights_sha256": spec.weights_sha256,
        "data": spec.data,
        "data_sha256": spec.data_sha256,
        "timesteps": spec.diffusion["steps"],
        "noise_schedule": spec.diffusion["noise_schedule"],
        "batch_size": spec.batch_size,
        "shard_size": spec.shard_size,
        "seed": spec.seed,
        "clip_denoised": spec.clip_denoised,
    }


def compute_bound(
    cfg: AdmConfig, spec: NllSpec, test: TestSet, out: str, options: NllOptions
) -> dict[str, Any]:
    """Every missing shard of ``spec`` (at most ``options.max_shards``), then the set's bound
    once all are there. Returns the progress and, when complete, the result."""
    from tqdm.auto import tqdm

    manifest = open_manifest(out, spec)
    done = {s["index"] for s in manifest["shards"]}
    todo = [i for i in range(spec.num_shards) if i not in done][: options.max_shards]
    stats: dict[str, Any] = {"shards_computed": 0, "shards_skipped": len(done)}
    bar = tqdm(
        total=spec.num_images,
        initial=sum(s["rows"] for s in manifest["shards"]),
        unit="img",
        desc=f"bound over {spec.diffusion['steps']} steps",
        disable=not options.progress,
    )
    start = time.perf_counter()
    try:
        if todo:
            shards = (
                _in_process(spec, test, todo, options)
                if options.workers == 0
                else _on_ray(cfg, spec, test, todo, options)
            )
            for index, result in shards:
                record_shard(out, manifest, index, result)
                stats["shards_computed"] += 1
                bar.update(len(result["total_bpd"]))
    finally:
        bar.close()
    stats["seconds"] = round(time.perf_counter() - start, 3)
    manifest["complete"] = len(manifest["shards"]) == spec.num_shards
    sample_io.write_manifest(out, manifest)
    result = {"uri": out, "complete": manifest["complete"], "num_shards": spec.num_shards, **stats}
    if manifest["complete"]:
        summary = {**summarise(out, spec, manifest), **describe(spec)}
        storage.write_json(storage.join(out, "result.json"), summary)
        result |= {k: v for k, v in summary.items() if k != "vb_bpd_per_timestep"}
    return result


def log_bound(cfg: AdmConfig, out: str, parent_run_id: str | None = None) -> str:
    """An MLflow run with the bound (metric ``nll_bpd``), its settings and result.json."""
    import mlflow

    from admflow.tracking import stage_run

    summary = storage.read_json(storage.join(out, "result.json"))
    tags = {"admflow.nll": out}
    with stage_run(cfg, "nll", parent_run_id, tags=tags, sections=("diffusion",)) as run:
        params = {k: v for k, v in summary.items() if k not in ("vb_bpd_per_timestep",)}
        mlflow.log_params({f"nll.{k}": str(v)[:500] for k, v in params.items() if "bpd" not in k})
        mlflow.log_metric("nll_bpd", summary["nll_bpd"])
        mlflow.log_metric("prior_bpd", summary["prior_bpd"])
        mlflow.log_dict(summary, "nll.json")
        return run.info.run_id
