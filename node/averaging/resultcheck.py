"""The check a member applies to the results reducers send back, before any of it is applied.

Each reduced slice is compared with the member's own part, region by region (pseudo-gradient,
and on a re-sync parameters and momentum): the relative distance must stay within
``result_tolerance`` times a reference the reducer cannot move (the largest distance on the
slices this member reduced itself, or the lower median over the round's slices where the result
differs from our part at all; robust.py). Slices where every member sent the same values (bytes
no peer's data touches, or a re-sync's parameters where the copies agree) come back equal to our
part: counted in the median they would drag the reference to zero and every honest difference
elsewhere would fail.

The check needs a third opinion: in a group of two the result is the mean of the reducer's part
and ours (robust.py), and a partner that wants to poison it can do so through its part as well,
so a group of two applies what it gets. Refusing there only made the two copies differ where the
partner had applied its result: the next re-sync refused the same slice again, round after round.

On a re-sync the parameter and momentum regions are not alike from slice to slice: after a
partial round a member's copy differs from the others' only where that round failed. A result
there is far from our copy for an honest reason, so instead of refusing it the member holds it
back, and applies all held-back results together if the whole re-synced state then hashes to
the state most of the group holds (``verify``, from node/rounds.py): with CenteredClip, a group
where most members hold one state gets exactly that state back. Otherwise they are refused. With
no majority state (every member's copy differs) there is nothing to verify against: there a result
is refused only if it is farther from our copy than ``result_tolerance`` times our copy's norm.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Dict, List, Tuple

import numpy as np

from node.averaging.robust import lower_median, region_spans, relative_distance
from node.averaging.slices import owner_of

if TYPE_CHECKING:
    from node.averaging.averager import AveragingStats, _Round
    from protocol.manifest import AveragingSpec

logger = logging.getLogger("node.averaging")

MIN_CHECK_ELEMENTS = 16
RELATIVE_FLOOR = 1e-6  # float32 rounding of a mean: below this two values are the same
# A re-sync's parameters and momentum with no majority state to verify against: how far apart honest
# copies are depends on where each member missed rounds, not on the other slices, so a result may move
# our copy by up to ``result_tolerance`` x its own norm there (a sign flip x10 lands at 11).
UNVERIFIED_STATE_FLOOR = 1.0


class ResultCheck:
    """Mixed into the Averager: judges the results of one attempt of an all-reduce."""

    stats: "AveragingStats"
    _spec: "AveragingSpec"

    def _accept_checked(
        self, state: _Round, results: Dict[int, Tuple[float, np.ndarray]], reducer_of, peer_id: str
    ) -> None:
        """Apply each result that passes the check against our own part, ``peer_id``'s (see node/robust.py)."""
        size = len(state.group.members)
        if size < 3:
            results = self._right_sized(state, results)
            for i, (weight, values) in results.items():
                self._apply(state, i, weight, values, reducer_of[i])
            return
        me = state.group.index_of(peer_id)
        mine = {i for i in range(len(state.bounds)) if owner_of(i, size) == me and state.averaged[i]}
        ratios: Dict[int, List[Tuple[int, float]]] = {}  # region -> [(slice, ratio)]
        checked = self._right_sized(state, {i: r for i, r in results.items() if i not in mine})
        for i in [*sorted(mine), *sorted(checked)]:
            lo, hi = state.bounds[i]
            values = state.result[lo:hi] if i in mine else checked[i][1]
            for region, a, b in region_spans(lo, hi, state.regions):
                if b - a >= MIN_CHECK_ELEMENTS:
                    distance = relative_distance(values[a - lo : b - lo], state.sent[a:b])
                    ratios.setdefault(region, []).append((i, distance))
        limits = {}
        for region, entries in ratios.items():
            own = [r for i, r in entries if i in mine]
            moved = [r for _, r in entries if r > RELATIVE_FLOOR]  # see the module docstring
            reference = max(own + [lower_median(moved)])
            floor = UNVERIFIED_STATE_FLOOR if region > 0 and state.verify is None else RELATIVE_FLOOR
            limits[region] = self._spec.result_tolerance * max(reference, floor)
        for region, entries in ratios.items() if logger.isEnabledFor(logging.DEBUG) else ():  # for tuning
            worst = max(((r / limits[region], i) for i, r in entries if i in checked), default=None)
            if worst is not None:
                logger.debug("%s round %d region %d: results checked, the farthest at %.2f of its limit (slice %d)",
                             state.group.module, state.group.round, region, *worst)  # fmt: skip
        for i in sorted(checked):
            bad = [
                (region, r) for region, entries in ratios.items() for j, r in entries if j == i and r > limits[region]
            ]
            weight, values = checked[i]
            if bad and state.verify is not None and all(region > 0 for region, _ in bad):
                state.pending[i] = (weight, values, reducer_of[i])  # a re-sync's state: see _settle_pending
                continue
            if bad:
                self.stats.reject("bad_result")
                logger.warning(
                    "refused %s's result for slice %d of %s: %.3g from our part, limit %.3g",
                    reducer_of[i][-8:], i, state.group.module, bad[0][1], limits[bad[0][0]],
                )  # fmt: skip
                continue
            self._apply(state, i, weight, values, reducer_of[i])

    def _right_sized(
        self, state: _Round, results: Dict[int, Tuple[float, np.ndarray]]
    ) -> Dict[int, Tuple[float, np.ndarray]]:
        ok = {i: r for i, r in results.items() if r[1].size == state.bounds[i][1] - state.bounds[i][0]}
        self.stats.reject("wrong_size", len(results) - len(ok))
        return ok

    @staticmethod
    def _apply(state: _Round, index: int, weight: float, values: np.ndarray, reducer: str) -> None:
        state.result[slice(*state.bounds[index])] = values
        state.averaged[index] = weight > 1
        state.contributors.add(reducer)

    def _settle_pending(self, state: _Round) -> None:
        """Apply the held-back re-sync results if the vector with them passes ``verify``; else refuse them."""
        if not state.pending:
            return
        candidate = state.result.copy()
        for i, (_, values, _) in state.pending.items():
            candidate[slice(*state.bounds[i])] = values
        verified = bool(state.verify and state.verify(candidate))
        for i, (weight, values, reducer) in state.pending.items():
            if verified:
                self._apply(state, i, weight, values, reducer)
            else:
                self.stats.reject("bad_result")
        if not verified:
            logger.warning("refused %d re-sync result(s) for %s: far from our state, and the whole is not the "
                           "majority's state", len(state.pending), state.group.module)  # fmt: skip
        state.pending.clear()
