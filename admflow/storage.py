"""One storage layer over fsspec: local paths and ``file://`` by default, ``s3://`` via s3fs.

S3 endpoint and credentials come from the standard AWS environment variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...). Nothing here prints or logs them.

Atomic writes: local files are written to a hidden temporary name in the same directory
and renamed into place; S3 objects become visible only when the upload completes (a
single PUT or a completed multipart upload), so readers never see a partial object.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from typing import IO, Any

import fsspec

from admflow.uris import mask_text

_S3_ENV = "AWS_ENDPOINT_URL"


class StorageError(RuntimeError):
    """A storage location that cannot be reached or used; the message names it and the fix."""


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def _s3_options() -> dict[str, Any]:
    opts: dict[str, Any] = {}
    endpoint = os.environ.get(_S3_ENV) or os.environ.get("AWS_ENDPOINT_URL_S3")
    if endpoint:
        opts["endpoint_url"] = endpoint
    return opts


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``uri`` and the path inside it."""
    if uri.startswith("s3://"):
        import s3fs

        fs = s3fs.S3FileSystem(**_s3_options())
        return fs, uri[len("s3://") :]
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if "://" in uri:
        fs, path = fsspec.core.url_to_fs(uri)
        return fs, path
    return fsspec.filesystem("file"), os.path.abspath(uri)


def pyarrow_filesystem(uri: str):
    """A pyarrow filesystem bound to the same endpoint as :func:`filesystem` (pyarrow's
    native S3 filesystem ignores AWS_ENDPOINT_URL, so wrap the fsspec one)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    if uri.startswith("s3://"):
        # Only the endpoint is bound: this object is pickled into Ray (object store, Train
        # run state), so no credentials in it; each process finds its own through the usual
        # AWS chain (environment, credentials file, instance role).
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
    return pafs.LocalFileSystem(), path


def _describe(uri: str, err: Exception) -> StorageError:
    hint = ""
    if uri.startswith("s3://"):
        bucket = uri[5:].split("/", 1)[0]
        endpoint = os.environ.get(_S3_ENV, "AWS")
        hint = (
            f" (bucket {bucket!r} at endpoint {endpoint}: check that the bucket exists and that "
            f"{_S3_ENV} and the AWS credential variables are set)"
        )
    return StorageError(mask_text(f"storage error at {uri}: {type(err).__name__}: {err}{hint}"))


def nearest_existing(path: str) -> str:
    """``path`` or its closest ancestor that exists (what a write there would create under)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def disk_full(path: str, err: OSError, size: int | None = None) -> StorageError:
    """The one-line error for a local write that failed for lack of space (naming the space
    needed when known) or on a read-only file system."""
    if err.errno == errno.EROFS:
        return StorageError(
            f"cannot write {path}: read-only file system; point storage.root (or the output "
            "flag) at a writable directory"
        )
    existing = nearest_existing(os.path.dirname(path))
    free = shutil.disk_usage(existing).free
    need = f"{human_bytes(size)} needed, " if size is not None else ""
    return StorageError(
        f"no space left on the device writing {path} ({need}{human_bytes(free)} free in "
        f"{existing}); free space there or point storage.root elsewhere"
    )


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    try:
        return bool(fs.exists(path))
    except Exception as e:  # network errors, missing bucket
        raise _describe(uri, e) from e


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    if not is_remote(uri):
        fs.makedirs(path, exist_ok=True)


def ls(uri: str, suffix: str = "") -> list[str]:
    """Sorted URIs of the objects directly under ``uri`` (empty if it does not exist)."""
    fs, path = filesystem(uri)
    try:
        if not fs.exists(path):
            return []
        names = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    except Exception as e:
        raise _describe(uri, e) from e
    base = uri.rstrip("/")
    out = [join(base, n.rstrip("/").rsplit("/", 1)[-1]) for n in names]
    return sorted(u for u in out if u.endswith(suffix))


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise _describe(uri, e) from e


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


@contextlib.contextmanager
def open_read(uri: str) -> Iterator[IO[bytes]]:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        yield f


@contextlib.contextmanager
def open_atomic(uri: str, size: int | None = None) -> Iterator[IO[bytes]]:
    """Write a file so that readers see either nothing or the whole object. A full disk or
    a read-only store is a :class:`StorageError` naming the file (and ``size``, the bytes
    needed, when the caller knows it)."""
    fs, path = filesystem(uri)
    if is_remote(uri):
        buf = io.BytesIO()
        yield buf
        try:
            fs.pipe_file(path, buf.getvalue())
        except Exception as e:
            raise _describe(uri, e) from e
        return
    directory = os.path.dirname(path)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.errno not in _FULL:
            raise
        raise disk_full(path, e, size) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(uri: str, data: bytes) -> None:
    with open_atomic(uri, size=len(data)) as f:
        f.write(data)


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True).encode())


def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_hash(uri: str) -> str:
    """SHA-256 of an object's bytes, streamed."""
    h = hashlib.sha256()
    with open_read(uri) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ensure_bucket(uri: str, create: bool = False) -> None:
    """Check that the S3 bucket of ``uri`` exists; create it only when asked (a typo'd bucket
    name must fail, not become a new bucket). Local directories are simply made."""
    if not uri.startswith("s3://"):
        makedirs(uri)
        return
    fs, path = filesystem(uri)
    bucket = path.split("/", 1)[0]
    try:
        if fs.exists(bucket):
            return
        if create:
            fs.mkdir(bucket)
            return
    except Exception as e:
        raise _describe(uri, e) from e
    raise StorageError(
        f"bucket {bucket!r} does not exist at endpoint {os.environ.get(_S3_ENV, 'AWS')}; check "
        "the name, or let admflow create it with --create-bucket (storage.create_bucket=true)"
    )


def local_path(uri: str) -> str | None:
    """The filesystem path of a local URI, or None for remote ones."""
    if is_remote(uri):
        return None
    return filesystem(uri)[1]
