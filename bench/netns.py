"""A throwaway emulated network for benchmarks: N hosts behind one switch, each link rate-limited.

    with TestNetwork(hosts=4, mbit=100) as net:
        proc = net.popen(0, [sys.executable, "-c", "..."])   # runs inside host 0 (10.77.0.1)
        net.run(1, ["ping", "-c1", net.ip(0)])

Host i is the network namespace ``cmn<pid>-<i>`` with address 10.77.0.(i+1)/24 on a veth whose
other end sits on a bridge in namespace ``cmn<pid>-br`` (nothing is added to the root namespace).
Both ends of every veth get a ``tbf`` qdisc, so each host has ``mbit`` up and ``mbit`` down.
Every process started through ``popen`` gets its own session (process group = its pid); on exit,
on an exception, on Ctrl+C or on SIGTERM those groups get SIGTERM, then SIGKILL, and the
namespaces (and with them every link and the bridge) are deleted. Needs root: otherwise
``SkipBenchmark`` says why, in one line. ``JsonProcess`` drives a worker that speaks JSON lines.

``private=[i, ...]`` puts those hosts behind a home router each, the way most volunteers are: host i
gets 192.168.(i+1).2 on a link to router namespace ``cmn<pid>-r<i>``, whose other leg sits on the
bridge as 10.77.0.(i+101). The router masquerades what goes out (nftables) and drops every new
connection coming in, so a private host can dial anyone and no one can dial it.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Callable, Dict, List, Optional, Sequence, Type

from node.ops.procs import in_process_group

PREFIX = "cmn"


class SkipBenchmark(Exception):
    """The benchmark cannot run here (not root, no ``ip netns``); callers print the reason and exit 0."""


def stopped(reason: BaseException) -> int:
    """A network benchmark's exit code when it could not run (SkipBenchmark: the reason on stdout, 0) or was
    interrupted (130; TestNetwork has stopped its processes and deleted its namespaces by then)."""
    if isinstance(reason, SkipBenchmark):
        print(reason)
        return 0
    print("interrupted: processes stopped, namespaces deleted", file=sys.stderr)
    return 130


def _sh(argv: Sequence[str]) -> None:
    done = subprocess.run(list(argv), capture_output=True, text=True)
    if done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, list(argv), done.stdout, done.stderr)


def _raise_interrupt(signum: int, frame: Optional[FrameType]) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def remove_stale_namespaces() -> List[str]:
    """Delete ``cmn<pid>-*`` namespaces left by a run of this module whose process is gone (e.g. SIGKILLed)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    removed = []
    for name in listed:
        owner = name[len(PREFIX) :].split("-", 1)[0]
        if name.startswith(PREFIX) and owner.isdigit() and not os.path.exists(f"/proc/{owner}"):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            removed.append(name)
    return removed


def _killpg(group: int, sig: int) -> None:
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        pass


