"""Load released OpenAI guided-diffusion checkpoints (plain state dicts) into our networks.

Matching is strict: every key must exist on both sides with the same shape. A mismatch
raises :class:`CheckpointMismatchError` naming the missing, unexpected and mis-shaped keys.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import IO, Any

import torch
import torch.nn as nn

MAX_LISTED = 20  # keys shown per category; the rest are counted


class CheckpointMismatchError(ValueError):
    """A state dict that does not fit the model exactly."""

    def __init__(
        self,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[tuple[str, tuple, tuple]],
        source: str = "checkpoint",
    ):
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched
        super().__init__(_describe(missing, unexpected, mismatched, source))


def _listing(title: str, items: list[str]) -> list[str]:
    if not items:
        return []
    lines = [f"  {title} ({len(items)}):"]
    lines += [f"    {s}" for s in items[:MAX_LISTED]]
    if len(items) > MAX_LISTED:
        lines.append(f"    ... and {len(items) - MAX_LISTED} more")
    return lines


def _describe(missing, unexpected, mismatched, source) -> str:
    lines = [f"{source} does not match the model:"]
    lines += _listing("missing keys (in the model, not in the checkpoint)", sorted(missing))
    lines += _listing("unexpected keys (in the checkpoint, not in the model)", sorted(unexpected))
    lines += _listing(
        "shape mismatches (key: checkpoint vs model)",
        [f"{k}: {list(a)} vs {list(b)}" for k, a, b in sorted(mismatched)],
    )
    lines.append(
        "  (check image_size, channel_mult, num_res_blocks, attention, class_cond, learn_sigma)"
    )
    return "\n".join(lines)


def compare_state_dict(
    state: Mapping[str, torch.Tensor], model: nn.Module
) -> tuple[list[str], list[str], list[tuple[str, tuple, tuple]]]:
    """Missing keys, unexpected keys and ``(key, checkpoint_shape, model_shape)`` mismatches."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        (k, tuple(state[k].shape), tuple(own[k].shape))
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    return missing, unexpected, mismatched


def load_state_dict_strict(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint"
) -> nn.Module:
    """Copy ``state`` into ``model`` after checking keys and shapes; returns the model.

    A model built on the meta device receives the checkpoint tensors themselves
    (``assign=True``), so no second copy of the weights is allocated.
    """
    missing, unexpected, mismatched = compare_state_dict(state, model)
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(missing, unexpected, mismatched, source)
    on_meta = any(t.is_meta for t in model.state_dict().values())
    model.load_state_dict(dict(state), strict=True, assign=on_meta)
    return model


def read_state_dict(path_or_fileobj: str | os.PathLike | IO[bytes]) -> dict[str, torch.Tensor]:
    """``torch.load`` a plain state dict onto the CPU, tensors only (``weights_only``)."""
    state: Any = torch.load(path_or_fileobj, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(
            f"{_name(path_or_fileobj)} is not a plain state dict (mapping of names to tensors)"
        )
    return dict(state)


def _name(path_or_fileobj: Any) -> str:
    if isinstance(path_or_fileobj, (str, os.PathLike)):
        return os.fspath(path_or_fileobj)
    return getattr(path_or_fileobj, "name", "checkpoint stream")


def load_openai_checkpoint(
    path_or_fileobj: str | os.PathLike | IO[bytes], model: nn.Module
) -> nn.Module:
    """Load a released guided-diffusion ``.pt`` (e.g. ``256x256_diffusion.pt``) into ``model``."""
    state = read_state_dict(path_or_fileobj)
    return load_state_dict_strict(model, state, source=str(_name(path_or_fileobj)))


def build_and_load(section: Any, path_or_fileobj: str | os.PathLike | IO[bytes]) -> nn.Module:
    """Build the network for a config section (model / classifier / upsampler) and load it.

    The network is built on the meta device and takes the loaded tensors directly.
    """
    from .build import build_network

    model = build_network(section, device="meta")
    return load_openai_checkpoint(path_or_fileobj, model)
