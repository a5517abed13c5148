"""Robust aggregation of one slice's parts, and the distances a member checks a reducer's result with.

A reducer combines the parts it received for its slice in three steps:

1. *Outlier screen.* A part whose norm is more than ``outlier_ratio`` times the median
   part norm (the reducer's own part included) is refused and its sender excluded:
   this catches scaled, sign-flipped-and-scaled and "huge but finite" parts outright.
2. *CenteredClip* (Karimireddy, He & Jaggi, 2021; the aggregator of BTARD, Gorbunov et
   al., 2022). Start from the coordinate-wise median, set the clip radius
   ``tau = clip_multiplier * median_i ||x_i - median||`` and iterate
   ``v <- v + mean_i clip(x_i - v, tau)``. With an honest majority, tau is set by honest
   parts, and b Byzantine parts out of k move the fixed point by about ``b * tau / (k - b)``
   however they are chosen: the influence is bounded by the honest spread. A larger
   multiplier clips fewer honest parts (with every part within tau of the mean, the
   first iteration lands on the plain mean) but lets attackers pull further; the default
   manifest uses 1 (the radius is the median distance), which measured best under attack.
3. ``mean`` (for trusted swarms) skips both and averages.

How a member uses ``relative_distance`` and ``lower_median`` to check a reducer's result:
node/averaging/resultcheck.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

CLIP_ITERATIONS = 10
CLIP_TOLERANCE = 1e-3  # stop when a step moves the center by less than this share of the clip radius


@dataclass(frozen=True)
class Aggregate:
    values: np.ndarray  # float32
    used: Tuple[str, ...]  # senders whose parts went into ``values``
    outliers: Tuple[str, ...]  # senders refused by the norm screen
    radius: float  # CenteredClip's tau (0 for the mean)
    clipped: Tuple[str, ...]  # senders clipped in the final iteration


def screen_outliers(parts: Dict[str, np.ndarray], trusted: str, ratio: float) -> Tuple[List[str], List[str]]:
    """(kept, refused) sender lists: refused parts are far longer than the median part."""
    norms = {sender: float(np.sqrt(_squared_norm(np.asarray(values, np.float32)))) for sender, values in parts.items()}
    median = float(np.median(list(norms.values())))
    limit = ratio * max(median, 1e-30)
    kept = [s for s in parts if s == trusted or norms[s] <= limit]
    return kept, [s for s in parts if s not in kept]


def centered_clip(stack: np.ndarray, multiplier: float) -> Tuple[np.ndarray, float, np.ndarray]:
    """CenteredClip over the rows of ``stack``: (center, tau, clipped-row mask of the last iteration).

    float32 throughout (a slice can hold millions of values); norms are accumulated in float64."""
    rows = np.ascontiguousarray(stack, dtype=np.float32)
    center = coordinate_median(rows)
    diff = rows - center
    radius = multiplier * float(np.median(_row_norms(diff)))
    clipped = np.zeros(len(rows), dtype=bool)
    if radius <= 0:  # a majority of identical parts: their value is the center
        return center, 0.0, clipped
    for _ in range(CLIP_ITERATIONS):
        scale = np.minimum(1.0, radius / np.maximum(_row_norms(diff), 1e-30))
        clipped = scale < 1.0
        step = (scale.astype(np.float32) @ diff) / len(rows)
        center += step
        if float(np.linalg.norm(step.astype(np.float64))) <= CLIP_TOLERANCE * radius:
            break
        np.subtract(rows, center, out=diff)
    return center, radius, clipped


def coordinate_median(rows: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """np.median(rows, axis=0) for float32 rows, several times faster on a few long rows: with 3 or 4
    rows by pairwise min/max (a selection, so where most rows agree the median is their value, bit for
    bit: a re-sync's result can then be checked against the majority's state hash); otherwise column
    blocks are sorted in cache-sized pieces."""
    k = len(rows)
    if k == 3:
        low, high = np.minimum(rows[0], rows[1]), np.maximum(rows[0], rows[1])
        median: np.ndarray = np.maximum(low, np.minimum(high, rows[2]))
        return median
    if k == 4:  # the two middle values are the larger of the pair minimums and the smaller of the maximums
        low = np.maximum(np.minimum(rows[0], rows[1]), np.minimum(rows[2], rows[3]))
        high = np.minimum(np.maximum(rows[0], rows[1]), np.maximum(rows[2], rows[3]))
        low *= np.float32(0.5)  # halves first: no overflow near the float32 limit, and exact for equal halves
        high *= np.float32(0.5)
        low += high
        return np.asarray(low)
    out = np.empty(rows.shape[1], dtype=np.float32)
    for start in range(0, rows.shape[1], chunk):
        block = np.sort(rows[:, start : start + chunk].T, axis=1)
        upper = block[:, k // 2]
        out[start : start + chunk] = upper if k % 2 else (block[:, k // 2 - 1] + upper) * np.float32(0.5)
    return out


def _row_norms(rows: np.ndarray) -> np.ndarray:
    return np.sqrt(np.array([_squared_norm(row) for row in rows], dtype=np.float64))


def _squared_norm(values: np.ndarray) -> float:
    # BLAS dot on float32: no float64 copy of a slice of millions of values (a float32 sum of squares
    # is accurate to ~1e-6 relative, far inside every tolerance these norms are compared with).
    # A part with values beyond ~1e19 (an attacker's x1e30) overflows to inf, which is the right answer: no
    # finite limit admits it. So that overflow is expected, and not worth a RuntimeWarning on every such part.
    with np.errstate(over="ignore"):
        return float(np.dot(values, values))


def _mean(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Float32 mean accumulated in place (no stacked float64 copy); the reducer's result is what
    everyone applies, so this needs no bit-exact agreement with anyone."""
    total = np.array(parts[0], dtype=np.float32, copy=True)
    for part in parts[1:]:
        total += part
    total *= np.float32(1.0 / len(parts))
    return total


