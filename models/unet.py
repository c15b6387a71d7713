"""The ADM UNet (Dhariwal & Nichol 2021), its super-resolution variant and the noisy classifier.

Module names and nesting are chosen so that ``state_dict()`` keys and shapes equal those of
the released guided-diffusion checkpoints (``input_blocks.1.0.in_layers.0.weight``,
``middle_block.1.qkv.weight``, ``out.2.weight``, ...). Only 2-D images are supported.

Attention resolutions are given as *downsample rates* (``ds = image_size // resolution``),
as produced by ``UNetConfig.unet_kwargs()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .nn import (
    convert_module_to_f16,
    convert_module_to_f32,
    normalization,
    timestep_embedding,
    zero_module,
)
from .unet_blocks import (
    AttentionPool2d,
    BlockFactory,
    Downsample,
    TimestepEmbedSequential,
    Upsample,
)

# ---------------------------------------------------------------------------- trunk


@dataclass
class _Trunk:
    blocks: nn.ModuleList
    block_channels: list[int]  # channels of every skip output, in order
    ch: int  # channels at the bottom
    ds: int  # downsample rate at the bottom


def _build_trunk(
    make: BlockFactory,
    in_channels: int,
    model_channels: int,
    channel_mult: Sequence[float],
    num_res_blocks: int,
    attention_resolutions: Sequence[int],
    num_heads: int,
    conv_resample: bool,
    resblock_updown: bool,
) -> _Trunk:
    """The downsampling half shared by the UNet and the classifier."""
    ch = int(channel_mult[0] * model_channels)
    blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
    chans, ds = [ch], 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            layers: list[nn.Module] = [make.res(ch, int(mult * model_channels))]
            ch = int(mult * model_channels)
            if ds in attention_resolutions:
                layers.append(make.attn(ch, num_heads))
            blocks.append(TimestepEmbedSequential(*layers))
            chans.append(ch)
        if level != len(channel_mult) - 1:
            down = make.res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample)
            blocks.append(TimestepEmbedSequential(down))
            chans.append(ch)
            ds *= 2
    return _Trunk(blocks, chans, ch, ds)


def _build_output_blocks(
    make: BlockFactory,
    trunk: _Trunk,
    model_channels: int,
    channel_mult: Sequence[float],
    num_res_blocks: int,
    attention_resolutions: Sequence[int],
    num_heads_upsample: int,
    conv_resample: bool,
    resblock_updown: bool,
) -> tuple[nn.ModuleList, int]:
    """The UNet's upsampling half: each block takes one skip of the trunk, deepest first.

    Returns the blocks and the channel count of the last one.
    """
    ch, ds, skip_chans = trunk.ch, trunk.ds, list(trunk.block_channels)
    blocks = nn.ModuleList()
    for level, mult in reversed(list(enumerate(channel_mult))):
        for i in range(num_res_blocks + 1):
            out_ch = int(model_channels * mult)
            layers: list[nn.Module] = [make.res(ch + skip_chans.pop(), out_ch)]
            ch = out_ch
            if ds in attention_resolutions:
                layers.append(make.attn(ch, num_heads_upsample))
            if level and i == num_res_blocks:
                up = make.res(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample)
                layers.append(up)
                ds //= 2
            blocks.append(TimestepEmbedSequential(*layers))
    return blocks, ch


def _middle(make: BlockFactory, ch: int, num_heads: int) -> TimestepEmbedSequential:
    return TimestepEmbedSequential(make.res(ch), make.attn(ch, num_heads), make.res(ch))


def _out_head(ch: int, first_ch: int, out_channels: int) -> nn.Sequential:
    """Norm, SiLU and a zero-initialised conv (the model starts by predicting zero)."""
    return nn.Sequential(
        normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(first_ch, out_channels, 3, padding=1))
    )


def _time_embed(model_channels: int) -> nn.Sequential:
    dim = 4 * model_channels
    return nn.Sequential(nn.Linear(model_channels, dim), nn.SiLU(), nn.Linear(dim, dim))


# ---------------------------------------------------------------------------- models


class UNetModel(nn.Module):
    """The ADM denoiser ``eps_theta(x_t, t[, y])`` (plus variance channels when learned).

    ``attention_resolutions`` are downsample rates; ``num_head_channels`` (if not -1)
    overrides ``num_heads``; ``use_fp16`` records that the torso is meant to run in half
    precision (call :meth:`convert_to_fp16`); the forward pass follows the actual weight
    dtype, so an unconverted model still runs in float32.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        num_classes: int | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.channel_mult = tuple(channel_mult)
        self.num_classes = num_classes
        self.use_fp16 = use_fp16
        make = BlockFactory(
            emb_channels=4 * model_channels,
            dropout=dropout,
            use_checkpoint=use_checkpoint,
            use_scale_shift_norm=use_scale_shift_norm,
            num_head_channels=num_head_channels,
            use_new_attention_order=use_new_attention_order,
        )

        self.time_embed = _time_embed(model_channels)
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, 4 * model_channels)

        trunk = _build_trunk(
            make,
            in_channels,
            model_channels,
            channel_mult,
            num_res_blocks,
            self.attention_resolutions,
            num_heads,
            conv_resample,
            resblock_updown,
        )
        self.input_blocks = trunk.blocks
        self.middle_block = _middle(make, trunk.ch, num_heads)
        self.output_blocks, ch = _build_output_blocks(
            make,
            trunk,
            model_channels,
            channel_mult,
            num_res_blocks,
            self.attention_resolutions,
            num_heads_upsample,
            conv_resample,
            resblock_updown,
        )
        self.out = _out_head(ch, int(channel_mult[0] * model_channels), out_channels)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the torso runs in (float16 after :meth:`convert_to_fp16`)."""
        return next(self.input_blocks.parameters()).dtype  # the first conv

    def convert_to_fp16(self) -> None:
        """Cast the torso's convolutions to float16, like the released ``use_fp16``."""
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            part.apply(convert_module_to_f16)

    def convert_to_fp32(self) -> None:
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            part.apply(convert_module_to_f32)

    def embed(self, timesteps: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """Timestep embedding MLP, plus the class embedding for conditional models."""
        if (y is None) != (self.num_classes is None):
            raise ValueError("pass y if and only if the model is class-conditional")
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if y is not None:
            if y.shape != timesteps.shape:
                raise ValueError(
                    f"y must have shape {tuple(timesteps.shape)}, got {tuple(y.shape)}"
                )
            emb = emb + self.label_emb(y)
        return emb

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x``: ``[N, C, H, W]``, ``timesteps``: ``[N]``, ``y``: ``[N]`` labels or None."""
        emb = self.embed(timesteps, y)
        skips = []
        h = x.to(self.dtype)
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h.to(x.dtype))


class SuperResModel(UNetModel):
    """A UNet conditioned on a low-resolution image, upsampled bilinearly and concatenated."""

    def __init__(self, image_size: int, in_channels: int, *args, **kwargs):
        super().__init__(image_size, 2 * in_channels, *args, **kwargs)

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        low_res: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if low_res is None:
            raise ValueError("SuperResModel needs low_res, the [N, C, h, w] image to upsample")
        upsampled = F.interpolate(low_res, size=x.shape[-2:], mode="bilinear")
        return super().forward(torch.cat([x, upsampled], dim=1), timesteps, y)


class EncoderUNetModel(nn.Module):
    """The noisy classifier: the UNet's downsampling trunk and middle block plus a pool head.

    ``pool``: "adaptive" (global average + 1x1 conv), "attention" (AttentionPool2d at the
    bottom resolution), "spatial" / "spatial_v2" (MLP over every block's mean features).
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        pool: str = "adaptive",
    ):
        super().__init__()
        del num_heads_upsample  # accepted for signature parity; there is no upsampling path
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.use_fp16 = use_fp16
        self.pool = pool
        make = BlockFactory(
            emb_channels=4 * model_channels,
            dropout=dropout,
            use_checkpoint=use_checkpoint,
            use_scale_shift_norm=use_scale_shift_norm,
            num_head_channels=num_head_channels,
            use_new_attention_order=use_new_attention_order,
        )
        self.time_embed = _time_embed(model_channels)
        trunk = _build_trunk(
            make,
            in_channels,
            model_channels,
            channel_mult,
            num_res_blocks,
            tuple(attention_resolutions),
            num_heads,
            conv_resample,
            resblock_updown,
        )
        self.input_blocks = trunk.blocks
        ch = trunk.ch
        self.middle_block = _middle(make, ch, num_heads)
        feature_size = sum(trunk.block_channels) + ch
        self.out = self._head(pool, ch, trunk.ds, feature_size, num_head_channels)

    def _head(
        self, pool: str, ch: int, ds: int, feature_size: int, num_head_channels: int
    ) -> nn.Sequential:
        k = self.out_channels
        if pool == "adaptive":
            return nn.Sequential(
                normalization(ch),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d((1, 1)),
                zero_module(nn.Conv2d(ch, k, 1)),
                nn.Flatten(),
            )
        if pool == "attention":
            if num_head_channels == -1:
                raise ValueError("pool='attention' needs num_head_channels")
            spatial = self.image_size // ds
            return nn.Sequential(
                normalization(ch), nn.SiLU(), AttentionPool2d(spatial, ch, num_head_channels, k)
            )
        if pool == "spatial":
            return nn.Sequential(nn.Linear(feature_size, 2048), nn.ReLU(), nn.Linear(2048, k))
        if pool == "spatial_v2":
            return nn.Sequential(
                nn.Linear(feature_size, 2048), normalization(2048), nn.SiLU(), nn.Linear(2048, k)
            )
        raise ValueError(f"unknown pool {pool!r}; use adaptive, attention, spatial or spatial_v2")

    @property
    def dtype(self) -> torch.dtype:
        return next(self.input_blocks.parameters()).dtype  # the first conv

    def convert_to_fp16(self) -> None:
        for part in (self.input_blocks, self.middle_block):
            part.apply(convert_module_to_f16)

    def convert_to_fp32(self) -> None:
        for part in (self.input_blocks, self.middle_block):
            part.apply(convert_module_to_f32)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Class logits ``[N, out_channels]`` for noisy images ``x`` at ``timesteps``."""
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        spatial = self.pool.startswith("spatial")
        means = []
        h = x.to(self.dtype)
        for block in self.input_blocks:
            h = block(h, emb)
            if spatial:
                means.append(h.to(x.dtype).mean(dim=(2, 3)))
        h = self.middle_block(h, emb)
        if spatial:
            means.append(h.to(x.dtype).mean(dim=(2, 3)))
            return self.out(torch.cat(means, dim=-1))
        return self.out(h.to(x.dtype))
