"""What peers sent for an all-reduce: parts and results by slice, and the senders excluded per round.

Each run owns the inbox of its own round (node/averaging/run.py). Messages that arrive before their
round started wait in the Averager's inbox of early mail, and move into the run's when it starts
(``take``). A waiter is woken by an arrival for its own slice, or an exclusion from its own (module,
round): never by the other slices' traffic.
"""

from __future__ import annotations

import asyncio
import time
from typing import Dict, Set, Tuple

import numpy as np

from node.net import Clock

SliceKey = Tuple[str, int, str, int, int]  # module, round, group_id, slice index, attempt
RoundKey = Tuple[str, int]  # module, round
Delivered = Dict[str, Tuple[float, np.ndarray]]  # slot -> (weight, values)


class Inbox:
    """Parts and results that arrived, keyed by slice, and senders excluded per (module, round) with why."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        """``clock``: monotonic seconds, the clock of the event loop the waits run on."""
        self.items: Dict[SliceKey, Delivered] = {}
        self.excluded: Dict[RoundKey, Dict[str, str]] = {}  # peer -> the first reason it was excluded for
        self.born: Dict[object, float] = {}
        self._clock = clock
        self._waiting: Dict[SliceKey, asyncio.Event] = {}  # set (and dropped) when its slice changes
        self.wakeups = 0  # times a waiter woke to look again: at most its slice's arrivals and exclusions

    def _wake(self, key: SliceKey) -> None:
        event = self._waiting.pop(key, None)
        if event is not None:
            event.set()

    def put(self, key: SliceKey, slot: str, weight: float, values: np.ndarray) -> None:
        self.items.setdefault(key, {})[slot] = (weight, values)
        self.born.setdefault(key, self._clock())
        self._wake(key)

    def exclude(self, module: str, round_number: int, peer: str, reason: str = "excluded") -> None:
        """Stop waiting for ``peer`` in (module, round); the first reason given is the one kept."""
        self.excluded.setdefault((module, round_number), {}).setdefault(peer, reason)
        self.born.setdefault((module, round_number), self._clock())
        for key in [k for k in self._waiting if k[:2] == (module, round_number)]:
            self._wake(key)

    def is_excluded(self, module: str, round_number: int, peer: str) -> bool:
        return peer in self.excluded.get((module, round_number), ())

    def pop(self, key: SliceKey) -> None:
        self.born.pop(key, None)
        self.items.pop(key, None)
        self._waiting.pop(key, None)

    def expire(self, older_than_seconds: float) -> None:
        limit = self._clock() - older_than_seconds
        for key in [k for k, born in self.born.items() if born < limit]:
            self.born.pop(key, None)
            self.items.pop(key, None)  # type: ignore[call-overload]
            self.excluded.pop(key, None)  # type: ignore[call-overload]

    def take(self, module: str, round_number: int) -> "Inbox":
        """A new inbox holding what arrived for (module, round) so far, moved out of this one."""
        taken = Inbox(self._clock)
        for key in [k for k in self.items if k[:2] == (module, round_number)]:
            taken.items[key] = self.items.pop(key)
            taken.born[key] = self.born.pop(key, self._clock())
        excluded = self.excluded.pop((module, round_number), None)
        if excluded is not None:
            taken.excluded[(module, round_number)] = excluded
            taken.born[(module, round_number)] = self.born.pop((module, round_number), self._clock())
        return taken

    async def wait_for(
        self, key: SliceKey, peers: Set[str], deadline: float, prefix: str = ""
    ) -> Tuple[Dict[str, Tuple[float, np.ndarray]], bool]:
        """Wait until each peer delivered ``key`` (slot ``prefix + peer``) or was excluded, or the deadline
        (on this inbox's clock).

        Returns what was delivered, keyed by peer, and whether every peer delivered."""
        module, round_number = key[0], key[1]
        while True:
            got = self.items.get(key, {})
            pending = {
                p for p in peers if prefix + p not in got and not self.is_excluded(module, round_number, p)
            }
            remaining = deadline - self._clock()
            if not pending or remaining <= 0:
                break
            changed = self._waiting.setdefault(key, asyncio.Event())
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except asyncio.TimeoutError:
                break
            self.wakeups += 1
        got = self.items.get(key, {})
        delivered = {p: got[prefix + p] for p in peers if prefix + p in got}
        return delivered, not pending and len(delivered) == len(peers)
