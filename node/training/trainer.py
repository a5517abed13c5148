"""Local training: inner AdamW steps on this node's own data, and held-out evaluation.

One AdamW covers every parameter; experts this node does not host get no gradient,
so AdamW skips them (no state, no weight decay) and keeps the state of experts that
stay hosted across re-placement.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from typing import Any, Callable, Iterable, Iterator, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch

from node.training.data import TextData
from node.training.model import MoETransformer
from node.training.sampling import sample_bytes
from protocol.manifest import Manifest


@runtime_checkable
class SwarmModel(Protocol):
    """What a model must offer to be trained by a swarm (MoETransformer is the built-in one).

    - ``module_names()``: the averaging units, the trunk first, then the experts, named ``trunk`` and
      ``expert.<layer>.<index>``; ``module_parameters(name)``: each unit's parameters, in a fixed order. The
      units' parameters must partition ``parameters()``.
    - ``set_hosted_experts(names)``: only these experts take part in forward and backward from now on (an
      expert a node does not host must get no gradient).
    - ``loss(batch)``: the training objective, a scalar tensor (it may add auxiliary terms, e.g. a router
      balance loss). ``lm_loss(batch)``: mean next-byte cross entropy in nats per byte, the figure evaluation
      reports. ``batch`` is a LongTensor [batch size, seq_len + 1] of byte values (0-255) on the node's
      device: positions 0..seq_len-1 are the input, 1..seq_len the targets.
    - For ``CommonsNode.sample()``, optionally: ``forward(tokens)`` returning next-byte logits [batch, length,
      256] for a LongTensor [batch, length] (the shared sampler then writes text,
      node/training/sampling.py), or ``generate(prompt: bytes, max_new_bytes, temperature, generator) ->
      bytes`` of its own.

    Every peer must build bit-identical initial parameters (seed from the manifest), or the first round
    resyncs them.
    """

    def module_names(self) -> Sequence[str]: ...

    def module_parameters(self, module: str) -> List[torch.nn.Parameter]: ...

    def set_hosted_experts(self, modules: Iterable[str]) -> None: ...

    def loss(self, batch: torch.Tensor) -> torch.Tensor: ...

    def lm_loss(self, batch: torch.Tensor) -> torch.Tensor: ...


ModelFactory = Callable[[Manifest], torch.nn.Module]


def default_model(manifest: Manifest) -> torch.nn.Module:
    # Same seed on every peer: all replicas of a module start bit-identical.
    return MoETransformer(manifest.model, seed=manifest.seed)


def architecture_swarm_id(manifest: Manifest, model: SwarmModel) -> str:
    """Swarm id for a custom model: the manifest's, plus every module's name and parameter shapes,
    so peers running different architectures under one manifest never mix."""
    digest = hashlib.sha256(manifest.swarm_id.encode())
    for module in model.module_names():
        shapes = [tuple(p.shape) for p in model.module_parameters(module)]
        digest.update(f"|{module}:{shapes}".encode())
    return digest.hexdigest()[:16]


def resolve_device(requested: str) -> torch.device:
    from node.errors import ConfigError

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is visible; use --device cpu or auto")
    return torch.device(requested)


class EvalCadence:
    """Decides after which rounds the held-out split is scored: often, yet at most ``share`` of wall time.

    The first round is always scored; after that, a round is scored once the time since the last
    scoring, times ``share``, covers what that scoring took (``share`` 1: after every round).
    """

    def __init__(self, share: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.share = share
        self.clock = clock
        self._last_end: Optional[float] = None
        self._last_seconds = 0.0

    def due(self) -> bool:
        if self._last_end is None or self.share >= 1:
            return True
        return (self.clock() - self._last_end) * self.share >= self._last_seconds

    def scored(self, started: float) -> None:
        """A scoring that began at ``started`` (read from ``clock``) just ended."""
        self._last_end = self.clock()
        self._last_seconds = self._last_end - started


class Trainer:
    """Owns the model, the inner optimizer and the data stream of one node."""

    def __init__(
        self, manifest: Manifest, data: TextData, device: torch.device, factory: Optional[ModelFactory] = None
    ) -> None:
        from node.errors import ConfigError

        self.manifest = manifest
        self.device = device
        model = (factory or default_model)(manifest)
        if not isinstance(model, SwarmModel):
            raise ConfigError(
                "the model factory must return a torch.nn.Module with module_names(), module_parameters(), "
                "set_hosted_experts(), loss() and lm_loss() (see node.training.SwarmModel)"
            )
        self.model: Any = model.to(device)  # a torch.nn.Module that is also a SwarmModel
        spec = manifest.inner_optimizer
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=spec.lr, betas=(spec.beta1, spec.beta2), weight_decay=spec.weight_decay
        )
        self.data = data
        self._batches: Iterator[torch.Tensor] = data.train_batches(manifest.training.batch_size)
        self.local_steps = 0
        self.samples = 0
        self.loss_ema: Optional[float] = None
        self.step_seconds = 0.0  # wall time inside step(), over this node's life
        self.last_step_seconds = 0.0
        self._recent_rate: Optional[float] = None
        # The latest training batches, for measurements that must not move the data stream (placement's
        # routing affinity); references to tensors the step made anyway, a few KiB each.
        self._recent_batches: deque[torch.Tensor] = deque(maxlen=manifest.placement.affinity_batches)

    def step(self) -> float:
        """One inner step; returns the training loss. Syncs with the device once (loss.item())."""
        started = time.perf_counter()
        batch = next(self._batches).to(self.device, non_blocking=True)
        loss = self.model.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.manifest.inner_optimizer.grad_clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        value = float(loss.item())
        self._recent_batches.append(batch)
        self.local_steps += 1
        self.samples += batch.shape[0]
        self.loss_ema = value if self.loss_ema is None else 0.9 * self.loss_ema + 0.1 * value
        self.last_step_seconds = time.perf_counter() - started
        self.step_seconds += self.last_step_seconds
        rate = batch.shape[0] / max(1e-9, self.last_step_seconds)
        self._recent_rate = rate if self._recent_rate is None else 0.9 * self._recent_rate + 0.1 * rate
        return value

    def restart_data(self, start: Optional[Tuple[int, int]] = None) -> None:
        """Start the training stream again: where it was (after the data source failed), or at ``start``
        (a position the data reader gave, e.g. from a checkpoint)."""
        position = (int(start[0]), int(start[1])) if start is not None else self.data.position
        self._batches = self.data.train_batches(self.manifest.training.batch_size, start=position)

    def own_batches(self) -> List[torch.Tensor]:
        """Up to ``placement.affinity_batches`` batches of this node's own text, without moving the training
        stream: the latest it trained on, else (before its first step) held-out ones, else none. Reading the
        held-out split may raise DataError."""
        if self._recent_batches:
            return list(self._recent_batches)
        return self.data.eval_batches(self.manifest.training.batch_size, self.manifest.placement.affinity_batches)

    @property
    def samples_per_second(self) -> Optional[float]:
        return self._recent_rate

    @property
    def recent_step_seconds(self) -> float:
        """Smoothed wall time of one step (0 before the first)."""
        return self.manifest.training.batch_size / self._recent_rate if self._recent_rate else 0.0

    @torch.no_grad()
    def evaluate_text(self, text: str) -> float:
        """Mean next-byte cross entropy (nats/byte) of the current model on ``text`` (at least two bytes),
        in windows of the manifest's sequence length."""
        seq = self.manifest.model.seq_len + 1
        data = text.encode()
        if len(data) < 2:
            raise ValueError("evaluate() needs at least two bytes of text")
        windows = [data[i : i + seq] for i in range(0, max(1, len(data) - 1), seq - 1)]
        total, count = 0.0, 0
        for window in windows:
            if len(window) < 2:
                continue
            batch = torch.tensor([list(window)], dtype=torch.long, device=self.device)
            total += float(self.model.lm_loss(batch)) * (len(window) - 1)
            count += len(window) - 1
        return total / count

    def sample(self, prompt: str, max_bytes: int, temperature: float, seed: int) -> str:
        """Text the current model writes after ``prompt`` (bytes it cannot decode are replaced): with its own
        ``generate`` if it has one, else from the logits its ``forward`` returns (SwarmModel). TypeError when it
        has neither; ValueError when ``forward`` does not return next-byte logits."""
        generator = torch.Generator().manual_seed(seed)  # sampling draws on the CPU (sampling.py)
        model = self.model
        if hasattr(model, "generate"):
            out = model.generate(prompt.encode(), max_bytes, temperature=temperature, generator=generator)
        elif type(model).forward is not torch.nn.Module.forward:
            out = sample_bytes(model, prompt.encode(), max_bytes, context_bytes=self.manifest.model.seq_len,
                               device=self.device, temperature=temperature, generator=generator)  # fmt: skip
        else:
            raise TypeError(
                "sample() needs the model to return next-byte logits from forward(tokens) or to define "
                "generate(prompt, max_new_bytes, temperature, generator); see node.training.SwarmModel"
            )
        return bytes(out).decode("utf-8", errors="replace")

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """Mean next-byte cross entropy on the held-out split; None when there is none."""
        batches = self.data.eval_batches(self.manifest.training.batch_size, self.manifest.training.eval_batches)
        if not batches:
            return None
        self.model.eval()
        try:
            losses = [float(self.model.lm_loss(b.to(self.device))) for b in batches]
        finally:
            self.model.train()
        return sum(losses) / len(losses)
