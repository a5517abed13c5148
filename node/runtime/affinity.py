"""This node's routing affinity, for placement ``follow_data``: the share of its own tokens the router sends
to each expert, per layer, with the swarm's current gates.

An expert's router gate belongs to that expert's module, so the gates of experts this node does not host
are stale in its model (their values from when it last hosted them, or the initial ones). Before each
measurement it fetches just those gates, the head of each module's state vector, from a few of their
hosts: one digest and one d_model-float range request per host asked, not the whole expert; hosted
experts' gates come from their global copies. A few batches of its own data then go through its
model once, without gradients (MoETransformer.routing_affinity).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Dict, List, Mapping, Optional, Sequence

import torch

from node.net import HivemindSwarm
from node.swarm import SwarmView, fetch_heads
from node.training import DataError, ModuleState, Trainer

logger = logging.getLogger("node")

GATE_DONORS = 3  # hosts asked per gate: a majority against one lying donor, and still a handful of requests


class AffinityMeter:
    """Measures one node's routing affinity; ``model_lock`` is held for the forward passes only."""

    def __init__(
        self, swarm: HivemindSwarm, swarm_id: str, trainer: Trainer, timeout: float, model_lock: threading.RLock
    ) -> None:
        self._swarm = swarm
        self._swarm_id = swarm_id
        self._trainer = trainer
        self._timeout = timeout  # per request to a host, as for state downloads
        self._lock = model_lock

    def measure(
        self, states: Mapping[str, ModuleState], view: SwarmView, experts: Sequence[str]
    ) -> Optional[Dict[str, float]]:
        """{expert: share of its layer's routings} now, given the hosted modules' ``states``; None when the
        model cannot route over every expert (a custom model without ``routing_affinity``) or no batch of
        own data is at hand. Blocks for the gate requests (a part timeout at most per host asked, hosts of
        one gate in turn) and one forward per batch."""
        model = self._trainer.model
        if not hasattr(model, "routing_affinity"):
            return None
        started = time.perf_counter()
        try:
            batches = self._trainer.own_batches()
        except DataError as e:
            logger.info("routing affinity not measured: %s", e)
            return None
        if not batches:
            return None
        elements = model.gate_elements()
        fetched = self._swarm_gates([e for e in experts if e not in states], view, elements)
        # Every gate as the swarm last averaged it: the live gate of a hosted expert also carries this node's
        # steps since, toward its own data, which would favour the experts it already hosts.
        gates = {m: states[m].global_flat[:elements] for m in experts if m in states} | fetched
        with self._lock:
            affinity: Dict[str, float] = model.routing_affinity(batches, gates)
        seconds = time.perf_counter() - started
        logger.debug("routing affinity measured on %d batch(es) with %d gate(s) from hosts in %.3fs", len(batches),
                     len(fetched), seconds, extra={"event": "affinity", "seconds": round(seconds, 3)})  # fmt: skip
        return affinity

    def _swarm_gates(self, experts: List[str], view: SwarmView, elements: int) -> Dict[str, torch.Tensor]:
        """The swarm's current gate (global copy) of each of these experts that someone else hosts.
        Experts nobody hosts, or whose hosts all fail, keep the model's own gate."""
        donors: Dict[str, List[str]] = {}
        for module in experts:
            hosts = view.donors_of(module, exclude=self._swarm.peer_id)
            if hosts:  # a random few, so that nodes measuring in the same round do not all ask one host
                donors[module] = random.sample(hosts, min(GATE_DONORS, len(hosts)))
        if not donors:
            return {}
        heads = fetch_heads(self._swarm, self._swarm_id, donors, elements, self._timeout, self._swarm.run)
        return {module: torch.from_numpy(values.copy()) for module, values in heads.items()}
