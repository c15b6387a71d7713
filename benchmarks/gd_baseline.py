"""The guided-diffusion-like reference network the benchmarks time the production path against.

openai/guided-diffusion runs the released layouts as a plain eager module: NCHW tensors, the
torso's convolutions cast to float16 by ``convert_to_fp16`` when ``use_fp16`` (GroupNorm
computed in float32 and cast back, embeddings and the output head in float32), and attention
written as two einsums on ``[N·H, C, T]`` with the 1/√√C scale applied to q and k each and the
weights softmaxed in float32 then cast back. :func:`guided_diffusion_like` rebuilds exactly
that on our UNet (same module tree, same state dict): our ``convert_to_fp16`` is the same
conversion, and :class:`EinsumAttention` replaces the SDPA attention. No fusion, no
channels_last, no TF32 (the callers time every float32 reference with TF32 off, see
:func:`tf32`). On CPU guided-diffusion runs float32 (``fp16=False`` here).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from models.unet import EncoderUNetModel, UNetModel
from models.unet_blocks import QKVAttention


class EinsumAttention(nn.Module):
    """Attention computed the way guided-diffusion's QKVAttention(Legacy) computes it."""

    def __init__(self, n_heads: int, legacy: bool):
        super().__init__()
        self.n_heads = n_heads
        self.legacy = legacy

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        if self.legacy:  # heads-major: each head holds its own q, k, v
            q, k, v = qkv.reshape(bs * self.n_heads, 3 * ch, length).split(ch, dim=1)
        else:  # q, k, v first, then heads
            q, k, v = (t.reshape(bs * self.n_heads, ch, length) for t in qkv.chunk(3, dim=1))
        scale = ch**-0.25  # on q and k each: more stable in float16 than 1/√C after the product
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        return torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)


def guided_diffusion_like(net: nn.Module, fp16: bool) -> nn.Module:
    """A copy of ``net`` (a diffusion UNet or the noisy classifier) run as guided-diffusion
    runs it (see the module doc)."""
    ref = copy.deepcopy(net).eval().requires_grad_(False)
    for block in ref.modules():  # attention blocks and the classifier's attention pool
        old = getattr(block, "attention", None)
        if isinstance(old, QKVAttention):
            block.attention = EinsumAttention(old.n_heads, old.legacy)
    if fp16:
        if not isinstance(ref, (UNetModel, EncoderUNetModel)):
            raise TypeError("fp16 needs a UNet or the classifier (their torso is converted)")
        ref.convert_to_fp16()
    return ref


def run_as_guided_diffusion(
    sampler: Any,
    net: nn.Module,
    classifier: nn.Module | None,
    fp16: bool,
    classifier_fp16: bool | None = None,
) -> Any:
    """A :class:`~tasks.sampling.worker.ShardSampler` whose diffusion network (and classifier,
    when it guides) run as guided-diffusion runs them; its sampling code stays the actors'.
    ``classifier_fp16`` is guided-diffusion's ``--classifier_use_fp16`` (default: ``fp16``);
    its sampling commands leave it False."""
    from models.guidance import cond_fn_from_classifier

    sampler.model = guided_diffusion_like(net, fp16).to(sampler.device)
    if classifier is not None and sampler.cond_fn is not None:
        half = fp16 if classifier_fp16 is None else classifier_fp16
        sampler.classifier = guided_diffusion_like(classifier, half).to(sampler.device)
        sampler.cond_fn = cond_fn_from_classifier(sampler.classifier, sampler.spec.classifier_scale)
    return sampler


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 matmuls/convolutions on or off for a block, restored after (it is per process, and
    ``models.fast.apply_plan`` switches it on for the production path)."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
