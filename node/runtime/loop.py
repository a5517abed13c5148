"""The round loop of a joined node: local steps, then submit the round, complete it, finish it.

    while not told to stop:
        steps = local_steps()          # up to H inner steps; cut short when the swarm is already averaging
        complete(pending)              # with overlap: the previous round, back from the network by now
        pending = submit(steps)        # every module's pseudo-gradient, handed to the swarm loop
        complete(pending)              # without overlap: wait for it here
    finish each completed round:       # outer step applied; log, metrics, evaluation, re-placement, checkpoint

Costs and sync points: a training step holds the model lock (the API's readers wait for it);
``submit`` copies every hosted module's pseudo-gradient once (prepare) and returns at once; the
averaging itself runs on the swarm's event loop thread. ``complete`` is where the training thread
waits for the network, in 0.2 s slices so that a stop request abandons the round within a second.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from typing import Any, Callable, Dict, List, Optional

from node.runtime.context import NodeContext
from node.runtime.joined import Joined
from node.runtime.report import ModuleOutcome, log_round, round_summary
from node.runtime.rounds import PendingRound, apply, prepare
from node.training import DataError, EvalCadence

logger = logging.getLogger("node")

DATA_RETRY_SECONDS = 2.0  # how often a paused node looks for its data source again


class RoundLoop:
    """Trains a joined node round after round; one per joined node, reused by every ``run``."""

    def __init__(self, context: NodeContext, joined: Joined) -> None:
        self.node = context
        self.joined = joined
        self.pending: Optional[PendingRound] = None  # a round on the network (overlap mode)
        self.eval_cadence = EvalCadence(context.config.eval_share)
        self._on_step: Optional[Callable[[float], None]] = None

    def run(
        self,
        *,
        max_rounds: Optional[int] = None,
        max_steps: Optional[int] = None,
        on_step: Optional[Callable[[float], None]] = None,
    ) -> None:
        """Train rounds until a limit (these arguments, else the config's) or a stop request."""
        node, trainer, progress = self.node, self.joined.trainer, self.joined.progress
        self._on_step = on_step
        started = time.monotonic()
        limit = node.config.max_seconds
        max_rounds = node.config.max_rounds if max_rounds is None else max_rounds
        rounds_at_start, steps_at_start = progress.rounds_done, trainer.local_steps
        overlap = node.manifest.averaging.overlap

        def out_of_time() -> bool:
            if max_steps is not None and trainer.local_steps - steps_at_start >= max_steps:
                return True
            return limit is not None and time.monotonic() - started >= limit

        submitted = 0  # rounds of this run handed to the network: with overlap, one may still be in flight
        while not node.stop_requested.is_set() and not out_of_time():
            round_started = time.perf_counter()
            steps = self._local_steps(out_of_time)
            if self.pending is not None and not self._complete(self.pending):
                break
            if steps == 0 or node.stop_requested.is_set() or out_of_time():
                break
            pending = self._submit(steps, time.perf_counter() - round_started)
            submitted += 1
            if not overlap and not self._complete(pending):
                break
            if max_rounds is not None and submitted >= max_rounds:
                break  # the round in flight is completed below: N rounds asked, N rounds run
        if self.pending is not None:
            self._complete(self.pending)
        done = progress.rounds_done - rounds_at_start
        stats = self.joined.averager.stats
        logger.info("leaving after %d round(s), %d local step(s)", done, trainer.local_steps - steps_at_start,
                    extra={"event": "left", "rounds": done, "rounds_total": progress.rounds_done,
                           "averaging_sent_bytes": stats.bytes_sent,
                           "averaging_received_bytes": stats.bytes_received,
                           "swarm_reads_incomplete": self.joined.membership.reads_incomplete})  # fmt: skip

    # --- local steps ----------------------------------------------------------------------
    def _local_steps(self, out_of_time: Callable[[], bool]) -> int:
        """Up to H inner steps; cut short when another peer is already averaging this round."""
        node, joined = self.node, self.joined
        trainer, health = joined.trainer, node.health
        done = 0
        while done < node.manifest.training.inner_steps:
            if node.stop_requested.is_set() or out_of_time():
                break
            if self.pending is not None and self.pending.future.done():
                self._complete(self.pending)  # overlapped round is back: apply it between steps
            if done > 0 and self._swarm_moved_on():
                break
            try:
                with joined.model_lock:
                    trainer.step()
            except DataError as e:
                self._pause_for_data(e)
                continue
            if health.data_error is not None:
                logger.info("data source is back: training resumed")
                health.data_error = None
            done += 1
            node.metrics.observe_step(node.manifest.training.batch_size, trainer.loss_ema, trainer.last_step_seconds)
            node.progress()
            if self._on_step is not None:
                self._on_step(trainer.loss_ema or float("nan"))
        return done

    def _pause_for_data(self, error: DataError) -> None:
        """The data source failed: stay in the swarm, report unhealthy, and retry every few seconds."""
        self.node.report_data_error(error)
        self.node.stop_requested.wait(DATA_RETRY_SECONDS)
        self.joined.trainer.restart_data()

    def _swarm_moved_on(self) -> bool:
        """Another peer is already averaging the round we train towards, or has gone past it: join it now.
        With an overlapped round r still on the network, that is round r + 1 (else a node that fell behind
        would never cut its steps short, and every later round would split into smaller groups)."""
        membership, progress = self.joined.membership, self.joined.progress
        target = progress.outer_round if self.pending is None else self.pending.round_number + 1
        if membership.others_ready_round >= target:
            return True
        return membership.view.swarm_round(exclude=self.joined.peer_id) > target

    # --- one round ------------------------------------------------------------------------
    def _submit(self, steps: int, compute_seconds: float) -> PendingRound:
        """Capture every module's pseudo-gradient and hand the round to the swarm loop."""
        joined, progress = self.joined, self.joined.progress
        with joined.model_lock:
            prepared = prepare(joined.hosting.states)
        # The others notice our ready post between two of their steps: ask for a window that covers that.
        window = self.node.manifest.averaging.gather_seconds + 2.0 * joined.trainer.recent_step_seconds
        if joined.ledger is not None:  # members-only: the samples we claim, capped by those who vouch for them
            joined.matchmaker.samples = steps * self.node.manifest.training.batch_size
        future = joined.swarm.submit(joined.round_averager.average(prepared, progress.outer_round, window))
        self.pending = PendingRound(progress.outer_round, steps, prepared, future, compute_seconds, time.perf_counter())
        joined.membership.watch_round = progress.outer_round + 1  # who is ready for the next one (_swarm_moved_on)
        return self.pending

    def _complete(self, pending: PendingRound) -> bool:
        """Wait for the round, apply it, report it; False when a stop request abandoned it."""
        node, joined = self.node, self.joined
        wait_started = time.perf_counter()
        while True:
            try:
                results = pending.future.result(timeout=0.2)
                break
            except concurrent.futures.TimeoutError:
                if node.stop_requested.is_set():
                    pending.future.cancel()
                    self.pending = None
                    logger.info("abandoned averaging round %d to shut down", pending.round_number)
                    return False
        self.pending = None
        with joined.model_lock:
            outcomes = apply(pending, results, overlap=node.manifest.averaging.overlap)
        waited = time.perf_counter() - wait_started
        node.metrics.waited_seconds.inc(waited)
        timing = {
            "compute_seconds": round(pending.compute_seconds, 3),
            "averaging_seconds": round(time.perf_counter() - pending.submitted_at, 3),
            "waited_seconds": round(waited, 3),
            # running totals: utilization over any span of rounds = difference of step_seconds_total / wall time
            "step_seconds_total": round(joined.trainer.step_seconds, 3),
            "steps_total": joined.trainer.local_steps,
        }
        self._finish(outcomes, pending.steps, timing)
        return True

    def _finish(self, outcomes: List[ModuleOutcome], steps: int, timing: Dict[str, Any]) -> None:
        """A round is applied: count and log it, score it if due, move to the next round, re-place, checkpoint."""
        node, joined = self.node, self.joined
        progress, membership, metrics = joined.progress, joined.membership, node.metrics
        round_number = progress.outer_round
        progress.rounds_done += 1
        eval_loss = self._evaluate() if self.eval_cadence.due() else None
        metrics.observe_round(outcomes)
        node.progress()
        summary = round_summary(round_number, steps, joined.trainer.loss_ema, eval_loss, outcomes, timing)
        node.history.append(summary)
        log_round(summary, outcomes)
        progress.outer_round = max(round_number + 1, membership.view.swarm_round(exclude=joined.peer_id))
        membership.watch_round = progress.outer_round
        joined.rebalance()
        joined.recheck_reachability()
        membership.nudge()
        if progress.rounds_done % node.config.checkpoint_every_rounds == 0:
            joined.save_checkpoint()
        metrics.outer_round.set(progress.outer_round)
        metrics.swarm_peers.set(len(membership.view.peers))
        node.after_round(round_number, outcomes, steps)

    def _evaluate(self) -> Optional[float]:
        """Score the held-out split now (None without one); the gauge and status() keep the latest score."""
        progress, cadence = self.joined.progress, self.eval_cadence
        started = cadence.clock()
        try:
            progress.last_eval_loss = self.joined.trainer.evaluate()
        except DataError as e:  # the held-out text went away too: report it, keep the round
            self.node.report_data_error(e)
            progress.last_eval_loss = None
        cadence.scored(started)
        if progress.last_eval_loss is not None:
            self.node.metrics.eval_loss.set(progress.last_eval_loss)
        return progress.last_eval_loss
