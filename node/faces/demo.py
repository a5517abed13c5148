"""`node demo`: a swarm of N nodes on this machine, and a live view of it.

The first node starts a new swarm; the others join it through the first's ready line. Each node is a
separate `python -m node start` process of this interpreter, logging to its own file, in its own process
group: a terminal's Ctrl+C reaches the demo only, which then stops every node once, along one path
(SIGTERM, a wait, SIGKILL of whatever is left in the node's group). Each node also asks the kernel for a
SIGTERM should the demo die first (PR_SET_PDEATHSIG), so even `kill -9` of the demo leaves no node behind.

The view reads each node's ``/status.json`` (the swarm page's data, node/runtime/status_page.py) every
second: on a terminal, a table redrawn in place; otherwise one line per event (``--json``: one JSON object).
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, TextIO

from node.errors import CommonsError
from node.ops import DEFAULT_METRICS_ADDR, die_with_parent

MAX_NODES = 16
READY_TIMEOUT_SECONDS = 300.0  # N nodes importing torch at once on a small machine, then joining
POLL_SECONDS = 1.0
STOP_GRACE_SECONDS = 30.0  # a node leaving finishes or abandons its round and checkpoints nothing: seconds
HTTP_TIMEOUT_SECONDS = 2.0


class NodeFailed(CommonsError):
    """A node of the demo failed: the demo ends with that node's exit code (1 when it had none)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code if exit_code > 0 else 1


class Stop:
    """Set by SIGINT / SIGTERM / SIGHUP: the first asks for an orderly stop, a second for a quick one."""

    def __init__(self) -> None:
        self.reason: Optional[str] = None
        self.hurry = False

    def __call__(self, signum: int, _frame: Any) -> None:
        self.hurry = self.reason is not None
        self.reason = self.reason or signal.Signals(signum).name

    def install(self) -> Dict[int, Any]:
        return {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}


