"""Sparse averaging over real streams: three peers (DHT, p2pd, production Averager) on loopback, each its own
process (tests/swarm/averaging_peer.py), with ``compression: sparse``.

Two rounds: every peer ends each with the same vector, and that vector is what the reducers compute from the
peers' sparse parts, error feedback included (the second round's parts carry what the first did not send).
"""

from __future__ import annotations

from typing import Dict

import numpy as np
import pytest

from node.averaging.robust import aggregate
from node.averaging.slices import chunked_bounds, slice_values
from protocol import sparse
from tests.attacks import make_vector
from tests.swarm.averaging_peer import SPEC
from tests.swarm.test_robust_averaging import CHUNK, NUMEL, AveragingSwarm

pytestmark = pytest.mark.swarm
PEERS = 3


def expected_rounds(rounds: int) -> Dict[int, np.ndarray]:
    """Each round's result, computed here: every peer's parts with its error feedback, reduced per slice."""
    spec = SPEC
    layout = chunked_bounds(NUMEL, PEERS, slice_values(CHUNK, "topk2"))
    residual = {i: np.zeros(NUMEL, np.float32) for i in range(PEERS)}
    out = {}
    for r in range(rounds):
        sent = {}
        for i in range(PEERS):
            target = make_vector(r, i, NUMEL) + np.float32(spec.error_feedback) * residual[i]
            sent[i] = np.concatenate([sparse.decode(sparse.encode_topk2(target[lo:hi], spec.topk), hi - lo, "topk2")
                                      for lo, hi in layout])  # fmt: skip
            residual[i] = target - sent[i]
        result = np.empty(NUMEL, np.float32)
        for lo, hi in layout:
            parts = {str(i): sent[i][lo:hi] for i in range(PEERS)}
            combined = aggregate(parts, "0", method=spec.aggregator, clip_multiplier=spec.clip_multiplier,
                                 outlier_ratio=spec.outlier_ratio).values  # fmt: skip
            result[lo:hi] = sparse.decode(sparse.encode_topk8(combined), hi - lo, "topk8")
        out[r] = result
    return out


def test_sparse_rounds_over_real_streams_are_the_aggregate_of_the_sparse_parts(tmp_path):
    swarm = AveragingSwarm(tmp_path, PEERS, ["--compression", "sparse", "--chunk-elements", str(CHUNK),
                                             "--message-ask", "0"])  # fmt: skip
    try:
        expected = expected_rounds(2)
        for r in range(2):
            replies = swarm.average(r, {})
            assert all(reply["fraction"] == 1.0 and reply["group_size"] == PEERS for reply in replies), replies
            results = [swarm.result(i, r) for i in range(PEERS)]
            for result in results:
                np.testing.assert_array_equal(result, results[0])
            np.testing.assert_allclose(results[0], expected[r], rtol=0, atol=1e-6)
            assert np.count_nonzero(results[0]) <= PEERS * SPEC.topk * sparse.block_count(NUMEL) + PEERS * SPEC.topk
    finally:
        leaks = swarm.close()
        assert not any(leaks.values()), f"processes leaked: {leaks}"
