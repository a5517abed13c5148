"""The containers tier: deploy/Dockerfile and deploy/compose.yaml, built and run with podman.

Not part of the default suite (it builds images: minutes the first time, ~1.5 GB of disk): it runs on its
own, `make test-containers` (`pytest -m containers tests/containers`), which installs podman, runc,
debootstrap and the CNI dnsname plugin first when make runs as root. Without `-m containers` its tests
are skipped. Without those packages they are skipped, with the command that installs them as the reason,
except under CI (CI=true), where they fail.
"""

from __future__ import annotations

from typing import Dict, Iterator, List

import pytest

from tests.conftest import require_programs, unavailable
from tests.containers import podman

TIER = "the containers tier runs on its own: make test-containers (pytest -m containers tests/containers)"


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    if "containers" in (config.option.markexpr or ""):
        return
    for item in items:
        if item.get_closest_marker("containers") is not None:
            item.add_marker(pytest.mark.skip(reason=TIER))


@pytest.fixture(scope="session")
def images() -> Dict[str, float]:
    """Builds (or reuses) the base, node and Prometheus images; seconds each build took."""
    missing = podman.missing_tools()
    if missing:
        unavailable(f"{', '.join(missing)} not found: {podman.INSTALL}")
    return podman.build_images()


@pytest.fixture
def scope() -> Iterator[podman.Scope]:
    made = podman.Scope()
    yield made
    left = made.remove()
    assert not left, f"podman resources left behind: {left}"


@pytest.fixture(scope="session")
def podman_compose() -> str:
    """podman-compose from the dev extras (next to this interpreter) or PATH."""
    return require_programs(("podman-compose",), "pip install -e '.[dev]'")["podman-compose"]
