"""node/ops/procs.py on real processes: a child that starts a grandchild, which burns CPU, then waits."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Iterator, Tuple

import pytest

from node.ops.procs import ProcStat, descendants_of, helper_totals, read_stat

pytestmark = pytest.mark.system

BURN = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\ntime.sleep(60)"
CHILD = (
    f"import subprocess, sys\np = subprocess.Popen([sys.executable, '-c', {BURN!r}])\n"
    "print(p.pid, flush=True)\np.wait()"
)


def _stat(pid: int) -> ProcStat:
    stat = read_stat(pid)
    assert stat is not None, f"{pid} has exited"
    return stat


@pytest.fixture
def family() -> Iterator[Tuple[int, int]]:
    """(child, grandchild), once the grandchild has burned its CPU time and sleeps."""
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    grandchild = int(child.stdout.readline())
    try:
        deadline, last = time.monotonic() + 30, -1.0
        while time.monotonic() < deadline:  # until its CPU time stops moving: it sleeps
            seconds = _stat(grandchild).cpu_seconds
            if seconds >= 0.25 and seconds == last:
                break
            last = seconds
            time.sleep(0.1)
        yield child.pid, grandchild
    finally:
        os.kill(grandchild, 9)
        child.wait(10)
        child.stdout.close()
    assert read_stat(grandchild) is None  # reaped by the child, which has exited
    assert not {child.pid, grandchild} & set(descendants_of(os.getpid()))


def test_descendants_and_their_cpu_time(family: Tuple[int, int]) -> None:
    child, grandchild = family
    assert descendants_of(child) == [grandchild]
    mine = descendants_of(os.getpid())
    assert child in mine and grandchild in mine and mine.index(child) < mine.index(grandchild)
    burner, parent = _stat(grandchild), _stat(child)
    assert burner.name.startswith("python")
    assert 0.25 <= burner.cpu_seconds < 5 and parent.cpu_seconds < burner.cpu_seconds
    assert burner.rss_bytes > 1 << 20


def test_helper_totals_sum_per_helper(family: Tuple[int, int]) -> None:
    child, grandchild = family
    totals = helper_totals(child)  # not named p2pd: counted as "dht"
    assert set(totals) == {"dht"}
    assert totals["dht"].cpu_seconds == _stat(grandchild).cpu_seconds  # it sleeps: neither moves
    assert totals["dht"].rss_bytes == _stat(grandchild).rss_bytes
    mine = helper_totals(os.getpid())["dht"]
    assert mine.cpu_seconds >= _stat(child).cpu_seconds + _stat(grandchild).cpu_seconds
