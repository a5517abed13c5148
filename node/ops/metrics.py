"""Prometheus metrics of one node, in one place, on an injectable registry.

Training and round counters are pushed by the Node as things happen. State owned by
others is read at scrape time by collectors: the Averager's byte and rejection counters,
the swarm view, and the resident memory / CPU of the helper processes (hivemind's DHT
process and p2pd). Labels are low-cardinality by construction: no peer ids, module
names only in the swarm view (bounded by the manifest).

This module knows nothing of averaging or training: what it reads from them is described by the
small protocols below (``AveragingCounters``, ``PeerTable``, ``RoundOutcome``), so operations sit
below the engines in the import order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Mapping, Optional, Protocol, Sequence, Tuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from node.ops.procs import helper_totals
from protocol.records import PeerRecord

NAMESPACE = "commons"
ROUND_RESULTS = ("ok", "partial", "failed")
MODULE_KINDS = ("trunk", "expert")
# Averaging rounds take from milliseconds (loopback) to minutes (slow links, big modules).
ROUND_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class AveragingCounters(Protocol):
    """The averaging engine's counters (node.averaging.AveragingStats)."""

    @property
    def bytes_sent(self) -> int: ...

    @property
    def bytes_received(self) -> int: ...

    @property
    def parts_rejected(self) -> Mapping[str, int]: ...


class PeerTable(Protocol):
    """The live peer records of a swarm view (node.swarm.SwarmView)."""

    @property
    def peers(self) -> Mapping[str, PeerRecord]: ...


class RoundOutcome(Protocol):
    """How one module's averaging round went (node.runtime.ModuleOutcome)."""

    @property
    def module(self) -> str: ...

    @property
    def result(self) -> str: ...

    @property
    def seconds(self) -> float: ...

    @property
    def dropped(self) -> int: ...

    @property
    def averaged_fraction(self) -> float: ...

    @property
    def numel(self) -> int: ...


def module_kind(module: str) -> str:
    return "trunk" if module == "trunk" else "expert"