class DemoNode:
    """One `node start` process of the demo and what the demo last read from it."""

    def __init__(self, index: int, argv: List[str], env: Dict[str, str], log_path: Path) -> None:
        self.index = index
        self.log_path = log_path
        parent = os.getpid()
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, env=env,
                                         preexec_fn=lambda: _own_group_dying_with(parent))  # fmt: skip
        self.ready: Dict[str, Any] = {}
        self.status: Dict[str, Any] = {}
        self.last_reported_round = -1
        self._buffer = b""

    @property
    def page_url(self) -> str:
        return str(self.ready["metrics_url"]).rsplit("/metrics", 1)[0] + "/"

    @property
    def rounds_done(self) -> int:
        return int(self.status.get("node", {}).get("rounds_done") or 0)

    def wait_ready(self, deadline: float, stop: Stop) -> bool:
        """Read the ready line; False when a stop was asked first. NodeFailed when the node exits or stalls."""
        assert self.proc.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            while b"\n" not in self._buffer:
                if stop.reason is not None:
                    return False
                if time.monotonic() > deadline:
                    raise NodeFailed(self.describe(f"printed no ready line in {READY_TIMEOUT_SECONDS:.0f}s"), 1)
                if selector.select(timeout=0.2):
                    chunk = os.read(self.proc.stdout.fileno(), 65536)
                    if not chunk:
                        self.proc.wait()
                        raise NodeFailed(self.describe("failed to start"), self.proc.returncode)
                    self._buffer += chunk
        finally:
            selector.close()
        self.ready = json.loads(self._buffer.split(b"\n", 1)[0])
        return True

    def poll(self) -> List[Dict[str, Any]]:
        """Read /status.json; return the rounds finished since the last call (none when the node did not answer)."""
        try:
            with urllib.request.urlopen(self.page_url + "status.json", timeout=HTTP_TIMEOUT_SECONDS) as response:
                self.status = json.loads(response.read())
        except (OSError, ValueError):
            return []  # busy or leaving: keep what we had, try again next second
        new = [r for r in self.status.get("rounds", []) if r["round"] > self.last_reported_round]
        if new:
            self.last_reported_round = new[-1]["round"]
        return new

    def describe(self, what: str) -> str:
        """``node 2 failed to start: <its own error line> (log: ...)``."""
        errors = [line for line in _tail(self.log_path) if line.startswith("node: error: ")]
        code = self.proc.poll()
        why = errors[-1][len("node: error: ") :] if errors else (f"exit code {code}" if code is not None else "")
        return f"node {self.index} {what}" + (f": {why}" if why else "") + f" (log: {self.log_path})"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def kill_group(self) -> None:
        """SIGKILL whatever is left in the node's process group (the node, its DHT process, p2pd)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _own_group_dying_with(parent: int) -> None:
    """In the child before exec: a process group of its own (Ctrl+C reaches the demo only) and SIGTERM when
    the demo dies. Runs between fork and exec: no locks, no logging."""
    os.setpgid(0, 0)
    if not die_with_parent(parent):  # the demo died before the request took effect (not Linux: its own stop path)
        os._exit(1)


def _tail(path: Path, lines: int = 20) -> List[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def add_demo_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of `node demo` (README.md's table lists them; tests/unit/test_cli_surface.py checks it)."""
    parser.add_argument("--nodes", type=_count(1, MAX_NODES), default=3, metavar="N",
                        help=f"how many nodes to start, 1 to {MAX_NODES} (default: 3)")
    parser.add_argument("--max-rounds", type=_count(1, None), metavar="R",
                        help="stop every node once each has finished R averaging rounds (default: run until Ctrl+C)")
    parser.add_argument("--seconds", type=float, metavar="S", help="stop every node after S seconds of training")
    parser.add_argument("--manifest", metavar="PATH", help="the swarm manifest (default: the shipped one)")
    parser.add_argument("--data", metavar="PATH", help="every node's text (default: the embedded corpus)")
    parser.add_argument("--experts", type=int, metavar="N", help="experts each node hosts (default: as `node start`)")
    parser.add_argument("--log-dir", metavar="DIR", help="where each node logs (default: a new temporary directory)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per event instead of a table")


def _count(low: int, high: Optional[int]) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not text.isdigit() or int(text) < low or (high is not None and int(text) > high):
            raise argparse.ArgumentTypeError(f"{text!r} must be a whole number from {low}" +
                                             (f" to {high}" if high is not None else " up"))  # fmt: skip
        return int(text)

    return parse


def node_argv(args: Any, index: int, first: Optional[DemoNode]) -> List[str]:
    """`python -m node start` for node ``index`` (1-based): the first on the default metrics address (a free port
    when it is taken), the others on free ports; every node with the demo's manifest, data and experts."""
    argv = [sys.executable, "-m", "node", "start", "--log-format", "text"]
    argv += ["--metrics-addr", DEFAULT_METRICS_ADDR if first is None else "127.0.0.1:0"]
    for flag, value in (("--manifest", args.manifest), ("--data", args.data), ("--experts", args.experts)):
        if value is not None:
            argv += [flag, str(value)]
    if first is not None:
        argv += ["--initial-peers", first.ready["maddrs"][0]]
    return argv


