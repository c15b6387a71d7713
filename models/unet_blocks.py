"""The building blocks of the ADM networks (Dhariwal & Nichol 2021): attention, resampling,
the timestep-conditioned ResBlock, and the factory that gives one network's blocks their shared
settings.

Attribute names (``in_layers``, ``emb_layers``, ``out_layers``, ``skip_connection``, ``qkv``,
``proj_out``, ``op``, ...) and the order in which submodules are created fix the released
checkpoints' ``state_dict()`` keys and the parameter initialisation under a seed; models.unet
assembles these blocks into the UNet, its super-resolution variant and the noisy classifier.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .nn import checkpoint, normalization, zero_module

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
class BlockFactory:
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
