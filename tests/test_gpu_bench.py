"""benchmarks/gpu.py: its --cpu-smoke run (what CI runs) prints the JSON the GPU run prints,
without importing anything the GPU machine lacks; its plain-YAML networks and diffusions are
the ones the typed config builds."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from admflow.config import load_config
from models.build import build_unet
from models.checkpoints import compare_state_dict
from models.diffusion_factory import create_diffusion
from models.fast import FP32_ATOL

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu.py"
ABSENT = ["pydantic", "ray", "prefect", "mlflow", "PIL", "s3fs", "admflow", "tasks", "flows"]
# Make every module the GPU machine lacks (and our config/orchestration packages) unimportable.
RUNNER = (
    "import runpy, sys\n"
    f"sys.modules.update({{m: None for m in {ABSENT!r}}})\n"
    f"sys.argv = [{str(SCRIPT)!r}, '--cpu-smoke']\n"
    f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
)


def _gpu_module():
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(600)
def test_cpu_smoke_prints_the_report_without_the_stack():
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER], capture_output=True, text=True, timeout=600, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["mode"] == "cpu-smoke" and set(report["presets"]) == {"imagenet64", "imagenet256"}
    for entry in report["presets"].values():
        s = entry["sampling"]
        assert s["plan"]["precision"] == "fp32"  # the CPU plan
        assert s["images_per_s"]["plain_fp32"] > 0 and s["images_per_s"]["production"] > 0
        assert s["output_vs_fp32"]["production"]["max_abs"] < FP32_ATOL
        assert 0 < s["output_vs_fp32"]["bf16"]["max_abs"] < 0.5  # reduced, not broken
        assert s["ddim_sample_vs_fp32"]["production"]["max_abs"] < FP32_ATOL
        assert entry["training"]["images_per_s"] > 0 and entry["training"]["precision"] == "bf16"
    assert "images_per_s" in report["inception"] or "skipped" in report["inception"]


@pytest.mark.parametrize("name", ["imagenet64", "imagenet256"])
def test_plain_yaml_builds_what_the_typed_config_builds(name):
    gpu = _gpu_module()
    preset = gpu.read_preset(name)
    cfg = load_config(name)
    with torch.device("meta"):
        ours = gpu.UNetModel(**gpu.unet_kwargs(preset["model"]))
    assert compare_state_dict(build_unet(cfg.model, "meta").state_dict(), ours) == ([], [], [])
    a = create_diffusion(gpu.diffusion_section(preset["diffusion"]))
    b = create_diffusion(cfg.diffusion)
    assert (a.betas == b.betas).all() and a.model_var_type == b.model_var_type
    assert (a.loss_type, a.model_mean_type) == (b.loss_type, b.model_mean_type)