def node_env(nodes: int) -> Dict[str, str]:
    """The demo's environment without COMMONS_* (the demo's flags say everything), and the machine's cores
    shared out: N nodes each with a thread per core would spend their time switching."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMMONS_")}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nodes)))
    return env


def run_demo(args: Any, out: TextIO = sys.stdout) -> int:
    """Start ``args.nodes`` nodes, show them until a stop, a limit or a failure, then stop them all; 0 or NodeFailed."""
    log_dir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="commons-demo-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    view = make_view(out, json_lines=args.json)
    stop = Stop()
    previous = stop.install()
    nodes: List[DemoNode] = []
    try:
        env = node_env(args.nodes)

        def start(index: int, first: Optional[DemoNode]) -> DemoNode:
            return DemoNode(index, node_argv(args, index, first), env, log_dir / f"node-{index}.log")

        nodes.append(start(1, None))
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        if not nodes[0].wait_ready(deadline, stop):
            return 0
        view.node_ready(nodes[0])
        nodes += [start(i, nodes[0]) for i in range(2, args.nodes + 1)]  # the others start side by side
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        for node in nodes[1:]:
            if not node.wait_ready(deadline, stop):
                return 0
            view.node_ready(node)
        view.demo_ready(nodes, log_dir)
        reason = watch(nodes, args, stop, view)
        view.stopping(reason)
        return 0
    finally:
        stop_all(nodes, stop)
        view.stopped(nodes)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def watch(nodes: List[DemoNode], args: Any, stop: Stop, view: "View") -> str:
    """Poll every node each second until a signal, --max-rounds, --seconds or a node that exits; the reason."""
    started = time.monotonic()
    while True:
        for node in nodes:
            for summary in node.poll():
                view.round(node, summary)
            code = node.proc.poll()
            if code == 0:  # someone stopped this node: the demo ends, as it would on Ctrl+C
                return f"node {node.index} left"
            if code is not None:
                raise NodeFailed(node.describe(f"exited with code {code} while training"), code)
        view.tick(nodes)
        if args.max_rounds is not None and all(n.rounds_done >= args.max_rounds for n in nodes):
            return f"every node finished {args.max_rounds} round(s)"
        if args.seconds is not None and time.monotonic() - started >= args.seconds:
            return f"{args.seconds:g}s passed"
        pause = time.monotonic() + POLL_SECONDS
        while time.monotonic() < pause and stop.reason is None:
            time.sleep(0.1)
        if stop.reason is not None:
            return f"received {stop.reason}"


def stop_all(nodes: List[DemoNode], stop: Stop, grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM every node (they leave the swarm side by side), wait up to ``grace`` s (less after a second
    Ctrl+C), then SIGKILL each node's group, so that nothing a node started outlives the demo."""
    for node in nodes:
        node.stop()
    deadline = time.monotonic() + grace
    while any(n.proc.poll() is None for n in nodes) and time.monotonic() < deadline and not stop.hurry:
        time.sleep(0.1)
    for node in nodes:
        node.kill_group()  # also the helpers of a node that exited: nothing is left once it is done
        node.proc.wait()
        if node.proc.stdout is not None:
            node.proc.stdout.close()


def make_view(out: TextIO, json_lines: bool) -> "View":
    if json_lines:
        return JsonView(out)
    return TableView(out) if out.isatty() else View(out)


