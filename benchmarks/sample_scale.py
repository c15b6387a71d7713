"""Sampling at scale: actor scaling and driver memory. Prints one JSON object.

* ``scaling_2x``: images/s of DDIM-25 on the bench-32 preset (11.3M-parameter 32x32 UNet,
  freshly initialised) with 1 actor x 1 thread and with 2 actors x 1 thread; goal >= 1.8x.
  Throughput is measured from the moment every actor has loaded its model to the last shard.
* ``rss_ratio``: peak RSS of the driver process sampling N=2,000 and N=20,000 images (with
  the merged .npz and grid), each in a fresh process; goal: within 15%. This part uses a small
  32x32 UNet and a single step so that 20,000 images take about a minute; the driver's memory
  does not depend on the model (actors are separate processes).

* ``--full``: a real 50,000-image set of the demo's 16px model, drawn through ``admflow
  sample`` on two actors with a SIGKILL of the driver about half-way and a rerun; checks that
  the set holds exactly N images, that every shard finished before the kill is kept byte for
  byte, that a sample of shards (one drawn after the kill among them) equals the same shards
  drawn again without interruption, and that the driver's RSS stays within 1.15x between 10%
  and 100% of each run; reports object-store and disk use; then ``admflow evaluate`` of
  ``--score-samples`` of the images against the demo's reference, with the arithmetic for all
  N. Give ``--checkpoint`` of a demo run (its ``step-NNNNNN`` directory) to skip training.
  Takes about an hour on 2 cores; exits 1 when a check fails.

Run inside a loopback-only namespace on shared machines, e.g.
``RAY_ADDRESS=local unshare --net --fork sh -c 'ip link set lo up && python benchmarks/sample_scale.py'``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
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


# ---------------------------------------------------------------------------- --full

ADMFLOW = str(Path(sys.executable).with_name("admflow"))
# The few-step solver of the full run: in the README's sampler table UniPC is the best
# sampler at 10 network evaluations (FID 167.7, 1.03x DDIM at 25 and 1.05x its own 50-NFE
# 159.4); 15 evaluations (161.5, DPM-Solver++(2M) 160.8) would be within 1% of 50 NFE at
# 1.5x the time, which a shared 2-core machine does not give a 50,000-image run.
SOLVER = ("unipc", 10)
SOLVER_WHY = (
    "README sampler table: UniPC is the best at 10 NFE (FID 167.7, 1.03x DDIM-25's 162.6, "
    "1.05x its 50-NFE 159.4); 15 NFE (161.5) would cost 1.5x the time"
)


def cli_env() -> dict[str, str]:
    """The CLIs' environment: a Ray address only where a command is given one by --set."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def cli(*args: str) -> dict:
    """One admflow command in a subprocess; the JSON object it prints ({} when none)."""
    proc = subprocess.run([ADMFLOW, *args], capture_output=True, text=True, env=cli_env())
    if proc.returncode != 0:
        raise SystemExit(f"admflow {args[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout[proc.stdout.index("{") :]) if "{" in proc.stdout else {}


def demo_model(args: argparse.Namespace, work: Path) -> tuple[str, str, str, dict]:
    """(checkpoint, 16px reference shards, storage root, how the model was made)."""
    from admflow.config import load_config

    if args.fresh_model:  # tests: a freshly initialised demo network, no reference
        cfg = load_config(args.config)
        return save_checkpoint(work / "fresh", cfg), "", str(work / "store"), {"fresh": True}
    if args.checkpoint:
        ckpt = os.path.abspath(args.checkpoint)
        store = args.store or str(Path(ckpt).parents[3])  # STORE/runs/RUN/checkpoints/step-N
        reference = args.reference or demo_reference(store)
        meta = json.loads((Path(ckpt) / "meta.json").read_text())
        return ckpt, reference, store, {"checkpoint": ckpt, "step": meta.get("step")}
    store = args.store or str(work / "store")
    root = f"storage.root={store}"
    data = f"{store}/data/demo16"  # the demo's 16px set: training data and reference
    cli("shard", "demo", data, "--config", args.config, "--set", root, "--no-progress")
    start = time.perf_counter()
    run = cli("train", "diffusion", "--config", args.config, "--set", root, "--data", data)
    made = {"trained_steps": run["step"], "train_seconds": round(time.perf_counter() - start)}
    return run["checkpoint"], data, store, made


def demo_reference(store: str) -> str:
    """The demo's 16px shard set in its store (the base model's reference)."""
    for manifest in sorted(Path(store, "data").glob("*/manifest.json")):
        if json.loads(manifest.read_text()).get("image_size") == 16:
            return str(manifest.parent)
    raise SystemExit(f"no 16px shard set under {store}/data: pass --reference")


def sample_overrides(args: argparse.Namespace, store: str, address: str) -> list[str]:
    sampler, steps = SOLVER if not args.solver_steps else (SOLVER[0], args.solver_steps)
    return [
        f"storage.root={store}",
        f"compute.ray_address={address}",
        f"sampling.sampler={sampler}",
        "sampling.timestep_respacing=''",  # the solver picks its steps from all 1000
        f"sampling.solver_steps={steps}",
        f"sampling.num_samples={args.num_samples}",
        "sampling.workers=2",
        "compute.torch_threads=1",
        # its own MLflow experiment: a demo store copied elsewhere keeps the demo's experiment
        # with artifacts at the old location, which sample refuses
        "tracking.experiment=sample-scale",
    ]


def read_progress(out: Path) -> tuple[int, int]:
    """(finished shards, images in them) as the set's manifest records them."""
    try:
        shards = json.loads((out / "manifest.json").read_text())["shards"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0, 0
    return len(shards), sum(s["rows"] for s in shards)


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def plasma_usage(address: str) -> dict | None:
    """The object store's use as ``ray memory --stats-only`` reports it (this node)."""
    import re

    from ray._private.internal_api import memory_summary

    try:
        text = memory_summary(address=address, stats_only=True)
    except Exception as e:  # the stats are a report, never a reason to stop the run
        return {"error": str(e)[:200]}
    used = re.search(r"Plasma memory usage (\d+) MiB, (\d+) objects", text)
    spilled = re.search(r"Spilled (\d+) MiB", text)
    return {
        "plasma_mib": int(used.group(1)) if used else None,
        "objects": int(used.group(2)) if used else None,
        "spilled_mib": int(spilled.group(1)) if spilled else 0,
    }


def drive(cmd: list[str], out: Path, total: int, kill_at: int | None, interval: float,
          address: str) -> dict:  # fmt: skip
    """Run the sampling CLI, sample its RSS and the set's progress every ``interval`` s; with
    ``kill_at``, SIGKILL it once the manifest lists that many shards."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env()
    )
    start, samples, stores, last_store = time.perf_counter(), [], [], 0.0
    killed = None
    while proc.poll() is None:
        shards, images = read_progress(out)
        rss = rss_mib(proc.pid)
        if rss is not None:
            samples.append((round(time.perf_counter() - start, 1), images, round(rss, 1)))
        if time.perf_counter() - last_store > 30:
            stores.append(plasma_usage(address))
            last_store = time.perf_counter()
        if kill_at is not None and shards >= kill_at:
            os.kill(proc.pid, signal.SIGKILL)
            killed = shards
            break
        time.sleep(interval)
    stdout, stderr = proc.communicate()
    record = {"seconds": round(time.perf_counter() - start, 1), "rc": proc.returncode,
              "rss": samples, "object_store": [s for s in stores if s]}  # fmt: skip
    if killed is not None:
        record["killed_after_shards"] = killed
    elif proc.returncode == 0:
        record["result"] = json.loads(stdout[stdout.index("{") :])
    else:
        raise SystemExit(f"admflow sample failed ({proc.returncode}): {stderr[-3000:]}")
    record["rss_ratio"] = rss_ratio(samples, total)
    return record


def rss_ratio(samples: list, total: int) -> float | None:
    """Largest RSS over the RSS when 10% of the set was done, from that point to the end."""
    if not samples:
        return None
    first = samples[0][1]
    mark = first + 0.1 * (total - first)  # 10% of what this run has to draw
    late = [rss for _t, images, rss in samples if images >= mark]
    return round(max(late) / late[0], 3) if late else None


def shard_hashes(out: Path) -> dict[str, str]:
    import hashlib

    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((out / "shards").glob("samples-*.npz"))
    }


def redraw(args: argparse.Namespace, ckpt: str, overrides: list[str], indices: list[int]) -> dict:
    """Shards ``indices`` of the same set drawn again in this process, uninterrupted, by the
    code the actors run; their sha256 and the set's fingerprint."""
    import hashlib

    from admflow import storage
    from admflow.config import load_config
    from tasks.sampling.build import build_spec
    from tasks.sampling.files import encode_npz
    from tasks.sampling.spec import ExecutionOptions, draw_labels, sampler_spec
    from tasks.sampling.worker import ShardSampler

    cfg = load_config(args.config, overrides)
    spec = build_spec(cfg, ckpt, classifier=None, scale=0.0)
    options = ExecutionOptions(workers=1, torch_threads=1, device="cpu", progress=False)
    sampler = ShardSampler(
        sampler_spec(spec, options), storage.read_bytes(spec.model.weights), None
    )
    classes = list(spec.classes) if spec.classes else None
    hashes = {}
    for i in indices:
        images, labels = sampler.sample(i, draw_labels(spec.seed, i, spec.rows(i), classes))
        hashes[f"samples-{i:05d}.npz"] = hashlib.sha256(encode_npz(images, labels)).hexdigest()
    return {"fingerprint": spec.fingerprint(), "sha256": hashes}


def write_subset(out: Path, n: int, dest: Path) -> tuple[str, int]:
    """The first ``n`` images of the set (shard order) as one ADM .npz batch."""
    import numpy as np

    from tasks.sampling.files import decode_npz

    images, labels, have = [], [], 0
    for path in sorted((out / "shards").glob("samples-*.npz")):
        imgs, labs = decode_npz(path.read_bytes())
        images.append(imgs[: n - have])
        labels.append(labs[: n - have])
        have += len(images[-1])
        if have >= n:
            break
    np.savez(dest, np.concatenate(images), np.concatenate(labels))
    return str(dest), have


def score(args: argparse.Namespace, out: Path, reference: str, store: str, work: Path) -> dict:
    """``admflow evaluate`` of a small and a ``--score-samples`` subset: the wall time of each,
    and from the two the fixed cost, the cost per image and the estimate for the whole set.
    Each run's record is kept in the work directory and reused by a later ``--score-only``
    (its features are cached by then, so timing it again would measure nothing)."""
    runs = []
    for n in sorted({min(args.score_small, args.score_samples), args.score_samples}):
        record = work / f"scored-{n}.json"
        if record.exists():
            runs.append(json.loads(record.read_text()))
            continue
        batch, n = write_subset(out, n, work / f"subset-{n}.npz")
        load, start = [round(x, 2) for x in os.getloadavg()], time.perf_counter()
        metrics = cli("evaluate", reference, batch, "--json", "--no-mlflow", "--config",
                      args.config, "--set", f"storage.root={store}", "--workers", "2")  # fmt: skip
        runs.append({"images": n, "seconds": round(time.perf_counter() - start, 1),
                     "metrics": {k: v for k, v in metrics.items() if isinstance(v, float)},
                     "load_avg_start": load,
                     "load_avg_end": [round(x, 2) for x in os.getloadavg()]})  # fmt: skip
        record.write_text(json.dumps(runs[-1], indent=2))
    result: dict = {"reference": reference, "workers": 2, "runs": runs}
    if len(runs) == 2:
        (n1, t1), (n2, t2) = [(r["images"], r["seconds"]) for r in runs]
        per = (t2 - t1) / (n2 - n1)
        fixed = t1 - per * n1
        if per <= 0 or fixed < 0:  # the load changed between the runs: no line through them
            per, fixed = t2 / n2, 0.0  # the larger run's wall time per image, an upper bound
            result["fit"] = "none (load changed between runs): larger run's seconds per image"
        result |= {
            "seconds_per_image": round(per, 4),
            "fixed_seconds": round(fixed, 1),
            "estimate_seconds_all": round(fixed + per * args.num_samples),
            "arithmetic": f"{fixed:.1f} s + {args.num_samples} x {per:.4f} s/image "
            f"= {fixed + per * args.num_samples:.0f} s for all {args.num_samples}",
        }
    return result


def full(args: argparse.Namespace, work: Path) -> dict:
    import ray

    ckpt, reference, store, made = demo_model(args, work)
    # One Ray node for both drivers, started here so that it outlives the killed driver and
    # its object store can be read (the CLI's own local Ray would end with it).
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=256 * 2**20)  # fmt: skip
    address = ray.get_runtime_context().gcs_address
    overrides = sample_overrides(args, store, address)
    out = work / "set"
    cmd = [ADMFLOW, "sample", "--config", args.config, "--checkpoint", ckpt, "--out", str(out),
           "--no-progress", *[a for o in overrides for a in ("--set", o)]]  # fmt: skip
    shard_size = load_shard_size(args.config)
    num_shards = -(-args.num_samples // shard_size)
    first = drive(cmd, out, args.num_samples, num_shards // 2, args.interval, address)
    listed = json.loads((out / "manifest.json").read_text())["shards"]
    before = shard_hashes(out)
    finished = {s["name"]: s["sha256"] for s in listed}
    second = drive(cmd, out, args.num_samples, None, args.interval, address)
    after = shard_hashes(out)
    result = second.get("result", {})
    kill = first.get("killed_after_shards", 0)
    picks = sorted({0, num_shards // 2 - 1, min(kill + 1, num_shards - 1), num_shards - 1})
    again = redraw(args, ckpt, overrides, picks[: args.redraw + 1])
    images = sum(s["rows"] for s in json.loads((out / "manifest.json").read_text())["shards"])
    checks = {
        "exactly_n_images": images == args.num_samples == count_images(out),
        "killed_half_way": 0 < kill < num_shards,
        "finished_shards_kept": all(before.get(n) == h == after.get(n) for n, h in finished.items())
        and result.get("shards_skipped") == len(finished),
        "same_set": again["fingerprint"] == result.get("fingerprint"),
        "redrawn_shards_identical": all(after.get(n) == h for n, h in again["sha256"].items()),
        "driver_rss_flat": all((r["rss_ratio"] or 9) <= 1.15 for r in (first, second)),
    }
    sampled = {
        "model": made,
        "sampler": {
            "name": overrides[2].split("=")[1],
            "nfe": int(overrides[4].split("=")[1]),
            "why": SOLVER_WHY,
        },  # fmt: skip
        "num_samples": args.num_samples,
        "shard_size": shard_size,
        "checks": checks,
        "kill": {
            "after_shards": kill,
            "of": num_shards,
            "seconds": first["seconds"],
            "shard_files_before_rerun": len(before),
            "listed_before_rerun": len(finished),
        },  # fmt: skip
        "rerun": {
            k: result.get(k)
            for k in (
                "shards_sampled",
                "shards_skipped",
                "actor_restarts",
                "complete",
                "fingerprint",
            )
        }
        | {"seconds": second["seconds"]},  # fmt: skip
        "images_per_s": round(args.num_samples / (first["seconds"] + second["seconds"]), 2),
        "redrawn": again["sha256"],
        "driver_rss_mib": {
            name: summarise_rss(r) for name, r in (("killed", first), ("rerun", second))
        },
        "object_store": first["object_store"][-1:] + second["object_store"][-1:],
        "object_store_peak_mib": max(
            (s.get("plasma_mib") or 0 for s in first["object_store"] + second["object_store"]),
            default=None,
        ),  # fmt: skip
        "disk_bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
        "sampling_load_avg": {"start": args.load_start, "end": os.getloadavg()},
    }
    (work / "sampled.json").write_text(json.dumps(sampled, indent=2))  # kept if scoring stops
    return sampled | {
        "evaluate": score(args, out, reference, store, work) if args.score_samples else None
    }


def load_shard_size(config: str) -> int:
    from admflow.config import load_config

    return load_config(config).sampling.shard_size


def count_images(out: Path) -> int:
    """Images in the shard files themselves (not the manifest's count)."""
    import numpy as np

    total = 0
    for path in (out / "shards").glob("samples-*.npz"):
        with np.load(path) as z:
            total += len(z["arr_0"])
    return total


def summarise_rss(run: dict) -> dict:
    rss = [r for _t, _i, r in run["rss"]]
    return {"samples": len(rss), "min": min(rss, default=None), "max": max(rss, default=None),
            "last": rss[-1] if rss else None, "ratio_10_to_100": run["rss_ratio"]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", type=int, default=4, help="shards of 16 images per scaling run")
    p.add_argument("--sizes", default="2000,20000", help="N for the driver-RSS runs")
    p.add_argument("--skip-scaling", action="store_true")
    p.add_argument("--skip-rss", action="store_true")
    p.add_argument("--rss-child", nargs=3, metavar=("N", "OUT", "CKPT"), help=argparse.SUPPRESS)
    add_full_args(p)
    args = p.parse_args()
    if args.full:
        run_full(args)
        return
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


def add_full_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("--full: a real sample set, killed half-way, resumed and scored")
    g.add_argument("--full", action="store_true", help="run the full benchmark (about an hour)")
    g.add_argument("--num-samples", type=int, default=50_000, help="images in the set")
    g.add_argument("--checkpoint", help="a demo run's step-NNNNNN directory (else: train it)")
    g.add_argument("--reference", help="16px reference shards (default: the checkpoint's store)")
    g.add_argument("--store", help="storage root (default: the checkpoint's store)")
    g.add_argument("--config", default="tiny", help="the demo's preset")
    g.add_argument("--solver-steps", type=int, help=f"NFEs of {SOLVER[0]} (default {SOLVER[1]})")
    g.add_argument("--score-samples", type=int, default=10_000, help="images scored (0: none)")
    g.add_argument("--score-small", type=int, default=1_000, help="the small scoring run")
    g.add_argument("--redraw", type=int, default=3, help="shards drawn again uninterrupted")
    g.add_argument("--interval", type=float, default=2.0, help="seconds between RSS samples")
    g.add_argument("--workdir", help="where the set goes (default: a temporary directory)")
    g.add_argument("--fresh-model", action="store_true", help=argparse.SUPPRESS)
    g.add_argument(
        "--score-only", action="store_true", help="only score the set already drawn in --workdir"
    )


def run_full(args: argparse.Namespace) -> None:
    import platform

    load_start = args.load_start = os.getloadavg()
    start = time.perf_counter()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sample-full-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.score_only:  # the scoring of a set that an earlier --full run drew in --workdir
        _ckpt, reference, store, _made = demo_model(args, work)
        drawn = work / "sampled.json"  # absent while that run is still drawing
        sampled = json.loads(drawn.read_text()) if drawn.exists() else {}
        result = sampled | {"evaluate": score(args, work / "set", reference, store, work)}
    else:
        result = full(args, work)
    result = {
        "checks_hold": all(result["checks"].values()) if "checks" in result else None,
        **result,
        "seconds": round(time.perf_counter() - start),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "load_avg_start": [round(x, 2) for x in load_start],
        "load_avg_end": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(result, indent=2))
    if result["checks_hold"] is False:
        sys.exit(1)


def cpu_model() -> dict:
    """lscpu's model name and the vector extensions among its flags."""
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    vector = [f for f in flags if f.startswith(("avx", "amx", "fma", "f16c"))]
    return {"model": fields.get("Model name", "").strip(), "vector_flags": vector}


if __name__ == "__main__":
    main()
