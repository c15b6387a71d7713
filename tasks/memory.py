"""Will each GPU stage of a config fit its GPU? The memory model of the presets.

For every stage that holds a GPU (the three trainings, sampling, upsampling) the estimate is

    peak = states + fixed + microbatch * peak_per_image

* ``peak_per_image`` and ``fixed``: the activation bytes one image adds, and the
  batch-independent ones, counted by :mod:`models.memory` on fake tensors (no memory, no GPU);
  training counts forward and backward under the config's precision and gradient
  checkpointing, sampling the UNet's forward under no_grad and, with classifier guidance, the
  classifier's backward to its input (the larger of the two), plus the sampler's own tensors;
* ``states``: training keeps float32 parameters and gradients, AdamW's two moments, one
  float32 copy per EMA rate and, with several workers, DDP's gradient buckets (a second copy
  of the gradients): 4 + 4 + 8 + 4 * rates (+ 4) bytes per parameter. Mixed precision
  autocasts from the float32 parameters, so they are the float32 master weights, and the
  float16 copies autocast makes of them are in ``fixed``. Sampling keeps the networks' weights,
  the torso in float16 where ``use_fp16`` says so.

The budget is ``memory.gpu_gb * memory.usable`` per GPU. Counts are cached per network and
pass (a pure function of the network's config), so a run of many presets counts each
network once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from admflow.config import AdmConfig, ClassifierConfig, ConfigError, UNetConfig, UpsamplerConfig
from models.memory import ActivationProfile, PassKind, network_pass, profile, weights

GIB = 1024**3
ADAMW_BYTES = 8  # exp_avg and exp_avg_sq, float32
SAMPLER_TENSORS = 8  # x_t, noise, the model's output (2 images), mean, variance, x_0, x_{t-1}


@dataclass(frozen=True)
class StageMemory:
    """One GPU stage: its per-GPU batch and the estimated peak of one GPU's memory."""

    stage: str
    networks: str
    precision: str  # of the activations: fp32 or fp16
    checkpointing: bool
    batch: int  # images per GPU per step (training) or per micro-batch (sampling)
    microbatch: int  # images per forward pass
    saved_per_image: int  # bytes autograd saves for backward (0 in inference)
    peak_per_image: int
    fixed: int  # batch-independent activation bytes
    states: int  # weights (and gradients, AdamW moments, EMA, DDP buckets when training)
    budget: int
    microbatch_field: str  # the setting that changes ``microbatch``

    @property
    def peak(self) -> int:
        return self.states + self.fixed + self.microbatch * self.peak_per_image

    @property
    def fits(self) -> bool:
        return self.peak <= self.budget

    def largest_fitting_microbatch(self) -> int:
        """The most images per forward pass within the budget (0: not even one)."""
        room = self.budget - self.states - self.fixed
        return max(0, room // self.peak_per_image) if self.peak_per_image else self.batch

    def row(self) -> list[str]:
        return [
            self.stage,
            self.networks,
            self.precision + (" +ckpt" if self.checkpointing else ""),
            str(self.batch),
            str(self.microbatch),
            f"{self.saved_per_image / GIB:.2f}",
            f"{self.peak_per_image / GIB:.2f}",
            f"{self.states / GIB:.1f}",
            f"{self.peak / GIB:.1f}",
            f"{self.budget / GIB:.1f}",
            "yes" if self.fits else "NO",
        ]


HEADER = [
    "stage",
    "network",
    "activations",
    "batch/GPU",
    "micro",
    "saved GiB/img",
    "peak GiB/img",
    "states GiB",
    "peak GiB",
    "budget GiB",
    "fits",
]


@dataclass(frozen=True)
class MemoryEstimate:
    """Every GPU stage of a config, each against the per-GPU budget."""

    name: str
    stages: tuple[StageMemory, ...]
    budget: int

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.stages)

    def stage(self, name: str) -> StageMemory:
        for s in self.stages:
            if s.stage == name:
                return s
        raise KeyError(f"no GPU stage {name!r} in {self.name}; have {self.stage_names}")

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(s.stage for s in self.stages)

    def lines(self) -> list[str]:
        """A fixed-width table, one line per stage."""
        rows = [HEADER, *(s.row() for s in self.stages)]
        widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
        return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]

    def markdown(self) -> list[str]:
        rows = [HEADER, ["---"] * len(HEADER), *(s.row() for s in self.stages)]
        return ["| " + " | ".join(r) + " |" for r in rows]

    def check(self) -> None:
        """A one-line ConfigError for the first stage over budget, naming what to change."""
        for s in self.stages:
            if s.fits:
                continue
            fitting = s.largest_fitting_microbatch()
            fix = (
                f"set {s.microbatch_field}={fitting} or smaller"
                if fitting
                else "turn on gradient checkpointing (use_checkpoint) or use a larger GPU"
            )
            raise ConfigError(
                f"{self.name} {s.stage}: estimated peak {s.peak / GIB:.1f} GiB per GPU exceeds "
                f"the budget {s.budget / GIB:.1f} GiB (memory.gpu_gb x memory.usable); {fix}"
            )


