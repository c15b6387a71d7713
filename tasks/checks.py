"""The inputs a run reads, checked before it starts: checkpoints, the reference batch, the
Inception weights. ``--plan`` prints what these find; every real run makes the same checks
first, so it never fails late on something ``--plan`` would have seen.

Each check raises a one-line :class:`~admflow.config.ConfigError` naming the file and the fix,
and returns one line describing what it found.
"""

from __future__ import annotations

import os
from typing import Any

from admflow import storage
from admflow.config import AdmConfig, ConfigError
from admflow.uris import mask_uri

SECTIONS = {"diffusion": "model", "classifier": "classifier", "upsampler": "upsampler"}


def _read_state(uri: str) -> Any:
    """A state dict, memory-mapped where the file is local (a 2 GB checkpoint then costs no
    read), so checking it takes seconds."""
    import torch

    local = storage.local_path(uri) if not storage.is_remote(uri) else None
    if local:
        return torch.load(local, map_location="cpu", weights_only=True, mmap=True)
    with storage.open_read(uri) as f:
        return torch.load(f, map_location="cpu", weights_only=True)


def check_checkpoint(uri: str, cfg: AdmConfig, kind: str) -> str:
    """``uri`` (our checkpoint directory or a released .pt) loads strictly into the ``kind``
    network (diffusion | classifier | upsampler) that the run would build, on the meta device."""
    from models.build import build_network
    from models.checkpoints import compare_state_dict
    from tasks.sampling.weights import resolve_checkpoint

    shown = mask_uri(uri)
    ckpt = resolve_checkpoint(uri, use_ema=cfg.sampling.use_ema, ema_rates=cfg.training.ema_rate)
    section = getattr(ckpt.config or cfg, SECTIONS[kind])
    try:
        state = _read_state(ckpt.weights)
    except Exception as e:  # a zip that is no torch archive, a pickle with code, ...
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{kind} checkpoint {shown}: not a torch state dict ({first})") from None
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise ConfigError(f"{kind} checkpoint {shown}: not a plain state dict (names to tensors)")
    model = build_network(section, device="meta")
    missing, unexpected, mismatched = compare_state_dict(state, model)
    if missing or unexpected or mismatched:
        raise ConfigError(
            f"{kind} checkpoint {shown} does not fit the {SECTIONS[kind]} section of this "
            f"config: {_first_difference(missing, unexpected, mismatched)} (another "
            "architecture? pick the preset of this file, or `admflow config from-flags`)"
        )
    params = sum(v.numel() for v in state.values())
    return f"{kind} checkpoint {shown}: {len(state)} tensors, {params / 1e6:.1f}M values, fits"


def _first_difference(missing: list, unexpected: list, mismatched: list) -> str:
    if mismatched:
        name, got, want = mismatched[0]
        text = f"{name} has shape {tuple(got)}, the network {tuple(want)}"
    elif missing:
        text = f"{missing[0]} is missing"
    else:
        text = f"{unexpected[0]} is not in the network"
    more = len(missing) + len(unexpected) + len(mismatched) - 1
    return text + (f" (+{more} more)" if more > 0 else "")


def check_reference_fits(
    reference: str, image_size: int | None, min_images: int = 1, what: str = "evaluation.reference"
) -> str:
    """The reference batch (the input ``what``) scores sets of ``image_size`` px (None: not
    known, e.g. features) and holds ``min_images``."""
    from tasks.scoring.inputs import EvaluationInputError, describe

    shown = mask_uri(reference)
    try:
        info = describe(reference)
    except EvaluationInputError as e:
        raise ConfigError(f"{what}: {e}") from None
    size, count = info.get("image_size"), info.get("num_images")
    if size is not None and image_size is not None and int(size) != image_size:
        raise ConfigError(
            f"{what} {shown}: {size}px images, but this run's samples are "
            f"{image_size}px; give the {image_size}px reference batch"
        )
    if count is not None and int(count) < min_images:
        raise ConfigError(
            f"{what} {shown}: {count} images, fewer than the {min_images} "
            "the metrics need (evaluation.reference_images); give a larger batch or lower it"
        )
    what = f"{count:,} images" if count is not None else info["kind"]
    return f"reference {shown}: {what}" + (f" at {size}px" if size else "")


def check_inception(cfg: AdmConfig) -> str:
    """The Inception weights the scoring will load exist (the bundled ones need the `fid`
    extra); the bundled weights have no logits, so no Inception Score without the user's."""
    from models.inception import InceptionError, default_weights_path

    given = cfg.evaluation.inception_weights
    if given:
        if not storage.exists(given):
            raise ConfigError(
                f"evaluation.inception_weights: {mask_uri(given)} not found; give the "
                "TorchScript / checkpoint path, or unset it for the bundled weights"
            )
        return f"Inception weights {mask_uri(given)} (Inception Score if they have logits)"
    try:
        path = default_weights_path()
    except InceptionError as e:
        raise ConfigError(f"evaluation.inception_weights: {e}") from None
    size = os.path.getsize(path) / 2**20
    return (
        f"Inception weights: bundled ({size:.0f} MiB, FID/sFID/precision/recall; the Inception "
        "Score needs 1008-way weights via evaluation.inception_weights)"
    )
