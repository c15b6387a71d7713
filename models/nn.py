"""Small building blocks shared by the ADM networks.

Only torch. Names follow the released guided-diffusion code where the state-dict layout
depends on them (``GroupNorm32`` carries ``weight``/``bias`` exactly like ``nn.GroupNorm``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

M = TypeVar("M", bound=nn.Module)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back, so half/bf16 torsos stay stable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Weights are cast too, so a model converted wholesale with .half() still works;
        # autocast already runs group_norm in float32, so no autocast handling is needed.
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        out = nn.functional.group_norm(x.float(), self.num_groups, weight, bias, self.eps)
        return out.to(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    """The normalisation used everywhere in ADM: 32 groups."""
    return GroupNorm32(32, channels)


def zero_module(module: M) -> M:
    """Zero a module's parameters in place (residual branches start as identity)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, max_period: float = 10000.0
) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, shape ``[N, dim]``.

    Layout as in the released models: the cosine half first, then the sine half;
    an odd ``dim`` gets a trailing zero column.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    freqs = torch.exp(-math.log(max_period) * exponent)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def checkpoint(func: Callable[..., torch.Tensor], inputs: Iterable, flag: bool) -> torch.Tensor:
    """Run ``func(*inputs)``, recomputing activations in backward when ``flag`` is set.

    Checkpointing only pays off when a backward pass will follow, so it is skipped when
    grad mode is off (sampling) even if ``flag`` is true.
    """
    inputs = tuple(inputs)
    if flag and torch.is_grad_enabled():
        return _torch_checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)


def convert_module_to_f16(module: nn.Module) -> None:
    """Cast a convolution's weights to float16 (what the released ``use_fp16`` does)."""
    _convert_conv(module, torch.float16)


def convert_module_to_f32(module: nn.Module) -> None:
    """Undo :func:`convert_module_to_f16`."""
    _convert_conv(module, torch.float32)


def _convert_conv(module: nn.Module, dtype: torch.dtype) -> None:
    # Only convolutions change: norms, embeddings and the emb projections stay float32,
    # which is also what the released fp16 checkpoints assume.
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        module.weight.data = module.weight.data.to(dtype)
        if module.bias is not None:
            module.bias.data = module.bias.data.to(dtype)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
