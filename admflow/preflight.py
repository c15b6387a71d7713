"""Checks a command makes before it starts anything expensive (Prefect, Ray, a model).

Each check raises :class:`~admflow.storage.StorageError` or :class:`~admflow.config.ConfigError`
with one line naming the input and the fix; the CLI prints it and exits 2.

- :func:`check_outputs`: every location a command will write is usable: a storage URI in an
  accepted form (admflow.uris), an existing S3 bucket (created only with
  ``storage.create_bucket``), a writable local directory (not on a read-only file system),
  and optionally enough free space.
- :func:`check_writable_dir`: the local half of that, without creating anything.
"""

from __future__ import annotations

import os
import shutil

from admflow import storage
from admflow.storage import StorageError, human_bytes, nearest_existing
from admflow.uris import UriError, check_uri_form, mask_uri


def _read_only(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def check_writable_dir(directory: str, what: str, fix: str | None = None) -> None:
    """``directory`` can be created (if missing) and written: checked on its closest existing
    ancestor, so nothing is created when the answer is no."""
    fix = fix or "point storage.root (or the output flag) at a writable directory"
    existing = nearest_existing(directory)
    if existing == os.path.abspath(directory) and os.path.isfile(existing):
        existing = os.path.dirname(existing)  # an output file that is overwritten
    if not os.path.isdir(existing):
        raise StorageError(f"{what}: {existing} is a file, not a directory; {fix}")
    if _read_only(existing):
        raise StorageError(f"{what}: {existing} is on a read-only file system; {fix}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StorageError(f"{what}: no permission to write in {existing}; {fix}")


def check_free_space(directory: str, need: int, what: str) -> None:
    existing = nearest_existing(directory)
    free = shutil.disk_usage(existing).free
    if free < need:
        raise StorageError(
            f"{what}: {existing} has {human_bytes(free)} free, {human_bytes(need)} needed; "
            "free space there or point storage.root elsewhere"
        )


def check_outputs(*uris: str | None, create_bucket: bool = False, need: int = 0) -> None:
    """Every URI a command will write is usable, before it starts: see the module doc.
    Buckets are created only when ``create_bucket`` (``storage.create_bucket``)."""
    for uri in (u for u in uris if u):
        try:
            check_uri_form(uri)
        except UriError as e:
            raise StorageError(str(e)) from None
        if uri.startswith("s3://"):
            storage.ensure_bucket(uri, create=create_bucket)
        elif not storage.is_remote(uri):
            path = storage.local_path(uri) or uri
            check_writable_dir(path, f"output {mask_uri(uri)}")
            if need:
                check_free_space(path, need, f"output {uri}")


def check_room_for_samples(out: str, num_samples: int, image_size: int, merge: bool) -> None:
    """A local sample set's images fit where they go (uint8 shards, and the merged .npz
    again with ``merge``): a full disk is one line before the first shard, not after it."""
    if storage.is_remote(out):
        return
    need = num_samples * image_size * image_size * 3 * (2 if merge else 1)
    check_free_space(storage.local_path(out) or out, need, f"sample set {out}")
