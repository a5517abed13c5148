"""Finding processes by parent or process group, from /proc (Linux), without extra packages."""

from __future__ import annotations

import ctypes
import os
import signal
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

_PR_SET_PDEATHSIG = 1
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ProcStat:
    name: str
    cpu_seconds: float  # user + system, since the process started
    rss_bytes: int


def _live_processes() -> Iterator[Tuple[int, int, int]]:
    """(pid, ppid, process group) of every process that is not a zombie."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # the name may hold spaces and ')'
        except OSError:
            continue  # exited while we looked
        if fields[0] != "Z":
            yield int(entry), int(fields[1]), int(fields[2])


def children_of(pid: int) -> List[int]:
    return [p for p, ppid, _ in _live_processes() if ppid == pid]


def descendants_of(pid: int) -> List[int]:
    """Children, their children and so on (parents before their children), from one pass over /proc."""
    kids: Dict[int, List[int]] = {}
    for p, ppid, _ in _live_processes():
        kids.setdefault(ppid, []).append(p)
    found, stack = [], [pid]
    while stack:  # every process has one parent: no process is reached twice
        children = kids.get(stack.pop(), [])
        found += children
        stack += children
    return found


def read_stat(pid: int) -> Optional[ProcStat]:
    """Name, CPU time and RSS of ``pid``; None once it has exited."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    name = text[text.index("(") + 1 : text.rindex(")")]
    fields = text.rsplit(")", 1)[1].split()
    return ProcStat(name, (int(fields[11]) + int(fields[12])) / _TICKS, int(fields[21]) * _PAGE)


def helper_totals(root_pid: int) -> Dict[str, ProcStat]:
    """CPU time and RSS of the processes under ``root_pid``, summed per helper: "p2pd" (hivemind's
    daemon) and "dht" (the rest: hivemind's DHT process). A helper with no process is left out."""
    totals: Dict[str, ProcStat] = {}
    for pid in descendants_of(root_pid):
        stat = read_stat(pid)
        if stat is None:
            continue
        helper = "p2pd" if stat.name == "p2pd" else "dht"
        seen = totals.get(helper, ProcStat(helper, 0.0, 0))
        totals[helper] = ProcStat(helper, seen.cpu_seconds + stat.cpu_seconds, seen.rss_bytes + stat.rss_bytes)
    return totals


def in_process_group(pgid: int) -> List[int]:
    return [p for p, _, group in _live_processes() if group == pgid]


def die_with_parent(parent: int) -> bool:
    """Ask the kernel for SIGTERM to this process when ``parent`` (its parent's pid now) dies (Linux only:
    elsewhere nothing happens). False when ``parent`` has already died, before the request took effect.
    Safe between fork and exec: no locks, no logging."""
    try:
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux
        pass
    return os.getppid() == parent
