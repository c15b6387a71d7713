"""The ADM networks: sizes of every preset, released key layout, forward/backward, precision."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from admflow.config import list_presets, load_config
from models.build import build_classifier, build_network, build_unet, build_upsampler
from models.checkpoints import (
    CheckpointMismatchError,
    build_and_load,
    load_openai_checkpoint,
)
from models.nn import GroupNorm32, count_parameters, timestep_embedding
from models.precision import autocast
from models.unet import UNetModel
from models.unet_blocks import AttentionBlock, ResBlock, qkv_attention

# Parameter counts of the released models (paper's hyperparameter table / released .pt files).
RELEASED_UNET_PARAMS = {
    "imagenet64": 296e6,
    "imagenet128": 422e6,
    "imagenet256": 554e6,
    "imagenet512": 559e6,
    "lsun-bedroom": 552e6,
    "lsun-cat": 552e6,
    "lsun-horse": 552e6,
    # Improved DDPM's released models (tests/test_iddpm_layouts.py checks them key by key); the
    # upsampler's preset keeps the class-conditional ImageNet 64 model as its base
    "iddpm-imagenet64-hybrid": 121.1e6,
    "iddpm-imagenet64-vlb": 121.1e6,
    "iddpm-cifar10-hybrid": 52.5e6,
    "iddpm-cifar10-vlb": 52.5e6,
    "iddpm-imagenet64-cond": 273.0e6,
    "iddpm-upsampler256": 273.0e6,
    "iddpm-lsun-bedroom-lr1e-4": 113.7e6,
    "iddpm-lsun-bedroom-lr2e-5": 113.7e6,
    # DDPM's CIFAR-10 network: "35.7 million parameters" (Ho et al. 2020, Appendix B)
    "ddpm-cifar10": 35.7e6,
}
RELEASED_UPSAMPLER_PARAMS = {
    "upsampler64-256": 312e6,
    "upsampler128-512": 309e6,
    "iddpm-upsampler256": 279.8e6,
}


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Replace the zero-initialised weights, so every path contributes to the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * scale
            p.copy_(1 + noise if name.endswith("norm.weight") else noise)
    return model


def tiny_inputs(batch: int = 2, seed: int = 0, size: int = 32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=gen)
    t = torch.tensor([3, 711][:batch])
    y = torch.tensor([1, 7][:batch])
    return x, t, y


# ---------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_builds_on_meta_with_plausible_size(preset):
    cfg = load_config(preset)
    unet = build_unet(cfg.model, device="meta")
    n = count_parameters(unet)
    print(f"{preset}: unet {n / 1e6:.2f}M", end="")
    assert all(p.is_meta for p in unet.parameters())
    if preset in RELEASED_UNET_PARAMS:
        assert n == pytest.approx(RELEASED_UNET_PARAMS[preset], rel=0.01)
    elif preset == "bench-32":
        assert n == pytest.approx(11.3e6, rel=0.03)
    elif preset == "tiny":
        assert 0.5e6 < n < 5e6
    else:  # classifier*/upsampler* presets reuse an imagenet base model
        assert 290e6 < n < 560e6
    if cfg.classifier.enabled:
        m = count_parameters(build_classifier(cfg.classifier, device="meta"))
        print(f", classifier {m / 1e6:.2f}M", end="")
        assert (0.2e6 < m < 5e6) if cfg.classifier.image_size <= 32 else (20e6 < m < 100e6)
    if cfg.upsampler.enabled:
        u = count_parameters(build_upsampler(cfg.upsampler, device="meta"))
        print(f", upsampler {u / 1e6:.2f}M", end="")
        if preset in RELEASED_UPSAMPLER_PARAMS:
            assert u == pytest.approx(RELEASED_UPSAMPLER_PARAMS[preset], rel=0.01)
        else:
            assert 0.2e6 < u < 5e6
    print()


# ---------------------------------------------------------------------------- released keys

# Key -> shape as found in the released 64x64_diffusion.pt, 128x128_diffusion.pt, ...
RELEASED_KEYS = {
    "imagenet64": {
        "time_embed.0.weight": (768, 192),
        "time_embed.2.weight": (768, 768),
        "label_emb.weight": (1000, 768),
        "input_blocks.0.0.weight": (192, 3, 3, 3),
        "input_blocks.1.0.in_layers.0.weight": (192,),
        "input_blocks.1.0.emb_layers.1.weight": (384, 768),
        "input_blocks.1.0.out_layers.3.weight": (192, 192, 3, 3),
        "input_blocks.4.0.in_layers.2.weight": (192, 192, 3, 3),
        "input_blocks.5.0.skip_connection.weight": (384, 192, 1, 1),
        "input_blocks.5.1.norm.weight": (384,),
        "input_blocks.5.1.qkv.weight": (1152, 384, 1),
        "middle_block.1.qkv.weight": (2304, 768, 1),
        "middle_block.1.proj_out.weight": (768, 768, 1),
        "middle_block.2.out_layers.3.bias": (768,),
        "output_blocks.0.0.in_layers.0.weight": (1536,),
        "output_blocks.3.2.in_layers.2.weight": (768, 768, 3, 3),
        "output_blocks.15.0.skip_connection.weight": (192, 384, 1, 1),
        "out.0.weight": (192,),
        "out.2.weight": (6, 192, 3, 3),
    },
    "imagenet128": {
        "label_emb.weight": (1000, 1024),
        "input_blocks.0.0.weight": (256, 3, 3, 3),
        "input_blocks.7.0.skip_connection.weight": (512, 256, 1, 1),
        "input_blocks.7.1.qkv.weight": (1536, 512, 1),
        "input_blocks.12.0.in_layers.2.weight": (768, 768, 3, 3),
        "middle_block.1.qkv.weight": (3072, 1024, 1),
        "output_blocks.2.2.emb_layers.1.weight": (2048, 1024),
        "output_blocks.14.0.skip_connection.weight": (256, 512, 1, 1),
        "out.2.weight": (6, 256, 3, 3),
    },
    "imagenet256": {
        "label_emb.weight": (1000, 1024),
        "input_blocks.0.0.weight": (256, 3, 3, 3),
        "input_blocks.10.1.qkv.weight": (1536, 512, 1),
        "input_blocks.13.0.skip_connection.weight": (1024, 512, 1, 1),
        "middle_block.1.qkv.weight": (3072, 1024, 1),
        "middle_block.1.proj_out.weight": (1024, 1024, 1),
        "output_blocks.2.2.in_layers.2.weight": (1024, 1024, 3, 3),
        "output_blocks.17.0.out_layers.3.weight": (256, 256, 3, 3),
        "out.2.weight": (6, 256, 3, 3),
    },
}
RELEASED_KEY_COUNTS = {"imagenet64": 541, "imagenet128": 493, "imagenet256": 567}
# The attention-pool head of every released ImageNet classifier (width 128 -> 512 at 8x8).
RELEASED_CLASSIFIER_HEAD = {
    "out.0.weight": (512,),
    "out.2.positional_embedding": (512, 65),
    "out.2.qkv_proj.weight": (1536, 512, 1),
    "out.2.c_proj.weight": (1000, 512, 1),
    "out.2.c_proj.bias": (1000,),
}


@pytest.mark.parametrize("preset", sorted(RELEASED_KEYS))
def test_state_dict_keys_match_released_checkpoints(preset):
    cfg = load_config(preset)
    state = build_unet(cfg.model, device="meta").state_dict()
    assert len(state) == RELEASED_KEY_COUNTS[preset]
    for key, shape in RELEASED_KEYS[preset].items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key
    assert list(state)[:2] == ["time_embed.0.weight", "time_embed.0.bias"]
    assert list(state)[-2:] == ["out.2.weight", "out.2.bias"]
    head = {k: v for k, v in build_classifier(cfg.classifier, "meta").state_dict().items()}
    for key, shape in RELEASED_CLASSIFIER_HEAD.items():
        assert tuple(head[key].shape) == shape, key


def test_upsampler_keys_and_plain_resampling_keys():
    up = build_upsampler(load_config("upsampler64-256").upsampler, "meta").state_dict()
    assert tuple(up["input_blocks.0.0.weight"].shape) == (192, 6, 3, 3)  # x and low_res
    assert tuple(up["out.2.weight"].shape) == (6, 192, 3, 3)
    # Without BigGAN up/down blocks the resamplers are plain convs named op / conv.
    cfg = load_config("tiny", ["model.resblock_updown=false"])
    state = build_unet(cfg.model, "meta").state_dict()
    assert tuple(state["input_blocks.2.0.op.weight"].shape) == (32, 32, 3, 3)
    assert tuple(state["output_blocks.1.2.conv.weight"].shape) == (64, 64, 3, 3)


# ---------------------------------------------------------------------------- forward


def test_tiny_forward_backward_shapes_and_grads():
    cfg = load_config("tiny")
    model = build_unet(cfg.model)
    x, t, y = tiny_inputs()
    with torch.no_grad():
        out = model(x, t, y)
    assert out.shape == (2, 6, 32, 32)  # learn_sigma: eps and v channels
    assert torch.count_nonzero(out) == 0  # the output conv starts at zero

    randomize(model)
    out = model(x, t, y)
    out.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    no_grad = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert no_grad == []

    fixed = load_config("tiny", ["model.learn_sigma=false", "diffusion.learn_sigma=false"])
    assert build_unet(fixed.model).out[2].out_channels == 3


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = load_config("tiny")
    plain = randomize(build_unet(cfg.model))
    ckpt = build_unet(load_config("tiny", ["model.use_checkpoint=true"]).model)
    ckpt.load_state_dict(plain.state_dict())
    x, t, y = tiny_inputs()
    for m in (plain, ckpt):
        m(x, t, y).square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_class_label_changes_output_through_adagn():
    model = randomize(build_unet(load_config("tiny").model)).eval()
    x, t, _ = tiny_inputs()
    with torch.no_grad():
        a = model(x, t, torch.tensor([1, 1]))
        b = model(x, t, torch.tensor([2, 2]))
    assert (a - b).abs().mean() > 1e-3 * a.abs().mean()
    with pytest.raises(ValueError, match="class-conditional"):
        model(x, t)


def test_resblock_scale_shift_norm_is_adagn():
    torch.manual_seed(0)
    block = randomize(ResBlock(32, 16, 0.0, out_channels=32, use_scale_shift_norm=True)).eval()
    x, emb = torch.randn(2, 32, 8, 8), torch.randn(2, 16)
    h = block.in_layers(x)
    scale, shift = block.emb_layers(emb)[..., None, None].chunk(2, dim=1)
    h = torch.nn.functional.group_norm(h, 32, block.out_layers[0].weight, block.out_layers[0].bias)
    h = h * (1 + scale) + shift
    expected = x + block.out_layers[3](torch.nn.functional.silu(h))
    torch.testing.assert_close(block(x, emb), expected, rtol=1e-5, atol=1e-5)
    assert block.emb_layers[1].out_features == 64  # scale and shift


# ---------------------------------------------------------------------------- attention


def explicit_attention(q, k, v):
    """softmax(Q K^T / sqrt(d)) V for [B, H, C, T] tensors, channels-first."""
    d = q.shape[2]
    w = torch.softmax(torch.einsum("bhct,bhcs->bhts", q, k) / math.sqrt(d), dim=-1)
    return torch.einsum("bhts,bhcs->bhct", w, v)


@pytest.mark.parametrize("legacy", [True, False])
def test_sdpa_attention_equals_explicit_softmax(legacy):
    torch.manual_seed(1)
    b, heads, ch, length = 2, 4, 16, 37
    qkv = torch.randn(b, 3 * heads * ch, length)
    if legacy:  # heads first: [B, H, (q k v), C, T]
        q, k, v = qkv.reshape(b, heads, 3, ch, length).unbind(2)
    else:  # q/k/v first: [B, (q k v), H, C, T]
        q, k, v = qkv.reshape(b, 3, heads, ch, length).unbind(1)
    expected = explicit_attention(q, k, v).reshape(b, heads * ch, length)
    torch.testing.assert_close(qkv_attention(qkv, heads, legacy), expected, rtol=1e-5, atol=1e-5)
    other = qkv_attention(qkv, heads, not legacy)
    assert (other - expected).abs().max() > 0.1  # the two orders really differ


def test_attention_block_heads_from_channels_and_residual():
    block = AttentionBlock(128, num_heads=4, num_head_channels=32)
    assert block.num_heads == 4
    assert AttentionBlock(128, num_heads=2).num_heads == 2
    x = torch.randn(2, 128, 4, 4)
    torch.testing.assert_close(block(x), x)  # proj_out starts at zero
    with pytest.raises(ValueError, match="divisible"):
        AttentionBlock(96, num_head_channels=64)


# ---------------------------------------------------------------------------- other nets


@pytest.mark.parametrize("pool", ["attention", "adaptive", "spatial", "spatial_v2"])
def test_classifier_logits_shape(pool):
    cfg = load_config("tiny", [f"classifier.pool={pool}"])
    clf = randomize(build_classifier(cfg.classifier))
    x, t, _ = tiny_inputs(size=cfg.classifier.image_size)  # the attention pool is sized for it
    logits = clf(x, t)
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all() and logits.std() > 0
    logits.logsumexp(-1).sum().backward()  # guidance needs d log p / d x; weights here
    assert clf.input_blocks[0][0].weight.grad.abs().sum() > 0


def test_upsampler_concatenates_bilinear_low_res():
    cfg = load_config("tiny")
    up = randomize(build_upsampler(cfg.upsampler)).eval()
    assert up.input_blocks[0][0].in_channels == 6
    x, t, y = tiny_inputs()
    low = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = up(x, t, low_res=low, y=y)
        # the released order: [x_t, bilinear(low_res)] (half-pixel centres, no corner alignment)
        bilinear = F.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)
        expected = UNetModel.forward(up, torch.cat([x, bilinear], dim=1), t, y)
        nearest = F.interpolate(low, size=(32, 32), mode="nearest")
        wrong = UNetModel.forward(up, torch.cat([x, nearest], dim=1), t, y)
    assert out.shape == (2, 6, 32, 32)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert (out - wrong).abs().max() > 1e-3  # the comparison can tell the two apart
    with pytest.raises(ValueError, match="low_res"):
        up(x, t, y=y)


# ---------------------------------------------------------------------------- checkpoints


def test_load_openai_checkpoint_round_trip(tmp_path):
    cfg = load_config("tiny")
    src = randomize(build_unet(cfg.model), seed=3)
    path = tmp_path / "tiny.pt"
    torch.save(src.state_dict(), path)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    for source in (path, str(path), buf):
        dst = load_openai_checkpoint(source, build_unet(cfg.model))
        for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values(), strict=True):
            assert torch.equal(a, b), k
    # Meta-built networks take the checkpoint tensors directly.
    meta = build_and_load(cfg.model, path)
    assert not any(p.is_meta for p in meta.parameters())
    x, t, y = tiny_inputs()
    torch.testing.assert_close(meta(x, t, y), src(x, t, y))
    assert isinstance(build_network(cfg.upsampler, "meta"), torch.nn.Module)


def test_tampered_checkpoint_reports_every_problem(tmp_path):
    cfg = load_config("tiny")
    state = build_unet(cfg.model).state_dict()
    del state["middle_block.1.qkv.weight"]
    state["middle_block.1.extra"] = torch.zeros(1)
    state["out.2.weight"] = torch.zeros(3, 32, 3, 3)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError) as err:
        load_openai_checkpoint(path, build_unet(cfg.model))
    assert err.value.missing == ["middle_block.1.qkv.weight"]
    assert err.value.unexpected == ["middle_block.1.extra"]
    assert err.value.mismatched == [("out.2.weight", (3, 32, 3, 3), (6, 32, 3, 3))]
    text = str(err.value)
    for needle in ("missing keys", "middle_block.1.qkv.weight", "unexpected keys", "[3, 32, 3, 3]"):
        assert needle in text
    torch.save({"model": state}, path)
    with pytest.raises(ValueError, match="plain state dict"):
        load_openai_checkpoint(path, build_unet(cfg.model))


# ---------------------------------------------------------------------------- precision


def record_output_dtypes(modules: dict[str, torch.nn.Module]) -> dict[str, torch.dtype]:
    """Forward hooks that keep the dtype each module's output had (the last call)."""
    seen: dict[str, torch.dtype] = {}
    for name, module in modules.items():
        module.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.dtype))
    return seen


