"""The one typed config of admflow.

Every stage takes an :class:`AdmConfig`. Presets live in ``configs/*.yaml``; a preset may
name another as ``base:`` and override parts of it. ``--set a.b=value`` overrides are
parsed as YAML scalars. Unknown keys, wrong types and impossible combinations fail here,
at load time, with the field's dotted path in the message.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# The presets: configs/ in the repository, shipped in the package as admflow/presets (a link).
CONFIG_DIR = Path(__file__).resolve().parent.parent / "presets"


class ConfigError(ValueError):
    """A preset or override that cannot become a valid config."""


class Section(BaseModel):
    # NaN/inf is never a meaningful setting (a NaN scale silently yields black images).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


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


class DataConfig(Section):
    """Where images come from and how they are sharded."""

    source: str = Field("demo", description="'demo', an image folder, or an ADM .npz batch")
    image_size: int = Field(32, gt=0)
    class_cond: bool = True
    num_classes: int | None = Field(10, gt=0)
    shard_rows: int = Field(512, gt=0, description="images per Parquet shard")
    demo_images_per_class: int = Field(200, gt=0)
    image_format: Literal["png", "jpeg"] = "png"


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


class SamplingConfig(Section):
    num_samples: int = Field(200, gt=0)
    batch_size: int = Field(32, gt=0)
    shard_size: int = Field(32, gt=0, description="images per output shard")
    sampler: Literal["ddpm", "ddim", "dpm++2m", "unipc"] = "ddim"
    solver_steps: int | None = Field(
        None, ge=3, description="dpm++2m/unipc: evaluations taken from the respaced steps (all)"
    )
    step_schedule: Literal["time", "logsnr"] = Field(
        "time", description="dpm++2m/unipc grid: uniform in time or in log-SNR"
    )
    timestep_respacing: str = Field("ddim25", description="'250', 'ddim25' or '10,15,20'")
    upsample_respacing: str | None = Field(
        None, description="the upsampler's respacing (default: timestep_respacing)"
    )
    upsample_sets: Literal["all", "extremes", "largest"] = Field(
        "all",
        description="which scales' sets the upsampler takes to full size beside the bilinear "
        "baseline: all, extremes (the smallest and the largest scale) or largest (the most "
        "guided set only, as ADM-G + ADM-U)",
    )
    eta: float = Field(0.0, ge=0.0)
    guidance: Literal["classifier", "free", "none"] = Field(
        "classifier",
        description="classifier: scales > 0 follow the noisy classifier; free: classifier-free "
        "with weight cfg_scale (model.null_class); none",
    )
    cfg_scale: float = Field(0.0, ge=0.0, description="w of ε̂ = (1+w)ε(x,y) − wε(x,∅)")
    classifier_scales: list[float] = [0.0, 1.0]
    classes: list[int] | None = Field(None, description="class ids to draw labels from")
    use_ema: bool = True
    compile: bool = Field(
        False,
        description="torch.compile the diffusion network in the sampling actors (off: each "
        "input shape compiles for minutes; docs/trade-offs.md)",
    )
    clip_denoised: bool = True
    seed: int = 0
    workers: int = Field(2, gt=0)

    @field_validator("classifier_scales")
    @classmethod
    def _scales(cls, v: list[float]) -> list[float]:
        for s in v:
            if s < 0:
                raise ValueError(f"each scale must be >= 0 (0 = unguided), got {s}")
        return v

    @field_validator("classes")
    @classmethod
    def _class_ids(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or min(v) < 0):
            raise ValueError(f"class ids must be a non-empty list of ids >= 0, got {v}")
        return v

    def upsampled(self, scale: float) -> bool:
        """Whether the upsampler takes the set drawn at ``scale`` to full size."""
        scales = self.classifier_scales
        if self.upsample_sets == "largest":
            return scale == max(scales)
        return self.upsample_sets == "all" or scale in (min(scales), max(scales))

    def guided(self, scale: float, has_classifier: bool) -> bool:
        """The one rule for whether a sample set follows a guide: every stage asks here.
        (A new kind of guidance is a new ``guidance`` value and a branch in this method.)"""
        if self.guidance == "free":  # the model guides itself (free_scale); no classifier
            return False
        if self.guidance == "none" or scale == 0:
            return False
        if not has_classifier:
            raise ConfigError(
                f"classifier scale {scale:g} needs a noisy classifier: pass --classifier URI "
                f"(or use scale 0 for unguided samples)"
            )
        return True

    def free_scale(self) -> float:
        """w of classifier-free guidance; 0 when sampling.guidance is not "free"."""
        return self.cfg_scale if self.guidance == "free" else 0.0

    @field_validator("timestep_respacing", "upsample_respacing", mode="before")
    @classmethod
    def _respacing_text(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v  # YAML 250

    @field_validator("timestep_respacing", "upsample_respacing")
    @classmethod
    def _respacing(cls, v: str | None) -> str | None:
        if v is None:
            return v
        s = v.strip()
        if s.startswith("ddim"):
            s = s[len("ddim") :]
        parts = [p for p in s.split(",") if p.strip()] if s else []
        if v and not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise ValueError(
                f"{v!r} is not a respacing: use '' (all steps), '250', 'ddim25' or '10,15,20'"
            )
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


def _respacing_error(respacing: str, steps: int) -> str | None:
    """Why ``respacing`` cannot be taken from ``steps`` diffusion steps (None if it can);
    the same rules as models/respace.py, checked here without loading torch."""
    text = respacing.strip()
    if not text:
        return None
    if text.startswith("ddim"):
        n = int(text[len("ddim") :])
        if n == steps or any(len(range(0, steps, s)) == n for s in range(1, steps)):
            return None
        return f"cannot take exactly {n} equally strided steps from diffusion.steps={steps}"
    counts = [int(c) for c in text.split(",") if c.strip()]
    size, extra = divmod(steps, len(counts))
    for i, count in enumerate(counts):
        if count > size + (1 if i < extra else 0):
            return f"{count} steps exceed the {size} diffusion steps of its section (of {steps})"
    return None


def _respaced_count(respacing: str, steps: int) -> int:
    """How many timesteps a (valid) respacing keeps."""
    text = respacing.strip().removeprefix("ddim")
    return sum(int(c) for c in text.split(",") if c.strip()) if text else steps


def _default_root() -> str:
    return os.environ.get("ADMFLOW_STORAGE_ROOT", "./admflow-store")


class StorageConfig(Section):
    root: str = Field(
        default_factory=_default_root,
        validate_default=True,
        description="local dir, file:// or s3://bucket/prefix (default $ADMFLOW_STORAGE_ROOT)",
    )
    create_bucket: bool = Field(False, description="create a missing S3 bucket (else an error)")

    @field_validator("root")
    @classmethod
    def _absolute(cls, v: str) -> str:
        # Ray workers run in other directories: a relative local root must not depend on cwd.
        if "://" in v and not v.startswith("file://"):
            return v
        return os.path.abspath(v.removeprefix("file://"))


class TrackingConfig(Section):
    tracking_uri: str | None = Field(None, description="default: sqlite under storage-local dir")
    experiment: str = "admflow"
    register_models: bool = True


class ComputeConfig(Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    ray_address: str | None = Field(
        default_factory=lambda: os.environ.get("RAY_ADDRESS"),
        description="Ray cluster address; default $RAY_ADDRESS, else start local Ray",
    )
    num_workers: int = Field(2, gt=0)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    torch_threads: int = Field(1, gt=0)
    diffusion_threads: int | None = Field(
        None,
        gt=0,
        description="threads of each diffusion-training worker (default torch_threads): the "
        "long pole may use cores that idle once the shorter trainings are done",
    )

    def threads_for(self, kind: str) -> int:
        """Torch threads of a training worker of ``kind``."""
        if kind == "diffusion" and self.diffusion_threads:
            return self.diffusion_threads
        return self.torch_threads


class AdmConfig(Section):
    name: str = "custom"
    description: str = ""
    data: DataConfig = DataConfig()
    model: UNetConfig = UNetConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    upsampler: UpsamplerConfig = UpsamplerConfig()
    training: TrainingConfig = TrainingConfig()
    sampling: SamplingConfig = SamplingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()
    compute: ComputeConfig = ComputeConfig()

    @model_validator(mode="after")
    def _consistent(self) -> AdmConfig:
        if self.model.learn_sigma != self.diffusion.learn_sigma:
            raise ValueError(
                f"model.learn_sigma ({self.model.learn_sigma}) must equal "
                f"diffusion.learn_sigma ({self.diffusion.learn_sigma})"
            )
        if self.data.class_cond and self.model.num_classes is None:
            raise ValueError("model.num_classes: required when data.class_cond is true")
        if self.upsampler.enabled and self.upsampler.unet.learn_sigma != (
            self.upsampler.diffusion.learn_sigma
        ):
            raise ValueError(
                "upsampler.unet.learn_sigma must equal upsampler.diffusion.learn_sigma"
            )
        why = _respacing_error(self.sampling.timestep_respacing, self.diffusion.steps)
        if why:
            raise ValueError(f"sampling.timestep_respacing: {why}")
        up_respacing = self.sampling.upsample_respacing
        why = up_respacing and _respacing_error(up_respacing, self.upsampler.diffusion.steps)
        if why:
            raise ValueError(f"sampling.upsample_respacing: {why}")
        self._check_guidance()
        return self._check_classes()

    def _check_guidance(self) -> None:
        self._check_free_guidance()
        uses = self.sampling.guidance == "classifier" and any(self.sampling.classifier_scales)
        if uses and not self.classifier.enabled:
            raise ValueError(
                "sampling.classifier_scales: scales > 0 need classifier.enabled=true "
                "(or sampling.guidance=none)"
            )

    def _check_free_guidance(self) -> None:
        """Classifier-free guidance needs a conditional model with the null class ∅."""
        if self.training.label_dropout > 0 and not self.model.null_class:
            raise ValueError(
                "training.label_dropout > 0 needs model.null_class=true (the label ∅ it trains)"
            )
        if self.sampling.guidance == "free" and not self.model.null_class:
            raise ValueError(
                "sampling.guidance=free needs a model trained with label dropout: set "
                "model.null_class=true and training.label_dropout (e.g. 0.1)"
            )
        if self.model.null_class and self.model.num_classes is None:
            raise ValueError("model.null_class needs model.num_classes (a conditional model)")
        n = self.sampling.solver_steps
        have = _respaced_count(self.sampling.timestep_respacing, self.diffusion.steps)
        if n is not None and self.sampling.sampler in ("dpm++2m", "unipc") and n > have:
            raise ValueError(
                f"sampling.solver_steps: {n} exceeds the {have} steps of "
                f"timestep_respacing {self.sampling.timestep_respacing!r}; raise the respacing "
                "(e.g. '' for all steps) or lower solver_steps"
            )

    def _check_classes(self) -> AdmConfig:
        classes = self.sampling.classes or []
        limit = self.model.num_classes or (
            self.classifier.num_classes if self.classifier.enabled else None
        )
        if classes and limit is None:
            raise ValueError("sampling.classes: the model is unconditional and has no classifier")
        if classes and max(classes) >= limit:
            raise ValueError(
                f"sampling.classes: class {max(classes)} is out of range; ids run 0..{limit - 1}"
            )
        return self

    def check_pipeline(self) -> None:
        """What the whole pipeline (shard -> train) needs beyond a valid config: a stage on
        its own may use data and model at different sizes (e.g. shard only)."""
        if self.data.image_size != self.model.image_size:
            raise ConfigError(
                f"data.image_size ({self.data.image_size}) must equal model.image_size "
                f"({self.model.image_size}): the shards feed the model; set both"
            )
        if self.two_stage and self.evaluation.reference:
            raise ConfigError(
                f"evaluation.reference ({self.evaluation.reference}) is one reference, but a "
                f"two-stage pipeline scores at two sizes ({self.model.image_size}px base sets, "
                f"{self.upsampler.unet.image_size}px upsampled ones): unset it to build both "
                "from the data set, or set upsampler.enabled=false"
            )

    @property
    def two_stage(self) -> bool:
        """Base model + upsampler at a higher resolution (ADM-G + ADM-U): the base model's sets
        are scored at its resolution, the upsampled ones (and their bilinear baseline) at the
        upsampler's."""
        return self.upsampler.enabled and self.upsampler.unet.image_size > self.model.image_size

    def upsampler_data(self) -> AdmConfig:
        """This config with ``data`` at the upsampler's output size: the second stage trains on
        the data set at its own, higher resolution (ADM-U on ImageNet 256 under a 64px base)."""
        data = self.data.model_copy(update={"image_size": self.upsampler.unet.image_size})
        return self.model_copy(update={"data": data})

    @property
    def curve_reuses_unguided_set(self) -> bool:
        """Whether the FID curve's last point is the sweep's unguided set: that set is drawn
        from the final checkpoint with the same sampler, and at the curve's sample count."""
        return (
            0.0 in self.sampling.classifier_scales
            and self.evaluation.checkpoint_samples == self.sampling.num_samples
        )

    def section_hash(self, *sections: str) -> str:
        """Stable hash of some sections, for cache keys."""
        payload = {s: getattr(self, s).model_dump(mode="json") for s in sections}
        blob = json.dumps(payload, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------------------- loading


def list_presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_preset(name_or_path: str, seen: tuple[str, ...] = ()) -> dict:
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise ConfigError(
            f"preset {name_or_path!r} not found; known presets: {', '.join(list_presets())}"
        )
    if str(path) in seen:
        raise ConfigError(f"preset {path} includes itself through 'base:'")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "not valid YAML"
        raise ConfigError(
            f"preset {path}: YAML syntax error{where}: {problem}; fix the file "
            "(indent with spaces, not tabs)"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"preset {path} must be a mapping at top level")
    base = raw.pop("base", None)
    if base:
        raw = _deep_merge(_read_preset(base, seen + (str(path),)), raw)
    return raw


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.field=value")
    key, value = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = json.loads(json.dumps(raw))  # deep copy of plain data
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    return raw


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            parent = _section_fields(e["loc"][:-1])
            msg = f"unknown key; allowed keys here: {', '.join(parent)}"
        elif e["type"] == "literal_error":
            msg = f"{msg} (got {e.get('input')!r})"
        msg = msg.removeprefix("Value error, ")
        # Cross-field checks name their fields in the message themselves.
        lines.append(f"  {msg}" if loc == "<root>" else f"  {loc}: {msg}")
    return "\n".join(lines)


def _section_fields(loc: tuple) -> list[str]:
    model: Any = AdmConfig
    for part in loc:
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return []
        model = field.annotation
    return sorted(getattr(model, "model_fields", {}))


def config_from_dict(raw: dict, source: str = "dict") -> AdmConfig:
    try:
        return AdmConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def load_config(preset: str = "tiny", overrides: list[str] | None = None) -> AdmConfig:
    """Load a preset (name in ``configs/`` or a YAML path) and apply ``a.b=value`` overrides."""
    raw = _read_preset(preset)
    raw = apply_overrides(raw, overrides or [])
    return config_from_dict(raw, source=f"preset {preset!r}")


def dump_config(cfg: AdmConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
