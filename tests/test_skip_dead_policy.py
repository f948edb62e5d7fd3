"""Skipping dead problems before rollout (issue 18, after GRESO): the round policy's pure part
(gradalign_common.round_policy.draw_chunk, SkipDead, the zero-advantage streaks)."""

from __future__ import annotations

import pytest

from gradalign_common.round_policy import ChunkDraw, SkipDead, chunk_ids, draw_chunk, skip_draw, update_streaks
from gradalign_common.round_policy import zero_advantage_streaks

POOL = [f"p{i}" for i in range(40)]
ON = SkipDead(enabled=True)


def _walk_rounds(pool, rounds, m, dead, skip, seed=0):
    """Rounds of the policy with `dead` problems always scored zero-advantage: (chunks, skipped) per round."""
    streaks: dict[str, int] = {}
    cursor, chunks, skipped = 0, [], []
    for r in range(rounds):
        draw = draw_chunk(pool, cursor, m, streaks, skip, seed * 1000 + r)
        cursor = draw.end
        chunks.append(draw.ids)
        skipped.append(draw.skipped)
        update_streaks(streaks, [(pid, pid in dead) for pid in draw.ids])
    return chunks, skipped


@pytest.mark.parametrize("pool_size, m", [(40, 8), (40, 40), (40, 13), (5, 8), (7, 3), (1, 1)])
def test_off_is_exactly_the_chunks_of_before(pool_size, m):
    pool = POOL[:pool_size]
    dead_streaks = {pid: 5 for pid in pool}  # however dead, skipping off ignores it
    for r in range(12):
        for skip in (None, SkipDead(), SkipDead(enabled=False, base=1.0, cap=0.99)):
            draw = draw_chunk(pool, r * m, m, dead_streaks, skip, seed=r)
            assert draw.ids == chunk_ids(pool, r, m) and draw.skipped == []
            assert draw.start == (r * m) % pool_size and draw.end == ((r + 1) * m) % pool_size


def test_on_without_streaks_takes_the_same_chunks_as_off():
    for r in range(10):
        assert draw_chunk(POOL, r * 8, 8, {}, ON, seed=r) == draw_chunk(POOL, r * 8, 8, None, None, seed=r)
        assert draw_chunk(POOL, r * 8, 8, {pid: 0 for pid in POOL}, ON, seed=r).ids == chunk_ids(POOL, r, 8)


def test_the_skip_probability_grows_with_the_streak_and_stays_below_one():
    probs = [ON.probability(s) for s in range(8)]
    assert probs[0] == 0.0 and probs[1] == pytest.approx(0.5) and probs[2] == pytest.approx(0.75)
    assert all(a < b for a, b in zip(probs[:4], probs[1:4])) and max(probs) == pytest.approx(0.9)
    assert SkipDead(enabled=True, base=1.0, cap=0.95).probability(1) == pytest.approx(0.95)
    assert SkipDead(enabled=False).probability(10) == 0.0
    for bad in (dict(base=0.0), dict(base=1.5), dict(cap=1.0), dict(cap=-0.1)):
        with pytest.raises(ValueError):
            SkipDead(enabled=True, **bad)


def test_skipped_problems_are_dead_and_the_chunk_is_filled_from_the_pool():
    streaks = {pid: 3 for pid in POOL[:10]}  # the first 10 of the pool are dead (p = 0.875)
    draw = draw_chunk(POOL, 0, 8, streaks, ON, seed=1)
    assert len(draw.ids) == 8 and len(set(draw.ids)) == 8
    assert draw.skipped and set(draw.skipped) <= set(POOL[:10]) and not set(draw.skipped) & set(draw.ids)
    assert draw.ids == [pid for pid in POOL if pid in set(draw.ids)]  # pool order kept
    assert draw.end == 8 + len(draw.skipped)  # the walk went on past the skipped ones
    # the next round starts where this one's walk ended
    assert draw_chunk(POOL, draw.end, 8, streaks, ON, seed=2).start == draw.end


