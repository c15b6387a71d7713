"""The pipeline as data: what the ``reproduce`` flow does for a config, decided in one place
and tested without Prefect or Ray, and every stage's cache key.

A stage's key is a hash chain: the config sections the stage reads, the code version, the
storage root and the keys of the stages it consumes. A sample set's key is its spec's
fingerprint (:class:`tasks.sampling.spec.SampleSetSpec`), so every flow that draws the same
set finds the same key, and settings that only change how a set is produced (workers,
threads, device) reuse it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from admflow.config import AdmConfig
from admflow.version import code_version
from tasks.resources import reference_actors

if TYPE_CHECKING:
    from tasks.sampling.spec import SampleSetSpec

# The config sections each training reads (plus its data's key and its training fields).
TRAIN_SECTIONS = {
    "diffusion": ("data", "model", "diffusion"),
    "classifier": ("data", "classifier", "diffusion"),
    "upsampler": ("data", "upsampler"),
}
# The training fields named for one job; the other jobs never read them.
_JOB_PREFIXES = ("classifier_", "upsampler_")
# How often a training logs changes no weight.
_TRAINING_EXECUTION = {"log_every"}


def training_fields(cfg: AdmConfig, kind: str) -> dict[str, Any]:
    """The ``training`` fields the ``kind`` job reads: the shared ones and its own, so that
    changing the upsampler's steps does not retrain the diffusion model."""
    own = f"{kind}_"
    fields = cfg.training.model_dump(mode="json", exclude=_TRAINING_EXECUTION)
    return {k: v for k, v in fields.items() if k.startswith(own) or not k.startswith(_JOB_PREFIXES)}


