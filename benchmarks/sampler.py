"""DDIM sampling speed of the bench-32 ADM UNet on CPU: plain network vs models.fast paths.

Prints one JSON object. Every figure is measured in this run on this machine: images/s for
DDIM-25 at batch 16 (2 threads) with the plain network (fp32, NCHW, eager, no fusion), the
same weights run as guided-diffusion runs them (``guided_diffusion``: einsum attention, see
benchmarks/gd_baseline.py), the network the sampling actors run (``fp32``: a ``ShardSampler``
built from checkpoint bytes, so the fast path that plan_inference picks for the CPU) and the
bf16 path of :func:`models.fast.prepare_for_inference`; FLOPs per forward
(FlopCounterMode); the machine's own fp32/bf16 dense-matmul rates (a large torch.matmul); and
how close bf16 samples are to fp32 ones from the same noise. Repeats are interleaved across the
variants so that load from other processes hits them alike; the best repeat is reported (the
least disturbed), the median too. ``--quick``: DDIM-5, one repeat. ``--compile``: add the
torch.compile variants (bf16 only where native) (compile time reported separately, not counted in images/s).

    python benchmarks/sampler.py [--quick] [--compile] [--repeats N] [--threads 2]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from admflow.config import load_config  # noqa: E402
from benchmarks.gd_baseline import guided_diffusion_like  # noqa: E402
from models.build import build_unet  # noqa: E402
from models.diffusion_factory import create_diffusion  # noqa: E402
from models.fast import native_bf16, prepare_for_inference  # noqa: E402
from models.samplers import make_sample_loop  # noqa: E402
from tasks.sampling.spec import SamplerSpec  # noqa: E402
from tasks.sampling.worker import ShardSampler  # noqa: E402

Model = Callable[..., torch.Tensor]


def matmul_rate(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """Best-of-``reps`` GFLOP/s of an n×n×n torch.matmul."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def give_zero_modules_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Fill the zero-initialised layers, so an untrained network has a non-trivial output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def actor_sampler(cfg: Any, net: torch.nn.Module, threads: int) -> ShardSampler:
    """The sampling actor's object, built as on Ray: from checkpoint bytes and a SamplerSpec."""
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    spec = SamplerSpec(
        kind="base",
        network=cfg.model.model_dump(mode="json"),
        diffusion=cfg.diffusion.model_dump(mode="json"),
        device="cpu",
        torch_threads=threads,
    )
    return ShardSampler(spec, buf.getvalue(), None)


def flops_per_forward(model: Model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x, t, y=y)
    return counter.get_total_flops()


