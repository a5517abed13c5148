"""deploy/: the dashboard and the alert rules only use metrics a node exports.

promtool's check of the Prometheus config and alert rules: tests/system/test_promtool.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

from node.averaging.averager import AveragingStats
from node.ops.metrics import AveragerCollector, HelperProcessCollector, NodeMetrics, SwarmViewCollector
from node.swarm.membership import SwarmView

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def exported_names() -> set:
    """Every series name a node serves on /metrics and /metrics/swarm (with histogram/counter suffixes)."""
    registry = CollectorRegistry()
    metrics = NodeMetrics(registry, version="0", swarm_id="x", protocol_version=1)
    stats = AveragingStats()
    stats.reject("malformed")
    metrics.attach(AveragerCollector(lambda: stats))
    metrics.attach(HelperProcessCollector())
    registry.register(SwarmViewCollector(lambda: SwarmView(), ["trunk"]))
    text = generate_latest(registry).decode()
    return set(re.findall(r"^# (?:HELP|TYPE) (\w+)", text, re.M)) | set(re.findall(r"^(\w+)[{ ]", text, re.M))


def test_dashboard_loads_and_uses_only_exported_metrics():
    dashboard = json.loads((DEPLOY / "grafana" / "commons-dashboard.json").read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert len(expressions) >= 10
    known = exported_names()
    for expr in expressions:
        names = re.findall(r"\b((?:commons|process)_\w+)", expr)
        assert names, f"panel expression uses no node metric: {expr}"
        for name in names:
            assert name in known, f"dashboard uses {name}, which no node exports"


def test_alerts_use_only_exported_metrics():
    text = (DEPLOY / "prometheus" / "alerts.yml").read_text()
    known = exported_names()
    for name in set(re.findall(r"\b(commons_\w+)", text)):
        assert name in known, f"alert uses {name}, which no node exports"
