"""Sampling at scale: actor scaling and driver memory. Prints one JSON object.

* ``scaling_2x``: images/s of DDIM-25 on the bench-32 preset (11.3M-parameter 32x32 UNet,
  freshly initialised) with 1 actor x 1 thread and with 2 actors x 1 thread; goal >= 1.8x.
  Throughput is measured from the moment every actor has loaded its model to the last shard.
* ``rss_ratio``: peak RSS of the driver process sampling N=2,000 and N=20,000 images (with
  the merged .npz and grid), each in a fresh process; goal: within 15%. This part uses a small
  32x32 UNet and a single step so that 20,000 images take about a minute; the driver's memory
  does not depend on the model (actors are separate processes).

Run inside a loopback-only namespace on shared machines, e.g.
``RAY_ADDRESS=local unshare --net --fork sh -c 'ip link set lo up && python benchmarks/sample_scale.py'``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

RSS_MODEL = [
    "model.model_channels=32",
    "model.channel_mult=[1,1,1]",
    "model.num_res_blocks=1",
    "model.attention_resolutions=[8]",
    "model.num_head_channels=32",
    "sampling.shard_size=500",
    "sampling.batch_size=250",
    "compute.torch_threads=1",
]


def save_checkpoint(directory: Path, cfg) -> str:
    import torch

    from models.build import build_unet

    torch.manual_seed(0)
    net = build_unet(cfg.model)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), directory / "model.pt")
    meta = {"step": 0, "kind": "diffusion", "config": cfg.model_dump(mode="json")}
    (directory / "meta.json").write_text(json.dumps(meta))
    return str(directory)


def init_ray(num_cpus: int) -> None:
    import ray

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)


def scaling(tmp: Path, shards: int) -> dict:
    from admflow.config import load_config
    from tasks.sampling.build import build_spec
    from tasks.sampling.sample_set import sample_set
    from tasks.sampling.spec import ExecutionOptions

    overrides = ["sampling.shard_size=16", "sampling.batch_size=16", "compute.torch_threads=1"]
    cfg = load_config("bench-32", overrides)
    ckpt = save_checkpoint(tmp / "bench32", cfg)
    spec = build_spec(
        cfg, ckpt, num_samples=shards * 16,
        sampling={"timestep_respacing": "ddim25", "use_ema": False},
    )  # fmt: skip
    init_ray(num_cpus=2)
    out: dict = {"preset": "bench-32", "steps": "ddim25", "images": shards * 16}
    for workers in (1, 2):
        r = sample_set(
            cfg, spec, str(tmp / f"scale{workers}"),
            ExecutionOptions.from_config(cfg, workers=workers, progress=False),
        )  # fmt: skip
        out[f"images_per_s_{workers}x1"] = round(shards * 16 / r["sampling_seconds"], 3)
    out["speedup"] = round(out["images_per_s_2x1"] / out["images_per_s_1x1"], 3)
    out["goal"] = ">= 1.8"
    return out


def rss_child(n: int, out: str, ckpt: str) -> None:
    """One driver run; prints its peak RSS (the driver process only, not the actors)."""
    from admflow.config import load_config
    from tasks.sampling.build import build_spec
    from tasks.sampling.sample_set import sample_set
    from tasks.sampling.spec import ExecutionOptions

    cfg = load_config("tiny", RSS_MODEL)
    init_ray(num_cpus=2)
    start = time.perf_counter()
    spec = build_spec(
        cfg, ckpt, num_samples=n, sampling={"timestep_respacing": "1", "use_ema": False}
    )
    options = ExecutionOptions.from_config(cfg, workers=2, progress=False)
    r = sample_set(cfg, spec, out, options, merge=True)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"n": n, "peak_rss_mib": round(peak_kib / 1024, 1), "complete": r["complete"],
                      "seconds": round(time.perf_counter() - start, 1)}))  # fmt: skip


def rss(tmp: Path, sizes: list[int]) -> dict:
    from admflow.config import load_config

    ckpt = save_checkpoint(tmp / "rss-model", load_config("tiny", RSS_MODEL))
    runs = []
    for n in sizes:
        cmd = [sys.executable, __file__, "--rss-child", str(n), str(tmp / f"rss{n}"), ckpt]
        proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    ratio = runs[-1]["peak_rss_mib"] / runs[0]["peak_rss_mib"]
    return {
        "model": "tiny UNet, 32 ch, channel_mult [1,1,1], 1 step (driver memory only)",
        "image_size": 32,
        "runs": runs,
        "ratio": round(ratio, 3),
        "goal": "<= 1.15",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", type=int, default=4, help="shards of 16 images per scaling run")
    p.add_argument("--sizes", default="2000,20000", help="N for the driver-RSS runs")
    p.add_argument("--skip-scaling", action="store_true")
    p.add_argument("--skip-rss", action="store_true")
    p.add_argument("--rss-child", nargs=3, metavar=("N", "OUT", "CKPT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_child:
        n, out, ckpt = args.rss_child
        rss_child(int(n), out, ckpt)
        return
    with tempfile.TemporaryDirectory(prefix="sample-bench-") as d:
        tmp = Path(d)
        load_start = os.getloadavg()[0]
        details: dict = {}
        if not args.skip_rss:
            details["rss"] = rss(tmp, [int(s) for s in args.sizes.split(",")])
        if not args.skip_scaling:
            details["scaling"] = scaling(tmp, args.shards)
    # The two headline figures are plain numbers at the top; how they were measured follows.
    result = {
        "scaling_2x": details.get("scaling", {}).get("speedup"),
        "rss_ratio": details.get("rss", {}).get("ratio"),
        **details,
        "cpu_count": os.cpu_count(),
        "load_avg_start": load_start,
        "load_avg_end": os.getloadavg()[0],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
