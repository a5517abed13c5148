"""Nothing of a node's data leaves it: a canary planted in one node's corpus never crosses the swarm port.

Two real nodes on loopback average the trunk and both experts for several rounds; the node with the canary
downloads nothing and serves its state to the other, so its model, parts, results, records and state
replies all go out. Every byte it hands to the swarm is captured (tests/swarm/capturing_peer.py) and
searched for the canary and for any 32-byte window of its training text.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

from node.training.data import TextData
from tests.procs import NodeProcess, child_env, log_records, write_text_corpus, write_tiny_manifest

pytestmark = pytest.mark.swarm

WINDOW = 32
_CHUNK = WINDOW // 2  # every 32-byte window of the text contains one 16-byte chunk at a multiple of 16


def secret_corpus(path: Path, canary: str, size: int = 60_000) -> bytes:
    """Words of random letters (so every 32-byte window is its own), with the canary every ~2 KB."""
    rng = random.Random(canary)
    parts: List[str] = []
    while sum(map(len, parts)) < size:
        if len(parts) % 300 == 0:
            parts.append(f" {canary} ")
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        parts.append(word + (".\n" if rng.random() < 0.08 else " "))
    text = "".join(parts).encode()
    path.write_bytes(text)
    return text


def _keys(data: bytes, positions: np.ndarray) -> np.ndarray:
    """A 64-bit key of the 16 bytes at each position (two unaligned little-endian words mixed)."""
    arr = np.frombuffer(data, dtype=np.uint8)
    words = np.lib.stride_tricks.sliding_window_view(arr, 8)
    lo = np.ascontiguousarray(words[positions]).view("<u8").ravel()
    hi = np.ascontiguousarray(words[positions + 8]).view("<u8").ravel()
    return lo * np.uint64(0x9E3779B97F4A7C15) ^ hi


def text_windows_in(sent: bytes, text: bytes) -> List[int]:
    """Offsets in ``sent`` where some 32-byte window of ``text`` occurs (vectorized: ~1 s per 50 MB)."""
    if len(sent) < WINDOW or len(text) < WINDOW:
        return []
    aligned = np.arange(0, len(text) - _CHUNK + 1, _CHUNK)
    chunks: Dict[bytes, List[int]] = {}
    for j in aligned.tolist():
        chunks.setdefault(text[j : j + _CHUNK], []).append(j)
    wanted = np.unique(_keys(text, aligned))
    found: List[int] = []
    step = 1 << 22
    for start in range(0, len(sent) - _CHUNK + 1, step):
        positions = np.arange(start, min(start + step, len(sent) - _CHUNK + 1))
        for p in positions[np.isin(_keys(sent, positions), wanted)].tolist():
            for j in chunks.get(sent[p : p + _CHUNK], []):
                # The chunk starts somewhere in the first half of the window: try each alignment.
                for back in range(_CHUNK + 1):
                    i, q = j - back, p - back
                    if i >= 0 and q >= 0 and text[i : i + WINDOW] == sent[q : q + WINDOW] and len(sent) >= q + WINDOW:
                        found.append(q)
                        break
    return sorted(set(found))


def whole_rounds(peer: NodeProcess) -> List[dict]:
    """The peer's rounds in which the trunk and both experts were averaged by both nodes."""
    rounds = log_records(peer.log_path, "round")
    return [r for r in rounds if r["trunk_group"] == 2 and r["trunk_fraction"] == 1 and r["expert_groups"] == [2, 2]]


def test_window_search_finds_what_is_there_and_nothing_else() -> None:
    """The detector itself can fail: it finds a planted window at any alignment, and no false match."""
    text = bytes(random.Random(1).getrandbits(8) for _ in range(5000))
    noise = bytes(random.Random(2).getrandbits(8) for _ in range(20000))
    assert text_windows_in(noise, text) == []
    for start in (0, 7, 1000, 4968):
        sent = noise[:333] + text[start : start + WINDOW] + noise[333:]
        assert text_windows_in(sent, text) == [333], start
    assert text_windows_in(noise[:333] + text[100 : 100 + WINDOW - 1] + noise, text) == []  # 31 bytes: no


def test_no_byte_of_a_nodes_data_leaves_it(tmp_path: Path) -> None:
    canary = f"CANARY-{random.getrandbits(64):016x}-DO-NOT-SEND"
    manifest = write_tiny_manifest(tmp_path / "manifest.yaml", experts=2, steps=10)
    secret = tmp_path / "secret"
    secret.mkdir()
    text = secret_corpus(secret / "corpus.txt", canary)
    other = write_text_corpus(tmp_path / "other.txt", seed=3)
    capture = tmp_path / "capture"
    common = ["--manifest", str(manifest), "--experts", "2", "--log-format", "json", "--metrics-addr", "127.0.0.1:0"]
    procs: List[NodeProcess] = []
    try:
        owner = NodeProcess(
            [sys.executable, "-m", "tests.swarm.capturing_peer", str(capture), *common, "--data", str(secret),
             "--max-seconds", "180"],
            tmp_path / "owner", "owner",
        )  # fmt: skip
        procs.append(owner)
        owner.wait_ready()
        peer = NodeProcess.node(
            ["start", *common, "--data", str(other), "--initial-peers", owner.maddr, "--max-seconds", "180"],
            tmp_path / "peer", "peer",
        )
        procs.append(peer)
        peer.wait_ready()
        deadline = time.monotonic() + 120
        while len(whole_rounds(peer)) < 4:
            assert time.monotonic() < deadline, f"no 4 whole rounds in 120 s:\n{peer.stderr_tail()}"
            time.sleep(0.5)
        status = subprocess.run(
            [sys.executable, "-m", "node", "status", "--initial-peers", peer.maddr, "--json"],
            capture_output=True, text=True, timeout=60, env=child_env(),
        )  # fmt: skip
        assert owner.terminate() == 0, owner.stderr_tail()
    finally:
        leaks = {p.name: p.cleanup() for p in procs}
    assert all(not pids for pids in leaks.values()), leaks

    # The ready line and `node status` show a commitment to the owner's data: no names, no content.
    commitment = TextData(str(secret), seq_len=32).commitment()
    assert owner.ready is not None and owner.ready["data"] == commitment
    assert commitment["commitment"].startswith("sha256:") and commitment["bytes"] == len(text)
    assert "corpus" not in json.dumps(owner.ready["data"])
    peers = {p["peer_id"]: p for p in json.loads(status.stdout)["peers"]}
    assert peers[owner.ready["peer_id"]]["data"] == commitment["commitment"]
    assert peers[peer.ready["peer_id"]]["data"] not in (None, commitment["commitment"])

    summary = json.loads((capture / "sent.json").read_text())
    messages = summary["messages"]
    # The capture saw what a node sends: records, averaging traffic and the state the newcomer downloaded.
    assert messages.get("store", 0) >= 4, messages
    assert any(k.startswith("call ") and k.endswith("/avg") for k in messages), messages
    assert any(k.startswith("reply ") and k.endswith("/state") for k in messages), messages
    sent = (capture / "sent.bin").read_bytes()
    assert len(sent) == sum(summary["bytes"].values()) > 100_000
    assert canary.encode() not in sent
    assert canary.split("-")[1].encode() not in sent  # not even its random part
    started = time.monotonic()
    leaked = text_windows_in(sent, text)
    assert leaked == [], f"{len(leaked)} windows of the training text were sent, first at byte {leaked[0]}"
    assert time.monotonic() - started < 60