def test_the_empirical_skip_rate_follows_the_streak():
    """Over many rounds (seeds), a problem of streak s is skipped at about p(s): more often the longer the streak,
    never always (a dead problem is re-tried now and then)."""
    rates = {}
    for streak in (1, 2, 3, 6):
        streaks = {pid: streak for pid in POOL[:20]}
        # the 20 dead come first and 20 live follow: a chunk of 20 walks past every dead one, none taken back
        n_skipped = sum(len(draw_chunk(POOL, 0, 20, streaks, ON, seed=s).skipped) for s in range(400))
        rates[streak] = n_skipped / (400 * 20)
    assert rates[1] < rates[2] < rates[3] <= rates[6]
    for streak, rate in rates.items():
        assert rate == pytest.approx(ON.probability(streak), abs=0.03), rates
    assert rates[6] < 0.95  # capped: re-tried about 10% of the time


def test_dead_problems_are_retried_now_and_then_over_rounds():
    dead = set(POOL[::2])  # half the pool is always zero-advantage
    chunks, skipped = _walk_rounds(POOL, 40, 8, dead, ON)
    assert sum(map(len, skipped)) > 0
    after_first_pass = [pid for chunk in chunks[5:] for pid in chunk]  # 40/8 = 5 rounds see every problem once
    retried = {pid for pid in after_first_pass if pid in dead}
    assert retried, "no dead problem was ever re-tried"
    live_share = sum(pid not in dead for pid in after_first_pass) / len(after_first_pass)
    assert live_share > 0.6  # without skipping it would be 0.5
    # and with skipping off the same history gives exactly the chunks of before
    off_chunks, off_skipped = _walk_rounds(POOL, 40, 8, dead, SkipDead())
    assert off_chunks == [chunk_ids(POOL, r, 8) for r in range(40)] and not any(off_skipped)


def test_an_all_dead_pool_terminates_without_duplicates():
    streaks = {pid: 50 for pid in POOL}
    for m in (1, 8, 40):
        for seed in range(20):
            draw = draw_chunk(POOL, 7, m, streaks, SkipDead(enabled=True, base=1.0, cap=0.99), seed)
            assert len(draw.ids) == m and len(set(draw.ids)) == m  # skipped ones were taken back to fill it
            assert not set(draw.ids) & set(draw.skipped) and len(set(draw.skipped)) == len(draw.skipped)
            assert len(draw.ids) + len(draw.skipped) <= len(POOL)
    # a pool smaller than the chunk, everything dead: one pass, every problem once
    small = POOL[:5]
    draw = draw_chunk(small, 3, 8, {pid: 9 for pid in small}, ON, seed=4)
    assert sorted(draw.ids) == sorted(small) and draw.skipped == []


def test_a_pool_with_repeated_ids_never_repeats_one_in_a_chunk():
    pool = ["a", "b", "a", "c", "b", "d", "e", "a"]
    for seed in range(10):
        draw = draw_chunk(pool, 1, 4, {"b": 2, "c": 1}, ON, seed)
        assert len(draw.ids) == len(set(draw.ids)) == 4 and not set(draw.ids) & set(draw.skipped)


def test_draws_are_deterministic_by_seed_and_differ_between_seeds():
    streaks = {pid: 1 for pid in POOL}
    first = [draw_chunk(POOL, 3, 8, streaks, ON, seed) for seed in range(6)]
    assert first == [draw_chunk(POOL, 3, 8, dict(streaks), ON, seed) for seed in range(6)]
    assert len({tuple(d.ids) for d in first}) > 1
    assert skip_draw(17, "p1") == skip_draw(17, "p1") != skip_draw(18, "p1")
    assert 0.0 <= skip_draw(0, "x") < 1.0
    assert isinstance(first[0], ChunkDraw)


def test_streaks_count_the_most_recent_zero_advantage_rounds_in_a_row():
    history = [
        (0, "a", True), (1, "a", True), (2, "a", True),  # a: 3
        (0, "b", True), (1, "b", False),  # b: broken by its last round: 0
        (2, "c", True), (0, "c", False),  # c: rows in any order: 1
        (1, "d", None),  # never scored: no streak
        (3, "e", False), (5, "e", True), (9, "e", True),  # rounds need not be consecutive: its own appearances
    ]
    assert zero_advantage_streaks(history) == {"a": 3, "b": 0, "c": 1, "e": 2}
    streaks = {"a": 2}
    assert update_streaks(streaks, [("a", True), ("b", False), ("c", None)]) is streaks
    assert streaks == {"a": 3, "b": 0}
