"""A node that has joined its swarm: everything that exists only once joined, in one object.

``Joined.join`` builds it in order (the trainer; the checkpoint to resume from; the handlers peers
call; the bootstrap check; the first announcement; the experts to host; the state download of a
newcomer; the HTTP endpoints) and returns it only when all of that worked, so nothing that uses it
asks whether a part of it exists yet.

- ``Progress``  the outer round, rounds done and the latest held-out score: what peers and the operator read
- ``Hosting``   the modules this node holds (the trunk and its experts) and their DiLoCo state
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import random
import shlex
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, TextIO, Tuple, Type

import torch
from prometheus_client import CollectorRegistry

from node import __version__
from node.averaging import Averager, Matchmaker, largest_message_bytes
from node.errors import NotAMember
from node.net import HivemindSwarm, peer_id_of, read_identity, verify
from node.ops import (
    AveragerCollector,
    CheckpointStore,
    Endpoints,
    HelperProcessCollector,
    RecordsRefusedCollector,
    RequestsRefusedCollector,
    Snapshot,
    SwarmViewCollector,
    open_endpoints,
    write_generation,
)
from node.runtime.affinity import AffinityMeter
from node.runtime.context import NodeContext
from node.runtime.rounds import RoundAverager
from node.runtime.status_page import outcome_counts, page_status
from node.swarm import (
    LOG_NAME,
    RANGE_ELEMENTS,
    DialBackServer,
    Greeter,
    Ledger,
    Membership,
    Revocations,
    StateServer,
    Swap,
    SwapNotice,
    SwarmView,
    Verdict,
    check_bootstrap_peers,
    choose_experts,
    download_modules,
    exact_fetcher,
    follow_swap,
    listen_ports,
    probe,
    rebalance,
    replica_counts,
)
from node.training import (
    ModelFactory,
    ModuleState,
    TextData,
    Trainer,
    architecture_swarm_id,
    capture_modules,
    check_fits,
    restore_modules,
)
from protocol.frames import MAX_HEADER_BYTES, MESSAGE_PREFIX_BYTES
from protocol.manifest import OuterOptimizerSpec
from protocol.records import PeerRecord

logger = logging.getLogger("node")
RECHECK_SECONDS = 300.0  # how often a node not known public asks again whether others can dial it


@dataclass
class Progress:
    """Where this node is in the swarm's rounds; read by peers (its record), donors' digests and the API."""

    outer_round: int = 0
    rounds_done: int = 0
    last_eval_loss: Optional[float] = None  # the latest score, kept between scored rounds


class Hosting:
    """The modules this node holds: the trunk and ``hosted`` experts, each with its DiLoCo state."""

    def __init__(self, trainer: Trainer, outer: OuterOptimizerSpec) -> None:
        self._trainer = trainer
        self._outer = outer
        self.hosted: List[str] = []
        self.states: Dict[str, ModuleState] = {}

    @property
    def modules(self) -> List[str]:
        return ["trunk"] + self.hosted

    def host(self, experts: List[str]) -> None:
        """Set the hosted experts; keep the state of those that stay, start fresh state for new ones."""
        self.hosted = sorted(experts)
        model = self._trainer.model
        model.set_hosted_experts(self.hosted)
        self.states = {m: self.states.get(m) or ModuleState(m, model.module_parameters(m), self._outer)
                       for m in self.modules}  # fmt: skip


def frame_limit(chunk_elements: int, largest_module: int, compression: str = "none") -> int:
    """The largest stream frame an honest peer of this manifest sends, with its header: an averaging message
    (node/averaging/matchmaking.py) or a state range (node/swarm/statesync.py), float32 values. A hello's
    reply (every module's name) is under 100 KB whatever the model. Larger frames are refused unread."""
    payload = max(largest_message_bytes(chunk_elements, largest_module, compression), 4 * RANGE_ELEMENTS)
    return payload + MESSAGE_PREFIX_BYTES + MAX_HEADER_BYTES


def join_command(maddr: str, manifest: Optional[str] = None) -> str:
    """A command that joins this node's swarm, runnable as pasted from any directory: this interpreter by
    its absolute path with ``-m node`` (a bare ``node`` is Node.js on many machines, and a virtualenv's
    scripts are not on PATH unless it is activated), and this node's manifest file by its absolute path
    when it has one (without it the joiner would train the shipped manifest and be refused)."""
    command = [sys.executable, "-m", "node", "start", "--initial-peers", maddr]
    if manifest is not None:
        command += ["--manifest", os.path.abspath(manifest)]
    return shlex.join(command)


class Joined:
    """One joined node's handles: its swarm, trainer, services, endpoints and where it stands."""

    def __init__(
        self, context: NodeContext, swarm: HivemindSwarm, trainer: Trainer, checkpoints: Optional[CheckpointStore],
        data_seed: int, *, custom_model: bool, state_server_class: Type[StateServer], reachability: Verdict,
    ) -> None:  # fmt: skip
        manifest = context.manifest
        self.reachability = reachability
        self.context = context
        self.swarm = swarm
        self.peer_id = swarm.peer_id
        self.trainer = trainer
        self.device = trainer.device
        self.checkpoints = checkpoints
        self.data_seed = data_seed
        # A custom model changes the swarm id: every module's parameter shapes are part of it.
        self.swarm_id = architecture_swarm_id(manifest, trainer.model) if custom_model else manifest.swarm_id
        names = trainer.model.module_names() if custom_model else manifest.model.module_names()
        self.module_names: List[str] = list(names)
        self.progress = Progress()
        self.hosting = Hosting(trainer, manifest.outer_optimizer)
        self.maddrs: List[str] = []  # what others dial, known once the daemon listens (ready_event)
        # Held by the training thread for each step and each averaging round, so that readers
        # (the Python API's evaluate/sample) never see parameters half-written.
        self.model_lock = threading.RLock()
        self.affinity = AffinityMeter(swarm, self.swarm_id, trainer, manifest.averaging.part_timeout_seconds,
                                      self.model_lock)  # fmt: skip
        self.taken_at_check: Dict[str, int] = {}  # follow_data: the check at which this node took on each expert
        self.swaps = SwapNotice()  # a re-placement announced in our record, made once peers have seen it
        averaging = manifest.averaging
        # Members-only swarms (node/net/admission.py): peers we know are out (revoked, expired) are left out of
        # groups, state donors and placement; the founders' revocations are read and passed on.
        self.admission = swarm.admission
        admission = self.admission if self.admission is not None and self.admission.serves else None
        refuses = (lambda peer: admission.known_refusal(peer) is not None) if admission is not None else None
        self.revocations = (
            Revocations(swarm, admission, self.swarm_id, self._out, take=swarm.take_revocations)
            if admission is not None else None
        )  # fmt: skip
        if self.revocations is not None:
            swarm.on_refused = self.revocations.refused
        # Members-only swarms: receipts for the parts this node reduces, vouches, the receipt log.
        self.ledger: Optional[Ledger] = None
        identity_path = context.config.identity_file()
        if admission is not None and identity_path is not None:
            log = os.path.join(context.config.checkpoint_dir, LOG_NAME) if context.config.checkpoint_dir else None
            per_round = manifest.training.batch_size * manifest.training.inner_steps
            self.ledger = Ledger(swarm, manifest.swarm_id, read_identity(identity_path), admission, verify, log,
                                 max_samples=per_round)  # fmt: skip
        self.greeter = Greeter(swarm, self.swarm_id, manifest.name, self.module_names)
        self.matchmaker = Matchmaker(swarm, self.swarm_id, averaging.gather_seconds,
                                     smallest_message=averaging.message_bytes,
                                     reduces=reachability.reachability != "private", refuses=refuses)  # fmt: skip
        self.averager = Averager(swarm, self.swarm_id, hosted=lambda: set(self.hosting.states), spec=averaging,
                                 round_now=lambda: self.progress.outer_round)  # fmt: skip
        self.dialback = DialBackServer(swarm)
        self._recheck: Optional["concurrent.futures.Future[Verdict]"] = None  # a re-check in flight
        self._recheck_at = time.monotonic() + RECHECK_SECONDS
        self.membership = Membership(swarm, self.swarm_id, self.describe_self, admission=admission)
        self.membership.on_stored = lambda record: self.swaps.stored(record.dropping)
        self.round_averager = RoundAverager(self.peer_id, self.matchmaker, self.averager, self.membership, averaging)
        self.round_averager.fetch_state = exact_fetcher(swarm, self.swarm_id, averaging.part_timeout_seconds)
        # The operator's bootstrap peers have standing from the start: their word on state outweighs fresh identities.
        self.standing = self.round_averager.standing
        self.standing.trust(peer_id_of(maddr) for maddr in context.config.initial_peers)  # validated already
        no_shows = self.round_averager.no_shows  # a member that never gives anything cannot cut our rounds short
        self.membership.ignores = lambda peer: peer in no_shows
        context.health.swarm_error = lambda: self.membership.read_error
        ledger = self.ledger
        if ledger is not None:
            self.averager.receipts = True
            self.round_averager.on_averaged = lambda group, result: ledger.vouch(
                group.module, group.round, result.received, dict(zip(group.members, group.samples, strict=False))
            )
        self.state_server = state_server_class(
            swarm, self.swarm_id, lambda: self.hosting.states, lambda: self.progress.outer_round
        )
        self.endpoints: Optional[Endpoints] = None  # served once joined (join)

    @classmethod
    def join(
        cls, context: NodeContext, swarm: HivemindSwarm, data: TextData, device: torch.device,
        checkpoints: Optional[CheckpointStore], model_factory: Optional[ModelFactory] = None,
        state_server_class: Type[StateServer] = StateServer, reachability: Optional[Verdict] = None,
    ) -> "Joined":  # fmt: skip
        """Build the trainer, resume or place, start serving and announcing, catch up; raise CommonsError.
        The caller closes ``swarm`` if this raises."""
        config, manifest = context.config, context.manifest
        trainer = Trainer(manifest, data, device, model_factory)
        joined = cls(
            context, swarm, trainer, checkpoints, data.seed, custom_model=model_factory is not None,
            state_server_class=state_server_class, reachability=reachability or Verdict("unknown"),
        )  # fmt: skip
        context.metrics.set_swarm(joined.swarm_id)
        context.metrics.set_reachability(joined.reachability.reachability)
        logger.info("manifest %r, swarm id %s", manifest.name, joined.swarm_id)
        model = trainer.model
        # module_parameters is what every model offers, a custom one too (node/training/model.py's protocol)
        sizes = {m: sum(p.numel() for p in model.module_parameters(m)) for m in joined.module_names}
        averaging = manifest.averaging
        swarm.set_frame_limit(frame_limit(averaging.chunk_elements, max(sizes.values()), averaging.compression))
        fits = lambda snapshot: check_fits(snapshot.tensors, sizes)  # noqa: E731  # another model's: fall back
        restored = checkpoints.latest(joined.swarm_id, check=fits) if checkpoints is not None else None
        if restored is not None:  # continue the data stream where it was
            data.seed = joined.data_seed = restored.data_seed
            trainer.restart_data(restored.data_position)
        elif checkpoints is not None:
            logger.info("no usable checkpoint in %s: starting from scratch", checkpoints.directory)
        for service in (joined.greeter, joined.averager, joined.state_server, joined.dialback):
            swarm.run(service.start())
        if config.initial_peers:
            swarm.run(check_bootstrap_peers(swarm, joined.swarm_id, manifest.name, config.initial_peers,
                                            config.bootstrap_timeout_seconds))  # fmt: skip
        if joined.revocations is not None:
            swarm.run(joined.revocations.start())
        if joined.ledger is not None:
            swarm.run(joined.ledger.start())
        swarm.run(joined.membership.start())
        joined._place(restored)
        joined.endpoints = joined._serve_endpoints()
        return joined

    @property
    def follows_data(self) -> bool:
        return self.context.manifest.placement.policy == "follow_data"

    def _place(self, restored: Optional[Snapshot]) -> None:
        """Resume what the checkpoint held, or choose experts (_choose_experts); a newcomer (or a node
        more than a round behind) then downloads the swarm's current state of its modules."""
        view, progress, config = self.membership.view, self.progress, self.context.config
        swarm_round = view.swarm_round(exclude=self.peer_id)
        progress.outer_round = swarm_round
        experts = self.module_names[1:]
        if restored is not None:
            progress.outer_round = max(progress.outer_round, restored.outer_round)
            progress.rounds_done = restored.rounds_done
            self.trainer.local_steps = restored.local_steps
            self.host([e for e in restored.hosted if e in experts][: config.experts])
            modules = restore_modules(restored.tensors, self.hosting.states, self.trainer.optimizer)
            logger.info(
                "resumed from checkpoint generation %d: round %d, %d local steps, modules %s",
                restored.generation, restored.outer_round, restored.local_steps, ", ".join(modules),
                extra={"event": "resumed", "round": restored.outer_round, "generation": restored.generation},
            )  # fmt: skip
        else:
            self.host(self._choose_experts(experts))
        if restored is None or restored.outer_round < swarm_round - 1:
            # follow_data adopted the trunk just before choosing (_choose_experts)
            fresh = restored is None and self.follows_data
            self._catch_up(from_checkpoint=restored is not None, modules=self.hosting.hosted if fresh else None)
        self.membership.watch_round = progress.outer_round

    def _choose_experts(self, experts: List[str]) -> List[str]:
        """The least-replicated experts; with follow_data, uncovered experts first and then those this node's
        data routes to, measured after adopting the swarm's trunk (so that its router sees what the swarm's
        model computes). A model that cannot measure routing is placed by replica counts."""
        view, config = self.membership.view, self.context.config
        replicas = replica_counts(view.modules_by_peer(), exclude=self.peer_id)
        affinity = None
        if self.follows_data:
            self.host([])
            self._adopt(["trunk"])
            affinity = self._measure_affinity()
            if affinity is None:
                logger.warning("placement follow_data: no routing affinity (model or data): placing by replicas")
        avoid: List[str] = []
        if self.reachability.reachability == "private":  # experts only other undialable peers host
            avoid = [e for e in experts if (hosts := view.hosts_of(e, exclude=self.peer_id))
                     and all(view.peers[p].reachability == "private" for p in hosts)]  # fmt: skip
        return choose_experts(experts, replicas, config.experts, self.peer_id, affinity, avoid)

    def _catch_up(self, from_checkpoint: bool, modules: Optional[List[str]] = None) -> None:
        """Newcomer (or far behind): fetch the current state of our modules (default: all) from their hosts."""
        if not self._adopt(list(self.hosting.states) if modules is None else modules):
            start = "checkpoint" if from_checkpoint else "scratch"
            logger.info("no peer holds our modules yet: starting from %s", start)

    def _adopt(self, modules: List[str]) -> bool:
        """Download these hosted modules' current state from their hosts (those that have any) and move our
        round up to theirs; False when no module has a host to ask."""
        view, states = self.membership.view, {m: self.hosting.states[m] for m in modules}
        donors = {m: view.donors_of(m, exclude=self.peer_id) for m in modules}
        timeout = self.context.manifest.averaging.part_timeout_seconds
        adopted = download_modules(
            self.swarm, self.swarm_id, states, donors, timeout, self.swarm.run, trusted=self.standing.peers()
        )
        if adopted:  # a donor's round counts no further than the swarm's (a digest may claim any round)
            ceiling = view.swarm_round(exclude=self.peer_id) + 1
            self.progress.outer_round = max(self.progress.outer_round, min(ceiling, max(adopted.values())))
        return any(donors.values())

    def _serve_endpoints(self) -> Endpoints:
        """/metrics, /metrics/swarm, /healthz, /readyz and the swarm page (/, /status.json) on --metrics-addr."""
        metrics = self.context.metrics
        metrics.attach(AveragerCollector(lambda: self.averager.stats))
        metrics.attach(HelperProcessCollector())
        membership = self.membership
        metrics.attach(RecordsRefusedCollector(lambda: self.swarm.records_refused, lambda: membership.reads_failed))
        admission = self.admission if self.admission is not None and self.admission.serves else None
        limits = self.swarm.limits

        state_server = self.state_server

        def refused() -> Dict[Tuple[str, str], int]:  # over this node's limits, and (members-only) non-members
            counts = dict(limits.refused)
            if state_server.refused:  # ranges past a peer's share of our state
                counts[("state", "too_fast")] = counts.get(("state", "too_fast"), 0) + state_server.refused
            for key, count in (admission.refusals() if admission is not None else {}).items():
                counts[key] = counts.get(key, 0) + count
            return counts

        revocations = (lambda: len(admission.revocations())) if admission is not None else None
        metrics.attach(RequestsRefusedCollector(refused, revocations))
        swarm_registry = CollectorRegistry()
        swarm_registry.register(SwarmViewCollector(lambda: self.membership.view, self.module_names))
        return open_endpoints(self.context.config.metrics_addr, metrics.registry, swarm_registry, self.context.health,
                              page=self.page_status)  # fmt: skip

    def page_status(self) -> Dict[str, Any]:
        """The swarm page's data (/status.json, node/runtime/status_page.py); called on the HTTP server's threads,
        so it only reads: attributes the training thread replaces whole, and a copy of the history."""
        context, progress, trainer = self.context, self.progress, self.trainer
        me = {
            "peer_id": self.peer_id, "swarm_id": self.swarm_id, "manifest": context.manifest.name,
            "version": __version__, "device": self.device.type, "outer_round": progress.outer_round,
            "rounds_done": progress.rounds_done, "local_steps": trainer.local_steps, "loss": trainer.loss_ema,
            "eval_loss": progress.last_eval_loss, "samples_per_second": trainer.samples_per_second,
            "modules": list(self.hosting.modules), "ready": context.health.ready(),
        }  # fmt: skip
        rounds = outcome_counts(context.metrics.rounds.collect())
        return page_status(me, self.membership.view, self.module_names, list(context.history),
                           context.health.check(), rounds)  # fmt: skip

    def host(self, experts: List[str]) -> None:
        self.hosting.host(experts)
        self.context.metrics.hosted.set(len(self.hosting.hosted))

    def rebalance(self) -> None:
        """Once per round: an expert with no host left makes exactly one node (the same choice everywhere)
        swap a duplicated expert for it, and uneven hosts make a few nodes move to the least-hosted experts
        (placement.rebalance). Else, with follow_data, every ``check_every_rounds`` rounds: this node may
        swap an expert for one its data routes to more (placement.follow_swap). Each swap is announced first
        and made rounds later, if another host of the dropped expert stays (placement.SwapNotice); no other
        is planned meanwhile. Plans count only hosts that do not announce a drop."""
        if self.swaps.pending is not None:
            if self.swaps.due():
                self._settle_swap()
            return
        view = self.membership.view.staying_by_peer()
        view[self.peer_id] = self.hosting.modules
        swap = rebalance(self.peer_id, view, self.module_names[1:])
        if swap is not None:
            drop, add = swap
            hosts = replica_counts(view)
            why = f"{add} has {hosts.get(add, 0)} host(s), {drop} has {hosts[drop]}; hosting the first instead"
            self._propose(Swap(drop, add, "replaced", f"re-placement: {why}"))
        elif self.follows_data and self.progress.outer_round % self.context.manifest.placement.check_every_rounds == 0:
            self._follow_data()

    def _follow_data(self) -> None:
        spec = self.context.manifest.placement
        affinity = self._measure_affinity()
        if affinity is None:
            return
        check = self.progress.outer_round // spec.check_every_rounds  # the same on every node of this round
        # An expert taken on at the last check stays for one more: its first rounds here move its gate (the
        # balance loss pushes the gate of a busy expert away from this node's tokens), so it could swap back.
        keep = {e for e, taken in self.taken_at_check.items() if taken >= check - 1}
        try:  # plan on records read now, not up to half a second ago: fewer notices withdrawn
            view = self.refresh_view().staying_by_peer()
        except Exception as e:  # a failed read: plan on the view we have
            logger.debug("follow_data: could not re-read the peer records: %s", e)
            view = self.membership.view.staying_by_peer()
        view[self.peer_id] = self.hosting.modules
        swap = follow_swap(self.peer_id, view, self.module_names[1:], affinity, spec.swap_margin, check, keep)
        if swap is None:
            return
        drop, add = swap
        why = (f"this node's data routes {100 * affinity[add]:.1f}% of its layer to {add} and "
               f"{100 * affinity[drop]:.1f}% to {drop}; hosting it instead")  # fmt: skip
        self._propose(Swap(drop, add, "follow_data_swap", f"re-placement: {why}"))

    def _propose(self, swap: Swap) -> None:
        self.swaps.propose(swap)
        logger.info("%s (after a %.0f s notice, if another host keeps %s)", swap.message, self.swaps.notice,
                    swap.drop, extra={"event": "swap_notice", "drop": swap.drop, "add": swap.add})  # fmt: skip

    def _settle_swap(self) -> None:
        """The notice has run: make the pending swap if another host keeps its expert, on records read now. A
        read missing a peer or older than the last view (a DHT node did not answer in time) waits a round."""
        before = self.membership.view
        try:
            view = self.refresh_view()
        except Exception as e:
            logger.debug("re-placement: could not re-read the peer records: %s", e)
            return
        if view is before or not view.covers(before):  # the same object: the read missed our own record
            logger.debug("re-placement: the peer records read are older or fewer than the last view's; next round")
            return
        swap, withdrawn = self.swaps.settle(self.peer_id, view.staying_by_peer())
        if withdrawn is not None:
            others = [p[-8:] for p in view.hosts_of(withdrawn.drop, exclude=self.peer_id)]
            logger.info("re-placement withdrawn: no other host keeps %s (%d peer(s) in view; other hosts, all "
                        "dropping it: %s)", withdrawn.drop, len(view.peers), ", ".join(others) or "none",
                        extra={"event": "swap_withdrawn", "drop": withdrawn.drop, "add": withdrawn.add})  # fmt: skip
        if swap is None:
            return
        if swap.event == "follow_data_swap":
            check_every = self.context.manifest.placement.check_every_rounds
            self.taken_at_check[swap.add] = self.progress.outer_round // check_every
        logger.info("%s", swap.message, extra={"event": swap.event, "drop": swap.drop, "add": swap.add,
                                              "round": self.progress.outer_round})  # fmt: skip
        self._swap(swap.drop, swap.add)

    def _measure_affinity(self) -> Optional[Dict[str, float]]:
        return self.affinity.measure(self.hosting.states, self.membership.view, self.module_names[1:])

    def _swap(self, drop: str, add: str) -> None:
        """Host ``add`` instead of ``drop``, starting from the swarm's current state of ``add`` when someone
        holds it (else from our model's copy, as for an expert nobody hosts)."""
        with self.model_lock:
            self.host([e for e in self.hosting.hosted if e != drop] + [add])
            self._adopt([add])

    def recheck_reachability(self) -> None:
        """Once per round: every ``RECHECK_SECONDS`` a node that is not known public (and was not told what it is)
        asks peers to dial it back again, in the background; a changed answer takes effect at once (a port that
        was opened on the router makes the node reduce slices again), and is logged. Its DHT stays as it began."""
        verdict = self.reachability
        if verdict.forced:
            return
        pending, self._recheck = self._recheck, None
        if pending is not None and not pending.done():
            self._recheck = pending
            return
        if pending is not None:
            try:
                found = pending.result()
            except Exception as e:  # the probe never raises for a peer's failure; this is ours
                logger.debug("reachability re-check failed: %s", e)
                return
            if found.reachability != "unknown" and found.reachability != verdict.reachability:
                self._set_reachability(found)
            return
        if verdict.reachability == "public" or time.monotonic() < self._recheck_at:
            return
        self._recheck_at = time.monotonic() + RECHECK_SECONDS
        view = self.membership.view
        peers = [p for p, r in sorted(view.peers.items()) if p != self.peer_id and r.reachability != "private"]
        if peers:
            ports = listen_ports(list(self.context.config.announce_maddrs) or self.maddrs)
            timeout = self.context.manifest.averaging.part_timeout_seconds
            self._recheck = self.swarm.submit(probe(self.swarm, random.sample(peers, min(2, len(peers))), ports,
                                                    timeout=timeout))  # fmt: skip

    def _set_reachability(self, verdict: Verdict) -> None:
        before = self.reachability.reachability
        self.reachability = verdict
        self.matchmaker.reduces = verdict.reachability != "private"
        self.context.metrics.set_reachability(verdict.reachability)
        logger.info(
            "reachability: now %s (was %s): %s", verdict.describe(), before,
            "this node reduces slices again" if self.matchmaker.reduces else "this node reduces no slice from now on",
            extra={"event": "reachability", "reachability": verdict.reachability, "was": before},
        )  # fmt: skip

    # --- what others see -----------------------------------------------------------------
    def describe_self(self) -> PeerRecord:
        trainer = self.trainer
        return PeerRecord(
            peer_id=self.peer_id, modules=self.hosting.modules, outer_round=self.progress.outer_round,
            local_steps=trainer.local_steps, loss=trainer.loss_ema, samples_per_second=trainer.samples_per_second,
            maddrs=self.maddrs[:16], device=self.device.type, version=__version__,
            data=self.trainer.data.commitment()["commitment"], reachability=self.reachability.reachability,
            invite=self.admission.own_invite.decode() if self.admission and self.admission.own_invite else None,
            dropping=self.swaps.dropping(),
        )  # fmt: skip

    def _out(self, why: str) -> None:
        """Our own invite expired or was revoked: stop training, leave, and end with exit 7 (NotAMember)."""
        logger.info("leaving the swarm: this node is no longer a member", extra={"event": "not_a_member"})
        self.context.fatal = NotAMember(why)
        self.context.stop_requested.set()

    def ready_event(self) -> Dict[str, Any]:
        self.maddrs = self.swarm.visible_maddrs()
        manifest = self.context.manifest
        # Nobody can dial a private node: joiners go through the peer it joined by.
        private = self.reachability.reachability == "private"
        through = list(self.context.config.initial_peers) if private else self.maddrs
        join_through = through[0] if through else None
        return {
            "event": "ready",
            "peer_id": self.peer_id,
            "maddrs": self.maddrs,
            "swarm_id": self.swarm_id,
            "manifest": manifest.name,
            "protocol_version": manifest.protocol_version,
            "version": __version__,
            "modules": self.hosting.modules,
            "outer_round": self.progress.outer_round,
            "device": self.device.type,
            "data": self.trainer.data.commitment(),
            "reachability": self.reachability.reachability,
            "join": join_command(join_through, self.context.config.manifest) if join_through else None,
            "metrics_url": self.endpoints.url("/metrics") if self.endpoints else None,
        }

    def announce_ready(self, out: Optional[TextIO]) -> Dict[str, Any]:
        """Print the JSON ready line and log how to join and where the metrics are."""
        ready = self.ready_event()
        if out is not None:
            out.write(json.dumps(ready) + "\n")
            out.flush()
        logger.info(
            "ready: swarm %s, peer %s, hosting %s", ready["swarm_id"], ready["peer_id"], ", ".join(ready["modules"])
        )
        logger.info("others can join with: %s", ready["join"])
        logger.info("metrics: %s (health: /healthz, /readyz, swarm view: /metrics/swarm)", ready["metrics_url"])
        return ready

    def refresh_view(self) -> SwarmView:
        """Re-read the peer records now (the background refresh runs every half second)."""
        return self.swarm.run(self.membership.refresh(), timeout=30)

    def save_checkpoint(self) -> None:
        """Write a generation; a failure (disk full, read-only) is logged and counted, training goes on."""
        if self.checkpoints is None or not self.hosting.states:
            return
        progress, trainer = self.progress, self.trainer
        snapshot = Snapshot(
            swarm_id=self.swarm_id, outer_round=progress.outer_round, rounds_done=progress.rounds_done,
            local_steps=trainer.local_steps, hosted=list(self.hosting.hosted), data_seed=self.data_seed,
            data_position=trainer.data.position, tensors=capture_modules(self.hosting.states, trainer.optimizer),
        )  # fmt: skip
        write_generation(self.checkpoints, snapshot, self.context.metrics)

    def leave(self) -> None:
        """Checkpoint, stop serving, say goodbye and stop every helper process."""
        self.save_checkpoint()  # the global copies as of the last finished round
        if self.endpoints is not None:
            self.endpoints.close()
        try:
            if self.revocations is not None:
                self.swarm.run(self.revocations.stop(), timeout=5)
            if self.ledger is not None:
                self.swarm.run(self.ledger.stop(), timeout=5)
            self.swarm.run(self.membership.stop(), timeout=5)
            self.swarm.run(self.membership.say_goodbye(), timeout=3)
        except Exception as e:
            logger.debug("membership stop: %s", e)
        self.swarm.close()
