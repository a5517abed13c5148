"""The `node` command: a thin layer over NodeConfig, Node and the status reader.

One exit path: every user error is a CommonsError (or a ManifestError) printed as one
line on stderr with its documented exit code; see EXIT_CODES in node.errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from typing import Any, Callable, List, NoReturn, Optional, Sequence, Tuple

from node import __version__
from node.errors import EXIT_CODES, CommonsError, ConfigError
from node.runtime import DEVICES, ENV_PREFIX, LOG_FORMATS, LOG_LEVELS, NodeConfig, build_config
from protocol.manifest import ManifestError

logger = logging.getLogger("node")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2), not a usage dump."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")
        sys.exit(ConfigError.exit_code)


# (flag, dest, kind, metavar, help) for every `start` option; dest names a NodeConfig field.
_START_OPTIONS: List[Tuple[str, str, Any, str, str]] = [
    (
        "--initial-peers",
        "initial_peers",
        "list",
        "MADDR",
        "multiaddrs of running peers to join (none: start a new swarm)",
    ),
    ("--host-maddrs", "host_maddrs", "list", "MADDR", "multiaddrs to listen on"),
    ("--announce-maddrs", "announce_maddrs", "list", "MADDR", "multiaddrs other peers should dial (behind NAT)"),
    ("--identity", "identity", str, "PATH", "private key file; created if missing; keeps the peer id across restarts"),
    ("--data", "data", str, "PATH", "your text: a file, a directory or a glob (default: embedded corpus)"),
    ("--manifest", "manifest", str, "PATH", "swarm manifest YAML (default: the one shipped with Commons)"),
    ("--experts", "experts", int, "N", "how many experts to host"),
    ("--device", "device", str, "|".join(DEVICES), "where to train"),
    ("--checkpoint-dir", "checkpoint_dir", str, "DIR", "keep checkpoints here and resume from them"),
    ("--checkpoint-every-rounds", "checkpoint_every_rounds", int, "N", "checkpoint every N rounds (and on exit)"),
    ("--checkpoint-keep", "checkpoint_keep", int, "K", "how many checkpoint generations to keep"),
    ("--metrics-addr", "metrics_addr", str, "HOST:PORT", "where /metrics, /healthz and /readyz are served"),
    (
        "--eval-share",
        "eval_share",
        float,
        "F",
        "held-out evaluation after a round takes at most this share of wall time (1: after every round)",
    ),
    ("--stall-seconds", "stall_seconds", float, "S", "/healthz turns 503 after S seconds without progress"),
    ("--log-format", "log_format", str, "|".join(LOG_FORMATS), "log format on stderr"),
    ("--log-level", "log_level", str, "|".join(LOG_LEVELS), "log level"),
    ("--max-rounds", "max_rounds", int, "N", "leave cleanly after N averaging rounds"),
    ("--max-seconds", "max_seconds", float, "S", "leave cleanly after S seconds of training"),
    ("--bootstrap-timeout-seconds", "bootstrap_timeout_seconds", float, "S", "how long to try the initial peers"),
]


def build_parser() -> argparse.ArgumentParser:
    epilog = "exit codes:\n" + "\n".join(f"  {code}  {meaning}" for code, meaning in sorted(EXIT_CODES.items()))
    parser = _Parser(
        prog="node",
        description="Commons: a peer-to-peer mixture-of-experts training node.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"commons node {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{start,status}", parser_class=_Parser)
    commands.required = True

    defaults = NodeConfig()
    start = commands.add_parser(
        "start",
        help="join a swarm (or start one) and train",
        description="Join a swarm, or start a new one, and train. Every option can also be set as an "
        f"environment variable ({ENV_PREFIX}EXPERTS=2, lists space- or comma-separated) or in a YAML "
        "file given by --config; flags win over the environment, which wins over the file.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    start.add_argument("--config", metavar="PATH", help=f"YAML file of options (also {ENV_PREFIX}CONFIG)")
    for flag, dest, kind, metavar, text in _START_OPTIONS:
        default = getattr(defaults, dest)
        shown = " ".join(default) if isinstance(default, tuple) else default
        suffix = f" (default: {shown})" if shown not in (None, "", ()) else ""
        if kind == "list":
            start.add_argument(flag, dest=dest, nargs="+", metavar=metavar, help=text + suffix)
        else:
            start.add_argument(flag, dest=dest, type=kind, metavar=metavar, help=text + suffix)

    status = commands.add_parser("status", help="describe a running swarm", description="Describe a running swarm.")
    status.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR", help="any peer of the swarm")
    status.add_argument("--json", action="store_true", help="print one JSON object (same as --format json)")
    status.add_argument("--format", choices=("table", "json", "prometheus"), default="table", help="output format")
    status.add_argument("--timeout", type=float, default=20.0, metavar="S", help="seconds to wait for the swarm")
    return parser


def main(argv: Optional[Sequence[str]] = None, make_node: Optional[Callable[[NodeConfig], Any]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "start":
            return _start(args, make_node)
        return _status(args)
    except ManifestError as e:
        return _fail(str(e), ConfigError.exit_code)
    except CommonsError as e:
        return _fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        return 0


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"node: error: {message}\n")
    return code


def _start(args: argparse.Namespace, make_node: Optional[Callable[[NodeConfig], Any]] = None) -> int:
    """`node start`; ``make_node`` lets a test harness run a Node subclass through the same path."""
    flags = {dest: getattr(args, dest) for _, dest, *_ in _START_OPTIONS}
    config = build_config(flags, config_path=args.config)  # before the heavy imports: config errors come fast

    from node.ops import keep_freed_memory

    kept = keep_freed_memory()  # before torch allocates anything
    from node.ops import setup_logging
    from node.runtime import Node

    setup_logging(config.log_format, config.log_level)
    logger.debug("glibc malloc keeps freed tensor memory for the next step: %s", kept)
    logger.info("effective config: %s", json.dumps(config.as_log_dict()))
    node = (make_node or Node)(config)
    _install_stop_handlers(node)
    try:
        node.open()
        node.run(out=sys.stdout)
    finally:
        node.close()
    return 0


def _install_stop_handlers(node: Any) -> None:
    """First Ctrl+C / SIGTERM: finish or abandon the round and leave. A second one: leave now."""

    def handler(signum: int, _frame: Any) -> None:
        if node.stop_requested.is_set():
            raise KeyboardInterrupt
        logger.info("received %s: leaving the swarm", signal.Signals(signum).name)
        node.stop_requested.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _status(args: argparse.Namespace) -> int:
    from node.faces.status import format_prometheus, format_table, read_swarm, swarm_status
    from node.ops import setup_logging
    from node.runtime import validate_peer_maddr

    peers: List[str] = [validate_peer_maddr(a, "--initial-peers") for a in args.initial_peers]
    setup_logging("text", "warning")
    swarm_id, view = read_swarm(peers, timeout=args.timeout)
    output = "json" if args.json else args.format
    if output == "prometheus":
        sys.stdout.write(format_prometheus(view))
    elif output == "json":
        print(json.dumps(swarm_status(view, swarm_id)))
    else:
        print(format_table(swarm_status(view, swarm_id)))
    return 0
