"""The released networks through the production sampling path on CPU: what an image costs.

For each network in its released layout (shapes from the presets, random weights: the cost of
a network evaluation does not depend on the weights) a few images are sampled through
:class:`tasks.sampling.worker.ShardSampler`, the object every Ray sampling actor holds, built
from checkpoint bytes as the actors build it: DDPM over a few respaced steps, guided by the
noisy classifier where the paper's row is guided (ImageNet 256 ADM-G, one classifier gradient
per step). Prints one JSON object:

* ``networks.<name>``: ``s_per_image_nfe`` (best repeat's wall seconds / (images × steps)),
  ``peak_rss_gib`` (the process's peak resident memory from building the networks to the
  end of sampling, checkpoint bytes included, as an actor holds them) and
  ``sampling_peak_rss_gib`` (from the first sample on), and ``set_50k`` the cost of a 50K set
  at 250 steps: machine-hours (this many threads) and core-hours, with the arithmetic.
* ``production_vs_guided_diffusion``: the same ShardSampler with its network swapped for
  guided-diffusion's way of running it (:mod:`benchmarks.gd_baseline`: eager, NCHW, einsum
  attention), both fp32, same threads, repeats interleaved; ``speedup`` is baseline seconds /
  production seconds, ``abs_uint8`` how far their images differ (max, mean). Where the CPU computes
  bf16 natively (AMX/AVX512_BF16), ``bf16_torso``: the same sampler with the torso in bf16
  (the CPU analogue of the released fp16 torso; not what production runs on CPU, which
  keeps fp32 so that a set's bytes do not depend on the CPU), its speed-up over the
  baseline and how far its images are from production's.
* ``machine``: CPU model (lscpu), threads, torch, load average before and after.

``--write-costs`` writes each network's figure into admflow/costs.yaml (the ``cpu`` row)
with its source. The default is the measurement (run it on a quiet machine, ~1 h on 2 cores);
``--quick`` is the smoke run (1 image, 2 steps, 1 repeat; its figures are not written).

    python benchmarks/released.py [--quick] [--only imagenet64 tiny] [--write-costs]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from admflow import costs  # noqa: E402
from admflow.config import AdmConfig, load_config  # noqa: E402
from benchmarks.gd_baseline import run_as_guided_diffusion  # noqa: E402
from models.build import build_classifier, build_unet, build_upsampler  # noqa: E402
from models.fast import native_bf16, prepare_for_inference  # noqa: E402
from tasks.sampling.spec import SamplerSpec  # noqa: E402
from tasks.sampling.worker import ShardSampler  # noqa: E402

SET_IMAGES, SET_STEPS = 50_000, 250  # the paper's FID sets: 50K images, 250 DDPM steps
GIB = 2**30


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (VmHWM) of this process; False where it can't."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_gib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def give_outputs(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights in the zero-initialised layers too, so an untrained network's output
    (and the classifier's gradient) is not exactly zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return net


def state_bytes(net: torch.nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    return buf.getvalue()


class Released:
    """One released network: its preset, how the paper sampled it, its random weights."""

    def __init__(
        self, name: str, kind: str = "base", guided: bool = False, overrides: tuple[str, ...] = ()
    ):
        self.name, self.kind, self.guided = name, kind, guided
        self.cfg: AdmConfig = load_config(name, list(overrides))  # overrides: smoke-run sizes

    def network(self) -> torch.nn.Module:
        torch.manual_seed(0)
        if self.kind == "upsample":
            return give_outputs(build_upsampler(self.cfg.upsampler).eval())
        return give_outputs(build_unet(self.cfg.model).eval())

    def classifier(self) -> torch.nn.Module | None:
        if not self.guided:
            return None
        torch.manual_seed(1)
        return give_outputs(build_classifier(self.cfg.classifier).eval(), seed=1)

    def classifier_bytes(self) -> bytes | None:
        clf = self.classifier()
        return None if clf is None else state_bytes(clf)

    def spec(self, steps: int, batch: int, threads: int, device: str = "cpu") -> SamplerSpec:
        up = self.kind == "upsample"
        section = self.cfg.upsampler if up else self.cfg.model
        diffusion = self.cfg.upsampler.diffusion if up else self.cfg.diffusion
        scale = next((s for s in self.cfg.sampling.classifier_scales if s), 1.0)
        return SamplerSpec(
            kind=self.kind,
            network=section.model_dump(mode="json"),
            diffusion=diffusion.model_dump(mode="json"),
            sampler="ddpm",
            respacing=str(steps),
            batch_size=batch,
            torch_threads=threads,
            device=device,
            classifier=self.cfg.classifier.model_dump(mode="json") if self.guided else None,
            classifier_scale=scale if self.guided else 0.0,
        )

    def inputs(self, batch: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Labels (and the upsampler's 64 px conditioning images) for one shard."""
        classes = self.cfg.model.num_classes or self.cfg.classifier.num_classes
        labels = np.arange(batch, dtype=np.int64) % classes
        if self.kind != "upsample":
            return labels, None
        small = self.cfg.upsampler.small_size
        rng = np.random.default_rng(0)
        return labels, rng.integers(0, 256, (batch, small, small, 3), dtype=np.uint8)


