"""deploy/: the Prometheus config and alert rules pass Debian's promtool (found by tests/conftest.py)."""

from __future__ import annotations

import subprocess
from typing import Dict

import pytest

from tests.procs import REPO

pytestmark = pytest.mark.system

PROMETHEUS_DIR = REPO / "deploy" / "prometheus"


def test_promtool_accepts_config_and_rules(prometheus_bin: Dict[str, str]) -> None:
    # alerts_test.yml: the experts-without-host alert stays quiet in the two-node demo and fires when the
    # peers have room for the experts they leave uncovered.
    checks = (
        ["check", "config", "prometheus.yml"], ["check", "config", "prometheus-compose.yml"],
        ["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"],
    )
    for args in checks:
        done = subprocess.run([prometheus_bin["promtool"], *args], cwd=PROMETHEUS_DIR, capture_output=True)
        assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
