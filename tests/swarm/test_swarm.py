"""Three real peers on loopback: trunk and expert averaging, placement, and a SIGKILLed peer."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pytest
import torch

from node.training.model import MoETransformer
from protocol.manifest import load_manifest
from tests.procs import NodeProcess, child_env, write_text_corpus, write_tiny_manifest

pytestmark = pytest.mark.swarm


class Peer:
    def __init__(
        self, tmp: Path, name: str, manifest: Path, initial: List[str], experts: int = 1, bad_donor: str = "",
        corpus: Optional[Path] = None, extra: Sequence[str] = (),
    ) -> None:  # fmt: skip
        self.dir = tmp / name
        self.dir.mkdir(exist_ok=True)
        corpus = corpus or write_text_corpus(self.dir / "corpus.txt", seed=len(name) + ord(name[-1]))
        args = ["--manifest", str(manifest), "--data", str(corpus), "--experts", str(experts), "--max-seconds", "240"]
        args += ["--log-format", "json", *extra]
        if initial:
            args += ["--initial-peers", *initial]
        env = child_env(COMMONS_TEST_BAD_DONOR=bad_donor) if bad_donor else None
        self.proc = NodeProcess(
            [sys.executable, "-m", "tests.swarm.recording_peer", str(self.dir / "rounds"), *args], self.dir, name, env
        )

    def rounds(self) -> Dict[int, dict]:
        out = {}
        for path in (self.dir / "rounds").glob("round_*.json"):
            try:
                info = json.loads(path.read_text())
            except (ValueError, OSError):
                continue  # being written right now
            out[info["round"]] = info
        return out

    def values(self, round_number: int) -> Dict[str, np.ndarray]:
        with np.load(self.dir / "rounds" / f"round_{round_number}.npz") as data:
            return {k: data[k].copy() for k in data.files}


def outcome(info: dict, module: str) -> dict:
    return next(o for o in info["outcomes"] if o["module"] == module)


def wait_for(condition, timeout: float, what: str, peers: List[Peer]):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    tails = "\n\n".join(f"--- {p.proc.name}\n{p.proc.stderr_tail(15)}" for p in peers)
    raise AssertionError(f"timed out waiting for {what}\n{tails}")


def start_peers(tmp_path: Path, manifest: Path, peers: List[Peer], bad_donors=("", "")) -> None:
    """peer-a, then peer-b and peer-c joining through it (optionally running bad donor code)."""
    first = Peer(tmp_path, "peer-a", manifest, [])
    peers.append(first)
    first.proc.wait_ready()
    for name, mode in zip(("peer-b", "peer-c"), bad_donors, strict=True):
        peers.append(Peer(tmp_path, name, manifest, [first.proc.maddr], bad_donor=mode))
        peers[-1].proc.wait_ready()


@pytest.fixture
def swarm_of_three(tmp_path):
    manifest = write_tiny_manifest(tmp_path / "manifest.yaml", experts=2, steps=10)
    peers: List[Peer] = []
    try:
        start_peers(tmp_path, manifest, peers)
        yield manifest, peers
    finally:
        leaks = {p.proc.name: p.proc.cleanup() for p in peers}
        assert not any(leaks.values()), f"processes leaked: {leaks}"


def full_trunk_round(peers: List[Peer]):
    """The latest round in which every peer averaged the trunk in one group of all of them."""
    common = set.intersection(*(set(p.rounds()) for p in peers))
    full = [
        r
        for r in common
        if all(outcome(p.rounds()[r], "trunk")["group_size"] == len(peers) for p in peers)
        and all(outcome(p.rounds()[r], "trunk")["averaged_fraction"] == 1.0 for p in peers)
    ]
    return max(full) if full else None


def shared_expert_round(peers: List[Peer]):
    """The latest round in which all peers averaged the trunk together and an expert hosted by
    exactly two of them was averaged by those two (rounds right after a placement change may not be)."""
    common = set.intersection(*(set(p.rounds()) for p in peers))
    for r in sorted(common, reverse=True):
        infos = [p.rounds()[r] for p in peers]
        if not all(outcome(i, "trunk")["group_size"] == len(peers) for i in infos):
            continue
        if not all(outcome(i, "trunk")["averaged_fraction"] == 1.0 for i in infos):
            continue
        hosted = [set(i["hosted_during_round"]) - {"trunk"} for i in infos]
        for expert in set.union(*hosted):
            hosts = [i for i, h in zip(infos, hosted, strict=True) if expert in h]
            if len(hosts) == 2 and all(
                outcome(i, expert)["group_size"] == 2 and outcome(i, expert)["averaged_fraction"] == 1.0 for i in hosts
            ):
                return r, expert
    return None


def test_trunk_converges_experts_average_within_hosts_and_placement_covers_all(swarm_of_three):
    manifest_path, peers = swarm_of_three
    round_number, shared = wait_for(lambda: shared_expert_round(peers), 120, "a fully averaged round", peers)

    values = {p.proc.name: p.values(round_number) for p in peers}
    infos = {p.proc.name: p.rounds()[round_number] for p in peers}
    names = list(values)

    # 1. The trunk is one value on all peers.
    for name in names[1:]:
        np.testing.assert_array_equal(values[name]["trunk"], values[names[0]]["trunk"])

    # 2. Placement covers every expert (3 peers x 1 expert over 2 experts).
    manifest = load_manifest(manifest_path)
    experts = list(manifest.model.module_names()[1:])
    hosts = {e: [n for n in names if e in infos[n]["hosted_during_round"]] for e in experts}
    assert all(hosts[e] for e in experts), f"an expert has no host: {hosts}"

    # 3. The expert hosted by two peers is averaged between those two only: equal on both,
    #    while the third peer's copy is untouched by that round.
    a, b = hosts[shared]
    (third,) = [n for n in names if n not in hosts[shared]]
    np.testing.assert_array_equal(values[a][shared], values[b][shared])
    third_peer = next(p for p in peers if p.proc.name == third)
    earlier = [r for r in third_peer.rounds() if r < round_number]
    if earlier:
        np.testing.assert_array_equal(values[third][shared], third_peer.values(max(earlier))[shared])
    if not any(shared in info["hosted_during_round"] for info in third_peer.rounds().values()):
        fresh = MoETransformer(manifest.model, seed=manifest.seed)
        initial = torch.cat([p.detach().reshape(-1) for p in fresh.module_parameters(shared)]).numpy()
        np.testing.assert_array_equal(values[third][shared], initial)  # never hosted: still the initial value
    assert not np.array_equal(values[a][shared], values[third][shared]), "the shared expert was never trained"

    for peer in peers:
        assert peer.proc.terminate() == 0, peer.proc.stderr_tail()


def test_sigkilled_peer_does_not_stop_the_others(swarm_of_three):
    _, peers = swarm_of_three
    wait_for(lambda: full_trunk_round(peers), 120, "a round with all 3 peers", peers)
    victim, survivors = peers[2], peers[:2]
    time.sleep(0.7)  # land inside a round (local steps or averaging)
    victim.proc.kill()
    killed_at = time.monotonic()
    last_before = {p.proc.name: max(p.rounds()) for p in survivors}
    assert victim.proc.leftovers() == [], "the killed peer left processes behind"

    def next_round_done():
        return all(any(r > last_before[p.proc.name] for r in p.rounds()) for p in survivors)

    # The round in flight may lose the victim's slices, but it ends by its deadline...
    wait_for(next_round_done, 30, "the survivors' next round after the kill", survivors)
    took = time.monotonic() - killed_at

    def averaged_pairwise_after_kill():
        done = []
        for peer in survivors:
            later = [peer.rounds()[r] for r in sorted(peer.rounds()) if r > last_before[peer.proc.name] + 1]
            done.append(
                any(
                    outcome(i, "trunk")["group_size"] == 2 and outcome(i, "trunk")["averaged_fraction"] == 1.0
                    for i in later
                )
            )
        return all(done)

    # ...and the survivors go on averaging with each other, without the dead peer.
    wait_for(averaged_pairwise_after_kill, 40, "a full round of the two survivors", survivors)
    assert took < 30
    for peer in survivors:
        assert peer.proc.terminate() == 0, peer.proc.stderr_tail()


def test_a_late_node_downloads_current_state_despite_stalling_and_lying_donors(tmp_path):
    manifest = write_tiny_manifest(tmp_path / "manifest.yaml", experts=2, steps=10)
    peers: List[Peer] = []
    try:
        start_peers(tmp_path, manifest, peers, bad_donors=("poison", "stall"))
        wait_for(lambda: full_trunk_round(peers), 120, "a round with the first 3 peers", peers)

        late = Peer(tmp_path, "peer-d", manifest, [peers[0].proc.maddr])
        peers.append(late)
        late.proc.wait_ready(timeout=90)
        (downloaded,) = late.proc.events("state_downloaded")
        assert "trunk" in downloaded["modules"], downloaded
        # What it adopted is bit-identical (global copy and momentum) to what an honest peer held at
        # the end of some round, although one donor stalled and another sent scaled values.
        honest_hashes = {info["hashes"]["trunk"] for info in peers[0].rounds().values()}
        assert downloaded["hashes"]["trunk"] in honest_hashes

        def averaged_with_all_four():
            return any(
                outcome(info, "trunk")["group_size"] == 4 and outcome(info, "trunk")["averaged_fraction"] == 1.0
                for info in late.rounds().values()
            )

        wait_for(averaged_with_all_four, 60, "a trunk round of the late node with all four peers", peers)
    finally:
        leaks = {p.proc.name: p.proc.cleanup() for p in peers}
        assert not any(leaks.values()), f"processes leaked: {leaks}"
