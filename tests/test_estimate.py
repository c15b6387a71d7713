"""What `--plan` says a run will compute: network evaluations from the samplers' own grids,
cost-table lookups by network layout, and device time from the table's figures."""

from __future__ import annotations

import pytest
import yaml

from admflow import costs
from admflow.config import load_config
from tasks import estimate


@pytest.mark.parametrize(
    "overrides, nfe",
    [
        (["sampling.sampler=ddpm", "sampling.timestep_respacing='250'"], 250),
        (["sampling.sampler=ddim", "sampling.timestep_respacing=ddim25"], 25),
        (["sampling.sampler=ddpm", "sampling.timestep_respacing=''"], 1000),
        (["sampling.sampler=dpm++2m", "sampling.solver_steps=12"], 12),
        (["sampling.sampler=unipc", "sampling.solver_steps=7"], 7),
    ],
)
def test_evaluations_per_image_follow_the_sampler(overrides, nfe):
    cfg = load_config("imagenet64", overrides)
    assert estimate.sampling_work(cfg, "sample", 10, guided=False).evaluations == nfe


def test_the_upsampler_uses_its_own_respacing_and_diffusion():
    cfg = load_config("upsampler64-256", ["sampling.upsample_respacing='100'"])
    work = estimate.sampling_work(cfg, "upsample", 8, guided=False, section="upsampler")
    assert (work.evaluations, work.network) == (100, "upsampler64-256")


def test_cost_network_matches_layout_and_guidance():
    assert estimate.cost_network(load_config("imagenet64"), "model", False) == "imagenet64"
    assert estimate.cost_network(load_config("imagenet256"), "model", True) == "imagenet256"
    # the table measures ADM-256 guided only: an unguided 256 run has no figure of its own
    assert estimate.cost_network(load_config("imagenet256"), "model", False) is None
    wider = load_config("imagenet64", ["model.model_channels=64"])
    assert estimate.cost_network(wider, "model", False) is None


def test_device_time_is_the_tables_figure_times_the_work(tmp_path):
    table = costs.read_table()
    table["networks"]["imagenet64"]["cpu"] = {"s_per_image_nfe": 0.5, "source": {"by": "test"}}
    table["networks"]["imagenet64"]["gpu"] = {"s_per_image_nfe": 0.01, "source": {"by": "test"}}
    path = tmp_path / "costs.yaml"
    path.write_text(yaml.safe_dump(table))
    figures = costs.load_costs(path)
    work = estimate.sampling_work(load_config("imagenet64"), "sample", 1000, guided=False)
    assert work.device_hours("cpu", figures) == pytest.approx(0.5 * 1000 * 250 / 3600)
    assert work.device_hours("gpu", figures) == pytest.approx(0.01 * 1000 * 250 / 3600)
    # a CPU figure is a whole machine's: actors sharing its cores do not divide it
    line = work.line("cpu", 2, figures)
    assert "1,000 images x 250 NFE; ~34.7 h on a machine like the measured one" in line
    # GPUs divide the GPU-hours
    line = work.line("gpu", 8, figures)
    assert "0.69 gpu-hours, ~5 min wall over 8 GPUs" in line
    guided = estimate.sampling_work(load_config("imagenet64"), "sample", 10, guided=True)
    assert "n/a" in guided.line("gpu", 8, figures)  # no figure for a guided 64 px network


def test_training_work_counts_each_kind_steps():
    cfg = load_config("tiny")
    t = cfg.training
    assert estimate.training_work(cfg, "diffusion").images == t.steps * t.batch_size
    assert estimate.training_work(cfg, "classifier").images == t.classifier_steps * t.batch_size
