"""Networks from the typed config: one function per network of the ADM pipeline.

``device="meta"`` builds the module tree without allocating weights (parameter counts,
key listings, or loading a checkpoint with ``assign=True``). Models are returned in float32;
callers that want the released fp16 torso call ``model.convert_to_fp16()`` themselves when
``cfg.use_fp16`` is set and the device supports it.
"""

from __future__ import annotations

import torch

from admflow.config import ClassifierConfig, UNetConfig, UpsamplerConfig

from .unet import EncoderUNetModel, SuperResModel, UNetModel


def build_unet(cfg: UNetConfig, device: str | torch.device | None = None) -> UNetModel:
    """The diffusion UNet ``eps_theta`` of ``cfg`` (the config's ``model`` section)."""
    with torch.device(device or "cpu"):
        return UNetModel(**cfg.unet_kwargs())


def build_classifier(
    cfg: ClassifierConfig, device: str | torch.device | None = None
) -> EncoderUNetModel:
    """The noisy classifier ``p_phi(y | x_t, t)`` of ``cfg`` (the ``classifier`` section)."""
    with torch.device(device or "cpu"):
        return EncoderUNetModel(**cfg.classifier_kwargs())


def build_upsampler(
    cfg: UpsamplerConfig, device: str | torch.device | None = None
) -> SuperResModel:
    """The super-resolution UNet (ADM-U) of ``cfg`` (the ``upsampler`` section)."""
    with torch.device(device or "cpu"):
        return SuperResModel(**cfg.unet.unet_kwargs())


def build_network(
    section: UNetConfig | ClassifierConfig | UpsamplerConfig,
    device: str | torch.device | None = None,
) -> torch.nn.Module:
    """Dispatch on the config section's type."""
    if isinstance(section, UpsamplerConfig):
        return build_upsampler(section, device)
    if isinstance(section, ClassifierConfig):
        return build_classifier(section, device)
    if isinstance(section, UNetConfig):
        return build_unet(section, device)
    raise TypeError(
        f"expected UNetConfig, ClassifierConfig or UpsamplerConfig, got {type(section).__name__}"
    )
