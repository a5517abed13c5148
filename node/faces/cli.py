"""The `node` command: a thin layer over NodeConfig, Node, the status reader and the doctor.

One exit path: every user error is a CommonsError (or a ManifestError) printed as one
line on stderr with its documented exit code; see EXIT_CODES in node.errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import typing
from typing import TYPE_CHECKING, Any, Callable, Dict, List, NoReturn, Optional, Sequence

from node import __version__
from node.errors import EXIT_CODES, ChecksFailed, CommonsError, ConfigError
from node.faces.demo import add_demo_flags, run_demo
from node.net import validate_peer_maddr
from node.runtime import ENV_PREFIX, NodeConfig, build_config
from node.swarm import REVOCATION_POLL_SECONDS
from protocol.manifest import ManifestError, load_manifest
from protocol.typed import field_kind

if TYPE_CHECKING:  # imported when `node start` needs it: `node --help` must not wait for torch
    from node.faces.doctor import Check
    from node.runtime import Node

logger = logging.getLogger("node")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2), not a usage dump."""

    def error(self, message: str) -> NoReturn:
        # One prefix for every user error, "node: error:" (main's _fail), whichever subcommand failed to parse.
        sys.stderr.write(f"node: error: {message} (see `{self.prog} --help`)\n")
        sys.exit(ConfigError.exit_code)


