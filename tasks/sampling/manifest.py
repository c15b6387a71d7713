"""A sample set's manifest as the record of progress: which shards of which set are done.

The manifest names the set by its spec's fingerprint, so a rerun continues only the same
set, and a finished shard counts only while its file has the recorded checksum.
"""

from __future__ import annotations

import numpy as np

from admflow import storage
from tasks.sampling import files as sample_io
from tasks.sampling.spec import SampleSetSpec


def open_manifest(out: str, spec: SampleSetSpec) -> dict:
    """The manifest to continue: finished, verified shards of this same set (or a new one)."""
    fp = spec.fingerprint()
    old = sample_io.read_manifest(out)
    manifest = sample_io.new_manifest(spec.num_samples, spec.image_size, spec.shard_size, fp)
    if old is None:
        return manifest
    if old.get("fingerprint") != fp:
        raise storage.StorageError(
            f"{out} already holds a different sample set (fingerprint {old.get('fingerprint')},"
            f" this one is {fp}); choose another --out or remove it"
        )
    manifest["shards"] = sample_io.verified_shards(out, old)
    manifest["complete"] = len(manifest["shards"]) == manifest["num_shards"]
    return manifest


def record_shard(
    out: str, spec: SampleSetSpec, manifest: dict, index: int, images: np.ndarray, labels
) -> None:
    """Write shard ``index`` atomically, then list it in the manifest (in that order, so a
    listed shard always exists)."""
    if len(images) != spec.rows(index) or images.shape[1] != spec.image_size:
        raise RuntimeError(f"shard {index}: got images {images.shape}, expected {spec.rows(index)}")
    data = sample_io.encode_npz(images, labels)
    storage.write_bytes(sample_io.shard_uri(out, index), data)
    entry = {
        "index": index,
        "name": sample_io.shard_name(index),
        "rows": len(images),
        "sha256": storage.sha256_bytes(data),
    }
    manifest["shards"] = [s for s in manifest["shards"] if s["index"] != index] + [entry]
    sample_io.write_manifest(out, manifest)
