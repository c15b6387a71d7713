"""Sharding: a source (image folder, flat folder, ADM ``.npz`` batch, or the demo set; the
folders and batches local or on object storage) into Parquet shards plus ``manifest.json``.

A remote source is listed once by the driver (names, sizes, ETags: no object is read) and
its images are read by the Ray workers that build the shards.

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
import os
import sys
import zipfile
from dataclasses import dataclass, replace
from typing import IO, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from admflow import storage
from admflow.config import AdmConfig

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
FORMAT = "admflow-shards/1"
PREPROCESSING = (
    "RGB; halve with PIL BOX while the short side >= 2x target; BICUBIC so the short side "
    "equals target; centre crop (as the paper's image_datasets.center_crop_arr); PNG"
)
# Folder and demo items are dealt to shards in a fixed pseudo-random order (not sorted by
# class), so every shard mixes classes and shard-level shuffling gives mixed batches.
ORDER_SEED = 0
ORDER = f"sorted keys permuted by numpy default_rng({ORDER_SEED}); npz keeps its row order"


class ShardError(ValueError):
    """A source that cannot be sharded; the message names it and the fix."""


@dataclass(frozen=True)
class Source:
    kind: str  # "demo" | "folder" | "flat" | "npz"
    uri: str
    keys: list[str]
    labels: list[int]
    class_names: list[str]
    fingerprint: str
    ignored: tuple[dict[str, str], ...] = ()  # files never attempted (listed as skipped)


# ------------------------------------------------------------------ preprocessing


def center_crop(image: Image.Image, size: int) -> np.ndarray:
    """The paper's preprocessing: BOX halving, BICUBIC to the target, centre crop."""
    image = image.convert("RGB")
    while min(image.size) >= 2 * size:
        w, h = image.size
        image = image.resize((w // 2, h // 2), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    w, h = image.size
    image = image.resize((round(w * scale), round(h * scale)), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def encode_png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


# ------------------------------------------------------------------ sources


def list_source(cfg: AdmConfig, src: str) -> Source:
    if src == "demo":
        return _mixed(_demo_source(cfg))
    if src.endswith(".npz"):
        return _npz_source(cfg, src)
    if storage.is_remote(src):
        return _mixed(_folder_source(src.rstrip("/")))
    path = storage.local_path(src)
    if path is None or not os.path.isdir(path):
        raise ShardError(
            f"source {src!r} is neither 'demo', an .npz batch, nor an image folder (local or s3://)"
        )
    return _mixed(_folder_source(path))


def _mixed(source: Source) -> Source:
    order = np.random.default_rng(ORDER_SEED).permutation(len(source.keys))
    return replace(
        source,
        keys=[source.keys[i] for i in order],
        labels=[source.labels[i] for i in order],
    )


def _demo_source(cfg: AdmConfig) -> Source:
    from tasks.data.demo import CLASS_NAMES, VERSION, demo_keys

    pairs = demo_keys(cfg.data.demo_images_per_class)
    fp = f"demo-v{VERSION}-{cfg.data.demo_images_per_class}"
    return Source(
        "demo",
        "demo",
        [k for k, _ in pairs],
        [lab for _, lab in pairs],
        list(CLASS_NAMES),
        hashlib.sha256(fp.encode()).hexdigest(),
    )


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _tree_order(key: str) -> tuple[list[str], str]:
    """os.walk's top-down order with sorted names: a folder's files before its sub-folders."""
    parts = key.split("/")
    return parts[:-1], parts[-1]


def _walk(root: str) -> tuple[list[str], dict[str, str]]:
    """Top-level sub-folders of ``root`` and every file below it as ``key -> stamp`` (key:
    '/'-separated path relative to root; stamp: size and modification time or ETag), local
    or on object storage (one listing, no object is read)."""
    if storage.is_remote(root):
        fs, base = storage.filesystem(root)
        try:
            found = fs.find(base, withdirs=False, detail=True)
        except Exception as e:  # missing bucket, endpoint down, no credentials
            raise ShardError(
                f"cannot list {root}: {type(e).__name__}: {e}; check the bucket name, "
                "AWS_ENDPOINT_URL and the AWS credential variables"
            ) from None
        files = {
            p[len(base) + 1 :]: f"{i.get('size')}\0{i.get('ETag') or i.get('LastModified')}"
            for p, i in found.items()
            if p.startswith(base + "/")
        }
        return sorted({k.split("/")[0] for k in files if "/" in k}), files
    entries = sorted(os.listdir(root))
    subdirs = [e for e in entries if os.path.isdir(os.path.join(root, e))]
    files = {}
    for dirpath, _dirs, names in os.walk(root):
        for f in names:
            key = os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/")
            st = os.stat(os.path.join(dirpath, f))
            files[key] = f"{st.st_size}\0{st.st_mtime_ns}"
    return subdirs, files


def _folder_source(root: str) -> Source:
    subdirs, files = _walk(root)
    keys, labels, ignored = [], [], []
    label_of = {name: label for label, name in enumerate(subdirs)}
    for key in sorted(files, key=_tree_order):
        top, name = key.split("/", 1)[0], key.rsplit("/", 1)[-1]
        if subdirs and "/" not in key:  # ImageNet-style: images must sit in a class folder
            if not name.startswith("."):
                ignored.append({"key": key, "reason": "not inside a class folder"})
        elif _is_image_name(name):  # labels follow the sorted class-folder names
            keys.append(key)
            labels.append(label_of[top] if subdirs else -1)
        elif not name.startswith("."):
            ignored.append({"key": key, "reason": "not an image file name"})
    if not keys:
        raise ShardError(
            f"no images under {root} (looked for {', '.join(IMAGE_EXTENSIONS)}); point SRC at "
            "a folder of class sub-folders, a flat folder of images, an .npz batch, or 'demo'"
        )
    h = hashlib.sha256()
    for k in keys:
        h.update(f"{k}\0{files[k]}\n".encode())
    kind = "folder" if subdirs else "flat"  # flat (LSUN-style) is unconditional
    return Source(kind, root, keys, labels, subdirs, h.hexdigest(), tuple(sorted(ignored, key=str)))


def _npz_source(cfg: AdmConfig, uri: str) -> Source:
    images, labels = open_npz(uri)
    n = images.shape[0]
    if n == 0:
        raise ShardError(f"{uri}: arr_0 holds no images; nothing to shard")
    classes: list[str] = []
    if labels is not None:
        if labels.min() < 0:
            raise ShardError(f"{uri}: arr_1 has negative labels (min {labels.min()})")
        # labels index class_names directly: 0..max, or data.num_classes if larger
        num_classes = max(int(labels.max()) + 1, cfg.data.num_classes or 0)
        classes = [str(c) for c in range(num_classes)]
    label_list = [int(v) for v in labels] if labels is not None else [-1] * n
    return Source("npz", uri, [f"{i:08d}" for i in range(n)], label_list, classes, _npz_stamp(uri))


def _npz_stamp(uri: str) -> str:
    """Content hash of a local batch; size and ETag of a remote one (not downloaded)."""
    if not storage.is_remote(uri):
        return storage.content_hash(uri)
    fs, path = storage.filesystem(uri)
    info = fs.info(path)
    stamp = f"{uri}\0{info.get('size')}\0{info.get('ETag') or info.get('LastModified')}"
    return hashlib.sha256(stamp.encode()).hexdigest()


def open_npz(uri: str, labels: bool = True) -> tuple[Any, np.ndarray | None]:
    """``arr_0`` (uint8 NHWC) and ``arr_1`` labels (None when absent or not asked for).

    An uncompressed ``arr_0`` is not read here: locally it is memory-mapped, on object
    storage its rows are fetched by range when indexed, so each worker reads only its rows."""
    fs, path = storage.filesystem(uri)
    try:
        with fs.open(path, "rb") as raw, zipfile.ZipFile(raw) as zf:
            names = {n.removesuffix(".npy") for n in zf.namelist()}
            if "arr_0" not in names:
                raise ShardError(
                    f"{uri}: no 'arr_0' array (found {sorted(names)}); an ADM batch holds arr_0 "
                    "(uint8 N x H x W x 3 images) and optionally arr_1 (int labels)"
                )
            images = _npz_images(uri, zf, raw)
            found = None
            if labels and "arr_1" in names:
                with zf.open("arr_1.npy") as f:
                    found = np.lib.format.read_array(f)
    except (zipfile.BadZipFile, FileNotFoundError) as e:
        raise ShardError(f"{uri}: not a readable .npz file ({e})") from None
    except OSError as e:  # object storage unreachable or refusing
        raise ShardError(f"{uri}: cannot read ({type(e).__name__}: {e})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ShardError(
            f"{uri}: arr_0 must be uint8 with shape N x H x W x 3, got {images.dtype} "
            f"{images.shape}; convert with (x * 127.5 + 127.5).clip(0, 255).astype(np.uint8)"
        )
    if found is not None and (
        found.shape != (images.shape[0],) or not np.issubdtype(found.dtype, np.integer)
    ):
        raise ShardError(
            f"{uri}: arr_1 must hold one integer label per image, got {found.dtype} "
            f"{found.shape} for {images.shape[0]} images"
        )
    return images, found


def _npz_images(uri: str, zf: zipfile.ZipFile, raw: IO[bytes]) -> Any:
    info = zf.getinfo("arr_0.npy")
    local = storage.local_path(uri)
    if info.compress_type != zipfile.ZIP_STORED:
        if local is None:
            raise ShardError(
                f"{uri}: arr_0 is compressed (np.savez_compressed), so every worker would "
                "download and inflate all of it; store the batch with np.savez, or shard a "
                "local copy"
            )
        with zf.open(info) as f:
            return np.lib.format.read_array(f)
    with zf.open(info) as f:  # reads the .npy header only
        version = np.lib.format.read_magic(f)
        read_header = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read_header(f)
        header_len = f.tell()
    raw.seek(info.header_offset)  # the zip local header precedes the member's bytes
    head = raw.read(30)
    name_len = int.from_bytes(head[26:28], "little")
    extra_len = int.from_bytes(head[28:30], "little")
    offset = info.header_offset + 30 + name_len + extra_len + header_len
    if local is not None:
        if fortran:
            return np.memmap(local, dtype=dtype, mode="r", shape=shape, offset=offset, order="F")
        return np.memmap(local, dtype=dtype, mode="r", shape=shape, offset=offset, order="C")
    if fortran:
        raise ShardError(f"{uri}: arr_0 is stored in Fortran order; save it C-contiguous")
    return RemoteRows(uri, offset, shape, dtype)


class RemoteRows:
    """Rows of an uncompressed npz array on object storage, fetched in ranged blocks of
    about ``BLOCK_BYTES`` as they are indexed (a shard's rows are contiguous)."""

    BLOCK_BYTES = 8 << 20

    def __init__(self, uri: str, offset: int, shape: tuple[int, ...], dtype: np.dtype):
        self.uri, self.offset, self.shape, self.dtype = uri, offset, tuple(shape), dtype
        self.ndim = len(self.shape)
        self.row_bytes = int(np.prod(self.shape[1:])) * dtype.itemsize
        self._block: tuple[int, int, bytes] = (0, 0, b"")

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i: int) -> np.ndarray:
        start, stop, data = self._block
        if not start <= i < stop:
            start = i
            stop = min(self.shape[0], i + max(1, self.BLOCK_BYTES // self.row_bytes))
            fs, path = storage.filesystem(self.uri)
            rb = self.row_bytes
            data = fs.cat_file(path, start=self.offset + start * rb, end=self.offset + stop * rb)
            self._block = (start, stop, data)
        row = np.frombuffer(
            data, self.dtype, self.row_bytes // self.dtype.itemsize, (i - start) * self.row_bytes
        )
        return row.reshape(self.shape[1:])


# ------------------------------------------------------------------ one shard


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
    npz = open_npz(source.uri, labels=False)[0] if source.kind == "npz" else None
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


# ------------------------------------------------------------------ the stage


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
    manifest = _manifest(cfg, source, dest, size, [records[i] for i in range(len(plan))])
    _remove_stale(dest, uris)
    manifest["written"] = written
    storage.write_json(
        storage.join(dest, "manifest.json"), {k: v for k, v in manifest.items() if k != "written"}
    )
    return manifest


def _run_shards(cfg, source, plan, specs, uris, todo, workers, progress, records) -> list[str]:
    from tqdm import tqdm

    from tasks.runtime.ray_session import ensure_ray

    if not todo:
        return []
    ray = ensure_ray(cfg)
    _check_workers_read(ray, source)
    workers = workers or cfg.compute.num_workers
    remote = ray.remote(num_cpus=1, max_retries=2)(build_shard)
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


def _manifest(cfg: AdmConfig, source: Source, dest: str, size: int, records: list[dict]) -> dict:
    skipped = sorted(
        [s for r in records for s in r["skipped"]] + list(source.ignored), key=lambda s: s["key"]
    )
    total = sum(r["rows"] for r in records)
    if total == 0:
        first = f" (first: {skipped[0]['key']}: {skipped[0]['reason']})" if skipped else ""
        raise ShardError(
            f"every one of the {len(source.keys)} files in {source.uri} failed to decode"
            f"{first}; no manifest was written"
        )
    counts: dict[str, int] = {}
    for r in records:
        for lab, c in r["counts"].items():
            counts[lab] = counts.get(lab, 0) + c
    conditional = source.kind in ("demo", "folder") or (
        source.kind == "npz" and bool(source.class_names)
    )
    return {
        "format": FORMAT,
        "image_size": size,
        "num_images": total,
        "num_classes": len(source.class_names) if conditional else None,
        "class_names": source.class_names,
        "counts_per_class": dict(sorted(counts.items(), key=lambda kv: int(kv[0]))),
        "preprocessing": {
            "description": PREPROCESSING,
            "image_size": size,
            "encoding": "png",
            "order": ORDER,
        },
        "source": {"uri": source.uri, "kind": source.kind, "fingerprint": source.fingerprint},
        "shards": [{"name": r["name"], "rows": r["rows"], "sha256": r["sha256"]} for r in records],
        "skipped": skipped,
        "uri": dest,
    }


def manifest_json(manifest: dict) -> str:
    return json.dumps(manifest, indent=2, sort_keys=True)
