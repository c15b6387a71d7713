"""Pools kept warm between the stages of a flow phase (tasks.runtime.warm), without Ray: which
pool a stage gets, and that every pool is ended exactly once, whatever happens."""

from __future__ import annotations

import threading

import pytest

from tasks.runtime.warm import keep_warm, lease


class Pools:
    """Stands in for actor pools: numbered, and a record of which were ended."""

    def __init__(self) -> None:
        self.made = 0
        self.ended: list[int] = []

    def start(self) -> int:
        self.made += 1
        return self.made

    def end(self, pool: int) -> None:
        self.ended.append(pool)


def stage(pools: Pools, key: str, ok: bool = True) -> tuple[int, bool]:
    held = lease(key, pools.start, pools.end)
    held.release(ok)
    return held.pool, held.fresh


def test_outside_a_block_every_stage_starts_and_ends_its_own_pool():
    p = Pools()
    assert [stage(p, "a"), stage(p, "a")] == [(1, True), (2, True)]
    assert p.ended == [1, 2]


def test_inside_a_block_a_matching_pool_is_handed_on_and_ended_with_the_block():
    p = Pools()
    with keep_warm() as warm:
        got = [stage(p, "a"), stage(p, "a"), stage(p, "a")]
        assert p.ended == []  # kept between the stages
    assert got == [(1, True), (1, False), (1, False)]
    assert p.ended == [1] and (warm.started, warm.reused) == (1, 2)


def test_another_key_ends_the_kept_pool_before_its_own_starts():
    p = Pools()
    order: list[str] = []

    def start() -> int:
        order.append(f"start, ended {list(p.ended)}")
        return p.start()

    with keep_warm():
        lease("sample", start, p.end).release(True)
        lease("score", start, p.end).release(True)
        lease("sample", start, p.end).release(True)
    # never two pools at once: each start came after the one before had ended
    assert order == ["start, ended []", "start, ended [1]", "start, ended [1, 2]"]
    assert p.ended == [1, 2, 3]


def test_a_failed_stage_ends_its_pool_and_the_next_starts_afresh():
    p = Pools()
    with keep_warm() as warm:
        stage(p, "a")
        assert stage(p, "a", ok=False) == (1, False)
        assert p.ended == [1]
        assert stage(p, "a") == (2, True)
    assert p.ended == [1, 2] and warm.started == 2


def test_an_error_in_the_block_still_ends_the_kept_pool():
    p = Pools()
    with pytest.raises(KeyboardInterrupt), keep_warm():
        stage(p, "a")
        raise KeyboardInterrupt
    assert p.ended == [1]


def test_blocks_do_not_share_pools_and_threads_started_outside_see_none():
    p = Pools()
    seen: list[tuple[int, bool]] = []
    with keep_warm():
        stage(p, "a")
        # a thread that did not copy this context (a training running beside the flow)
        t = threading.Thread(target=lambda: seen.append(stage(p, "a")))
        t.start()
        t.join()
        with keep_warm():
            assert stage(p, "a") == (3, True)  # the inner block starts its own
        assert stage(p, "a") == (1, False)
    assert seen == [(2, True)]
    assert sorted(p.ended) == [1, 2, 3]


def test_a_pool_that_cannot_be_ended_does_not_hide_the_error_under_way(caplog):
    def end(pool: int) -> None:
        raise RuntimeError("Ray is gone")

    with pytest.raises(KeyboardInterrupt), keep_warm():
        lease("a", lambda: 1, end).release(True)
        raise KeyboardInterrupt  # the block's end fails to end the kept pool: logged only
    assert "Ray is gone" in caplog.text
