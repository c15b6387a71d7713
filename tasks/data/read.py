"""Reading shards back: a plain streaming iterator (tests, evaluation) and a Ray Data
dataset (ingestion), with the paper's augmentations.

Augmentations: random horizontal flip (diffusion training), and for classifier training
the paper's random crop: upscale by a random factor in [1, 1/0.8] (BICUBIC) and cut a
random ``image_size`` window, i.e. a crop covering 80-100% of the (already centre-cropped)
image.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from admflow import storage

MIN_CROP_FRAC = 0.8


def load_manifest(uri: str) -> dict[str, Any]:
    """The manifest of a shard directory (``uri`` is the directory or its manifest.json)."""
    path = uri if uri.endswith(".json") else storage.join(uri, "manifest.json")
    try:
        manifest = storage.read_json(path)
    except FileNotFoundError:
        raise storage.StorageError(
            f"no shard manifest at {path}: run `admflow shard SRC DEST` first and pass DEST"
        ) from None
    if manifest.get("format") != "admflow-shards/1":
        raise storage.StorageError(f"{path}: not an admflow-shards/1 manifest")
    return manifest


def shard_root(uri: str) -> str:
    return uri.rsplit("/", 1)[0] if uri.endswith(".json") else uri.rstrip("/")


def shard_uris(uri: str) -> list[str]:
    root = shard_root(uri)
    return [storage.join(root, "shards", s["name"]) for s in load_manifest(uri)["shards"]]


def decode_image(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGB"))


def random_crop(arr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = arr.shape[0]
    scaled = int(round(size * rng.uniform(1.0, 1.0 / MIN_CROP_FRAC)))
    if scaled > size:
        arr = np.asarray(
            Image.fromarray(arr).resize((scaled, scaled), resample=Image.Resampling.BICUBIC)
        )
    top, left = rng.integers(0, arr.shape[0] - size + 1, size=2)
    return arr[top : top + size, left : left + size]


def augment(arr: np.ndarray, rng: np.random.Generator, flip: bool, crop: bool) -> np.ndarray:
    if crop:
        arr = random_crop(arr, rng)
    if flip and rng.random() < 0.5:
        arr = arr[:, ::-1]
    return arr


def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW in [-1, 1]."""
    return (images.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2).copy()


def _read_shard(uri: str) -> tuple[list[bytes], np.ndarray]:
    import pyarrow.parquet as pq

    with storage.open_read(uri) as f:
        table = pq.read_table(f, columns=["image", "label"])
    return table.column("image").to_pylist(), table.column("label").to_numpy()


def iter_batches(
    uri: str,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    flip: bool = False,
    random_crop: bool = False,
    epochs: int = 1,
    drop_last: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(images float32 NCHW in [-1,1], labels int64)``, one shard in memory at a time.

    Deterministic for a given seed: shard order and row order are permuted per epoch."""
    uris = shard_uris(uri)
    for epoch in range(epochs):
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(uris)) if shuffle else np.arange(len(uris))
        pending_x: list[np.ndarray] = []
        pending_y: list[int] = []
        for s in order:
            pngs, labels = _read_shard(uris[s])
            rows = rng.permutation(len(pngs)) if shuffle else np.arange(len(pngs))
            for r in rows:
                pending_x.append(augment(decode_image(pngs[r]), rng, flip, random_crop))
                pending_y.append(int(labels[r]))
                if len(pending_x) == batch_size:
                    yield to_model_input(np.stack(pending_x)), np.asarray(pending_y, np.int64)
                    pending_x, pending_y = [], []
        if pending_x and not drop_last:
            yield to_model_input(np.stack(pending_x)), np.asarray(pending_y, np.int64)


def ray_dataset(uri: str, *, flip: bool = False, random_crop: bool = False, seed: int = 0):
    """A Ray Data dataset with columns ``image`` (float32 CHW in [-1,1]) and ``label``."""
    import ray.data

    uris = shard_uris(uri)
    filesystem, _ = storage.pyarrow_filesystem(uris[0])
    paths = [storage.filesystem(u)[1] for u in uris]
    ds = ray.data.read_parquet(paths, filesystem=filesystem).select_columns(["image", "label"])

    def decode(batch: dict[str, Any]) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([seed, int(batch["label"].sum()), len(batch["label"])])
        imgs = np.stack([augment(decode_image(b), rng, flip, random_crop) for b in batch["image"]])
        return {"image": to_model_input(imgs), "label": batch["label"].astype(np.int64)}

    return ds.map_batches(decode, batch_format="numpy", num_cpus=0.5)
