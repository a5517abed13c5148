"""Per-module DiLoCo state: the global copy of the parameters and the outer optimizer.

After H inner steps the pseudo-gradient of a module is ``global - local``. Its group
average is applied by SGD with Nesterov momentum to the global copy, which is then
written back into the model. When a group's members start from different global
copies (a newcomer, a peer that missed rounds), the round also averages the global
copies and momentum buffers, after which all members hold bit-identical state.
"""

from __future__ import annotations

import hashlib
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

from node.ops import CheckpointError
from protocol.manifest import OuterOptimizerSpec


def state_hash(global_flat: np.ndarray, momentum: np.ndarray) -> str:
    """SHA-256 (first 32 hex digits) of a module's float32 global copy followed by its momentum."""
    digest = hashlib.sha256(np.ascontiguousarray(global_flat, dtype=np.float32).tobytes())
    digest.update(np.ascontiguousarray(momentum, dtype=np.float32).tobytes())
    return digest.hexdigest()[:32]


class ModuleState:
    """Global parameters and momentum of one module, kept as flat float32 CPU tensors."""

    def __init__(self, name: str, params: List[torch.nn.Parameter], spec: OuterOptimizerSpec) -> None:
        self.name = name
        self.params = params
        self.spec = spec
        self.global_flat = self.local_flat()
        self.momentum = torch.zeros_like(self.global_flat)
        # The state before the last outer step, (hash, global copy, momentum): a member adopting the state its
        # group held at the start of a round (node/runtime/rounds.py) may ask for it after we stepped.
        self.previous: Optional[Tuple[str, torch.Tensor, torch.Tensor]] = None

    @property
    def numel(self) -> int:
        return int(self.global_flat.numel())

    def local_flat(self) -> torch.Tensor:
        """The model's current (local) values of this module, flat, float32, on the CPU."""
        return torch.cat([p.detach().reshape(-1).to("cpu", torch.float32) for p in self.params])

    def params_hash(self) -> str:
        """Identifies the (global parameters, momentum) pair; equal hashes mean identical state. Kept until either
        tensor is replaced or changed in place (torch counts in-place changes in ``_version``): a peer asking for
        digests as fast as it can costs a lookup each, not a hash of the whole state."""
        key = (self.global_flat, self.global_flat._version, self.momentum, self.momentum._version)
        cached = getattr(self, "_hash_cache", None)
        if cached is not None and cached[0][0] is key[0] and cached[0][2] is key[2] and cached[0][1::2] == key[1::2]:
            return str(cached[1])
        value = state_hash(self.global_flat.numpy(), self.momentum.numpy())
        self._hash_cache = (key, value)
        return value

    def snapshot(self, params_hash: str) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(global copy, momentum) of the state that hashes to ``params_hash``: the current one or the one before
        the last outer step; None if neither."""
        if params_hash == self.params_hash():
            return self.global_flat, self.momentum
        if self.previous is not None and self.previous[0] == params_hash:
            return self.previous[1], self.previous[2]
        return None

    def adopt(self, vector: np.ndarray) -> None:
        """Take [global copy; momentum] (2 x numel float32) as this module's state; the model is not touched (the
        next ``apply`` or ``load_global`` writes it)."""
        n = self.numel
        self.global_flat = torch.from_numpy(np.array(vector[:n], dtype=np.float32))
        self.momentum = torch.from_numpy(np.array(vector[n : 2 * n], dtype=np.float32))

    def pseudo_gradient(self) -> torch.Tensor:
        """global - local: the direction the inner steps moved, to be averaged."""
        return self.global_flat - self.local_flat()

    def payload(self, resync: bool, delta: Optional[torch.Tensor] = None) -> np.ndarray:
        """The vector sent to the group: the pseudo-gradient (``delta``, default: now), plus
        global params and momentum on a resync."""
        parts = [self.pseudo_gradient() if delta is None else delta]
        if resync:
            parts += [self.global_flat, self.momentum]
        return torch.cat(parts).numpy()

    def apply(self, averaged: np.ndarray, resync: bool, drift: Optional[torch.Tensor] = None) -> None:
        """Outer step with the group's averaged payload; writes the new global copy into the model.

        ``drift`` (overlapped rounds): local steps taken while the round was on the network;
        the model becomes the new global copy plus that drift, so no step is lost."""
        n = self.numel
        self.previous = (self.params_hash(), self.global_flat, self.momentum)  # both replaced below, not changed
        averaged_t = torch.from_numpy(np.ascontiguousarray(averaged, dtype=np.float32))
        delta = averaged_t[:n]
        if resync:
            self.global_flat = averaged_t[n : 2 * n].clone()
            self.momentum = averaged_t[2 * n : 3 * n].clone()
        mu, lr = self.spec.momentum, self.spec.lr
        # torch.optim.SGD(nesterov=True) on a gradient g: buf = mu*buf + g; step = g + mu*buf
        self.momentum = self.momentum.mul(mu).add_(delta)
        step = delta + mu * self.momentum
        self.global_flat = self.global_flat - lr * step
        self.load_global(drift)

    def load_global(self, drift: Optional[torch.Tensor] = None) -> None:
        values = self.global_flat if drift is None else self.global_flat + drift
        offset = 0
        with torch.no_grad():
            for p in self.params:
                count = p.numel()
                p.copy_(values[offset : offset + count].view_as(p).to(p.device, p.dtype))
                offset += count


def capture_modules(states: Dict[str, ModuleState], optimizer: torch.optim.Optimizer) -> Dict[str, torch.Tensor]:
    """Tensors of every hosted module: global copy, outer momentum, and the inner AdamW state."""
    tensors: Dict[str, torch.Tensor] = {}
    for name, state in states.items():
        tensors[f"global/{name}"] = state.global_flat
        tensors[f"momentum/{name}"] = state.momentum
        for index, param in enumerate(state.params):
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"adam/{name}/{index}/{key}"] = value
    return tensors


def check_fits(tensors: Mapping[str, torch.Tensor], sizes: Mapping[str, int]) -> None:
    """CheckpointError unless every module's global copy and momentum in ``tensors`` has the size of that module
    in this model (``sizes``: module -> parameter count): a checkpoint of another model falls back, never half
    restores."""
    for key, tensor in tensors.items():
        kind, _, module = key.partition("/")
        if kind not in ("global", "momentum"):
            continue
        if module not in sizes:
            raise CheckpointError(f"it holds {key}, a module this model does not have")
        if tuple(tensor.shape) != (sizes[module],):
            raise CheckpointError(f"{key} has shape {tuple(tensor.shape)}, the model needs ({sizes[module]},)")


def restore_modules(
    tensors: Mapping[str, torch.Tensor], states: Dict[str, ModuleState], optimizer: torch.optim.Optimizer
) -> List[str]:
    """Load what a checkpoint's tensors (``capture_modules``) hold for our modules; return the modules
    restored. A shape that does not fit the model raises CheckpointError."""
    restored = []
    for name, state in states.items():
        global_flat = tensors.get(f"global/{name}")
        momentum = tensors.get(f"momentum/{name}")
        if global_flat is None or momentum is None:
            continue
        if global_flat.shape != state.global_flat.shape or momentum.shape != state.momentum.shape:
            raise CheckpointError(f"module {name} has shape {tuple(global_flat.shape)}, the model needs "
                                  f"{tuple(state.global_flat.shape)}")  # fmt: skip
        state.global_flat = global_flat.to(torch.float32).clone()
        state.momentum = momentum.to(torch.float32).clone()
        state.load_global()
        for index, param in enumerate(state.params):
            prefix = f"adam/{name}/{index}/"
            entry = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            if entry and all(v.shape == param.shape for k, v in entry.items() if k != "step"):
                optimizer.state[param] = {k: v.to(param.device) for k, v in entry.items()}
        restored.append(name)
    return restored
