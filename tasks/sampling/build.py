"""The two set builders: a sample set's spec, built once from the config, the checkpoints
and the caller's overrides, for the CLI, every flow and periodic evaluation alike.

Overrides are ``sampling`` fields (e.g. ``{"timestep_respacing": "ddim2"}``), validated like
``--set sampling.<field>=...``. Reading a checkpoint's bytes for its hash happens here, on
the driver, once per set.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from admflow import storage
from admflow.config import AdmConfig, ConfigError, SamplingConfig
from admflow.version import code_version
from tasks.sampling import files as sample_io
from tasks.sampling.spec import CheckpointId, Guidance, SampleSetSpec
from tasks.sampling.weights import ResolvedCheckpoint, resolve_checkpoint

log = logging.getLogger(__name__)


def sampling_with(cfg: AdmConfig, overrides: Mapping[str, Any] | None) -> SamplingConfig:
    """``cfg.sampling`` with ``overrides`` applied and validated."""
    if not overrides:
        return cfg.sampling
    try:
        return SamplingConfig.model_validate({**cfg.sampling.model_dump(), **overrides})
    except ValueError as e:
        raise ConfigError(f"sampling overrides {dict(overrides)}: {e}") from None


def _identity(ckpt: ResolvedCheckpoint) -> CheckpointId:
    return CheckpointId(ckpt.source, ckpt.weights, storage.content_hash(ckpt.weights), ckpt.step)


def _section_json(ckpt: ResolvedCheckpoint, cfg: AdmConfig, name: str) -> dict:
    """A config section from the checkpoint's own training config when it has one."""
    source = ckpt.config or cfg
    mine, theirs = getattr(cfg, name), getattr(source, name)
    if ckpt.config is not None and mine != theirs:
        log.info("using the %s section stored with %s (differs from the preset)", name, ckpt.source)
    return theirs.model_dump(mode="json")


def _labels(net_classes: int | None, s: SamplingConfig, clf_classes: int | None):
    if s.classes:
        return tuple(int(c) for c in s.classes)
    n = net_classes or clf_classes
    return tuple(range(n)) if n else None


def _guidance(s: SamplingConfig, scale: float, has_classifier: bool) -> tuple[Guidance, float]:
    if s.guidance == "free" and s.free_scale():
        return "free", s.free_scale()
    if s.guided(scale, has_classifier):
        return "classifier", float(scale)
    return "none", 0.0


def build_spec(
    cfg: AdmConfig,
    checkpoint: str,
    *,
    classifier: str | None = None,
    scale: float = 0.0,
    num_samples: int | None = None,
    sampling: Mapping[str, Any] | None = None,
) -> SampleSetSpec:
    """The base set drawn from ``checkpoint`` at classifier scale ``scale`` (classifier-free
    guidance takes its weight from ``sampling.cfg_scale``); ``cfg.sampling`` with the
    ``sampling`` overrides supplies the rest."""
    s = sampling_with(cfg, sampling)
    guidance, scale = _guidance(s, scale, classifier is not None)
    ckpt = resolve_checkpoint(checkpoint, s.use_ema, cfg.training.ema_rate)
    network = _section_json(ckpt, cfg, "model")
    if guidance == "free" and not network.get("null_class"):
        raise ConfigError(
            f"sampling.guidance=free: {checkpoint} has no null class (it was trained without "
            "label dropout); use sampling.guidance=classifier or none"
        )
    # the noisy classifier trains without an EMA (as in ADM): its raw weights are the model
    clf = resolve_checkpoint(classifier, use_ema=False) if guidance == "classifier" else None
    clf_net = _section_json(clf, cfg, "classifier") if clf else None
    clf_classes = clf_net["num_classes"] if clf_net else None
    return SampleSetSpec(
        kind="base",
        model=_identity(ckpt),
        network=network,
        diffusion=_section_json(ckpt, cfg, "diffusion"),
        sampler=s.sampler,
        respacing=s.timestep_respacing,
        solver_steps=s.solver_steps,
        step_schedule=s.step_schedule,
        guidance=guidance,
        scale=scale,
        eta=s.eta,
        clip_denoised=s.clip_denoised,
        seed=s.seed,
        classes=_labels(network["num_classes"], s, clf_classes),
        num_samples=num_samples or s.num_samples,
        shard_size=s.shard_size,
        image_size=network["image_size"],
        precision="fp16" if network.get("use_fp16") else "fp32",
        code_version=code_version(),
        classifier=_identity(clf) if clf else None,
        classifier_network=clf_net,
    )


def build_upsample_spec(
    cfg: AdmConfig, base: str, checkpoint: str, *, sampling: Mapping[str, Any] | None = None
) -> SampleSetSpec:
    """The second stage: the upsampler conditioned on every image (and label) of the complete
    base set ``base``; its sampler and respacing are ``sampling.upsample_sampler`` and
    ``sampling.upsample_respacing`` when set."""
    s = sampling_with(cfg, sampling)
    base_manifest = sample_io.read_manifest(base)
    if base_manifest is None or not base_manifest.get("complete"):
        raise storage.StorageError(f"{base}: no complete sample set to upsample")
    ckpt = resolve_checkpoint(checkpoint, s.use_ema, cfg.training.ema_rate)
    up = (ckpt.config or cfg).upsampler
    sampler, respacing = s.upsampler_steps()
    return SampleSetSpec(
        kind="upsample",
        model=_identity(ckpt),
        network=up.model_dump(mode="json"),
        diffusion=up.diffusion.model_dump(mode="json"),
        sampler=sampler,
        respacing=respacing,
        solver_steps=s.solver_steps,
        step_schedule=s.step_schedule,
        guidance="none",
        scale=0.0,
        eta=s.eta,
        clip_denoised=s.clip_denoised,
        seed=s.seed,
        classes=None,  # the base set's labels
        num_samples=base_manifest["num_samples"],
        shard_size=s.shard_size,
        image_size=up.unet.image_size,
        precision="fp16" if up.unet.use_fp16 else "fp32",
        code_version=code_version(),
        base_fingerprint=base_manifest["fingerprint"],
    )
