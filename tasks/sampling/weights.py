"""Find the weights file and the network config behind a checkpoint URI.

Accepted: one of our checkpoint directories (``model.pt``, ``ema_<rate>.pt``, ``meta.json``),
a file inside one, or a released OpenAI ``.pt`` state dict (its architecture then comes from
the preset, e.g. ``--config imagenet64``).
"""

from __future__ import annotations

import json
import logging
import zipfile
from dataclasses import dataclass

from admflow import storage
from admflow.config import AdmConfig, config_from_dict
from models.ema import ema_horizon, ema_is_warm
from tasks.training.checkpoint import checked_meta, ema_filename, ema_rate_of

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


def check_weights_file(uri: str) -> str:
    """A torch checkpoint is a complete zip archive (or, from torch < 1.6, a pickle): random
    bytes or a truncated copy fail here, on the driver, before any worker starts."""
    with storage.open_read(uri) as f:
        head = f.read(2)
        f.seek(0)
        if head == b"\x80\x02" or _is_torch_zip(f):
            return uri
    raise storage.StorageError(
        f"checkpoint {uri} is not a torch checkpoint (corrupt, truncated or another format "
        "such as .npz); copy it again or pass the .pt file"
    )


def _is_torch_zip(f) -> bool:
    """A complete zip archive in torch's layout (``<name>/data.pkl``): an .npz is a zip too."""
    if not zipfile.is_zipfile(f):
        return False
    f.seek(0)
    with zipfile.ZipFile(f) as z:
        return any(n.endswith("/data.pkl") or n == "data.pkl" for n in z.namelist())


def _read_meta(uri: str) -> tuple[AdmConfig | None, int | None]:
    try:
        meta = storage.read_json(uri)
    except (ValueError, UnicodeDecodeError) as e:
        raise storage.StorageError(
            f"checkpoint metadata {uri} is not valid JSON ({e}); copy the checkpoint again or "
            "pass its .pt file with a matching --config"
        ) from None
    meta = checked_meta(uri, meta)
    raw = meta.get("config")
    if isinstance(raw, str):
        raw = json.loads(raw)
    cfg = config_from_dict(raw, source=uri) if raw else None
    return cfg, meta.get("step")


def _pick_weights(
    directory: str, use_ema: bool, ema_rates: list[float], step: int | None = None
) -> str:
    """The EMA file (see :func:`_ema_file`) or ``model.pt``. A checkpoint saved before its
    EMA's horizon (``step`` < 1/(1-rate)) is sampled from its raw weights: such an average is
    still mostly the random initialisation (a 50-step toy upsampler's EMA at 0.99 drew samples
    its judge classed 6% right, its raw weights 90%)."""
    files = {u.rsplit("/", 1)[-1]: u for u in storage.ls(directory, ".pt")}
    ema = _ema_file(files, ema_rates) if use_ema else None
    rate = ema_rate_of(ema) if ema else None
    if use_ema and ema is None:
        log.warning("%s has no ema_<rate>.pt; sampling from the raw weights model.pt", directory)
    elif ema and step is not None and rate is not None and not ema_is_warm(rate, step):
        log.info(
            "%s: %d training steps, fewer than the %d-step horizon of its EMA (rate %s); "
            "sampling from the raw weights model.pt",
            directory, step, ema_horizon(rate), rate,
        )  # fmt: skip
    elif ema:
        return files[ema]
    if "model.pt" not in files:
        raise storage.StorageError(f"{directory}: no model.pt (found {sorted(files) or 'nothing'})")
    return files["model.pt"]


def _ema_file(files: dict[str, str], ema_rates: list[float]) -> str | None:
    """The first of ``ema_rates`` that has a file, else the last EMA file by name."""
    named = [ema_filename(r) for r in ema_rates if ema_filename(r) in files]
    others = sorted(n for n in files if n.startswith("ema_"))
    return (named or others[-1:] or [None])[0]


def resolve_checkpoint(
    uri: str, use_ema: bool = True, ema_rates: list[float] | None = None
) -> ResolvedCheckpoint:
    """Our checkpoint directory (EMA weights by default), a file in one, or a released .pt."""
    uri = uri.rstrip("/")
    rates = ema_rates or []
    if storage.exists(storage.join(uri, "meta.json")):
        cfg, step = _read_meta(storage.join(uri, "meta.json"))
        weights = check_weights_file(_pick_weights(uri, use_ema, rates, step))
        return ResolvedCheckpoint(uri, weights, cfg, step)
    if not storage.exists(uri):
        raise storage.StorageError(f"checkpoint {uri} not found")
    fs, path = storage.filesystem(uri)
    if fs.isdir(path):
        raise storage.StorageError(
            f"checkpoint {uri} is a directory without meta.json; pass a checkpoint directory "
            "(model.pt, meta.json) or a .pt file"
        )
    parent_meta = storage.join(uri.rsplit("/", 1)[0], "meta.json") if "/" in uri else "meta.json"
    if storage.exists(parent_meta):
        cfg, step = _read_meta(parent_meta)
        return ResolvedCheckpoint(uri, check_weights_file(uri), cfg, step)
    return ResolvedCheckpoint(uri, check_weights_file(uri), None)