# The networks of the cost table, sampled as the paper sampled them: (kind, guided).
NETWORKS: dict[str, tuple[str, bool]] = {
    "imagenet64": ("base", False),
    "imagenet256": ("base", True),
    "upsampler64-256": ("upsample", False),
    "tiny": ("base", False),
}


def timed_sample(sampler: ShardSampler, labels, low_res) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    images, _ = sampler.sample(0, labels, low_res)
    return time.perf_counter() - t0, images


def set_cost(s_per_image_nfe: float, threads: int) -> dict[str, Any]:
    hours = s_per_image_nfe * SET_IMAGES * SET_STEPS / 3600
    return {
        "images": SET_IMAGES,
        "steps": SET_STEPS,
        "machine_hours": hours,
        "core_hours": hours * threads,
        "arithmetic": f"{s_per_image_nfe:.4g} s/img/NFE x {SET_IMAGES} images x {SET_STEPS} "
        f"NFE / 3600 = {hours:.4g} h on {threads} threads (x {threads} = core-hours)",
    }


def measure(net_name: str, steps: int, batch: int, threads: int, repeats: int) -> dict[str, Any]:
    """One network through the actors' sampler: s/img/NFE, peak RSS, the 50K-set cost."""
    released = Released(net_name, *NETWORKS[net_name])
    reset_peak_rss()
    model_bytes = state_bytes(released.network())
    sampler = ShardSampler(
        released.spec(steps, batch, threads), model_bytes, released.classifier_bytes()
    )
    labels, low_res = released.inputs(batch)
    build_peak = peak_rss_gib()
    reset_peak_rss()
    seconds, images = [], None
    for _ in range(repeats + 1):  # the first run warms oneDNN's primitives up, untimed
        wall, images = timed_sample(sampler, labels, low_res)
        seconds.append(wall)
    best = min(seconds[1:])
    s_nfe = best / (batch * steps)
    return {
        "preset": net_name,
        "kind": released.kind,
        "guided": released.guided,
        "image_size": sampler.net_cfg.image_size,
        "params_m": sum(p.numel() for p in sampler.model.parameters()) / 1e6,
        "batch": batch,
        "steps": steps,
        "sampler": "ddpm",
        "seconds": seconds,
        "s_per_image_nfe": s_nfe,
        "peak_rss_gib": max(build_peak, peak_rss_gib()),
        "sampling_peak_rss_gib": peak_rss_gib(),
        "images_ok": bool(images is not None and images.shape[0] == batch and images.std() > 0),
        "set_50k": set_cost(s_nfe, threads),
    }


