"""Which experts this node hosts, decided from what the DHT says about everyone else.

No coordinator: each node reads replica counts from peer records, fills the
least-replicated experts first, and once per round checks whether an expert has lost
all its hosts, or has 2 hosts fewer than another of its layer. Ties are broken by a
hash of (peer id, expert), so nodes starting at the same moment spread out instead of
all picking expert 0.

Policy ``follow_data`` (the manifest's ``placement``) adds this node's routing affinity (the
share of its own tokens the router sends to each expert, measured locally): at join it
ranks experts after coverage and the spread over layers, and every few rounds
``follow_swap`` may trade a duplicated expert for one its data routes to more.

Every swap goes through ``SwapNotice``: the drop is announced in the node's record first and made only
once others have had time to see it, and only if another host of the expert stays.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from typing import Callable, Collection, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

SWAP_NOTICE_SECONDS = 2.0  # a drop waits this long after the DHT took a record announcing it


def _tiebreak(peer_id: str, expert: str) -> str:
    return hashlib.sha256(f"{peer_id}|{expert}".encode()).hexdigest()


def layer_of(expert: str) -> int:
    return int(expert.split(".")[1])


def replica_counts(peer_modules: Mapping[str, Iterable[str]], exclude: Optional[str] = None) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for peer, modules in peer_modules.items():
        if peer == exclude:
            continue
        for module in modules:
            counts[module] = counts.get(module, 0) + 1
    return counts


def choose_experts(
    all_experts: Sequence[str], replicas: Mapping[str, int], count: int, peer_id: str,
    affinity: Optional[Mapping[str, float]] = None, avoid: Collection[str] = (),
) -> List[str]:  # fmt: skip
    """Pick ``count`` experts, one at a time by the smallest key; experts in ``avoid`` come last (a node
    behind NAT avoids experts hosted only by others behind NAT: it could average them with nobody).

    Without ``affinity`` (least_replicated): fewest replicas, then spread over layers, then the hash tiebreak.
    With it (follow_data): uncovered experts first, then spread over layers, then the highest affinity, then
    fewest replicas, then the hash tiebreak.
    """
    chosen: List[str] = []
    per_layer: Dict[int, int] = {}
    candidates = list(all_experts)

    def key(e: str) -> Tuple[object, ...]:
        spread, count_e = per_layer.get(layer_of(e), 0), replicas.get(e, 0)
        if affinity is None:
            return e in avoid, count_e, spread, _tiebreak(peer_id, e)
        return e in avoid, min(count_e, 1), spread, -affinity.get(e, 0.0), count_e, _tiebreak(peer_id, e)

    for _ in range(min(count, len(candidates))):
        best = min(candidates, key=key)
        candidates.remove(best)
        chosen.append(best)
        per_layer[layer_of(best)] = per_layer.get(layer_of(best), 0) + 1
    return sorted(chosen)


def rebalance(
    peer_id: str, peer_modules: Mapping[str, Iterable[str]], all_experts: Sequence[str]
) -> Optional[Tuple[str, str]]:
    """One (drop, add) swap for this node if an expert has no host, or else if the experts' hosts are
    uneven (``_even_out``); None otherwise.

    Only one node moves per uncovered expert: among nodes hosting an expert that
    someone else also hosts, the one with the smallest tiebreak hash for it. Every
    node computes the same choice from the same records, so they don't stampede.
    """
    hosted: Dict[str, Set[str]] = {p: set(m) for p, m in peer_modules.items()}
    counts = replica_counts(hosted)
    uncovered = sorted((e for e in all_experts if counts.get(e, 0) == 0), key=lambda e: _tiebreak("", e))
    if not uncovered:
        return _even_out(peer_id, hosted, counts, all_experts)
    target = uncovered[0]
    swappers = {p for p, mods in hosted.items() if any(counts.get(e, 0) >= 2 for e in mods if e != "trunk")}
    if peer_id not in swappers or min(swappers, key=lambda p: _tiebreak(p, target)) != peer_id:
        return None
    duplicated = [e for e in hosted[peer_id] if e != "trunk" and counts.get(e, 0) >= 2]
    drop = max(duplicated, key=lambda e: (counts[e], _tiebreak(peer_id, e)))
    return drop, target


def _even_out(
    peer_id: str, hosted: Mapping[str, Set[str]], counts: Mapping[str, int], all_experts: Sequence[str]
) -> Optional[Tuple[str, str]]:
    """A host of an expert with at least 2 more hosts than another expert of its layer moves to that one.

    Nodes that join at the same moment all read the same replica counts and take the same least-replicated
    experts (4 nodes, 8 of 16 experts each: 1 host for eight experts, 3 for the other eight). Every node
    plans the same moves from the same records: the least-hosted experts in turn (ties by hash), each
    taken by one node that has not moved yet, dropping its most-hosted expert of that layer; the plan
    counts each move before the next, so an expert never falls below the one it gives to. This node
    makes its move of the plan, if it has one: up to one move per node per round.
    """
    planned = dict(counts)
    moved: Set[str] = set()
    for target in sorted(all_experts, key=lambda e: (counts.get(e, 0), _tiebreak("", e))):
        layer, need = layer_of(target), planned.get(target, 0) + 2
        options = [
            (peer, expert) for peer, mods in hosted.items() if peer not in moved and target not in mods
            for expert in mods if expert != "trunk" and layer_of(expert) == layer and planned[expert] >= need
        ]  # fmt: skip
        if not options:
            continue
        mover, drop = min(options, key=lambda o: (-planned[o[1]], _tiebreak(o[0], f"{target}|{o[1]}")))
        if mover == peer_id:
            return drop, target
        moved.add(mover)
        planned[drop] -= 1
        planned[target] = planned.get(target, 0) + 1
    return None


def follow_swap(
    peer_id: str, peer_modules: Mapping[str, Iterable[str]], all_experts: Sequence[str],
    affinity: Mapping[str, float], margin: float, check: int, keep: Collection[str] = (),
) -> Optional[Tuple[str, str]]:  # fmt: skip
    """follow_data: one (drop, add) swap for this node, or None.

    ``add`` is an expert this node does not host, in ``drop``'s layer (the node keeps experts in every
    layer, and shares of one layer's routing compare), whose affinity exceeds ``drop``'s by ``margin``.
    ``drop`` has >= 2 hosts and this node is its dropper for ``check``: of its hosts, the one with the
    smallest hash of (peer, expert, check). Each expert has one dropper per check, so however many nodes
    swap at once, it loses at most one host and stays covered; the check number rotates the role, so
    every host gets its turn. Experts in ``keep`` are not dropped (the caller's hysteresis). Of the swaps
    allowed, the largest gain; ties by hash.
    """
    hosted: Dict[str, Set[str]] = {p: set(m) for p, m in peer_modules.items()}
    mine = hosted.get(peer_id, set())
    counts = replica_counts(hosted)
    droppable = [
        e for e in mine
        if e != "trunk" and e not in keep and counts.get(e, 0) >= 2 and _dropper(hosted, e, check) == peer_id
    ]  # fmt: skip
    swaps = [
        (drop, add)
        for drop in droppable
        for add in all_experts
        if add not in mine and layer_of(add) == layer_of(drop)
        and affinity.get(add, 0.0) - affinity.get(drop, 0.0) >= margin
    ]  # fmt: skip
    if not swaps:
        return None
    gain = {s: affinity.get(s[1], 0.0) - affinity.get(s[0], 0.0) for s in swaps}
    return max(swaps, key=lambda s: (gain[s], _tiebreak(peer_id, "|".join(s))))


def _dropper(hosted: Mapping[str, Set[str]], expert: str, check: int) -> str:
    """The one host of ``expert`` allowed to drop it at this check (every node computes the same)."""
    return min((p for p, mods in hosted.items() if expert in mods), key=lambda p: _tiebreak(p, f"{expert}|{check}"))


@dataclass
class Swap:
    """Host ``add`` instead of ``drop``; ``event`` and ``message`` go to the node's log when it is made."""

    drop: str
    add: str
    event: str = "replaced"
    message: str = ""


class SwapNotice:
    """A swap in two steps, so that nodes deciding at once on views a moment apart never leave an expert with
    no host (two hosts of one expert, each reading the other's record from before its swap, both dropped it).

    1. ``propose``: the node's record lists the expert under ``dropping`` (the node still hosts it).
    2. Once the DHT took a record carrying it (``stored``) ``notice`` seconds ago, ``settle`` on a fresh read
       of the records: the swap is made if another peer hosts the expert and does not announce dropping it;
       else it is withdrawn (placement may propose again at a later round).

    Why no expert is left without a host: of the hosts that drop it, take the last to read the records for its
    settle. Every other dropper's notice was stored before that dropper's own read, so before this read: it
    saw each of them dropping or gone, and counted a host that is neither. ``notice`` is margin for a read
    that reaches a replica a moment behind. Thread-safe: the DHT loop calls ``stored``.
    """

    def __init__(self, notice: float = SWAP_NOTICE_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.notice = notice
        self._clock = clock
        self._lock = threading.Lock()
        self.pending: Optional[Swap] = None
        self._stored_at: Optional[float] = None

    def propose(self, swap: Swap) -> None:
        with self._lock:
            self.pending, self._stored_at = swap, None

    def dropping(self) -> List[str]:
        pending = self.pending
        return [pending.drop] if pending is not None else []

    def stored(self, dropping: Collection[str]) -> None:
        """The DHT took a record of ours listing ``dropping``: the notice of a pending drop starts now."""
        with self._lock:
            if self.pending is not None and self._stored_at is None and self.pending.drop in dropping:
                self._stored_at = self._clock()

    def due(self) -> bool:
        with self._lock:
            return self._stored_at is not None and self._clock() - self._stored_at >= self.notice

    def settle(self, peer_id: str, staying: Mapping[str, Iterable[str]]) -> Tuple[Optional[Swap], Optional[Swap]]:
        """On a fresh read (``staying``: what each peer hosts and does not announce dropping): (the swap to
        make, None) if another peer keeps the expert, else (None, the withdrawn swap). No longer pending."""
        with self._lock:
            swap, self.pending, self._stored_at = self.pending, None, None
        if swap is None:
            return None, None
        if any(swap.drop in modules for peer, modules in staying.items() if peer != peer_id):
            return swap, None
        return None, swap
