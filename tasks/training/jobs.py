"""What differs between the three training jobs: network, losses, optimiser settings.

Each job turns one micro-batch into per-example terms (``{"loss": (B,), ...}``); the shared
loop in :mod:`tasks.training.loop` weights, averages, back-propagates and reports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from admflow.config import AdmConfig
from models.build import build_classifier, build_unet, build_upsampler
from models.diffusion_factory import create_diffusion
from models.guidance import drop_labels
from models.resample import ScheduleSampler, UniformSampler, create_named_schedule_sampler

KINDS = ("diffusion", "classifier", "upsampler")


@dataclass
class Job:
    kind: str
    cfg: AdmConfig
    steps: int
    lr: float
    weight_decay: float
    ema_rates: list[float]
    flip: bool
    random_crop: bool = False  # the classifier's 80-100% scale-and-crop (ADM)
    holdout_every: int = 0
    anneal_lr: bool = False
    terms: tuple[str, ...] = ("loss", "mse", "vb")
    diffusion: Any = field(default=None, repr=False)

    @property
    def num_timesteps(self) -> int:
        return int(self.diffusion.num_timesteps)

    def build_model(self) -> nn.Module:
        if self.kind == "diffusion":
            return build_unet(self.cfg.model)
        if self.kind == "classifier":
            return build_classifier(self.cfg.classifier)
        return build_upsampler(self.cfg.upsampler)

    def schedule_sampler(self) -> ScheduleSampler:
        if self.kind == "classifier":
            return UniformSampler(self.num_timesteps)
        section = self.cfg.upsampler.diffusion if self.kind == "upsampler" else self.cfg.diffusion
        return create_named_schedule_sampler(section.schedule_sampler, self.num_timesteps)

    def lr_at(self, step: int) -> float:
        """Constant (diffusion) or linearly annealed to 0 at ``steps`` (classifier)."""
        if not self.anneal_lr:
            return self.lr
        return self.lr * (1.0 - step / self.steps)

    def losses(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        t: torch.Tensor,
        generator: torch.Generator,
    ) -> dict[str, torch.Tensor]:
        if self.kind == "classifier":
            return self._classifier_losses(model, x, y, t, generator)
        kwargs: dict[str, torch.Tensor] = {}
        if self.kind == "upsampler":
            small = self.cfg.upsampler.small_size
            kwargs["low_res"] = F.interpolate(x, size=(small, small), mode="area")
            if self.cfg.upsampler.unet.num_classes is not None:
                kwargs["y"] = y
        elif self.cfg.model.num_classes is not None:
            # classifier-free guidance: some labels become the null class ∅, drawn from the
            # step's generator so a resumed run drops the same ones (0: every label kept)
            kwargs["y"] = drop_labels(
                y, self.cfg.training.label_dropout, self.cfg.model.num_classes, generator
            )
        return self.diffusion.training_losses(model, x, t, model_kwargs=kwargs, generator=generator)

    def _classifier_losses(self, model, x, y, t, generator) -> dict[str, torch.Tensor]:
        if self.cfg.training.classifier_noised:
            x = self.diffusion.q_sample(x, t, generator=generator)
        else:
            t = torch.zeros_like(t)
        logits = model(x, t).float()
        return {"loss": F.cross_entropy(logits, y, reduction="none"), **topk_hits(logits, y)}


def topk_hits(logits: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example 0/1 hits for top-1 and top-5 (top-k with k capped at the class count)."""
    k = min(5, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices
    hits = top == y[:, None]
    return {"top1": hits[:, 0].float(), "top5": hits.any(dim=-1).float()}


def make_job(kind: str, cfg: AdmConfig) -> Job:
    t = cfg.training
    if kind == "diffusion":
        return Job(
            kind,
            cfg,
            steps=t.steps,
            lr=t.lr,
            weight_decay=t.weight_decay,
            ema_rates=list(t.ema_rate),
            flip=True,
            diffusion=create_diffusion(cfg.diffusion),
        )
    if kind == "classifier":
        if not cfg.data.class_cond:
            raise ValueError("the classifier needs labelled data (data.class_cond: true)")
        return Job(
            kind,
            cfg,
            steps=t.classifier_steps,
            lr=t.classifier_lr,
            weight_decay=t.classifier_weight_decay,
            ema_rates=[],
            flip=True,
            random_crop=t.classifier_random_crop,
            holdout_every=10,
            anneal_lr=True,
            terms=("loss", "top1", "top5"),
            diffusion=create_diffusion(cfg.diffusion),
        )
    if kind == "upsampler":
        return Job(
            kind,
            cfg,
            steps=t.upsampler_steps,
            lr=t.lr,
            weight_decay=t.weight_decay,
            ema_rates=list(t.ema_rate),
            flip=True,
            diffusion=create_diffusion(cfg.upsampler.diffusion),
        )
    raise ValueError(f"unknown training job {kind!r}; use one of {', '.join(KINDS)}")
