"""The swarm manifest: what a swarm trains, and its canonical hash (the swarm id).

A manifest is a YAML file parsed into a tree of frozen dataclasses. Unknown keys, wrong
types and out-of-range values are refused with a ``ManifestError`` naming the field.
The swarm id is a hash of the canonical JSON form of the parsed tree, so two files that
differ only in formatting, key order or comments describe the same swarm.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple

import yaml

from protocol.keys import KeyFormatError
from protocol.membership import Founders
from protocol.typed import KeyPath, Rules, load, read_small_text
from protocol.version import PROTOCOL_VERSION

DEFAULT_MANIFEST_NAME = "default_manifest.yaml"


class ManifestError(ValueError):
    """The manifest file is missing, unreadable or invalid."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ManifestError(message)


MAX_EXPERTS = 1024  # per layer; module names allow 4 digits (protocol/records.py MODULE_PATTERN)
MAX_LAYERS = 256
MAX_PARAMETERS = 2_000_000_000  # 8 GB of float32 values, and 4 more copies (global, momentum, AdamW's two)


@dataclass(frozen=True)
class ModelSpec:
    """Shape of the byte-level mixture-of-experts transformer."""

    vocab_size: int = 256
    seq_len: int = 128
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_experts: int = 8
    top_k: int = 2
    expert_hidden: int = 256

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "n_experts", "top_k", "expert_hidden"):
            _check(getattr(self, name) >= 1, f"model.{name} must be >= 1")
        _check(self.d_model % self.n_heads == 0, "model.d_model must be divisible by model.n_heads")
        _check(self.top_k <= self.n_experts, "model.top_k must be <= model.n_experts")
        _check(self.vocab_size <= 256, "model.vocab_size must be <= 256 (the model reads bytes)")
        _check(self.n_experts <= MAX_EXPERTS, f"model.n_experts must be <= {MAX_EXPERTS} (per layer)")
        _check(self.n_layers <= MAX_LAYERS, f"model.n_layers must be <= {MAX_LAYERS}")
        count = self.parameter_count()
        _check(count <= MAX_PARAMETERS, f"model has {count:,} parameters, more than the {MAX_PARAMETERS:,} a node "
                                        "accepts; make d_model, expert_hidden, n_experts or n_layers smaller")

    def parameter_count(self) -> int:
        """Every parameter of the model (node/training/model.py), trunk and all experts."""
        d, hidden = self.d_model, self.expert_hidden
        expert = d + (d * hidden + hidden) + (hidden * d + d)  # gate, up, down
        layer = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + self.n_experts * expert
        return self.vocab_size * d + self.seq_len * d + self.n_layers * layer + 2 * d

    def module_names(self) -> Tuple[str, ...]:
        """Every averaging unit: the trunk, then ``expert.<layer>.<index>``."""
        experts = tuple(f"expert.{layer}.{index}" for layer in range(self.n_layers) for index in range(self.n_experts))
        return ("trunk",) + experts


@dataclass(frozen=True)
class InnerOptimizerSpec:
    """AdamW applied at every local step."""

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip_norm: float = 1.0

    def __post_init__(self) -> None:
        _check(self.name == "adamw", "inner_optimizer.name must be 'adamw'")
        _check(self.lr > 0, "inner_optimizer.lr must be > 0")
        _check(self.weight_decay >= 0, "inner_optimizer.weight_decay must be >= 0")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "inner_optimizer betas must be in [0, 1)")
        _check(self.grad_clip_norm > 0, "inner_optimizer.grad_clip_norm must be > 0")


@dataclass(frozen=True)
class OuterOptimizerSpec:
    """SGD with Nesterov momentum, applied to the averaged pseudo-gradient once per round."""

    name: str = "sgd_nesterov"
    lr: float = 0.7
    momentum: float = 0.9

    def __post_init__(self) -> None:
        _check(self.name == "sgd_nesterov", "outer_optimizer.name must be 'sgd_nesterov'")
        _check(self.lr > 0, "outer_optimizer.lr must be > 0")
        _check(0 <= self.momentum < 1, "outer_optimizer.momentum must be in [0, 1)")


@dataclass(frozen=True)
class TrainingSpec:
    """Local training: batch shape and how many inner steps make one outer round."""

    batch_size: int = 16
    inner_steps: int = 50
    eval_batches: int = 4

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "training.batch_size must be >= 1")
        _check(self.inner_steps >= 1, "training.inner_steps must be >= 1")
        _check(self.eval_batches >= 0, "training.eval_batches must be >= 0")