def sample(diffusion: Any, model: Model, noise: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return make_sample_loop(diffusion, "ddim")(
        model, tuple(noise.shape), noise=noise, model_kwargs={"y": y}, clip_denoised=True
    )


def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def cpu_timed(fn: Callable[[], torch.Tensor]) -> tuple[float, float, torch.Tensor]:
    """Wall and process CPU seconds (CPU time is less disturbed by other processes' load)."""
    c0 = time.process_time()
    wall, out = timed(fn)
    return wall, time.process_time() - c0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="DDIM-5 and one repeat (smoke run)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile variants")
    ap.add_argument("--repeats", type=int, default=3, help="timed DDIM runs per variant")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    steps = 5 if args.quick else 25
    repeats = 1 if args.quick else args.repeats

    cfg = load_config("bench-32")
    torch.manual_seed(0)
    net = build_unet(cfg.model).eval()
    give_zero_modules_weights(net)
    diffusion = create_diffusion(cfg.diffusion, f"ddim{steps}")
    gen = torch.Generator().manual_seed(1)
    shape = (args.batch, 3, cfg.model.image_size, cfg.model.image_size)
    noise = torch.randn(shape, generator=gen)
    y = torch.randint(0, cfg.model.num_classes or 1, (args.batch,), generator=gen)
    t = torch.full((args.batch,), 999, dtype=torch.long)

    load_before = os.getloadavg()
    rates = {"fp32": matmul_rate(torch.float32), "bf16": matmul_rate(torch.bfloat16)}
    flops = flops_per_forward(net, noise, t, y)

    actor = actor_sampler(cfg, net, args.threads)
    variants: dict[str, Model] = {
        "plain": net,
        "guided_diffusion": guided_diffusion_like(net, fp16=False),  # its einsum attention
        "fp32": actor.model,  # exactly the network the Ray sampling actors run
        "bf16": prepare_for_inference(net, "bf16", channels_last=True),
    }
    compile_s: dict[str, float] = {}
    if args.compile:
        # bf16 is compiled only where it is native: emulated bf16 loses to fp32 anyway.
        for prec in ("fp32", "bf16") if native_bf16("cpu") else ("fp32",):
            name = f"{prec}_compiled"
            variants[name] = prepare_for_inference(net, prec, channels_last=True, compile=True)  # type: ignore[arg-type]
            compile_s[name], _ = timed(lambda m=variants[name]: m(noise, t, y=y))

    for model in variants.values():  # warm-up: oneDNN primitive creation, allocator
        model(noise, t, y=y)
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    samples: dict[str, torch.Tensor] = {}
    for _ in range(repeats):
        for name, model in variants.items():
            wall, cpu_s, samples[name] = cpu_timed(lambda m=model: sample(diffusion, m, noise, y))
            times[name].append(wall)
            cpu[name].append(cpu_s)
    load_after = os.getloadavg()

    def ips(name: str) -> float:
        return args.batch / min(times[name])

    def gflops(name: str) -> float:
        return flops * steps / min(times[name]) / 1e9

    def gap(name: str, ref: str) -> dict[str, float]:
        d = (samples[name] - samples[ref]).float()
        return {"max_abs": d.abs().max().item(), "rmse": d.pow(2).mean().sqrt().item()}

    best_bf16 = max((n for n in variants if n.startswith("bf16")), key=ips)
    report = {
        "speedup_fp32": ips("fp32") / ips("plain"),
        "speedup_fp32_vs_guided_diffusion": ips("fp32") / ips("guided_diffusion"),
        "speedup_bf16": ips("bf16") / ips("plain"),
        "bf16_peak_fraction": gflops("bf16") / rates["bf16"],
        "fp32_peak_fraction": gflops("fp32") / rates["fp32"],
        "native_bf16": native_bf16("cpu"),
        "fp32_path": f"ShardSampler.model ({type(actor.model).__name__}, {actor.info()})",
        "preset": "bench-32",
        "sampler": f"ddim{steps}",
        "batch": args.batch,
        "threads": args.threads,
        "params": sum(p.numel() for p in net.parameters()),
        "flops_per_forward": flops,
        "matmul_gflops": rates,
        "images_per_s": {n: ips(n) for n in variants},
        "images_per_s_median": {n: args.batch / statistics.median(times[n]) for n in variants},
        "sampler_gflops": {n: gflops(n) for n in variants},
        "peak_fraction": {
            n: {
                "of_bf16_matmul": gflops(n) / rates["bf16"],
                "of_fp32_matmul": gflops(n) / rates["fp32"],
            }
            for n in variants
        },
        "seconds": times,
        "cpu_seconds": cpu,
        "speedup_cpu_time": {n: min(cpu["plain"]) / min(cpu[n]) for n in variants},
        "compile_seconds": compile_s,
        "best_bf16_variant": best_bf16,
        "speedup_best_bf16": ips(best_bf16) / ips("plain"),
        "fp32_vs_plain_samples": gap("fp32", "plain"),
        "bf16_vs_plain_samples": gap("bf16", "plain"),
        "bf16_vs_fast_fp32_samples": gap("bf16", "fp32"),
        "loadavg_before_after": [load_before[0], load_after[0]],
    }
    for name in compile_s:
        report[f"{name}_vs_plain_samples"] = gap(name, "plain")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
