"""The bilinear baseline of the two-stage pipeline as a sample set of its own.

The learned upsampler (ADM-U) is worth its cost only if it beats simply resizing the base
samples. This stage writes the base set upscaled with :func:`models.resize.upsample_bilinear_uint8`
in the same sample-set format (shards, manifest, grid), so it is evaluated, cached and shown
exactly like the upsampler's output. It is cheap (no network), so it runs in the driver.
"""

from __future__ import annotations

import hashlib
from typing import Any

from admflow import storage
from models.resize import upsample_bilinear_uint8
from tasks.sampling import files as sample_io

VERSION = 1


def bilinear_set(base: str, out: str, size: int) -> dict[str, Any]:
    """Write ``base`` (a complete sample set) upscaled to ``size`` px under ``out``."""
    manifest = sample_io.read_manifest(base)
    if manifest is None or not manifest.get("complete"):
        raise storage.StorageError(f"{base}: no complete sample set to upscale")
    if size <= manifest["image_size"]:
        raise ValueError(
            f"{base}: images are {manifest['image_size']}px; upscaling needs a larger size, "
            f"got {size}"
        )
    payload = f"bilinear:{VERSION}:{manifest['fingerprint']}:{size}"
    fingerprint = hashlib.sha256(payload.encode()).hexdigest()[:20]
    done = sample_io.read_manifest(out)
    if done and done.get("complete") and done.get("fingerprint") == fingerprint:
        return {"uri": out, "num_samples": done["num_samples"], "grid": _grid(out)}
    new = sample_io.new_manifest(manifest["num_samples"], size, manifest["shard_size"], fingerprint)
    for entry in sorted(manifest["shards"], key=lambda s: s["index"]):
        images, labels = sample_io.read_shard(base, entry["index"])
        data = sample_io.encode_npz(upsample_bilinear_uint8(images, size), labels)
        storage.write_bytes(sample_io.shard_uri(out, entry["index"]), data)
        new["shards"].append(
            {
                "index": entry["index"],
                "name": sample_io.shard_name(entry["index"]),
                "rows": len(images),
                "sha256": storage.sha256_bytes(data),
            }
        )
    new["complete"] = True
    sample_io.write_manifest(out, new)
    metadata = {"kind": "bilinear", "base": base, "image_size": size, "fingerprint": fingerprint}
    storage.write_json(storage.join(out, "metadata.json"), metadata)
    return {"uri": out, "num_samples": new["num_samples"], "grid": _grid(out)}


def _grid(out: str) -> str:
    manifest = sample_io.read_manifest(out)
    assert manifest is not None
    return sample_io.write_grid(out, manifest)
