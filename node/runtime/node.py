"""A running node: open the swarm, train rounds, average each module, leave cleanly.

Threads: the caller's thread runs the training loop (torch); the Swarm's loop thread
runs every network coroutine (announcements, matchmaking, all-reduce, handlers).
The training thread hands a round's averaging to the loop and waits on it, checking
for a stop request so Ctrl+C abandons a round within a second or two.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import threading
import time
from typing import Callable, ContextManager, Dict, List, Optional, TextIO

from prometheus_client import CollectorRegistry

from node import __version__
from node.averaging import Averager, Matchmaker
from node.net import HivemindSwarm
from node.ops import (
    AveragerCollector,
    CheckpointStore,
    Endpoints,
    Health,
    HelperProcessCollector,
    NodeMetrics,
    Snapshot,
    SwarmViewCollector,
    open_endpoints,
    write_generation,
)
from node.runtime.config import NodeConfig
from node.runtime.report import ModuleOutcome, log_round, round_summary
from node.runtime.rounds import PendingRound, RoundAverager, apply, prepare
from node.swarm import (
    Greeter,
    Membership,
    StateServer,
    SwarmView,
    check_bootstrap_peers,
    choose_experts,
    download_modules,
    rebalance,
    replica_counts,
)
from node.training import (
    DataError,
    EvalCadence,
    ModelFactory,
    ModuleState,
    TextData,
    Trainer,
    architecture_swarm_id,
    capture_modules,
    resolve_device,
    restore_modules,
)
from protocol.manifest import Manifest, load_manifest
from protocol.records import PeerRecord

logger = logging.getLogger("node")

DATA_RETRY_SECONDS = 2.0  # how often a paused node looks for its data source again


class Node:
    """One node's state and lifecycle. ``open()`` joins, ``run()`` trains, ``close()`` leaves."""

    state_server_class = StateServer  # tests run donors with modified code by swapping this

    def __init__(
        self,
        config: NodeConfig,
        manifest: Optional[Manifest] = None,
        registry: Optional[CollectorRegistry] = None,
        model_factory: Optional[ModelFactory] = None,
    ) -> None:
        self.config = config
        self.manifest = manifest or load_manifest(config.manifest)
        self.model_factory = model_factory
        # A custom model changes the swarm id (see open()); the manifest's is right otherwise.
        self.swarm_id = self.manifest.swarm_id
        self.module_names: List[str] = list(self.manifest.model.module_names())
        self.metrics = NodeMetrics(registry, version=__version__, protocol_version=self.manifest.protocol_version)
        self.history: List[dict] = []  # one summary per finished round
        self._announced = False
        self.health = Health(stall_seconds=config.stall_seconds)
        self.endpoints: Optional[Endpoints] = None
        self.stop_requested = threading.Event()
        self.outer_round = 0
        self.rounds_done = 0
        self._pending: Optional[PendingRound] = None  # a round on the network (overlap mode)
        self.last_eval_loss: Optional[float] = None  # the latest score, kept between scored rounds
        self.eval_cadence = EvalCadence(config.eval_share)
        self.swarm: Optional[HivemindSwarm] = None
        self.states: Dict[str, ModuleState] = {}
        self.hosted: List[str] = []
        self._maddrs: List[str] = []
        self._on_step: Optional[Callable[[float], None]] = None
        # Held by the training thread for each step and each averaging round, so that readers
        # (the Python API's evaluate/sample) never see parameters half-written.
        self._model_lock = threading.RLock()
        self.checkpoints: Optional[CheckpointStore] = None
        self._restored: Optional[Snapshot] = None

    # --- joining -----------------------------------------------------------------
    def open(self) -> None:
        """Validate local inputs first (cheap), then start networking; raises CommonsError subclasses."""
        # Each node samples its data in its own order: two volunteers on the default corpus
        # should not compute the same batches.
        data_seed = self._data_seed = int.from_bytes(os.urandom(4), "little")
        data = TextData(self.config.data, self.manifest.model.seq_len, seed=data_seed)
        self.device = resolve_device(self.config.device)
        identity = self.config.identity
        if self.config.checkpoint_dir:
            self.checkpoints = CheckpointStore(self.config.checkpoint_dir, keep=self.config.checkpoint_keep)
            # Resuming means being the same peer: keep the key next to the checkpoints unless told otherwise.
            identity = identity or str(self.checkpoints.directory / "identity.key")
        logger.info("data: %s (sampling seed %d)", data.describe(), data_seed)
        # The DHT process is forked here, before torch builds the model and starts its
        # thread pools: forking a process with live OpenMP threads is not safe.
        self.swarm = HivemindSwarm.open(
            initial_peers=self.config.initial_peers,
            host_maddrs=self.config.host_maddrs,
            announce_maddrs=self.config.announce_maddrs,
            identity_path=identity,
            startup_timeout=self.config.bootstrap_timeout_seconds,
        )
        try:
            self.trainer = Trainer(self.manifest, data, self.device, self.model_factory)
            if self.model_factory is not None:
                self.swarm_id = architecture_swarm_id(self.manifest, self.trainer.model)
                self.module_names = list(self.trainer.model.module_names())
            self.metrics.set_swarm(self.swarm_id)
            logger.info("manifest %r, swarm id %s", self.manifest.name, self.swarm_id)
            if self.checkpoints is not None:
                self._restored = self.checkpoints.latest(self.swarm_id)
                if self._restored is not None:  # continue the data stream where it was
                    data.seed = self._data_seed = self._restored.data_seed
                    self.trainer.restart_data(self._restored.data_position)
                else:
                    logger.info("no usable checkpoint in %s: starting from scratch", self.checkpoints.directory)
            self._join()
            self.endpoints = self._serve_endpoints()
        except BaseException:
            self.close()
            raise

    def _join(self) -> None:
        assert self.swarm is not None
        self.peer_id = self.swarm.peer_id
        swarm_id = self.swarm_id
        averaging = self.manifest.averaging
        self.greeter = Greeter(self.swarm, swarm_id, self.manifest.name)
        self.matchmaker = Matchmaker(
            self.swarm, swarm_id, averaging.gather_seconds, smallest_message=averaging.message_bytes
        )
        self.averager = Averager(self.swarm, swarm_id, hosted=lambda: set(self.states), spec=averaging)
        self.membership = Membership(self.swarm, swarm_id, self._describe_self)
        self.round_averager = RoundAverager(self.peer_id, self.matchmaker, self.averager, self.membership, averaging)
        self.swarm.run(self.greeter.start())
        self.swarm.run(self.averager.start())
        server = self.state_server_class(self.swarm, swarm_id, lambda: self.states, lambda: self.outer_round)
        self.swarm.run(server.start())
        if self.config.initial_peers:
            self.swarm.run(
                check_bootstrap_peers(
                    self.swarm,
                    swarm_id,
                    self.manifest.name,
                    self.config.initial_peers,
                    self.config.bootstrap_timeout_seconds,
                )
            )
        self.swarm.run(self.membership.start())
        view = self.membership.view
        swarm_round = view.max_round(exclude=self.peer_id)
        self.outer_round = swarm_round
        all_experts = self.module_names[1:]
        restored = self._restored
        if restored is not None:
            self.outer_round = max(self.outer_round, restored.outer_round)
            self.rounds_done = restored.rounds_done
            self.trainer.local_steps = restored.local_steps
            self._host([e for e in restored.hosted if e in all_experts][: self.config.experts])
            modules = restore_modules(restored.tensors, self.states, self.trainer.optimizer)
            logger.info(
                "resumed from checkpoint generation %d: round %d, %d local steps, modules %s",
                restored.generation,
                restored.outer_round,
                restored.local_steps,
                ", ".join(modules),
                extra={"event": "resumed", "round": restored.outer_round, "generation": restored.generation},
            )
        else:
            replicas = replica_counts(view.modules_by_peer(), exclude=self.peer_id)
            self._host(choose_experts(all_experts, replicas, self.config.experts, self.peer_id))
        if restored is None or restored.outer_round < swarm_round - 1:
            self._catch_up()
        self.membership.watch_round = self.outer_round

    def _catch_up(self) -> None:
        """Newcomer (or far behind): fetch the current state of our modules from their hosts."""
        assert self.swarm is not None
        view = self.membership.view
        donors = {m: view.hosts_of(m, exclude=self.peer_id) for m in self.states}
        timeout = self.manifest.averaging.part_timeout_seconds
        adopted = download_modules(self.swarm, self.swarm_id, self.states, donors, timeout, self.swarm.run)
        if adopted:
            self.outer_round = max(self.outer_round, *adopted.values())
        elif not any(donors.values()):
            logger.info(
                "no peer holds our modules yet: starting from %s", "checkpoint" if self._restored else "scratch"
            )

    def _serve_endpoints(self) -> Endpoints:
        """/metrics, /metrics/swarm, /healthz, /readyz on --metrics-addr."""
        self.metrics.attach(AveragerCollector(lambda: self.averager.stats))
        self.metrics.attach(HelperProcessCollector())
        swarm_registry = CollectorRegistry()
        swarm_registry.register(SwarmViewCollector(lambda: self.membership.view, self.module_names))
        return open_endpoints(self.config.metrics_addr, self.metrics.registry, swarm_registry, self.health)

    def _host(self, experts: List[str]) -> None:
        """Set the hosted experts; keep state of those that stay, start fresh state for new ones."""
        self.hosted = sorted(experts)
        self.metrics.hosted.set(len(self.hosted))
        self.trainer.model.set_hosted_experts(self.hosted)
        modules = ["trunk"] + self.hosted
        outer = self.manifest.outer_optimizer
        self.states = {
            m: self.states.get(m) or ModuleState(m, self.trainer.model.module_parameters(m), outer) for m in modules
        }

    def _describe_self(self) -> PeerRecord:
        return PeerRecord(
            peer_id=self.peer_id,
            modules=["trunk"] + list(self.hosted),
            outer_round=self.outer_round,
            local_steps=self.trainer.local_steps,
            loss=self.trainer.loss_ema,
            samples_per_second=self.trainer.samples_per_second,
            maddrs=self._maddrs[:16],
            device=self.device.type,
            version=__version__,
        )

    def ready_event(self) -> dict:
        assert self.swarm is not None
        self._maddrs = self.swarm.visible_maddrs()
        return {
            "event": "ready",
            "peer_id": self.swarm.peer_id,
            "maddrs": self._maddrs,
            "swarm_id": self.swarm_id,
            "manifest": self.manifest.name,
            "protocol_version": self.manifest.protocol_version,
            "version": __version__,
            "modules": ["trunk"] + self.hosted,
            "outer_round": self.outer_round,
            "device": self.device.type,
            "join": f"node start --initial-peers {self._maddrs[0]}" if self._maddrs else None,
            "metrics_url": self.endpoints.url("/metrics") if self.endpoints else None,
        }

    # --- training ----------------------------------------------------------------
    def announce_ready(self, out: Optional[TextIO] = None) -> dict:
        """Print the JSON ready line (once) and start answering /readyz."""
        ready = self.ready_event()
        if self._announced:
            return ready
        self._announced = True
        if out is not None:
            out.write(json.dumps(ready) + "\n")
            out.flush()
        logger.info(
            "ready: swarm %s, peer %s, hosting %s", ready["swarm_id"], ready["peer_id"], ", ".join(ready["modules"])
        )
        logger.info("others can join with: %s", ready["join"])
        logger.info("metrics: %s (health: /healthz, /readyz, swarm view: /metrics/swarm)", ready["metrics_url"])
        self._progress()
        self.health.joined = True
        self.metrics.swarm_peers.set(len(self.membership.view.peers))
        return ready

    def run(
        self,
        out: Optional[TextIO] = None,
        *,
        max_rounds: Optional[int] = None,
        max_steps: Optional[int] = None,
        on_step: Optional[Callable[[float], None]] = None,
    ) -> None:
        """Train rounds until a limit (these arguments, else the config's) or a stop request."""
        self.announce_ready(out)
        self._on_step = on_step
        started = time.monotonic()
        limit = self.config.max_seconds
        max_rounds = self.config.max_rounds if max_rounds is None else max_rounds
        rounds_at_start, steps_at_start = self.rounds_done, self.trainer.local_steps

        def out_of_time() -> bool:
            if max_steps is not None and self.trainer.local_steps - steps_at_start >= max_steps:
                return True
            return limit is not None and time.monotonic() - started >= limit

        while not self.stop_requested.is_set() and not out_of_time():
            round_started = time.perf_counter()
            steps = self._local_steps(out_of_time)
            if self._pending is not None and not self._complete_round(self._pending):
                break
            if steps == 0 or self.stop_requested.is_set() or out_of_time():
                break
            pending = self._submit_round(steps, time.perf_counter() - round_started)
            if not self.manifest.averaging.overlap and not self._complete_round(pending):
                break
            if max_rounds is not None and self.rounds_done - rounds_at_start >= max_rounds:
                break
        if self._pending is not None:
            self._complete_round(self._pending)
        logger.info("leaving after %d round(s), %d local step(s)", self.rounds_done, self.trainer.local_steps)

    def _local_steps(self, out_of_time) -> int:
        """Up to H inner steps; cut short when another peer is already averaging this round."""
        done = 0
        while done < self.manifest.training.inner_steps:
            if self.stop_requested.is_set() or out_of_time():
                break
            if self._pending is not None and self._pending.future.done():
                self._complete_round(self._pending)  # overlapped round is back: apply it between steps
            if done > 0 and self._swarm_moved_on():
                break
            try:
                with self._model_lock:
                    self.trainer.step()
            except DataError as e:
                self._pause_for_data(e)
                continue
            if self.health.data_error is not None:
                logger.info("data source is back: training resumed")
                self.health.data_error = None
            done += 1
            self.metrics.observe_step(
                self.manifest.training.batch_size, self.trainer.loss_ema, self.trainer.last_step_seconds
            )
            self._progress()
            if self._on_step is not None:
                self._on_step(self.trainer.loss_ema or float("nan"))
        return done

    def _progress(self) -> None:
        """A training step or an averaging round finished: /healthz and the metrics see it."""
        self.health.progress()
        self.metrics.last_progress.set_to_current_time()

    def _report_data_error(self, error: DataError) -> None:
        if self.health.data_error is None:
            logger.error("data source unavailable: %s; training paused until it is back", error)
        self.health.data_error = str(error)

    def _pause_for_data(self, error: DataError) -> None:
        """The data source failed: stay in the swarm, report unhealthy, and retry every few seconds."""
        self._report_data_error(error)
        self.stop_requested.wait(DATA_RETRY_SECONDS)
        self.trainer.restart_data()

    def refresh_view(self) -> SwarmView:
        """Re-read the peer records now (the background refresh runs every half second)."""
        assert self.swarm is not None
        return self.swarm.run(self.membership.refresh(), timeout=30)

    def training_paused(self) -> ContextManager[bool]:
        """Hold off training and averaging while the caller reads the model."""
        return self._model_lock

    def save_checkpoint(self) -> None:
        """Write a generation; a failure (disk full, read-only) is logged and counted, training goes on."""
        if self.checkpoints is None or not self.states:
            return
        snapshot = Snapshot(
            swarm_id=self.swarm_id,
            outer_round=self.outer_round,
            rounds_done=self.rounds_done,
            local_steps=self.trainer.local_steps,
            hosted=list(self.hosted),
            data_seed=self._data_seed,
            data_position=self.trainer.data.position,
            tensors=capture_modules(self.states, self.trainer.optimizer),
        )
        write_generation(self.checkpoints, snapshot, self.metrics)

    def _swarm_moved_on(self) -> bool:
        """Another peer is already averaging the round we train towards, or has gone past it: join it now.
        With an overlapped round r still on the network, that is round r + 1 (else a node that fell behind
        would never cut its steps short, and every later round would split into smaller groups)."""
        membership = self.membership
        target = self.outer_round if self._pending is None else self._pending.round_number + 1
        if membership.others_ready_round >= target:
            return True
        return membership.view.max_round(exclude=self.peer_id) > target

    def _submit_round(self, steps: int, compute_seconds: float) -> PendingRound:
        """Capture every module's pseudo-gradient and hand the round to the swarm loop."""
        assert self.swarm is not None
        with self._model_lock:
            prepared = prepare(self.states)
        # The others notice our ready post between two of their steps: ask for a window that covers that.
        window = self.manifest.averaging.gather_seconds + 2.0 * self.trainer.recent_step_seconds
        future = self.swarm.submit(self.round_averager.average(prepared, self.outer_round, window))
        self._pending = PendingRound(self.outer_round, steps, prepared, future, compute_seconds, time.perf_counter())
        self.membership.watch_round = self.outer_round + 1  # who is ready for the next one (_swarm_moved_on)
        return self._pending

    def _complete_round(self, pending: PendingRound) -> bool:
        """Wait for the round, apply it, report it; False when a stop request abandoned it."""
        wait_started = time.perf_counter()
        while True:
            try:
                results = pending.future.result(timeout=0.2)
                break
            except concurrent.futures.TimeoutError:
                if self.stop_requested.is_set():
                    pending.future.cancel()
                    self._pending = None
                    logger.info("abandoned averaging round %d to shut down", pending.round_number)
                    return False
        self._pending = None
        with self._model_lock:
            outcomes = apply(pending, results, overlap=self.manifest.averaging.overlap)
        waited = time.perf_counter() - wait_started
        self.metrics.waited_seconds.inc(waited)
        timing = {
            "compute_seconds": round(pending.compute_seconds, 3),
            "averaging_seconds": round(time.perf_counter() - pending.submitted_at, 3),
            "waited_seconds": round(waited, 3),
            # running totals: utilization over any span of rounds = difference of step_seconds_total / wall time
            "step_seconds_total": round(self.trainer.step_seconds, 3),
            "steps_total": self.trainer.local_steps,
        }
        self._finish_round(outcomes, pending.steps, timing)
        return True

    def _finish_round(self, outcomes: List[ModuleOutcome], steps: int, timing: Optional[dict] = None) -> None:
        self.rounds_done += 1
        eval_loss = self._evaluate() if self.eval_cadence.due() else None
        self.metrics.observe_round(outcomes)
        self._progress()
        summary = round_summary(self.outer_round, steps, self.trainer.loss_ema, eval_loss, outcomes, timing)
        self.history.append(summary)
        log_round(summary, outcomes)
        assert self.swarm is not None
        self.outer_round = max(self.outer_round + 1, self.membership.view.max_round(exclude=self.swarm.peer_id))
        self.membership.watch_round = self.outer_round
        self._replace_if_needed()
        self.membership.nudge()
        if self.rounds_done % self.config.checkpoint_every_rounds == 0:
            self.save_checkpoint()
        self.metrics.outer_round.set(self.outer_round)
        self.metrics.swarm_peers.set(len(self.membership.view.peers))

    def _evaluate(self) -> Optional[float]:
        """Score the held-out split now (None without one); the gauge and status() keep the latest score."""
        started = self.eval_cadence.clock()
        try:
            self.last_eval_loss = self.trainer.evaluate()
        except DataError as e:  # the held-out text went away too: report it, keep the round
            self._report_data_error(e)
            self.last_eval_loss = None
        self.eval_cadence.scored(started)
        if self.last_eval_loss is not None:
            self.metrics.eval_loss.set(self.last_eval_loss)
        return self.last_eval_loss

    def _replace_if_needed(self) -> None:
        assert self.swarm is not None
        view = dict(self.membership.view.modules_by_peer())
        view[self.swarm.peer_id] = ["trunk"] + self.hosted
        swap = rebalance(self.swarm.peer_id, view, self.module_names[1:])
        if swap is not None:
            drop, add = swap
            logger.info("re-placement: %s has no host left; hosting it instead of %s", add, drop)
            self._host([e for e in self.hosted if e != drop] + [add])

    # --- leaving -----------------------------------------------------------------
    def close(self) -> None:
        """Leave the swarm and stop every helper process; safe to call twice."""
        self.health.leaving = True
        if self.swarm is not None and hasattr(self, "trainer"):
            self.save_checkpoint()  # the global copies as of the last finished round
        if self.endpoints is not None:
            self.endpoints.close()
            self.endpoints = None
        swarm, self.swarm = self.swarm, None
        if swarm is None:
            return
        try:
            if hasattr(self, "membership"):
                swarm.run(self.membership.stop(), timeout=5)
                swarm.run(self.membership.say_goodbye(), timeout=3)
        except Exception as e:
            logger.debug("membership stop: %s", e)
        swarm.close()
