"""What differs between the three training jobs, as data chosen once by name: the network,
its loss (an object from :mod:`models.training_losses`), the timestep sampler and the
optimiser settings. The loop in :mod:`tasks.training.loop` reads these fields and never asks
which job it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from torch import nn

from admflow.config import AdmConfig
from models.build import build_classifier, build_unet, build_upsampler
from models.diffusion_factory import create_diffusion
from models.resample import ScheduleSampler, UniformSampler, create_named_schedule_sampler
from models.training_losses import (
    HybridDiffusionLoss,
    NoisyClassifierLoss,
    TrainingLoss,
    UpsamplerLoss,
)

KINDS = ("diffusion", "classifier", "upsampler")


@dataclass
class Job:
    kind: str
    build_model: Callable[[], nn.Module]
    loss: TrainingLoss
    schedule_sampler: Callable[[], ScheduleSampler]  # a fresh one per run: it holds history
    steps: int
    lr: float
    weight_decay: float
    ema_rates: list[float]
    image_size: int  # what the shards must hold
    num_classes: int | None  # labels must stay below it
    classes_field: str  # the config field that sets num_classes, for error messages
    batch_size: int  # global, split across the workers
    microbatch: int  # -1: each worker's whole share at once
    flip: bool = True
    random_crop: bool = False  # the classifier's 80-100% scale-and-crop (ADM)
    crop: int | None = None  # train on random crops of this side (the upsampler)
    crop_stride: int = 1  # crop corners on this grid (the upsampler's scale factor)
    holdout_every: int = 0  # > 0: every n-th row is held out and scored at checkpoints
    anneal_lr: bool = False

    @property
    def num_timesteps(self) -> int:
        return int(self.loss.diffusion.num_timesteps)

    @property
    def terms(self) -> tuple[str, ...]:
        return self.loss.terms

    def lr_at(self, step: int) -> float:
        """Constant (diffusion) or linearly annealed to 0 at ``steps`` (classifier)."""
        if not self.anneal_lr:
            return self.lr
        return self.lr * (1.0 - step / self.steps)


def diffusion_job(cfg: AdmConfig) -> Job:
    """The ADM UNet on L_hybrid, with EMA (and label dropout for classifier-free guidance)."""
    t, diffusion = cfg.training, create_diffusion(cfg.diffusion)
    return Job(
        "diffusion",
        build_model=partial(build_unet, cfg.model),
        loss=HybridDiffusionLoss(diffusion, cfg.model.num_classes, t.label_dropout),
        schedule_sampler=partial(
            create_named_schedule_sampler, cfg.diffusion.schedule_sampler, diffusion.num_timesteps
        ),
        steps=t.steps,
        lr=t.lr,
        weight_decay=t.weight_decay,
        ema_rates=list(t.ema_rate),
        image_size=cfg.model.image_size,
        num_classes=cfg.model.num_classes,
        classes_field="model.num_classes",
        batch_size=t.batches("diffusion")[0],
        microbatch=t.batches("diffusion")[1],
    )


def classifier_job(cfg: AdmConfig) -> Job:
    """The noisy classifier: uniform t, linearly annealed lr, no EMA, a held-out split."""
    if not cfg.data.class_cond:
        raise ValueError("the classifier needs labelled data (data.class_cond: true)")
    t, diffusion = cfg.training, create_diffusion(cfg.diffusion)
    return Job(
        "classifier",
        build_model=partial(build_classifier, cfg.classifier),
        loss=NoisyClassifierLoss(diffusion, noised=t.classifier_noised),
        schedule_sampler=partial(UniformSampler, diffusion.num_timesteps),
        steps=t.classifier_steps,
        lr=t.classifier_lr,
        weight_decay=t.classifier_weight_decay,
        ema_rates=[],
        image_size=cfg.classifier.image_size,
        num_classes=cfg.classifier.num_classes,
        classes_field="classifier.num_classes",
        batch_size=t.batches("classifier")[0],
        microbatch=t.batches("classifier")[1],
        random_crop=t.classifier_random_crop,
        holdout_every=10,
        anneal_lr=True,
    )


def upsampler_job(cfg: AdmConfig) -> Job:
    """The super-resolution UNet (ADM-U) on its own diffusion, with EMA."""
    t, up = cfg.training, cfg.upsampler
    diffusion = create_diffusion(up.diffusion)
    factor = up.unet.image_size // up.small_size
    # a crop's low-resolution input is the crop of the low-resolution image
    small = t.upsampler_crop // factor if t.upsampler_crop else up.small_size
    return Job(
        "upsampler",
        build_model=partial(build_upsampler, up),
        loss=UpsamplerLoss(diffusion, small, class_cond=up.unet.num_classes is not None),
        schedule_sampler=partial(
            create_named_schedule_sampler, up.diffusion.schedule_sampler, diffusion.num_timesteps
        ),
        steps=t.upsampler_steps,
        lr=t.lr,
        weight_decay=t.weight_decay,
        ema_rates=list(t.ema_rate),
        image_size=up.unet.image_size,
        num_classes=up.unet.num_classes,
        classes_field="upsampler.unet.num_classes",
        batch_size=t.batches("upsampler")[0],
        microbatch=t.batches("upsampler")[1],
        crop=t.upsampler_crop,
        crop_stride=factor,
    )


JOBS: dict[str, Callable[[AdmConfig], Job]] = {
    "diffusion": diffusion_job,
    "classifier": classifier_job,
    "upsampler": upsampler_job,
}


def make_job(kind: str, cfg: AdmConfig) -> Job:
    if kind not in JOBS:
        raise ValueError(f"unknown training job {kind!r}; use one of {', '.join(KINDS)}")
    return JOBS[kind](cfg)
