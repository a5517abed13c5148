"""How long one module's averaging waits for peers, learned from how long they took before.

For each phase (``parts``: until every member's part arrived; ``results``: until every reducer's
result arrived) the module remembers the last few complete waits and how many bytes the round
moved. The next wait is ``multiplier`` times the slowest of those per byte, times this round's
bytes (a re-sync moves three times a normal round's, uncompressed), plus a margin for clock skew
between members starting the round, kept within ``[floor, cap]``: the cap is the manifest's
``part_timeout_seconds``, scaled up by how much larger this round is than the largest seen.
Before anything was observed, the cap applies. A crashed peer therefore costs a few clean-round
durations, not a hand-tuned constant. Each module has its own (node/averaging/memory.py): a big
trunk and a small expert take different times.

A wait that ran out while a member was still expected (not excluded: only slow) is remembered
too, as what it is, a lower bound: that phase took at least as long as we waited. Without it a
swarm whose rounds got slower (a loaded host, a re-sync) never learned longer deadlines, since
only the waits that completed taught anything, and it kept giving up on members that were
merely late (their parts and results then refused as ``round_over``).
"""

from __future__ import annotations

from collections import deque
from typing import Deque, Dict, Literal, Tuple

HISTORY = 8
MARGIN_SECONDS = 0.5
FLOOR_SECONDS = 1.0
Phase = Literal["parts", "results"]


class Deadlines:
    """The learned waits of one module, per phase."""

    def __init__(self, cap: float, multiplier: float, floor: float = FLOOR_SECONDS) -> None:
        self.cap = cap
        self.multiplier = multiplier
        self.floor = min(floor, cap)
        self._seen: Dict[Phase, Deque[Tuple[float, int]]] = {}

    def observe(self, phase: Phase, seconds: float, nbytes: int = 1) -> None:
        """A wait that ended because everyone delivered, after ``seconds``, in a round of ``nbytes``."""
        self._seen.setdefault(phase, deque(maxlen=HISTORY)).append((max(0.0, seconds), max(1, nbytes)))

    def ran_out(self, phase: Phase, seconds: float, nbytes: int = 1) -> None:
        """A wait that ended at its deadline after ``seconds`` with a slow member still expected."""
        self.observe(phase, seconds, nbytes)

    def timeout(self, phase: Phase, nbytes: int = 1) -> float:
        """Seconds to wait in ``phase`` of a round that moves ``nbytes``."""
        seen = self._seen.get(phase)
        if not seen:
            return self.cap
        per_byte = max(seconds / size for seconds, size in seen)
        cap = self.cap * max(1.0, nbytes / max(size for _, size in seen))
        return min(cap, max(self.floor, self.multiplier * per_byte * max(1, nbytes) + MARGIN_SECONDS))
