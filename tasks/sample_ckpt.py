"""Find the weights file and the network config behind a checkpoint URI.

Accepted: one of our checkpoint directories (``model.pt``, ``ema_<rate>.pt``, ``meta.json``),
a file inside one, or a released OpenAI ``.pt`` state dict (its architecture then comes from
the preset, e.g. ``--config imagenet64``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from admflow import storage
from admflow.config import AdmConfig, config_from_dict

log = logging.getLogger(__name__)


@dataclass
class ResolvedCheckpoint:
    source: str  # what the user gave
    weights: str  # the state-dict file that is read
    config: AdmConfig | None  # the training config from meta.json (ours only)
    step: int | None = None

    @property
    def layout(self) -> str:
        return "admflow" if self.config is not None else "openai"


def _read_meta(uri: str) -> tuple[AdmConfig | None, int | None]:
    meta = storage.read_json(uri)
    raw = meta.get("config")
    if isinstance(raw, str):
        raw = json.loads(raw)
    cfg = config_from_dict(raw, source=uri) if raw else None
    return cfg, meta.get("step")


def _pick_weights(directory: str, use_ema: bool, ema_rates: list[float]) -> str:
    files = {u.rsplit("/", 1)[-1]: u for u in storage.ls(directory, ".pt")}
    if use_ema:
        for rate in ema_rates:
            if f"ema_{rate}.pt" in files:
                return files[f"ema_{rate}.pt"]
        emas = sorted(n for n in files if n.startswith("ema_"))
        if emas:
            return files[emas[-1]]
        log.warning("%s has no ema_<rate>.pt; sampling from the raw weights model.pt", directory)
    if "model.pt" not in files:
        raise storage.StorageError(f"{directory}: no model.pt (found {sorted(files) or 'nothing'})")
    return files["model.pt"]


def resolve_checkpoint(
    uri: str, use_ema: bool = True, ema_rates: list[float] | None = None
) -> ResolvedCheckpoint:
    """Our checkpoint directory (EMA weights by default), a file in one, or a released .pt."""
    uri = uri.rstrip("/")
    rates = ema_rates or []
    if storage.exists(storage.join(uri, "meta.json")):
        cfg, step = _read_meta(storage.join(uri, "meta.json"))
        return ResolvedCheckpoint(uri, _pick_weights(uri, use_ema, rates), cfg, step)
    if not storage.exists(uri):
        raise storage.StorageError(f"checkpoint {uri} not found")
    parent_meta = storage.join(uri.rsplit("/", 1)[0], "meta.json") if "/" in uri else "meta.json"
    if storage.exists(parent_meta):
        cfg, step = _read_meta(parent_meta)
        return ResolvedCheckpoint(uri, uri, cfg, step)
    return ResolvedCheckpoint(uri, uri, None)
