"""The manifest of a shard set (format ``admflow-shards/1``): what it holds, how it was made,
and every source item that was skipped and why."""

from __future__ import annotations

from tasks.data.preprocess import PREPROCESSING
from tasks.data.sources import ORDER, ShardError, Source

FORMAT = "admflow-shards/1"


def build_manifest(source: Source, dest: str, size: int, records: list[dict]) -> dict:
    skipped = sorted(
        [s for r in records for s in r["skipped"]] + list(source.ignored), key=lambda s: s["key"]
    )
    total = sum(r["rows"] for r in records)
    if total == 0:
        first = f" (first: {skipped[0]['key']}: {skipped[0]['reason']})" if skipped else ""
        raise ShardError(
            f"every one of the {len(source.keys)} files in {source.uri} failed to decode"
            f"{first}; no manifest was written"
        )
    counts: dict[str, int] = {}
    for r in records:
        for lab, c in r["counts"].items():
            counts[lab] = counts.get(lab, 0) + c
    conditional = source.kind in ("demo", "folder", "cifar10") or (
        source.kind == "npz" and bool(source.class_names)
    )
    return {
        "format": FORMAT,
        "image_size": size,
        "num_images": total,
        "num_classes": len(source.class_names) if conditional else None,
        "class_names": source.class_names,
        "counts_per_class": dict(sorted(counts.items(), key=lambda kv: int(kv[0]))),
        "preprocessing": {
            "description": PREPROCESSING,
            "image_size": size,
            "encoding": "png",
            "order": ORDER,
        },
        "source": {"uri": source.uri, "kind": source.kind, "fingerprint": source.fingerprint},
        "shards": [{"name": r["name"], "rows": r["rows"], "sha256": r["sha256"]} for r in records],
        "skipped": skipped,
        "uri": dest,
    }
