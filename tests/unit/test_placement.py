"""Unit tests for expert placement: initial choice, re-placement of uncovered experts, and follow_data."""

from __future__ import annotations

from typing import Dict, List

from node.swarm.placement import _dropper, choose_experts, follow_swap, layer_of, rebalance, replica_counts
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


def _apply(view: Dict[str, List[str]], swaps: Dict[str, tuple]) -> None:
    for mover, (drop, add) in swaps.items():
        assert drop in view[mover] and add not in view[mover]
        view[mover] = [m for m in view[mover] if m != drop] + [add]


def test_rebalance_evens_out_nodes_that_joined_together() -> None:
    # The benchmark's case: node a joined first, b, c and d together, all three taking what a did not.
    first = ["expert.0.0", "expert.0.1", "expert.1.0", "expert.1.1"]
    rest = [e for e in EXPERTS if e not in first]
    view = {"a": ["trunk", *first], "b": ["trunk", *rest], "c": ["trunk", *rest], "d": ["trunk", *rest]}
    rounds = 0
    while swaps := _swaps(view):
        rounds += 1
        assert rounds <= 4
        before = replica_counts(view)
        assert len(swaps) <= 3 and "a" not in swaps  # a hosts nothing another node also hosts
        _apply(view, swaps)
        after = replica_counts(view)
        assert all(after.get(e, 0) >= 1 for e in EXPERTS)  # never uncovers anything
        assert max(after.values()) - min(after.values()) <= max(before.values()) - min(before.values())
    counts = replica_counts(view)
    assert sorted(counts[e] for e in EXPERTS) == [2] * len(EXPERTS)
    assert all(len(mods) == 5 for mods in view.values())  # every node keeps its count
    for mods in view.values():  # and its spread over layers
        assert sum(layer_of(e) == 0 for e in mods if e != "trunk") == 2


def test_rebalance_leaves_a_difference_of_one_alone() -> None:
    view = {
        "a": ["trunk", "expert.0.0", "expert.0.1"],
        "b": ["trunk", "expert.0.0", "expert.0.2"],
        "c": ["trunk", "expert.0.3", "expert.1.0", "expert.1.1", "expert.1.2", "expert.1.3"],
    }
    assert _swaps(view) == {}


def test_rebalance_evening_out_agrees_across_peers() -> None:
    view = {p: ["trunk", "expert.0.0", "expert.0.1", "expert.1.0", "expert.1.1"] for p in PEERS[:3]}
    view[PEERS[3]] = ["trunk", "expert.0.2", "expert.0.3", "expert.1.2", "expert.1.3"]
    reversed_view = dict(reversed(list(view.items())))
    swaps = _swaps(view)
    assert swaps == _swaps(reversed_view) and 1 <= len(swaps) <= 3


# --- follow_data -------------------------------------------------------------------------

# The data of this node routes most of layer 0 to expert.0.3 and of layer 1 to expert.1.2.
AFFINITY = {"expert.0.0": 0.05, "expert.0.1": 0.15, "expert.0.2": 0.2, "expert.0.3": 0.6,
            "expert.1.0": 0.1, "expert.1.1": 0.1, "expert.1.2": 0.7, "expert.1.3": 0.1}  # fmt: skip


def test_follow_data_join_prefers_affinity_once_all_covered() -> None:
    replicas = {e: 1 for e in EXPERTS}
    for peer in PEERS:
        assert choose_experts(EXPERTS, replicas, 2, peer, AFFINITY) == ["expert.0.3", "expert.1.2"]
        # Still spread over layers: the second-best of layer 0 comes after the best of layer 1.
        assert choose_experts(EXPERTS, replicas, 3, peer, AFFINITY) == ["expert.0.2", "expert.0.3", "expert.1.2"]


def test_follow_data_join_covers_uncovered_experts_first() -> None:
    replicas = {e: 1 for e in EXPERTS}
    replicas["expert.0.0"] = replicas["expert.1.3"] = 0
    for peer in PEERS:
        assert choose_experts(EXPERTS, replicas, 2, peer, AFFINITY) == ["expert.0.0", "expert.1.3"]
    # Among uncovered experts, affinity decides.
    assert choose_experts(EXPERTS, {}, 2, PEERS[0], AFFINITY) == ["expert.0.3", "expert.1.2"]


def test_follow_data_join_ties_fall_to_replicas_then_hash() -> None:
    flat = {e: 0.25 for e in EXPERTS}
    replicas = {e: 2 for e in EXPERTS}
    replicas["expert.0.1"] = 1
    assert choose_experts(EXPERTS, replicas, 1, PEERS[0], flat) == ["expert.0.1"]
    # Equal in everything: the per-peer hash spreads peers out, as without affinity.
    choices = {tuple(choose_experts(EXPERTS, {}, 2, peer, flat)) for peer in PEERS}
    assert len(choices) > 1


