"""One typed config tree for `node start`, built from flags, environment and a config file.

Precedence, highest first: command-line flag, ``COMMONS_<NAME>`` environment variable,
``--config`` YAML file, built-in default. All three sources go through the same
``NodeConfig.from_mapping`` so they validate identically.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Tuple

import multiaddr
import yaml

from node.errors import ConfigError
from node.ops import DEFAULT_METRICS_ADDR, validate_host_port

ENV_PREFIX = "COMMONS_"
DEVICES = ("auto", "cpu", "cuda")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")


def validate_maddr(text: str, what: str) -> str:
    """Parse a multiaddr with py-multiaddr; return it as a string (hivemind takes strings)."""
    try:
        multiaddr.Multiaddr(text)
    except Exception as e:  # py-multiaddr raises several unrelated types for bad input
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(
            f"{what}: {text!r} is not a valid multiaddr ({reason}); expected e.g. /ip4/127.0.0.1/tcp/31337/p2p/Qm..."
        ) from None
    return text


def validate_peer_maddr(text: str, what: str) -> str:
    """A bootstrap peer's multiaddr: valid, and naming the peer (/p2p/<id>) so it can be dialed."""
    validate_maddr(text, what)
    if "/p2p/" not in text:
        raise ConfigError(
            f"{what}: {text!r} has no /p2p/<peer id> part; copy the whole multiaddr a running node printed"
        )
    return text


@dataclass(frozen=True)
class NodeConfig:
    """Everything `node start` can be told. Paths are resolved against the working directory."""

    initial_peers: Tuple[str, ...] = ()
    host_maddrs: Tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    announce_maddrs: Tuple[str, ...] = ()
    identity: Optional[str] = None
    data: Optional[str] = None
    manifest: Optional[str] = None
    experts: int = 4
    device: str = "auto"
    checkpoint_dir: Optional[str] = None
    metrics_addr: str = DEFAULT_METRICS_ADDR
    log_format: str = "text"
    log_level: str = "info"
    max_rounds: Optional[int] = None
    max_seconds: Optional[float] = None
    bootstrap_timeout_seconds: float = 20.0
    stall_seconds: float = 300.0
    checkpoint_every_rounds: int = 5
    checkpoint_keep: int = 3
    eval_share: float = 0.01

    def __post_init__(self) -> None:
        for name in ("initial_peers", "host_maddrs", "announce_maddrs"):
            for addr in getattr(self, name):
                validate_maddr(addr, f"--{name.replace('_', '-')}")
        for addr in self.initial_peers:
            validate_peer_maddr(addr, "--initial-peers")
        if not self.host_maddrs:
            raise ConfigError("--host-maddrs needs at least one multiaddr, e.g. /ip4/127.0.0.1/tcp/0")
        if self.experts < 0:
            raise ConfigError(f"--experts must be >= 0, got {self.experts}")
        if self.device not in DEVICES:
            raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
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
        if self.stall_seconds <= 0:
            raise ConfigError("--stall-seconds must be > 0")
        if self.bootstrap_timeout_seconds <= 0:
            raise ConfigError("--bootstrap-timeout-seconds must be > 0")

    @classmethod
    def field_names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def coerce_mapping(cls, values: Mapping[str, Any], source: str) -> dict:
        """Type loosely typed values (strings from env, YAML scalars); unknown keys are errors."""
        hints = typing.get_type_hints(cls)
        typed = {}
        for key, raw in values.items():
            name = str(key).replace("-", "_")
            if name not in hints:
                raise ConfigError(f"{source}: unknown option {key!r}; see `node start --help`")
            typed[name] = _coerce(raw, hints[name], f"{source} ({key})" if "environment" not in source else source)
        return typed

    def as_log_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(raw: Any, hint: Any, what: str) -> Any:
    """Turn a string or YAML scalar into the field's type, or raise ConfigError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "none", "null")):
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        items = raw.replace(",", " ").split() if isinstance(raw, str) else raw
        if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
            raise ConfigError(f"{what} must be a list of strings")
        return tuple(items)
    if hint in (int, float):
        try:
            if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
                raise ValueError
            number = float(raw)
            if not math.isfinite(number):
                raise ValueError
            if hint is int:
                if isinstance(raw, float) and not raw.is_integer():
                    raise ValueError
                return int(raw) if not isinstance(raw, float) else int(number)
            return number
        except (TypeError, ValueError):
            raise ConfigError(f"{what} must be a finite {hint.__name__}, got {raw!r}") from None
    if hint is str:
        if not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
            raise ConfigError(f"{what} must be a string, got {raw!r}")
        return str(raw)
    raise ConfigError(f"{what} must be a {getattr(hint, '__name__', hint)}, got {raw!r}")


def read_config_file(path: str) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; fix --config / COMMONS_CONFIG") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of option: value")
    return data


def read_env(environ: Mapping[str, str]) -> dict:
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
    merged: dict = {}
    if config_path:
        merged.update(NodeConfig.coerce_mapping(read_config_file(config_path), f"config file {config_path}"))
    for name, raw in read_env(environ).items():
        merged.update(NodeConfig.coerce_mapping({name: raw}, f"environment variable {ENV_PREFIX}{name.upper()}"))
    merged.update(NodeConfig.coerce_mapping({k: v for k, v in flags.items() if v is not None}, "command line"))
    return NodeConfig(**merged)
