"""DDPM's CIFAR-10 recipe (configs/ddpm-cifar10.yaml) against the paper, field by field, and a
short run of it on CPU through the training loop the Ray workers run, on CIFAR-10 batches
written here in their own format."""

from __future__ import annotations

import pytest
import torch

from admflow import storage
from admflow.config import load_config
from models.build import build_unet
from models.diffusion_factory import create_diffusion
from models.diffusion_types import LossType, ModelMeanType, ModelVarType
from tasks.data.manifest import build_manifest
from tasks.data.shard import build_shard, plan_shards, shard_spec, write_shard
from tasks.data.sources import list_source
from tasks.training import checkpoint as ckpt
from tasks.training.jobs import diffusion_job
from tasks.training.loop import LoopSpec, Trainer
from tasks.training.sessions import LocalSession
from tests.test_cifar_source import write_cifar

PRESET = "ddpm-cifar10"


def test_the_preset_is_the_papers_recipe_field_by_field():
    """ "Denoising Diffusion Probabilistic Models" (Ho, Jain & Abbeel 2020)."""
    cfg = load_config(PRESET)
    m, d, t = cfg.model, cfg.diffusion, cfg.training
    # Section 4: T = 1000; betas linear from 1e-4 to 0.02 (also Appendix B)
    assert d.steps == 1000 and d.noise_schedule == "linear"
    diffusion = create_diffusion(d)
    betas = diffusion.betas
    assert (
        len(betas) == 1000 and betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    )
    assert betas[500] == pytest.approx(1e-4 + (0.02 - 1e-4) * 500 / 999)
    # Section 3.2: fixed variances sigma_t^2 = beta_t, epsilon prediction
    assert not d.learn_sigma and not m.learn_sigma and not d.sigma_small
    assert diffusion.model_var_type == ModelVarType.FIXED_LARGE
    assert diffusion.model_mean_type == ModelMeanType.EPSILON and not d.predict_xstart
    # Section 3.4, Eq. 14: L_simple, the unweighted epsilon MSE with t uniform in 1..T
    assert diffusion.loss_type == LossType.MSE and not d.use_kl
    assert d.schedule_sampler == "uniform" and not d.rescale_timesteps
    # Section 4 and Appendix B: unconditional; 32x32 down to 4x4 (four resolutions), two
    # residual blocks per resolution, self-attention at 16x16 only, dropout 0.1
    assert not cfg.data.class_cond and m.num_classes is None and m.image_size == 32
    assert [32 // 2**i for i in range(len(m.resolved_channel_mult()))] == [32, 16, 8, 4]
    assert m.num_res_blocks == 2 and m.attention_resolutions == [16] and m.dropout == 0.1
    # Appendix B: "Our CIFAR10 model has 35.7 million parameters"
    net = build_unet(m, "meta")
    assert round(sum(p.numel() for p in net.parameters()) / 1e6, 1) == 35.7
    # Appendix B: Adam at 2e-4 with its standard hyperparameters, batch 128, EMA 0.9999,
    # 800K steps, random horizontal flips
    assert t.lr == 2e-4 and t.weight_decay == 0.0 and t.batch_size == 128 and t.microbatch == -1
    assert t.ema_rate == [0.9999] and t.steps == 800_000 and t.mixed_precision == "no"
    assert diffusion_job(cfg).flip
    # Appendix B: FID and IS over 50,000 samples, drawn with all T steps of the chain
    s = cfg.sampling
    assert s.num_samples == 50_000 and s.sampler == "ddpm" and s.timestep_respacing == ""
    assert s.classifier_scales == [0.0] and not cfg.classifier.enabled


def _shard_in_process(cfg, src: str, dest: str) -> str:
    """The shard set `admflow shard` writes, built by the same functions its Ray tasks run."""
    source = list_source(cfg, src)
    records = []
    for i, rows in enumerate(plan_shards(len(source.keys), cfg.data.shard_rows)):
        uri = storage.join(dest, "shards", f"shard-{i:05d}.parquet")
        data, record = build_shard(source, rows, cfg.data.image_size)
        records.append(
            write_shard(uri, shard_spec(source, rows, cfg.data.image_size), data, record)
        )
    manifest = build_manifest(source, dest, cfg.data.image_size, records)
    storage.write_json(storage.join(dest, "manifest.json"), manifest)
    return dest


# The recipe at reduced length and width: the paper's schedule, objective, variances, dropout,
# optimiser and EMA as they are; a narrower two-level network (attention still at 16x16) and a
# few steps of a small batch.
SHORT = [
    "model.model_channels=32",
    "model.channel_mult=[1,2]",
    "model.num_res_blocks=1",
    "training.steps=4",
    "training.batch_size=4",
    "training.checkpoint_every=2",
    "training.log_every=1",
    "data.shard_rows=10",
    "compute.use_gpu=false",
    "compute.num_workers=1",
]


def test_the_recipe_trains_at_reduced_length_on_cpu(tmp_path):
    write_cifar(tmp_path, per_batch=6)
    cfg = load_config(PRESET, [*SHORT, f"storage.root={tmp_path / 'root'}"])
    data = _shard_in_process(cfg, str(tmp_path / "cifar-10-batches-py"), str(tmp_path / "shards"))
    assert storage.read_json(storage.join(data, "manifest.json"))["num_images"] == 30
    run = storage.join(cfg.storage.root, "runs", "ddpm")
    spec = LoopSpec("diffusion", cfg.model_dump(mode="json"), data, run, "ddpm")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        session = LocalSession()
        trainer = Trainer(spec, session)
        metrics = trainer.run()
    finally:
        torch.set_num_threads(before)
    assert trainer.step == 4 and "error" not in metrics
    # L_simple: the loss is the epsilon MSE alone; the bound's term (vb, bits/dim) is only
    # reported, as nothing trains the fixed variances
    logged = [r for r in session.reports if "loss" in r]
    assert len(logged) == 4
    for r in logged:
        assert torch.isfinite(torch.tensor(r["loss"])) and r["loss"] == pytest.approx(r["mse"])
        assert r["vb"] > 0 and r["lr"] == 2e-4
    found = ckpt.list_checkpoints(run)
    assert [c["step"] for c in found] == [2, 4]
    last = found[-1]["uri"]
    ema = ckpt.load_tensors(storage.join(last, "ema_0.9999.pt"))
    model = ckpt.load_tensors(storage.join(last, ckpt.MODEL))
    assert ema.keys() == model.keys()
    # the network that trained is the preset's: 3 output channels (no learned variance)
    assert model["out.2.weight"].shape[0] == 3
    # EMA 0.9999 over 4 steps: the average has barely left the initial weights
    init = build_unet(cfg.model).state_dict()
    key = "out.2.weight"
    moved, ema_moved = (model[key] - init[key]).abs().sum(), (ema[key] - init[key]).abs().sum()
    assert 0 < ema_moved < 0.01 * moved
