"""How long to wait for peers, learned from how long they took before.

For each module and phase (``parts``: until every member's part arrived; ``results``:
until every reducer's result arrived) the node remembers the last few complete waits.
The next wait is ``multiplier`` times the slowest of those, plus a margin for clock skew
between members starting the round, kept within ``[floor, cap]`` where the cap is the
manifest's ``part_timeout_seconds``. Before anything was observed, the cap applies.
A crashed peer therefore costs a few clean-round durations, not a hand-tuned constant.
"""

from __future__ import annotations

from collections import deque
from typing import Deque, Dict, Tuple

HISTORY = 8
MARGIN_SECONDS = 0.5
FLOOR_SECONDS = 1.0


class Deadlines:
    def __init__(self, cap: float, multiplier: float, floor: float = FLOOR_SECONDS) -> None:
        self.cap = cap
        self.multiplier = multiplier
        self.floor = min(floor, cap)
        self._seen: Dict[Tuple[str, str], Deque[float]] = {}

    def observe(self, module: str, phase: str, seconds: float) -> None:
        """A wait that ended because everyone delivered, after ``seconds``."""
        self._seen.setdefault((module, phase), deque(maxlen=HISTORY)).append(max(0.0, seconds))

    def timeout(self, module: str, phase: str) -> float:
        seen = self._seen.get((module, phase))
        if not seen:
            return self.cap
        return min(self.cap, max(self.floor, self.multiplier * max(seen) + MARGIN_SECONDS))