COMPRESSIONS = ("none", "fp16", "int8", "sparse")
AGGREGATORS = ("centered_clip", "mean")


@dataclass(frozen=True)
class AveragingSpec:
    """How one module's averaging round is formed, aggregated, checked and bounded in time (seconds).

    ``compression`` ``sparse``: of each block of 4096 pseudo-gradient values only the ``topk`` largest are sent,
    in 2 bits each (protocol/sparse.py); what was not sent is kept, ``error_feedback`` times last round's, and
    added to the next round's pseudo-gradient (error feedback: nothing is lost, only delayed)."""

    compression: str = "none"
    aggregator: str = "centered_clip"
    clip_multiplier: float = 1.0
    outlier_ratio: float = 8.0
    result_tolerance: float = 3.0
    overlap: bool = True
    gather_seconds: float = 3.0
    part_timeout_seconds: float = 15.0
    round_timeout_seconds: float = 60.0
    deadline_multiplier: float = 3.0
    chunk_elements: int = 65_536
    topk: int = 64
    error_feedback: float = 0.95

    @property
    def message_bytes(self) -> int:
        """Bytes of one averaging message (a slice): ``chunk_elements`` float32 values. Groups on fast
        links agree on larger ones (node/averaging/matchmaking.py)."""
        return 4 * self.chunk_elements

    def __post_init__(self) -> None:
        _check(self.compression in COMPRESSIONS, f"averaging.compression must be one of {', '.join(COMPRESSIONS)}")
        _check(isinstance(self.topk, int) and 1 <= self.topk <= 4096,
               "averaging.topk must be an integer from 1 to 4096 (values sent per block of 4096)")  # fmt: skip
        _check(0 <= self.error_feedback <= 1, "averaging.error_feedback must be in [0, 1]")
        _check(self.aggregator in AGGREGATORS, f"averaging.aggregator must be one of {', '.join(AGGREGATORS)}")
        _check(self.clip_multiplier > 0, "averaging.clip_multiplier must be > 0")
        _check(self.outlier_ratio > 1, "averaging.outlier_ratio must be > 1")
        _check(self.result_tolerance > 1, "averaging.result_tolerance must be > 1")
        _check(self.deadline_multiplier >= 1, "averaging.deadline_multiplier must be >= 1")
        _check(
            isinstance(self.chunk_elements, int) and self.chunk_elements >= 16,
            "averaging.chunk_elements must be an integer >= 16",
        )
        _check(self.gather_seconds > 0, "averaging.gather_seconds must be > 0")
        _check(self.part_timeout_seconds > 0, "averaging.part_timeout_seconds must be > 0")
        _check(
            self.round_timeout_seconds > self.gather_seconds,
            "averaging.round_timeout_seconds must be > averaging.gather_seconds",
        )


PLACEMENT_POLICIES = ("least_replicated", "follow_data")


@dataclass(frozen=True)
class PlacementSpec:
    """Which experts each node hosts (node/swarm/placement.py).

    ``least_replicated``: fill the least-covered experts. ``follow_data``: prefer the experts this node's own
    tokens are routed to (its routing affinity, measured locally: no data crosses the wire), re-checked every
    ``check_every_rounds`` rounds on ``affinity_batches`` batches of its data, swapping a hosted expert for one
    of the same layer whose affinity is higher by at least ``swap_margin`` (a share of that layer's routing).
    """

    policy: str = "least_replicated"
    check_every_rounds: int = 5
    affinity_batches: int = 4
    swap_margin: float = 0.1

    def __post_init__(self) -> None:
        _check(self.policy in PLACEMENT_POLICIES,
               f"placement.policy must be one of {', '.join(PLACEMENT_POLICIES)}, got {self.policy!r}")  # fmt: skip
        _check(self.check_every_rounds >= 1, "placement.check_every_rounds must be >= 1")
        _check(self.affinity_batches >= 1, "placement.affinity_batches must be >= 1")
        _check(0 < self.swap_margin <= 1, "placement.swap_margin must be in (0, 1]")


@dataclass(frozen=True)
class MembershipSpec:
    """Who may join (protocol/membership.py): no founders, an open swarm; else peers with an invite signed by
    ``threshold`` of the founders (Ed25519 keys as `node keygen` prints them: ``ed25519:<hex>``)."""

    founders: Tuple[str, ...] = ()
    threshold: int = 1

    def __post_init__(self) -> None:
        # One set of founders is one swarm, in whatever order a file lists them.
        object.__setattr__(self, "founders", tuple(sorted(self.founders)))
        open_swarm = "a swarm without founders is open to anyone"
        needs = f"membership.threshold needs membership.founders ({open_swarm})"
        _check(bool(self.founders) or self.threshold == 1, needs)
        try:
            self.rules()
        except KeyFormatError as e:
            raise ManifestError(f"membership: {e}") from None

    def rules(self) -> Founders:
        return Founders(tuple(self.founders), self.threshold)


