"""Finding processes by parent or process group, from /proc (Linux), without extra packages."""

from __future__ import annotations

import os
from typing import Iterator, List, Tuple


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


def in_process_group(pgid: int) -> List[int]:
    return [p for p, _, group in _live_processes() if group == pgid]
