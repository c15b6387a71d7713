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
    upsampler_crop: int | None = Field(
        None,
        gt=0,
        description="train the upsampler on random crops of this side (pixels of its output "
        "size) instead of whole images; it is fully convolutional, so it still samples whole "
        "images (None: whole images)",
    )
    classifier_batch_size: int | None = Field(
        None, gt=0, description="the classifier's global batch (None: batch_size)"
    )
    classifier_microbatch: int | None = Field(
        None, description="the classifier's microbatch (None: microbatch; -1: none)"
    )
    upsampler_batch_size: int | None = Field(
        None,
        gt=0,
        description="the upsampler's global batch (None: batch_size); ADM-U 64->256 trains at "
        "256 under a base model trained at 2048",
    )
    upsampler_microbatch: int | None = Field(
        None, description="the upsampler's microbatch (None: microbatch; -1: none)"
    )
    label_dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="P(label -> null class ∅): classifier-free guidance"
    )

    def batches(self, kind: str) -> tuple[int, int]:
        """(global batch, microbatch) of the training job ``kind`` (diffusion, classifier or
        upsampler); microbatch -1: the whole per-worker batch at once."""
        if kind == "classifier":
            batch, micro = self.classifier_batch_size, self.classifier_microbatch
        elif kind == "upsampler":
            batch, micro = self.upsampler_batch_size, self.upsampler_microbatch
        else:
            batch, micro = None, None
        return batch or self.batch_size, self.microbatch if micro is None else micro

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
    judge: bool = Field(
        True,
        description="reproduce: train the class-accuracy judge on the labelled data and report "
        "class accuracy (about a minute on 2 CPU cores); false: no class-accuracy column",
    )


class MemoryConfig(Section):
    """The accelerator memory each GPU stage must fit in (tasks/memory.py checks the presets'
    batches against it with its memory model)."""

    gpu_gb: float = Field(
        80.0, gt=0, description="memory of one GPU in GB (1e9 bytes): 80 for an A100/H100 80GB"
    )
    usable: float = Field(
        0.85,
        gt=0,
        le=1,
        description="share of it the estimated peak may take; the rest is for the CUDA "
        "context, cuDNN workspaces and the caching allocator's fragmentation",
    )

    @property
    def budget_bytes(self) -> int:
        """Bytes an estimated per-GPU peak may reach."""
        return int(self.gpu_gb * 1e9 * self.usable)
