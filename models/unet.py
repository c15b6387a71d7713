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
    checkpoint,
    convert_module_to_f16,
    convert_module_to_f32,
    normalization,
    timestep_embedding,
    zero_module,
)

# ---------------------------------------------------------------------------- attention


def qkv_attention(
    qkv: torch.Tensor, n_heads: int, legacy: bool, contiguous: bool = False
) -> torch.Tensor:
    """Multi-head self-attention on a packed ``[N, 3*H*C, T]`` tensor -> ``[N, H*C, T]``.

    ``legacy``: channels are laid out heads-major (each head holds its own q, k, v), the
    order of the released checkpoints trained without ``use_new_attention_order``.
    Otherwise the tensor is split into q, k, v first and each of those into heads.
    The scale is 1/sqrt(C) per head, as in softmax(Q K^T / sqrt(d)) V.

    ``contiguous`` copies q, k, v into ``[N, H, T, C]`` first: PyTorch's fused (flash) CPU
    kernel needs unit stride in the last dimension and falls back to the unfused math path on
    the transposed views. Same attention, summed in another order (the inference fast path).
    """
    bs, width, length = qkv.shape
    if width % (3 * n_heads):
        raise ValueError(f"qkv width {width} is not divisible by 3 * {n_heads} heads")
    ch = width // (3 * n_heads)
    if contiguous:
        if legacy:
            heads = qkv.reshape(bs, n_heads, 3 * ch, length).transpose(-1, -2).contiguous()
            q, k, v = heads.split(ch, dim=-1)
        else:
            parts = qkv.reshape(bs, 3, n_heads, ch, length).transpose(-1, -2).contiguous()
            q, k, v = parts.unbind(dim=1)
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(-1, -2).reshape(bs, n_heads * ch, length)
    if legacy:
        q, k, v = qkv.reshape(bs, n_heads, 3 * ch, length).split(ch, dim=2)
    else:
        q, k, v = (t.reshape(bs, n_heads, ch, length) for t in qkv.chunk(3, dim=1))
    # SDPA wants [..., T, C]; the result is transposed back to channels-first.
    out = F.scaled_dot_product_attention(
        q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2)
    )
    return out.transpose(-1, -2).reshape(bs, n_heads * ch, length)


class QKVAttention(nn.Module):
    """Parameter-free attention; ``legacy`` selects the channel layout (see qkv_attention).

    ``contiguous`` (off; set by models.fast for inference) picks the flash-kernel layout.
    """

    def __init__(self, n_heads: int, legacy: bool = False):
        super().__init__()
        self.n_heads = n_heads
        self.legacy = legacy
        self.contiguous = False

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        return qkv_attention(qkv, self.n_heads, self.legacy, self.contiguous)


