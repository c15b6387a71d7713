"""The identity of the code, for cache keys: a result cached by other code is never reused.

``code_version()`` is the installed admflow version plus a hash of the math under
``models/`` (the networks, the diffusion, the samplers, the metrics), so an upgrade, or a
local edit of the math without a version bump, makes every stage's key new.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
from pathlib import Path


def package_version() -> str:
    try:
        return importlib.metadata.version("admflow")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout without install
        return "0+unknown"


def sources_hash(root: Path) -> str:
    """SHA-256 (first 12 hex digits) over the relative paths and bytes of ``root``'s .py files."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()[:12]


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """E.g. ``0.1.0+models.3f1c9a0b7e2d`` (computed once per process)."""
    import models

    return f"{package_version()}+models.{sources_hash(Path(models.__file__).parent)}"
