"""What a sharding source holds: an image folder (class sub-folders or flat), an ADM ``.npz``
batch, CIFAR-10's python batches (:mod:`tasks.data.cifar`) or the demo set, local or on object
storage.

A remote source is listed once by the driver (names, sizes, ETags: no object is read); an
``.npz`` batch's rows are read where they are used (memory-mapped, or fetched by range).
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass, replace
from typing import IO, Any

import numpy as np

from admflow import storage
from admflow.config import AdmConfig
from tasks.data import cifar

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
# Folder and demo items are dealt to shards in a fixed pseudo-random order (not sorted by
# class), so every shard mixes classes and shard-level shuffling gives mixed batches.
ORDER_SEED = 0
ORDER = (
    f"sorted keys permuted by numpy default_rng({ORDER_SEED}); npz and CIFAR-10 batches keep "
    "their row order"
)


class ShardError(ValueError):
    """A source that cannot be sharded; the message names it and the fix."""


@dataclass(frozen=True)
class Source:
    kind: str  # "demo" | "folder" | "flat" | "npz" | "cifar10"
    uri: str
    keys: list[str]
    labels: list[int]
    class_names: list[str]
    fingerprint: str
    ignored: tuple[dict[str, str], ...] = ()  # files never attempted (listed as skipped)


def list_source(cfg: AdmConfig, src: str) -> Source:
    if src in ("demo", "demo-heldout"):
        return _mixed(_demo_source(cfg, heldout=src == "demo-heldout"))
    if src.endswith(".npz"):
        return _npz_source(cfg, src)
    if cifar.is_cifar(src):
        return _cifar_source(src)
    if storage.is_remote(src):
        return _mixed(_folder_source(src.rstrip("/")))
    path = storage.local_path(src)
    if path is None or not os.path.isdir(path):
        raise ShardError(
            f"source {src!r} is neither 'demo', an .npz batch, CIFAR-10's python batches, nor an "
            "image folder (local or s3://)"
        )
    return _mixed(_folder_source(path))


def _mixed(source: Source) -> Source:
    order = np.random.default_rng(ORDER_SEED).permutation(len(source.keys))
    return replace(
        source,
        keys=[source.keys[i] for i in order],
        labels=[source.labels[i] for i in order],
    )


def _demo_source(cfg: AdmConfig, heldout: bool = False) -> Source:
    """The demo set, or its held-out images: the next HELDOUT_PER_CLASS of every class."""
    from tasks.data.demo import CLASS_NAMES, HELDOUT_PER_CLASS, VERSION, demo_keys

    per_class = cfg.data.demo_images_per_class
    if heldout:
        pairs = demo_keys(HELDOUT_PER_CLASS, start=per_class)
        fp = f"demo-v{VERSION}-{per_class}-heldout-{HELDOUT_PER_CLASS}"
    else:
        pairs = demo_keys(per_class)
        fp = f"demo-v{VERSION}-{per_class}"
    return Source(
        "demo",
        "demo-heldout" if heldout else "demo",
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


def _cifar_source(src: str) -> Source:
    try:
        keys, labels, names, fingerprint = cifar.describe(src)
    except cifar.CifarError as e:
        raise ShardError(str(e)) from None
    return Source("cifar10", src.rstrip("/"), keys, labels, names, fingerprint)


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
