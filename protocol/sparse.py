"""Sparse tensor payloads: a few values of each block of a vector, with their positions.

The averaging compression ``sparse`` (protocol/manifest.py) sends, of each block of ``BLOCK`` values of a
pseudo-gradient, only the ``topk`` largest in magnitude, each in 2 bits (``topk2``; after SparseLoCo, Sarfi et
al. 2025: top-k, 2-bit values, error feedback). A reducer's result holds every position some member sent, so it
goes back as ``topk8``: every nonzero value of the block, in 8 bits.

Layout of a vector of ``numel`` values in ``ceil(numel / BLOCK)`` blocks (the last one may be shorter), all
little-endian:

- ``counts``: one uint16 per block, the values of that block sent (at most the block's length);
- ``positions``: one 12-bit position within its block per value sent, strictly increasing within a block,
  packed two to 3 bytes (the first in the low 12 bits), with a zero pad when the total is odd;
- ``topk2``: per block two float32 magnitudes (low, high), then 2 bits per value, four to a byte from the
  lowest bits up (bit 0: the sign, 1 negative; bit 1: the level, 1 high), pad bits zero;
- ``topk8``: per block one float32 scale, then one int8 per value: value = code x scale / 127.

Every value not sent is zero. ``decode`` checks all of it (lengths, counts, order, positions, scales,
finiteness) and raises SparseError with a one-line reason: a peer's bad payload never reaches a reducer.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

BLOCK = 4096  # values per block; positions fit 12 bits
SPARSE_DTYPES = ("topk2", "topk8")


class SparseError(ValueError):
    """A sparse payload is malformed."""


def block_count(numel: int) -> int:
    return -(-numel // BLOCK)


def payload_size(sent: int, numel: int, dtype: str) -> int:
    """Bytes of a payload of ``numel`` values of which ``sent`` are sent."""
    blocks = block_count(numel)
    head = 2 * blocks + 3 * (-(-sent // 2))
    if dtype == "topk2":
        return head + 8 * blocks + -(-sent // 4)
    if dtype == "topk8":
        return head + 4 * blocks + sent
    raise SparseError(f"unknown sparse dtype {dtype!r}")


def size_of(values: np.ndarray, dtype: str) -> int:
    """Bytes of ``values`` (as a receiver decoded them) sent as ``dtype``: every nonzero value is one sent."""
    return payload_size(int(np.count_nonzero(values)), int(values.size), dtype)


def _rows(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float32).reshape(-1)
    padded = np.zeros(block_count(values.size) * BLOCK, dtype=np.float32)
    padded[: values.size] = values
    return padded.reshape(-1, BLOCK)


def _pack12(positions: np.ndarray) -> bytes:
    p = positions.astype(np.uint16)
    if p.size % 2:
        p = np.append(p, np.uint16(0))
    a, b = p[0::2], p[1::2]
    out = np.empty((a.size, 3), dtype=np.uint8)
    out[:, 0] = a & 0xFF
    out[:, 1] = (a >> 8) | ((b & 0xF) << 4)
    out[:, 2] = b >> 4
    return out.tobytes()


def _unpack12(raw: bytes, total: int) -> np.ndarray:
    triples = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int64)
    out = np.empty(2 * len(triples), dtype=np.int64)
    out[0::2] = triples[:, 0] | ((triples[:, 1] & 0xF) << 8)
    out[1::2] = (triples[:, 1] >> 4) | (triples[:, 2] << 4)
    if out.size > total and out[total:].any():
        raise SparseError("sparse payload has a nonzero position pad")
    return out[:total]


def encode_topk2(values: np.ndarray, topk: int) -> bytes:
    """The ``topk`` largest-magnitude nonzero values of each block, in 2 bits: a sign, and one of two magnitudes
    per block (the mean magnitude of the values at or below the block's median magnitude, and of those above)."""
    rows = _rows(values)
    k = max(1, min(int(topk), BLOCK))
    magnitudes = np.abs(rows)
    if k < BLOCK:
        chosen = np.argpartition(magnitudes, BLOCK - k, axis=1)[:, BLOCK - k :]
    else:
        chosen = np.broadcast_to(np.arange(BLOCK), rows.shape).copy()
    chosen.sort(axis=1)
    picked = np.take_along_axis(rows, chosen, axis=1)
    size = np.abs(picked)
    keep = size > 0
    counts = keep.sum(axis=1)
    # The median kept magnitude per block: kept values sort first once the rest are +inf.
    ordered = np.sort(np.where(keep, size, np.inf), axis=1)
    middle = np.take_along_axis(ordered, np.maximum(counts - 1, 0)[:, None] // 2, axis=1)[:, 0]
    high = keep & (size > middle[:, None])
    low = keep & ~high
    wide = size.astype(np.float64)
    low_mean = (wide * low).sum(axis=1) / np.maximum(low.sum(axis=1), 1)
    high_mean = (wide * high).sum(axis=1) / np.maximum(high.sum(axis=1), 1)
    scales = np.stack([low_mean, high_mean], axis=1).astype("<f4")
    codes = ((picked < 0).astype(np.uint8) | (high.astype(np.uint8) << 1))[keep]
    if codes.size % 4:
        codes = np.append(codes, np.zeros(4 - codes.size % 4, dtype=np.uint8))
    quads = codes.reshape(-1, 4)
    packed = (quads[:, 0] | (quads[:, 1] << 2) | (quads[:, 2] << 4) | (quads[:, 3] << 6)).astype(np.uint8)
    return bytes(counts.astype("<u2").tobytes() + _pack12(chosen[keep]) + scales.tobytes() + packed.tobytes())


def encode_topk8(values: np.ndarray) -> bytes:
    """Every nonzero value, in 8 bits scaled by its block's largest magnitude."""
    rows = _rows(values)
    keep = rows != 0
    counts = keep.sum(axis=1)
    _, positions = np.nonzero(keep)  # row-major: increasing within each block
    scales = np.abs(rows).max(axis=1).astype(np.float64)
    picked = rows[keep].astype(np.float64)
    per_value = np.repeat(np.where(scales > 0, scales, 1.0), counts)
    codes = np.clip(np.rint(picked / per_value * 127.0), -127, 127).astype(np.int8)
    return bytes(counts.astype("<u2").tobytes() + _pack12(positions) + scales.astype("<f4").tobytes() + codes.tobytes())


def encode(values: np.ndarray, dtype: str, topk: int = BLOCK) -> bytes:
    if dtype == "topk2":
        return encode_topk2(values, topk)
    if dtype == "topk8":
        return encode_topk8(values)
    raise SparseError(f"unknown sparse dtype {dtype!r}")


def decode(payload: bytes | memoryview, numel: int, dtype: str) -> np.ndarray:
    """The float32 vector a sparse payload holds; SparseError unless every part of it is well-formed."""
    if dtype not in SPARSE_DTYPES:
        raise SparseError(f"unknown sparse dtype {dtype!r}")
    raw = bytes(payload)
    blocks = block_count(numel)
    if len(raw) < 2 * blocks:
        raise SparseError(f"sparse payload has {len(raw)} bytes, too few for {blocks} block counts")
    counts = np.frombuffer(raw[: 2 * blocks], dtype="<u2").astype(np.int64)
    lengths = np.full(blocks, BLOCK, dtype=np.int64)
    if blocks:
        lengths[-1] = numel - BLOCK * (blocks - 1)
    if (counts > lengths).any():
        raise SparseError("sparse payload sends more values than a block holds")
    total = int(counts.sum())
    expected = payload_size(total, numel, dtype)
    if len(raw) != expected:
        raise SparseError(f"sparse payload has {len(raw)} bytes, its counts need {expected}")
    offset = 2 * blocks
    positions = _unpack12(raw[offset : offset + 3 * (-(-total // 2))], total)
    offset += 3 * (-(-total // 2))
    block_of = np.repeat(np.arange(blocks), counts)
    if (positions >= lengths[block_of]).any():
        raise SparseError("sparse payload has a position past its block's end")
    same_block = block_of[1:] == block_of[:-1]
    if (np.diff(positions)[same_block] <= 0).any():
        raise SparseError("sparse payload positions are not strictly increasing within a block")
    values, offset = _values(raw, offset, blocks, counts, total, dtype)
    if not np.isfinite(values).all():
        raise SparseError("sparse payload holds NaN or infinite values")
    out = np.zeros(numel, dtype=np.float32)
    out[block_of * BLOCK + positions] = values
    return out


def _values(raw: bytes, offset: int, blocks: int, counts: np.ndarray, total: int, dtype: str) -> Tuple[np.ndarray, int]:
    width = 2 if dtype == "topk2" else 1
    scales = np.frombuffer(raw[offset : offset + 4 * width * blocks], dtype="<f4").reshape(blocks, width)
    offset += 4 * width * blocks
    if not (np.isfinite(scales).all() and (scales >= 0).all()):
        raise SparseError("sparse payload has a negative or non-finite scale")
    if dtype == "topk8":
        codes = np.frombuffer(raw[offset : offset + total], dtype=np.int8).astype(np.float32)
        return codes * np.repeat(scales[:, 0] / np.float32(127.0), counts), offset + total  # |value| <= scale
    packed = np.frombuffer(raw[offset:], dtype=np.uint8)
    pairs = np.stack([(packed >> shift) & 3 for shift in (0, 2, 4, 6)], axis=1).reshape(-1)
    if pairs[total:].any():
        raise SparseError("sparse payload has nonzero pad bits")
    bits = pairs[:total]
    level = np.repeat(np.arange(blocks), counts) * 2 + (bits >> 1)
    magnitude = scales.reshape(-1)[level]
    return np.where(bits & 1, -magnitude, magnitude).astype(np.float32), offset + len(packed)
