"""Training throughput on this CPU for the bench-32 preset (11.3M-parameter 32x32 UNet) at
global batch 16, and for the demo's own model (``tiny``), all in one run:

* ``plain``: one process, all cores, fp32 NCHW, the real training step (data, L_hybrid,
  AdamW, EMA) through :class:`tasks.training.loop.Trainer` with a local session;
* ``tuned``: the same with bf16 autocast and channels_last;
* ``ray``: Ray Train, 2 workers x 1 thread (DDP over gloo), fp32, batch 8 per worker.

Every mode times the same ``--steps`` steps after ``--warmup`` untimed ones (Ray Train logs
each step's images/s; its figure is those steps' images over their summed step times).
``tiny``: the demo's 16px diffusion model at its batch, one Ray Train worker with the preset's
diffusion threads (as ``admflow demo`` trains it) against the same step in a plain process.
Prints JSON with images/s for each, ``speedup_tuned`` = tuned / plain and ``ray_ratio`` =
ray / plain. ``ray_over_ideal_split`` compares Ray Train with two single-thread processes
that never communicate (batch 8 each, measured in one process and doubled): the part of the
gap that is DDP and Ray, not the split of the cores.
Usage: ``python benchmarks/train.py [--steps N] [--warmup N] [--only tiny|bench-32]``
(``--only tiny``: the demo model's figures alone, about two minutes).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from admflow import storage
from admflow.config import load_config
from tasks.data.demo import CLASS_NAMES, render
from tasks.training.loop import LoopSpec, Trainer
from tasks.training.sessions import LocalSession

BASE = ["training.batch_size=16", "training.ema_rate=[0.9999]"]


def build_demo_shards(dest: str, per_class: int = 16, size: int = 32) -> str:
    """A small shard set (docs/ARCHITECTURE.md format) rendered from the demo shapes."""
    images, labels, keys = [], [], []
    for c, name in enumerate(CLASS_NAMES):
        for i in range(per_class):
            buf = io.BytesIO()
            Image.fromarray(render(c, i, size)).save(buf, format="PNG")
            images.append(buf.getvalue())
            labels.append(c)
            keys.append(f"{name}/{i:05d}")
    table = pa.table({"image": pa.array(images, pa.binary()), "label": labels, "key": keys})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(storage.join(dest, "shards", "shard-00000.parquet"), buf.getvalue())
    storage.write_json(
        storage.join(dest, "manifest.json"),
        {
            "format": "admflow-shards/1",
            "image_size": size,
            "num_images": len(keys),
            "num_classes": len(CLASS_NAMES),
            "class_names": list(CLASS_NAMES),
            "counts_per_class": {n: per_class for n in CLASS_NAMES},
            "preprocessing": {},
            "source": {"uri": "demo", "kind": "demo", "fingerprint": "bench"},
            "shards": [
                {
                    "name": "shard-00000.parquet",
                    "rows": len(keys),
                    "sha256": storage.sha256_bytes(buf.getvalue()),
                }
            ],
            "skipped": [],
        },
    )
    return dest


def local_images_per_s(
    root: str,
    data: str,
    overrides: list[str],
    steps: int,
    warmup: int,
    preset: str = "bench-32",
    base: tuple[str, ...] = tuple(BASE),
) -> float:
    cfg = load_config(preset, [*base, f"storage.root={root}", *overrides])
    spec = LoopSpec("diffusion", cfg.model_dump(mode="json"), data, f"{root}/runs/x", "x")
    trainer = Trainer(spec, LocalSession())
    for _ in range(warmup):
        trainer.train_step()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    return steps * cfg.training.batch_size / (time.perf_counter() - t0)


def ray_images_per_s(
    root: str,
    data: str,
    steps: int,
    warmup: int,
    preset: str = "bench-32",
    base: tuple[str, ...] = tuple(BASE),
    workers: int = 2,
) -> float:
    import ray

    from tasks.training.launch import train_diffusion

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    import mlflow

    total = warmup + steps
    cfg = load_config(
        preset,
        [
            *base,
            f"storage.root={root}",
            f"training.steps={total}",
            "training.log_every=1",  # one images/s figure per step (each log resets the meter)
            f"training.checkpoint_every={total}",
            f"compute.num_workers={workers}",
            "compute.cpus_per_worker=1",
            "compute.torch_threads=1",
        ],
    )
    out = train_diffusion(cfg, data, f"bench-ray-{preset}")
    history = mlflow.MlflowClient().get_metric_history(out["mlflow_run_id"], "images_per_s")
    per_step = {m.step: m.value for m in history}
    timed = [per_step[s] for s in range(warmup + 1, total + 1)]  # the same steps as plain
    batch = cfg.training.batch_size
    return len(timed) * batch / sum(batch / ips for ips in timed)


def tiny_throughput(tmp: str, steps: int, warmup: int) -> dict:
    """The demo's diffusion model as the demo trains it (the tiny preset: 16px, batch 32, one
    Ray Train worker with the preset's diffusion threads), through Ray Train and in a plain
    process with as many threads."""
    cfg = load_config("tiny")
    data = build_demo_shards(os.path.join(tmp, "tiny-data"), size=cfg.data.image_size)
    batch = cfg.training.batch_size
    threads = cfg.compute.threads_for("diffusion")
    torch.set_num_threads(threads)
    plain = local_images_per_s(tmp, data, [], steps, warmup, preset="tiny", base=())
    ray_ips = ray_images_per_s(tmp, data, steps, warmup, preset="tiny", base=(), workers=1)
    return {
        "global_batch": batch,
        "threads": threads,
        "images_per_s_plain": round(plain, 2),
        "steps_per_s_plain": round(plain / batch, 3),
        "images_per_s_ray_train": round(ray_ips, 2),
        "steps_per_s_ray_train": round(ray_ips / batch, 3),
        "ray_ratio": round(ray_ips / plain, 3),
        "demo_training_minutes_at_ray_rate": round(cfg.training.steps * batch / ray_ips / 60, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=16, help="timed steps per mode (default 16)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument(
        "--only",
        choices=("tiny", "bench-32"),
        help="measure one preset only (default: both; bench-32's modes take ~10 minutes)",
    )
    args = p.parse_args()
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    threads = os.cpu_count() or 1
    report: dict = {"steps_timed": args.steps, "torch": torch.__version__}
    report["machine"] = platform.machine()
    with tempfile.TemporaryDirectory(prefix="admflow-bench-train-") as tmp:
        if args.only != "tiny":
            report.update(bench32_throughput(tmp, threads, args.steps, args.warmup))
        if args.only != "bench-32":
            report["tiny"] = tiny_throughput(tmp, args.steps, args.warmup)
    print(json.dumps(report, indent=2))


def bench32_throughput(tmp: str, threads: int, steps: int, warmup: int) -> dict:
    """bench-32 at global batch 16: plain fp32, bf16 + channels_last, Ray Train 2x1."""
    data = build_demo_shards(os.path.join(tmp, "data"))
    torch.set_num_threads(threads)
    plain = local_images_per_s(tmp, data, [], steps, warmup)
    tuned = local_images_per_s(
        tmp, data, ["training.mixed_precision=bf16", "training.channels_last=true"], steps, warmup
    )
    # What two single-thread processes could reach with no communication at all:
    # separates the cost of splitting the cores from Ray Train's own overhead.
    torch.set_num_threads(1)
    one_thread = local_images_per_s(tmp, data, ["training.batch_size=8"], steps, warmup)
    torch.set_num_threads(threads)
    ray_ips = ray_images_per_s(tmp, data, steps, warmup)
    return {
        "preset": "bench-32",
        "global_batch": 16,
        "threads_single_process": threads,
        "images_per_s_plain_fp32": round(plain, 2),
        "images_per_s_bf16_channels_last": round(tuned, 2),
        "images_per_s_ray_2x1": round(ray_ips, 2),
        "speedup_tuned": round(tuned / plain, 3),
        "ray_ratio": round(ray_ips / plain, 3),
        "images_per_s_two_1thread_processes_ideal": round(2 * one_thread, 2),
        "ray_over_ideal_split": round(ray_ips / (2 * one_thread), 3),
        "note": "ray: fp32, 2 workers x 1 thread, gloo DDP, batch 8 per worker; every mode "
        "times the same steps_timed steps after the same warm-up; images/s over "
        "optimiser-step time (all-reduce included, reporting excluded)",
    }


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
