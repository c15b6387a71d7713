"""benchmarks/gpu.py: its --cpu-smoke run (what CI runs) goes through the same functions as the
GPU run and prints the same JSON keys; each phase starts from a fresh process's TF32/cuDNN
switches and gives the previous ones back, with its own peak memory; its guided-diffusion-like
reference computes what our network computes (only the way differs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from admflow.config import load_config
from benchmarks.gd_baseline import EinsumAttention, guided_diffusion_like
from benchmarks.gpu import Run, backend_flags, set_backend_flags
from benchmarks.released import reset_peak_rss
from models.build import build_classifier, build_unet
from models.fast import FP32_ATOL, InferencePlan, apply_plan
from tests.test_unet import randomize

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu.py"
KEYS = {
    "mode",
    "device",
    "torch",
    "cuda",
    "cudnn",
    "memory",
    "backend_flags",
    "errors",
    "sampler_vs_guided_diffusion",
    "guided_256",
    "training",
    "inception",
    "seconds",
    "loadavg",
}
PHASES = {"sampling", "guided", "training.imagenet256", "inception"}


@pytest.fixture
def restore_switches():
    saved = backend_flags()
    yield
    set_backend_flags(saved)


def check_sampling(report: dict) -> None:
    a = report["sampler_vs_guided_diffusion"]
    assert a["plan"]["precision"] == "fp32" and a["baseline_precision"] == "fp32"  # CPU plan
    assert a["tf32"] == {"production": False, "guided_diffusion": False, "reference": False}
    assert len(a["seconds"]["production"]) == len(a["seconds"]["guided_diffusion"]) == 1
    assert a["images_per_s"]["production"] > 0 and a["images_per_s"]["guided_diffusion"] > 0
    assert a["speedup"] == pytest.approx(
        min(a["seconds"]["guided_diffusion"]) / min(a["seconds"]["production"])
    )
    assert a["goal"] == 3.0
    assert a["output_vs_fp32"]["production"]["max_abs"] < FP32_ATOL
    assert a["output_vs_fp32"]["guided_diffusion"]["max_abs"] < FP32_ATOL
    assert a["images_max_abs_uint8"] <= 2  # fp32 both ways: rounding at most
    b = report["guided_256"]
    assert b["batch"] == 2 and b["steps"] == 2 and b["classifier_precision"] == "fp32"
    hours = b["s_per_image_nfe"] * 50_000 * 250 / 3600
    assert b["s_per_image_nfe"] > 0 and b["gpu_hours_50k"] == pytest.approx(hours)
    assert b["images_per_s"] == pytest.approx(1 / (b["s_per_image_nfe"] * 250))
    assert b["ldm_reference"]["images_per_s"] == 0.07 and b["ldm_reference"]["days_50k"] == 8.3


def check_training(report: dict) -> None:
    assert set(report["training"]) == {"imagenet256"}
    t = report["training"]["imagenet256"]
    assert t["path"] == "ray-train" and t["workers"] == 1 and t["per_gpu_batch"] == 2
    assert t["steps"] == t["warmup"] + 2 and t["steps_timed"] == 1 and t["images_per_s"] > 0
    w = t["worker"]  # seen from inside the Ray Train worker
    assert w["backend"] == "gloo" and w["world_size"] == 1
    assert w["device"] == "cpu" and w["ema_device"] == w["device"]
    assert w["precision"] == t["precision"] == "bf16" and w["microbatch"] == 2
    assert w["peak_gpu_gib"] is None and w["peak_rss_gib"] > 0


def check_memory(report: dict) -> None:
    assert set(report["memory"]) == PHASES
    for name, mem in report["memory"].items():
        assert mem["peak_gpu_gib"] is None, name
        assert any("CUDA" in note for note in mem["notes"]), name  # why it is null
        assert mem["peak_rss_gib"] > 0, name
        if mem["estimate_gib"] is None:
            assert mem["notes"], name
        else:
            assert mem["estimate_gib"] > 0 and mem["estimate"]["stage"] in {
                "sample",
                "train-diffusion",
            }
    assert report["memory"]["inception"]["estimate_gib"] is None  # no Inception stage
    assert (
        report["memory"]["training.imagenet256"]["peak_rss_gib"]
        == (report["training"]["imagenet256"]["worker"]["peak_rss_gib"])
    )


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_cpu_smoke_prints_the_report(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # stdout holds the JSON alone
    saved = json.loads(out.read_text())  # as it stood after the last phase
    assert saved == {k: v for k, v in report.items() if k not in {"seconds", "loadavg"}}
    assert set(report) == KEYS
    assert report["mode"] == "cpu-smoke" and report["device"] == "cpu"
    assert report["errors"] == {} and report["torch"] == torch.__version__
    check_sampling(report)
    check_training(report)
    inc = report["inception"]
    if "skipped" not in inc:
        assert inc["images_per_s"] > 0 and inc["images"] == 8
        assert inc["features"]["pool"] == [8, 2048]
        # FeatureWorker itself turns TF32 off (the evaluator's fp32); the phase began with it on
        assert inc["tf32"] == {"matmul": False, "cudnn": False}
    check_memory(report)
    flags = report["backend_flags"]
    assert set(flags) == PHASES
    fresh = flags["sampling"]["entry"]
    assert fresh["cudnn_allow_tf32"] is True  # torch's default in a fresh process
    for name in PHASES:
        assert flags[name]["entry"] == fresh, name


def tiny_plan_leak() -> None:
    """What a production sampler does to the process: apply_plan switches TF32 on for it."""
    plan = InferencePlan(torch.device("cpu"), "fp32", False, False, tf32=True)
    apply_plan(plan, torch.nn.Linear(2, 2))


def test_phase_gives_the_switches_back_and_starts_the_next_fresh(restore_switches):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    run = Run(smoke=True, repeats=1)
    fresh = backend_flags()
    torch.backends.cudnn.benchmark = True  # the caller's own setting, between phases
    before = backend_flags()
    with run.phase("first"):
        assert backend_flags() == fresh  # the caller's cudnn.benchmark is not inherited
        tiny_plan_leak()
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert backend_flags() == before  # TF32 switched off again, benchmark back on
    with run.phase("second"):
        assert backend_flags() == fresh  # the first phase's TF32 did not leak into it
    flags = run.report["backend_flags"]
    assert flags["first"]["entry"] == fresh == flags["second"]["entry"]
    assert flags["first"]["exit"]["matmul_allow_tf32"] is True  # what it had switched on
    assert flags["first"]["exit"]["float32_matmul_precision"] == "high"
    assert flags["second"]["exit"] == fresh


def test_a_failing_phase_still_restores_the_switches(restore_switches):
    run = Run(smoke=True, repeats=1)
    before = backend_flags()
    with pytest.raises(RuntimeError, match="boom"), run.phase("broken"):
        tiny_plan_leak()
        raise RuntimeError("boom")
    assert backend_flags() == before
    assert run.report["memory"]["broken"]["peak_rss_gib"] > 0


def test_peak_memory_is_reset_between_phases():
    if not reset_peak_rss():
        pytest.skip("this kernel does not let a process reset its peak RSS")
    run = Run(smoke=True, repeats=1)
    with run.phase("big"):
        block = np.ones(96 * 2**20, dtype=np.float32)  # 384 MiB, every page touched
        del block
    with run.phase("small"):
        np.ones(2**20, dtype=np.float32).sum()
    big, small = run.report["memory"]["big"], run.report["memory"]["small"]
    assert big["peak_rss_gib"] - small["peak_rss_gib"] > 0.3  # the 384 MiB are not carried
    assert big["peak_gpu_gib"] is None and small["peak_gpu_gib"] is None  # no CUDA here
    assert any("CUDA" in n for n in small["notes"])


def test_guided_figure_goes_into_the_cost_tables_gpu_row(tmp_path, restore_switches):
    from admflow import costs
    from benchmarks.gpu import guided_256, versions, write_costs

    table = tmp_path / "costs.yaml"
    table.write_text(costs.TABLE.read_text())
    run = Run(smoke=True, repeats=1)
    run.report = {**versions(run), **run.report}
    with run.phase("guided") as mem:
        run.report["guided_256"] = guided_256(run, 1, 2, mem)
    write_costs(run.report, ["--write-costs"], table)
    row = costs.load_costs(table)["imagenet256"]["gpu"]
    g = run.report["guided_256"]
    assert row is not None and row.s_per_image_nfe == pytest.approx(g["s_per_image_nfe"], rel=1e-3)
    assert row.hours(50_000, 250) == pytest.approx(g["gpu_hours_50k"], rel=1e-3)
    assert row.source["script"] == "benchmarks/gpu.py" and row.source["guided"] is True
    assert row.source["batch"] == 1 and row.source["steps"] == 2
    assert row.peak_gpu_gib is None  # measured on the CPU here: no GPU peak to record
    assert costs.load_costs(table)["imagenet64"] == costs.load_costs()["imagenet64"]


def test_smoke_figures_are_never_written_to_the_cost_table():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke", "--write-costs"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 2 and "--write-costs records GPU measurements" in proc.stderr


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
