"""The training objectives of the three ADM networks, as objects called ``loss(net, batch, generator)``.

* :class:`HybridDiffusionLoss`: L_hybrid = L_simple + λ L_vlb with a learned Σ (IDDPM §3.1,
  ADM §2), whatever :meth:`GaussianDiffusion.training_losses` computes for the diffusion's
  loss type; with class labels, classifier-free training drops some to the null class ∅.
* :class:`NoisyClassifierLoss`: cross-entropy of p_φ(y | x_t, t) on x_t ~ q(x_t | x_0) (ADM §4).
* :class:`UpsamplerLoss`: the same diffusion loss for the super-resolution model, conditioned on
  the area-downsampled image (:func:`models.resize.downsample_area`).

Each returns per-example terms ``{"loss": (B,), ...}`` (names in ``terms``); the training loop
draws t from its schedule sampler, weights ``loss`` by the importance weights, averages and
back-propagates. Everything random (noise, dropped labels) comes from ``generator`` so a
step's losses are a function of the step's seed: a resumed run recomputes them exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from models.gaussian_diffusion import GaussianDiffusion
from models.guidance import drop_labels
from models.resize import downsample_area

Terms = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Batch:
    """One (micro-)batch: images x_0 in [-1, 1] (NCHW), labels y and timesteps t."""

    x: torch.Tensor
    y: torch.Tensor
    t: torch.Tensor

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, rows: slice) -> Batch:
        return Batch(self.x[rows], self.y[rows], self.t[rows])


class TrainingLoss(Protocol):
    """What the training loop needs of an objective."""

    terms: tuple[str, ...]
    diffusion: GaussianDiffusion

    def __call__(self, net: nn.Module, batch: Batch, generator: torch.Generator) -> Terms: ...


class HybridDiffusionLoss:
    """The diffusion model's loss; ``label_dropout`` > 0 trains ∅ = ``num_classes`` (CFG)."""

    terms: tuple[str, ...] = ("loss", "mse", "vb")

    def __init__(
        self,
        diffusion: GaussianDiffusion,
        num_classes: int | None = None,
        label_dropout: float = 0.0,
    ):
        self.diffusion = diffusion
        self.num_classes = num_classes
        self.label_dropout = label_dropout

    def __call__(self, net: nn.Module, batch: Batch, generator: torch.Generator) -> Terms:
        kwargs: dict[str, torch.Tensor] = {}
        if self.num_classes is not None:
            # the coins are drawn before the noise, from the same generator
            kwargs["y"] = drop_labels(batch.y, self.label_dropout, self.num_classes, generator)
        return self.diffusion.training_losses(
            net, batch.x, batch.t, model_kwargs=kwargs, generator=generator
        )


class UpsamplerLoss:
    """The super-resolution model's diffusion loss given the ``small_size`` version of x_0."""

    terms: tuple[str, ...] = ("loss", "mse", "vb")

    def __init__(self, diffusion: GaussianDiffusion, small_size: int, class_cond: bool = False):
        self.diffusion = diffusion
        self.small_size = small_size
        self.class_cond = class_cond

    def __call__(self, net: nn.Module, batch: Batch, generator: torch.Generator) -> Terms:
        kwargs = {"low_res": downsample_area(batch.x, self.small_size)}
        if self.class_cond:
            kwargs["y"] = batch.y
        return self.diffusion.training_losses(
            net, batch.x, batch.t, model_kwargs=kwargs, generator=generator
        )


class NoisyClassifierLoss:
    """Cross-entropy of the classifier on x_t (``noised``) or on clean images at t = 0,
    with per-example top-1 and top-5 hits for reporting."""

    terms: tuple[str, ...] = ("loss", "top1", "top5")

    def __init__(self, diffusion: GaussianDiffusion, noised: bool = True):
        self.diffusion = diffusion
        self.noised = noised

    def __call__(self, net: nn.Module, batch: Batch, generator: torch.Generator) -> Terms:
        x, t = batch.x, batch.t
        if self.noised:
            x = self.diffusion.q_sample(x, t, generator=generator)
        else:
            t = torch.zeros_like(t)
        logits = net(x, t).float()
        return {
            "loss": F.cross_entropy(logits, batch.y, reduction="none"),
            **topk_hits(logits, batch.y),
        }


def topk_hits(logits: torch.Tensor, y: torch.Tensor) -> Terms:
    """Per-example 0/1 hits for top-1 and top-5 (top-k with k capped at the class count)."""
    k = min(5, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices
    hits = top == y[:, None]
    return {"top1": hits[:, 0].float(), "top5": hits.any(dim=-1).float()}
