"""Unit tests for the byte-level mixture-of-experts model."""

from __future__ import annotations

import pytest
import torch

from node.training.experts import GroupedExperts, row_ranges
from node.training.model import Expert, MoETransformer
from protocol.manifest import ModelSpec

SPEC = ModelSpec(seq_len=32, d_model=32, n_layers=2, n_heads=4, n_experts=4, top_k=2, expert_hidden=64)


def _batch(seed: int = 0, b: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, SPEC.seq_len + 1), generator=g)


def _same_state(a: MoETransformer, b: MoETransformer) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_init_is_deterministic_and_ignores_global_rng() -> None:
    torch.manual_seed(123)
    a = MoETransformer(SPEC, seed=7)
    before = torch.random.get_rng_state()
    torch.manual_seed(999)
    b = MoETransformer(SPEC, seed=7)
    assert _same_state(a, b)
    assert not _same_state(a, MoETransformer(SPEC, seed=8))
    # Building a model must not consume the caller's random stream.
    torch.manual_seed(123)
    MoETransformer(SPEC, seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_output_shapes_and_losses() -> None:
    model = MoETransformer(SPEC, seed=0)
    tokens = _batch()[:, :10]
    assert model(tokens).shape == (4, 10, SPEC.vocab_size)
    batch = _batch()
    loss, lm = model.loss(batch), model.lm_loss(batch)
    assert loss.dim() == 0 and lm.dim() == 0
    # The aux term is positive, so the training loss sits just above the LM loss.
    assert 0 < (loss - lm).item() < 0.1
    with pytest.raises(ValueError):
        model(torch.zeros(1, SPEC.seq_len + 1, dtype=torch.long))


def test_module_parameters_partition_all_parameters() -> None:
    model = MoETransformer(SPEC, seed=0)
    seen: list[int] = []
    for name in SPEC.module_names():
        params = model.module_parameters(name)
        assert params, name
        assert [id(p) for p in params] == [id(p) for p in model.module_parameters(name)]
        seen.extend(id(p) for p in params)
    assert len(seen) == len(set(seen))
    assert set(seen) == {id(p) for p in model.parameters()}
    # The router gate belongs to its expert.
    expert = model.module_parameters("expert.1.2")
    assert any(p is model.blocks[1].moe.experts[2].gate for p in expert)
    total = sum(model.count_parameters(n) for n in SPEC.module_names())
    assert total == model.count_parameters()


def test_unknown_module_name_raises() -> None:
    model = MoETransformer(SPEC, seed=0)
    for bad in ("expert.9.0", "expert.0.4", "expert.0", "head", "expert.00.1"):
        with pytest.raises(ValueError):
            model.module_parameters(bad)
    with pytest.raises(ValueError):
        model.set_hosted_experts(["expert.0.9"])


def test_non_hosted_experts_get_no_gradient() -> None:
    model = MoETransformer(SPEC, seed=0)
    assert model.hosted_experts == tuple(sorted(SPEC.module_names()[1:]))
    hosted = {"expert.0.1", "expert.0.3", "expert.1.0"}
    model.set_hosted_experts(["trunk", *hosted])
    assert model.hosted_experts == tuple(sorted(hosted))
    model.loss(_batch()).backward()
    for name in SPEC.module_names():
        grads = [p.grad for p in model.module_parameters(name)]
        if name == "trunk" or name in hosted:
            assert all(g is not None for g in grads), name
        else:
            assert all(g is None for g in grads), name


def test_layer_without_hosted_expert_skips_ffn() -> None:
    model = MoETransformer(SPEC, seed=0)
    model.set_hosted_experts(["expert.0.2"])  # layer 1 hosts nothing; top_k drops to 1 in layer 0
    loss = model.loss(_batch())
    assert torch.isfinite(loss)
    loss.backward()
    assert model.module_parameters("expert.0.2")[0].grad is not None
    assert all(p.grad is None for p in model.module_parameters("expert.1.0"))
    model.set_hosted_experts([])
    assert model.hosted_experts == ()
    assert torch.isfinite(model.lm_loss(_batch()))


def test_adamw_steps_lower_the_loss() -> None:
    model = MoETransformer(SPEC, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = _batch(b=2)
    first = model.loss(batch).item()
    for _ in range(15):
        opt.zero_grad()
        model.loss(batch).backward()
        opt.step()
    assert model.loss(batch).item() < first - 0.5


def test_generate_returns_requested_bytes() -> None:
    model = MoETransformer(SPEC, seed=0)
    long_prompt = b"x" * (SPEC.seq_len + 5)  # longer than the context: must be cropped
    out = model.generate(long_prompt, 20, generator=torch.Generator().manual_seed(1))
    assert isinstance(out, bytes) and len(out) == 20
    again = model.generate(long_prompt, 20, generator=torch.Generator().manual_seed(1))
    assert out == again
    assert len(model.generate(b"", 3, temperature=0)) == 3
    assert model.generate(b"ab", 0) == b""


def test_grouped_experts_match_separate_linear_modules() -> None:
    torch.manual_seed(0)
    d, hidden, counts = 8, 16, [5, 0, 3, 9]  # the second expert gets no rows
    experts = [Expert(d, hidden) for _ in counts]
    x = torch.randn(sum(counts), d, requires_grad=True)
    params = [p for e in experts for p in (e.up.weight, e.up.bias, e.down.weight, e.down.bias)]
    y = GroupedExperts.apply(x, counts, *params)
    weights = torch.randn_like(y)
    (y * weights).sum().backward()
    grouped = [x.grad.clone()] + [p.grad.clone() for p in params]

    x.grad = None
    for p in params:
        p.grad = None
    rows = [x[start:end] for start, end in row_ranges(counts)]
    reference = torch.cat([expert(r) for expert, r in zip(experts, rows, strict=True)])
    torch.testing.assert_close(y, reference)
    (reference * weights).sum().backward()
    expected = [x.grad] + [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    for got, want in zip(grouped, expected, strict=True):
        torch.testing.assert_close(got, want)
    assert all(g.abs().sum() == 0 for g in grouped[5:9])  # the expert without rows: zero, not None


def test_moe_layer_matches_routing_each_expert_separately() -> None:
    model = MoETransformer(SPEC, seed=0)
    model.set_hosted_experts(["expert.0.0", "expert.0.2", "expert.0.3"])
    layer = model.blocks[0].moe
    x = torch.randn(4, SPEC.seq_len, SPEC.d_model, generator=torch.Generator().manual_seed(3))
    out, _ = layer(x)

    flat = x.reshape(-1, SPEC.d_model)  # the straightforward way: one expert module at a time
    gates = torch.stack([layer.experts[i].gate for i in layer.hosted])
    top_logits, top_idx = (flat @ gates.t()).topk(SPEC.top_k, dim=-1)
    weights = torch.softmax(top_logits, dim=-1)
    expected = torch.zeros_like(flat)
    for slot, expert_id in enumerate(layer.hosted):
        tokens, choice = (top_idx == slot).nonzero(as_tuple=True)
        y = layer.experts[expert_id](flat[tokens]) * weights[tokens, choice].unsqueeze(-1)
        expected.index_add_(0, tokens, y)
    torch.testing.assert_close(out.reshape(-1, SPEC.d_model), expected)
