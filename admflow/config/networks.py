"""The networks' sections: the diffusion UNet, the noisy classifier and the upsampler, with the
resolution arithmetic (channel multipliers, halvings, attention levels) they are checked by."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from admflow.config.base import Section
from admflow.config.sections import DiffusionConfig


def default_channel_mult(image_size: int) -> tuple[float, ...]:
    """The paper's per-resolution channel multipliers (guided-diffusion defaults)."""
    table = {
        512: (0.5, 1, 1, 2, 2, 4, 4),
        256: (1, 1, 2, 2, 4, 4),
        128: (1, 1, 2, 3, 4),
        64: (1, 2, 3, 4),
        32: (1, 2, 2, 2),
        16: (1, 2, 2),
        8: (1, 2),
    }
    if image_size not in table:
        raise ValueError(
            f"no default channel_mult for image_size {image_size}; "
            f"set channel_mult explicitly or use one of {sorted(table)}"
        )
    return table[image_size]


def _resolve_mult(image_size: int, channel_mult: list[float] | None) -> tuple[float, ...]:
    if channel_mult:
        return tuple(channel_mult)
    try:
        return default_channel_mult(image_size)
    except ValueError as e:
        raise ValueError(f"channel_mult: {e}") from None


def _check_levels(
    image_size: int, mult: tuple[float, ...], attention_resolutions: list[int], skip_above: bool
) -> list[int]:
    """Each of the len(mult) - 1 downsamplings halves the side exactly (skips must match), and
    each attention resolution is one that a level works at (``skip_above``: resolutions above
    ``image_size`` pass, as the classifier's network ignores them); returns the levels'
    resolutions."""
    if image_size % 2 ** (len(mult) - 1):
        raise ValueError(
            f"image_size {image_size} cannot be halved {len(mult) - 1} times "
            f"(channel_mult has {len(mult)} levels); use a multiple of {2 ** (len(mult) - 1)} "
            f"or fewer levels"
        )
    reachable = [image_size // 2**i for i in range(len(mult))]
    for r in attention_resolutions:
        if r not in reachable and not (skip_above and r > image_size):
            raise ValueError(
                f"attention_resolutions: {r} is never reached by image_size {image_size} "
                f"with {len(mult)} levels; allowed values: {reachable}"
            )
    return reachable


class UNetConfig(Section):
    """ADM UNet hyperparameters, named as in the released checkpoints' flags."""

    image_size: int = Field(32, gt=0)
    in_channels: int = Field(3, gt=0)
    model_channels: int = Field(64, gt=0)
    num_res_blocks: int = Field(2, gt=0)
    attention_resolutions: list[int] = [16, 8]
    channel_mult: list[float] | None = None
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    num_classes: int | None = Field(None, gt=0, description="null: unconditional")
    null_class: bool = Field(
        False, description="one more class embedding row, label num_classes = ∅ (for CFG)"
    )
    learn_sigma: bool = True
    use_checkpoint: bool = False
    use_fp16: bool = False
    num_heads: int = Field(4, gt=0)
    num_head_channels: int = Field(-1, description="-1: use num_heads")
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    use_new_attention_order: bool = False

    @model_validator(mode="after")
    def _check(self) -> UNetConfig:
        mult = self.resolved_channel_mult()
        reachable = _check_levels(self.image_size, mult, self.attention_resolutions, False)
        if self.num_head_channels != -1 and self.num_head_channels <= 0:
            raise ValueError("num_head_channels: must be -1 (use num_heads) or > 0")
        if self.num_head_channels > 0:
            for level, m in enumerate(mult):
                ch = int(m * self.model_channels)
                if reachable[level] in self.attention_resolutions and ch % self.num_head_channels:
                    raise ValueError(
                        f"num_head_channels: {self.num_head_channels} does not divide the "
                        f"{ch} channels at resolution {reachable[level]}"
                    )
        return self

    def resolved_channel_mult(self) -> tuple[float, ...]:
        return _resolve_mult(self.image_size, self.channel_mult)

    def unet_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``models.unet.UNetModel``."""
        out_channels = self.in_channels * (2 if self.learn_sigma else 1)
        return dict(
            image_size=self.image_size,
            in_channels=self.in_channels,
            model_channels=self.model_channels,
            out_channels=out_channels,
            num_res_blocks=self.num_res_blocks,
            attention_resolutions=tuple(self.image_size // r for r in self.attention_resolutions),
            dropout=self.dropout,
            channel_mult=self.resolved_channel_mult(),
            # the null label ∅ of classifier-free guidance is one more embedding row; without
            # it the tree is the released one, so released checkpoints still load
            num_classes=self.num_classes + 1 if self.null_class else self.num_classes,
            use_checkpoint=self.use_checkpoint,
            use_fp16=self.use_fp16,
            num_heads=self.num_heads,
            num_head_channels=self.num_head_channels,
            num_heads_upsample=self.num_heads_upsample,
            use_scale_shift_norm=self.use_scale_shift_norm,
            resblock_updown=self.resblock_updown,
            use_new_attention_order=self.use_new_attention_order,
        )


class ClassifierConfig(Section):
    """The noisy classifier p_φ(y | x_t, t) used for guidance."""

    enabled: bool = True
    image_size: int = Field(32, gt=0)
    in_channels: int = 3
    width: int = Field(128, gt=0)
    depth: int = Field(2, gt=0)
    attention_resolutions: list[int] = [32, 16, 8]
    channel_mult: list[float] | None = None
    num_head_channels: int = 64
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    pool: Literal["attention", "adaptive", "spatial", "spatial_v2"] = "attention"
    use_fp16: bool = False
    num_classes: int = Field(1000, gt=0)

    @model_validator(mode="after")
    def _check(self) -> ClassifierConfig:
        _check_levels(
            self.image_size, self.resolved_channel_mult(), self.attention_resolutions, True
        )
        return self

    def resolved_channel_mult(self) -> tuple[float, ...]:
        return _resolve_mult(self.image_size, self.channel_mult)

    def classifier_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``models.unet.EncoderUNetModel``."""
        return dict(
            image_size=self.image_size,
            in_channels=self.in_channels,
            model_channels=self.width,
            out_channels=self.num_classes,
            num_res_blocks=self.depth,
            attention_resolutions=tuple(
                self.image_size // r for r in self.attention_resolutions if r <= self.image_size
            ),
            channel_mult=self.resolved_channel_mult(),
            use_fp16=self.use_fp16,
            num_head_channels=self.num_head_channels,
            use_scale_shift_norm=self.use_scale_shift_norm,
            resblock_updown=self.resblock_updown,
            pool=self.pool,
        )


class UpsamplerConfig(Section):
    """The super-resolution model of the two-stage pipeline (ADM-U)."""

    enabled: bool = False
    small_size: int = Field(16, gt=0)
    unet: UNetConfig = UNetConfig(image_size=32)
    diffusion: DiffusionConfig = DiffusionConfig()

    @model_validator(mode="after")
    def _check(self) -> UpsamplerConfig:
        if self.small_size >= self.unet.image_size:
            raise ValueError(
                f"small_size: {self.small_size} must be smaller than unet.image_size "
                f"{self.unet.image_size}"
            )
        return self
