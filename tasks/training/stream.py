"""The training data stream: a pure function of (seed, step), read shard by shard.

Why not Ray Data here: an exactly resumable run needs batch ``s`` to be the same images
whether the run got there in one go or was restored from a checkpoint, and Ray Data's
streaming order is neither reproducible across executions nor seekable to a position.

The order: in epoch ``e`` the shards are permuted by ``rng(seed, e)`` and cut into windows
of ``window_shards`` consecutive shards; the rows of window ``w`` are permuted by
``rng(seed, e, w)``. Global sample ``g`` is row ``g % N`` of epoch ``g // N`` in that order,
and step ``s`` with global batch ``B`` takes samples ``[s*B, (s+1)*B)``; worker ``r`` of
``W`` takes the ``r``-th of ``W`` equal slices. Memory holds one window's encoded PNG
bytes (decoded only for the rows of the current batch), so the set is never loaded whole;
a larger window mixes better (the whole set when ``window_shards >= len(shards)``).

A held-out split (for the classifier's accuracy) is every ``holdout_every``-th row of the
set by global row index; training then skips those rows.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from admflow import storage
from tasks.data.read import load_manifest
from tasks.data.read import shard_root as data_root

DEFAULT_WINDOW_SHARDS = 8


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


@dataclass(frozen=True)
class Window:
    """A group of shards read together; ``rows`` are global row indices in stream order."""

    shards: tuple[int, ...]
    rows: np.ndarray


class ShardStream:
    """Deterministic, seekable sample order over a sharded set (see the module docstring)."""

    def __init__(
        self,
        data_uri: str,
        seed: int,
        *,
        window_shards: int = DEFAULT_WINDOW_SHARDS,
        holdout_every: int = 0,
        split: str = "train",
    ):
        self.root = data_root(data_uri)
        self.manifest = load_manifest(data_uri)
        self.shard_rows = [int(s["rows"]) for s in self.manifest["shards"]]
        self.starts = np.concatenate([[0], np.cumsum(self.shard_rows)]).astype(np.int64)
        self.seed = seed
        self.window_shards = max(1, window_shards)
        self.holdout_every = holdout_every
        self.split = split
        self._epoch_windows: tuple[int, list[Window], np.ndarray] | None = None
        self._cache: tuple[tuple[int, ...], dict[int, bytes], dict[int, int]] | None = None
        if not len(self._keep(np.arange(self.starts[-1]))):
            raise ValueError(f"{self.root}: no {split} rows (holdout_every={holdout_every})")

    # ----------------------------------------------------------------- index arithmetic

    def _keep(self, rows: np.ndarray) -> np.ndarray:
        if not self.holdout_every:
            return rows
        held = rows % self.holdout_every == 0
        return rows[held] if self.split == "holdout" else rows[~held]

    @property
    def num_rows(self) -> int:
        return int(sum(len(self._keep(self._shard_range(i))) for i in range(len(self.shard_rows))))

    def _shard_range(self, i: int) -> np.ndarray:
        return np.arange(self.starts[i], self.starts[i + 1])

    def _windows(self, epoch: int) -> tuple[list[Window], np.ndarray]:
        if self._epoch_windows is None or self._epoch_windows[0] != epoch:
            order = _rng(self.seed, epoch).permutation(len(self.shard_rows))
            windows = []
            for w, lo in enumerate(range(0, len(order), self.window_shards)):
                shards = tuple(int(i) for i in order[lo : lo + self.window_shards])
                rows = self._keep(np.concatenate([self._shard_range(i) for i in shards]))
                windows.append(Window(shards, _rng(self.seed, epoch, w).permutation(rows)))
            ends = np.cumsum([len(w.rows) for w in windows])
            self._epoch_windows = (epoch, windows, ends)
        return self._epoch_windows[1], self._epoch_windows[2]

    def rows_at(self, positions: np.ndarray) -> list[tuple[Window, int]]:
        """(window, global row) for each global sample position."""
        n = self.num_rows
        out = []
        for g in positions.tolist():
            windows, ends = self._windows(g // n)
            offset = g % n
            w = int(np.searchsorted(ends, offset, side="right"))
            before = int(ends[w - 1]) if w else 0
            out.append((windows[w], int(windows[w].rows[offset - before])))
        return out

    # ----------------------------------------------------------------- reading

    def _load_window(self, window: Window) -> tuple[dict[int, bytes], dict[int, int]]:
        if self._cache is None or self._cache[0] != window.shards:
            images: dict[int, bytes] = {}
            labels: dict[int, int] = {}
            for i in window.shards:
                name = self.manifest["shards"][i]["name"]
                with storage.open_read(storage.join(self.root, "shards", name)) as f:
                    table = pq.read_table(f, columns=["image", "label"])
                start = int(self.starts[i])
                for j, (img, lab) in enumerate(
                    zip(
                        table.column("image").to_pylist(),
                        table.column("label").to_pylist(),
                        strict=True,
                    )
                ):
                    images[start + j] = img
                    labels[start + j] = int(lab)
            self._cache = (window.shards, images, labels)
        return self._cache[1], self._cache[2]

    def read(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 NHWC images and int64 labels at these global sample positions."""
        images, labels = [], []
        for window, row in self.rows_at(positions):
            blobs, labs = self._load_window(window)
            images.append(np.asarray(Image.open(io.BytesIO(blobs[row])).convert("RGB")))
            labels.append(labs[row])
        return np.stack(images), np.asarray(labels, dtype=np.int64)

    def holdout_rows(self) -> np.ndarray:
        """The held-out split's global row indices, in set order (no shuffling)."""
        return self._keep(np.arange(self.starts[-1]))

    def read_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Read rows by global index (shard by shard; for evaluation)."""
        images, labels = [], []
        for i in sorted({int(np.searchsorted(self.starts, r, side="right") - 1) for r in rows}):
            window = Window((i,), self._shard_range(i))
            blobs, labs = self._load_window(window)
            for r in rows[(rows >= self.starts[i]) & (rows < self.starts[i + 1])].tolist():
                images.append(np.asarray(Image.open(io.BytesIO(blobs[r])).convert("RGB")))
                labels.append(labs[r])
        return np.stack(images), np.asarray(labels, dtype=np.int64)


def batch_positions(step: int, global_batch: int, rank: int, world_size: int) -> np.ndarray:
    """Global sample positions of worker ``rank``'s slice of step ``step``'s batch."""
    if global_batch % world_size:
        raise ValueError(
            f"training batch_size {global_batch} must be divisible by {world_size} workers"
        )
    local = global_batch // world_size
    start = step * global_batch + rank * local
    return np.arange(start, start + local, dtype=np.int64)


def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW in [-1, 1]."""
    return images.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0


