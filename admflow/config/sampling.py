"""The sampling section, and the respacing rules it is checked against."""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import Field, field_validator

from admflow.config.base import ConfigError, Section

# the solvers' step grids (models.grids.solver_grid)
StepSchedule = Literal["time", "logsnr", "quadratic"]
STEP_SCHEDULES: tuple[str, ...] = get_args(StepSchedule)
# the reverse processes (models.samplers.SAMPLERS)
SamplerName = Literal["ddpm", "ddim", "dpm++2m", "dpm++2m-sde", "unipc"]
# those that take sampling.solver_steps of the respaced steps (models.solvers.SOLVERS)
SOLVER_NAMES: tuple[str, ...] = ("dpm++2m", "dpm++2m-sde", "unipc")


class SamplingConfig(Section):
    num_samples: int = Field(200, gt=0)
    batch_size: int = Field(32, gt=0, description="images per network call (memory, not the set)")
    shard_size: int = Field(32, gt=0, description="images per output shard")
    sampler: SamplerName = "ddim"
    solver_steps: int | None = Field(
        None,
        ge=3,
        description="dpm++2m(-sde)/unipc: evaluations taken from the respaced steps (all)",
    )
    step_schedule: StepSchedule = Field(
        "time", description="dpm++2m(-sde)/unipc grid: uniform in time, in log-SNR or in sqrt(time)"
    )
    timestep_respacing: str = Field("ddim25", description="'250', 'ddim25' or '10,15,20'")
    upsample_respacing: str | None = Field(
        None, description="the upsampler's respacing (default: timestep_respacing)"
    )
    upsample_sampler: SamplerName | None = Field(
        None, description="the upsampler's sampler (default: sampler)"
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
        if not v:  # every sampling stage draws one set per scale: none would mean no samples
            raise ValueError("needs at least one scale, e.g. [0.0] for unguided sampling")
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

    def upsampler_steps(self) -> tuple[str, str]:
        """The upsampler's sampler and respacing: its own where set, else the base model's."""
        return (
            self.upsample_sampler or self.sampler,
            self.upsample_respacing or self.timestep_respacing,
        )

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


def respacing_error(respacing: str, steps: int) -> str | None:
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


def respaced_count(respacing: str, steps: int) -> int:
    """How many timesteps a (valid) respacing keeps."""
    text = respacing.strip().removeprefix("ddim")
    return sum(int(c) for c in text.split(",") if c.strip()) if text else steps
