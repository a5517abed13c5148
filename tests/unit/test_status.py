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
    assert first["reachability"] == "unknown"  # a record without the field (an older peer)
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


MANIFEST_MODULES = ["trunk"] + [f"expert.{layer}.{index}" for layer in range(2) for index in range(4)]


def test_every_module_of_the_swarm_is_listed_and_the_figures_agree_with_the_swarm_metrics():
    """A module nobody hosts used to be left out of `node status` (and 'uncovered 0' reported), while
    /metrics/swarm counted it: both now come from one computation over every module of the manifest."""
    from prometheus_client.parser import text_string_to_metric_families

    from node.faces.status import format_prometheus

    status = swarm_status(_view(), "abc123", MANIFEST_MODULES)
    assert [m["module"] for m in status["modules"]] == MANIFEST_MODULES
    replicas = {m["module"]: m["replicas"] for m in status["modules"]}
    assert replicas["expert.0.3"] == 2 and replicas["expert.1.0"] == 1 and replicas["expert.0.0"] == 0
    # 8 experts, 3 expert slots hosted (expert.0.3 twice): 6 without a host; with room for only 3
    # experts, 5 could never be covered, so 1 is uncovered beyond what capacity allows (the duplicate).
    assert (status["uncovered_modules"], status["expert_capacity"], status["uncovered_beyond_capacity"]) == (6, 3, 1)
    samples = {
        (s.name, s.labels.get("module")): s.value
        for family in text_string_to_metric_families(format_prometheus(_view(), MANIFEST_MODULES))
        for s in family.samples
    }
    assert samples[("commons_swarm_view_uncovered_modules", None)] == 6
    assert samples[("commons_swarm_view_expert_capacity", None)] == 3
    assert samples[("commons_swarm_view_uncovered_beyond_capacity", None)] == 1
    assert all(samples[("commons_swarm_view_module_replicas", m)] == n for m, n in replicas.items())
    table = format_table(status)
    assert "expert.0.0=0" in table and "experts without a host: 6 of 8" in table


def test_a_swarm_smaller_than_its_experts_is_not_reported_as_a_fault():
    """The README's demo: two nodes with 4 experts each, 16 experts: 8 uncovered, as capacity allows."""
    modules = ["trunk"] + [f"expert.{layer}.{index}" for layer in range(2) for index in range(8)]
    view = SwarmView()
    for n, hosted in enumerate((modules[1:5], modules[5:9])):
        view.peers[f"p{n}"] = PeerRecord(peer_id=f"p{n}", modules=["trunk", *hosted], outer_round=1, local_steps=9)
    status = swarm_status(view, "s", modules)
    assert (status["uncovered_modules"], status["expert_capacity"], status["uncovered_beyond_capacity"]) == (8, 8, 0)
