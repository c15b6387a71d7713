"""CIFAR-10 in its own format: the python-pickle batches of ``cifar-10-batches-py``.

Each batch file is a pickled dict: ``data``, a uint8 array of N x 3072 (each row the 32x32 red,
green and blue planes, row-major) and ``labels``, N ints in 0..9; ``batches.meta`` names the
classes. SRC is the ``cifar-10-batches-py`` folder (the training set: ``data_batch_1`` to
``data_batch_5``) or one batch file (``test_batch`` for the test set), local or on object storage.

The format needs pickle, and unpickling may call any importable function; these files are read
by an unpickler that can build only dicts, lists, strings, numbers and numpy arrays, so a file
that asks for anything else is refused, not run.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from functools import lru_cache
from typing import Any

import numpy as np

from admflow import storage

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"
SIDE = 32
ROW = 3 * SIDE * SIDE
HINT = (
    "SRC must be the cifar-10-batches-py folder or one of its batch files (python version of "
    "CIFAR-10, https://www.cs.toronto.edu/~kriz/cifar.html)"
)

# What a CIFAR-10 pickle may build: numpy arrays (their reconstructor, class and dtype) and
# numpy scalars. Dicts, lists, bytes, str and ints are pickle opcodes and need no import.
# numpy 1 (which wrote the released files) named the module numpy.core, numpy 2 numpy._core.
_RECONSTRUCT: Any = np.ndarray((0,), np.uint8).__reduce__()[0]
_SCALAR: Any = np.int64(0).__reduce__()[0]
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.multiarray", "scalar"): _SCALAR,
    ("numpy._core.multiarray", "scalar"): _SCALAR,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class CifarError(ValueError):
    """A file that is not a CIFAR-10 batch; the message names it and the fix."""


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which is not allowed")
        return found


def is_cifar(src: str) -> bool:
    """Whether ``src`` names CIFAR-10 batches: a batch file's name, or a folder holding
    ``data_batch_1`` (one existence check)."""
    name = src.rstrip("/").rsplit("/", 1)[-1]
    if name in TRAIN_BATCHES or name == TEST_BATCH:
        return True
    try:
        return storage.exists(storage.join(src.rstrip("/"), TRAIN_BATCHES[0]))
    except Exception:  # unreachable storage: the folder source says why
        return False


def _read(uri: str) -> bytes:
    try:
        return storage.read_bytes(uri)
    except (FileNotFoundError, storage.StorageError) as e:
        raise CifarError(f"{uri}: cannot read ({e}); {HINT}") from None


def _unpickle(uri: str, data: bytes | None = None) -> Any:
    """The object pickled in ``uri`` (``data``: its bytes, when already read)."""
    data = _read(uri) if data is None else data
    try:
        return _ArraysOnly(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # truncated, not a pickle, or a pickle asking for code
        why = " ".join(str(e).split())[:200]  # pickle's own messages may span lines
        raise CifarError(
            f"{uri}: not a CIFAR-10 python batch ({type(e).__name__}: {why}); {HINT}"
        ) from None


def _field(batch: dict, name: str) -> Any:
    for key in (name.encode(), name):
        if key in batch:
            return batch[key]
    return None


def read_batch(uri: str, data: bytes | None = None) -> tuple[np.ndarray, list[int]]:
    """One batch file: its images (uint8 N x 32 x 32 x 3) and labels, checked (``data``: the
    file's bytes, when already read)."""
    batch = _unpickle(uri, data)
    if not isinstance(batch, dict):
        raise CifarError(f"{uri}: holds a {type(batch).__name__}, not a batch dict; {HINT}")
    data, labels = _field(batch, "data"), _field(batch, "labels")
    if not isinstance(data, np.ndarray) or labels is None:
        raise CifarError(f"{uri}: a CIFAR-10 batch holds 'data' (an array) and 'labels'; {HINT}")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != ROW:
        raise CifarError(
            f"{uri}: 'data' must be uint8 N x {ROW} (32x32 R, G, B planes), got {data.dtype} "
            f"{data.shape}; {HINT}"
        )
    try:
        ints = [int(v) for v in labels]
    except (TypeError, ValueError):
        raise CifarError(f"{uri}: 'labels' must be a list of ints; {HINT}") from None
    if len(ints) != len(data) or any(not 0 <= v < 10 for v in ints):
        raise CifarError(f"{uri}: 'labels' must hold one class 0..9 per row ({len(data)} rows)")
    images = data.reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), ints


@lru_cache(maxsize=2)
def _cached_images(uri: str, stamp: str) -> np.ndarray:
    """A worker's decoded batches, kept for the next shard (``stamp`` keys the content)."""
    return read_batch(uri)[0]


def _class_names(folder: str) -> list[str]:
    """``batches.meta``'s label names where the folder has it, else the ids."""
    meta = storage.join(folder, META) if folder else ""
    if meta and storage.exists(meta):
        found = _unpickle(meta)
        names = _field(found, "label_names") if isinstance(found, dict) else None
        if isinstance(names, list) and len(names) == 10:
            return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return [str(i) for i in range(10)]


def describe(src: str) -> tuple[list[str], list[int], list[str], str]:
    """Keys (``<batch>/<row>``), labels, class names and fingerprint of the batches ``src``
    names (all five training batches for the folder), in file and row order. Every batch is
    read and checked here, before any worker starts."""
    folder, files = _layout(src)
    if len(files) > 1:
        missing = [f for f in files if not storage.exists(f)]
        if missing:
            raise CifarError(f"{src}: no {missing[0].rsplit('/', 1)[-1]}; {HINT}")
    keys: list[str] = []
    labels: list[int] = []
    h = hashlib.sha256()
    for uri in files:
        raw = _read(uri)  # read once: checked, labelled and hashed
        found = read_batch(uri, raw)[1]
        batch = uri.rsplit("/", 1)[-1]
        keys += [f"{batch}/{i:05d}" for i in range(len(found))]
        labels += found
        h.update(f"{batch}\0{hashlib.sha256(raw).hexdigest()}\n".encode())
    return keys, labels, _class_names(folder), h.hexdigest()


def _layout(src: str) -> tuple[str, list[str]]:
    """The folder and the batch files ``src`` stands for."""
    src = src.rstrip("/")
    folder, _, name = src.rpartition("/")
    if name in TRAIN_BATCHES or name == TEST_BATCH:
        return folder, [src]
    return src, [storage.join(src, b) for b in TRAIN_BATCHES]


class CifarRows:
    """A source's images by index (its keys ``<batch>/<row>``), read from the batch files as a
    worker needs them; ``fingerprint`` is the source's, so a changed file is read again."""

    def __init__(self, src: str, keys: list[str], fingerprint: str):
        self.folder = _layout(src)[0]
        self.keys = keys
        self.fingerprint = fingerprint

    def __getitem__(self, index: int) -> np.ndarray:
        batch, row = self.keys[index].split("/")
        uri = storage.join(self.folder, batch)
        return _cached_images(uri, self.fingerprint)[int(row)]
