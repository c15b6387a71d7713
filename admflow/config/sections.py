"""The data, diffusion, training and evaluation sections."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from admflow.config.base import Section


class DataConfig(Section):
    """Where images come from and how they are sharded."""

    source: str = Field("demo", description="'demo', an image folder, or an ADM .npz batch")
    image_size: int = Field(32, gt=0)
    class_cond: bool = True
    num_classes: int | None = Field(10, gt=0)
    shard_rows: int = Field(512, gt=0, description="images per Parquet shard")
    demo_images_per_class: int = Field(200, gt=0)
    image_format: Literal["png", "jpeg"] = "png"


class DiffusionConfig(Section):
    """The Gaussian diffusion: schedule, parameterisation, loss, respacing."""

    steps: int = Field(1000, gt=0, description="T, the number of diffusion steps")
    noise_schedule: Literal["linear", "cosine"] = "linear"
    learn_sigma: bool = True
    sigma_small: bool = False
    predict_xstart: bool = False
    use_kl: bool = False
    rescale_learned_sigmas: bool = False
    rescale_timesteps: bool = False
    vlb_weight: float = Field(0.001, ge=0.0, description="λ of L_hybrid = L_simple + λ·L_vlb")
    schedule_sampler: Literal["uniform", "loss-second-moment"] = "uniform"


class TrainingConfig(Section):
    steps: int = Field(300, gt=0)
    batch_size: int = Field(32, gt=0, description="global batch, split across workers")
    microbatch: int = Field(-1, description="-1: no gradient accumulation")
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    ema_rate: list[float] = [0.9999]
    checkpoint_every: int = Field(100, gt=0)
    checkpoint_steps: list[int] = Field(
        [],
        description="further steps to checkpoint at besides every checkpoint_every (e.g. an "
        "early one, so FID over training starts near the untrained model)",
    )
    keep_checkpoints: int | None = Field(
        None,
        gt=0,
        description="keep the newest K checkpoints of a run plus every one the periodic "
        "evaluation has scored (None: keep all)",
    )
    log_every: int = Field(10, gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    channels_last: bool = Field(False, description="NHWC memory format (faster convs on CPU)")
    grad_clip: float | None = None
    seed: int = 0
    classifier_steps: int = Field(300, gt=0)
    classifier_lr: float = Field(3e-4, gt=0)
    classifier_weight_decay: float = Field(0.05, ge=0)
    classifier_noised: bool = True
    classifier_random_crop: bool = Field(
        True,
        description="the paper's 80-100% scale-and-crop augmentation for the classifier; off for "
        "tiny images, where it cuts away a large part of the object",
    )
    upsampler_steps: int = Field(200, gt=0)
    label_dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="P(label -> null class ∅): classifier-free guidance"
    )

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, v: Any) -> Any:
        return "no" if v is False else v  # YAML reads a bare `no` as false

    @field_validator("ema_rate")
    @classmethod
    def _rates(cls, v: list[float]) -> list[float]:
        for r in v:
            if not 0.0 < r < 1.0:
                raise ValueError(f"each rate must lie in (0, 1), got {r}")
        return v


class EvaluationConfig(Section):
    reference: str | None = Field(None, description="reference .npz or shard manifest")
    reference_images: int = Field(10_000, gt=0, description="images kept for precision/recall")
    reference_statistics: Literal["all", "kept"] = Field(
        "all",
        description="a sharded reference's FID statistics over all its images (the paper's "
        "reference batches) or over the reference_images kept (only those pass Inception)",
    )
    inception_weights: str | None = Field(None, description="TorchScript/pt file; default bundled")
    batch_size: int = Field(50, gt=0)
    workers: int = Field(2, ge=0, description="Ray actors for features; 0: in-process")
    checkpoint_samples: int = Field(
        0,
        ge=0,
        description="reproduce: samples drawn from every diffusion checkpoint to log FID "
        "against the training step (0: no periodic evaluation)",
    )
    fid_method: Literal["sqrtm", "eigh"] = Field(
        "sqrtm", description="sqrtm: the evaluator's computation; eigh: same trace, ~20x faster"
    )
