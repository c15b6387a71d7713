"""Inputs of the evaluator: what a URI holds and how to read its images in work units.

A URI is one of
- an ADM-style ``.npz`` batch (``arr_0`` uint8 NHWC; a reference batch may also carry the
  precomputed ``mu``, ``sigma``, ``mu_s``, ``sigma_s``),
- a feature file (``.npz`` with ``pool`` Nx2048, ``spatial`` Nx2023, optional ``logits`` or
  ``softmax`` Nx1008, optional statistics, ``image_size``),
- a sample set (directory with an ``admflow-samples/1`` manifest.json),
- a sharded data set (directory with an ``admflow-shards/1`` manifest.json).

Work units are plain tuples so that Ray actors can read their own slice from storage:
``("npz", uri, start, stop)`` rows of ``arr_0``, or ``("parquet", uri, 0, rows)`` one shard.
"""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

import numpy as np
from numpy.lib import format as npy_format

from admflow import storage
from admflow.config import ConfigError

SAMPLES_FORMAT = "admflow-samples/1"
SHARDS_FORMAT = "admflow-shards/1"
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")

Unit = tuple[str, str, int, int]


class EvaluationInputError(ValueError):
    """An input the evaluator cannot read; the message names it and says why."""


def npz_members(uri: str) -> list[str]:
    with storage.open_read(uri) as f, zipfile.ZipFile(f) as zf:
        return [n[: -len(".npy")] for n in zf.namelist() if n.endswith(".npy")]


def _read_header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = npy_format.read_magic(f)
    if version == (1, 0):
        return npy_format.read_array_header_1_0(f)
    if version == (2, 0):
        return npy_format.read_array_header_2_0(f)
    raise EvaluationInputError(f".npy format version {version} is not supported")


def npz_header(uri: str, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array of an ``.npz`` without reading its data."""
    with storage.open_read(uri) as f, zipfile.ZipFile(f) as zf, zf.open(f"{name}.npy") as a:
        shape, _, dtype = _read_header(a)
    return tuple(shape), dtype


def read_npz_rows(uri: str, name: str, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a C-ordered array in an ``.npz``, reading only those bytes
    (``np.savez`` stores members uncompressed, so the seek is cheap)."""
    try:
        return _read_npz_rows(uri, name, start, stop)
    except zipfile.BadZipFile as e:  # a shard cut short or overwritten since it was listed
        raise EvaluationInputError(f"{uri}: not a readable .npz ({e}); redraw the set") from None


def _read_npz_rows(uri: str, name: str, start: int, stop: int) -> np.ndarray:
    with storage.open_read(uri) as f, zipfile.ZipFile(f) as zf, zf.open(f"{name}.npy") as a:
        shape, fortran, dtype = _read_header(a)
        if fortran or dtype.hasobject:
            return np.load(io.BytesIO(storage.read_bytes(uri)))[name][start:stop]
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        a.seek(a.tell() + start * row)
        stop = min(stop, shape[0])
        data = a.read((stop - start) * row)
    return np.frombuffer(data, dtype=dtype).reshape((stop - start, *shape[1:]))


def read_parquet_images(uri: str) -> np.ndarray:
    """All images of one data shard as uint8 NHWC (PNG/JPEG bytes decoded with PIL)."""
    import pyarrow.parquet as pq
    from PIL import Image

    with storage.open_read(uri) as f:
        table = pq.read_table(f, columns=["image"])
    blobs = table.column("image").to_pylist()
    if not blobs:
        return np.zeros((0, 1, 1, 3), np.uint8)
    return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])


def read_unit(unit: Unit) -> np.ndarray:
    kind, uri, start, stop = unit
    if kind == "npz":
        return read_npz_rows(uri, "arr_0", start, stop)
    if kind == "parquet":
        return read_parquet_images(uri)
    raise EvaluationInputError(f"unknown work unit kind {kind!r}")


def read_unit_labels(unit: Unit) -> np.ndarray | None:
    """Class labels of a unit's images (``arr_1`` of an npz, ``label`` of a shard), or None
    where the input has none (e.g. an unlabelled reference batch)."""
    kind, uri, start, stop = unit
    if kind == "npz":
        if "arr_1" not in npz_members(uri):
            return None
        return np.asarray(read_npz_rows(uri, "arr_1", start, stop), dtype=np.int64)
    if kind == "parquet":
        import pyarrow.parquet as pq

        with storage.open_read(uri) as f:
            table = pq.read_table(f)
        if "label" not in table.column_names:
            return None
        return np.asarray(table.column("label").to_numpy(), dtype=np.int64)
    raise EvaluationInputError(f"unknown work unit kind {kind!r}")


