"""The sampling actors run the fast inference path (models.fast), decided in one place
(plan_inference), and their images match the plain network's from the same seeds.

ShardSampler is built directly (as a Ray actor builds it) from checkpoint bytes; the plain
reference is the same sampler with its network swapped for the plain module, so only the
network differs. Tiny networks with non-zero output layers, 3 steps."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from admflow.config import load_config
from models.build import build_classifier, build_unet, build_upsampler
from models.fast import InferenceModel, plan_inference
from tasks.sampling.spec import SamplerSpec
from tasks.sampling.worker import ShardSampler


def _weights(net: torch.nn.Module) -> bytes:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # zero-initialised output layers would make every sample the same
        for p in net.parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny")


def _spec(cfg, kind: str, **extra) -> SamplerSpec:
    network = cfg.upsampler if kind == "upsample" else cfg.model
    diffusion = cfg.upsampler.diffusion if kind == "upsample" else cfg.diffusion
    return SamplerSpec(
        kind=kind,
        network=network.model_dump(mode="json"),
        diffusion=diffusion.model_dump(mode="json"),
        sampler="ddim",
        respacing="ddim3",
        batch_size=4,
        device="cpu",
        **extra,
    )


def _plain_images(sampler: ShardSampler, plain: torch.nn.Module, *args) -> np.ndarray:
    fast = sampler.model
    sampler.model = plain.eval().requires_grad_(False)
    try:
        return sampler.sample(*args)[0]
    finally:
        sampler.model = fast


def _assert_close(fast: np.ndarray, plain: np.ndarray) -> None:
    diff = np.abs(fast.astype(int) - plain.astype(int))
    # fp32 outputs agree to ~1e-6; only values on a rounding boundary may move one level
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    assert fast.std() > 5  # not a constant image


def test_plan_is_decided_once_per_device():
    cpu = plan_inference(torch.device("cpu"), use_fp16=True)
    assert (cpu.precision, cpu.channels_last, cpu.compile, cpu.tf32) == ("fp32", True, False, False)
    gpu = plan_inference(torch.device("cuda"), use_fp16=True, compile=True)
    assert (gpu.precision, gpu.tf32, gpu.compile) == ("fp16", True, True)
    assert plan_inference(torch.device("cuda"), use_fp16=False).precision == "fp32"


def test_guided_base_actor_runs_fast_path_and_matches_plain(cfg):
    torch.manual_seed(0)
    net, clf = build_unet(cfg.model), build_classifier(cfg.classifier)
    model_bytes, clf_bytes = _weights(net), _weights(clf)
    spec = _spec(
        cfg, "base", classifier=cfg.classifier.model_dump(mode="json"), classifier_scale=2.0
    )
    sampler = ShardSampler(spec, model_bytes, clf_bytes)
    assert isinstance(sampler.model, InferenceModel)
    assert sampler.info()["precision"] == "fp32"
    assert not isinstance(sampler.classifier, InferenceModel)  # guidance needs its gradients
    labels = np.array([0, 1, 2, 3, 4, 5], dtype=np.int64)
    fast = sampler.sample(7, labels)[0]
    again = sampler.sample(7, labels)[0]
    assert np.array_equal(fast, again)  # deterministic
    _assert_close(fast, _plain_images(sampler, net, 7, labels))


def test_upsampler_actor_runs_fast_path_and_matches_plain(cfg):
    torch.manual_seed(1)
    up = build_upsampler(cfg.upsampler)
    sampler = ShardSampler(_spec(cfg, "upsample"), _weights(up), None)
    assert isinstance(sampler.model, InferenceModel)
    small = cfg.upsampler.small_size
    low_res = np.random.default_rng(0).integers(0, 256, (4, small, small, 3), dtype=np.uint8)
    labels = np.arange(4, dtype=np.int64)
    fast = sampler.sample(0, labels, low_res)[0]
    assert fast.shape == (4, cfg.upsampler.unet.image_size, cfg.upsampler.unet.image_size, 3)
    _assert_close(fast, _plain_images(sampler, up, 0, labels, low_res))


def test_the_micro_batch_bounds_network_calls_but_not_the_images(cfg):
    # One generator per shard: a micro-batch of 1, 4 or the whole shard gives the same images
    # (up to floating-point rounding), and the network never sees more than a micro-batch.
    torch.manual_seed(0)
    net, clf = build_unet(cfg.model), build_classifier(cfg.classifier)
    model_bytes, clf_bytes = _weights(net), _weights(clf)
    labels = np.array([0, 1, 2, 3, 4, 5], dtype=np.int64)
    images, widest = {}, {}
    for micro in (6, 4, 1):
        spec = _spec(
            cfg,
            "base",
            classifier=cfg.classifier.model_dump(mode="json"),
            classifier_scale=2.0,
        )
        spec.batch_size = micro
        sampler = ShardSampler(spec, model_bytes, clf_bytes)
        seen: list[int] = []
        sampler.model.register_forward_pre_hook(
            lambda _m, args, seen=seen: seen.append(args[0].shape[0])
        )
        images[micro] = sampler.sample(3, labels)[0]
        widest[micro] = max(seen)
    assert widest == {6: 6, 4: 4, 1: 1}
    _assert_close(images[4], images[6])
    _assert_close(images[1], images[6])
