"""The test images a likelihood is computed on: a shard set (``admflow shard`` output) or an
``.npz`` batch (``arr_0`` uint8 NHWC, optional ``arr_1`` labels), read once by the driver."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from admflow import storage
from tasks.data import read


@dataclass
class TestSet:
    uri: str
    images: np.ndarray  # uint8 NHWC
    labels: np.ndarray | None  # int64, or None when the set has none
    sha256: str  # of the .npz, or of the shard manifest (which lists every shard's checksum)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    def rows(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray | None]:
        labels = None if self.labels is None else self.labels[lo:hi]
        return self.images[lo:hi], labels


def _from_npz(uri: str, limit: int | None) -> TestSet:
    data = storage.read_bytes(uri)
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        if "arr_0" not in z.files:
            raise storage.StorageError(f"{uri}: no arr_0 (uint8 NHWC images) in the .npz")
        images = z["arr_0"][:limit]
        labels = z["arr_1"][:limit].astype(np.int64) if "arr_1" in z.files else None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise storage.StorageError(
            f"{uri}: arr_0 is {images.dtype} {images.shape}; expected uint8 [N, H, W, 3]"
        )
    return TestSet(uri, images, labels, storage.sha256_bytes(data))


def _from_shards(uri: str, limit: int | None) -> TestSet:
    manifest = read.load_manifest(uri)
    images: list[np.ndarray] = []
    labels: list[int] = []
    for shard in read.shard_uris(uri):
        pngs, labs = read._read_shard(shard)
        take = len(pngs) if limit is None else min(len(pngs), limit - len(images))
        images += [read.decode_image(p) for p in pngs[:take]]
        labels += [int(v) for v in labs[:take]]
        if limit is not None and len(images) >= limit:
            break
    conditional = manifest.get("num_classes") is not None
    digest = storage.sha256_bytes(repr(manifest["shards"]).encode())
    return TestSet(uri, np.stack(images), np.asarray(labels) if conditional else None, digest)


def load_test_set(uri: str, limit: int | None = None) -> TestSet:
    """The first ``limit`` images (all when None) of the shard set or .npz at ``uri``."""
    if uri.endswith(".npz"):
        if not storage.exists(uri):
            raise storage.StorageError(f"test set {uri} not found")
        return _from_npz(uri, limit)
    return _from_shards(uri, limit)
