"""Unit tests for expert placement: initial choice and re-placement of uncovered experts."""

from __future__ import annotations

from typing import Dict, List

from node.swarm.placement import choose_experts, layer_of, rebalance, replica_counts
from protocol.manifest import ModelSpec

EXPERTS = list(ModelSpec(n_layers=2, n_experts=4).module_names()[1:])  # expert.0.0 .. expert.1.3
PEERS = [f"12D3KooPeer{i:02d}" for i in range(12)]


def test_layer_of() -> None:
    assert layer_of("expert.0.3") == 0 and layer_of("expert.12.1") == 12


def test_replica_counts_excludes_self() -> None:
    view = {"a": ["trunk", "expert.0.0"], "b": ["trunk", "expert.0.0", "expert.0.1"]}
    assert replica_counts(view) == {"trunk": 2, "expert.0.0": 2, "expert.0.1": 1}
    assert replica_counts(view, exclude="b") == {"trunk": 1, "expert.0.0": 1}


def test_empty_swarm_spreads_across_layers() -> None:
    for peer in PEERS:
        chosen = choose_experts(EXPERTS, {}, 2, peer)
        assert len(chosen) == 2 and chosen == sorted(chosen)
        assert sorted(layer_of(e) for e in chosen) == [0, 1]
        four = choose_experts(EXPERTS, {}, 4, peer)
        assert [layer_of(e) for e in four].count(0) == 2


def test_different_peers_choose_different_sets() -> None:
    choices = {tuple(choose_experts(EXPERTS, {}, 2, peer)) for peer in PEERS}
    assert len(choices) > 1
    # Deterministic for one peer id.
    assert choose_experts(EXPERTS, {}, 3, PEERS[0]) == choose_experts(EXPERTS, {}, 3, PEERS[0])


def test_fills_least_replicated_first() -> None:
    replicas = {e: 2 for e in EXPERTS}
    replicas["expert.1.2"] = 0
    replicas["expert.0.3"] = 1
    for peer in PEERS:
        assert choose_experts(EXPERTS, replicas, 1, peer) == ["expert.1.2"]
        assert choose_experts(EXPERTS, replicas, 2, peer) == ["expert.0.3", "expert.1.2"]
    # Replica counts beat the spread over layers: both uncovered experts are in layer 0.
    replicas = {e: 1 for e in EXPERTS}
    replicas["expert.0.0"] = replicas["expert.0.1"] = 0
    assert choose_experts(EXPERTS, replicas, 2, PEERS[1]) == ["expert.0.0", "expert.0.1"]


def test_count_larger_than_experts_and_zero() -> None:
    assert choose_experts(EXPERTS, {}, 100, PEERS[0]) == sorted(EXPERTS)
    assert choose_experts(EXPERTS, {}, 0, PEERS[0]) == []
    assert choose_experts([], {}, 3, PEERS[0]) == []


def test_peers_joining_one_by_one_cover_every_expert() -> None:
    view: Dict[str, List[str]] = {}
    for peer in PEERS[:4]:
        view[peer] = ["trunk"] + choose_experts(EXPERTS, replica_counts(view), 2, peer)
    counts = replica_counts(view)
    assert all(counts.get(e, 0) == 1 for e in EXPERTS)


def _swaps(view: Dict[str, List[str]]) -> Dict[str, tuple]:
    return {peer: swap for peer in view if (swap := rebalance(peer, view, EXPERTS)) is not None}


def test_rebalance_nothing_when_all_covered() -> None:
    view = {
        "a": ["trunk", "expert.0.0", "expert.0.1", "expert.1.0"],
        "b": ["trunk", "expert.0.2", "expert.0.3", "expert.1.1", "expert.1.0"],
        "c": ["trunk", "expert.1.2", "expert.1.3", "expert.0.0"],
    }
    assert _swaps(view) == {}


def test_rebalance_exactly_one_peer_moves() -> None:
    view = {
        "a": ["trunk", "expert.0.0", "expert.0.1", "expert.1.0"],
        "b": ["trunk", "expert.0.0", "expert.0.1", "expert.1.1"],
        "c": ["trunk", "expert.0.0", "expert.1.0", "expert.1.1"],
        "d": ["trunk", "expert.0.1", "expert.1.1"],
    }
    swaps = _swaps(view)
    assert len(swaps) == 1
    ((mover, (drop, add)),) = swaps.items()
    counts = replica_counts(view)
    assert counts.get(add, 0) == 0 and add in EXPERTS
    assert drop in view[mover] and drop != "trunk" and counts[drop] >= 2


def test_rebalance_converges_to_full_coverage() -> None:
    view = {
        "a": ["trunk", "expert.0.0", "expert.0.1"],
        "b": ["trunk", "expert.0.0", "expert.0.1"],
        "c": ["trunk", "expert.0.0", "expert.0.1"],
        "d": ["trunk", "expert.0.0", "expert.1.0"],
    }
    for _ in range(len(EXPERTS)):
        swaps = _swaps(view)
        if not swaps:
            break
        assert len(swaps) == 1
        ((mover, (drop, add)),) = swaps.items()
        before = replica_counts(view)
        view[mover] = [m for m in view[mover] if m != drop] + [add]
        after = replica_counts(view)
        assert after[drop] == before[drop] - 1 >= 1  # never uncovers what it drops
        assert after[add] == 1
    # 8 hosting slots over 8 experts: exactly one host each at the end.
    assert all(replica_counts(view).get(e, 0) == 1 for e in EXPERTS)


def test_rebalance_never_drops_an_expert_only_it_hosts() -> None:
    view = {
        "a": ["trunk", "expert.0.0", "expert.0.1"],  # expert.0.0 only here
        "b": ["trunk", "expert.0.1", "expert.0.2"],  # expert.0.2 only here
        "c": ["trunk", "expert.0.3"],  # nothing duplicated: never moves
    }
    swaps = _swaps(view)
    assert len(swaps) == 1
    ((mover, (drop, _add)),) = swaps.items()
    assert mover in ("a", "b") and drop == "expert.0.1"


def test_rebalance_nobody_moves_without_duplicates() -> None:
    view = {"a": ["trunk", "expert.0.0"], "b": ["trunk", "expert.0.1"]}
    assert _swaps(view) == {}


def test_rebalance_agrees_across_peers() -> None:
    # Every peer computes the same mover from the same view, whatever the dict order.
    view = {p: ["trunk", "expert.0.0", "expert.1.0"] for p in PEERS[:5]}
    reversed_view = dict(reversed(list(view.items())))
    assert _swaps(view) == _swaps(reversed_view)
    assert len(_swaps(view)) == 1