def _hash(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def chain_key(stage: str, cfg: AdmConfig, sections: tuple[str, ...], *upstream: str, **extra: Any):
    """The key of ``stage`` reading ``sections`` of ``cfg`` and the stages keyed ``upstream``."""
    return _hash(
        {
            "stage": stage,
            "code": code_version(),  # another admflow or other math under models/: a new key
            "sections": {s: _section(cfg, s) for s in sections},
            "root": cfg.storage.root,
            "upstream": list(upstream),
            "extra": extra,
        }
    )


# Fields that say how a stage runs, not what it produces: left out of its key, so a rerun
# with more actors or another batch reuses the stage (as a sample set's execution options do).
# Whether a judge is trained changes no reference and no FID either.
EXECUTION_FIELDS = {"evaluation": {"workers", "batch_size", "judge"}}


def _section(cfg: AdmConfig, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    if not hasattr(node, "model_dump"):
        return node
    return node.model_dump(mode="json", exclude=EXECUTION_FIELDS.get(dotted, set()))


def set_key(spec: SampleSetSpec, root: str) -> str:
    """A sample set's key: its fingerprint (the code version is part of it) under ``root``."""
    return _hash({"stage": spec.kind, "set": spec.fingerprint(), "root": root})


def bilinear_key(base_key: str, size: int, root: str) -> str:
    """The bilinear baseline of the set keyed ``base_key``, upscaled to ``size`` px."""
    return _hash({"stage": "bilinear", "code": code_version(), "base": base_key, "size": size,
                  "root": root})  # fmt: skip


def evaluate_key(cfg: AdmConfig, reference_key: str, samples_key: str) -> str:
    return chain_key("evaluate", cfg, ("evaluation",), reference_key, samples_key)


@dataclass(frozen=True)
class SetPlan:
    """One guidance scale's sets: the base set, and whether the upsampler and the bilinear
    baseline take it to full size."""

    scale: float
    guided: bool  # drawn with the noisy classifier
    upsample: bool
    bilinear: bool


@dataclass(frozen=True)
class PipelinePlan:
    """What ``reproduce`` runs for one config; ``keys`` holds every stage key known before
    training (data, up_data, train.<kind>, reference, up_reference, judge, floor, curve)."""

    two_stage: bool
    trainings: tuple[str, ...]
    sets: tuple[SetPlan, ...]
    judge: bool  # the class-accuracy judge trained on our data
    floor: bool  # the FID floor of the upsampler-size reference
    curve: bool  # FID over training, every checkpoint
    curve_reuses_unguided: bool  # the curve's last point is the sweep's unguided base row
    reference_workers: int
    keys: dict[str, str]


def _sets(cfg: AdmConfig, trainings: tuple[str, ...]) -> tuple[SetPlan, ...]:
    s = cfg.sampling
    out = []
    for scale in s.classifier_scales:
        upsample = "upsampler" in trainings and s.upsampled(scale)
        guided = "classifier" in trainings and s.guided(scale, True)
        out.append(SetPlan(scale, guided, upsample, upsample and cfg.two_stage))
    return tuple(out)


def _keys(cfg: AdmConfig) -> dict[str, str]:
    n = cfg.sampling.num_samples
    keys = {"data": chain_key("shard", cfg, ("data",))}
    keys["up_data"] = keys["data"]
    if cfg.two_stage:  # the upsampler trains on the data at its own resolution
        keys["up_data"] = chain_key("shard", cfg.upsampler_data(), ("data",))
    for kind, sections in TRAIN_SECTIONS.items():
        data = keys["up_data" if kind == "upsampler" else "data"]
        training = training_fields(cfg, kind)
        keys[f"train.{kind}"] = chain_key("train", cfg, sections, data, training=training)
    keys["reference"] = chain_key("reference", cfg, ("evaluation",), keys["data"])
    keys["up_reference"] = keys["reference"]
    if cfg.two_stage:
        up_cfg = cfg.upsampler_data()
        keys["up_reference"] = chain_key("reference", up_cfg, ("evaluation",), keys["up_data"])
    keys["judge"] = chain_key("judge", cfg, (), keys["data"], keys["reference"], num_samples=n)
    keys["floor"] = chain_key("floor", cfg, (), keys["up_reference"], num_samples=n)
    ckpts = (keys["train.diffusion"], keys["reference"])
    keys["curve"] = chain_key("curve", cfg, ("evaluation",), *ckpts)
    return keys


def plan_reproduce(cfg: AdmConfig) -> PipelinePlan:
    """The reproduce flow's plan. Two stages (ADM-G + ADM-U): the base model is scored where
    it works (the sweep and the FID curve against real images at its size, as the paper
    scores ADM-G at 64 or 128); the upsampled sets against real images at the upsampler's
    size, beside the same base samples upscaled bilinearly (the baseline ADM-U must beat)."""
    trainings: tuple[str, ...] = ("diffusion",)
    trainings += ("classifier",) if cfg.classifier.enabled else ()
    trainings += ("upsampler",) if cfg.upsampler.enabled else ()
    return PipelinePlan(
        two_stage=cfg.two_stage,
        trainings=trainings,
        sets=_sets(cfg, trainings),
        judge=cfg.evaluation.judge and cfg.data.class_cond and not cfg.evaluation.reference,
        floor=cfg.two_stage,
        curve=cfg.evaluation.checkpoint_samples > 0,
        curve_reuses_unguided=cfg.evaluation.checkpoint_samples > 0
        and cfg.curve_reuses_unguided_set,
        reference_workers=reference_actors(cfg),  # as tasks.resources places them
        keys=_keys(cfg),
    )


def reproduce_set_spec(cfg: AdmConfig, plan: SetPlan, runs: dict[str, dict]) -> SampleSetSpec:
    """The base set of ``plan`` from the reproduce flow's trained checkpoints."""
    from tasks.sampling.build import build_spec

    classifier = runs["classifier"]["checkpoint"] if plan.guided else None
    return build_spec(cfg, runs["diffusion"]["checkpoint"], classifier=classifier, scale=plan.scale)


def released_set_spec(
    cfg: AdmConfig, checkpoint: str, classifier: str | None, scale: float | None
) -> SampleSetSpec:
    """The base set of the ``sample`` (and ``paper``) flow: ``scale`` defaults as the CLI's."""
    from tasks.sampling.build import build_spec
    from tasks.sampling.spec import default_scale

    if scale is None:
        scale = default_scale(cfg.sampling.classifier_scales, classifier is not None)
    return build_spec(cfg, checkpoint, classifier=classifier, scale=scale)
