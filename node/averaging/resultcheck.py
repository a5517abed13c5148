"""The check a member applies to the results reducers send back, before any of it is applied.

Each reduced slice is compared with the member's own part, region by region (pseudo-gradient,
and on a re-sync parameters and momentum): the relative distance must stay within
``tolerance`` times a reference the reducer cannot move (the largest distance on the
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
the state most of the group holds (the run's ``verify``, from node/runtime/rounds.py): with
CenteredClip, a group where most members hold one state gets exactly that state back. Otherwise
they are refused. With no majority state (every member's copy differs) there is nothing to verify
against: there a result is refused only if it is farther from our copy than ``tolerance`` times
our copy's norm.

``check_results`` is a pure function of arrays; node/averaging/run.py applies its verdicts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np

from node.averaging.robust import lower_median, region_spans, relative_distance

logger = logging.getLogger("node.averaging")

MIN_CHECK_ELEMENTS = 16
RELATIVE_FLOOR = 1e-6  # float32 rounding of a mean: below this two values are the same
# A re-sync's parameters and momentum with no majority state to verify against: how far apart honest
# copies are depends on where each member missed rounds, not on the other slices, so a result may move
# our copy by up to ``tolerance`` x its own norm there (a sign flip x10 lands at 11).
UNVERIFIED_STATE_FLOOR = 1.0


@dataclass(frozen=True)
class Verdicts:
    """What to do with each result of one attempt, by slice index."""

    accepted: Tuple[int, ...] = ()  # apply now
    held: Tuple[int, ...] = ()  # a re-sync's state far from our copy: apply if the whole verifies
    refused: Dict[int, Tuple[float, float]] = field(default_factory=dict)  # slice -> (distance, limit)
    wrong_size: Tuple[int, ...] = ()  # not the slice's length in our layout


def check_results(
    results: Mapping[int, np.ndarray],
    own: np.ndarray,
    bounds: Sequence[Tuple[int, int]],
    regions: Sequence[int],
    *,
    group_size: int,
    reduced: Mapping[int, np.ndarray],
    tolerance: float,
    verifiable: bool,
) -> Verdicts:
    """Judge the reducers' ``results`` (slice -> values) against ``own`` (our vector as receivers decode it).

    ``reduced``: the slices this member reduced itself with at least one other part, and their values
    (the reference the other reducers cannot move). ``verifiable``: a re-sync with a majority state to
    verify held-back results against."""
    right = {i: v for i, v in results.items() if v.size == bounds[i][1] - bounds[i][0]}
    wrong_size = tuple(sorted(set(results) - set(right)))
    if group_size < 3:  # no third opinion: see the module docstring
        return Verdicts(accepted=tuple(sorted(right)), wrong_size=wrong_size)
    checked = {i: v for i, v in right.items() if i not in reduced}
    ratios: Dict[int, List[Tuple[int, float]]] = {}  # region -> [(slice, ratio)]
    for i, values in [*sorted(reduced.items()), *sorted(checked.items())]:
        lo, hi = bounds[i]
        for region, a, b in region_spans(lo, hi, regions):
            if b - a >= MIN_CHECK_ELEMENTS:
                ratios.setdefault(region, []).append((i, relative_distance(values[a - lo : b - lo], own[a:b])))
    limits = {}
    for region, entries in ratios.items():
        mine = [r for i, r in entries if i in reduced]
        moved = [r for _, r in entries if r > RELATIVE_FLOOR]  # see the module docstring
        reference = max(mine + [lower_median(moved)])
        floor = UNVERIFIED_STATE_FLOOR if region > 0 and not verifiable else RELATIVE_FLOOR
        limits[region] = tolerance * max(reference, floor)
    if logger.isEnabledFor(logging.DEBUG):  # for tuning
        for region, entries in ratios.items():
            worst = max(((r / limits[region], i) for i, r in entries if i in checked), default=None)
            if worst is not None:
                logger.debug("region %d: results checked, the farthest at %.2f of its limit (slice %d)", region, *worst)
    accepted, held, refused = [], [], {}
    for i in sorted(checked):
        bad = [(region, r) for region, entries in ratios.items() for j, r in entries if j == i and r > limits[region]]
        if bad and verifiable and all(region > 0 for region, _ in bad):
            held.append(i)
        elif bad:
            refused[i] = (bad[0][1], limits[bad[0][0]])
        else:
            accepted.append(i)
    return Verdicts(tuple(accepted), tuple(held), refused, wrong_size)
