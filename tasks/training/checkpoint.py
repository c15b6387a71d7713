"""Training checkpoints: the directory format of docs/ARCHITECTURE.md, written atomically.

A checkpoint is a directory holding ``model.pt`` (state dict, released key layout), one
``ema_<rate>.pt`` per EMA rate, ``state.pt`` (optimizer, loss scaler, step, schedule sampler,
RNG states, data position) and ``meta.json`` (``{"step", "kind", "config", ...}``).
``meta.json`` is written last, so a reader treats a directory as a checkpoint only once it
exists: a writer killed half way leaves nothing that looks complete.

Each checkpoint is written once, where other stages read it: ``<run>/checkpoints/
step-NNNNNN`` (the run directory is Ray Train's run directory, so Ray records the same
directory instead of keeping a copy). On object storage the worker writes it to local disk
and Ray uploads it in the background while training goes on (``meta.json`` last). A run
keeps the newest ``training.keep_checkpoints`` plus every checkpoint the periodic evaluation
has scored (its record ``<run>/evaluations/step-NNNNNN.json``, see tasks.scoring.periodic).
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from admflow import storage
from admflow.uris import mask_values

META = "meta.json"
MODEL = "model.pt"
STATE = "state.pt"


def ema_filename(rate: float) -> str:
    return f"ema_{rate}.pt"


def ema_rate_of(filename: str) -> float | None:
    """The rate in an ``ema_<rate>.pt`` file name (None for a name without one)."""
    try:
        return float(filename.removeprefix("ema_").removesuffix(".pt"))
    except ValueError:
        return None


def step_dirname(step: int) -> str:
    return f"step-{step:06d}"


def checkpoints_uri(run_uri: str) -> str:
    return storage.join(run_uri, "checkpoints")


# ----------------------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    """torch, numpy and python RNG states as tensors and plain values (weights_only-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {
            "version": version,
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss": py_gauss,
        },
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss"]))


# ----------------------------------------------------------------------------- write / read


def _tensor_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def write_checkpoint(
    uri: str,
    *,
    model: dict[str, torch.Tensor],
    emas: dict[float, dict[str, torch.Tensor]],
    state: dict[str, Any],
    meta: dict[str, Any],
) -> str:
    """Write a checkpoint directory at ``uri`` (local path or s3://); ``meta.json`` last."""
    storage.makedirs(uri)
    storage.write_bytes(storage.join(uri, MODEL), _tensor_bytes(model))
    for rate, sd in emas.items():
        storage.write_bytes(storage.join(uri, ema_filename(rate)), _tensor_bytes(sd))
    storage.write_bytes(storage.join(uri, STATE), _tensor_bytes(state))
    # The config's URIs without credentials (admflow.uris): meta.json travels with the weights.
    storage.write_json(storage.join(uri, META), mask_values(meta))
    return uri


def copy_checkpoint(src_dir: str, dest_uri: str) -> str:
    """Copy a local checkpoint directory to ``dest_uri``, ``meta.json`` last, streaming
    each file (an object appears only once its upload completes)."""
    names = sorted(os.listdir(src_dir))
    if META not in names:
        raise FileNotFoundError(f"{src_dir} is not a complete checkpoint (no {META})")
    storage.makedirs(dest_uri)
    for name in [n for n in names if n != META] + [META]:
        src, dest = os.path.join(src_dir, name), storage.join(dest_uri, name)
        if storage.is_remote(dest):
            fs, path = storage.filesystem(dest)
            fs.put_file(src, path)
        else:
            with open(src, "rb") as f, storage.open_atomic(dest) as out:
                shutil.copyfileobj(f, out, 16 << 20)
    return dest_uri


@dataclass(frozen=True)
class Pending:
    """A checkpoint to persist at ``uri``: ``write(directory)`` writes it, ``durable()``
    runs once it is complete at ``uri`` (possibly on an upload thread)."""

    uri: str
    write: Callable[[str], None]
    durable: Callable[[], None]


def evaluations_uri(run_uri: str) -> str:
    """Where the periodic evaluation records each scored checkpoint (tasks.scoring.periodic)."""
    return storage.join(run_uri, "evaluations")


def prune_checkpoints(run_uri: str, keep: int | None) -> list[str]:
    """Remove all but the newest ``keep`` complete checkpoints of a run, sparing the ones
    the periodic evaluation has scored; returns the removed URIs. ``meta.json`` goes first,
    so a reader never takes a half-removed directory for a checkpoint."""
    if not keep:
        return []
    scored = {
        u.rsplit("/", 1)[-1].removesuffix(".json")
        for u in storage.ls(evaluations_uri(run_uri), ".json")
    }
    removed = []
    for c in list_checkpoints(run_uri)[:-keep]:
        if c["uri"].rstrip("/").rsplit("/", 1)[-1] in scored:
            continue
        storage.remove(storage.join(c["uri"], META))
        storage.remove(c["uri"])
        removed.append(c["uri"])
    return removed


def load_tensors(uri: str) -> Any:
    return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)


def read_meta(checkpoint_uri: str) -> dict[str, Any]:
    uri = storage.join(checkpoint_uri, META)
    return checked_meta(uri, json.loads(storage.read_bytes(uri)), need_step=True)


def checked_meta(uri: str, meta: Any, need_step: bool = False) -> dict[str, Any]:
    """``meta`` as read from ``uri``, once it is what a checkpoint's meta.json holds: a JSON
    object whose step, where there is one (or ``need_step``), is an integer. Anything else
    (a list, a string) is a one-line StorageError, not an AttributeError later."""
    step = meta.get("step") if isinstance(meta, dict) else None
    step_ok = isinstance(step, int) and not isinstance(step, bool)
    if not isinstance(meta, dict) or not (step_ok or (step is None and not need_step)):
        found = f"step {step!r}" if isinstance(meta, dict) else f"a JSON {type(meta).__name__}"
        raise storage.StorageError(
            f"checkpoint metadata {uri} is not a checkpoint's meta.json (a JSON object with "
            f"an integer step; found {found}); copy the checkpoint again or pass its .pt file "
            "with a matching --config"
        )
    return meta


def list_checkpoints(uri: str) -> list[dict[str, Any]]:
    """Complete checkpoints of a run (``uri``: the run dir or its ``checkpoints/`` dir),
    oldest first, as ``{"uri", "step", "kind"}``; directories without meta.json are skipped."""
    base = uri if uri.rstrip("/").endswith("/checkpoints") else checkpoints_uri(uri)
    out = []
    for child in storage.ls(base):
        if not child.rsplit("/", 1)[-1].startswith("step-"):
            continue
        if not storage.exists(storage.join(child, META)):
            continue
        meta = read_meta(child)
        out.append({"uri": child, "step": int(meta["step"]), "kind": meta.get("kind")})
    return sorted(out, key=lambda c: c["step"])


def latest_checkpoint(uri: str) -> str | None:
    """URI of the newest complete checkpoint of a run, or None."""
    found = list_checkpoints(uri)
    return found[-1]["uri"] if found else None


def load_ema(checkpoint_uri: str, rate: float | None = None) -> dict[str, torch.Tensor]:
    """An EMA state dict of a checkpoint (the first listed rate when ``rate`` is None)."""
    if rate is None:
        rates = read_meta(checkpoint_uri).get("ema_rates") or []
        if not rates:
            return load_tensors(storage.join(checkpoint_uri, MODEL))
        rate = rates[0]
    return load_tensors(storage.join(checkpoint_uri, ema_filename(rate)))
