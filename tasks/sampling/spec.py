"""What a sample set is, without torch: its identity (:class:`SampleSetSpec`), how it is run
(:class:`ExecutionOptions`), what each actor builds (:class:`SamplerSpec`), and the seeds of
shard i.

Everything random in shard ``i`` (its class labels, x_T and every step's noise) comes from
seeds derived from ``(run seed, i)`` alone; see :mod:`tasks.sampling.worker` for their use.
The driver imports only this module, so it stays small (no torch) however large N is.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from admflow.config import AdmConfig


class NonFiniteSampleError(RuntimeError):
    """A shard whose images hold NaN/inf: never written, so a diverged model cannot yield a
    "complete" set of black images."""


def draw_labels(seed: int, index: int, rows: int, classes: list[int] | None) -> np.ndarray:
    """Shard ``index``'s class labels, uniform over ``classes`` (-1 everywhere when None)."""
    if not classes:
        return np.full(rows, -1, dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, 0]))
    return rng.choice(np.asarray(classes, dtype=np.int64), size=rows)


def batch_seed(seed: int, index: int, batch: int, stream: int = 1) -> int:
    """A torch seed for micro-batch ``batch`` of shard ``index`` in noise ``stream`` (1: base
    sampling, 2: upsampling, 3: the likelihood bound), so no two uses share noise."""
    state = np.random.SeedSequence([seed, index, stream, batch]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def shard_seed(seed: int, index: int, stream: int = 1) -> int:
    """The torch seed of shard ``index``'s x_T and step noise: one generator per shard."""
    return batch_seed(seed, index, 0, stream)


def default_scale(scales: list[float], has_classifier: bool) -> float:
    """The guidance scale of a set when none is given: with a classifier the preset's first
    non-zero scale (a classifier is passed to guide), without one 0 (unguided)."""
    return next((float(s) for s in scales if s), 0.0) if has_classifier else 0.0


Guidance = Literal["classifier", "free", "none"]


@dataclass(frozen=True)
class CheckpointId:
    """A network's weights: the bytes (``sha256``) are the identity; where they were read
    from (``source``, ``weights``) and the training step are only recorded."""

    source: str  # what was given: a checkpoint directory or a .pt file
    weights: str  # the state-dict file read (the EMA file or model.pt)
    sha256: str
    step: int | None = None

    @property
    def ema(self) -> bool:
        return self.weights.rsplit("/", 1)[-1].startswith("ema_")


@dataclass(frozen=True)
class SampleSetSpec:
    """One sample set's identity: every field changes some pixel, and its :meth:`fingerprint`
    names the set in every flow's cache key, the manifest and the resume check.

    ``shard_size`` is identity: shards are the unit of resumption and of seeding (shard i's
    labels and noise come from ``(seed, i)``, one generator for the whole shard).
    ``precision`` is the network's released precision (fp16 where the device supports it);
    what the device, the thread count, torch.compile or the micro-batch change is
    floating-point rounding, not the set, so they are execution.
    """

    kind: Literal["base", "upsample"]
    model: CheckpointId
    network: dict  # UNetConfig (base) or UpsamplerConfig (upsample) as JSON
    diffusion: dict  # DiffusionConfig as JSON
    sampler: str
    respacing: str
    solver_steps: int | None  # the solvers' evaluations (None: every respaced step)
    step_schedule: str  # the solvers' grid: "time", "logsnr" or "quadratic"
    guidance: Guidance  # "classifier": scale is s; "free": scale is w; "none": scale 0
    scale: float
    eta: float
    clip_denoised: bool
    seed: int
    classes: tuple[int, ...] | None  # the label set (None: unconditional, labels -1)
    num_samples: int
    shard_size: int
    image_size: int
    precision: str
    code_version: str
    classifier: CheckpointId | None = None
    classifier_network: dict | None = None  # ClassifierConfig as JSON, when guiding
    base_fingerprint: str | None = None  # upsample: the base set conditioning it

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def rows(self, index: int) -> int:
        return min(self.shard_size, self.num_samples - index * self.shard_size)

    @property
    def classifier_scale(self) -> float:
        return self.scale if self.guidance == "classifier" else 0.0

    @property
    def cfg_scale(self) -> float:
        return self.scale if self.guidance == "free" else 0.0

    def fingerprint(self) -> str:
        """Identity of the set's contents; where the weights were read from is left out."""
        payload = asdict(self)
        for name in ("model", "classifier"):
            if payload[name] is not None:
                payload[name] = payload[name]["sha256"]
        blob = json.dumps(payload, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:20]


@dataclass(frozen=True)
class ExecutionOptions:
    """How a set is produced, never what it holds: any value gives the same set."""

    workers: int = 2  # Ray actors, one model replica each
    batch_size: int = 32  # images per network call (memory and speed, never the noise)
    torch_threads: int = 1
    device: str = "auto"
    compile: bool = False  # torch.compile the diffusion network
    max_shards: int | None = None  # stop after this many new shards (a rerun continues)
    progress: bool = True

    @classmethod
    def from_config(cls, cfg: AdmConfig, **given: Any) -> ExecutionOptions:
        """The config's execution settings, each replaced by a given value that is not None."""
        values: dict[str, Any] = {
            "workers": cfg.sampling.workers,
            "batch_size": cfg.sampling.batch_size,
            "torch_threads": cfg.compute.torch_threads,
            "device": cfg.compute.device,
            "compile": cfg.sampling.compile,
        }
        values.update({k: v for k, v in given.items() if v is not None})
        return cls(**values)


@dataclass
class SamplerSpec:
    """What an actor needs to build its networks and sample (plain data, cheap to ship)."""

    kind: str  # "base" or "upsample"
    network: dict  # UNetConfig (base) or UpsamplerConfig (upsample) as JSON
    diffusion: dict  # DiffusionConfig as JSON
    sampler: str = "ddim"
    respacing: str = ""
    eta: float = 0.0
    clip_denoised: bool = True
    seed: int = 0
    batch_size: int = 32  # images per network call
    torch_threads: int = 1
    device: str = "auto"
    classifier: dict | None = None  # ClassifierConfig as JSON, when guiding
    classifier_scale: float = 0.0
    solver_steps: int | None = None  # the solvers' evaluations (None: every respaced step)
    step_schedule: str = "time"  # the solvers' grid: "time", "logsnr" or "quadratic"
    cfg_scale: float = 0.0  # w of classifier-free guidance (0: the conditional model alone)
    compile: bool = False  # torch.compile the diffusion network (sampling.compile)


def sampler_spec(spec: SampleSetSpec, options: ExecutionOptions) -> SamplerSpec:
    """The actors' half of a set's spec and its execution options."""
    return SamplerSpec(
        kind=spec.kind,
        network=spec.network,
        diffusion=spec.diffusion,
        sampler=spec.sampler,
        respacing=spec.respacing,
        eta=spec.eta,
        clip_denoised=spec.clip_denoised,
        seed=spec.seed,
        batch_size=min(options.batch_size, spec.shard_size),
        torch_threads=options.torch_threads,
        device=options.device,
        classifier=spec.classifier_network,
        classifier_scale=spec.classifier_scale,
        solver_steps=spec.solver_steps,
        step_schedule=spec.step_schedule,
        cfg_scale=spec.cfg_scale,
        compile=options.compile,
    )
