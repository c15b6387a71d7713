"""Large-scale sampling on Ray: a sample set is cut into fixed-size shards, each sampled by
one of a pool of actors (one model replica each) and written atomically by the driver.

The driver records every finished shard in ``OUT/manifest.json`` right away, so a rerun
skips shards that exist with the recorded checksum; a shard whose actor dies is sampled
again by a replacement actor. Shard contents depend only on the config and ``(seed, i)``
(see :mod:`tasks.sampling.worker`), so the set is byte-identical however it was scheduled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from admflow import storage
from admflow.config import AdmConfig, ConfigError
from tasks.runtime.ray_session import ensure_ray
from tasks.sampling import files as sample_io
from tasks.sampling.spec import LATER_DEFAULTS, NonFiniteSampleError, SamplerSpec, draw_labels
from tasks.sampling.weights import ResolvedCheckpoint, resolve_checkpoint

log = logging.getLogger(__name__)

ACTOR_PREFIX = "admflow-sample"


@dataclass
class ShardJob:
    """One sample set to produce: what every shard needs, and where it goes."""

    out: str
    num_samples: int
    shard_size: int
    image_size: int
    spec: SamplerSpec
    weights: dict[str, str | None]  # "model" / "classifier" state-dict file URIs
    labels_for: Callable[[int, int], np.ndarray]  # (shard index, rows) -> labels
    low_res_for: Callable[[int], np.ndarray] | None = None  # upsampling: base images
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def rows(self, index: int) -> int:
        return min(self.shard_size, self.num_samples - index * self.shard_size)

    def fingerprint(self) -> str:
        """Identity of the set's contents: changes iff some image would change."""
        spec = {
            k: v
            for k, v in asdict(self.spec).items()
            if k not in ("torch_threads", "device")
            and not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k])
        }
        keep = ("weights_sha256", "classifier_sha256", "classes", "base_fingerprint")
        payload = {
            "spec": spec,
            "num_samples": self.num_samples,
            "shard_size": self.shard_size,
            **{k: self.metadata.get(k) for k in keep},
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


# ---------------------------------------------------------------------------- Ray plumbing


def _actor_options(cfg: AdmConfig, workers: int) -> dict[str, Any]:
    """Resources per actor. CPUs are capped at an even share of the cluster so that the pool
    (and anything else, e.g. Ray Data read tasks) can always be scheduled."""
    import ray

    total = ray.cluster_resources()
    cpus = min(cfg.compute.cpus_per_worker, max(total.get("CPU", 1.0), 0.01) / workers)
    opts: dict[str, Any] = {"num_cpus": round(cpus, 4), "max_restarts": 0}
    if cfg.compute.use_gpu and total.get("GPU", 0) > 0:
        opts["num_gpus"] = min(1.0, total["GPU"] / workers)
    return opts


class _ActorPool:
    """Actor slots that are refilled with a new actor when one dies."""

    def __init__(self, job: ShardJob, options: dict[str, Any], workers: int, max_restarts: int):
        import ray

        from tasks.sampling.worker import ShardSampler

        self.ray = ray
        self.cls = ray.remote(ShardSampler)
        self.options = options
        # Read once by the driver, shared with every (replacement) actor via the object store.
        self.refs = {
            k: ray.put(storage.read_bytes(v)) if v else None for k, v in job.weights.items()
        }
        self.spec = job.spec
        self.token = uuid.uuid4().hex[:8]
        self.restarts = 0
        self.max_restarts = max_restarts
        self.actors = [self._new(slot) for slot in range(workers)]
        # Fail fast (and clearly) on a checkpoint that does not fit, before any shard runs.
        self.info = ray.get([a.info.remote() for a in self.actors])

    def _new(self, slot: int) -> Any:
        name = f"{ACTOR_PREFIX}-{self.token}-{slot}-{self.restarts}"
        return self.cls.options(name=name, **self.options).remote(
            self.spec, self.refs["model"], self.refs.get("classifier")
        )

    def replace(self, slot: int, err: Exception) -> None:
        self.restarts += 1
        if self.restarts > self.max_restarts:
            raise RuntimeError(f"sampling actors died {self.restarts} times; last: {err}") from err
        log.warning("sampling actor %d died (%s); starting a replacement", slot, type(err).__name__)
        self.ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self._new(slot)

    def shutdown(self) -> None:
        for a in self.actors:
            self.ray.kill(a, no_restart=True)


def _open_manifest(job: ShardJob) -> dict:
    """The manifest to continue: finished, verified shards of this same set (or a new one)."""
    fp = job.fingerprint()
    old = sample_io.read_manifest(job.out)
    manifest = sample_io.new_manifest(job.num_samples, job.image_size, job.shard_size, fp)
    if old is None:
        return manifest
    if old.get("fingerprint") != fp:
        raise storage.StorageError(
            f"{job.out} already holds a different sample set (fingerprint {old.get('fingerprint')},"
            f" this one is {fp}); choose another --out or remove it"
        )
    manifest["shards"] = sample_io.verified_shards(job.out, old)
    manifest["complete"] = len(manifest["shards"]) == manifest["num_shards"]
    return manifest


def _record(job: ShardJob, manifest: dict, index: int, images: np.ndarray, labels: np.ndarray):
    if len(images) != job.rows(index) or images.shape[1] != job.image_size:
        raise RuntimeError(f"shard {index}: got images {images.shape}, expected {job.rows(index)}")
    data = sample_io.encode_npz(images, labels)
    storage.write_bytes(sample_io.shard_uri(job.out, index), data)
    entry = {
        "index": index,
        "name": sample_io.shard_name(index),
        "rows": len(images),
        "sha256": storage.sha256_bytes(data),
    }
    manifest["shards"] = [s for s in manifest["shards"] if s["index"] != index] + [entry]
    sample_io.write_manifest(job.out, manifest)


def run_job(
    cfg: AdmConfig,
    job: ShardJob,
    *,
    workers: int | None = None,
    max_shards: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Sample every missing shard of ``job`` (at most ``max_shards`` of them); returns stats."""
    from ray.exceptions import RayActorError
    from tqdm.auto import tqdm

    manifest = _open_manifest(job)
    done = {s["index"] for s in manifest["shards"]}
    todo = [i for i in range(job.num_shards) if i not in done][:max_shards]
    stats: dict[str, Any] = {"shards_sampled": 0, "shards_skipped": len(done), "actor_restarts": 0}
    if not todo:
        sample_io.write_manifest(job.out, manifest)
        return {**stats, "manifest": manifest, "sampling_seconds": 0.0}
    ray = ensure_ray(cfg)
    workers = max(1, min(workers or cfg.sampling.workers, len(todo)))
    pool = _ActorPool(job, _actor_options(cfg, workers), workers, max_restarts=2 * workers + 2)
    pending: deque[int] = deque(todo)
    inflight: dict[Any, tuple[int, int]] = {}
    bar = tqdm(
        total=job.num_samples,
        initial=sum(s["rows"] for s in manifest["shards"]),
        unit="img",
        desc=f"sampling {job.out.rsplit('/', 1)[-1]}",
        disable=not progress,
    )

    def submit(slot: int) -> None:
        if pending:
            i = pending.popleft()
            low = job.low_res_for(i) if job.low_res_for else None
            ref = pool.actors[slot].sample.remote(i, job.labels_for(i, job.rows(i)), low)
            inflight[ref] = (slot, i)

    start = time.perf_counter()
    try:
        for slot in range(workers):
            submit(slot)
        while inflight:
            [ref], _ = ray.wait(list(inflight), num_returns=1)
            slot, index = inflight.pop(ref)
            try:
                images, labels = ray.get(ref)
            except NonFiniteSampleError as err:  # Ray's error wraps it; raise the cause alone
                raise NonFiniteSampleError(str(getattr(err, "cause", err))) from None
            except RayActorError as err:
                pool.replace(slot, err)
                pending.appendleft(index)
                submit(slot)
                continue
            _record(job, manifest, index, images, labels)
            stats["shards_sampled"] += 1
            bar.update(len(images))
            submit(slot)
    finally:
        bar.close()
        pool.shutdown()
    stats["sampling_seconds"] = time.perf_counter() - start
    stats["actor_restarts"] = pool.restarts
    stats["actors"] = pool.info
    manifest["complete"] = len(manifest["shards"]) == manifest["num_shards"]
    sample_io.write_manifest(job.out, manifest)
    return {**stats, "manifest": manifest}


# ---------------------------------------------------------------------------- finishing a set


def _finish(
    cfg: AdmConfig,
    job: ShardJob,
    stats: dict[str, Any],
    *,
    merge: bool,
    parent_run_id: str | None,
    stage: str,
) -> dict[str, Any]:
    manifest = stats.pop("manifest")
    result: dict[str, Any] = {
        "uri": job.out,
        "num_samples": job.num_samples,
        "complete": manifest["complete"],
        "shards": len(manifest["shards"]),
        "workers": len(stats.get("actors", [])),
        **{k: v for k, v in stats.items() if k != "actors"},
    }
    if not manifest["complete"]:
        return result
    sampled = stats["shards_sampled"] * job.shard_size
    secs = stats["sampling_seconds"]
    metadata = {
        **job.metadata,
        "N": job.num_samples,
        "num_samples": job.num_samples,
        "image_size": job.image_size,
        "shard_size": job.shard_size,
        "fingerprint": manifest["fingerprint"],
        "images_per_second_last_run": round(min(sampled, job.num_samples) / secs, 3)
        if secs
        else None,
    }
    storage.write_json(storage.join(job.out, "metadata.json"), metadata)
    result["grid"] = sample_io.write_grid(job.out, manifest)
    if merge:
        result["merged"] = sample_io.merge_set(job.out)
    if parent_run_id:
        result["mlflow_run_id"] = _log_mlflow(cfg, job.out, metadata, parent_run_id, stage)
    return result


def _log_mlflow(cfg: AdmConfig, out: str, metadata: dict, parent_run_id: str, stage: str) -> str:
    import os
    import tempfile

    import mlflow

    from admflow.tracking import stage_run

    with stage_run(
        cfg, stage, parent_run_id, tags={"admflow.samples": out}, sections=("sampling",)
    ):
        params = {f"set.{k}": str(v)[:500] for k, v in metadata.items() if v is not None}
        mlflow.log_params(params)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "grid.png")
            with open(path, "wb") as f:
                f.write(storage.read_bytes(storage.join(out, "grid.png")))
            mlflow.log_artifact(path)
        return mlflow.active_run().info.run_id


# ---------------------------------------------------------------------------- public API


def _classes(cfg: AdmConfig, net_classes: int | None, classes: list[int] | None, guided: bool):
    if classes:
        return [int(c) for c in classes]
    n = net_classes or (cfg.classifier.num_classes if guided else None)
    return list(range(n)) if n else None


def _section_json(ckpt: ResolvedCheckpoint, cfg: AdmConfig, name: str) -> dict:
    """A config section from the checkpoint's own training config when it has one."""
    source = ckpt.config or cfg
    mine, theirs = getattr(cfg, name), getattr(source, name)
    if ckpt.config is not None and mine != theirs:
        log.info("using the %s section stored with %s (differs from the preset)", name, ckpt.source)
    return theirs.model_dump(mode="json")


def sample_set(
    cfg: AdmConfig,
    checkpoint: str,
    out: str,
    *,
    classifier: str | None = None,
    classifier_scale: float = 0.0,
    num_samples: int | None = None,
    sampler: str | None = None,
    steps: str | None = None,
    eta: float | None = None,
    classes: list[int] | None = None,
    use_ema: bool | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    seed: int | None = None,
    merge: bool = False,
    max_shards: int | None = None,
    progress: bool = True,
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """Sample ``num_samples`` images (default ``cfg.sampling.num_samples``) into ``out``.

    Returns ``{"uri", "num_samples", "complete", "shards", "shards_sampled", ...}``;
    ``max_shards`` stops after that many new shards (a rerun continues).
    """
    s = cfg.sampling
    use_ema = s.use_ema if use_ema is None else use_ema
    classes = s.classes if classes is None else classes
    if not s.guided(classifier_scale, classifier is not None):
        classifier, classifier_scale = None, 0.0
    ckpt = resolve_checkpoint(checkpoint, use_ema, cfg.training.ema_rate)
    network = _section_json(ckpt, cfg, "model")
    # the noisy classifier trains without an EMA (as in ADM): its raw weights are the model
    clf = resolve_checkpoint(classifier, use_ema=False) if classifier else None
    spec = SamplerSpec(
        kind="base",
        network=network,
        diffusion=_section_json(ckpt, cfg, "diffusion"),
        sampler=sampler or s.sampler,
        respacing=s.timestep_respacing if steps is None else steps,
        eta=s.eta if eta is None else eta,
        clip_denoised=s.clip_denoised,
        seed=s.seed if seed is None else seed,
        batch_size=batch_size or s.batch_size,
        torch_threads=cfg.compute.torch_threads,
        compile=s.compile,
        device=cfg.compute.device,
        classifier=_section_json(clf, cfg, "classifier") if clf else None,
        classifier_scale=float(classifier_scale),
        solver_steps=s.solver_steps,
        step_schedule=s.step_schedule,
        cfg_scale=s.free_scale(),
    )
    if spec.cfg_scale and not network.get("null_class"):
        raise ConfigError(
            f"sampling.guidance=free: {checkpoint} has no null class (it was trained without "
            "label dropout); use sampling.guidance=classifier or none"
        )
    label_set = _classes(cfg, network["num_classes"], classes, clf is not None)
    job = ShardJob(
        out=out,
        num_samples=num_samples or s.num_samples,
        shard_size=s.shard_size,
        image_size=network["image_size"],
        spec=spec,
        weights={"model": ckpt.weights, "classifier": clf.weights if clf else None},
        labels_for=lambda i, rows: draw_labels(spec.seed, i, rows, label_set),
        metadata={
            "kind": "base",
            "sampler": spec.sampler,
            "steps": spec.respacing or str(spec.diffusion["steps"]),
            "eta": spec.eta,
            "classifier_scale": spec.classifier_scale,
            "guidance": s.guidance,
            "cfg_scale": spec.cfg_scale,
            "checkpoint": checkpoint,
            "weights": ckpt.weights,
            "checkpoint_step": ckpt.step,
            "weights_sha256": storage.content_hash(ckpt.weights),
            "classifier": classifier,
            "classifier_weights": clf.weights if clf else None,
            "classifier_sha256": storage.content_hash(clf.weights) if clf else None,
            "seed": spec.seed,
            "use_ema": use_ema,
            "batch_size": spec.batch_size,
            "classes": classes,
        },
    )
    stats = run_job(cfg, job, workers=workers, max_shards=max_shards, progress=progress)
    return _finish(cfg, job, stats, merge=merge, parent_run_id=parent_run_id, stage="sample")


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
    base: str,
    checkpoint: str,
    out: str,
    *,
    sampler: str | None = None,
    steps: str | None = None,
    eta: float | None = None,
    use_ema: bool | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    seed: int | None = None,
    merge: bool = False,
    max_shards: int | None = None,
    progress: bool = True,
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """Second stage: the upsampler conditioned on every image of the base set ``base``."""
    s = cfg.sampling
    base_manifest = sample_io.read_manifest(base)
    if base_manifest is None or not base_manifest.get("complete"):
        raise storage.StorageError(f"{base}: no complete sample set to upsample")
    use_ema = s.use_ema if use_ema is None else use_ema
    ckpt = resolve_checkpoint(checkpoint, use_ema, cfg.training.ema_rate)
    up = (ckpt.config or cfg).upsampler
    spec = SamplerSpec(
        kind="upsample",
        network=up.model_dump(mode="json"),
        diffusion=up.diffusion.model_dump(mode="json"),
        sampler=sampler or s.sampler,
        respacing=(s.upsample_respacing or s.timestep_respacing) if steps is None else steps,
        eta=s.eta if eta is None else eta,
        clip_denoised=s.clip_denoised,
        seed=s.seed if seed is None else seed,
        batch_size=batch_size or s.batch_size,
        torch_threads=cfg.compute.torch_threads,
        compile=s.compile,
        device=cfg.compute.device,
        solver_steps=s.solver_steps,
        step_schedule=s.step_schedule,
    )
    n = base_manifest["num_samples"]
    base_set = _BaseSet(base, base_manifest, s.shard_size)
    job = ShardJob(
        out=out,
        num_samples=n,
        shard_size=s.shard_size,
        image_size=up.unet.image_size,
        spec=spec,
        weights={"model": ckpt.weights},
        labels_for=base_set.labels,
        low_res_for=base_set.images,
        metadata={
            "kind": "upsample",
            "sampler": spec.sampler,
            "steps": spec.respacing or str(spec.diffusion["steps"]),
            "eta": spec.eta,
            "classifier_scale": _base_scale(base),
            "checkpoint": checkpoint,
            "weights": ckpt.weights,
            "checkpoint_step": ckpt.step,
            "weights_sha256": storage.content_hash(ckpt.weights),
            "seed": spec.seed,
            "use_ema": use_ema,
            "batch_size": spec.batch_size,
            "base": base,
            "base_fingerprint": base_manifest.get("fingerprint"),
            "base_image_size": base_manifest["image_size"],
            "low_res_size": up.small_size,
        },
    )
    stats = run_job(cfg, job, workers=workers, max_shards=max_shards, progress=progress)
    return _finish(cfg, job, stats, merge=merge, parent_run_id=parent_run_id, stage="upsample")


def _base_scale(base: str) -> float | None:
    uri = storage.join(base, "metadata.json")
    return storage.read_json(uri).get("classifier_scale") if storage.exists(uri) else None
