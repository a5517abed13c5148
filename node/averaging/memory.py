"""What outlives one all-reduce: one small ModuleMemory per module, and the node's averaging counters.

A run (node/averaging/run.py) is created for one group and round and dropped when it ends. What the
next run of the same module needs is kept here, and nothing else:

- the learned deadlines (node/averaging/deadlines.py),
- the error-feedback residual (int8 and sparse): what the last rounds did not send of our pseudo-gradient,
  and what it was before the last round (a round that averaged nothing is taken back: ``take_back``),
- the message size to ask for in the next group (node/averaging/matchmaking.py), from the last full round,
- the last round finished, so that a late message is told apart from an early one,
- senders whose part for a finished round came after we finished it; they are judged when the next
  round starts: a member that posted ready for that round before sending such a part lied about its round.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import numpy as np

from node.averaging.deadlines import Deadlines


@dataclass
class ModuleMemory:
    """One module's averaging state between runs; mutated on the swarm loop only."""

    deadlines: Deadlines
    finished_round: int = -1
    residual: Optional[np.ndarray] = None  # error feedback, the size of the module's vector
    residual_before: Optional[np.ndarray] = None  # the residual before the last round
    message_ask: Optional[int] = None  # bytes per message to ask for; None before a full round
    stale_parts: Dict[str, float] = field(default_factory=dict)  # sender -> when (swarm clock) its late part came

    def finished(self, round_number: int) -> None:
        self.finished_round = max(self.finished_round, round_number)

    def take_back(self) -> None:
        """The last round was not applied (it averaged nothing, so the node does not step: its pseudo-gradient
        stays in its parameters and goes into the next round's): what it owed before that round is owed again."""
        self.residual = self.residual_before


@dataclass
class AveragingStats:
    """Counters the metrics layer reads; owned by the Averager, mutated on its loop only."""

    parts_rejected: Dict[str, int] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0

    def reject(self, reason: str, count: int = 1) -> None:
        if count > 0:
            self.parts_rejected[reason] = self.parts_rejected.get(reason, 0) + count