def build_parser() -> argparse.ArgumentParser:
    epilog = "exit codes:\n" + "\n".join(f"  {code}  {meaning}" for code, meaning in sorted(EXIT_CODES.items()))
    parser = _Parser(
        prog="node",
        description="Commons: a peer-to-peer mixture-of-experts training node.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"commons node {__version__}")
    commands = parser.add_subparsers(
        dest="command", metavar="{start,status,doctor,demo,keygen,invite,revoke,contributions}", parser_class=_Parser
    )
    commands.required = True

    start = commands.add_parser(
        "start",
        help="join a swarm (or start one) and train",
        description="Join a swarm, or start a new one, and train. Every option can also be set as an "
        f"environment variable ({ENV_PREFIX}EXPERTS=2, lists space- or comma-separated) or in a YAML "
        "file given by --config; flags win over the environment, which wins over the file.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_flags(start)

    status = commands.add_parser("status", help="describe a running swarm", description="Describe a running swarm.")
    status.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR", help="any peer of the swarm")
    status.add_argument("--json", action="store_true", help="print one JSON object (same as --format json)")
    status.add_argument("--format", choices=("table", "json", "prometheus"), default="table", help="output format")
    status.add_argument("--timeout", type=float, default=20.0, metavar="S", help="seconds to wait for the swarm")
    status.add_argument("--identity", metavar="PATH", help="members-only swarms: the key your invite was issued for")
    status.add_argument("--invite", metavar="PATH", help="members-only swarms: your invite (node invite)")

    doctor = commands.add_parser(
        "doctor",
        help="check that `node start` would work here, and say what to fix",
        description="Check, one line each, what `node start` with the same options needs: the p2p daemon runs, "
        "the listen ports are free, each bootstrap peer answers (and with which swarm id), others can dial this "
        "machine (a bootstrap peer dials back), the identity key is not in use, the checkpoint directory is "
        "writable and has room, the data is readable, the device, and the clock skew against the peers. Checks "
        "that need a bootstrap peer are skipped without --initial-peers.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_flags(doctor)
    doctor.add_argument("--json", action="store_true", help='print one JSON object: {"ok": ..., "checks": [...]}')
    doctor.add_argument(
        "--timeout", type=float, default=20.0, metavar="S", help="seconds to wait for the swarm, and for each answer"
    )

    demo = commands.add_parser(
        "demo",
        help="start a swarm of N nodes on this machine and watch it",
        description="Start N nodes on this machine (the first a new swarm, the others joining it), show the swarm "
        "until Ctrl+C or --max-rounds, then stop every node. Each node logs to its own file; COMMONS_* "
        "environment variables are not passed on. Exit codes: 0 clean, 2 bad flag or manifest, otherwise "
        "the exit code of the node that failed.",
    )
    add_demo_flags(demo)
    _add_member_commands(commands)
    return parser


def _add_member_commands(commands: Any) -> None:
    """keygen, invite, revoke: members-only swarms (node/faces/members.py)."""
    keygen = commands.add_parser(
        "keygen", help="make a key (a node's identity, or a founder's)",
        description="Write a new Ed25519 key to --out (mode 0600, never over an existing file) and print one JSON "
        "line: peer_id (what a founder invites) and public_key (what a manifest lists as a founder).",
    )  # fmt: skip
    keygen.add_argument("--out", required=True, metavar="PATH", help="where to write the key")
    invite = commands.add_parser(
        "invite", help="admit a peer to a members-only swarm (founders)",
        description="Sign an invite for one peer id with a founder's key, offline, and write it to --out; the peer "
        "starts with --identity KEY --invite FILE. With a threshold above 1, other founders add their signatures "
        "with --countersign FILE.",
    )  # fmt: skip
    revoke = commands.add_parser(
        "revoke", help="take a peer's invites back (founders)",
        description="Sign a revocation of every invite of --peer-id issued until now, write it to --out, and with "
        "--initial-peers publish it to the swarm: every member refuses the peer within about "
        f"{2 * REVOCATION_POLL_SECONDS:g} seconds of a member holding it.",
    )  # fmt: skip
    for parser in (invite, revoke):
        parser.add_argument("--founder-key", required=True, metavar="PATH", help="a founder's key (node keygen)")
        parser.add_argument("--peer-id", metavar="ID", help="the peer's id (its `node keygen` printed it)")
        parser.add_argument("--manifest", metavar="PATH", help="the swarm's manifest, which lists its founders")
        parser.add_argument("--countersign", metavar="PATH", help="add this founder's signature to that file's")
    invite.add_argument("--org", metavar="NAME", help="the peer's organisation, shown beside its contributions")
    invite.add_argument("--expires", metavar="DURATION", help="how long the invite holds: 30d, 12h, 90m, 3600s")
    invite.add_argument("--out", required=True, metavar="PATH", help="where to write the invite")
    revoke.add_argument("--out", metavar="PATH", help="where to write the revocation")
    revoke.add_argument("--initial-peers", nargs="+", default=[], metavar="MADDR", help="publish through these peers")
    revoke.add_argument("--timeout", type=float, default=20.0, metavar="S", help="seconds to wait for the swarm")
    contributions = commands.add_parser(
        "contributions", help="export or verify the evidence of a member's contributions",
        description="Export the receipts other members signed for the node whose --checkpoint-dir this is (with "
        "their vouchers' invites and the totals), as one JSON object; or, with --verify FILE, check such an export "
        "with the founders' keys of --manifest alone (exit 8 and one line if it does not hold).",
    )  # fmt: skip
    contributions.add_argument("--checkpoint-dir", metavar="DIR", help="the node's checkpoint directory (export)")
    contributions.add_argument("--verify", metavar="FILE", help="check an export instead")
    contributions.add_argument("--manifest", metavar="PATH", help="the swarm's manifest, which lists its founders")
    contributions.add_argument("--json", action="store_true", help="one JSON object on stdout (the only format)")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """--config, then one flag per NodeConfig field, named after it; type, metavar, help and default all come
    from the field; --public and --private are short for --reachability public / private.

    Flags left out parse as None, so that the environment and the config file can still set them.
    """
    parser.add_argument("--config", metavar="PATH", help=f"YAML file of options (also {ENV_PREFIX}CONFIG)")
    reachability = parser.add_mutually_exclusive_group()
    hints = typing.get_type_hints(NodeConfig)
    defaults = NodeConfig()
    for option in dataclasses.fields(NodeConfig):
        kind, many = field_kind(hints[option.name])
        default = getattr(defaults, option.name)
        shown = " ".join(default) if many else default
        text = option.metadata["help"] + (f" (default: {shown})" if shown not in (None, "") else "")
        flag = "--" + option.name.replace("_", "-")
        shape: Dict[str, Any] = {"nargs": "+"} if many else {"type": kind}
        group = reachability if option.name == "reachability" else parser
        group.add_argument(flag, dest=option.name, metavar=option.metadata["metavar"], help=text, **shape)
    for setting in ("public", "private"):
        reachability.add_argument(
            f"--{setting}", dest="reachability", action="store_const", const=setting, help=f"--reachability {setting}"
        )


def main(argv: Optional[Sequence[str]] = None, make_node: Optional[Callable[[NodeConfig], "Node"]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "start":
            return _start(args, make_node)
        if args.command == "demo":
            return _demo(args)
        if args.command == "doctor":
            return _doctor(args)
        if args.command in ("keygen", "invite", "revoke", "contributions"):
            return _members(args)
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


def _start(args: argparse.Namespace, make_node: Optional[Callable[[NodeConfig], "Node"]] = None) -> int:
    """`node start`; ``make_node`` lets a test harness run a Node subclass through the same path."""
    config = _config(args)  # before the heavy imports: config errors come fast

    from node.ops import keep_freed_memory

    kept = keep_freed_memory()  # before torch allocates anything
    from node.net import route_hivemind_logs
    from node.ops import setup_logging
    from node.runtime import Node

    setup_logging(config.log_format, config.log_level)
    route_hivemind_logs()
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


def _config(args: argparse.Namespace) -> NodeConfig:
    """The config of `node start` (and of `node doctor`, which checks what `node start` would use)."""
    flags = {name: getattr(args, name) for name in NodeConfig.field_names()}
    return build_config(flags, config_path=args.config)


def _doctor(args: argparse.Namespace) -> int:
    """`node doctor`: one line per check as it is done (or one JSON object); exit 6 when any failed."""
    config = _config(args)
    manifest = load_manifest(config.manifest)
    if args.timeout <= 0:
        raise ConfigError(f"--timeout must be > 0, got {args.timeout:g}")
    from node.faces.doctor import report, run_doctor, summary
    from node.ops import setup_logging

    setup_logging("text", "warning")
    if config.initial_peers:  # joining and asking takes seconds: say so, on stderr (stdout is the answer)
        sys.stderr.write(f"asking {len(config.initial_peers)} peer(s) (up to {args.timeout:g}s each)...\n")
        sys.stderr.flush()

    def show(check: "Check") -> None:
        if not args.json:
            print(check.line(), flush=True)

    checks = run_doctor(config, manifest, args.timeout, emit=show)
    if args.json:
        print(json.dumps(report(checks)))
    else:
        print(summary(checks))
    return 0 if all(c.ok for c in checks) else ChecksFailed.exit_code


def _members(args: argparse.Namespace) -> int:
    """`node keygen`, `node invite`, `node revoke`: one JSON line on stdout."""
    from node.faces import members

    if args.command == "keygen":
        result = members.keygen(args.out)
    elif args.command == "contributions":
        if bool(args.verify) == bool(args.checkpoint_dir):
            raise ConfigError("node contributions needs --checkpoint-dir DIR (export) or --verify FILE (check)")
        if args.verify:
            result = members.verify_evidence(args.verify, args.manifest)
        else:
            result = members.export_evidence(args.checkpoint_dir, args.manifest)
    elif args.command == "invite":
        result = members.invite(args.manifest, args.founder_key, args.peer_id, args.org, args.expires, args.out,
                                args.countersign)  # fmt: skip
    else:
        peers = [validate_peer_maddr(a, "--initial-peers") for a in args.initial_peers]
        if args.timeout <= 0:
            raise ConfigError(f"--timeout must be > 0, got {args.timeout:g}")
        if peers:
            from node.net import route_hivemind_logs
            from node.ops import setup_logging

            setup_logging("text", "warning")
            route_hivemind_logs()
        result = members.revoke(args.manifest, args.founder_key, args.peer_id, args.out, peers, args.timeout,
                                args.countersign)  # fmt: skip
    print(json.dumps(result), flush=True)
    return 0


def _demo(args: argparse.Namespace) -> int:
    """`node demo`; the manifest is checked here first, so a bad one fails fast (exit 2), not in every node."""
    if args.manifest is not None:
        load_manifest(args.manifest)
    return run_demo(args)


def _install_stop_handlers(node: "Node") -> None:
    """First Ctrl+C / SIGTERM: finish or abandon the round and leave. A second one: leave now."""

    def handler(signum: int, _frame: Any) -> None:
        if node.stopping:
            raise KeyboardInterrupt
        logger.info("received %s: leaving the swarm", signal.Signals(signum).name)
        node.stop()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _status(args: argparse.Namespace) -> int:
    """`node status`; the peers are checked by the same rules as `node start --initial-peers`, before hivemind loads."""
    peers: List[str] = [validate_peer_maddr(a, "--initial-peers") for a in args.initial_peers]
    from node.faces.status import format_prometheus, format_table, read_swarm, swarm_status
    from node.net import route_hivemind_logs
    from node.ops import setup_logging

    setup_logging("text", "warning")
    route_hivemind_logs()
    # Joining the DHT as a light client and asking takes seconds: say so, on stderr (stdout is the answer).
    sys.stderr.write(f"asking {len(peers)} peer(s) about their swarm (up to {args.timeout:g}s)...\n")
    sys.stderr.flush()
    from node.swarm import presenting

    admission = presenting(args.identity, args.invite)
    swarm_id, view, modules = read_swarm(peers, timeout=args.timeout, identity=args.identity, admission=admission)
    output = "json" if args.json else args.format
    if output == "prometheus":
        sys.stdout.write(format_prometheus(view, modules))
    elif output == "json":
        print(json.dumps(swarm_status(view, swarm_id, modules)))
    else:
        print(format_table(swarm_status(view, swarm_id, modules)))
    return 0
