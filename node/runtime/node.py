"""A node's life: ``open()`` joins and returns the joined node, ``run()`` trains, ``close()`` leaves.

Threads: the caller's thread runs the training loop (torch; node/runtime/loop.py); the swarm's loop
thread runs every network coroutine (announcements, matchmaking, all-reduce, handlers). The training
thread hands a round's averaging to the loop and waits on it, checking for a stop request so Ctrl+C
abandons a round within a second or two.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Dict, List, Optional, TextIO, Tuple

from prometheus_client import CollectorRegistry

from node import __version__
from node.net import Admission, HivemindSwarm, check_identity_file, peer_id_of
from node.ops import CheckpointStore, Health, NodeMetrics
from node.runtime.config import NodeConfig
from node.runtime.context import NodeContext
from node.runtime.joined import Joined
from node.runtime.loop import RoundLoop
from node.runtime.report import ModuleOutcome, RoundSummary
from node.swarm import RECORD_TTL_SECONDS, StateServer, Verdict, admission_for, check_admitted, listen_ports, probe
from node.training import ModelFactory, TextData, resolve_device
from protocol.manifest import Manifest, load_manifest

logger = logging.getLogger("node")


class Node:
    """One node: created with its config, joined by ``open()``, trained by ``run()``, left by ``close()``."""

    state_server_class = StateServer  # tests run donors with modified code by swapping this
    swarm_class = HivemindSwarm  # and record what a node sends by swapping this (tests/swarm/capturing_peer.py)

    def __init__(
        self,
        config: NodeConfig,
        manifest: Optional[Manifest] = None,
        registry: Optional[CollectorRegistry] = None,
        model_factory: Optional[ModelFactory] = None,
    ) -> None:
        manifest = manifest or load_manifest(config.manifest)
        metrics = NodeMetrics(registry, version=__version__, protocol_version=manifest.protocol_version)
        health = Health(stall_seconds=config.stall_seconds)
        self.context = NodeContext(config, manifest, metrics, health, self.after_round)
        self.model_factory = model_factory
        self.joined: Optional[Joined] = None  # set by open(), for as long as the node is in its swarm
        self._loop: Optional[RoundLoop] = None
        self._announced = False

    @property
    def config(self) -> NodeConfig:
        return self.context.config

    @property
    def manifest(self) -> Manifest:
        return self.context.manifest

    @property
    def history(self) -> List[RoundSummary]:
        """One summary per finished round (node/runtime/report.py)."""
        return self.context.history

    def stop(self) -> None:
        """Ask the training loop to finish or abandon its round and return (thread-safe, signal-safe)."""
        self.context.stop_requested.set()

    @property
    def stopping(self) -> bool:
        return self.context.stop_requested.is_set()

    # --- joining -----------------------------------------------------------------
    def open(self) -> Joined:
        """Validate local inputs first (cheap), then start networking and join; raise CommonsError subclasses."""
        config, manifest = self.config, self.manifest
        # Each node samples its data in its own order: two volunteers on the default corpus
        # should not compute the same batches.
        data_seed = int.from_bytes(os.urandom(4), "little")
        data = TextData(config.data, manifest.model.seq_len, seed=data_seed, field=config.data_field)
        device = resolve_device(config.device)
        identity = config.identity_file()
        checkpoints: Optional[CheckpointStore] = None
        if config.checkpoint_dir:
            checkpoints = CheckpointStore(config.checkpoint_dir, keep=config.checkpoint_keep)
        logger.info("data: %s (sampling seed %d)", data.describe(), data_seed)
        if identity:  # a bad key file is the user's to fix (exit 2), not a daemon that failed to start
            check_identity_file(identity)
        # Members-only: this node's own invite, checked offline before anything starts (exit 7).
        admission = admission_for(manifest, manifest.swarm_id, identity, config.invite)
        # The DHT process is forked here, before torch builds the model and starts its
        # thread pools: forking a process with live OpenMP threads is not safe.
        swarm, verdict = self._open_swarm(identity, admission)
        try:
            joined = Joined.join(
                self.context, swarm, data, device, checkpoints, self.model_factory, self.state_server_class,
                reachability=verdict,
            )
        except BaseException:
            swarm.close()
            raise
        self.joined, self._loop = joined, RoundLoop(self.context, joined)
        return joined

    def _open_swarm(self, identity: Optional[str], admission: Optional[Admission]) -> Tuple[HivemindSwarm, Verdict]:
        """Start the DHT and join; then find out whether others can dial us (node/swarm/reachability.py). A node
        found private starts its DHT again as a client (it serves no DHT requests: nobody could deliver them),
        before anyone has seen it in a group."""
        config = self.config
        forced = config.reachability != "auto"

        # The longest a record of ours lives (a ready record: a round's timeout), with a minute for clock skew:
        # peers refuse records that claim to live longer (node/net/hivemind.py, SignedRecords).
        longest = max(RECORD_TTL_SECONDS, self.manifest.averaging.round_timeout_seconds) + 60.0

        def open_swarm(client_mode: bool) -> HivemindSwarm:
            swarm = self.swarm_class.open(
                initial_peers=config.initial_peers, host_maddrs=config.host_maddrs,
                announce_maddrs=config.announce_maddrs, identity_path=identity,
                startup_timeout=config.bootstrap_timeout_seconds, client_mode=client_mode,
                max_record_seconds=longest, admission=admission,
            )  # fmt: skip
            if admission is not None and config.initial_peers:  # an outsider learns why at once (exit 7)
                try:
                    swarm.run(check_admitted(swarm, config.initial_peers, config.bootstrap_timeout_seconds))
                except BaseException:
                    swarm.close()
                    raise
            return swarm

        if forced:
            return open_swarm(config.reachability == "private"), Verdict(config.reachability, forced=True)  # type: ignore[arg-type]
        swarm = open_swarm(False)
        try:
            ports = listen_ports(list(config.announce_maddrs) or swarm.visible_maddrs())
            peers = [peer_id_of(maddr) for maddr in config.initial_peers]
            verdict = swarm.run(probe(swarm, peers, ports, timeout=config.bootstrap_timeout_seconds))
        except BaseException:
            swarm.close()
            raise
        logger.info("reachability: %s", verdict.describe(), extra={"event": "reachability",
                                                                    "reachability": verdict.reachability})
        if verdict.reachability == "private":
            swarm.close()
            swarm = open_swarm(True)
        return swarm, verdict

    def ready_event(self) -> Dict[str, Any]:
        """The JSON ready line's fields (peer id, addresses, swarm id, how to join...)."""
        return self._require_joined().ready_event()

    def announce_ready(self, out: Optional[TextIO] = None) -> Dict[str, Any]:
        """Print the JSON ready line (once) and start answering /readyz."""
        joined = self._require_joined()
        if self._announced:
            return joined.ready_event()
        self._announced = True
        context = self.context  # healthy and ready before the line is out: whoever reads it may ask at once
        context.progress()
        context.health.joined = True
        context.metrics.swarm_peers.set(len(joined.membership.view.peers))
        return joined.announce_ready(out)

    # --- training ----------------------------------------------------------------
    def run(
        self,
        out: Optional[TextIO] = None,
        *,
        max_rounds: Optional[int] = None,
        max_steps: Optional[int] = None,
        on_step: Optional[Callable[[float], None]] = None,
    ) -> None:
        """Announce readiness, then train rounds until a limit (these arguments, else the config's) or a stop;
        ``on_step(loss)`` is called after every local step."""
        self.announce_ready(out)
        assert self._loop is not None  # set with joined
        self._loop.run(max_rounds=max_rounds, max_steps=max_steps, on_step=on_step)
        if self.context.fatal is not None:  # the node stopped itself: its invite expired or was revoked
            raise self.context.fatal

    def after_round(self, round_number: int, outcomes: List[ModuleOutcome], steps: int) -> None:
        """Called after each finished round; a test harness overrides it to record what the round did."""

    # --- leaving -----------------------------------------------------------------
    def close(self) -> None:
        """Leave the swarm and stop every helper process; safe to call twice."""
        self.context.health.leaving = True
        joined, self.joined, self._loop = self.joined, None, None
        if joined is not None:
            joined.leave()

    def _require_joined(self) -> Joined:
        if self.joined is None:
            raise RuntimeError("the node has not joined its swarm (call open() first)")
        return self.joined

