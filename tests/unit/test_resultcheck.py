"""The check a member applies to reducers' results (node/averaging/resultcheck.py), a pure function.

Each test builds one member's view of an all-reduce (its own parts, the results that came back) and
asks the production check which results it applies; applying the verdicts as a run does, the test
then looks at the vector the member ends with."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np

from node.averaging.resultcheck import Verdicts, check_results
from node.averaging.slices import owner_of, region_bounds

NUMEL = 3000


class Member:
    """Member 0's vector after a round: its own slices reduced, the others as the verdicts say."""

    def __init__(self, own: np.ndarray, bounds: List[Tuple[int, int]]) -> None:
        self.bounds = bounds
        self.result = own.astype(np.float32).copy()
        self.averaged = np.zeros(len(bounds), dtype=bool)
        self.rejected: Dict[str, int] = {}

    def apply(self, verdicts: Verdicts, results: Dict[int, np.ndarray], verified: bool = False) -> None:
        for i in [*verdicts.accepted, *(verdicts.held if verified else ())]:
            self.result[slice(*self.bounds[i])] = results[i]
            self.averaged[i] = True
        refused = len(verdicts.refused) + (0 if verified else len(verdicts.held))
        if refused:
            self.rejected["bad_result"] = refused


def check(
    size: int, own: np.ndarray, honest: np.ndarray, regions: Optional[List[int]] = None, liar: Optional[int] = None,
    verifiable: bool = False,
) -> Tuple[Member, Verdicts]:  # fmt: skip
    """Member 0 reduces its own slices to ``honest``; every other reducer returns ``honest`` too,
    except ``liar``, which returns it times -10."""
    regions = regions or [own.size]
    bounds = region_bounds(regions, size, chunk_elements=1 << 18)
    member = Member(own, bounds)
    results, reduced = {}, {}
    for i, (lo, hi) in enumerate(bounds):
        if owner_of(i, range(size)) == 0:
            member.result[lo:hi] = honest[lo:hi]
            member.averaged[i] = True
            reduced[i] = member.result[lo:hi]
        else:
            values = honest[lo:hi] * (-10.0 if owner_of(i, range(size)) == liar else 1.0)
            results[i] = values.astype(np.float32)
    verdicts = check_results(
        results, own.astype(np.float32), bounds, regions, group_size=size, reduced=reduced, tolerance=3.0,
        verifiable=verifiable,
    )  # fmt: skip
    member.apply(verdicts, results)
    return member, verdicts


def parts(size: int, seed: int = 0) -> List[np.ndarray]:
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal(NUMEL).astype(np.float32)
    return [shared + 0.5 * rng.standard_normal(NUMEL).astype(np.float32) for _ in range(size)]


def test_honest_results_are_applied_and_a_lying_reducer_is_refused():
    own, *others = parts(4)
    honest = np.mean([own, *others], axis=0)
    state, _ = check(4, own, honest)
    assert state.averaged.all() and not state.rejected
    np.testing.assert_array_equal(state.result, honest.astype(np.float32))

    state, verdicts = check(4, own, honest, liar=3)
    liars = [i for i in range(len(state.bounds)) if owner_of(i, range(4)) == 3]
    assert sorted(verdicts.refused) == liars and not verdicts.held
    assert not state.averaged[liars].any() and state.averaged.sum() == len(state.bounds) - len(liars)
    assert state.rejected == {"bad_result": len(liars)}
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
    bounds = region_bounds([NUMEL] * 3, 3, chunk_elements=1 << 18)
    diverged = next(i for i, (lo, _) in enumerate(bounds) if lo >= NUMEL and owner_of(i, range(3)) == 2)
    honest[slice(*bounds[diverged])] += 0.01  # the majority's copy differs from ours there
    state, verdicts = check(3, own, honest, regions=[NUMEL] * 3)
    assert state.averaged.all(), state.rejected
    np.testing.assert_array_equal(state.result, honest.astype(np.float32))


