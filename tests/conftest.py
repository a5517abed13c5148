"""Shared fixtures: Debian's prometheus/promtool, installed on first use where we can."""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Dict, Optional

import pytest


def _install_prometheus() -> Optional[str]:
    """Install Debian's prometheus package if missing; return why not, or None when available."""
    if shutil.which("prometheus") and shutil.which("promtool"):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "needs Debian's prometheus package (apt-get install prometheus, as root)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"]
    for attempt in (install, ["apt-get", "update", "-qq"], install):
        subprocess.run(attempt, env=env, capture_output=True, timeout=600)
        if shutil.which("prometheus") and shutil.which("promtool"):
            return None
    return "could not install Debian's prometheus package with apt-get"


@pytest.fixture(scope="session")
def prometheus_bin() -> Dict[str, str]:
    reason = _install_prometheus()
    if reason:
        pytest.skip(reason)
    return {"prometheus": shutil.which("prometheus") or "", "promtool": shutil.which("promtool") or ""}
