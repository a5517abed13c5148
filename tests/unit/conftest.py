"""The unit tier's rule, enforced: a unit test starts no process and opens no network socket.

While a unit test runs (its function-scoped fixtures included), starting a process or creating an
AF_INET/AF_INET6 socket raises ``UnitTierViolation``; a test whose code under test caught and swallowed
that error still fails, at teardown. Tests that need real processes, sockets, mounts or system binaries
belong in tests/system (one test process and the real OS), tests/swarm (several peers on loopback) or
tests/e2e (real ``node`` processes).

How: a ``sys.addaudithook`` hook sees what CPython itself reports, whoever makes the call (code that did
``from subprocess import Popen`` included): ``subprocess.Popen``, ``os.fork``/``forkpty``, ``os.posix_spawn``,
``os.system``, ``os.exec*``, and ``socket.__new__``/``bind``/``connect``. asyncio's own AF_UNIX socketpair is
allowed. multiprocessing's spawn and forkserver start children through ``_posixsubprocess.fork_exec``, which
reports no audit event, so the fixture patches that one function too. An audit hook cannot be removed: it
is added once, when pytest imports this file, and returns at once while no unit test runs.
"""

from __future__ import annotations

import _posixsubprocess
import socket
import sys
from typing import Any, Callable, Generator, Iterator, List, Set, Tuple

import pytest

PROCESS_EVENTS = frozenset(
    {"subprocess.Popen", "os.fork", "os.forkpty", "os.posix_spawn", "os.system", "os.exec", "os.spawn"}
)
NETWORK_FAMILIES = (socket.AF_INET, socket.AF_INET6)
WHERE_INSTEAD = (
    "move the test to tests/system (real OS resources), tests/swarm (peers on loopback) or tests/e2e (`node` processes)"
)
FAILED = pytest.StashKey[bool]()


class UnitTierViolation(RuntimeError):
    """A unit test started a process or opened a network socket."""


class _Guard:
    """On while a unit test runs; what it refused since it was turned on."""

    def __init__(self) -> None:
        self.active = False
        self.refused: List[str] = []

    def refuse(self, what: str) -> None:
        if self.active:
            self.refused.append(what)
            raise UnitTierViolation(
                f"unit tests start no processes and open no network sockets: {what}; {WHERE_INSTEAD}"
            )


_guard = _Guard()


def _audit(event: str, args: Tuple[Any, ...]) -> None:
    if not _guard.active:  # checked first: the hook runs on every audited call of the whole session
        return
    if event in PROCESS_EVENTS:
        _guard.refuse(f"{event}{args[:2]!r}")
    elif event == "socket.__new__" and args[1] in NETWORK_FAMILIES:
        _guard.refuse(f"socket({socket.AddressFamily(args[1]).name})")
    elif event in ("socket.bind", "socket.connect") and args[0].family in NETWORK_FAMILIES:
        # A socket wrapped around an existing descriptor reports family -1 to socket.__new__: caught here.
        args[0].close()
        _guard.refuse(f"{event}({args[1]!r})")


sys.addaudithook(_audit)


def _refusing(fork_exec: Callable[..., int]) -> Callable[..., int]:
    def guarded_fork_exec(*args: Any, **kwargs: Any) -> int:
        _guard.refuse(f"_posixsubprocess.fork_exec({args[0]!r})")
        return fork_exec(*args, **kwargs)

    return guarded_fork_exec


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Remember whether setup or the test failed, so that a refusal which did fail it is not reported twice."""
    report = yield
    if report.failed and report.when in ("setup", "call"):
        item.stash[FAILED] = True
    return report


@pytest.fixture(autouse=True)
def no_processes_or_network_sockets(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Autouse, so it is set up before, and torn down after, the test's other function-scoped fixtures."""
    monkeypatch.setattr(_posixsubprocess, "fork_exec", _refusing(_posixsubprocess.fork_exec))
    _guard.refused.clear()
    _guard.active = True
    try:
        yield
    finally:
        _guard.active = False
    if _guard.refused and not request.node.stash.get(FAILED, False):
        pytest.fail(
            f"the code under test swallowed a refusal: {', '.join(_guard.refused)}; {WHERE_INSTEAD}", pytrace=False
        )


@pytest.fixture(scope="module")
def served() -> Set[str]:
    """The HTTP paths the node answers, asked of its own request handler (tests/deploy_checks.py)."""
    from tests.deploy_checks import served_paths

    return served_paths()
