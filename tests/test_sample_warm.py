"""Sample sets drawn one after another inside ``tasks.runtime.warm.keep_warm`` (the flows'
sampling phases): one pool of actors draws them all, and each set keeps the bytes it has
when drawn on actors of its own. The networks are tests/test_sample.py's random ones."""

from __future__ import annotations

import time

import pytest

from tasks.runtime.warm import keep_warm
from tasks.sampling.pool import ACTOR_PREFIX
from tests.test_sample import STEPS, checkpoints, draw, shard_hashes, tiny

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]
__all__ = ["checkpoints"]  # the module-scoped fixture, used here as a fixture


def test_sets_drawn_in_a_row_share_one_warm_pool_and_keep_their_bytes(
    ray_session, checkpoints, tmp_path
):
    """Inside keep_warm (the flows' sampling phases) one pair of actors draws set after set,
    other weights, a classifier and a scale included, and every set has the bytes it has
    when drawn on actors of its own; the pool ends with the block."""
    cfg = tiny("sampling.shard_size=4", "sampling.batch_size=4")
    kw = dict(num_samples=8, steps=STEPS, progress=False)  # two shards: one for each actor
    clf = checkpoints["classifier"]
    sets = {"ema": {}, "raw": {"use_ema": False},
            "guided": {"classifier": clf, "classifier_scale": 50.0}}  # fmt: skip

    def ours() -> list[str]:
        return sorted(n for n in ray_session.util.list_named_actors() if n.startswith(ACTOR_PREFIX))

    def gone() -> bool:
        deadline = time.time() + 30
        while ours() and time.time() < deadline:
            time.sleep(0.2)
        return not ours()

    # on one actor of its own each (the bytes do not depend on the actors: tests above)
    alone = {k: draw(cfg, checkpoints["diffusion"], str(tmp_path / f"alone-{k}"), workers=1,
                     **kw, **extra) for k, extra in sets.items()}  # fmt: skip
    assert gone()
    seen = []
    with keep_warm() as pools:
        for k, extra in sets.items():
            out = str(tmp_path / f"warm-{k}")
            draw(cfg, checkpoints["diffusion"], out, workers=2, **kw, **extra)
            seen.append(ours())
    assert len(seen[0]) == 2 and seen == [seen[0]] * 3, seen
    assert (pools.started, pools.reused) == (1, 2)
    assert gone()
    for k, result in alone.items():
        assert shard_hashes(str(tmp_path / f"warm-{k}")) == shard_hashes(result["uri"]), k
    assert shard_hashes(alone["raw"]["uri"]) != shard_hashes(alone["ema"]["uri"])
    assert shard_hashes(alone["guided"]["uri"]) != shard_hashes(alone["ema"]["uri"])
