"""Byte-level mixture-of-experts transformer.

The parameters are split into averaging units: the trunk (everything shared) and one unit
per expert. Each expert owns its own router gate vector, so a peer that does not host an
expert never reads or writes any of that expert's parameters, gate included.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from node.training.experts import GroupedExperts
from node.training.sampling import sample_bytes
from protocol.manifest import ModelSpec

AUX_LOSS_COEF = 0.01
_INIT_STD = 0.02


class Expert(nn.Module):
    """Feed-forward expert plus the router gate that scores tokens for it."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        # Registered first so the gate leads the module's fixed parameter order.
        self.gate = nn.Parameter(torch.empty(d_model))
        self.up = nn.Linear(d_model, hidden)
        self.down = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down(F.gelu(self.up(x)))
        return out


class MoELayer(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.top_k = spec.top_k
        self.experts = nn.ModuleList(Expert(spec.d_model, spec.expert_hidden) for _ in range(spec.n_experts))
        self.hosted: list[int] = list(range(spec.n_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if not self.hosted:
            return torch.zeros_like(x), flat.new_zeros(())
        # Stacking only hosted gates is the -inf mask in effect, and keeps autograd from
        # ever reaching a non-hosted expert's gate (its .grad must stay None).
        gates = torch.stack([self._expert(i).gate for i in self.hosted])
        logits = flat @ gates.t()
        n_hosted = len(self.hosted)
        k = min(self.top_k, n_hosted)
        top_logits, top_idx = logits.topk(k, dim=-1)
        weights = torch.softmax(top_logits, dim=-1)
        # The rows (token, choice) sorted by expert: a stable sort keeps each expert's tokens in order.
        choices = top_idx.reshape(-1)
        order = torch.sort(choices, stable=True).indices
        counts = torch.bincount(choices, minlength=n_hosted)
        token_of_row = order // k
        params = [p for i in self.hosted for p in self._expert_params(i)]
        # An expert that got no rows still gets a (zero) gradient, so the optimizer treats hosted experts alike.
        y = GroupedExperts.apply(flat[token_of_row], counts.tolist(), *params)  # type: ignore[no-untyped-call]
        out = torch.zeros_like(flat).index_add_(0, token_of_row, y * weights.reshape(-1)[order].unsqueeze(-1))
        # Switch-transformer balance loss: fraction dispatched times mean router probability.
        probs = torch.softmax(logits, dim=-1)
        fraction = counts.to(flat.dtype) / top_idx.numel()
        aux = n_hosted * torch.sum(fraction * probs.mean(dim=0))
        return out.reshape(shape), aux

    def _expert(self, index: int) -> Expert:
        return cast(Expert, self.experts[index])

    def _expert_params(self, index: int) -> tuple[torch.Tensor, ...]:
        expert = self._expert(index)
        return expert.up.weight, expert.up.bias, expert.down.weight, expert.down.bias


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.n_heads = spec.n_heads
        self.qkv = nn.Linear(spec.d_model, 3 * spec.d_model)
        self.proj = nn.Linear(spec.d_model, spec.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
        out: torch.Tensor = self.proj(y.transpose(1, 2).reshape(b, t, d))
        return out


class Block(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(spec.d_model)
        self.attn = Attention(spec)
        self.ln2 = nn.LayerNorm(spec.d_model)
        self.moe = MoELayer(spec)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.attn(self.ln1(x))
        y, aux = self.moe(self.ln2(x))
        return x + y, aux


class MoETransformer(nn.Module):
    """Causal byte-level transformer whose feed-forward layers are mixtures of experts."""

    def __init__(self, spec: ModelSpec, seed: int) -> None:
        super().__init__()
        self.spec = spec
        # Module constructors draw default inits from the global RNG; forking keeps the
        # caller's RNG untouched, and every value is then redrawn from a private generator.
        with torch.random.fork_rng(devices=[]):
            self.tok_emb = nn.Embedding(spec.vocab_size, spec.d_model)
            self.pos_emb = nn.Embedding(spec.seq_len, spec.d_model)
            self.blocks = nn.ModuleList(Block(spec) for _ in range(spec.n_layers))
            self.ln_f = nn.LayerNorm(spec.d_model)
        self._init_weights(seed)
        self._modules_params = self._build_partition()

    def _init_weights(self, seed: int) -> None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        # GPT-2 style: residual-writing projections shrink with depth to keep the stream stable.
        resid_std = _INIT_STD / math.sqrt(2 * self.spec.n_layers)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.startswith("ln") or ".ln" in name:
                    p.fill_(1.0 if name.endswith("weight") else 0.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    std = resid_std if name.endswith(("proj.weight", "down.weight")) else _INIT_STD
                    p.normal_(0.0, std, generator=gen)

    def _blocks(self) -> list[Block]:
        return [cast(Block, block) for block in self.blocks]

    def _build_partition(self) -> dict[str, list[nn.Parameter]]:
        parts: dict[str, list[nn.Parameter]] = {}
        expert_ids: set[int] = set()
        for layer, block in enumerate(self._blocks()):
            for index, expert in enumerate(block.moe.experts):
                params = list(expert.parameters())
                parts[f"expert.{layer}.{index}"] = params
                expert_ids.update(id(p) for p in params)
        parts = {"trunk": [p for p in self.parameters() if id(p) not in expert_ids], **parts}
        return parts

    # -- hosting -----------------------------------------------------------------------

    def module_names(self) -> tuple[str, ...]:
        """The averaging units: "trunk", then "expert.<layer>.<index>"."""
        return self.spec.module_names()

    def set_hosted_experts(self, modules: Iterable[str]) -> None:
        """Restrict routing to these experts. "trunk" is accepted and ignored, so a peer
        can pass its whole list of hosted modules."""
        hosted: list[list[int]] = [[] for _ in range(self.spec.n_layers)]
        for name in modules:
            if name not in self._modules_params:
                raise ValueError(f"unknown module name {name!r}; expected 'trunk' or 'expert.<layer>.<index>'")
            if name == "trunk":
                continue
            _, layer, index = name.split(".")
            hosted[int(layer)].append(int(index))
        for block, indices in zip(self._blocks(), hosted, strict=True):
            block.moe.hosted = sorted(set(indices))

    @property
    def hosted_experts(self) -> tuple[str, ...]:
        names = [f"expert.{layer}.{i}" for layer, block in enumerate(self._blocks()) for i in block.moe.hosted]
        return tuple(sorted(names))

    # -- parameters --------------------------------------------------------------------

    def module_parameters(self, module: str) -> list[nn.Parameter]:
        """Parameters of one averaging unit, in a fixed order shared by every peer."""
        try:
            return list(self._modules_params[module])
        except KeyError:
            raise ValueError(f"unknown module name {module!r}; expected 'trunk' or 'expert.<layer>.<index>'") from None

    def count_parameters(self, module: str | None = None) -> int:
        params = self.parameters() if module is None else self.module_parameters(module)
        return sum(p.numel() for p in params)

    # -- compute -----------------------------------------------------------------------

    def _forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = tokens.shape[1]
        if t > self.spec.seq_len:
            raise ValueError(f"sequence length {t} exceeds model seq_len {self.spec.seq_len}")
        pos = torch.arange(t, device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(pos)
        aux = x.new_zeros(())
        for block in self.blocks:
            x, layer_aux = block(x)
            aux = aux + layer_aux
        # Output head tied to the token embedding: fewer trunk parameters to average.
        logits = self.ln_f(x) @ self.tok_emb.weight.t()
        return logits, aux

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._forward(tokens)[0]

    # -- routing affinity ----------------------------------------------------------------

    def gate_elements(self) -> int:
        """Each expert's gate is the first this many values of its module's flat parameters (registered first)."""
        return self.spec.d_model

    @torch.no_grad()
    def routing_affinity(
        self, batches: Iterable[torch.Tensor], gates: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, float]:
        """Per expert, the share of its layer's (token, choice) routings it would get were every expert hosted.

        Each MoE layer's router input is what this model computes on ``batches`` ((B, T+1) byte batches; the
        last position is a target and is dropped); its top-k is taken over every expert's gate, ``gates``
        (by module name) replacing the model's own, e.g. with the swarm's current gates of experts it does not
        host. Shares sum to 1 per layer; routing only reads, the model's parameters and hosting are unchanged.
        """
        gates = gates or {}
        n, k = self.spec.n_experts, self.spec.top_k
        counts = torch.zeros(self.spec.n_layers, n)
        matrices = [self._gate_matrix(layer, gates) for layer in range(self.spec.n_layers)]

        def counter(layer: int) -> Any:
            def count(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
                flat = args[0].reshape(-1, args[0].shape[-1])
                top = (flat @ matrices[layer].t()).topk(k, dim=-1).indices.reshape(-1)
                counts[layer] += torch.bincount(top, minlength=n).cpu().to(counts.dtype)

            return count

        hooks = [block.moe.register_forward_pre_hook(counter(layer)) for layer, block in enumerate(self._blocks())]
        try:
            for batch in batches:
                self.forward(batch[:, :-1].to(self.tok_emb.weight.device))
        finally:
            for hook in hooks:
                hook.remove()
        shares = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
        return {f"expert.{layer}.{i}": float(shares[layer, i]) for layer in range(self.spec.n_layers) for i in range(n)}

    def _gate_matrix(self, layer: int, gates: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """[n_experts, d_model]: every expert's gate in ``layer``, from ``gates`` where given, else the model's."""
        moe = self._blocks()[layer].moe
        own = [moe._expert(i).gate for i in range(self.spec.n_experts)]
        return torch.stack([gates.get(f"expert.{layer}.{i}", g).to(g) for i, g in enumerate(own)])

    def _split(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if batch.dim() != 2 or batch.shape[1] < 2:
            raise ValueError(f"batch must have shape (B, T+1) with T >= 1, got {tuple(batch.shape)}")
        return batch[:, :-1], batch[:, 1:]

    def lm_loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Next-byte cross entropy only (what evaluation reports)."""
        inputs, targets = self._split(batch)
        logits = self.forward(inputs)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Training objective: next-byte cross entropy plus the load-balancing term."""
        inputs, targets = self._split(batch)
        logits, aux = self._forward(inputs)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return ce + AUX_LOSS_COEF * aux

    @torch.no_grad()
    def generate(
        self,
        prompt: bytes,
        max_new_bytes: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> bytes:
        """Sample continuation bytes; temperature <= 0 means greedy decoding."""
        if any(b >= self.spec.vocab_size for b in prompt):
            raise ValueError(f"prompt contains bytes >= vocab_size {self.spec.vocab_size}")
        device = self.tok_emb.weight.device
        return sample_bytes(self.forward, prompt, max_new_bytes, context_bytes=self.spec.seq_len, device=device,
                            temperature=temperature, generator=generator)  # fmt: skip