class View:
    """Plain lines, one per event: what a log file or a pipe gets."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def emit(self, event: Dict[str, Any], text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def node_ready(self, node: DemoNode) -> None:
        ready = node.ready
        self.emit({"event": "node_ready", "node": node.index, "peer_id": ready["peer_id"], "pid": node.proc.pid,
                   "page_url": node.page_url, "log": str(node.log_path)},
                  f"node {node.index} ready: peer {ready['peer_id']}, hosting {', '.join(ready['modules'])}, "
                  f"page {node.page_url}, log {node.log_path}")  # fmt: skip

    def demo_ready(self, nodes: List[DemoNode], log_dir: Path) -> None:
        first = nodes[0]
        self.emit({"event": "demo_ready", "nodes": len(nodes), "swarm_id": first.ready["swarm_id"],
                   "page_url": first.page_url, "log_dir": str(log_dir), "pids": [n.proc.pid for n in nodes]},
                  f"{len(nodes)} node(s) in swarm {first.ready['swarm_id']}; the swarm page: {first.page_url} "
                  "(Ctrl+C stops every node)")  # fmt: skip

    def round(self, node: DemoNode, summary: Dict[str, Any]) -> None:
        self.emit({"event": "round", "node": node.index, "peer_id": node.ready["peer_id"], **summary},
                  f"node {node.index} round {summary['round']}: {summary['steps']} steps, loss "
                  f"{_number(summary['loss'], 3)}, eval {_number(summary['eval_loss'], 3)}, trunk group "
                  f"{summary['trunk_group']} ({_number(100 * summary['trunk_fraction'], 0)}% averaged)")  # fmt: skip

    def tick(self, nodes: List[DemoNode]) -> None:
        """Every poll: nothing to say in lines."""

    def stopping(self, reason: str) -> None:
        self.emit({"event": "stopping", "reason": reason}, f"{reason}: stopping every node")

    def stopped(self, nodes: List[DemoNode]) -> None:
        codes = [n.proc.returncode for n in nodes]
        self.emit({"event": "stopped", "exit_codes": codes, "rounds_done": [n.rounds_done for n in nodes]},
                  f"stopped {len(nodes)} node(s); exit codes {codes}")  # fmt: skip


class JsonView(View):
    """One JSON object per event (``--json``): what a script or a test reads."""

    def emit(self, event: Dict[str, Any], text: str) -> None:
        self.out.write(json.dumps(event) + "\n")
        self.out.flush()


class TableView(View):
    """On a terminal: a status table redrawn in place every second, the swarm page's address below it."""

    def __init__(self, out: TextIO) -> None:
        super().__init__(out)
        self._drawn = 0  # lines of the last drawing, to move back over
        self._footer: List[str] = []

    def emit(self, event: Dict[str, Any], text: str) -> None:
        if event["event"] in ("stopping", "stopped"):
            super().emit(event, text)

    def node_ready(self, node: DemoNode) -> None:
        self._draw([f"node {node.index} ready ({node.ready['peer_id']}); starting the others…"])

    def demo_ready(self, nodes: List[DemoNode], log_dir: Path) -> None:
        self._footer = ["", f"swarm page: {nodes[0].page_url}", f"logs: {log_dir}/node-*.log",
                        "Ctrl+C stops every node"]  # fmt: skip

    def round(self, node: DemoNode, summary: Dict[str, Any]) -> None:
        """Shown in the table."""

    def tick(self, nodes: List[DemoNode]) -> None:
        self._draw(status_table(nodes) + self._footer)

    def _draw(self, lines: List[str]) -> None:
        width = max(20, shutil.get_terminal_size().columns - 1)  # no wrapping: the cursor moves by lines
        back = f"\x1b[{self._drawn}F\x1b[J" if self._drawn else ""
        self.out.write(back + "".join(line[:width] + "\n" for line in lines))
        self.out.flush()
        self._drawn = len(lines)


def status_table(nodes: List[DemoNode]) -> List[str]:
    """One row per node, from its last /status.json."""
    first = nodes[0].status
    swarm = first.get("node", {}).get("swarm_id", nodes[0].ready["swarm_id"])
    lines = [f"Commons demo: {len(nodes)} node(s), swarm {swarm}, {first.get('peers_total', '?')} peer(s) seen", ""]
    lines.append(f"{'node':>4}  {'peer':<13} {'round':>5} {'done':>4} {'steps':>6} {'loss':>6} {'eval':>6} "
                 f"{'group':>5}  {'health':<8} experts")  # fmt: skip
    for node in nodes:
        me: Dict[str, Any] = node.status.get("node", {})
        rounds = node.status.get("rounds") or [{}]
        experts = ", ".join(m for m in me.get("modules", []) if m != "trunk") or "-"
        health = "ok" if me.get("healthy") else (me.get("health") or "-")
        lines.append(
            f"{node.index:>4}  {'…' + node.ready['peer_id'][-12:]:<13} {_text(me.get('outer_round')):>5} "
            f"{_text(me.get('rounds_done')):>4} {_text(me.get('local_steps')):>6} {_number(me.get('loss'), 3):>6} "
            f"{_number(me.get('eval_loss'), 3):>6} {_text(rounds[-1].get('trunk_group')):>5}  {health:<8} {experts}"
        )
    return lines


def _number(value: Optional[float], digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _text(value: Any) -> str:
    return "-" if value is None else str(value)