@dataclass(frozen=True)
class Manifest:
    """Everything peers must agree on to train together."""

    name: str = "commons-default"
    protocol_version: int = PROTOCOL_VERSION
    seed: int = 0
    model: ModelSpec = field(default_factory=ModelSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    inner_optimizer: InnerOptimizerSpec = field(default_factory=InnerOptimizerSpec)
    outer_optimizer: OuterOptimizerSpec = field(default_factory=OuterOptimizerSpec)
    averaging: AveragingSpec = field(default_factory=AveragingSpec)
    placement: PlacementSpec = field(default_factory=PlacementSpec)
    membership: MembershipSpec = field(default_factory=MembershipSpec)

    def __post_init__(self) -> None:
        _check(bool(self.name) and len(self.name) <= 64, "name must be a non-empty string of at most 64 characters")
        _check(
            self.protocol_version == PROTOCOL_VERSION,
            f"protocol_version {self.protocol_version} is not supported by this node (it speaks "
            f"{PROTOCOL_VERSION}); upgrade the node or use a manifest for protocol {PROTOCOL_VERSION}",
        )

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def canonical_json(self) -> str:
        """The form that is hashed: sorted keys, no whitespace, floats in repr form. Sections and fields added
        after swarms were running (``placement``, ``_LATER_FIELDS``) are left out while they hold their defaults, so
        those swarms' ids stay what they were."""
        data = self.to_dict()
        for name, default in _LATER_SECTIONS.items():
            if getattr(self, name) == default:
                del data[name]
        for section, fields in _LATER_FIELDS.items():
            for key in fields:
                if getattr(getattr(self, section), key) == getattr(_DEFAULTS[section], key):
                    del data[section][key]
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @property
    def swarm_id(self) -> str:
        """First 16 hex digits of the SHA-256 of the canonical form."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Manifest":
        """Build the tree from plain data; raises ManifestError naming the first wrong key or value."""
        return load(cls, data, _STRICT)


_LATER_SECTIONS: Dict[str, Any] = {"placement": PlacementSpec(), "membership": MembershipSpec()}
# Fields added to a section after swarms were running: left out of the canonical form while at their defaults.
_LATER_FIELDS: Dict[str, Tuple[str, ...]] = {"averaging": ("topk", "error_feedback")}
_DEFAULTS: Dict[str, Any] = {"averaging": AveragingSpec()}


def _name(path: KeyPath) -> str:
    return "manifest key " + ".".join(path) if path else "manifest"


def _unknown(path: KeyPath, keys: List[Any]) -> str:
    shown = (str(k) if str(k).isprintable() else repr(str(k)) for k in keys)  # a key "a\nb": still one line
    return "unknown manifest key(s): " + ", ".join(sorted(".".join(path + (k,)) for k in shown))


# Strict: the swarm id hashes the parsed tree, so a value must already have its field's type; a float
# field also takes an int, or a string that spells a float (YAML 1.1 reads 1e-3 as a string).
_STRICT = Rules(error=ManifestError, name=_name, unknown=_unknown)


def parse_manifest(text: str, source: str = "<string>") -> Manifest:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ManifestError(f"manifest {source} is not valid YAML: {str(e).splitlines()[0]}") from None
    except ValueError:  # YAML's int() of a decimal number of over 4300 digits
        raise ManifestError(f"manifest {source} holds a number too long to read") from None
    except RecursionError:  # PyYAML recurses once per level of nesting
        raise ManifestError(f"manifest {source} is nested too deeply") from None
    if data is None:
        data = {}
    try:
        return Manifest.from_dict(data)
    except ManifestError as e:
        raise ManifestError(f"manifest {source}: {e}") from None


def load_manifest(path: str | Path | None = None) -> Manifest:
    """Load a manifest file, or the default one shipped in this package when ``path`` is None."""
    if path is None:
        text = resources.files("protocol").joinpath(DEFAULT_MANIFEST_NAME).read_text()
        return parse_manifest(text, "(built-in default)")
    try:
        text = read_small_text(str(path), "manifest file", "pass --manifest with the swarm's YAML manifest")
    except ValueError as e:
        raise ManifestError(str(e)) from None
    return parse_manifest(text, str(path))
