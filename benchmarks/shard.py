"""Sharding speed and memory: Ray (2 workers) against a plain single-process PIL loop.

Prints JSON. `speedup` = Ray images/s over the plain loop (goal >= 1.6x on 2 cores);
`rss_ratio` = peak resident memory of the driver plus its Ray worker processes (RSS
summed, sampled every 50 ms) sharding 20,000 images over sharding 5,000 (goal within 15%).
The Ray run is a subprocess that starts its own local Ray, so every Ray process is in its
process tree; workers are the tree's ``ray::``/``default_worker.py`` processes. The whole
tree (adding gcs_server, raylet and agents) is reported too as ``peak_tree_rss_mib``.
Shared pages (object store) count once per process that maps them, so both are upper bounds.
Sources are synthetic 256x256 JPEGs; targets are 64x64 shards. Ray's images/s exclude
Ray start-up (init plus two workers warmed with the shard imports, reported as
``ray_startup_s``): a flow starts Ray once for all stages. The plain loop's imports are
likewise outside its timing.

    python benchmarks/shard.py [--small N] [--large N]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def make_jpegs(root: str, n: int, classes: int = 10) -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    for i in range(n):
        d = os.path.join(root, f"class{i % classes:02d}")
        os.makedirs(d, exist_ok=True)
        tile = np.roll(base, i, axis=1)
        Image.fromarray(tile).resize((256, 256), Image.Resampling.BILINEAR).save(
            os.path.join(d, f"{i:06d}.jpg"), quality=90
        )


def plain_loop(root: str) -> tuple[float, float]:
    """The same work (decode, preprocess, PNG-encode, Parquet) in one process, no Ray."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.data.shard import center_crop, encode_png

    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    rows: list[bytes] = []
    for cls in sorted(os.listdir(root)):
        for f in sorted(os.listdir(os.path.join(root, cls))):
            with Image.open(os.path.join(root, cls, f)) as im:
                rows.append(encode_png(center_crop(im, 64)))
            n += 1
            if len(rows) == 1000:
                pq.write_table(pa.table({"image": rows}), io.BytesIO())
                rows = []
    return n / (time.perf_counter() - t0), (time.process_time() - c0) / n


def _warm() -> int:
    import PIL.JpegImagePlugin  # noqa: F401  (the imports a shard task needs)
    import pyarrow.parquet  # noqa: F401

    import tasks.data.shard  # noqa: F401

    return os.getpid()


def ray_run(src: str, dest: str) -> dict[str, float]:
    """Shard on Ray; time Ray start-up (init + two warmed workers) apart from the work,
    because a flow shares one Ray session between stages."""
    from admflow.config import load_config
    from tasks.data.shard import shard_dataset
    from tasks.runtime.ray_session import ensure_ray

    cfg = load_config(
        "tiny", ["data.image_size=64", "data.shard_rows=250", "compute.num_workers=2"]
    )
    t0 = time.perf_counter()
    ray = ensure_ray(cfg)
    warm = ray.remote(num_cpus=1)(_warm)
    pids: set[int] = set()
    while len(pids) < 2:  # both worker processes up and importing what shard tasks need
        pids |= set(ray.get([warm.remote() for _ in range(4)]))
    t1, c1 = time.perf_counter(), _tree_cpu_s()
    m = shard_dataset(cfg, src, dest, workers=2, progress=False)
    t2, c2 = time.perf_counter(), _tree_cpu_s()
    return {
        "images_per_s": m["num_images"] / (t2 - t1),
        "startup_s": t1 - t0,
        "work_s": t2 - t1,
        "cpu_s_per_image": (c2 - c1) / m["num_images"],
    }


def _tree_cpu_s() -> float:
    """CPU seconds (user + system) of this process and its Ray workers."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for q in [me, *(k for k in me.children(recursive=True) if _is_worker(k))]:
        try:
            t = q.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _is_worker(q) -> bool:
    import psutil

    try:
        return q.name().startswith("ray::") or "default_worker.py" in " ".join(q.cmdline())
    except psutil.Error:
        return False


def peak_rss(cmd: list[str]) -> tuple[float, float, str]:
    """Peak MiB of (driver + Ray workers) and of the whole process tree, and stdout."""
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
    peak_work = peak_tree = 0
    p = psutil.Process(proc.pid)
    done = threading.Event()

    def rss(q) -> int:
        try:
            return q.memory_info().rss
        except psutil.Error:
            return 0

    def sample():
        nonlocal peak_work, peak_tree
        while not done.is_set():
            try:
                kids = p.children(recursive=True)
            except psutil.Error:
                kids = []
            driver = rss(p)
            workers = sum(rss(q) for q in kids if _is_worker(q))
            peak_work = max(peak_work, driver + workers)
            peak_tree = max(peak_tree, driver + sum(rss(q) for q in kids))
            time.sleep(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, _ = proc.communicate()
    done.set()
    t.join()
    return peak_work / 2**20, peak_tree / 2**20, out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--small", type=int, default=5000)
    ap.add_argument("--large", type=int, default=20000)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:  # measured subprocess: shard SRC into DEST on Ray, print images/s
        print(json.dumps(ray_run(*args.child)))
        return
    work = tempfile.mkdtemp(prefix="admflow-bench-shard-")
    small, large = os.path.join(work, "small"), os.path.join(work, "large")
    make_jpegs(small, args.small)
    make_jpegs(large, args.large)
    load_before = os.getloadavg()[0]
    plain, plain_cpu = plain_loop(small)
    rss_small, tree_small, out_small = peak_rss(
        [sys.executable, __file__, "--child", small, os.path.join(work, "o1")]
    )
    rss_large, tree_large, out_large = peak_rss(
        [sys.executable, __file__, "--child", large, os.path.join(work, "o2")]
    )
    small_run = json.loads(out_small.strip().splitlines()[-1])
    large_run = json.loads(out_large.strip().splitlines()[-1])
    ray_ips = small_run["images_per_s"]
    result = {
        "speedup": round(ray_ips / plain, 3),
        "rss_ratio": round(rss_large / rss_small, 3),
        "plain_images_per_s": round(plain, 1),
        "ray_images_per_s": round(ray_ips, 1),
        "ray_images_per_s_large": round(large_run["images_per_s"], 1),
        "ray_startup_s": round(small_run["startup_s"], 1),
        # CPU per image is immune to other load on the machine: Ray's overhead shows here
        "cpu_ms_per_image": {
            "plain": round(plain_cpu * 1e3, 2),
            "ray": round(small_run["cpu_s_per_image"] * 1e3, 2),
        },
        "ray_work_s": {str(args.small): small_run["work_s"], str(args.large): large_run["work_s"]},
        "peak_rss_mib": {str(args.small): round(rss_small), str(args.large): round(rss_large)},
        "peak_tree_rss_mib": {
            str(args.small): round(tree_small),
            str(args.large): round(tree_large),
        },
        "tree_rss_ratio": round(tree_large / tree_small, 3),
        "cpus": os.cpu_count(),
        "load_average_1m": {"start": load_before, "end": os.getloadavg()[0]},
        "goals": {"speedup": ">= 1.6", "rss_ratio": "<= 1.15"},
    }
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
