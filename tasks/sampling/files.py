"""Sample-set files: deterministic shard ``.npz`` files, the manifest, a streamed merged ``.npz``
and the labelled grid PNG.

Shards are written with fixed zip timestamps so the same images give the same bytes (and the
same sha256) on every run and machine; ``numpy.savez`` stamps the current time instead.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import zipfile
from collections.abc import Iterator
from typing import IO, Any

import numpy as np
from numpy.lib import format as npy_format

from admflow import storage

FORMAT = "admflow-samples/1"
_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest zip timestamp: fixed, so bytes are reproducible


def shard_name(index: int) -> str:
    return f"samples-{index:05d}.npz"


def shard_uri(out: str, index: int) -> str:
    return storage.join(out, "shards", shard_name(index))


def _entry(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_EPOCH)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o600 << 16
    return info


def encode_npz(images: np.ndarray, labels: np.ndarray) -> bytes:
    """ADM-format ``.npz`` bytes (``arr_0`` uint8 NHWC, ``arr_1`` int64 labels), reproducible."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, arr in (("arr_0.npy", images), ("arr_1.npy", labels)):
            with zf.open(_entry(name), "w", force_zip64=True) as f:
                npy_format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def decode_npz(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return z["arr_0"], z["arr_1"]


def read_shard(out: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    return decode_npz(storage.read_bytes(shard_uri(out, index)))


# ---------------------------------------------------------------------------- manifest


def new_manifest(num_samples: int, image_size: int, shard_size: int, fingerprint: str) -> dict:
    return {
        "format": FORMAT,
        "num_samples": num_samples,
        "image_size": image_size,
        "shard_size": shard_size,
        "num_shards": -(-num_samples // shard_size),
        "fingerprint": fingerprint,
        "complete": False,
        "shards": [],
    }


def read_manifest(out: str) -> dict | None:
    uri = storage.join(out, "manifest.json")
    if not storage.exists(uri):
        return None
    manifest = storage.read_json(uri)
    if manifest.get("format") != FORMAT:
        raise storage.StorageError(f"{uri} is not an {FORMAT} manifest")
    return manifest


def write_manifest(out: str, manifest: dict) -> None:
    manifest["shards"] = sorted(manifest["shards"], key=lambda s: s["index"])
    storage.write_json(storage.join(out, "manifest.json"), manifest)


def verified_shards(out: str, manifest: dict) -> list[dict]:
    """Manifest entries whose file exists with the recorded checksum (others must be redone)."""
    good = []
    for entry in manifest.get("shards", []):
        uri = storage.join(out, "shards", entry["name"])
        if storage.exists(uri) and storage.content_hash(uri) == entry["sha256"]:
            good.append(entry)
    return good


def iter_shards(out: str, manifest: dict) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Each shard's (images, labels) in index order: one shard in memory at a time."""
    for entry in sorted(manifest["shards"], key=lambda s: s["index"]):
        yield decode_npz(storage.read_bytes(storage.join(out, "shards", entry["name"])))


# ---------------------------------------------------------------------------- merged .npz


def _npy_header(f: IO[bytes], shape: tuple[int, ...], dtype: np.dtype) -> None:
    header = {"descr": npy_format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    npy_format.write_array_header_1_0(f, header)


def _write_merged(f: IO[bytes], out: str, manifest: dict) -> None:
    n, size = manifest["num_samples"], manifest["image_size"]
    first_images, _ = read_shard(out, manifest["shards"][0]["index"])
    channels = first_images.shape[-1]
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open(_entry("arr_0.npy"), "w", force_zip64=True) as entry:
            _npy_header(entry, (n, size, size, channels), np.dtype(np.uint8))
            for images, _ in iter_shards(out, manifest):
                entry.write(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
        with zf.open(_entry("arr_1.npy"), "w", force_zip64=True) as entry:
            _npy_header(entry, (n,), np.dtype(np.int64))
            for _, labels in iter_shards(out, manifest):
                entry.write(np.ascontiguousarray(labels, dtype=np.int64).tobytes())


def merge_set(out: str, dest: str | None = None) -> str:
    """Write one ADM ``.npz`` of the whole set by streaming shard after shard; returns its URI.

    Remote destinations are staged in a local temporary file and uploaded in parts.
    """
    manifest = read_manifest(out)
    if manifest is None or not manifest.get("complete"):
        raise storage.StorageError(f"{out}: the sample set is not complete; run sampling first")
    n, size = manifest["num_samples"], manifest["image_size"]
    dest = dest or storage.join(out, f"samples_{n}x{size}x{size}x3.npz")
    if storage.is_remote(dest):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "merged.npz")
            with open(path, "wb") as f:
                _write_merged(f, out, manifest)
            fs, remote = storage.filesystem(dest)
            fs.put_file(path, remote)
    else:
        with storage.open_atomic(dest) as f:
            _write_merged(f, out, manifest)
    return dest


# ---------------------------------------------------------------------------- grid


def make_grid(images: np.ndarray, labels: np.ndarray, columns: int = 8, cell: int = 96) -> Any:
    """A PIL image: ``images`` (uint8 NHWC) in a grid, each with its class label drawn on it."""
    from PIL import Image, ImageDraw

    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * cell, rows * cell), "white")
    draw = ImageDraw.Draw(grid)
    for k, (img, label) in enumerate(zip(images, labels, strict=True)):
        tile = Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img)
        x, y = (k % columns) * cell, (k // columns) * cell
        grid.paste(tile.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        text = str(int(label)) if int(label) >= 0 else "-"
        box = draw.textbbox((x + 2, y + 1), text)
        draw.rectangle((box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1), fill="black")
        draw.text((x + 2, y + 1), text, fill="white")
    return grid


def write_grid(out: str, manifest: dict, count: int = 64) -> str:
    """``OUT/grid.png`` from the first ``count`` images of the set."""
    images, labels = [], []
    have = 0
    for imgs, labs in iter_shards(out, manifest):
        images.append(imgs[: count - have])
        labels.append(labs[: count - have])
        have += len(images[-1])
        if have >= count:
            break
    grid = make_grid(np.concatenate(images), np.concatenate(labels))
    uri = storage.join(out, "grid.png")
    with contextlib.closing(io.BytesIO()) as buf:
        grid.save(buf, format="PNG")
        storage.write_bytes(uri, buf.getvalue())
    return uri
