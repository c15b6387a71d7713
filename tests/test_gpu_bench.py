"""benchmarks/gpu.py: its --cpu-smoke run (what CI runs) goes through the same functions as the
GPU run and prints the same JSON keys; its guided-diffusion-like reference computes what our
network computes (only the way differs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from admflow.config import load_config
from benchmarks.gd_baseline import EinsumAttention, guided_diffusion_like
from models.build import build_classifier, build_unet
from models.fast import FP32_ATOL
from tests.test_unet import randomize

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu.py"


@pytest.mark.timeout(600)
def test_cpu_smoke_prints_the_report():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["mode"] == "cpu-smoke" and report["errors"] == {}
    a = report["sampler_vs_guided_diffusion"]
    assert a["plan"]["precision"] == "fp32" and a["baseline_precision"] == "fp32"  # CPU plan
    assert a["images_per_s"]["production"] > 0 and a["images_per_s"]["guided_diffusion"] > 0
    assert a["speedup"] > 0 and a["goal"] == 3.0
    assert a["output_vs_fp32"]["production"]["max_abs"] < FP32_ATOL
    assert a["output_vs_fp32"]["guided_diffusion"]["max_abs"] < FP32_ATOL
    assert a["images_max_abs_uint8"] <= 2  # fp32 both ways: rounding at most
    b = report["guided_256"]
    hours = b["s_per_image_nfe"] * 50_000 * 250 / 3600
    assert b["s_per_image_nfe"] > 0 and b["gpu_hours_50k"] == pytest.approx(hours)
    assert b["images_per_s"] == pytest.approx(1 / (b["s_per_image_nfe"] * 250))
    assert set(report["training"]) == {"imagenet64", "imagenet256"}
    for entry in report["training"].values():
        assert entry["images_per_s"] > 0 and entry["precision"] == "bf16"
        assert entry["path"] == "local-session"
    assert "images_per_s" in report["inception"] or "skipped" in report["inception"]
    phases = {"sampling", "guided", "inception"}
    phases |= {f"training_local.{p}" for p in ("imagenet64", "imagenet256")}
    assert set(report["peak_memory_gib"]) == phases
    assert all(v > 0 for v in report["peak_memory_gib"].values())


@pytest.mark.parametrize("new_order", [False, True])
def test_guided_diffusion_like_network_computes_the_same_outputs(new_order):
    cfg = load_config("tiny", [f"model.use_new_attention_order={str(new_order).lower()}"])
    torch.manual_seed(0)
    net = randomize(build_unet(cfg.model)).eval()
    ref = guided_diffusion_like(net, fp16=False)
    assert sum(isinstance(m, EinsumAttention) for m in ref.modules()) > 0
    assert ref.state_dict().keys() == net.state_dict().keys()
    x = torch.randn(3, 3, 16, 16)
    t, y = torch.tensor([1, 500, 999]), torch.tensor([0, 3, 9])
    with torch.no_grad():
        assert (ref(x, t, y=y) - net(x, t, y=y)).abs().max() < FP32_ATOL


def test_guided_diffusion_like_classifier_and_fp16_torso():
    cfg = load_config("tiny")
    torch.manual_seed(0)
    clf = randomize(build_classifier(cfg.classifier)).eval()
    ref = guided_diffusion_like(clf, fp16=False)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 700])
    with torch.no_grad():
        assert (ref(x, t) - clf(x, t)).abs().max() < FP32_ATOL
    half = guided_diffusion_like(build_unet(cfg.model), fp16=True)
    assert half.dtype == torch.float16 and half.out[-1].weight.dtype == torch.float32
