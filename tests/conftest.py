"""Shared fixtures: programs the tests run that are not Python packages (prometheus, promtool, chromium,
systemd-analyze, hadolint...), found on PATH or beside this interpreter.

Tests install nothing: `make test` installs the Debian packages when they are missing and make runs as root
(`make system-packages`), as under CI; the dev extras bring the rest. Elsewhere the tests that need a missing
program are skipped, with the command to run as the reason; under CI (CI=true, which .ci/run sets) a missing
program fails them instead.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

import pytest

INSTALL = "sudo apt-get install --no-install-recommends prometheus"


def under_ci() -> bool:
    """True where a skipped test would hide a broken CI machine: CI=true (GitHub Actions, GitLab, .ci/run)."""
    return os.environ.get("CI", "").lower() in ("true", "1")


def unavailable(reason: str) -> None:
    """Skip the test for ``reason`` (what is missing and how to install it); fail it instead under CI."""
    if under_ci():
        pytest.fail(f"{reason}; under CI this test must run, not be skipped", pytrace=False)
    pytest.skip(reason)


def find_program(name: str) -> Optional[str]:
    """``name`` beside this interpreter (a program the dev extras install into the virtualenv), else on PATH."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else shutil.which(name)


def require_programs(names: Sequence[str], install: str) -> Dict[str, str]:
    """{name: path} of every program in ``names``, or skip (fail under CI) naming the missing ones and
    ``install``, the command that provides them."""
    found = {name: find_program(name) for name in names}
    missing = sorted(name for name, path in found.items() if path is None)
    if missing:
        unavailable(f"{' and '.join(missing)} not found: {install}")
    return {name: path for name, path in found.items() if path is not None}


@pytest.fixture(scope="session")
def prometheus_bin() -> Dict[str, str]:
    """{"prometheus": path, "promtool": path}: Debian's prometheus package."""
    return require_programs(("prometheus", "promtool"), f"install Debian's prometheus package ({INSTALL})")