def test_a_group_of_two_applies_its_partners_result():
    """Two members: the result is the mean of two parts, far from ours wherever ours is small; with
    no third opinion there is nothing to check it against, and refusing it splits the copies."""
    own, other = parts(2)
    own[NUMEL // 2 :] *= 0.01  # our pseudo-gradient is tiny in the partner's slice (the second)
    honest = (own + other) / 2
    state, _ = check(2, own, honest)
    assert state.averaged.all() and not state.rejected
    np.testing.assert_array_equal(state.result, honest.astype(np.float32))


def resync_of_four() -> Tuple[np.ndarray, np.ndarray, List[Tuple[int, int]]]:
    """A re-sync of four members: our [pseudo-gradient; parameters; momentum], the honest result (the mean
    pseudo-gradient, our state elsewhere, for the test to change), and the group's slice bounds."""
    delta, *_ = parts(4)
    params = np.linspace(-1, 1, NUMEL, dtype=np.float32)
    own = np.concatenate([delta, params, params * 0.1])
    honest = own.copy()
    honest[:NUMEL] = np.mean(parts(4), axis=0)
    return own, honest, region_bounds([NUMEL] * 3, 4, chunk_elements=1 << 18)


def test_a_resync_with_no_majority_state_applies_honest_copies_and_refuses_a_liar():
    """Every member's copy differs somewhere, so no state hash can be verified: results within a
    few times our copy's norm are applied (however unlike the other slices' distances), a reducer
    that returns its parameters x-10 is not."""
    own, honest, bounds = resync_of_four()
    noise = np.random.default_rng(3)
    for i, scale in ((4, 0.001), (5, 0.2), (9, 0.001), (10, 0.02)):  # parameters, then momentum
        lo, hi = bounds[i]
        honest[lo:hi] += noise.normal(0, scale, hi - lo).astype(np.float32)
    state, _ = check(4, own, honest, regions=[NUMEL] * 3)
    assert state.averaged.all(), state.rejected

    state, _ = check(4, own, honest, regions=[NUMEL] * 3, liar=2)
    liars = [i for i in range(len(state.bounds)) if owner_of(i, range(4)) == 2]
    assert not state.averaged[liars].any() and state.rejected == {"bad_result": len(liars)}


def test_with_a_majority_state_to_verify_a_resyncs_far_state_is_held_and_a_far_gradient_refused():
    """A re-sync whose state region moved far from our copy is held back for the state-hash check
    (the run applies it only if the whole verifies); the pseudo-gradient region is never held."""
    own, honest, bounds = resync_of_four()
    state_slices = [i for i, (lo, _) in enumerate(bounds) if lo >= NUMEL and owner_of(i, range(4)) != 0]
    noise = np.random.default_rng(5)
    for i in state_slices:  # the others' copies differ a little from ours everywhere...
        lo, hi = bounds[i]
        honest[lo:hi] += noise.normal(0, 0.001, hi - lo).astype(np.float32)
    far_state = state_slices[0]
    honest[slice(*bounds[far_state])] *= 40.0  # ...and a lot in one slice of the parameters
    state, verdicts = check(4, own, honest, regions=[NUMEL] * 3, verifiable=True)
    assert verdicts.held == (far_state,) and not verdicts.refused
    assert not state.averaged[far_state]  # held back, not applied on its own
    state.apply(Verdicts(held=verdicts.held), {far_state: honest[slice(*bounds[far_state])]}, verified=True)
    assert state.averaged.all()  # the whole verified: the held-back result is applied
    np.testing.assert_array_equal(state.result, honest.astype(np.float32))

    _, verdicts = check(4, own, honest, regions=[NUMEL] * 3, liar=2, verifiable=True)
    lying_gradient = [i for i, (lo, _) in enumerate(bounds) if owner_of(i, range(4)) == 2 and lo < NUMEL]
    assert set(lying_gradient) <= set(verdicts.refused)
