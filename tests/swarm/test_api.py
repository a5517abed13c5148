"""The Python API on real swarms: API nodes in this process averaging with a CLI node."""

from __future__ import annotations

import os
import time
from typing import Iterable, List

import pytest
import torch
import torch.nn.functional as F

from node import CommonsNode, StateError
from node.ops.procs import children_of
from protocol.manifest import Manifest, load_manifest
from tests.procs import NodeProcess, write_text_corpus, write_tiny_manifest

pytestmark = pytest.mark.swarm


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def inputs(tmp_path):
    manifest = write_tiny_manifest(tmp_path / "manifest.yaml", experts=2, steps=10)
    corpus = write_text_corpus(tmp_path / "text.txt")
    return dict(manifest=str(manifest), data=str(corpus), experts=1, metrics_addr="127.0.0.1:0")


def test_two_api_nodes_average_with_a_cli_node_and_stop_cleanly(tmp_path, inputs):
    before = set(children_of(os.getpid()))
    cli = NodeProcess.node(
        ["start", "--manifest", inputs["manifest"], "--data", inputs["data"], "--experts", "1"], tmp_path / "cli", "cli"
    )
    nodes: List[CommonsNode] = []
    try:
        cli.wait_ready()
        before.add(cli.proc.pid)
        for _ in range(2):
            started = time.monotonic()
            node = CommonsNode(initial_peers=[cli.maddr], **inputs).start()
            assert time.monotonic() - started < 1.0, "start() must not block"
            nodes.append(node)
        for node in nodes:
            assert node.wait_ready()["swarm_id"] == cli.ready["swarm_id"]

        def all_three_averaged() -> bool:
            return all(
                any(h["trunk_group"] == 3 and h["trunk_fraction"] == 1.0 for h in n._node.history) for n in nodes
            )

        wait_until(all_three_averaged, 90, "a trunk round with the CLI node and both API nodes")
        table = nodes[0].swarm()
        frame = nodes[0].swarm(as_dataframe=True)
        assert str(frame["last_seen"].dtype).startswith("datetime64"), frame.dtypes  # not a raw epoch float
        assert {cli.ready["peer_id"], *(n.status()["peer_id"] for n in nodes)} <= {p["peer_id"] for p in table["peers"]}
        with pytest.raises(StateError, match="background"):
            nodes[0].train(rounds=1)
        with pytest.raises(StateError, match="already training"):
            nodes[0].start()
    finally:
        for node in nodes:
            node.stop()
        assert cli.terminate() == 0
        assert cli.cleanup() == []
    # Every DHT process and p2pd the API nodes started is gone.
    assert set(children_of(os.getpid())) <= before


def test_methods_in_the_wrong_state_raise_clear_errors(inputs):
    node = CommonsNode(**inputs)
    for call in (lambda: node.swarm(), lambda: node.model, lambda: node.sample("x"), lambda: node.evaluate("abc")):
        with pytest.raises(StateError, match="not joined yet"):
            call()
    with pytest.raises(ValueError, match="exactly one"):
        node.train()
    history = node.train(steps=5, progress=False)
    assert history == [] and node.status()["local_steps"] == 5
    history = node.train(rounds=2, progress=False)  # overlapped rounds: it used to run 3
    assert [h["round"] for h in history] == [0, 1] and all(h["eval_loss"] is not None for h in history)
    steps = node.status()["local_steps"]
    assert isinstance(node.model, torch.nn.Module)
    assert 0 < node.evaluate("the swarm trains one model") < 10
    node.stop()
    node.stop()  # twice is fine
    final = node.status()  # the last real figures, not zeros (README: "From Python or a notebook")
    assert final["state"] == "stopped" and final["local_steps"] == steps and final["peer_id"]
    with pytest.raises(StateError, match="stopped"):
        node.train(steps=1)
    with pytest.raises(StateError, match="stopped"):
        node.start()


class TinyBigram(torch.nn.Module):
    """A researcher's own model: a bigram trunk plus two 'expert' correction tables."""

    def __init__(self, manifest: Manifest) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(manifest.seed)
        self.trunk = torch.nn.Parameter(torch.randn(256, 256, generator=generator) * 0.01)
        self.experts = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(256, 256, generator=generator) * 0.01) for _ in range(2)]
        )
        self.hosted = [0, 1]

    def module_names(self):
        return ["trunk", "expert.0.0", "expert.0.1"]

    def module_parameters(self, module: str):
        return [self.trunk] if module == "trunk" else [self.experts[int(module.rsplit(".", 1)[1])]]

    def set_hosted_experts(self, modules: Iterable[str]) -> None:
        self.hosted = [int(m.rsplit(".", 1)[1]) for m in modules if m != "trunk"]

    def lm_loss(self, batch: torch.Tensor) -> torch.Tensor:
        table = self.trunk + sum((self.experts[i] for i in self.hosted), torch.zeros(()))
        logits = table[batch[:, :-1]]
        return F.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))

    loss = lm_loss


def test_a_custom_model_gets_placement_and_averaging(inputs):
    nodes = [CommonsNode(model_factory=TinyBigram, **inputs).start()]
    try:
        ready = nodes[0].wait_ready()
        nodes.append(CommonsNode(model_factory=TinyBigram, initial_peers=[ready["maddrs"][0]], **inputs).start())
        nodes[1].wait_ready()
        # The architecture is part of the swarm id: plain manifest peers never mix with these.
        assert ready["swarm_id"] != load_manifest(inputs["manifest"]).swarm_id
        assert nodes[1].status()["swarm_id"] == ready["swarm_id"]

        def averaged() -> bool:
            return all(any(h["trunk_group"] == 2 for h in n._node.history) for n in nodes)

        wait_until(averaged, 60, "a trunk round of the two custom-model nodes")
        hosted = [set(n.status()["modules"]) - {"trunk"} for n in nodes]
        assert hosted[0] | hosted[1] == {"expert.0.0", "expert.0.1"}, hosted
    finally:
        for node in nodes:
            node.stop()
