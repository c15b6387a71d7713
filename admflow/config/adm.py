"""The whole config: one field per section, the cross-section checks, and what the stages
ask of it (two stages or one, a section's cache key)."""

from __future__ import annotations

import hashlib
import json

from pydantic import Field, model_validator

from admflow.config.base import ConfigError, Section
from admflow.config.networks import ClassifierConfig, UNetConfig, UpsamplerConfig
from admflow.config.runtime import ComputeConfig, StorageConfig, TrackingConfig
from admflow.config.sampling import SOLVER_NAMES, SamplingConfig, respaced_count, respacing_error
from admflow.config.sections import (
    DataConfig,
    DiffusionConfig,
    EvaluationConfig,
    MemoryConfig,
    TrainingConfig,
)


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
    # built per config, not at import: its default reads $ADMFLOW_STORAGE_ROOT, whose bad forms
    # are then a config error, not an import-time traceback
    storage: StorageConfig = Field(default_factory=StorageConfig)
    tracking: TrackingConfig = TrackingConfig()
    compute: ComputeConfig = ComputeConfig()
    memory: MemoryConfig = MemoryConfig()

    @model_validator(mode="after")
    def _consistent(self) -> AdmConfig:
        _check_consistent(self)
        return self

    def check_pipeline(self) -> None:
        """What the whole pipeline (shard -> train) needs beyond a valid config: a stage on
        its own may use data and model at different sizes (e.g. shard only)."""
        _check_pipeline(self)

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


# ------------------------------------------------ cross-section checks
# Settings valid one by one but impossible together. Each check raises ValueError naming the
# fields involved (pydantic reports it at the root, so the message carries the dotted paths);
# the order of the checks is the order in which a config with several faults reports them.


def _check_consistent(cfg: AdmConfig) -> None:
    """Every check a valid config passes, in reporting order."""
    _check_networks(cfg)
    _check_upsampler_crop(cfg)
    _check_respacing(cfg)
    _check_free_guidance(cfg)
    _check_solver_steps(cfg)
    _check_classifier_guidance(cfg)
    _check_classes(cfg)


def _check_networks(cfg: AdmConfig) -> None:
    """The network predicts what its diffusion expects, and a conditional run has classes."""
    if cfg.model.learn_sigma != cfg.diffusion.learn_sigma:
        raise ValueError(
            f"model.learn_sigma ({cfg.model.learn_sigma}) must equal "
            f"diffusion.learn_sigma ({cfg.diffusion.learn_sigma})"
        )
    if cfg.data.class_cond and cfg.model.num_classes is None:
        raise ValueError("model.num_classes: required when data.class_cond is true")
    if cfg.upsampler.enabled and cfg.upsampler.unet.learn_sigma != (
        cfg.upsampler.diffusion.learn_sigma
    ):
        raise ValueError("upsampler.unet.learn_sigma must equal upsampler.diffusion.learn_sigma")


def _check_upsampler_crop(cfg: AdmConfig) -> None:
    """A training crop fits the upsampler's output, maps onto whole low-resolution pixels and
    can be halved by every level of its UNet."""
    crop, up = cfg.training.upsampler_crop, cfg.upsampler
    if crop is None:
        return
    size, levels = up.unet.image_size, len(up.unet.channel_mult)
    factor = size // up.small_size
    if crop > size or crop % factor or crop % 2 ** (levels - 1):
        raise ValueError(
            f"training.upsampler_crop: {crop} must be at most upsampler.unet.image_size {size} "
            f"and a multiple of {factor} (the upscale factor) and of {2 ** (levels - 1)} "
            f"(the UNet's {levels} levels)"
        )


def _check_respacing(cfg: AdmConfig) -> None:
    """Each respacing can be taken from the diffusion steps of the model it samples."""
    why = respacing_error(cfg.sampling.timestep_respacing, cfg.diffusion.steps)
    if why:
        raise ValueError(f"sampling.timestep_respacing: {why}")
    up_respacing = cfg.sampling.upsample_respacing
    why = up_respacing and respacing_error(up_respacing, cfg.upsampler.diffusion.steps)
    if why:
        raise ValueError(f"sampling.upsample_respacing: {why}")


def _check_free_guidance(cfg: AdmConfig) -> None:
    """Classifier-free guidance needs a conditional model with the null class ∅."""
    if cfg.training.label_dropout > 0 and not cfg.model.null_class:
        raise ValueError(
            "training.label_dropout > 0 needs model.null_class=true (the label ∅ it trains)"
        )
    if cfg.sampling.guidance == "free" and not cfg.model.null_class:
        raise ValueError(
            "sampling.guidance=free needs a model trained with label dropout: set "
            "model.null_class=true and training.label_dropout (e.g. 0.1)"
        )
    if cfg.model.null_class and cfg.model.num_classes is None:
        raise ValueError("model.null_class needs model.num_classes (a conditional model)")


def _check_solver_steps(cfg: AdmConfig) -> None:
    """A multistep solver takes its evaluations from the respaced steps, so no more of them."""
    n = cfg.sampling.solver_steps
    have = respaced_count(cfg.sampling.timestep_respacing, cfg.diffusion.steps)
    if n is not None and cfg.sampling.sampler in SOLVER_NAMES and n > have:
        raise ValueError(
            f"sampling.solver_steps: {n} exceeds the {have} steps of "
            f"timestep_respacing {cfg.sampling.timestep_respacing!r}; raise the respacing "
            "(e.g. '' for all steps) or lower solver_steps"
        )


def _check_classifier_guidance(cfg: AdmConfig) -> None:
    uses = cfg.sampling.guidance == "classifier" and any(cfg.sampling.classifier_scales)
    if uses and not cfg.classifier.enabled:
        raise ValueError(
            "sampling.classifier_scales: scales > 0 need classifier.enabled=true "
            "(or sampling.guidance=none)"
        )


def _check_classes(cfg: AdmConfig) -> None:
    """Requested class ids exist for the model, or else for the classifier."""
    classes = cfg.sampling.classes or []
    limit = cfg.model.num_classes or (
        cfg.classifier.num_classes if cfg.classifier.enabled else None
    )
    if classes and limit is None:
        raise ValueError("sampling.classes: the model is unconditional and has no classifier")
    if classes and max(classes) >= limit:
        raise ValueError(
            f"sampling.classes: class {max(classes)} is out of range; ids run 0..{limit - 1}"
        )


def _check_pipeline(cfg: AdmConfig) -> None:
    """What the whole pipeline (shard -> train) needs beyond a valid config: a stage on
    its own may use data and model at different sizes (e.g. shard only)."""
    if cfg.data.image_size != cfg.model.image_size:
        raise ConfigError(
            f"data.image_size ({cfg.data.image_size}) must equal model.image_size "
            f"({cfg.model.image_size}): the shards feed the model; set both"
        )
    if cfg.two_stage and cfg.evaluation.reference:
        raise ConfigError(
            f"evaluation.reference ({cfg.evaluation.reference}) is one reference, but a "
            f"two-stage pipeline scores at two sizes ({cfg.model.image_size}px base sets, "
            f"{cfg.upsampler.unet.image_size}px upsampled ones): unset it to build both "
            "from the data set, or set upsampler.enabled=false"
        )
