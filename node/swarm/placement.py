"""Which experts this node hosts, decided from what the DHT says about everyone else.

No coordinator: each node reads replica counts from peer records, fills the
least-replicated experts first, and once per round checks whether an expert has lost
all its hosts. Ties are broken by a hash of (peer id, expert), so nodes starting at
the same moment spread out instead of all picking expert 0.
"""

from __future__ import annotations

import hashlib
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple


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


def choose_experts(all_experts: Sequence[str], replicas: Mapping[str, int], count: int, peer_id: str) -> List[str]:
    """Pick ``count`` experts: fewest replicas first, then spread over layers, then the hash tiebreak."""
    chosen: List[str] = []
    per_layer: Dict[int, int] = {}
    candidates = list(all_experts)
    for _ in range(min(count, len(candidates))):
        best = min(
            candidates,
            key=lambda e: (replicas.get(e, 0), per_layer.get(layer_of(e), 0), _tiebreak(peer_id, e)),
        )
        candidates.remove(best)
        chosen.append(best)
        per_layer[layer_of(best)] = per_layer.get(layer_of(best), 0) + 1
    return sorted(chosen)


def rebalance(
    peer_id: str, peer_modules: Mapping[str, Iterable[str]], all_experts: Sequence[str]
) -> Optional[Tuple[str, str]]:
    """One (drop, add) swap for this node if an expert has no host, else None.

    Only one node moves per uncovered expert: among nodes hosting an expert that
    someone else also hosts, the one with the smallest tiebreak hash for it. Every
    node computes the same choice from the same records, so they don't stampede.
    """
    hosted: Dict[str, Set[str]] = {p: set(m) for p, m in peer_modules.items()}
    counts = replica_counts(hosted)
    uncovered = sorted((e for e in all_experts if counts.get(e, 0) == 0), key=lambda e: _tiebreak("", e))
    if not uncovered:
        return None
    target = uncovered[0]
    swappers = {p for p, mods in hosted.items() if any(counts.get(e, 0) >= 2 for e in mods if e != "trunk")}
    if peer_id not in swappers or min(swappers, key=lambda p: _tiebreak(p, target)) != peer_id:
        return None
    duplicated = [e for e in hosted[peer_id] if e != "trunk" and counts.get(e, 0) >= 2]
    drop = max(duplicated, key=lambda e: (counts[e], _tiebreak(peer_id, e)))
    return drop, target