# ---------------------------------------------------------------- counting, cached per network


Section = UNetConfig | ClassifierConfig | UpsamplerConfig
_TYPES: dict[str, type[Section]] = {
    "unet": UNetConfig,
    "classifier": ClassifierConfig,
    "upsampler": UpsamplerConfig,
}


def _key(section: Section) -> tuple[str, str]:
    name = {UNetConfig: "unet", ClassifierConfig: "classifier", UpsamplerConfig: "upsampler"}
    return name[type(section)], section.model_dump_json()


# Counting a 256 px network takes tens of seconds, too slow for `--plan`: the presets' counts
# ship in PROFILE_TABLE, valid while the code that builds and counts the networks is unchanged
# (tests/test_memory_model.py fails when it is stale; `python benchmarks/memory_table.py
# --write-profiles` rewrites it). Anything not in the table is counted.
PROFILE_TABLE = Path(__file__).with_name("memory_profiles.json")
NETWORK_SOURCES = ("unet.py", "unet_blocks.py", "nn.py", "build.py", "fast.py", "memory.py")
_COUNTED: dict[str, ActivationProfile] = {}


def network_code() -> str:
    """A hash of the modules that build the networks and count their bytes."""
    import models

    root = Path(models.__file__).parent
    h = hashlib.sha256()
    for name in NETWORK_SOURCES:
        h.update(name.encode() + b"\0" + (root / name).read_bytes() + b"\0")
    return h.hexdigest()[:16]


@lru_cache(maxsize=1)
def _shipped() -> dict[str, list[int]]:
    if not PROFILE_TABLE.exists():
        return {}
    table = json.loads(PROFILE_TABLE.read_text())
    return table["profiles"] if table.get("code") == network_code() else {}


def _profile_key(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:24]


@lru_cache(maxsize=64)
def _profile(
    kind_name: str, section_json: str, kind: PassKind, half: bool, batch: int
) -> ActivationProfile:
    key = _profile_key(kind_name, section_json, kind, half, batch)
    if key in _shipped():
        return ActivationProfile(*_shipped()[key])
    section = _TYPES[kind_name].model_validate_json(section_json)
    build, inputs = network_pass(section)
    counted = profile(build, inputs, kind, half, batches=(1, max(2, batch)))
    _COUNTED[key] = counted
    return counted


def write_profile_table(configs: list[AdmConfig], path: Path = PROFILE_TABLE) -> int:
    """Count every stage of ``configs`` and write the table (returns its number of entries)."""
    for cfg in configs:
        estimate_memory(cfg)
    rows = {k: [p.saved_per_image, p.peak_per_image, p.peak_fixed] for k, p in _COUNTED.items()}
    rows = {**_shipped(), **rows}
    table = {"code": network_code(), "profiles": dict(sorted(rows.items()))}
    path.write_text(json.dumps(table, indent=0) + "\n")
    return len(rows)


@lru_cache(maxsize=64)
def _weights(kind_name: str, section_json: str, half: bool) -> tuple[int, int]:
    return weights(_TYPES[kind_name].model_validate_json(section_json), half)


def activation_profile(
    section: Section, kind: PassKind, half: bool, batch: int
) -> ActivationProfile:
    """The network's activation bytes for one pass, exact at ``batch`` and at 1 and above the
    count in between (cached: the same answer every time)."""
    return _profile(*_key(section), kind, half, batch)


def weight_count(section: Section, half: bool = False) -> tuple[int, int]:
    """(parameters, bytes) of the network, ``half``: with its torso in float16."""
    return _weights(*_key(section), half)


# ---------------------------------------------------------------- the stages


