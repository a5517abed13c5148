"""Unit tests for the per-module DiLoCo state and the all-reduce slicing."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from node.averaging.slices import MAX_SLICES, backup_of, chunked_bounds, owner_of, slice_bounds, slice_values
from node.training.diloco import ModuleState
from protocol.manifest import OuterOptimizerSpec
from protocol.wire import payload_bytes

SPEC = OuterOptimizerSpec(lr=0.7, momentum=0.9)


def _linear(seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(5, 3)


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def _inner_steps(module: torch.nn.Module, seed: int) -> None:
    """Stand-in for H local steps: move every parameter a little."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def test_initial_state() -> None:
    layer = _linear()
    state = ModuleState("trunk", list(layer.parameters()), SPEC)
    assert state.numel == 5 * 3 + 3
    assert torch.equal(state.global_flat, _flat(layer))
    assert torch.count_nonzero(state.momentum) == 0
    assert torch.count_nonzero(state.pseudo_gradient()) == 0
    # The global copy is a copy, not a view of the parameters.
    _inner_steps(layer, 1)
    assert not torch.equal(state.global_flat, _flat(layer))


def test_pseudo_gradient_is_global_minus_local() -> None:
    layer = _linear()
    state = ModuleState("trunk", list(layer.parameters()), SPEC)
    start = _flat(layer).clone()
    _inner_steps(layer, 1)
    expected = start - _flat(layer)
    assert torch.allclose(state.pseudo_gradient(), expected)
    payload = state.payload(resync=False)
    assert isinstance(payload, np.ndarray) and payload.dtype == np.float32 and payload.shape == (state.numel,)
    np.testing.assert_allclose(payload, expected.numpy(), rtol=0, atol=1e-7)


def test_apply_matches_torch_sgd_nesterov() -> None:
    layer = _linear()
    reference = copy.deepcopy(layer)
    state = ModuleState("trunk", list(layer.parameters()), SPEC)
    optimizer = torch.optim.SGD(reference.parameters(), lr=SPEC.lr, momentum=SPEC.momentum, nesterov=True)
    for step in range(3):
        _inner_steps(layer, seed=10 + step)
        averaged = state.payload(resync=False)
        # Reference: the same gradient, applied by torch's own optimizer to the previous global copy.
        offset = 0
        for p in reference.parameters():
            p.grad = torch.from_numpy(averaged[offset : offset + p.numel()].copy()).view_as(p)
            offset += p.numel()
        optimizer.step()
        state.apply(averaged, resync=False)
        assert torch.allclose(state.global_flat, _flat(reference), rtol=1e-5, atol=1e-6), step
        # The new global copy is written back into the model.
        assert torch.equal(_flat(layer), state.global_flat)
        buf = torch.cat([optimizer.state[p]["momentum_buffer"].reshape(-1) for p in reference.parameters()])
        assert torch.allclose(state.momentum, buf, rtol=1e-5, atol=1e-6), step


def test_apply_does_not_keep_a_view_of_the_averaged_buffer() -> None:
    layer = _linear()
    state = ModuleState("trunk", list(layer.parameters()), SPEC)
    _inner_steps(layer, 1)
    averaged = state.payload(resync=True)
    state.apply(averaged, resync=True)
    snapshot = (state.global_flat.clone(), state.momentum.clone())
    averaged[:] = 123.0  # the caller reuses its buffer
    assert torch.equal(state.global_flat, snapshot[0]) and torch.equal(state.momentum, snapshot[1])


def test_resync_payload_and_adoption() -> None:
    layer = _linear()
    state = ModuleState("trunk", list(layer.parameters()), SPEC)
    _inner_steps(layer, 1)
    state.apply(state.payload(resync=False), resync=False)  # some momentum
    _inner_steps(layer, 2)
    n = state.numel
    payload = state.payload(resync=True)
    assert payload.shape == (3 * n,)
    np.testing.assert_array_equal(payload[:n], state.pseudo_gradient().numpy())
    np.testing.assert_array_equal(payload[n : 2 * n], state.global_flat.numpy())
    np.testing.assert_array_equal(payload[2 * n :], state.momentum.numpy())

    # A group averaged (delta, global, momentum): the member adopts the averaged global/momentum, then steps.
    g = torch.Generator().manual_seed(5)
    delta, avg_global, avg_momentum = (torch.randn(n, generator=g) for _ in range(3))
    averaged = torch.cat([delta, avg_global, avg_momentum]).numpy()
    state.apply(averaged, resync=True)
    mu, lr = SPEC.momentum, SPEC.lr
    expected_momentum = mu * avg_momentum + delta
    expected_global = avg_global - lr * (delta + mu * expected_momentum)
    assert torch.allclose(state.momentum, expected_momentum, atol=1e-6)
    assert torch.allclose(state.global_flat, expected_global, atol=1e-6)
    assert torch.equal(_flat(layer), state.global_flat)