def test_bf16_autocast_runs_in_bf16_and_stays_close_to_fp32():
    model = randomize(build_unet(load_config("tiny").model)).eval()
    x, t, y = tiny_inputs()
    dtypes = record_output_dtypes(
        {
            "first conv": model.input_blocks[0][0],
            "res block conv": model.input_blocks[1][0].in_layers[2],
            "attention qkv": model.middle_block[1].qkv,
        }
    )
    with torch.no_grad():
        ref = model(x, t, y)
        assert set(dtypes.values()) == {torch.float32}
        with autocast("bf16", "cpu"):  # the training loop's and sampler's context
            low = model(x, t, y)
    assert dtypes == dict.fromkeys(dtypes, torch.bfloat16), dtypes  # it really ran in bf16
    assert low.dtype in (torch.bfloat16, torch.float32)
    rel = (low.float() - ref).abs().max() / ref.abs().max()
    assert rel < 0.05, rel


def test_convert_to_fp16_torso_close_to_fp32():
    model = randomize(build_unet(load_config("tiny").model)).eval()
    x, t, y = tiny_inputs()
    with torch.no_grad():
        ref = model(x, t, y)
        model.convert_to_fp16()
        assert model.dtype == torch.float16
        assert model.input_blocks[1][0].in_layers[0].weight.dtype == torch.float32  # norms stay
        assert model.out[2].weight.dtype == torch.float32  # head stays
        half = model(x, t, y)
    assert half.dtype == torch.float32
    rel = (half - ref).abs().max() / ref.abs().max()
    assert rel < 0.01, rel
    model.convert_to_fp32()
    assert model.dtype == torch.float32


# ---------------------------------------------------------------------------- nn helpers


def test_timestep_embedding_is_cos_then_sin():
    t = torch.tensor([0.0, 5.0, 999.0])
    emb = timestep_embedding(t, 8)
    assert emb.shape == (3, 8)
    torch.testing.assert_close(emb[:, 0], torch.cos(t))  # first frequency is 1
    torch.testing.assert_close(emb[:, 4], torch.sin(t))
    torch.testing.assert_close(emb[:, 1], torch.cos(t * 10000 ** (-1 / 4)))
    odd = timestep_embedding(t, 7)
    assert odd.shape == (3, 7) and torch.all(odd[:, -1] == 0)


def test_groupnorm32_runs_in_float32_and_keeps_dtype():
    norm = GroupNorm32(4, 8)
    x = (torch.randn(2, 8, 4, 4) * 100 + 1000).half()
    out = norm(x)
    assert out.dtype == torch.float16
    expected = torch.nn.functional.group_norm(x.float(), 4)
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)
