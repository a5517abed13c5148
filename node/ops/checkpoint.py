"""Checkpoints: atomic, checksummed generations of a node's state in --checkpoint-dir.

A generation ``N`` is two files: ``ckpt-N.safetensors`` (tensors only: never pickle) and
``ckpt-N.json`` (metadata and the SHA-256 of the tensor file), each written to a temporary
file, fsynced, renamed into place, and the directory fsynced. The JSON is written last,
so a generation exists only once both files are whole; a crash at any point leaves the
previous generations untouched. Loading walks generations newest first and skips any
whose files are missing, truncated, bit-flipped (checksum) or unparsable, whose counters are out of
range, whose tensor file is not its own (the generation, swarm and counters are also written inside the
tensor file, so metadata pointing at another generation's tensors fails), or that the caller's ``check``
refuses (e.g. tensors shaped for another model).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from node.errors import ConfigError

if TYPE_CHECKING:
    from node.ops.metrics import NodeMetrics

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: the counters are bound into the tensor file; 1 (older nodes) is still read
MAX_COUNTER = 10**12  # rounds, steps and data positions beyond this are not a node's own (a round per ms for 30 years)
_NAME = re.compile(r"^ckpt-(\d{8})\.json$")


class CheckpointError(ValueError):
    """A generation is unusable (missing, torn, tampered, or malformed)."""


@dataclass
class Snapshot:
    """What a checkpoint holds; tensors are CPU tensors keyed by name."""

    swarm_id: str
    outer_round: int
    rounds_done: int
    local_steps: int
    hosted: List[str]
    data_seed: int
    tensors: Dict[str, torch.Tensor] = field(default_factory=dict)
    data_position: Tuple[int, int] = (0, 0)
    generation: int = 0


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """temp file in the same directory, fsync, rename over ``path``, fsync the directory."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


class CheckpointStore:
    """Reads and writes generations in one directory; keeps the newest ``keep`` of them."""

    def __init__(self, directory: str | Path, keep: int = 3) -> None:
        self.directory = Path(directory)
        self.keep = keep
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--checkpoint-dir {directory}: cannot create it ({e.strerror})") from None

    def generations(self) -> List[int]:
        found = [int(m.group(1)) for p in self.directory.iterdir() if (m := _NAME.match(p.name))]
        return sorted(found, reverse=True)

    def save(self, snapshot: Snapshot) -> Tuple[int, int]:
        """Write a new generation; return (generation, bytes). Raises OSError (e.g. ENOSPC) untouched."""
        generation = (self.generations() or [0])[0] + 1
        tensor_path = self.directory / f"ckpt-{generation:08d}.safetensors"
        meta: Dict[str, object] = {
            "format": FORMAT_VERSION,
            "generation": generation,
            "swarm_id": snapshot.swarm_id,
            "outer_round": snapshot.outer_round,
            "rounds_done": snapshot.rounds_done,
            "local_steps": snapshot.local_steps,
            "hosted": snapshot.hosted,
            "data_seed": snapshot.data_seed,
            "data_position": list(snapshot.data_position),
            "tensor_file": tensor_path.name,
        }
        bound = {key: json.dumps(meta[key]) for key in _BOUND}
        blob = save_tensors({k: v.detach().cpu().contiguous() for k, v in snapshot.tensors.items()}, metadata=bound)
        write_atomic(tensor_path, blob)
        meta.update(sha256=hashlib.sha256(blob).hexdigest(), bytes=len(blob))
        write_atomic(self.directory / f"ckpt-{generation:08d}.json", json.dumps(meta, indent=1).encode())
        self._prune()
        return generation, len(blob)

    def load(self, generation: int) -> Snapshot:
        own_file = f"ckpt-{generation:08d}.safetensors"
        try:
            meta = json.loads((self.directory / f"ckpt-{generation:08d}.json").read_text())
            if meta["tensor_file"] != own_file:
                raise ValueError(f"its metadata names the tensor file {meta['tensor_file']!r}")
            blob = (self.directory / own_file).read_bytes()
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"generation {generation}: unreadable ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") not in (1, FORMAT_VERSION):
            raise CheckpointError(f"generation {generation}: unknown format")
        if hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
            raise CheckpointError(f"generation {generation}: checksum mismatch (torn or modified file)")
        if meta["format"] >= 2:
            _check_bound(generation, meta, blob)
        try:
            tensors = load_tensors(blob)
            snapshot = Snapshot(
                swarm_id=str(meta["swarm_id"]),
                outer_round=int(meta["outer_round"]),
                rounds_done=int(meta["rounds_done"]),
                local_steps=int(meta["local_steps"]),
                hosted=[str(m) for m in meta["hosted"]],
                data_seed=int(meta["data_seed"]),
                data_position=(int(meta["data_position"][0]), int(meta["data_position"][1])),
                tensors=tensors,
                generation=generation,
            )
        except Exception as e:  # safetensors and int() raise several types for garbage
            raise CheckpointError(f"generation {generation}: malformed ({e})") from None
        counters = {"outer_round": snapshot.outer_round, "rounds_done": snapshot.rounds_done,
                    "local_steps": snapshot.local_steps, "data_position": max(snapshot.data_position),
                    "data_seed": snapshot.data_seed}  # fmt: skip
        for name, value in counters.items():
            if not 0 <= value <= MAX_COUNTER or min(snapshot.data_position) < 0:
                raise CheckpointError(f"generation {generation}: {name} {value} is out of range")
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise CheckpointError(f"generation {generation}: tensor {name} holds NaN or infinity")
        return snapshot

    def latest(self, swarm_id: str, check: Optional[Callable[[Snapshot], None]] = None) -> Optional[Snapshot]:
        """The newest usable generation, skipping broken ones (logged) and those ``check`` refuses with a
        CheckpointError (e.g. tensors that do not fit the model); refuses another swarm's."""
        for generation in self.generations():
            try:
                snapshot = self.load(generation)
                if snapshot.swarm_id == swarm_id and check is not None:
                    check(snapshot)
            except CheckpointError as e:
                logger.warning("checkpoint %s is unusable, trying the previous one: %s", self.directory, e)
                continue
            if snapshot.swarm_id != swarm_id:
                raise ConfigError(
                    f"--checkpoint-dir {self.directory} holds a checkpoint of swarm {snapshot.swarm_id}, but this "
                    f"node trains swarm {swarm_id}; use the manifest it was made with or another --checkpoint-dir"
                )
            return snapshot
        return None

    def _prune(self) -> None:
        """Drop generations beyond ``keep`` and leftovers of interrupted writes."""
        for generation in self.generations()[self.keep :]:
            for suffix in ("json", "safetensors"):
                (self.directory / f"ckpt-{generation:08d}.{suffix}").unlink(missing_ok=True)
        valid = {f"ckpt-{g:08d}.safetensors" for g in self.generations()}
        for path in self.directory.glob("ckpt-*.safetensors"):
            if path.name not in valid:
                path.unlink(missing_ok=True)  # a tensor file whose JSON never got written
        for path in self.directory.glob(".ckpt-*.tmp"):
            path.unlink(missing_ok=True)


