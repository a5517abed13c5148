"""What a node has from the moment it is created, before and after it joins: its config and manifest,
its metrics and health, the stop flag, and the history of its rounds."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, List, Optional

from node.errors import CommonsError
from node.ops import Health, NodeMetrics
from node.runtime.config import NodeConfig
from node.runtime.report import ModuleOutcome, RoundSummary
from node.training import DataError
from protocol.manifest import Manifest

logger = logging.getLogger("node")

# Called after each finished round with (round number, module outcomes, local steps); a test harness
# records what the round did through it.
RoundHook = Callable[[int, List[ModuleOutcome], int], None]


@dataclass
class NodeContext:
    """Shared by the node, its joined state and its round loop; written by the training thread."""

    config: NodeConfig
    manifest: Manifest
    metrics: NodeMetrics
    health: Health
    after_round: RoundHook
    stop_requested: threading.Event = field(default_factory=threading.Event)
    history: List[RoundSummary] = field(default_factory=list)  # one summary per finished round
    # Why the node stopped on its own as a user error (its invite expired or was revoked): raised once it has left.
    fatal: Optional[CommonsError] = None

    def progress(self) -> None:
        """A training step or an averaging round finished: /healthz and the metrics see it."""
        self.health.progress()
        self.metrics.last_progress.set_to_current_time()

    def report_data_error(self, error: DataError) -> None:
        if self.health.data_error is None:
            logger.error("data source unavailable: %s; training paused until it is back", error)
        self.health.data_error = str(error)