class NodeMetrics:
    """Every metric the node exports. Tests pass a fresh ``CollectorRegistry``."""

    def __init__(
        self,
        registry: Optional[CollectorRegistry] = None,
        *,
        version: str,
        protocol_version: int,
        swarm_id: Optional[str] = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r, ns = self.registry, NAMESPACE
        self._info = Gauge("info", "Constant 1; labels say what this node runs",
                           ["version", "swarm_id", "protocol_version"], namespace=ns, registry=r)  # fmt: skip
        self._info_labels = (version, str(protocol_version))
        if swarm_id is not None:
            self.set_swarm(swarm_id)
        self.steps = Counter("training_steps", "Local (inner) training steps", namespace=ns, registry=r)
        self.samples = Counter("training_samples", "Training sequences processed", namespace=ns, registry=r)
        self.step_seconds = Counter("training_step_seconds", "Wall time spent inside local training steps",
                                    namespace=ns, registry=r)  # fmt: skip
        self.waited_seconds = Counter("averaging_wait_seconds", "Wall time training stood still waiting for averaging",
                                      namespace=ns, registry=r)  # fmt: skip
        self.loss = Gauge("training_loss", "Recent local training loss (EMA, nats/byte)", namespace=ns, registry=r)
        self.eval_loss = Gauge("eval_loss", "Held-out loss, latest scoring (nats/byte)", namespace=ns, registry=r)
        self.loss.set(float("nan"))  # unknown until measured: NaN, not a misleading 0
        self.eval_loss.set(float("nan"))
        self.rounds = Counter("averaging_rounds", "Averaging rounds per module by outcome", ["module_kind", "result"],
                              namespace=ns, registry=r)  # fmt: skip
        for kind in MODULE_KINDS:
            for result in ROUND_RESULTS:
                self.rounds.labels(kind, result)  # export zeros so rate() works from the start
        self.round_seconds = Histogram("averaging_round_seconds", "Wall time of one module's averaging round",
                                       namespace=ns, registry=r, buckets=ROUND_BUCKETS)  # fmt: skip
        self.fraction = Gauge("averaging_fraction", "Fraction of hosted parameters averaged with a peer last round",
                              namespace=ns, registry=r)  # fmt: skip
        self.dropped = Counter("averaging_peers_dropped", "Group members left out of a round (crashed, slow, refused)",
                               namespace=ns, registry=r)  # fmt: skip
        self.swarm_peers = Gauge("swarm_peers", "Peers seen in the DHT, this node included", namespace=ns, registry=r)
        self.hosted = Gauge("hosted_experts", "Experts this node hosts", namespace=ns, registry=r)
        self.outer_round = Gauge("outer_round", "Current outer (averaging) round", namespace=ns, registry=r)
        self.last_progress = Gauge("last_progress_timestamp_seconds", "When the node last trained or averaged",
                                   namespace=ns, registry=r)  # fmt: skip
        self.checkpoint_success = Gauge(
            "checkpoint_last_success_timestamp_seconds", "When the last checkpoint was written (0: none yet)",
            namespace=ns, registry=r,
        )  # fmt: skip
        self.checkpoint_failures = Counter(
            "checkpoint_failures", "Checkpoint writes that failed (disk full, read-only)", namespace=ns, registry=r
        )
        self.checkpoint_bytes = Gauge(
            "checkpoint_bytes", "Size of the last checkpoint written", namespace=ns, registry=r
        )
        self.reachability = Gauge(
            "reachability", "1 for whether other peers can dial this node: public, private or unknown (dial-back)",
            ["state"], namespace=ns, registry=r,
        )  # fmt: skip
        self.set_reachability("unknown")
        ProcessCollector(registry=r)

    def set_reachability(self, state: str) -> None:
        for each in ("public", "private", "unknown"):
            self.reachability.labels(each).set(1 if each == state else 0)

    def set_swarm(self, swarm_id: str) -> None:
        """The swarm id is known once the model is built (a custom model changes it)."""
        version, protocol_version = self._info_labels
        self._info.clear()
        self._info.labels(version, swarm_id, protocol_version).set(1)

    def observe_step(self, samples: int, loss: Optional[float], seconds: float = 0.0) -> None:
        self.steps.inc()
        self.samples.inc(samples)
        self.step_seconds.inc(seconds)
        if loss is not None:
            self.loss.set(loss)

    def observe_round(self, outcomes: Sequence[RoundOutcome]) -> None:
        total = sum(o.numel for o in outcomes) or 1
        for outcome in outcomes:
            self.rounds.labels(module_kind(outcome.module), outcome.result).inc()
            self.round_seconds.observe(outcome.seconds)
            self.dropped.inc(outcome.dropped)
        self.fraction.set(sum(o.averaged_fraction * o.numel for o in outcomes) / total)

    def attach(self, collector: Collector) -> None:
        self.registry.register(collector)


class AveragerCollector(Collector):
    """Reads the Averager's counters at scrape time (they are mutated on the swarm loop)."""

    def __init__(self, stats: Callable[[], Optional[AveragingCounters]]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        stats = self._stats()
        sent = CounterMetricFamily(f"{NAMESPACE}_network_sent_bytes", "Bytes sent in averaging messages")
        sent.add_metric([], stats.bytes_sent if stats else 0)
        received = CounterMetricFamily(f"{NAMESPACE}_network_received_bytes", "Bytes received in averaging messages")
        received.add_metric([], stats.bytes_received if stats else 0)
        rejected = CounterMetricFamily(
            f"{NAMESPACE}_averaging_rejected_parts", "Parts refused from peers, by reason", labels=["reason"]
        )
        for reason, count in sorted(stats.parts_rejected.items() if stats else ()):
            rejected.add_metric([reason], count)
        return [sent, received, rejected]


class RecordsRefusedCollector(Collector):
    """DHT records the node refused or dropped: unsigned, signed by another key than their subkey's peer, too
    large or expiring too late (node/net/hivemind.py SignedRecords); and reads of the swarm's peer records that
    failed or came back without the node's own (node/swarm/membership.py). Read at scrape time."""

    def __init__(self, count: Callable[[], int], reads_failed: Optional[Callable[[], int]] = None) -> None:
        self._count = count
        self._reads_failed = reads_failed

    def collect(self) -> Iterable[Metric]:
        refused = CounterMetricFamily(
            f"{NAMESPACE}_dht_records_refused", "DHT records refused: unsigned, forged, oversized or expiring too late"
        )
        refused.add_metric([], self._count())
        if self._reads_failed is None:
            return [refused]
        failed = CounterMetricFamily(
            f"{NAMESPACE}_swarm_reads_failed", "Reads of the swarm's peer records that failed or missed this node's own"
        )
        failed.add_metric([], self._reads_failed())
        return [refused, failed]


class RequestsRefusedCollector(Collector):
    """Requests refused, by request (hello, dialback, avg, state, dht) and reason: over this node's limits
    (frame_too_large, slow_frame, too_many_streams, over_budget; node/net/streams.py) and, in members-only
    swarms, from peers that are not members (no_invite, expired, wrong_signer, revoked, …;
    node/net/admission.py), with the count of founders' revocations this node knows."""

    def __init__(
        self, counts: Callable[[], Dict[Tuple[str, str], int]], revocations: Optional[Callable[[], int]] = None
    ) -> None:
        self._counts = counts
        self._revocations = revocations

    def collect(self) -> Iterable[Metric]:
        refused = CounterMetricFamily(
            f"{NAMESPACE}_requests_refused", "Requests refused: over this node's limits, or (members-only swarms) "
            "from peers that are not members", labels=["request", "reason"],
        )  # fmt: skip
        for (request, reason), count in sorted(self._counts().items()):
            refused.add_metric([request, reason], count)
        if self._revocations is None:
            return [refused]
        revocations = GaugeMetricFamily(f"{NAMESPACE}_revocations", "Founders' revocations this node knows")
        revocations.add_metric([], self._revocations())
        return [refused, revocations]


class HelperProcessCollector(Collector):
    """Memory and CPU of the helper processes under the node: hivemind's DHT process and its p2pd."""

    def __init__(self, root_pid: Optional[int] = None) -> None:
        self._root = root_pid or os.getpid()

    def collect(self) -> Iterable[Metric]:
        rss = GaugeMetricFamily(
            f"{NAMESPACE}_helper_resident_memory_bytes", "RSS of helper processes", labels=["helper"]
        )
        cpu = CounterMetricFamily(f"{NAMESPACE}_helper_cpu_seconds", "CPU time of helper processes", labels=["helper"])
        for helper, stat in sorted(helper_totals(self._root).items()):
            rss.add_metric([helper], stat.rss_bytes)
            cpu.add_metric([helper], stat.cpu_seconds)
        return [rss, cpu]


@dataclass(frozen=True)
class Coverage:
    """Who hosts what, for every module of the manifest (hosted or not): one computation for the swarm
    view's metrics and for `node status`, so the two always agree."""

    replicas: Dict[str, int]  # module -> live peers hosting it, every module of the manifest, in its order
    expert_capacity: int  # experts hosted over all peers, counted once per host: what the swarm has room for

    @property
    def uncovered(self) -> int:
        return sum(1 for count in self.replicas.values() if count == 0)

    @property
    def uncovered_beyond_capacity(self) -> int:
        """Experts without a host although the peers' capacity could cover every one of them: expected to stay
        0 (placement fills the least-replicated first and swaps duplicates for orphans)."""
        experts = sum(1 for module in self.replicas if module != "trunk")
        return max(0, self.uncovered - max(0, experts - self.expert_capacity))


def module_coverage(records: Iterable[PeerRecord], modules: Iterable[str]) -> Coverage:
    """Replica counts of ``modules`` over ``records``; modules outside the list are ignored."""
    counts = {module: 0 for module in modules}
    capacity = 0
    for record in records:
        for module in record.modules:
            if module in counts:
                counts[module] += 1
                capacity += module != "trunk"
    return Coverage(counts, capacity)


class SwarmViewCollector(Collector):
    """The swarm as this node sees it in the DHT: one scrape target can describe the whole swarm."""

    def __init__(self, view: Callable[[], Optional[PeerTable]], modules: Iterable[str]) -> None:
        self._view = view
        self._modules = list(modules)  # bounded by the manifest

    def collect(self) -> Iterable[Metric]:
        view = self._view()
        records = list(view.peers.values()) if view is not None else []
        prefix = f"{NAMESPACE}_swarm_view"
        peers = GaugeMetricFamily(f"{prefix}_peers", "Peers with a live record in the DHT")
        peers.add_metric([], len(records))
        replicas = GaugeMetricFamily(f"{prefix}_module_replicas", "Peers hosting each module", labels=["module"])
        coverage = module_coverage(records, self._modules)
        for module, count in coverage.replicas.items():
            replicas.add_metric([module], count)
        uncovered = GaugeMetricFamily(f"{prefix}_uncovered_modules", "Modules no live peer hosts")
        uncovered.add_metric([], coverage.uncovered)
        capacity = GaugeMetricFamily(f"{prefix}_expert_capacity", "Experts hosted over all peers (one per host)")
        capacity.add_metric([], coverage.expert_capacity)
        beyond = GaugeMetricFamily(f"{prefix}_uncovered_beyond_capacity",
                                   "Experts without a host although the peers have room for every expert")  # fmt: skip
        beyond.add_metric([], coverage.uncovered_beyond_capacity)
        rounds = GaugeMetricFamily(f"{prefix}_outer_round", "Outer round across peers", labels=["stat"])
        throughput = GaugeMetricFamily(f"{prefix}_samples_per_second", "Sum of peers' reported training throughput")
        throughput.add_metric([], sum(r.samples_per_second or 0.0 for r in records))
        loss = GaugeMetricFamily(f"{prefix}_loss", "Mean of peers' reported training loss")
        if records:
            rounds.add_metric(["min"], min(r.outer_round for r in records))
            rounds.add_metric(["max"], max(r.outer_round for r in records))
            losses = [r.loss for r in records if r.loss is not None]
            if losses:
                loss.add_metric([], sum(losses) / len(losses))
        return [peers, replicas, uncovered, capacity, beyond, rounds, throughput, loss]
