"""One typed config tree for `node start`, built from flags, environment and a config file.

Precedence, highest first: command-line flag, ``COMMONS_<NAME>`` environment variable,
``--config`` YAML file, built-in default. All three sources go through the same
``read_values`` (protocol/typed.py's loader) and end in one ``NodeConfig``, so they validate
identically. Each field carries its flag's metavar and help text; the CLI is built from them.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import yaml

from node.errors import ConfigError
from node.net import ip_and_port, validate_maddr, validate_peer_maddr
from node.ops import DEFAULT_METRICS_ADDR, validate_host_port
from protocol.typed import KeyPath, Rules, load_fields, read_small_text

ENV_PREFIX = "COMMONS_"
DEVICES = ("auto", "cpu", "cuda")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
REACHABILITY = ("auto", "public", "private")
MAX_TIMEOUT_SECONDS = 3600.0  # p2pd takes its start-up timeout as a duration: far beyond this it overflows


def _option(default: Any, metavar: str, help: str) -> Any:
    """A NodeConfig field that is also a `node start` flag; ``metavar`` and ``help`` are what --help shows."""
    return dataclasses.field(default=default, metadata={"metavar": metavar, "help": help})


@dataclass(frozen=True)
class NodeConfig:
    """Everything `node start` can be told. Paths are resolved against the working directory."""

    # In the order `node start --help` lists them.
    initial_peers: Tuple[str, ...] = _option(
        (), "MADDR", "multiaddrs of running peers to join (none: start a new swarm)"
    )
    host_maddrs: Tuple[str, ...] = _option(("/ip4/127.0.0.1/tcp/0",), "MADDR", "multiaddrs to listen on")
    announce_maddrs: Tuple[str, ...] = _option((), "MADDR", "multiaddrs other peers should dial (behind NAT)")
    reachability: str = _option(
        "auto", "|".join(REACHABILITY), "whether others can dial this node (auto: ask a bootstrap peer to dial back)"
    )
    identity: Optional[str] = _option(
        None, "PATH", "private key file; created if missing; keeps the peer id across restarts"
    )
    invite: Optional[str] = _option(
        None, "PATH", "invite from the swarm's founders, for a members-only swarm (made by `node invite`)"
    )
    data: Optional[str] = _option(None, "PATH", "your text: a file, a directory or a glob (default: embedded corpus)")
    data_field: str = _option(
        "text", "NAME", "the text field of JSON Lines records, the text column of Parquet and Arrow data"
    )
    manifest: Optional[str] = _option(None, "PATH", "swarm manifest YAML (default: the one shipped with Commons)")
    experts: int = _option(4, "N", "how many experts to host")
    device: str = _option("auto", "|".join(DEVICES), "where to train")
    checkpoint_dir: Optional[str] = _option(None, "DIR", "keep checkpoints here and resume from them")
    checkpoint_every_rounds: int = _option(5, "N", "checkpoint every N rounds (and on exit)")
    checkpoint_keep: int = _option(3, "K", "how many checkpoint generations to keep")
    metrics_addr: str = _option(DEFAULT_METRICS_ADDR, "HOST:PORT", "where /metrics, /healthz and /readyz are served")
    eval_share: float = _option(
        0.01, "F", "held-out evaluation after a round takes at most this share of wall time (1: after every round)"
    )
    stall_seconds: float = _option(300.0, "S", "/healthz turns 503 after S seconds without progress")
    log_format: str = _option("text", "|".join(LOG_FORMATS), "log format on stderr")
    log_level: str = _option("info", "|".join(LOG_LEVELS), "log level")
    max_rounds: Optional[int] = _option(None, "N", "leave cleanly after N averaging rounds")
    max_seconds: Optional[float] = _option(None, "S", "leave cleanly after S seconds of training")
    bootstrap_timeout_seconds: float = _option(20.0, "S", "how long to try the initial peers")

    def __post_init__(self) -> None:
        for name in ("initial_peers", "host_maddrs", "announce_maddrs"):
            for addr in getattr(self, name):
                validate_maddr(addr, f"--{name.replace('_', '-')}")
        for addr in self.initial_peers:
            validate_peer_maddr(addr, "--initial-peers")
        if not self.host_maddrs:
            raise ConfigError("--host-maddrs needs at least one multiaddr, e.g. /ip4/127.0.0.1/tcp/0")
        if not self.data_field:
            raise ConfigError("--data-field must name the text field of your records, e.g. text")
        if self.experts < 0:
            raise ConfigError(f"--experts must be >= 0, got {self.experts}")
        if self.device not in DEVICES:
            raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.reachability not in REACHABILITY:
            raise ConfigError(
                f"--reachability must be one of {', '.join(REACHABILITY)}, got {self.reachability!r}"
            )
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"--log-format must be one of {', '.join(LOG_FORMATS)}, got {self.log_format!r}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        validate_host_port(self.metrics_addr, "--metrics-addr")
        if self.max_rounds is not None and self.max_rounds < 1:
            raise ConfigError(f"--max-rounds must be >= 1, got {self.max_rounds}")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ConfigError(f"--max-seconds must be > 0, got {self.max_seconds}")
        if self.checkpoint_every_rounds < 1 or self.checkpoint_keep < 1:
            raise ConfigError("--checkpoint-every-rounds and --checkpoint-keep must be >= 1")
        if not 0 < self.eval_share <= 1:
            raise ConfigError(f"--eval-share must be in (0, 1] (1: after every round), got {self.eval_share}")
        if not 0 < self.bootstrap_timeout_seconds <= MAX_TIMEOUT_SECONDS:
            raise ConfigError(f"--bootstrap-timeout-seconds must be in (0, {MAX_TIMEOUT_SECONDS:g}], "
                              f"got {self.bootstrap_timeout_seconds:g}")  # fmt: skip
        if not 0 < self.stall_seconds <= 30 * 24 * 3600:
            raise ConfigError(f"--stall-seconds must be in (0, 2592000] (30 days), got {self.stall_seconds:g}")
        for addr in self.announce_maddrs:
            if ip_and_port(addr)[1] == 0:
                raise ConfigError(f"--announce-maddrs {addr}: announce the port others dial, not port 0 "
                                  "(e.g. the one you forward on your router)")  # fmt: skip

    def identity_file(self) -> Optional[str]:
        """The identity key the node runs with: --identity, else the one kept in --checkpoint-dir (resuming means
        being the same peer), else None (a new key for each run)."""
        if self.identity:
            return self.identity
        return str(Path(self.checkpoint_dir) / "identity.key") if self.checkpoint_dir else None

    @classmethod
    def field_names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def as_log_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def read_values(values: Mapping[Any, Any], source: str, keyed: bool = True) -> Dict[str, Any]:
    """The NodeConfig fields ``values`` sets, typed; ConfigError naming ``source`` for unknown keys or bad values.

    Loose rules: strings from the environment spell numbers, lists (space- or comma-separated) and None;
    dashes in keys are underscores. ``keyed``: messages name the key after the source (a file, the
    command line), not for a source that is one variable already.
    """

    def name(path: KeyPath) -> str:
        return f"{source} ({path[-1]})" if keyed else source

    def unknown(_: KeyPath, keys: List[Any]) -> str:
        return f"{source}: unknown option {keys[0]!r}; see `node start --help`"

    rules = Rules(error=ConfigError, name=name, unknown=unknown, loose=True, key=lambda k: str(k).replace("-", "_"))
    return load_fields(NodeConfig, values, rules)


def read_config_file(path: str) -> Dict[str, Any]:
    try:
        text = read_small_text(path, "config file", "fix --config / COMMONS_CONFIG")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of option: value")
    return data


def read_env(environ: Mapping[str, str]) -> Dict[str, Any]:
    """Every ``COMMONS_<FIELD>`` variable that names a config field (``COMMONS_CONFIG`` is the file)."""
    fields = NodeConfig.field_names()
    found = {}
    for key, value in environ.items():
        if key.startswith(ENV_PREFIX):
            name = key[len(ENV_PREFIX) :].lower()
            if name in fields:
                found[name] = value
    return found


def build_config(
    flags: Mapping[str, Any], config_path: Optional[str] = None, environ: Optional[Mapping[str, str]] = None
) -> NodeConfig:
    """Merge file < environment < flags into one validated NodeConfig."""
    environ = os.environ if environ is None else environ
    config_path = config_path or environ.get(ENV_PREFIX + "CONFIG")
    merged: Dict[str, Any] = {}
    if config_path:
        merged.update(read_values(read_config_file(config_path), f"config file {config_path}"))
    for name, raw in read_env(environ).items():
        merged.update(read_values({name: raw}, f"environment variable {ENV_PREFIX}{name.upper()}", keyed=False))
    merged.update(read_values({k: v for k, v in flags.items() if v is not None}, "command line"))
    return NodeConfig(**merged)
