"""The node's HTTP endpoints on a real loopback socket: /metrics, /healthz and /readyz, and 404 elsewhere."""

from __future__ import annotations

import json

import pytest
from prometheus_client import CollectorRegistry

from node.averaging.averager import AveragingStats
from node.ops.endpoints import Endpoints, Health
from tests.procs import http_get
from tests.unit.test_metrics import node_registry

pytestmark = pytest.mark.system


def test_endpoints_serve_metrics_health_and_readiness() -> None:
    now = [100.0]
    health = Health(stall_seconds=30, clock=lambda: now[0])
    metrics, registry = node_registry(AveragingStats())
    endpoints = Endpoints("127.0.0.1", 0, registry, CollectorRegistry(), health)
    try:
        code, body = http_get(endpoints.url("/metrics"))
        assert code == 200 and b"commons_training_steps_total" in body
        assert http_get(endpoints.url("/healthz"))[0] == 503 and http_get(endpoints.url("/readyz"))[0] == 503
        health.progress()
        health.joined = True
        assert http_get(endpoints.url("/healthz"))[0] == 200 and http_get(endpoints.url("/readyz"))[0] == 200
        now[0] += 31  # no progress for longer than stall_seconds
        code, body = http_get(endpoints.url("/healthz"))
        assert code == 503 and "no training progress" in json.loads(body)["reason"]
        health.progress()
        health.data_error = "file gone"
        code, body = http_get(endpoints.url("/healthz"))
        assert code == 503 and "data source" in json.loads(body)["reason"]
        health.data_error = None
        assert http_get(endpoints.url("/healthz"))[0] == 200
        assert http_get(endpoints.url("/nope"))[0] == 404
    finally:
        endpoints.close()
