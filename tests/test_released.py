"""The released layouts on CPU. The 64 px network end to end through ``admflow sample``: a
random-weight state dict in the released format (a plain ``.pt``, as OpenAI ships it) is read
by the CLI, shipped to a Ray sampling actor and sampled for 2 DDPM steps; the 2 images come
back as a set. It starts its own local Ray (a subprocess, as a user runs it): run it in a
loopback-only network namespace like every Ray test. And benchmarks/released.py's smoke run
prints the figures the cost table takes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from admflow.config import load_config
from models.build import build_unet

REPO = Path(__file__).resolve().parent.parent
ADMFLOW = str(Path(sys.executable).parent / "admflow")


def released_64_checkpoint(path: Path) -> None:
    """imagenet64's network with random weights everywhere (the zero-initialised output
    layers too, so the images depend on the network), saved as a plain state dict."""
    torch.manual_seed(0)
    net = build_unet(load_config("imagenet64").model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    torch.save(net.state_dict(), path)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_admflow_sample_draws_two_images_from_the_released_64px_layout(tmp_path):
    ckpt = tmp_path / "64x64_diffusion.pt"
    released_64_checkpoint(ckpt)
    out = tmp_path / "samples"
    env = {
        **os.environ,
        "ADMFLOW_STORAGE_ROOT": str(tmp_path / "store"),
        "RAY_ADDRESS": "",  # a local Ray of its own, never a cluster found on the machine
        "MLFLOW_ENABLE_TELEMETRY": "false",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    argv = [
        ADMFLOW, "sample", "--config", "imagenet64", "--checkpoint", str(ckpt),
        "--num-samples", "2", "--batch-size", "2", "--sampler", "ddpm", "--steps", "2",
        "--workers", "1", "--seed", "3", "--merge", "--no-progress", "--out", str(out),
        "--set", "compute.device=cpu", "--set", "compute.use_gpu=false",
        "--set", "compute.torch_threads=2",
        "--set", "compute.num_workers=1", "--set", "compute.cpus_per_worker=1",
        "--set", "sampling.shard_size=2",
    ]  # fmt: skip
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert result["complete"]
    with np.load(next(out.glob("samples_*.npz"))) as z:
        images, labels = z["arr_0"], z["arr_1"]
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8
    assert labels.shape == (2,) and ((0 <= labels) & (labels < 1000)).all()
    for image in images:  # each image is a picture, not a constant (uint8 is always finite)
        assert image.std() > 1.0
    assert not np.array_equal(images[0], images[1])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_released_benchmark_quick_run_prints_the_cost_figures():
    script = REPO / "benchmarks" / "released.py"
    argv = [sys.executable, str(script), "--quick", "--only", "tiny", "--ratio-network", "tiny"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    tiny = report["networks"]["tiny"]
    assert tiny["images_ok"] and tiny["s_per_image_nfe"] > 0 and tiny["peak_rss_gib"] > 0
    hours = tiny["s_per_image_nfe"] * 50_000 * 250 / 3600
    assert tiny["set_50k"]["machine_hours"] == pytest.approx(hours)
    assert tiny["set_50k"]["core_hours"] == pytest.approx(hours * report["machine"]["threads"])
    ratio = report["production_vs_guided_diffusion"]
    assert ratio["speedup"] > 0 and ratio["abs_uint8"]["max"] <= 2  # fp32 both: rounding only
