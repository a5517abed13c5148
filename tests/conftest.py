"""Shared fixtures: Debian's prometheus and promtool binaries, found on PATH.

Tests install nothing: `make test` installs Debian's prometheus package when it is missing and make runs
as root (`make system-packages`), as under CI. Elsewhere the tests that need it are skipped, with the
command to run as the reason; under CI (CI=true, which .ci/run sets) a missing binary fails them instead.
"""

from __future__ import annotations

import os
import shutil
from typing import Dict

import pytest

INSTALL = "sudo apt-get install --no-install-recommends prometheus"


def under_ci() -> bool:
    """True where a skipped test would hide a broken CI machine: CI=true (GitHub Actions, GitLab, .ci/run)."""
    return os.environ.get("CI", "").lower() in ("true", "1")


@pytest.fixture(scope="session")
def prometheus_bin() -> Dict[str, str]:
    """{"prometheus": path, "promtool": path}; skips (fails under CI) when either is not on PATH."""
    found = {name: shutil.which(name) for name in ("prometheus", "promtool")}
    missing = sorted(name for name, path in found.items() if path is None)
    if missing:
        reason = f"{' and '.join(missing)} not on PATH: install Debian's prometheus package ({INSTALL})"
        if under_ci():
            pytest.fail(f"{reason}; under CI this test must run, not be skipped", pytrace=False)
        pytest.skip(reason)
    return {name: path for name, path in found.items() if path is not None}