# What a tensor file repeats of its metadata, so that metadata and tensors of different generations never pair.
_BOUND = ("generation", "swarm_id", "outer_round", "rounds_done", "local_steps", "data_seed", "data_position")


def _check_bound(generation: int, meta: Dict[str, object], blob: bytes) -> None:
    """The tensor file's own record of its generation and counters matches the metadata (format 2)."""
    try:
        header_size = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8 : 8 + header_size])
        bound = header.get("__metadata__") or {}
        inside = {key: json.loads(bound[key]) for key in _BOUND}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(
            f"generation {generation}: its tensor file does not say which generation it is ({e})"
        ) from None
    outside = {key: meta.get(key) for key in _BOUND}
    if inside != outside:
        differ = sorted(k for k in _BOUND if inside[k] != outside[k])
        raise CheckpointError(f"generation {generation}: metadata and tensor file disagree on {', '.join(differ)}")


def write_generation(store: CheckpointStore, snapshot: Snapshot, metrics: "NodeMetrics") -> bool:
    """Save; a failure (disk full, read-only) is logged and counted and the previous generation stays."""
    started = time.perf_counter()
    try:
        generation, size = store.save(snapshot)
    except OSError as e:
        metrics.checkpoint_failures.inc()
        logger.error("checkpoint failed, the previous one stays: %s", e, extra={"event": "checkpoint_failed"})
        return False
    metrics.checkpoint_success.set_to_current_time()
    metrics.checkpoint_bytes.set(size)
    seconds = time.perf_counter() - started
    logger.info(
        "checkpoint generation %d: round %d, %.2f MB in %.2fs",
        generation,
        snapshot.outer_round,
        size / 1e6,
        seconds,
        extra={"event": "checkpoint", "generation": generation, "round": snapshot.outer_round, "bytes": size,
               "seconds": round(seconds, 4)},
    )  # fmt: skip
    return True
