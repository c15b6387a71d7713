"""Sharding speed and memory: Ray (2 workers) against a plain single-process PIL loop.

Prints JSON. `speedup` = Ray images/s over the plain loop (goal >= 1.6x on 2 cores);
`rss_ratio` = peak resident memory (driver + Ray workers, summed over the process tree,
sampled every 50 ms) sharding 20,000 images over sharding 5,000 (goal within 15%).
Sources are synthetic 256x256 JPEGs; targets are 64x64 shards.

    python benchmarks/shard.py [--small N] [--large N]
"""

from __future__ import annotations

import argparse
import io
import json
import os
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
        Image.fromarray(tile).resize((256, 256), Image.BILINEAR).save(
            os.path.join(d, f"{i:06d}.jpg"), quality=90
        )


def plain_loop(root: str) -> float:
    """The same work (decode, preprocess, PNG-encode, Parquet) in one process, no Ray."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.shard import center_crop, encode_png

    t0 = time.perf_counter()
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
    return n / (time.perf_counter() - t0)


def ray_run(src: str, dest: str) -> float:
    from admflow.config import load_config
    from tasks.ray_utils import ensure_ray
    from tasks.shard import shard_dataset

    cfg = load_config(
        "tiny", ["data.image_size=64", "data.shard_rows=250", "compute.num_workers=2"]
    )
    ensure_ray(cfg)
    t0 = time.perf_counter()
    m = shard_dataset(cfg, src, dest, workers=2, progress=False)
    return m["num_images"] / (time.perf_counter() - t0)


def peak_tree_rss(cmd: list[str]) -> tuple[float, str]:
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
    peak = 0
    p = psutil.Process(proc.pid)
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            try:
                procs = [p, *p.children(recursive=True)]
                peak = max(peak, sum(q.memory_info().rss for q in procs if q.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, _ = proc.communicate()
    done.set()
    t.join()
    return peak / 2**20, out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--small", type=int, default=5000)
    ap.add_argument("--large", type=int, default=20000)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:  # measured subprocess: shard SRC into DEST on Ray, print images/s
        print(ray_run(*args.child))
        return
    work = tempfile.mkdtemp(prefix="admflow-bench-shard-")
    small, large = os.path.join(work, "small"), os.path.join(work, "large")
    make_jpegs(small, args.small)
    make_jpegs(large, args.large)
    plain = plain_loop(small)
    rss_small, out_small = peak_tree_rss(
        [sys.executable, __file__, "--child", small, os.path.join(work, "o1")]
    )
    rss_large, out_large = peak_tree_rss(
        [sys.executable, __file__, "--child", large, os.path.join(work, "o2")]
    )
    ray_ips = float(out_small.strip().splitlines()[-1])
    result = {
        "speedup": ray_ips / plain,
        "rss_ratio": rss_large / rss_small,
        "plain_images_per_s": plain,
        "ray_images_per_s": ray_ips,
        "ray_images_per_s_large": float(out_large.strip().splitlines()[-1]),
        "peak_rss_mib": {str(args.small): rss_small, str(args.large): rss_large},
        "cpus": os.cpu_count(),
        "goals": {"speedup": ">= 1.6", "rss_ratio": "<= 1.15"},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