def _manifest_dir(uri: str) -> str | None:
    base = uri[: -len("/manifest.json")] if uri.endswith("/manifest.json") else uri.rstrip("/")
    return base if storage.exists(storage.join(base, "manifest.json")) else None


def describe(uri: str, rows_per_unit: int = 1000) -> dict[str, Any]:
    """What ``uri`` holds: ``kind`` (images | features | samples | shards), ``num_images``,
    ``image_size`` (or None), ``units`` to extract, ``identity`` (bytes naming the content)."""
    base = _manifest_dir(uri)
    if base is not None:
        return _describe_manifest(base)
    if not uri.endswith(".npz"):
        raise EvaluationInputError(
            f"{uri}: not an .npz file nor a directory with manifest.json "
            f"({SAMPLES_FORMAT} or {SHARDS_FORMAT})"
        )
    if not storage.exists(uri):
        raise EvaluationInputError(f"{uri}: no such file")
    try:
        members = npz_members(uri)
    except zipfile.BadZipFile:
        raise EvaluationInputError(f"{uri}: not a valid .npz (zip) file") from None
    if "pool" in members:
        return {"kind": "features", "uri": uri, "members": members}
    if "arr_0" not in members:
        raise EvaluationInputError(
            f"{uri}: has neither arr_0 (images) nor pool/spatial (features); members: {members}"
        )
    shape, dtype = npz_header(uri, "arr_0")
    _check_image_header(uri, shape, dtype)
    n = shape[0]
    units = [("npz", uri, i, min(i + rows_per_unit, n)) for i in range(0, n, rows_per_unit)]
    return {
        "kind": "images",
        "uri": uri,
        "num_images": n,
        "image_size": shape[1],
        "units": units,
        "has_stats": all(k in members for k in STAT_KEYS),
        "identity": storage.content_hash(uri),
    }


def _check_image_header(uri: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
    if len(shape) != 4 or shape[-1] != 3:
        raise EvaluationInputError(f"{uri}: arr_0 must be uint8 [N, H, W, 3], got shape {shape}")
    if dtype != np.uint8:
        raise EvaluationInputError(
            f"{uri}: arr_0 must be uint8 in [0, 255], got {dtype} (convert samples with "
            "((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8))"
        )


def _describe_manifest(base: str) -> dict[str, Any]:
    raw = storage.read_bytes(storage.join(base, "manifest.json"))
    manifest = json.loads(raw)
    fmt = manifest.get("format")
    shards = manifest.get("shards", [])
    if fmt == SAMPLES_FORMAT:
        if manifest.get("complete") is False:
            raise EvaluationInputError(f"{base}: sample set is incomplete (complete=false)")
        shards = sorted(shards, key=lambda s: s.get("index", 0))
        kind, unit_kind, n = "samples", "npz", manifest.get("num_samples")
    elif fmt == SHARDS_FORMAT:
        kind, unit_kind, n = "shards", "parquet", manifest.get("num_images")
    else:
        raise EvaluationInputError(
            f"{base}/manifest.json: format {fmt!r}; expected {SAMPLES_FORMAT} or {SHARDS_FORMAT}"
        )
    units = [
        (unit_kind, storage.join(base, "shards", s["name"]), 0, int(s["rows"])) for s in shards
    ]
    if sum(u[3] for u in units) != n:
        raise EvaluationInputError(
            f"{base}: manifest lists {n} images but its shards hold {sum(u[3] for u in units)}"
        )
    return {
        "kind": kind,
        "uri": base,
        "num_images": n,
        "image_size": manifest.get("image_size"),
        "units": units,
        "has_stats": False,
        "identity": storage.sha256_bytes(raw),
    }


def check_reference(reference: str | None, required: bool = False) -> None:
    """The one check of ``evaluation.reference`` that every flow runs first (from the CLI or a
    deployment alike): a given reference must be readable before hours of work start."""
    if not reference:
        if required:
            raise ConfigError(
                "evaluation.reference: this flow scores against a reference batch; give one "
                "(--reference FILE or --set evaluation.reference=FILE)"
            )
        return
    try:
        describe(reference)
    except EvaluationInputError as e:
        raise ConfigError(
            f"evaluation.reference: {e} (give a reference batch .npz, a feature file, or a "
            "sample set / shard folder)"
        ) from None