class AttentionBlock(nn.Module):
    """Pre-norm self-attention over all spatial positions with a zero-initialised projection."""

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(
                    f"{channels} channels are not divisible by num_head_channels {num_head_channels}"
                )
            self.num_heads = channels // num_head_channels
        self.channels = channels
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.attention = QKVAttention(self.num_heads, legacy=not use_new_attention_order)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x,), self.use_checkpoint)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(b, c, *spatial)


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling: the mean token attends over all positions."""

    def __init__(self, spatial_dim: int, embed_dim: int, num_head_channels: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(
            torch.randn(embed_dim, spatial_dim**2 + 1) / embed_dim**0.5
        )
        self.qkv_proj = nn.Conv1d(embed_dim, 3 * embed_dim, 1)
        self.c_proj = nn.Conv1d(embed_dim, output_dim, 1)
        self.num_heads = embed_dim // num_head_channels
        self.attention = QKVAttention(self.num_heads, legacy=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        x = x.reshape(b, c, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
        x = x + self.positional_embedding[None].to(x.dtype)
        x = self.c_proj(self.attention(self.qkv_proj(x)))
        return x[:, :, 0]


# ---------------------------------------------------------------------------- blocks


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep (+class) embedding as second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands the embedding to the children that take it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 conv (``conv``)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling: a strided 3x3 conv, or 2x2 average pooling (module name ``op``)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.op: nn.Module
        if use_conv:
            self.op = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=1)
        else:
            if self.out_channels != channels:
                raise ValueError("average-pool downsampling cannot change the channel count")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the embedding.

    With ``use_scale_shift_norm`` the embedding enters as AdaGN:
    ``GroupNorm(h) * (1 + scale) + shift``; otherwise it is added before the norm.
    ``up``/``down`` resample inside the block (BigGAN style) on both paths.

    ``fused`` (off; set by models.fast for inference only) computes the same values with
    fewer temporary tensors: AdaGN as one ``addcmul`` (rounding once where ``a * b + c``
    rounds twice), SiLU in place, and the residual added in place to the fresh conv output.
    In-place ops break autograd, so training never sets it.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        self.fused = False
        out_ch = self.out_channels

        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_ch, 3, padding=1)
        )
        self.updown = up or down
        self.h_upd: nn.Module
        self.x_upd: nn.Module
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_ch if use_scale_shift_norm else out_ch)
        )
        self.out_layers = nn.Sequential(
            normalization(out_ch),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1)),
        )
        self.skip_connection: nn.Module
        if out_ch == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, out_ch, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x, emb), self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            # Resample between the activation and the conv, so the conv runs at the new size.
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            if self.fused:
                h = torch.addcmul(shift, self.out_layers[0](h), 1 + scale)
                h = self.out_layers[3](self.out_layers[2](F.silu(h, inplace=True)))
            else:
                h = self.out_layers[0](h) * (1 + scale) + shift
                h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        if self.fused:
            return h.add_(self.skip_connection(x))  # h is the fresh output of the last conv
        return self.skip_connection(x) + h


# ---------------------------------------------------------------------------- trunk


@dataclass(frozen=True)
class _BlockFactory:
    """The settings every ResBlock/AttentionBlock of one network shares."""

    emb_channels: int
    dropout: float
    use_checkpoint: bool
    use_scale_shift_norm: bool
    num_head_channels: int
    use_new_attention_order: bool

    def res(self, ch: int, out_ch: int | None = None, up: bool = False, down: bool = False):
        return ResBlock(
            ch,
            self.emb_channels,
            self.dropout,
            out_channels=out_ch,
            use_scale_shift_norm=self.use_scale_shift_norm,
            use_checkpoint=self.use_checkpoint,
            up=up,
            down=down,
        )

    def attn(self, ch: int, num_heads: int) -> AttentionBlock:
        return AttentionBlock(
            ch,
            num_heads=num_heads,
            num_head_channels=self.num_head_channels,
            use_checkpoint=self.use_checkpoint,
            use_new_attention_order=self.use_new_attention_order,
        )


@dataclass
class _Trunk:
    blocks: nn.ModuleList
    block_channels: list[int]  # channels of every skip output, in order
    ch: int  # channels at the bottom
    ds: int  # downsample rate at the bottom


def _build_trunk(
    make: _BlockFactory,
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


def _middle(make: _BlockFactory, ch: int, num_heads: int) -> TimestepEmbedSequential:
    return TimestepEmbedSequential(make.res(ch), make.attn(ch, num_heads), make.res(ch))


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
        make = _BlockFactory(
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
        ch, ds, skip_chans = trunk.ch, trunk.ds, list(trunk.block_channels)
        self.middle_block = _middle(make, ch, num_heads)

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                out_ch = int(model_channels * mult)
                layers: list[nn.Module] = [make.res(ch + skip_chans.pop(), out_ch)]
                ch = out_ch
                if ds in self.attention_resolutions:
                    layers.append(make.attn(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    up = (
                        make.res(ch, ch, up=True)
                        if resblock_updown
                        else Upsample(ch, conv_resample)
                    )
                    layers.append(up)
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        first_ch = int(channel_mult[0] * model_channels)
        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(nn.Conv2d(first_ch, out_channels, 3, padding=1)),
        )

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
        make = _BlockFactory(
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