def ratio(net_name: str, steps: int, batch: int, threads: int, repeats: int) -> dict[str, Any]:
    """Production ShardSampler vs the same sampler running guided-diffusion's network, fp32;
    where this CPU has native bf16, also the bf16 torso (a measurement only: production
    samples in fp32 on CPU, see models.fast.plan_inference)."""
    released = Released(net_name, *NETWORKS[net_name])
    net = released.network()
    spec = released.spec(steps, batch, threads)
    clf = released.classifier()
    clf_bytes = None if clf is None else state_bytes(clf)
    paths = {"production": ShardSampler(spec, state_bytes(net), clf_bytes)}
    baseline = ShardSampler(spec, state_bytes(net), clf_bytes)
    paths["guided_diffusion"] = run_as_guided_diffusion(baseline, net, clf, fp16=False)
    if native_bf16("cpu") and released.kind == "base":
        paths["bf16_torso"] = ShardSampler(spec, state_bytes(net), clf_bytes)
        paths["bf16_torso"].model = prepare_for_inference(net, "bf16")
    labels, low_res = released.inputs(batch)
    runs: dict[str, list[float]] = {name: [] for name in paths}
    images: dict[str, np.ndarray] = {}
    for r in range(repeats + 1):  # the first round warms every path up, untimed
        for name, sampler in paths.items():
            wall, images[name] = timed_sample(sampler, labels, low_res)
            if r:
                runs[name].append(wall)
    best = {name: min(s) for name, s in runs.items()}

    def uint8_gap(name: str) -> dict[str, float]:
        d = np.abs(images[name].astype(int) - images["production"].astype(int))
        return {"max": int(d.max()), "mean": float(d.mean())}

    return {
        "network": net_name,
        "precision": "fp32",
        "threads": threads,
        "batch": batch,
        "steps": steps,
        "seconds": runs,
        "speedup": best["guided_diffusion"] / best["production"],
        "abs_uint8": uint8_gap("guided_diffusion"),
        "baseline": "benchmarks.gd_baseline.guided_diffusion_like (eager, NCHW, einsum attention)",
        "bf16_torso": {
            "speedup_over_guided_diffusion": best["guided_diffusion"] / best["bf16_torso"],
            "abs_uint8_vs_production": uint8_gap("bf16_torso"),
        }
        if "bf16_torso" in paths
        else None,
    }


def write_costs(report: dict[str, Any], argv: list[str]) -> None:
    for name, entry in report["networks"].items():
        row = {
            "s_per_image_nfe": round(entry["s_per_image_nfe"], 5),
            "peak_rss_gib": round(entry["peak_rss_gib"], 2),
            "source": {
                "script": "benchmarks/released.py",
                "command": " ".join(["python", "benchmarks/released.py", *argv]),
                "cpu": report["machine"]["cpu"],
                "threads": report["machine"]["threads"],
                "torch": report["machine"]["torch"],
                "batch": entry["batch"],
                "steps": entry["steps"],
                "guided": entry["guided"],
                "loadavg_before_after": report["machine"]["loadavg_before_after"],
            },
        }
        costs.record(name, "cpu", row)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 image, 2 steps, 1 repeat (smoke run)")
    ap.add_argument("--only", nargs="+", choices=list(NETWORKS), help="these networks only")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    ap.add_argument("--batch", type=int, default=4, help="images per network (default 4)")
    ap.add_argument("--steps", type=int, default=3, help="DDPM steps (default 3)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs after a warm-up (>= 1)")
    ap.add_argument("--ratio-network", default="imagenet64", choices=list(NETWORKS))
    ap.add_argument("--no-ratio", action="store_true", help="skip the side-by-side ratio")
    ap.add_argument("--write-costs", action="store_true", help="record into admflow/costs.yaml")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.quick and args.write_costs:
        ap.error("--write-costs records measurements; --quick figures are not")
    batch, steps, repeats = (1, 2, 1) if args.quick else (args.batch, args.steps, args.repeats)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    report: dict[str, Any] = {"mode": "quick" if args.quick else "measurement", "networks": {}}
    for name in args.only or NETWORKS:
        report["networks"][name] = measure(name, steps, batch, args.threads, repeats)
    if not args.no_ratio:
        report["production_vs_guided_diffusion"] = ratio(
            args.ratio_network, steps, batch, args.threads, repeats
        )
    report["machine"] = {
        "cpu": cpu_model(),
        "threads": args.threads,
        "torch": str(torch.__version__),  # a str subclass, which YAML cannot write
        "loadavg_before_after": [load_before, os.getloadavg()[0]],
    }
    if args.write_costs:
        write_costs(report, sys.argv[1:] if argv is None else argv)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
