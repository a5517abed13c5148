"""`node status` output: the documented JSON shape and the human table, from peer records."""

from __future__ import annotations

import json

from node.faces.status import format_table, swarm_status
from node.swarm.membership import SwarmView
from protocol.records import PeerRecord


def _view() -> SwarmView:
    view = SwarmView()
    view.peers["peer-b"] = PeerRecord(
        peer_id="peer-b", modules=["trunk", "expert.1.0", "expert.0.3"], outer_round=4, local_steps=200, loss=2.5
    )
    view.peers["peer-a"] = PeerRecord(
        peer_id="peer-a",
        modules=["trunk", "expert.0.3"],
        outer_round=5,
        local_steps=250,
        loss=None,
        samples_per_second=120.5,
    )
    view.seen_at.update({"peer-a": 1000.0, "peer-b": 999.5})
    return view


def test_status_json_has_the_documented_shape():
    status = swarm_status(_view(), "abc123")
    json.dumps(status)  # plain data only
    assert status["swarm_id"] == "abc123"
    assert [p["peer_id"] for p in status["peers"]] == ["peer-a", "peer-b"]
    first = status["peers"][0]
    assert set(first) >= {"peer_id", "modules", "outer_round", "local_steps", "loss", "samples_per_second", "last_seen"}
    assert first["loss"] is None and first["samples_per_second"] == 120.5 and first["last_seen"] == 1000.0
    assert status["modules"] == [
        {"module": "trunk", "replicas": 2},
        {"module": "expert.0.3", "replicas": 2},
        {"module": "expert.1.0", "replicas": 1},
    ]


def test_status_table_is_readable():
    table = format_table(swarm_status(_view(), "abc123"))
    assert table.splitlines()[0] == "swarm abc123: 2 peer(s)"
    assert "trunk=2" in table and "expert.1.0=1" in table
    assert "2.500" in table and "120.5" in table
    row_b = next(line for line in table.splitlines() if "peer-b" in line)
    assert "trunk, expert.1.0, expert.0.3" in row_b
