"""Every documented metric is exported with its documented type and labels, and moves when it should.

The HTTP endpoints that serve them (/metrics, /healthz, /readyz): tests/system/test_endpoints.py."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from node.averaging.averager import Averager, AveragingStats
from node.ops.metrics import (
    AveragerCollector,
    HelperProcessCollector,
    NodeMetrics,
    RecordsRefusedCollector,
    RequestsRefusedCollector,
    SwarmViewCollector,
)
from node.runtime.report import ModuleOutcome
from node.swarm.membership import SwarmView
from protocol.manifest import AveragingSpec
from protocol.records import PeerRecord

DOC = Path(__file__).resolve().parents[2] / "deploy" / "METRICS.md"


def documented(section: str) -> List[Tuple[str, str, set]]:
    """(name, type, label names) of each row of the table under ``section`` in deploy/METRICS.md."""
    text = DOC.read_text().split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("`commons_"):
            continue
        labels = set(re.findall(r"`(\w+)`", re.sub(r"\([^)]*\)", "", cells[2])))  # values in (...) aren't names
        rows.append((cells[0].strip("`"), cells[1], labels))
    assert rows, f"no metric table under {section}"
    return rows


def families(registry: CollectorRegistry) -> Dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}


def node_registry(stats: AveragingStats) -> Tuple[NodeMetrics, CollectorRegistry]:
    registry = CollectorRegistry()
    metrics = NodeMetrics(registry, version="9.9", swarm_id="abc", protocol_version=1)
    metrics.attach(AveragerCollector(lambda: stats))
    metrics.attach(HelperProcessCollector())
    metrics.attach(RecordsRefusedCollector(lambda: 3, lambda: 2))  # as node/runtime/joined.py attaches them
    metrics.attach(RequestsRefusedCollector(lambda: {("avg", "frame_too_large"): 1}))
    return metrics, registry


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    assert value is not None, f"{name}{labels} not exported"
    return value


def test_every_documented_node_metric_is_exported_with_its_type_and_labels():
    stats = AveragingStats()
    stats.reject("malformed")
    _, registry = node_registry(stats)
    exported = families(registry)
    for name, kind, labels in documented("Node metrics"):
        family_name = name[: -len("_total")] if kind == "counter" and name.endswith("_total") else name
        assert family_name in exported, f"{name} is documented but not exported"
        family = exported[family_name]
        assert family.type == kind, f"{name}: documented {kind}, exported {family.type}"
        for s in family.samples:
            if s.name.endswith(("_created", "_bucket")):
                continue
            assert set(s.labels) == labels, f"{name}: documented labels {labels}, exported {set(s.labels)}"
    assert "process_resident_memory_bytes" in {s.name for f in exported.values() for s in f.samples}


def test_every_documented_swarm_metric_is_exported():
    view = SwarmView()
    view.peers["p1"] = PeerRecord(peer_id="p1", modules=["trunk", "expert.0.0"], outer_round=3, local_steps=9, loss=2.0)
    registry = CollectorRegistry()
    registry.register(SwarmViewCollector(lambda: view, ["trunk", "expert.0.0", "expert.0.1"]))
    exported = families(registry)
    for name, kind, labels in documented("Swarm view"):
        assert exported[name].type == kind
        assert all(set(s.labels) == labels for s in exported[name].samples), name
    assert sample(registry, "commons_swarm_view_module_replicas", module="expert.0.1") == 0
    assert sample(registry, "commons_swarm_view_uncovered_modules") == 1
    assert sample(registry, "commons_swarm_view_outer_round", stat="max") == 3


def test_counters_move_with_a_step_a_round_and_a_rejected_part():
    averager = Averager(None, "abc", hosted=lambda: {"trunk"}, spec=AveragingSpec())
    metrics, registry = node_registry(averager.stats)
    metrics.observe_step(samples=16, loss=2.5, seconds=0.25)
    assert sample(registry, "commons_training_steps_total") == 1
    assert sample(registry, "commons_training_step_seconds_total") == 0.25
    assert sample(registry, "commons_training_samples_total") == 16
    assert sample(registry, "commons_training_loss") == 2.5

    outcomes = [
        ModuleOutcome("trunk", 3, 1.0, False, 0.4, "ok", numel=300),
        ModuleOutcome("expert.0.1", 2, 0.5, False, 0.2, "partial", dropped=1, numel=100),
    ]
    metrics.observe_round(outcomes)
    assert sample(registry, "commons_averaging_rounds_total", module_kind="trunk", result="ok") == 1
    assert sample(registry, "commons_averaging_rounds_total", module_kind="expert", result="partial") == 1
    assert sample(registry, "commons_averaging_rounds_total", module_kind="expert", result="failed") == 0
    assert sample(registry, "commons_averaging_round_seconds_count") == 2
    assert sample(registry, "commons_averaging_peers_dropped_total") == 1
    assert sample(registry, "commons_averaging_fraction") == pytest.approx((300 * 1.0 + 100 * 0.5) / 400)

    # A real Averager refusing a garbage frame moves the rejected-parts counter.
    reply = asyncio.run(averager._handle("some-peer", b"\x00\x00\x00\x05garbage"))
    assert b"malformed" in reply  # the refusal code
    assert sample(registry, "commons_averaging_rejected_parts_total", reason="malformed") == 1
    assert sample(registry, "commons_network_received_bytes_total") > 0
