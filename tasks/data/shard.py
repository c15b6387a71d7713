"""Sharding: a source (:mod:`tasks.data.sources`) into Parquet shards plus ``manifest.json``.

The shard plan (which source items go to which shard) is fixed up front from the sorted
source listing, so shard contents never depend on Ray scheduling; each shard is built by
one Ray task that decodes, preprocesses and PNG-encodes its rows and writes the Parquet
file atomically, then a small ``.json`` sidecar with its row count, checksum, class counts
and skipped items. A rerun skips every shard whose sidecar and file agree, so only missing
or damaged shards are rebuilt. The manifest is written last.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from admflow import storage
from admflow.config import AdmConfig
from tasks.data.cifar import CifarRows
from tasks.data.manifest import FORMAT, build_manifest
from tasks.data.preprocess import PREPROCESSING, center_crop, encode_png
from tasks.data.sources import ShardError, Source, list_source, open_npz

__all__ = ["ShardError", "build_shard", "center_crop", "encode_png", "shard_dataset"]


def _load_item(source: Source, index: int, size: int, npz: Any) -> np.ndarray:
    if source.kind == "demo":
        from tasks.data.demo import parse_key, render

        label, i = parse_key(source.keys[index])
        return center_crop(Image.fromarray(render(label, i, size)), size)
    if npz is not None:
        return center_crop(Image.fromarray(np.asarray(npz[index])), size)
    uri = storage.join(source.uri, source.keys[index])
    # Workers read objects directly (their node's storage credentials), not via the driver.
    fp = io.BytesIO(storage.read_bytes(uri)) if storage.is_remote(uri) else uri
    try:
        with Image.open(fp) as im:
            im.load()  # decode fully now, so truncated files fail here
            return center_crop(im, size)
    except UnidentifiedImageError:  # name the key, not a path or an in-memory buffer
        raise UnidentifiedImageError(f"not an image: {source.keys[index]}") from None


def build_shard(source: Source, indices: list[int], size: int) -> tuple[bytes, dict[str, Any]]:
    """Decode, preprocess and encode the rows of one shard: its Parquet bytes and record.

    Workers return bytes and the driver writes them, so at most the in-flight shards are in
    memory; a source on object storage is read by the workers themselves, with their
    node's credentials, so its bytes never pass through the driver."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    images, labels, keys, skipped = [], [], [], []
    npz: Any = None  # rows by index: an .npz batch's or CIFAR-10's
    if source.kind == "npz":
        npz = open_npz(source.uri, labels=False)[0]
    elif source.kind == "cifar10":
        npz = CifarRows(source.uri, source.keys, source.fingerprint)
    for i in indices:
        try:
            arr = _load_item(source, i, size, npz)
        except Exception as e:  # corrupt, truncated or not an image: skip and list it
            skipped.append({"key": source.keys[i], "reason": f"{type(e).__name__}: {e}"[:300]})
            continue
        images.append(encode_png(arr))
        labels.append(source.labels[i])
        keys.append(source.keys[i])
    table = pa.table(
        {
            "image": pa.array(images, pa.binary()),
            "label": pa.array(labels, pa.int64()),
            "key": pa.array(keys, pa.string()),
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", write_statistics=False)
    data = buf.getvalue()
    counts: dict[str, int] = {}
    for lab in labels:
        counts[str(lab)] = counts.get(str(lab), 0) + 1
    record = {
        "rows": len(images),
        "sha256": storage.sha256_bytes(data),
        "counts": counts,
        "skipped": skipped,
    }
    return data, record


def shard_spec(source: Source, indices: list[int], size: int) -> str:
    """What a shard must hold: the source's fingerprint, its items, and the settings."""
    blob = json.dumps(
        [FORMAT, PREPROCESSING, size, source.kind, source.fingerprint]
        + [[source.keys[i], source.labels[i]] for i in indices]
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def write_shard(uri: str, spec: str, data: bytes, record: dict[str, Any]) -> dict[str, Any]:
    """Parquet file first, then its sidecar: a sidecar means the shard is complete."""
    record = {"name": uri.rsplit("/", 1)[-1], "spec": spec, **record}
    storage.write_bytes(uri, data)
    storage.write_json(uri.removesuffix(".parquet") + ".json", record)
    return record


def _finished(uri: str, spec: str) -> dict[str, Any] | None:
    """The record of a shard already written intact for this very plan, or None."""
    sidecar = uri.removesuffix(".parquet") + ".json"
    if not (storage.exists(sidecar) and storage.exists(uri)):
        return None
    record = storage.read_json(sidecar)
    if record.get("spec") != spec:  # other source, settings or shard boundaries
        return None
    return record if storage.content_hash(uri) == record.get("sha256") else None


def _remove_stale(dest: str, uris: list[str]) -> None:
    """Shards of an earlier plan (e.g. other shard_rows) that this manifest does not list."""
    keep = set(uris) | {u.removesuffix(".parquet") + ".json" for u in uris}
    for uri in storage.ls(storage.join(dest, "shards")):
        name = uri.rsplit("/", 1)[-1]
        if name.startswith("shard-") and uri not in keep:
            storage.remove(uri)


def plan_shards(n: int, rows: int) -> list[list[int]]:
    return [list(range(s, min(s + rows, n))) for s in range(0, n, rows)]


def shard_dataset(
    cfg: AdmConfig,
    src: str,
    dest: str,
    *,
    workers: int | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Shard ``src`` into ``dest``; returns the manifest (also written to dest/manifest.json)."""
    source = list_source(cfg, src)
    size = cfg.data.image_size
    plan = plan_shards(len(source.keys), cfg.data.shard_rows)
    uris = [storage.join(dest, "shards", f"shard-{i:05d}.parquet") for i in range(len(plan))]
    storage.ensure_bucket(dest, create=cfg.storage.create_bucket)
    specs = [shard_spec(source, indices, size) for indices in plan]
    records: dict[int, dict[str, Any]] = {}
    todo = []
    for i, uri in enumerate(uris):
        done = _finished(uri, specs[i])
        if done is not None:
            records[i] = done
        else:
            todo.append(i)
    written = _run_shards(cfg, source, plan, specs, uris, todo, workers, progress, records)
    manifest = build_manifest(source, dest, size, [records[i] for i in range(len(plan))])
    _remove_stale(dest, uris)
    manifest["written"] = written
    storage.write_json(
        storage.join(dest, "manifest.json"), {k: v for k, v in manifest.items() if k != "written"}
    )
    return manifest


def _run_shards(cfg, source, plan, specs, uris, todo, workers, progress, records) -> list[str]:
    from tqdm import tqdm

    from tasks.resources import Cluster, shard_tasks
    from tasks.runtime.ray_session import ensure_ray

    if not todo:
        return []
    ray = ensure_ray(cfg, "shard")
    _check_workers_read(ray, source)
    workers = workers or cfg.compute.num_workers
    placed = shard_tasks(cfg, Cluster.from_ray(ray, cfg))  # tasks.resources decides
    remote = ray.remote(max_retries=2, **placed.ray_options())(build_shard)
    source_ref = ray.put(source)
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=sum(len(plan[i]) for i in todo), unit="img", desc="sharding", disable=not show)
    pending: dict[Any, int] = {}
    queue = list(todo)
    written = []
    while queue or pending:
        while queue and len(pending) < 2 * workers:  # bounded in-flight work: streaming
            i = queue.pop(0)
            pending[remote.remote(source_ref, plan[i], cfg.data.image_size)] = i
        ready, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(ready[0])
        records[i] = write_shard(uris[i], specs[i], *ray.get(ready[0]))
        written.append(records[i]["name"])
        bar.update(len(plan[i]))
    bar.close()
    return sorted(written)


def _readable(uri: str) -> str:
    """On a Ray worker: '' when ``uri`` can be read there, else why not."""
    try:
        fs, path = storage.filesystem(uri)
        fs.info(path)
        return ""
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def _check_workers_read(ray: Any, source: Source) -> None:
    """One cheap remote read before the shards: missing credentials on the nodes would
    otherwise show up as every image "failed to decode"."""
    if not storage.is_remote(source.uri):
        return
    first = source.uri if source.kind == "npz" else storage.join(source.uri, source.keys[0])
    err = ray.get(ray.remote(num_cpus=0)(_readable).remote(first))
    if err:
        raise ShardError(
            f"the Ray workers cannot read {first} ({err[:300]}); give every node the storage "
            "endpoint and credentials in its environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY or an instance role)"
        )
