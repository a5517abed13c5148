"""A node killed with SIGKILL resumes from its checkpoint: same peer id, same experts, same round."""

from __future__ import annotations

import time

import pytest

from tests.procs import NodeProcess, write_text_corpus, write_tiny_manifest

pytestmark = pytest.mark.e2e


def test_sigkilled_node_resumes_from_its_checkpoint(tmp_path):
    manifest = write_tiny_manifest(tmp_path / "manifest.yaml", experts=4, steps=10)
    corpus = write_text_corpus(tmp_path / "text.txt")
    args = ["start", "--manifest", str(manifest), "--data", str(corpus), "--experts", "2", "--log-format", "json"]
    args += [
        "--checkpoint-dir",
        str(tmp_path / "ckpt"),
        "--checkpoint-every-rounds",
        "1",
        "--metrics-addr",
        "127.0.0.1:0",
    ]
    first = NodeProcess.node(args, tmp_path / "run1", "run1")
    second = None
    try:
        ready = first.wait_ready()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(first.events("checkpoint")) < 3:
            time.sleep(0.3)
        first.kill()  # power loss: no goodbye, no final checkpoint
        assert first.leftovers() == []
        saved = first.events("checkpoint")
        assert len(saved) >= 3

        second = NodeProcess.node(args, tmp_path / "run2", "run2")
        again = second.wait_ready()
        assert again["peer_id"] == ready["peer_id"], "the identity is kept next to the checkpoints"
        assert again["modules"] == ready["modules"], "the same experts are hosted again"
        (resumed,) = second.events("resumed")
        # At most one checkpoint interval (one round) is lost.
        assert resumed["round"] >= saved[-1]["round"] - 1
        assert again["outer_round"] >= resumed["round"]
        assert second.terminate() == 0
        assert second.events("checkpoint"), "a checkpoint is written on shutdown"
    finally:
        leaks = {n.name: n.cleanup() for n in (first, second) if n is not None}
        assert not any(leaks.values()), leaks