MIN_CROP_FRAC = 0.8  # guided-diffusion's classifier crops 80-100% of the image side


def augment(
    images: np.ndarray,
    rng: np.random.Generator,
    *,
    flip: bool,
    random_crop: bool = False,
    crop: int | None = None,
    crop_stride: int = 1,
) -> np.ndarray:
    """NCHW images: (``random_crop``) the paper's scale-and-crop, or (``crop``) a random
    ``crop`` x ``crop`` window of each, then random horizontal flips."""
    if random_crop:
        out = scale_and_crop(images, rng)
    elif crop:
        out = random_windows(images, crop, crop_stride, rng)
    else:
        out = images.copy()
    if flip:
        mask = rng.random(len(out)) < 0.5
        out[mask] = out[mask][..., ::-1]
    return np.ascontiguousarray(out)


def random_windows(
    images: np.ndarray, side: int, stride: int, rng: np.random.Generator
) -> np.ndarray:
    """A random ``side`` x ``side`` window of each image, its corner on a ``stride`` grid: with
    the upsampler's scale factor as the stride, a window's area-downsample is a window of the
    whole image's, the kind of low-resolution input it samples from."""
    n = images.shape[-1]
    if side > n:
        raise ValueError(f"a {side}px crop does not fit {n}px images")
    corners = rng.integers(0, (n - side) // stride + 1, size=(len(images), 2)) * stride
    return np.stack(
        [
            img[:, top : top + side, left : left + side]
            for img, (top, left) in zip(images, corners, strict=True)
        ]
    )


def scale_and_crop(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The classifier's augmentation in ADM: each image's side is scaled (bicubic) to an
    integer S drawn uniformly from [n, ceil(n / 0.8)] and a random n x n window is cut, so
    the window covers n/S, 80-100%, of the side. Our shards already hold n x n images, so
    the scaling goes up from n rather than down from the source image."""
    n = images.shape[-1]
    sides = rng.integers(n, math.ceil(n / MIN_CROP_FRAC) + 1, size=len(images))
    out = np.empty_like(images)
    for i, side in enumerate(sides):
        img = images[i]
        if side > n:
            img = np.stack([_bicubic(channel, int(side)) for channel in img])
        top, left = rng.integers(0, side - n + 1, size=2)
        out[i] = img[:, top : top + n, left : left + n]
    return out


def _bicubic(channel: np.ndarray, side: int) -> np.ndarray:
    image = Image.fromarray(channel.astype(np.float32))  # mode "F": float bicubic
    return np.asarray(image.resize((side, side), resample=Image.Resampling.BICUBIC))
