"""Shared pieces of the convergence benchmark: the corpus split, the common held-out set, the model, evaluation.

The corpus is the node's embedded default (the top-level ``*.py`` files of the running Python's standard
library). Every ``HELDOUT_EVERY``-th file (sorted by name) is held out: no worker ever trains on it, and fixed
windows spread evenly over it score every run. The other files are dealt to ``shards`` directories with nearly
equal byte counts (largest file first, into the lightest shard); a single worker trains on all shards together.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import shutil
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import yaml

from node.training.model import MoETransformer
from protocol.manifest import Manifest, load_manifest, parse_manifest

HELDOUT_EVERY = 10


@dataclass(frozen=True)
class Corpus:
    shards: List[Path]  # one directory per worker
    train_root: Path  # parent of the shards: the single worker's data
    heldout: Path  # directory no worker trains on

    def describe(self) -> str:
        def size(path: Path) -> int:
            return sum(f.stat().st_size for f in path.rglob("*.py"))

        shards = ", ".join(f"{size(s) / 1e6:.2f}" for s in self.shards)
        return f"train shards {shards} MB; held-out {size(self.heldout) / 1e6:.2f} MB (files no worker trains on)"


def split_corpus(root: Path, shards: int = 4) -> Corpus:
    """Copy the default corpus into ``root``/train/shard-i and ``root``/heldout (rebuilt every call)."""
    files = sorted(glob.glob(os.path.join(glob.escape(sysconfig.get_paths()["stdlib"]), "*.py")))
    files = [f for f in files if os.path.getsize(f) > 1024]
    if root.exists():
        shutil.rmtree(root)
    heldout, train_root = root / "heldout", root / "train"
    dirs = [train_root / f"shard-{i}" for i in range(shards)]
    for d in [heldout, *dirs]:
        d.mkdir(parents=True)
    loads = [0] * shards
    train = [f for i, f in enumerate(files) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    for f in files:
        if f not in train:
            shutil.copy(f, heldout)
    for f in sorted(train, key=os.path.getsize, reverse=True):
        lightest = loads.index(min(loads))
        shutil.copy(f, dirs[lightest])
        loads[lightest] += os.path.getsize(f)
    return Corpus(dirs, train_root, heldout)


def heldout_batches(heldout: Path, seq_len: int, windows: int = 1024, batch_size: int = 16) -> List[torch.Tensor]:
    """``windows`` fixed windows of ``seq_len + 1`` bytes, evenly spaced over the held-out files (in name order)."""
    text = b"".join(Path(f).read_bytes() for f in sorted(glob.glob(str(heldout / "*.py"))))
    span = seq_len + 1
    starts = np.linspace(0, len(text) - span, windows).astype(np.int64)
    arr = np.stack([np.frombuffer(text[s : s + span], dtype=np.uint8) for s in starts]).astype(np.int64)
    return [torch.from_numpy(arr[i : i + batch_size]) for i in range(0, windows, batch_size)]


def build_model(manifest: Manifest) -> MoETransformer:
    """The node's model (same seed as every node), every expert hosted."""
    model = MoETransformer(manifest.model, seed=manifest.seed)
    model.set_hosted_experts(model.module_names())
    return model


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: List[torch.Tensor]) -> float:
    """Mean next-byte cross entropy (nats per byte) over the held-out batches."""
    was_training = model.training
    model.eval()
    try:
        losses = [float(model.lm_loss(b)) * b.shape[0] for b in batches]  # type: ignore[operator]
    finally:
        model.train(was_training)
    return sum(losses) / sum(b.shape[0] for b in batches)


def load_global(
    model: MoETransformer, tensors: Dict[str, torch.Tensor], modules: Optional[Sequence[str]] = None
) -> None:
    """Write a checkpoint's global copies (``global/<module>``, flat float32) of ``modules`` (default: every
    module of the model) into ``model``."""
    with torch.no_grad():
        for module in model.module_names() if modules is None else modules:
            flat, offset = tensors[f"global/{module}"], 0
            for p in model.module_parameters(module):
                p.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()


def diloco_manifest(inner_steps: int, outer_lr: float, momentum: float, name: Optional[str] = None) -> Manifest:
    """The default manifest with other DiLoCo settings (and a name saying so)."""
    base = load_manifest(None)
    return dataclasses.replace(
        base,
        name=name or f"convergence-h{inner_steps}-lr{outer_lr:g}-m{momentum:g}",
        training=dataclasses.replace(base.training, inner_steps=inner_steps),
        outer_optimizer=dataclasses.replace(base.outer_optimizer, lr=outer_lr, momentum=momentum),
    )


def write_manifest(path: Path, manifest: Manifest) -> Path:
    """``manifest`` as a YAML file for ``node start --manifest``; checked to parse back to the same swarm id."""
    text = yaml.safe_dump(manifest.to_dict(), sort_keys=False)
    if parse_manifest(text, str(path)).swarm_id != manifest.swarm_id:
        raise ValueError("manifest did not round-trip through YAML")
    path.write_text(text)
    return path
