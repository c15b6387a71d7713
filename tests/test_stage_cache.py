"""Stage cache keys follow the object store: a wiped store never answers from Prefect's cache."""

from __future__ import annotations

import shutil

from admflow.config import load_config
from flows.stages import _by_key


def test_cache_key_is_stable_with_its_store_and_new_without_it(tmp_path):
    cfg = load_config("tiny", [f"storage.root={tmp_path / 'store'}"])
    params = {"cfg": cfg, "cache_key": "abc123"}
    first = _by_key(None, params)
    assert first.startswith("admflow-abc123-") and _by_key(None, params) == first
    other = _by_key(None, {"cfg": cfg, "cache_key": "def456"})
    assert other.startswith("admflow-def456-") and other != first
    shutil.rmtree(tmp_path / "store")  # the store is gone: its results are gone with it
    again = _by_key(None, params)
    assert again != first and _by_key(None, params) == again
