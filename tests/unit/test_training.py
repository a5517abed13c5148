from __future__ import annotations

from typing import List

from node.training.trainer import EvalCadence


def _cadence(share: float) -> "tuple[EvalCadence, List[float]]":
    now = [100.0]
    return EvalCadence(share, clock=lambda: now[0]), now


def test_first_round_is_always_scored_then_at_most_the_share() -> None:
    cadence, now = _cadence(0.01)
    assert cadence.due()
    started = now[0]
    now[0] += 0.5  # scoring took 0.5 s: the next one is due 50 s after it ended
    cadence.scored(started)
    now[0] += 49.0
    assert not cadence.due()
    now[0] += 1.0
    assert cadence.due()


def test_share_one_scores_every_round() -> None:
    cadence, now = _cadence(1.0)
    cadence.scored(now[0] - 10.0)  # even a scoring slower than the round itself
    assert cadence.due()


def test_share_bounds_the_time_spent_scoring() -> None:
    cadence, now = _cadence(0.05)
    scoring = spent = 0.0
    for _ in range(1000):  # rounds of 7 s, each scoring 0.4 s when due
        now[0] += 7.0
        spent += 7.0
        if cadence.due():
            started = now[0]
            now[0] += 0.4
            spent += 0.4
            scoring += 0.4
            cadence.scored(started)
    assert 0.025 < scoring / spent <= 0.05  # every other round here
