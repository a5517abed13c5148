"""The check a member applies to the results reducers send back, before any of it is applied.

Each reduced slice is compared with the member's own part, region by region (pseudo-gradient,
and on a re-sync parameters and momentum): the relative distance must stay within
``result_tolerance`` times a reference the reducer cannot move (the largest distance on the
slices this member reduced itself, or the lower median over the round's slices; robust.py).

On a re-sync the parameter and momentum regions are not alike from slice to slice: after a
partial round a member's copy differs from the others' only where that round failed. A result
there is far from our copy for an honest reason, so instead of refusing it the member holds it
back, and applies all held-back results together if the whole re-synced state then hashes to
the state most of the group holds (``verify``, from node/rounds.py): with CenteredClip, a group
where most members hold one state gets exactly that state back. Otherwise they are refused.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Dict, List, Tuple

import numpy as np

from node.robust import lower_median, region_spans, relative_distance
from node.slices import owner_of

if TYPE_CHECKING:
    from node.averaging import AveragingStats, _Round
    from protocol.manifest import AveragingSpec

logger = logging.getLogger("node.averaging")

MIN_CHECK_ELEMENTS = 16
RELATIVE_FLOOR = 1e-6  # float32 rounding of a mean: below this two values are the same


class ResultCheck:
    """Mixed into the Averager: judges the results of one attempt of an all-reduce."""

    stats: "AveragingStats"
    _spec: "AveragingSpec"

    def _accept_checked(
        self, state: _Round, results: Dict[int, Tuple[float, np.ndarray]], reducer_of, peer_id: str
    ) -> None:
        """Apply each result that passes the check against our own part, ``peer_id``'s (see node/robust.py)."""
        size = len(state.group.members)
        me = state.group.index_of(peer_id)
        mine = {i for i in range(len(state.bounds)) if owner_of(i, size) == me and state.averaged[i]}
        ratios: Dict[int, List[Tuple[int, float]]] = {}  # region -> [(slice, ratio)]
        checked = {i: r for i, r in results.items() if i not in mine}
        sizes_ok = {i for i, (_, v) in checked.items() if v.size == state.bounds[i][1] - state.bounds[i][0]}
        self.stats.reject("wrong_size", len(set(checked) - sizes_ok))
        for i in [*sorted(mine), *sorted(sizes_ok)]:
            lo, hi = state.bounds[i]
            values = state.result[lo:hi] if i in mine else checked[i][1]
            for region, a, b in region_spans(lo, hi, state.regions):
                if b - a >= MIN_CHECK_ELEMENTS:
                    distance = relative_distance(values[a - lo : b - lo], state.sent[a:b])
                    ratios.setdefault(region, []).append((i, distance))
        limits = {}
        for region, entries in ratios.items():
            own = [r for i, r in entries if i in mine]
            reference = max(own + [lower_median([r for _, r in entries])])
            limits[region] = self._spec.result_tolerance * max(reference, RELATIVE_FLOOR)
        for i in sorted(sizes_ok):
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
            lo, hi = state.bounds[i]
            state.result[lo:hi] = values
            state.averaged[i] = weight > 1
            state.contributors.add(reducer_of[i])

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
                state.result[slice(*state.bounds[i])] = values
                state.averaged[i] = weight > 1
                state.contributors.add(reducer)
            else:
                self.stats.reject("bad_result")
        if not verified:
            logger.warning("refused %d re-sync result(s) for %s: far from our state, and the whole is not the "
                           "majority's state", len(state.pending), state.group.module)  # fmt: skip
        state.pending.clear()
