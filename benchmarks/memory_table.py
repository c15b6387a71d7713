"""The tables of docs/memory.md: activation bytes per image of every paper network, and every
paper preset's GPU stages against the per-GPU budget (the memory model, tasks/memory.py).

    python benchmarks/memory_table.py                 # both tables, markdown
    python benchmarks/memory_table.py --json          # the same numbers as JSON
    python benchmarks/memory_table.py --presets imagenet64 imagenet256
    python benchmarks/memory_table.py --write-profiles  # after a change to the networks' code

Counted on fake tensors: no GPU, no memory; seconds per network.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from admflow.config import list_presets, load_config
from models.memory import network_pass, profile, weights
from tasks.memory import GIB, HEADER, PROFILE_TABLE, estimate_memory, write_profile_table

DEMO = {"tiny", "bench-32"}
NETWORKS = [  # (label, preset, section)
    ("ADM ImageNet 64", "imagenet64", "model"),
    ("ADM ImageNet 128", "imagenet128", "model"),
    ("ADM ImageNet 256", "imagenet256", "model"),
    ("ADM ImageNet 512", "imagenet512", "model"),
    ("ADM LSUN 256 (dropout)", "lsun-bedroom", "model"),
    ("ADM-U 64->256", "upsampler64-256", "upsampler"),
    ("ADM-U 128->512", "upsampler128-512", "upsampler"),
    ("classifier 64", "imagenet64", "classifier"),
    ("classifier 128", "imagenet128", "classifier"),
    ("classifier 256", "imagenet256", "classifier"),
    ("classifier 512", "imagenet512", "classifier"),
    ("demo UNet 16", "tiny", "model"),
    ("demo classifier 16", "tiny", "classifier"),
    ("demo ADM-U 16->32", "tiny", "upsampler"),
    ("bench UNet 32", "bench-32", "model"),
]
VARIANTS = [("fp32", False, False), ("fp16", True, False), ("fp16 +ckpt", True, True)]


def network_row(label: str, preset: str, section_name: str) -> dict[str, Any]:
    section = getattr(load_config(preset), section_name)
    row: dict[str, Any] = {"network": label, "params_M": round(weights(section)[0] / 1e6, 1)}
    for name, half, ckpt in VARIANTS:
        if ckpt and section_name == "classifier":
            continue  # the classifier has no checkpointing switch
        prof = profile(*network_pass(section, use_checkpoint=ckpt), "train", half, batches=(1, 2))
        row[f"{name} saved"] = float(f"{prof.saved_per_image / GIB:.3g}")
        row[f"{name} peak"] = float(f"{prof.peak_per_image / GIB:.3g}")
    return row


def markdown(rows: list[dict[str, Any]]) -> list[str]:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    out += ["| " + " | ".join(str(r.get(k, "-")) for k in keys) + " |" for r in rows]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--presets", nargs="*", default=None)
    p.add_argument("--no-networks", action="store_true")
    p.add_argument(
        "--write-profiles",
        action="store_true",
        help="count every preset's stages and rewrite tasks/memory_profiles.json (the counts "
        "--plan reads instead of counting)",
    )
    a = p.parse_args()
    if a.write_profiles:
        n = write_profile_table([load_config(name) for name in list_presets()])
        print(f"{PROFILE_TABLE}: {n} profiles")
        return
    presets = a.presets if a.presets is not None else [p for p in list_presets() if p not in DEMO]
    nets = [] if a.no_networks else [network_row(*n) for n in NETWORKS]
    stages = []
    for name in presets:
        est = estimate_memory(load_config(name))
        for s in est.stages:
            stages.append({"preset": name, **dict(zip(STAGE_KEYS, s.row()[:-1], strict=True))})
    if a.json:
        print(json.dumps({"networks": nets, "stages": stages}, indent=1))
        return
    print("\n".join(markdown(nets) + [""] + markdown(stages)))


STAGE_KEYS = HEADER[:-1]  # the memory model's own table columns, less "fits"

if __name__ == "__main__":
    main()