def _training(cfg: AdmConfig, stage: str, job: str, section: Section, emas: int) -> StageMemory:
    half = cfg.training.mixed_precision != "no"
    batch, micro = cfg.training.batches(job)
    local = max(1, batch // cfg.compute.num_workers)
    micro = micro if 0 < micro < local else local
    params, _ = weight_count(section)
    ddp = 4 if cfg.compute.num_workers > 1 else 0
    unet = section.unet if isinstance(section, UpsamplerConfig) else section
    prefix = "" if job == "diffusion" else f"{job}_"
    prof = activation_profile(section, "train", half, micro)
    return StageMemory(
        stage=stage,
        networks={"diffusion": "UNet"}.get(job, job),
        precision="fp16" if half else "fp32",
        checkpointing=bool(getattr(unet, "use_checkpoint", False)),
        batch=local,
        microbatch=micro,
        saved_per_image=prof.saved_per_image,
        peak_per_image=prof.peak_per_image,
        fixed=prof.peak_fixed,
        states=params * (4 + 4 + ADAMW_BYTES + 4 * emas + ddp),
        budget=cfg.memory.budget_bytes,
        microbatch_field=f"training.{prefix}microbatch",
    )


def _guided(cfg: AdmConfig) -> bool:
    s = cfg.sampling
    return cfg.classifier.enabled and s.guidance == "classifier" and any(s.classifier_scales)


def _sampling(cfg: AdmConfig, stage: str, section: UNetConfig | UpsamplerConfig) -> StageMemory:
    unet = section.unet if isinstance(section, UpsamplerConfig) else section
    batch = min(cfg.sampling.batch_size, cfg.sampling.shard_size)
    prof = activation_profile(section, "infer", unet.use_fp16, batch)
    _, states = weight_count(section, unet.use_fp16)
    per_image, saved, names = prof.peak_per_image, 0, "UNet" if stage == "sample" else "upsampler"
    if stage == "sample" and _guided(cfg):
        clf = activation_profile(cfg.classifier, "input_grad", cfg.classifier.use_fp16, batch)
        states += weight_count(cfg.classifier, cfg.classifier.use_fp16)[1]
        per_image, saved = max(per_image, clf.peak_per_image), clf.saved_per_image
        names += " + classifier grad"
    per_image += SAMPLER_TENSORS * unet.in_channels * unet.image_size**2 * 4
    return StageMemory(
        stage=stage,
        networks=names,
        precision="fp16" if unet.use_fp16 else "fp32",
        checkpointing=False,
        batch=batch,
        microbatch=batch,
        saved_per_image=saved,
        peak_per_image=per_image,
        fixed=prof.peak_fixed,
        states=states,
        budget=cfg.memory.budget_bytes,
        microbatch_field="sampling.batch_size",
    )


def estimate_memory(cfg: AdmConfig) -> MemoryEstimate:
    """The per-GPU peak of every GPU stage the config runs (resource-plan stage names)."""
    emas = len(cfg.training.ema_rate)
    stages = [_training(cfg, "train-diffusion", "diffusion", cfg.model, emas)]
    if cfg.classifier.enabled and cfg.data.class_cond:
        stages.append(_training(cfg, "train-classifier", "classifier", cfg.classifier, 0))
    if cfg.upsampler.enabled:
        stages.append(_training(cfg, "train-upsampler", "upsampler", cfg.upsampler, emas))
    stages.append(_sampling(cfg, "sample", cfg.model))
    if cfg.upsampler.enabled:
        stages.append(_sampling(cfg, "upsample", cfg.upsampler))
    return MemoryEstimate(cfg.name, tuple(stages), cfg.memory.budget_bytes)


def check_shared_gpus(est: MemoryEstimate, placements: list) -> None:
    """Actors that share a GPU (``StagePlacement.gpus`` < 1) each hold a replica of their
    networks: k actors on one GPU need k times a stage's peak. A one-line ConfigError when
    that exceeds the budget, naming the share (or the actor count) that fits."""
    for p in placements:
        if not 0 < p.gpus < 1 or p.stage not in est.stage_names:
            continue
        s = est.stage(p.stage)
        per_gpu = int(1 / p.gpus + 1e-9)
        if per_gpu * s.peak <= s.budget:
            continue
        fit = max(1, s.budget // s.peak)
        workers = max(1, int(fit * p.workers * p.gpus + 1e-9))
        raise ConfigError(
            f"{p.field}={p.workers} puts {per_gpu} {p.stage} actors on each GPU: {per_gpu} x "
            f"{s.peak / GIB:.1f} GiB exceeds the {s.budget / GIB:.1f} GiB budget; set "
            f"{p.field}={workers} (or compute.gpus_per_actor={1 / fit:.4g})"
        )
