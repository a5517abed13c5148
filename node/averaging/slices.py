"""Where each value of a module's vector travels in an all-reduce: slices, chunks, reducers.

Every member of a group computes the same layout from the vector's length, the group size and
the manifest's ``chunk_elements``, so nothing about it crosses the wire.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

MAX_SLICES = 4096  # protocol/wire.py's bound on slice_index
# Values of a wire dtype that take the bytes of one float32 value.
# Sparse slices (protocol/sparse.py) hold 16x as many: a part then sends about 1/9 of a float32 slice's bytes
# (64 of 4096 values at 2 bits and 12-bit positions) and a group of four's result (up to four times the values, at
# 8 bits) about 1/4, still few messages per module.
_PER_FLOAT32 = {"float32": 1, "float16": 2, "int8": 4, "topk2": 16, "topk8": 16}


def slice_values(chunk_elements: int, dtype: str) -> int:
    """Values per slice for ``dtype``: the manifest's ``chunk_elements`` counts float32 values, so a
    message carries about the same bytes whatever the compression (measured over 100 Mbit/s links:
    256 KB messages beat 1 MB ones for fp32 and fp16, and 64 KB int8 messages cost more per message
    than they saved)."""
    return chunk_elements * _PER_FLOAT32[dtype]


def slice_bounds(numel: int, parts: int) -> List[Tuple[int, int]]:
    """Contiguous near-equal slices; the first ``numel % parts`` are one element longer."""
    base, extra = divmod(numel, parts)
    bounds, start = [], 0
    for index in range(parts):
        end = start + base + (1 if index < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def chunked_bounds(numel: int, size: int, chunk_elements: int, max_slices: int = MAX_SLICES) -> List[Tuple[int, int]]:
    """Slice bounds of a group of ``size``: ``size`` slices per chunk, chunk after chunk."""
    chunks = max(1, min(-(-numel // max(1, size * chunk_elements)), max_slices // size))
    return slice_bounds(numel, size * chunks)


def region_bounds(regions: Sequence[int], size: int, chunk_elements: int) -> List[Tuple[int, int]]:
    """``chunked_bounds`` of each region in turn, so that no slice holds values of two regions (a
    re-sync's pseudo-gradient, parameters and momentum are aggregated and checked apart)."""
    bounds: List[Tuple[int, int]] = []
    offset = 0
    for length in regions:
        cap = max(size, MAX_SLICES // len(regions))
        bounds += [(offset + lo, offset + hi) for lo, hi in chunked_bounds(length, size, chunk_elements, cap)]
        offset += length
    return bounds


def owner_of(index: int, reducers: Sequence[int]) -> int:
    """The member (index in the group) that reduces slice ``index``: the reducers take slices in turn."""
    return reducers[index % len(reducers)]


def backup_of(index: int, reducers: Sequence[int]) -> int:
    """The member that reduces slice ``index`` again when its reducer failed: the next reducer."""
    return reducers[(index + 1) % len(reducers)]
