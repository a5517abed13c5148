"""Routing affinity on a tiny model (MoETransformer.routing_affinity), the own batches it is measured on
(Trainer.own_batches), and fetching just an expert's gate from its hosts (StateDownloader.head)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from node.net import InProcessNetwork, VirtualClock, run_virtual
from node.swarm.statesync import StateDownloader, StateServer
from node.training import TextData, Trainer
from node.training.diloco import ModuleState
from node.training.model import MoETransformer
from protocol.manifest import Manifest, ModelSpec, OuterOptimizerSpec, PlacementSpec, TrainingSpec

SPEC = ModelSpec(seq_len=32, d_model=32, n_layers=2, n_heads=4, n_experts=4, top_k=2, expert_hidden=64)


def _bytes_batch(alphabet: bytes, seed: int, b: int = 8) -> torch.Tensor:
    """(b, seq_len + 1) windows drawn from ``alphabet`` only: a corpus with its own byte distribution."""
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, len(alphabet), (b, SPEC.seq_len + 1), generator=g)
    return torch.tensor(list(alphabet))[index]


DIGITS = [_bytes_batch(b"0123456789 ", seed) for seed in range(2)]
PROSE = [_bytes_batch(b"the quick brown fox jumps over a lazy dog ", seed) for seed in range(2)]


def _gate(model: MoETransformer, module: str) -> torch.Tensor:
    return model.module_parameters(module)[0].detach().clone()


def test_shares_cover_every_expert_and_sum_to_one_per_layer() -> None:
    model = MoETransformer(SPEC, seed=0)
    affinity = model.routing_affinity(DIGITS)
    assert set(affinity) == set(SPEC.module_names()[1:])
    for layer in range(SPEC.n_layers):
        assert abs(sum(v for e, v in affinity.items() if e.startswith(f"expert.{layer}.")) - 1.0) < 1e-6
    assert model.routing_affinity(DIGITS) == affinity  # no randomness: same batches, same shares


def test_different_data_routes_differently() -> None:
    model = MoETransformer(SPEC, seed=0)
    assert model.routing_affinity(DIGITS) != model.routing_affinity(PROSE)


def test_every_expert_is_scored_whatever_this_node_hosts_and_nothing_changes() -> None:
    model = MoETransformer(SPEC, seed=0)
    everything = model.routing_affinity(DIGITS)
    model.set_hosted_experts(["expert.0.0", "expert.1.1"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    partial = model.routing_affinity(DIGITS)
    # Layer 0's router sees the same input whatever is hosted; layer 1's follows what this node computes.
    assert {e: v for e, v in partial.items() if e.startswith("expert.0.")} == {
        e: v for e, v in everything.items() if e.startswith("expert.0.")
    }
    assert any(partial[e] > 0 for e in ("expert.0.1", "expert.0.2", "expert.0.3"))  # not hosted, still scored
    assert model.hosted_experts == ("expert.0.0", "expert.1.1")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_given_gates_replace_the_models_own() -> None:
    model = MoETransformer(SPEC, seed=0)
    own = model.routing_affinity(PROSE)
    same = {e: _gate(model, e) for e in ("expert.0.1", "expert.1.2")}
    assert model.routing_affinity(PROSE, same) == own
    # Exchanging two gates exchanges those two experts' shares.
    swapped = {"expert.0.0": _gate(model, "expert.0.1"), "expert.0.1": _gate(model, "expert.0.0")}
    after = model.routing_affinity(PROSE, swapped)
    assert (after["expert.0.0"], after["expert.0.1"]) == (own["expert.0.1"], own["expert.0.0"])
    # A gate from the swarm that points where this data lives takes the layer's routing.
    toward = {"expert.0.3": 100.0 * _gate(model, "expert.0.3") + 1e3 * _mean_router_input(model, PROSE)}
    assert model.routing_affinity(PROSE, toward)["expert.0.3"] > 0.45  # top-2 of 4: at most 0.5


def _mean_router_input(model: MoETransformer, batches: List[torch.Tensor]) -> torch.Tensor:
    seen: List[torch.Tensor] = []
    block = model.blocks[0]
    hook = block.moe.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, SPEC.d_model)))
    with torch.no_grad():
        for batch in batches:
            model(batch[:, :-1])
    hook.remove()
    return torch.cat(seen).mean(dim=0)


def test_own_batches_are_the_latest_trained_on_else_held_out(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("plain words for a small corpus of text, written here. " * 400)
    manifest = Manifest(model=SPEC, training=TrainingSpec(batch_size=4, eval_batches=1),
                        placement=PlacementSpec(policy="follow_data", affinity_batches=2))  # fmt: skip
    trainer = Trainer(manifest, TextData(str(corpus), SPEC.seq_len), torch.device("cpu"))
    held_out = trainer.own_batches()
    assert 1 <= len(held_out) <= 2 and held_out[0].shape[1] == SPEC.seq_len + 1
    assert trainer.data.position == (0, 0)  # the training stream did not move
    for _ in range(3):
        trainer.step()
    latest = trainer.own_batches()
    assert len(latest) == 2 and all(b.shape == (4, SPEC.seq_len + 1) for b in latest)


# --- a gate from its hosts ---------------------------------------------------------------------


def _state(seed: int, numel: int = 40) -> ModuleState:
    g = torch.Generator().manual_seed(seed)
    state = ModuleState("expert.0.1", [torch.nn.Parameter(torch.randn(numel, generator=g))], OuterOptimizerSpec())
    state.momentum = torch.randn(numel, generator=g)
    return state


def _head(states: Dict[str, ModuleState], asker_donors: List[str], count: int) -> Optional[np.ndarray]:
    clock = VirtualClock()
    network = InProcessNetwork(clock=clock.wall)

    async def scenario() -> Optional[np.ndarray]:
        for peer, state in states.items():
            port = network.join(peer)
            await StateServer(port, "swarm", lambda s=state: {"expert.0.1": s}, lambda: 3).start()
        downloader = StateDownloader(network.join("asker"), "swarm", timeout=2.0)
        try:
            return await downloader.head("expert.0.1", asker_donors, count)
        finally:
            await network.close()

    return run_virtual(scenario(), clock=clock)


def test_head_fetches_the_gate_most_hosts_agree_on() -> None:
    honest = _state(1)
    states = {"a": honest, "b": _state(1), "c": _state(2)}  # c's state differs: outvoted
    values = _head(states, ["c", "a", "b"], count=8)
    assert values is not None and np.array_equal(values, honest.global_flat[:8].numpy())
    assert _head({"a": honest}, ["a", "gone"], count=8) is not None  # one host is enough
    assert _head({"a": honest}, ["gone"], count=8) is None
