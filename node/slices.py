"""Where each value of a module's vector travels in an all-reduce: slices, chunks, reducers.

Every member of a group computes the same layout from the vector's length, the group size and
the manifest's ``chunk_elements``, so nothing about it crosses the wire.
"""

from __future__ import annotations

from typing import List, Tuple

MAX_SLICES = 4096  # protocol/wire.py's bound on slice_index


def slice_bounds(numel: int, parts: int) -> List[Tuple[int, int]]:
    """Contiguous near-equal slices; the first ``numel % parts`` are one element longer."""
    base, extra = divmod(numel, parts)
    bounds, start = [], 0
    for index in range(parts):
        end = start + base + (1 if index < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def chunked_bounds(numel: int, size: int, chunk_elements: int) -> List[Tuple[int, int]]:
    """Slice bounds of a group of ``size``: ``size`` slices per chunk, chunk after chunk."""
    chunks = max(1, min(-(-numel // max(1, size * chunk_elements)), MAX_SLICES // size))
    return slice_bounds(numel, size * chunks)


def owner_of(index: int, size: int) -> int:
    """The member (index in the group) that reduces slice ``index``."""
    return index % size


def backup_of(index: int, size: int) -> int:
    """The member that reduces slice ``index`` again when its reducer failed."""
    return (index + 1) % size
