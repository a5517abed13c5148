"""The check a member applies to reducers' results (node/resultcheck.py), without sockets.

Each test builds one member's view of an all-reduce (its own parts, the results that came back)
and asks the production check which results it applies."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np

from node.averaging.averager import AveragingStats, _Round
from node.averaging.matchmaking import Group
from node.averaging.resultcheck import ResultCheck
from node.averaging.slices import owner_of, region_bounds
from protocol.manifest import AveragingSpec

NUMEL = 3000


class Member(ResultCheck):
    def __init__(self) -> None:
        self.stats = AveragingStats()
        self._spec = AveragingSpec()


def view(size: int, own: np.ndarray, regions: List[int]) -> Tuple[Member, _Round, Dict[int, str]]:
    members = tuple(f"peer{i}" for i in range(size))
    group = Group("trunk", 5, members, ("h",) * size, "g" * 16)
    bounds = region_bounds(regions, size, chunk_elements=1 << 18)
    state = _Round(group, bounds, regions, own.astype(np.float32), "float32", deadline=0.0)
    reducer_of = {i: members[owner_of(i, size)] for i in range(len(bounds))}
    return Member(), state, reducer_of


def check(
    size: int, own: np.ndarray, honest: np.ndarray, regions: Optional[List[int]] = None, liar: Optional[int] = None
) -> Tuple[_Round, AveragingStats]:
    """Member 0 reduces its own slices to ``honest``; every other reducer returns ``honest`` too,
    except ``liar``, which returns it times -10."""
    member, state, reducer_of = view(size, own, regions or [own.size])
    results = {}
    for i, (lo, hi) in enumerate(state.bounds):
        if owner_of(i, size) == 0:
            state.result[lo:hi] = honest[lo:hi]
            state.averaged[i] = True
        else:
            values = honest[lo:hi] * (-10.0 if owner_of(i, size) == liar else 1.0)
            results[i] = (float(size), values.astype(np.float32))
    member._accept_checked(state, results, reducer_of, "peer0")
    return state, member.stats


def parts(size: int, seed: int = 0) -> List[np.ndarray]:
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal(NUMEL).astype(np.float32)
    return [shared + 0.5 * rng.standard_normal(NUMEL).astype(np.float32) for _ in range(size)]


def test_honest_results_are_applied_and_a_lying_reducer_is_refused():
    own, *others = parts(4)
    honest = np.mean([own, *others], axis=0)
    state, stats = check(4, own, honest)
    assert state.averaged.all() and not stats.parts_rejected
    np.testing.assert_array_equal(state.result, honest.astype(np.float32))

    state, stats = check(4, own, honest, liar=3)
    liars = [i for i in range(len(state.bounds)) if owner_of(i, 4) == 3]
    assert not state.averaged[liars].any() and state.averaged.sum() == len(state.bounds) - len(liars)
    assert stats.parts_rejected == {"bad_result": len(liars)}
    for i in liars:  # the refused slice keeps our own values
        np.testing.assert_array_equal(state.result[slice(*state.bounds[i])], own[slice(*state.bounds[i])])


def test_a_resync_where_copies_differ_in_one_slice_only_applies_it():
    """Parameters agree everywhere but in one reducer's slice: the slices equal to our copy say
    nothing about how far an honest result may be (they used to drag the reference to zero)."""
    delta, *_ = parts(3)
    params = np.linspace(-1, 1, NUMEL, dtype=np.float32)
    momentum = np.zeros(NUMEL, dtype=np.float32)
    own = np.concatenate([delta, params, momentum])
    honest = own.copy()
    honest[:NUMEL] = np.mean(parts(3), axis=0)
    member, state, _ = view(3, own, [NUMEL] * 3)
    diverged = next(i for i, (lo, _) in enumerate(state.bounds) if lo >= NUMEL and owner_of(i, 3) == 2)
    honest[slice(*state.bounds[diverged])] += 0.01  # the majority's copy differs from ours there
    state, stats = check(3, own, honest, regions=[NUMEL] * 3)
    assert state.averaged.all(), stats.parts_rejected
    np.testing.assert_array_equal(state.result, honest.astype(np.float32))


def test_a_group_of_two_applies_its_partners_result():
    """Two members: the result is the mean of two parts, far from ours wherever ours is small; with
    no third opinion there is nothing to check it against, and refusing it splits the copies."""
    own, other = parts(2)
    own[NUMEL // 2 :] *= 0.01  # our pseudo-gradient is tiny in the partner's slice (the second)
    honest = (own + other) / 2
    state, stats = check(2, own, honest)
    assert state.averaged.all() and not stats.parts_rejected
    np.testing.assert_array_equal(state.result, honest.astype(np.float32))


def test_a_resync_with_no_majority_state_applies_honest_copies_and_refuses_a_liar():
    """Every member's copy differs somewhere, so no state hash can be verified: results within a
    few times our copy's norm are applied (however unlike the other slices' distances), a reducer
    that returns its parameters x-10 is not."""
    delta, *_ = parts(4)
    params = np.linspace(-1, 1, NUMEL, dtype=np.float32)
    own = np.concatenate([delta, params, params * 0.1])
    honest = own.copy()
    honest[:NUMEL] = np.mean(parts(4), axis=0)
    _, state, _ = view(4, own, [NUMEL] * 3)
    noise = np.random.default_rng(3)
    for i, scale in ((4, 0.001), (5, 0.2), (9, 0.001), (10, 0.02)):  # parameters, then momentum
        lo, hi = state.bounds[i]
        honest[lo:hi] += noise.normal(0, scale, hi - lo).astype(np.float32)
    state, stats = check(4, own, honest, regions=[NUMEL] * 3)
    assert state.averaged.all(), stats.parts_rejected

    state, stats = check(4, own, honest, regions=[NUMEL] * 3, liar=2)
    liars = [i for i in range(len(state.bounds)) if owner_of(i, 4) == 2]
    assert not state.averaged[liars].any() and stats.parts_rejected == {"bad_result": len(liars)}