def stop_group(proc: "subprocess.Popen[Any]", grace: float = 5.0) -> List[int]:
    """SIGTERM the process group of ``proc`` (started with start_new_session=True), SIGKILL what is left after
    ``grace`` seconds, reap ``proc``. Returns the pids that still lived after the grace period."""
    group = proc.pid

    def settled(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while True:
            if proc.poll() is None:
                try:
                    proc.wait(0.1)
                except subprocess.TimeoutExpired:
                    pass
            elif not in_process_group(group):
                return True
            else:
                time.sleep(0.1)
            if time.monotonic() > deadline:
                return False

    _killpg(group, signal.SIGTERM)
    if settled(grace):
        return []
    stubborn = in_process_group(group) or [group]
    _killpg(group, signal.SIGKILL)
    settled(5.0)
    return stubborn


class TestNetwork:
    """``hosts`` namespaces on one bridge; see the module docstring."""

    __test__ = False  # not a pytest class

    def __init__(
        self, hosts: int, mbit: float, burst_kbit: int = 1000, latency_ms: int = 50, subnet: str = "10.77.0",
        private: Sequence[int] = (),
    ) -> None:  # fmt: skip
        self.hosts, self.mbit, self.burst_kbit, self.latency_ms = hosts, mbit, burst_kbit, latency_ms
        self.subnet = subnet
        self.private = frozenset(private)
        tag = f"{PREFIX}{os.getpid()}"
        self.namespaces = [f"{tag}-{i}" for i in range(hosts)]
        self.routers = {i: f"{tag}-r{i}" for i in sorted(self.private)}
        self.switch = f"{tag}-br"
        self._created: List[str] = []
        self._procs: List["subprocess.Popen[Any]"] = []
        self._old_handlers: Dict[int, Any] = {}
        self.sigkilled: List[int] = []

    def ip(self, host: int) -> str:
        """The host's own address (a private host's is on its home network, unreachable from the others)."""
        return f"192.168.{host + 1}.2" if host in self.private else f"{self.subnet}.{host + 1}"

    def public_ip(self, host: int) -> str:
        """The address the others see the host's connections come from (its router's, for a private host)."""
        return f"{self.subnet}.{host + 101}" if host in self.private else self.ip(host)

    # --- building and tearing down -------------------------------------------------------------------------------
    def __enter__(self) -> "TestNetwork":
        if os.geteuid() != 0:
            raise SkipBenchmark("skipped: needs root for network namespaces")
        if shutil.which("ip") is None or shutil.which("tc") is None:
            raise SkipBenchmark("skipped: needs iproute2 (ip, tc) for network namespaces")
        if self.private and shutil.which("nft") is None:
            raise SkipBenchmark("skipped: needs nftables (nft) for the NAT routers; apt-get install nftables")
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGINT too: `cmd &` in a script ignores it
            self._old_handlers[sig] = signal.signal(sig, _raise_interrupt)
        try:
            remove_stale_namespaces()
            self._build()
        except subprocess.CalledProcessError as e:
            self.close()
            reason = (e.stderr or "").strip().splitlines()[-1:] or [str(e)]
            raise SkipBenchmark(f"skipped: cannot build network namespaces ({' '.join(e.cmd[:4])}: {reason[0]})") from e
        except BaseException:
            self.close()
            raise
        return self

    def _netns(self, name: str) -> None:
        _sh(["ip", "netns", "add", name])
        self._created.append(name)
        _sh(["ip", "-n", name, "link", "set", "lo", "up"])

    def _tbf(self, namespace: str, dev: str) -> None:
        rate = f"{self.mbit:g}mbit"
        _sh(["ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
             "burst", f"{self.burst_kbit}kbit", "latency", f"{self.latency_ms}ms"])  # fmt: skip

    def _build(self) -> None:
        self._netns(self.switch)
        _sh(["ip", "-n", self.switch, "link", "add", "br0", "type", "bridge"])
        _sh(["ip", "-n", self.switch, "link", "set", "br0", "up"])
        for i, name in enumerate(self.namespaces):
            self._netns(name)
            on_switch = self.routers.get(i, name)  # a private host reaches the switch through its router
            if on_switch != name:
                self._netns(on_switch)
            host_end, switch_end = "eth0", f"port{i}"
            veth = ["type", "veth", "peer", "name", switch_end, "netns", self.switch]
            _sh(["ip", "link", "add", host_end, "netns", on_switch, *veth])
            _sh(["ip", "-n", on_switch, "addr", "add", f"{self.public_ip(i)}/24", "dev", host_end])
            _sh(["ip", "-n", on_switch, "link", "set", host_end, "up"])
            _sh(["ip", "-n", self.switch, "link", "set", switch_end, "master", "br0", "up"])
            self._tbf(on_switch, host_end)
            self._tbf(self.switch, switch_end)
            if on_switch != name:
                self._home_network(i, name, on_switch)

    def _home_network(self, i: int, host: str, router: str) -> None:
        """Host ``i`` behind ``router``: a LAN link, a default route, masquerade out, nothing new in."""
        lan = f"192.168.{i + 1}"
        _sh(["ip", "link", "add", "eth0", "netns", host, "type", "veth", "peer", "name", "lan0", "netns", router])
        _sh(["ip", "-n", host, "addr", "add", f"{lan}.2/24", "dev", "eth0"])
        _sh(["ip", "-n", router, "addr", "add", f"{lan}.1/24", "dev", "lan0"])
        _sh(["ip", "-n", host, "link", "set", "eth0", "up"])
        _sh(["ip", "-n", router, "link", "set", "lan0", "up"])
        _sh(["ip", "-n", host, "route", "add", "default", "via", f"{lan}.1"])
        _sh(["ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        rules = """
table ip nat {
  chain out {
    type nat hook postrouting priority 100; policy accept;
    oifname "eth0" masquerade
  }
}
table ip filter {
  chain forward {
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
    iifname "lan0" accept
  }
  chain input {
    type filter hook input priority 0; policy drop;
    ct state established,related accept
    iifname { "lo", "lan0" } accept
  }
}
"""
        done = subprocess.run(["ip", "netns", "exec", router, "nft", "-f", "-"], input=rules, capture_output=True,
                              text=True)  # fmt: skip
        if done.returncode != 0:
            raise subprocess.CalledProcessError(done.returncode, ["nft", "-f", "-"], done.stdout, done.stderr)

    def __exit__(
        self, kind: Optional[Type[BaseException]], value: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop every process we started, delete every namespace we made; idempotent, not interruptible."""
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            for proc in self._procs:
                _killpg(proc.pid, signal.SIGTERM)  # all at once, then wait for each
            for proc in self._procs:
                self.sigkilled += stop_group(proc)
            self._procs.clear()
            for name in reversed(self._created):
                subprocess.run(["ip", "netns", "del", name], capture_output=True)
            self._created.clear()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, self._old_handlers.pop(sig, handler))

    # --- running things inside a host ----------------------------------------------------------------------------
    def argv(self, host: int, argv: Sequence[str]) -> List[str]:
        return ["ip", "netns", "exec", self.namespaces[host], *argv]

    def popen(self, host: int, argv: Sequence[str], **kwargs: Any) -> "subprocess.Popen[Any]":
        """Start ``argv`` inside host ``host`` in a new session; stopped by ``close()`` at the latest."""
        proc = subprocess.Popen(self.argv(host, argv), start_new_session=True, **kwargs)
        self._procs.append(proc)
        return proc

    def stop(self, proc: "subprocess.Popen[Any]", grace: float = 5.0) -> None:
        self.sigkilled += stop_group(proc, grace)
        if proc in self._procs:
            self._procs.remove(proc)

    def run(self, host: int, argv: Sequence[str], timeout: float = 30.0) -> "subprocess.CompletedProcess[str]":
        return subprocess.run(self.argv(host, argv), capture_output=True, text=True, timeout=timeout)


class JsonProcess:
    """A process in host ``host`` that reads JSON commands on stdin and prints JSON events on stdout (stderr goes
    to ``log``); ``expect`` waits for an event by name. ``close`` stops it (see ``TestNetwork.stop``)."""

    def __init__(self, net: TestNetwork, host: int, argv: Sequence[str], log: Path, **kwargs: Any) -> None:
        self.net, self.log_path, self._log = net, log, open(log, "wb")
        self.proc = net.popen(host, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, **kwargs)
        self.events: "queue.Queue[Optional[Dict[str, Any]]]" = queue.Queue()
        self.ready: Dict[str, Any] = {}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                self.events.put(json.loads(raw))
            except ValueError:
                continue  # not ours (a library printing to stdout)
        self.events.put(None)

    def send(self, message: Dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(message) + "\n").encode())
        self.proc.stdin.flush()

    def expect(self, event: str, timeout: float) -> Dict[str, Any]:
        """The next stdout object whose "event" is ``event`` (others are skipped); RuntimeError on exit or timeout."""
        return self.collect(event, timeout)[-1]

    def collect(self, until: str, timeout: float) -> List[Dict[str, Any]]:
        """Every stdout object up to and including the next whose "event" is ``until``; RuntimeError on exit or
        timeout."""
        deadline, got = time.monotonic() + timeout, []
        while True:
            try:
                event = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"no {until!r} within {timeout:.0f}s; {self.tail()}") from None
            if event is None:
                raise RuntimeError(f"exited (rc {self.proc.wait()}) before {until!r}; {self.tail()}")
            got.append(event)
            if event.get("event") == until:
                return got

    def tail(self) -> str:
        self._log.flush()
        lines = self.log_path.read_text(errors="replace").strip().splitlines()
        return f"log {self.log_path}: {lines[-1][:200] if lines else '(empty)'}"

    def close(self) -> None:
        self.net.stop(self.proc)
        self._log.close()


