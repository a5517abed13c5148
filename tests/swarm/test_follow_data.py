"""Placement ``follow_data``: three real peers whose data differ (English prose, digits, code) host the
experts their data routes to, swap on the way (each swap announced first: placement.SwapNotice), and never
leave an expert without a host."""

from __future__ import annotations

import random
from pathlib import Path
from typing import List

import pytest

from protocol.manifest import load_manifest
from tests.procs import write_text_corpus, write_tiny_manifest
from tests.swarm.test_swarm import Peer, wait_for

pytestmark = pytest.mark.swarm

EXPERTS_PER_PEER = 2  # 3 peers x 2 over 4 experts: every expert covered, two of them twice (room to swap)
ROUNDS = 15  # rounds all three peers finish together (a few seconds: time for a swap's notice to run)


def write_digits(path: Path, size: int = 60_000) -> Path:
    rng = random.Random(1)
    lines = [" ".join(str(rng.randrange(10**6)) for _ in range(8)) for _ in range(size // 50)]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_code(path: Path, size: int = 60_000) -> Path:
    rng = random.Random(2)
    names = ["x", "total", "items", "k", "value", "buf"]
    out: List[str] = []
    while sum(map(len, out)) < size:
        a, b = rng.choice(names), rng.choice(names)
        out.append(f"def f_{len(out)}({a}, {b}):\n    if {a} >= {b}:\n        return [{a}[i] for i in range({b})]\n")
        out.append(f"    {{'{a}': {b}, '{b}': ({a} + 1) * 2}}.get({a}, None)\n\n")
    path.write_text("".join(out))
    return path


@pytest.fixture
def different_data(tmp_path: Path) -> List[Path]:
    for name in ("peer-a", "peer-b", "peer-c"):
        (tmp_path / name).mkdir()
    return [
        write_text_corpus(tmp_path / "peer-a" / "prose.txt", seed=3),
        write_digits(tmp_path / "peer-b" / "digits.txt"),
        write_code(tmp_path / "peer-c" / "code.py"),
    ]


def test_follow_data_keeps_every_expert_covered(tmp_path: Path, different_data: List[Path]) -> None:
    manifest = write_tiny_manifest(tmp_path / "manifest.yaml", experts=4, steps=8)
    # Checks every round with a small margin, so that swaps happen within a short test.
    with manifest.open("a") as f:
        f.write("placement: {policy: follow_data, check_every_rounds: 1, affinity_batches: 2, swap_margin: 0.05}\n")
    experts = set(load_manifest(manifest).model.module_names()[1:])
    peers: List[Peer] = []
    try:
        for name, corpus in zip(("peer-a", "peer-b", "peer-c"), different_data, strict=True):
            initial = [peers[0].proc.maddr] if peers else []
            peers.append(Peer(tmp_path, name, manifest, initial, experts=EXPERTS_PER_PEER, corpus=corpus))
            peers[-1].proc.wait_ready()

        def rounds_together() -> List[int]:
            common = sorted(set.intersection(*(set(p.rounds()) for p in peers)))
            return common if len(common) >= ROUNDS else []

        common = wait_for(rounds_together, 90, f"{ROUNDS} rounds of all three peers", peers)
        for r in common:
            hosted = [set(p.rounds()[r]["hosted_during_round"]) - {"trunk"} for p in peers]
            assert all(len(h) == EXPERTS_PER_PEER for h in hosted), (r, hosted)
            assert set.union(*hosted) == experts, f"round {r}: an expert has no host: {hosted}"
        for peer in peers:
            noticed = [(n["drop"], n["add"]) for n in peer.proc.events("swap_notice")]
            for swap in peer.proc.events("follow_data_swap"):
                assert swap["drop"] in experts and swap["add"] in experts and swap["drop"] != swap["add"]
                assert (swap["drop"], swap["add"]) in noticed, f"{peer.proc.name} swapped without a notice: {swap}"
        for peer in peers:
            assert peer.proc.terminate() == 0, peer.proc.stderr_tail()
    finally:
        leaks = {p.proc.name: p.proc.cleanup() for p in peers}
        assert not any(leaks.values()), f"processes leaked: {leaks}"