def aggregate(
    parts: Dict[str, np.ndarray], trusted: str, *, method: str, clip_multiplier: float, outlier_ratio: float
) -> Aggregate:
    """Combine one slice's parts (``trusted`` is the reducer's own, never refused)."""
    if method == "mean" or len(parts) < 3:
        # Two parts cannot outvote each other: robust statistics need a third opinion.
        senders = sorted(parts)
        return Aggregate(_mean([parts[s] for s in senders]), tuple(senders), (), 0.0, ())
    kept, outliers = screen_outliers(parts, trusted, outlier_ratio)
    senders = sorted(kept)
    if len(senders) < 3:
        return Aggregate(_mean([parts[s] for s in senders]), tuple(senders), tuple(sorted(outliers)), 0.0, ())
    stack = np.stack([parts[s] for s in senders])
    center, radius, clipped = centered_clip(stack, clip_multiplier)
    was_clipped = tuple(s for s, c in zip(senders, clipped, strict=True) if c)
    return Aggregate(center, tuple(senders), tuple(sorted(outliers)), radius, was_clipped)


def relative_distance(result: np.ndarray, own: np.ndarray) -> float:
    """||result - own|| / ||own||; 0 for two empty or all-zero equal vectors."""
    own = np.asarray(own, dtype=np.float32)
    diff = float(np.sqrt(_squared_norm(np.asarray(result, dtype=np.float32) - own)))
    scale = float(np.sqrt(_squared_norm(own)))
    if diff == 0.0:
        return 0.0
    return diff / scale if scale > 0 else float("inf")


def region_spans(lo: int, hi: int, regions: Sequence[int]) -> List[Tuple[int, int, int]]:
    """(region index, start, end) pieces of [lo, hi) cut at region boundaries."""
    pieces, start = [], 0
    for index, length in enumerate(regions):
        a, b = max(lo, start), min(hi, start + length)
        if b - a > 0:
            pieces.append((index, a, b))
        start += length
    return pieces


def lower_median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2] if ordered else 0.0