def test_resync_makes_members_identical() -> None:
    a_layer, b_layer = _linear(0), _linear(1)
    a = ModuleState("trunk", list(a_layer.parameters()), SPEC)
    b = ModuleState("trunk", list(b_layer.parameters()), SPEC)
    _inner_steps(a_layer, 1)
    _inner_steps(b_layer, 2)
    b.apply(b.payload(resync=False), resync=False)
    assert a.params_hash() != b.params_hash()
    averaged = (a.payload(resync=True) + b.payload(resync=True)) / 2
    a.apply(averaged.copy(), resync=True)
    b.apply(averaged.copy(), resync=True)
    assert a.params_hash() == b.params_hash()
    assert torch.equal(_flat(a_layer), _flat(b_layer))


def test_params_hash() -> None:
    a = ModuleState("trunk", list(_linear(0).parameters()), SPEC)
    b = ModuleState("trunk", list(_linear(0).parameters()), SPEC)
    c = ModuleState("trunk", list(_linear(1).parameters()), SPEC)
    assert a.params_hash() == b.params_hash()
    assert len(a.params_hash()) == 32 and int(a.params_hash(), 16) >= 0
    assert a.params_hash() != c.params_hash()
    # Only the momentum differs.
    b.momentum[0] = 1e-3
    assert a.params_hash() != b.params_hash()
    # Local (inner-step) changes do not change the hash of the global state.
    before = a.params_hash()
    with torch.no_grad():
        a.params[0].add_(1.0)
    assert a.params_hash() == before


def test_multiple_parameters_keep_their_shapes() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2, bias=False))
    state = ModuleState("trunk", list(model.parameters()), SPEC)
    shapes = [p.shape for p in model.parameters()]
    _inner_steps(model, 3)
    state.apply(state.payload(resync=False), resync=False)
    assert [p.shape for p in model.parameters()] == shapes
    assert torch.equal(_flat(model), state.global_flat)


@pytest.mark.parametrize(
    "numel, parts", [(10, 1), (10, 3), (10, 4), (9, 3), (3, 5), (0, 2), (1, 1), (1000003, 7), (17, 16)]
)
def test_slice_bounds(numel: int, parts: int) -> None:
    bounds = slice_bounds(numel, parts)
    assert len(bounds) == parts
    assert bounds[0][0] == 0 and bounds[-1][1] == numel
    for (_, end), (start, _) in zip(bounds, bounds[1:], strict=False):
        assert end == start
    sizes = [end - start for start, end in bounds]
    assert min(sizes) >= 0 and max(sizes) - min(sizes) <= 1
    assert sum(sizes) == numel
    assert sizes == sorted(sizes, reverse=True)  # the longer slices come first


@pytest.mark.parametrize(
    "numel, size, chunk",
    [(10_000_000, 4, 262_144), (40_000, 4, 2_500), (1000, 4, 262_144), (3, 4, 16), (10**9, 16, 16), (0, 3, 100)],
)
def test_chunked_bounds_give_each_member_one_slice_per_chunk(numel: int, size: int, chunk: int) -> None:
    bounds = chunked_bounds(numel, size, chunk)
    assert len(bounds) % size == 0 and len(bounds) <= MAX_SLICES
    assert bounds == slice_bounds(numel, len(bounds))  # contiguous, covering, near-equal
    chunks = len(bounds) // size
    if chunks < MAX_SLICES // size:  # not capped by the wire's slice limit: slices are at most about a chunk
        assert max(hi - lo for lo, hi in bounds) <= chunk
    assert chunks == 1 or numel > size * chunk
    for index in range(len(bounds)):  # every member reduces one slice of every chunk, and backs up the next one
        assert owner_of(index, range(size)) == index % size != backup_of(index, range(size)) or size == 1
    assert sorted(owner_of(i, range(size)) for i in range(size)) == list(range(size))


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_a_slice_carries_about_the_same_bytes_whatever_the_compression(dtype: str) -> None:
    chunk = 65_536
    bounds = chunked_bounds(10_000_000, 4, slice_values(chunk, dtype))
    largest = max(hi - lo for lo, hi in bounds)
    assert 0.5 * chunk * 4 < payload_bytes(largest, dtype) <= 1.01 * chunk * 4
    assert len(bounds) == {"float32": 156, "float16": 80, "int8": 40}[dtype]


def test_an_overlapped_round_keeps_the_local_steps_taken_meanwhile():
    """apply(drift=...) = outer step on the global copy, plus what training did since the snapshot."""
    params = [torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))]
    state = ModuleState("trunk", params, OuterOptimizerSpec(lr=0.5, momentum=0.0))
    with torch.no_grad():
        params[0].sub_(torch.tensor([0.2, 0.2, 0.2]))  # H local steps
    delta = state.pseudo_gradient()  # captured when the round starts
    with torch.no_grad():
        params[0].add_(torch.tensor([0.0, 0.1, 0.0]))  # steps taken while the round is on the network
    drift = state.local_flat() - (state.global_flat - delta)
    state.apply(delta.numpy(), resync=False, drift=drift)
    expected_global = torch.tensor([1.0, 2.0, 3.0]) - 0.5 * torch.tensor([0.2, 0.2, 0.2])
    torch.testing.assert_close(state.global_flat, expected_global)
    torch.testing.assert_close(params[0].detach(), expected_global + torch.tensor([0.0, 0.1, 0.0]))