def test_follow_data_peers_joining_keep_every_expert_covered() -> None:
    view: Dict[str, List[str]] = {}
    for peer in PEERS[:4]:  # all with the same taste: coverage still comes first
        view[peer] = ["trunk"] + choose_experts(EXPERTS, replica_counts(view), 2, peer, AFFINITY)
    assert all(replica_counts(view).get(e, 0) == 1 for e in EXPERTS)
    view["late"] = ["trunk"] + choose_experts(EXPERTS, replica_counts(view), 2, "late", AFFINITY)
    assert view["late"] == ["trunk", "expert.0.3", "expert.1.2"]


def _follow_swaps(view: Dict[str, List[str]], affinity: Dict[str, Dict[str, float]], check: int) -> Dict[str, tuple]:
    return {
        peer: swap
        for peer in view
        if (swap := follow_swap(peer, view, EXPERTS, affinity[peer], margin=0.1, check=check)) is not None
    }


def test_follow_swap_trades_a_duplicated_expert_for_a_preferred_one_of_its_layer() -> None:
    view = {"a": ["trunk", "expert.0.0", "expert.1.2"], "c": ["trunk"] + EXPERTS}
    swaps = [follow_swap("a", view, EXPERTS, AFFINITY, margin=0.1, check=c) for c in range(16)]
    # a holds expert.0.0 (5%) where its data wants expert.0.3 (60%): it swaps whenever it is the dropper.
    assert set(swaps) == {None, ("expert.0.0", "expert.0.3")}
    # The largest gain wins: when a may drop both expert.0.0 and expert.1.0 (10%, against expert.1.2's 70%).
    view["a"] = ["trunk", "expert.0.0", "expert.1.0"]
    hosted = {p: set(m) for p, m in view.items()}
    check = next(c for c in range(64) if _dropper(hosted, "expert.0.0", c) == _dropper(hosted, "expert.1.0", c) == "a")
    assert follow_swap("a", view, EXPERTS, AFFINITY, margin=0.1, check=check) == ("expert.1.0", "expert.1.2")


def test_follow_swap_never_drops_a_last_replica_or_swaps_for_a_small_gain() -> None:
    view = {"a": ["trunk", "expert.0.0", "expert.1.0"], "b": ["trunk", "expert.0.1", "expert.1.1"]}
    for check in range(10):
        assert _follow_swaps(view, {"a": AFFINITY, "b": AFFINITY}, check) == {}  # every expert hosted once
    view["b"] = ["trunk", "expert.0.0", "expert.1.1"]
    near = dict(AFFINITY, **{"expert.0.0": 0.55})  # 5 points below expert.0.3: under the margin
    for check in range(10):
        assert _follow_swaps(view, {"a": near, "b": near}, check) == {}


def test_follow_swap_no_stampede_every_expert_stays_covered() -> None:
    # Six peers all hosting the same two experts, all wanting others: each check, at most one host per
    # expert drops it, so the experts they all drop keep a host.
    view = {p: ["trunk", "expert.0.0", "expert.1.0"] for p in PEERS[:6]}
    view.update({"x": ["trunk", "expert.0.1", "expert.0.2", "expert.0.3", "expert.1.1", "expert.1.2", "expert.1.3"]})
    affinity = {p: AFFINITY for p in view}
    for check in range(6):
        swaps = _follow_swaps(view, affinity, check)
        assert 1 <= len(swaps) <= 2 and len({drop for drop, _ in swaps.values()}) == len(swaps)
        for peer, (drop, add) in swaps.items():
            view[peer] = [m for m in view[peer] if m != drop] + [add]
        assert all(replica_counts(view).get(e, 0) >= 1 for e in EXPERTS)
    assert replica_counts(view)["expert.0.0"] >= 1 and replica_counts(view)["expert.1.0"] >= 1


def test_follow_swap_rotates_the_dropper_and_agrees_across_dict_orders() -> None:
    view = {p: ["trunk", "expert.0.0", "expert.1.0"] for p in PEERS[:5]}
    view["x"] = ["trunk"] + EXPERTS
    affinity = {p: AFFINITY for p in view}
    movers = set()
    for check in range(20):
        swaps = _follow_swaps(view, affinity, check)
        assert swaps == _follow_swaps(dict(reversed(list(view.items()))), affinity, check)
        movers |= set(swaps)
    assert len(movers) > 1  # the role moves between hosts from check to check


def test_follow_swap_ties_are_deterministic() -> None:
    flat = {e: 0.0 for e in EXPERTS}
    flat["expert.0.2"] = flat["expert.0.3"] = 0.5  # two equally good targets
    view = {"a": ["trunk", "expert.0.0"], "b": ["trunk", "expert.0.0"]}
    found = [follow_swap(p, view, EXPERTS, flat, margin=0.1, check=c) for c in range(4) for p in view]
    assert any(found)
    again = [follow_swap(p, view, EXPERTS, flat, margin=0.1, check=c) for c in range(4) for p in view]
    assert found == again
    assert all(s is None or s[1] in ("expert.0.2", "expert.0.3") for s in found)


def test_follow_swap_never_drops_what_the_caller_keeps() -> None:
    view = {"a": ["trunk", "expert.0.0", "expert.1.2"], "c": ["trunk"] + EXPERTS}
    kept = [follow_swap("a", view, EXPERTS, AFFINITY, margin=0.1, check=c, keep={"expert.0.0"}) for c in range(16)]
    assert kept == [None] * 16
