"""The plan of a sample set, without torch: what each actor builds, and the seeds of shard i.

Everything random in shard ``i`` (its class labels, x_T and every step's noise) comes from
seeds derived from ``(run seed, i)`` alone; see :mod:`tasks.sampling.worker` for their use.
The driver imports only this module, so it stays small (no torch) however large N is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


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
    """The torch seed of micro-batch ``batch`` of shard ``index`` (``stream`` 1: base
    sampling, 2: upsampling, so the two stages never share noise)."""
    state = np.random.SeedSequence([seed, index, stream, batch]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


# Fields added after sample sets were first written: left out of a set's fingerprint while
# at these defaults, so existing sets keep their identity (and resume).
LATER_DEFAULTS = {"solver_steps": None, "step_schedule": "time", "cfg_scale": 0.0}


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
    batch_size: int = 32
    torch_threads: int = 1
    device: str = "auto"
    classifier: dict | None = None  # ClassifierConfig as JSON, when guiding
    classifier_scale: float = 0.0
    solver_steps: int | None = None  # dpm++2m/unipc evaluations (None: every respaced step)
    step_schedule: str = "time"  # dpm++2m/unipc grid: "time" or "logsnr"
    cfg_scale: float = 0.0  # w of classifier-free guidance (0: the conditional model alone)
    compile: bool = False  # torch.compile the diffusion network (sampling.compile)
    extra: dict = field(default_factory=dict)