def start_nodes(
    net: TestNetwork, argv: Callable[[int], List[str]], workdir: Callable[[int], Path], nodes: List[JsonProcess],
    env: Optional[Dict[str, str]] = None,
) -> None:  # fmt: skip
    """One ``node start`` per host of ``net`` (``argv(host)``, its log in ``workdir(host)``), each joining the first
    by its ready line's address, one after the other; appended to ``nodes`` as they start (the caller closes them)."""
    for host in range(net.hosts):
        args = argv(host) + (["--initial-peers", nodes[0].ready["maddrs"][0]] if nodes else [])
        directory = workdir(host)
        directory.mkdir(parents=True, exist_ok=True)
        node = JsonProcess(net, host, args, directory / "node.log", cwd=directory, env=env)
        node.ready = node.expect("ready", 180)
        nodes.append(node)


if __name__ == "__main__":  # smoke test: python -m bench.netns
    try:
        with TestNetwork(hosts=2, mbit=100) as net:
            server = net.popen(0, ["python3", "-c", "import socket,sys;s=socket.socket();s.bind(('0.0.0.0',5001));"
                                   "s.listen();c,_=s.accept();n=0\nwhile (b:=c.recv(1<<20)):n+=len(b)\nprint(n)"],
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
            time.sleep(0.5)
            started = time.perf_counter()
            client = net.run(1, ["python3", "-c", f"import socket;s=socket.create_connection(('{net.ip(0)}',5001));"
                                 "s.sendall(bytes(25_000_000));s.close()"])  # fmt: skip
            received = int(server.communicate(timeout=30)[0])
            seconds = time.perf_counter() - started
            print(f"{received / 1e6:.0f} MB in {seconds:.2f} s = {received * 8 / seconds / 1e6:.1f} Mbit/s "
                  f"(limit {net.mbit:g}); {client.returncode=}")  # fmt: skip
    except SkipBenchmark as skip:
        print(skip)
