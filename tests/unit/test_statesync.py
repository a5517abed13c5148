"""State download checks that need no network: what a donor's reply must look like to be used."""

from __future__ import annotations

import numpy as np
import torch

from node.swarm.statesync import StateDownloader, _hash
from node.training.diloco import ModuleState
from protocol.manifest import OuterOptimizerSpec
from protocol.wire import StateReply


def reply(offset: int, count: int, values: np.ndarray, ok: bool = True):
    return StateReply(ok=ok, offset=offset, count=count, numel=10, params_hash="ab"), values.astype("<f4").tobytes()


def test_a_range_must_match_what_was_asked_and_be_finite():
    downloader = StateDownloader(None, "s", timeout=1.0)
    good = np.arange(4, dtype=np.float32)
    assert np.array_equal(downloader._check(reply(8, 4, good), 8, 4), good)
    assert downloader._check(reply(8, 4, good[:3]), 8, 4) is None  # short payload
    assert downloader._check(reply(0, 4, good), 8, 4) is None  # another range
    assert downloader._check(reply(8, 4, np.array([1, np.nan, 2, 3])), 8, 4) is None
    assert downloader._check(reply(8, 4, good, ok=False), 8, 4) is None
    assert downloader._check(None, 8, 4) is None  # the donor timed out
    assert downloader.rejected == {"wrong_range": 3, "non_finite": 1}


def test_the_download_hash_is_the_one_peers_advertise():
    state = ModuleState("trunk", [torch.nn.Parameter(torch.randn(5))], OuterOptimizerSpec())
    state.momentum = torch.randn(5)
    vector = torch.cat([state.global_flat, state.momentum]).numpy()
    assert _hash(vector, 5) == state.params_hash()
    vector[7] *= 1000
    assert _hash(vector, 5) != state.params_hash()
