"""`node doctor`: will `node start` work here, with this config? Each check is one pass/fail line and its fix.

Local checks need nothing but this machine: the bundled p2pd runs, the listen ports are free, the checkpoint
directory is writable and has room, the data is readable, the device. The others ask the bootstrap peers
(they are skipped without --initial-peers), through a swarm of the doctor's own, opened as a light client
under a throwaway identity on the ports `node start` would listen on: each peer's hello (its swarm id), one
dial-back per peer (can strangers connect to us?) whose reply also carries the peer's wall clock (clock
skew), and a hello to the peer id of our identity key (a node that answers with it is using our key).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Generator, List, Literal, NamedTuple, Optional, Sequence

from node.errors import DataPathError, PeerUnreachable
from node.net import SwarmPort, ip_and_port, peer_id_of
from node.runtime import NodeConfig
from node.swarm import ask, ask_dialback, decide, listen_ports, read_peers
from protocol.manifest import Manifest
from protocol.wire import DialBackReply, WireError

Status = Literal["pass", "fail", "skip"]
_GO_TIMESTAMP = re.compile(r"^\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2}(\.\d+)? ")  # how p2pd's log lines begin
MAX_SKEW_SECONDS = 2.0  # matchmaking windows are a few seconds wide: peers must agree on the time to a second or so
# Free space a checkpoint directory needs beyond the generations themselves: their JSON, the temporary file of
# the generation being written, the filesystem's own slack.
CHECKPOINT_FLOOR_BYTES = 64 << 20
P2PD_SECONDS = 10.0  # p2pd prints its peer id within a second; it is given ten on a loaded machine
_PRIVATE_STILL_TRAINS = "a private node still trains (it sends and receives on connections it opens)"
_NO_PEERS = "no --initial-peers: `node start` would begin a new swarm"
_FIX_PEER = "check that a node runs there and that the multiaddr is the one it printed (its ready line's maddrs)"


@dataclass(frozen=True)
class Check:
    """One check's outcome; ``fix`` says what to do, for a failed check."""

    name: str
    status: Status
    detail: str
    fix: str = ""

    @property
    def ok(self) -> bool:
        return self.status != "fail"

    def line(self) -> str:
        text = f"{self.status.upper():<4}  {self.name}: {self.detail}"
        return text + (f" — fix: {self.fix}" if self.fix else "")

    def as_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "status": self.status, "detail": self.detail, "fix": self.fix}


def passed(name: str, detail: str) -> Check:
    return Check(name, "pass", detail)


def failed(name: str, detail: str, fix: str) -> Check:
    return Check(name, "fail", detail, fix)


def skipped(name: str, detail: str) -> Check:
    return Check(name, "skip", detail)


def report(checks: Sequence[Check]) -> Dict[str, Any]:
    """The `--json` document: ``{"ok": every check passed or was skipped, "checks": [...]}``."""
    return {"ok": all(c.ok for c in checks), "checks": [c.as_dict() for c in checks]}


def summary(checks: Sequence[Check]) -> str:
    failures = sum(1 for c in checks if not c.ok)
    skips = sum(1 for c in checks if c.status == "skip")
    head = f"{failures} of {len(checks)} checks failed" if failures else f"all {len(checks)} checks passed"
    return head + (f" ({skips} skipped)" if skips else "")


# --- the p2p daemon ------------------------------------------------------------------------------------------
class DaemonFailed(Exception):
    """p2pd did not start, or did not say its peer id."""


def p2pd_path() -> Optional[Path]:
    """Where hivemind keeps its p2pd binary (found without importing hivemind), None without hivemind."""
    spec = importlib.util.find_spec("hivemind")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "hivemind_cli" / "p2pd"


def p2pd_peer_id(binary: Path, identity: Optional[str] = None, timeout: float = P2PD_SECONDS) -> str:
    """Start ``binary`` briefly, with the key ``identity`` (else a fresh one), and return the peer id it prints.

    It listens on no network address (only its control socket, in a temporary directory), bootstraps to
    nobody and exits by itself once idle (-idleTimeout): using a key this way shows it to nobody.
    DaemonFailed with p2pd's last words when it cannot run or cannot read the key."""
    if not binary.is_file() or not os.access(binary, os.X_OK):
        raise DaemonFailed(f"{binary} is missing or not executable")
    with tempfile.TemporaryDirectory(prefix="commons-doctor-") as scratch:
        argv = [str(binary), "-noListenAddrs", "-listen", f"/unix{scratch}/p2pd.sock", "-idleTimeout", "0.5s"]
        argv += ["-id", identity] if identity else []
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, errors="replace")
        except subprocess.TimeoutExpired:
            raise DaemonFailed(f"it printed no peer id within {timeout:g}s") from None
        except OSError as e:  # wrong architecture, missing loader...
            raise DaemonFailed(f"it cannot be executed here: {e.strerror or e}") from None
    for line in done.stdout.splitlines():
        if line.startswith("Peer ID: "):
            return line.removeprefix("Peer ID: ").strip()
    words = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
    words = _GO_TIMESTAMP.sub("", words)
    raise DaemonFailed(f"it exited with code {done.returncode}: {words}")


def check_p2pd(binary: Optional[Path]) -> Check:
    name = "p2p daemon"
    fix = "reinstall hivemind (`pip install --force-reinstall hivemind==1.1.12`) in this environment"
    if binary is None:
        return failed(name, "hivemind is not installed", fix)
    try:
        p2pd_peer_id(binary)
    except DaemonFailed as e:
        return failed(name, f"the bundled p2pd ({binary}) does not run on this machine: {e}", fix)
    return passed(name, f"the bundled p2pd starts ({binary})")


# --- this machine --------------------------------------------------------------------------------------------
def check_listen_port(maddr: str) -> Check:
    """Can `node start` listen on ``maddr``? Its TCP port is bound (and released again) unless it is 0."""
    name = "listen port"
    host, port = ip_and_port(maddr)
    if host is None or port is None:
        return skipped(name, f"{maddr}: no IP address and TCP port to try")
    if port == 0:
        return passed(name, f"{maddr}: port 0, a free port is picked at each start")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as p2pd's listener does
            probe.bind((host, port))
    except OSError as e:
        fix = (
            f"stop what listens there (`ss -ltnp 'sport = :{port}'` names it: another node?) or choose another port "
            "in --host-maddrs"
        )
        return failed(name, f"{maddr}: cannot listen on {host} port {port} ({e.strerror or e})", fix)
    return passed(name, f"{maddr}: TCP port {port} on {host} is free")


def doctor_host_maddrs(host_maddrs: Sequence[str], usable: Sequence[bool]) -> List[str]:
    """The addresses the doctor's own swarm listens on: `node start`'s, with port 0 where that port is taken."""
    return [m if ok else _any_port(m) for m, ok in zip(host_maddrs, usable, strict=True)]


def _any_port(maddr: str) -> str:
    _, port = ip_and_port(maddr)
    return (maddr + "/").replace(f"/tcp/{port}/", "/tcp/0/", 1)[:-1]


def generation_bytes(manifest: Manifest, experts: int) -> int:
    """About what one checkpoint generation of this node takes: four float32 values (global copy, outer
    momentum, AdamW's two moments) per parameter of the trunk and of ``experts`` experts."""
    import torch

    from node.training import MoETransformer

    with torch.device("meta"):  # shapes only: no memory, no weights drawn
        model = MoETransformer(manifest.model, seed=manifest.seed)
    names = manifest.model.module_names()
    hosted = min(experts, len(names) - 1)
    expert = model.count_parameters(names[1]) if hosted else 0
    return 16 * (model.count_parameters("trunk") + hosted * expert)


def check_checkpoint_dir(
    directory: Optional[str], need_bytes: int, disk_usage: Callable[[str], Any] = shutil.disk_usage
) -> Check:
    """``directory`` (or, while it does not exist, the nearest existing directory above it, where `node start`
    would create it) takes a new file and has ``need_bytes`` free."""
    name = "checkpoint dir"
    if not directory:
        return skipped(name, "no --checkpoint-dir: the node keeps no checkpoints")
    where = Path(directory).absolute()
    existing = next(p for p in (where, *where.parents) if p.exists())
    fix = "choose a --checkpoint-dir on a disk this user can write to"
    if not existing.is_dir():
        return failed(name, f"{directory}: {existing} is not a directory", fix)
    try:
        handle, scratch = tempfile.mkstemp(prefix=".commons-doctor-", dir=existing)
        os.close(handle)
        os.unlink(scratch)
    except OSError as e:
        detail = f"{directory}: cannot create a file in {existing} ({e.strerror or e})"
        return failed(name, detail, f"fix the permissions of {existing} (the node's user creates files there) or {fix}")
    free = int(disk_usage(str(existing)).free)
    if free < need_bytes:
        detail = f"{directory}: {_mib(free)} free, the node needs about {_mib(need_bytes)}"
        return failed(name, detail, f"free space there, lower --checkpoint-keep or --experts, or {fix}")
    created = "" if existing == where else f" (created at start, in {existing})"
    return passed(name, f"{directory}: writable{created}, {_mib(free)} free of about {_mib(need_bytes)} needed")


def checkpoint_need_bytes(config: NodeConfig, manifest: Manifest) -> int:
    """The generations kept plus the one being written before the oldest goes, or the floor if that is more."""
    return max((config.checkpoint_keep + 1) * generation_bytes(manifest, config.experts), CHECKPOINT_FLOOR_BYTES)


def _mib(count: int) -> str:
    return f"{count / (1 << 20):,.0f} MiB"


def check_data(config: NodeConfig, manifest: Manifest) -> Check:
    """The data `node start` would train on is there and readable (read as `node start` reads it at start)."""
    from node.training import TextData

    try:
        data = TextData(config.data, manifest.model.seq_len, field=config.data_field)
    except DataPathError as e:
        fix = "pass --data with readable text (a file, a directory or a glob), or none for the embedded corpus"
        return failed("data", str(e), fix)
    return passed("data", data.describe())


def cuda_device_name() -> Optional[str]:
    import torch

    return str(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else None


def check_device(requested: str, cuda: Callable[[], Optional[str]] = cuda_device_name) -> Check:
    found = cuda()
    if requested == "cuda" and found is None:
        fix = "use --device cpu or auto, or install the CUDA build of torch and check `nvidia-smi`"
        return failed("device", "--device cuda, but torch sees no CUDA device", fix)
    if found is None:
        return passed("device", "cpu only (no CUDA)")
    return passed("device", f"cuda: {found}" + (" (not used: --device cpu)" if requested == "cpu" else ""))


# --- the swarm -----------------------------------------------------------------------------------------------
def read_identity(path: Optional[str], binary: Optional[Path]) -> "Check | str":
    """The peer id of the key at ``path``, or the check's outcome when there is no key to look for in the swarm."""
    if path is None:
        return passed("identity", "none given: a new peer id each start")
    if not os.path.exists(path):
        return passed("identity", f"{path} does not exist yet: created at start (a new peer id)")
    if binary is None:
        return skipped("identity", f"{path}: cannot read it without p2pd")
    try:
        return p2pd_peer_id(binary, path)
    except DaemonFailed as e:
        fix = "point --identity at your key file, or move this one away (a new peer id is made at start)"
        return failed("identity", f"{path} is not a key p2pd can read: {e}", fix)


async def check_identity(swarm: SwarmPort, peer_id: str, path: str, swarm_id: str, timeout: float) -> Check:
    """Is a running node using the key (two peers with one id break each other)? It is when a peer answers a
    hello as ``peer_id``, or, as a node behind NAT cannot be dialed, when swarm ``swarm_id``'s records list it:
    a record lives RECORD_TTL_SECONDS (12 s) after its node last announced itself, and one that left says so."""
    fix = "stop the node that uses this key, or give this one its own --identity (or --checkpoint-dir, which keeps one)"
    key = f"{path}: peer id …{peer_id[-8:]}"
    try:
        reply, _ = await ask(swarm, peer_id, "", timeout)
    except (TimeoutError, ConnectionError):
        view = await read_peers(swarm, swarm_id)
        if peer_id not in view.peers:
            return passed("identity", f"{key}, no peer answers with it or lists it")
        ago = max(0.0, swarm.now() - view.seen_at[peer_id])
        return failed("identity", f"{key} is in use: the swarm lists it (announced {ago:.0f} s ago)", fix)
    except WireError:
        reply = None
    seen = f" (a node of swarm {reply.swarm_id})" if reply is not None else ""
    return failed("identity", f"{key} is in use: a running peer answers with it{seen}", fix)


async def check_bootstrap_peer(swarm: SwarmPort, maddr: str, manifest: Manifest, timeout: float) -> Check:
    peer = peer_id_of(maddr)
    name = f"bootstrap peer …{peer[-8:]}"
    try:
        reply, _ = await ask(swarm, peer, manifest.swarm_id, timeout)
    except (TimeoutError, ConnectionError, WireError) as e:
        return failed(name, f"no answer as a Commons node ({e})", _FIX_PEER)
    if reply.accepted:
        return passed(name, f"answers, swarm id {reply.swarm_id} (same manifest, {reply.manifest_name!r})")
    if reply.swarm_id != manifest.swarm_id:
        theirs = f"{reply.manifest_name!r} (swarm id {reply.swarm_id})"
        detail = f"answers, but trains {theirs}, not our {manifest.name!r} (swarm id {manifest.swarm_id})"
        return failed(name, detail, "start with the swarm's --manifest (ask its operator for the file)")
    return failed(name, f"answers, but refuses us: {reply.reason}", "run the same Commons version as the swarm")


class DialSample(NamedTuple):
    """One dial-back: the peer's reply (None: ``error``) and our wall clock when we asked and got it."""

    peer: str
    reply: Optional[DialBackReply]
    error: str
    sent: float
    received: float

    @property
    def skew(self) -> Optional[float]:
        """The peer's clock minus ours (seconds), give or take half the round trip."""
        if self.reply is None or self.reply.now is None:
            return None
        return self.reply.now - (self.sent + self.received) / 2


async def dial_back(
    swarm: SwarmPort, peer: str, ports: Sequence[int], timeout: float, clock: Callable[[], float] = time.time
) -> DialSample:
    """Ask ``peer`` once to dial us back (a peer dials a caller back at most every 10 s: once is all we get)."""
    sent = clock()
    try:
        reply = await ask_dialback(swarm, peer, ports, timeout)
    except (TimeoutError, ConnectionError, WireError) as e:
        return DialSample(peer, None, str(e), sent, clock())
    return DialSample(peer, reply, "", sent, clock())


def check_reachability(samples: Sequence[DialSample], ports: Sequence[int], config: NodeConfig) -> Check:
    """Can strangers connect to us? The verdict a node reaches at start (node/swarm/reachability.py ``decide``)
    on these dial-backs, said with what the peers saw."""
    name = "reachable from outside"
    if not ports:
        return skipped(name, "this node listens on no TCP port: nothing to dial")
    verdict = decide([s.reply for s in samples])
    if verdict == "unknown":
        said = "; ".join(f"…{s.peer[-8:]}: {s.error or (s.reply.reason if s.reply else '')}" for s in samples)
        return skipped(name, f"cannot tell, no peer dialed back ({said})")
    # the first peer that connected (public), or that dialed and did not (private)
    public = verdict == "public"
    s = [s for s in samples if s.reply is not None and (s.reply.reachable if public else s.reply.tried)][0]
    assert s.reply is not None
    if public:
        note = " (the node acts private all the same: --private)" if config.reachability == "private" else ""
        where = f"{s.reply.observed} port {_ports(s.reply.reachable)}"
        return passed(name, f"peer …{s.peer[-8:]} dialed {where} and connected{note}")
    dialed_at = f"{s.reply.observed}:{_ports(s.reply.tried)}"
    detail = f"not reachable from outside (peer …{s.peer[-8:]} dialed {dialed_at} and got no connection)"
    if config.reachability == "private":
        return passed(name, f"{detail}, as --private says; {_PRIVATE_STILL_TRAINS}")
    fix = _reachability_fix(config, ports)
    if config.reachability == "public":
        fix = "drop --public (the node finds out by itself) or " + fix
    return failed(name, detail, f"{fix}; {_PRIVATE_STILL_TRAINS}")


def _reachability_fix(config: NodeConfig, ports: Sequence[int]) -> str:
    hosts = [ip_and_port(m)[0] for m in config.host_maddrs]
    if all(h is not None and (h.startswith("127.") or h == "::1") for h in hosts):
        return "listen on every interface, e.g. --host-maddrs /ip4/0.0.0.0/tcp/31337, and forward that TCP port"
    if config.announce_maddrs:
        return f"check that --announce-maddrs' TCP port {_ports(ports)} forwards to this machine, through any firewall"
    if any(ip_and_port(m)[1] == 0 for m in config.host_maddrs):
        return "listen on a fixed port (--host-maddrs /ip4/0.0.0.0/tcp/31337) and forward it on your router"
    announce = "--announce-maddrs /ip4/<public address>/tcp/<forwarded port>"
    return f"forward TCP port {_ports(ports)} on your router to this machine, or run with {announce}"


def _ports(ports: Sequence[int]) -> str:
    return ",".join(map(str, ports))


def check_clock_skew(samples: Sequence[DialSample], limit: float = MAX_SKEW_SECONDS) -> Check:
    name = "clock skew"
    skews = [(s.peer, s.skew, s.received - s.sent) for s in samples if s.skew is not None]
    if not skews:
        return skipped(name, "no peer told its time")
    peer, worst, rtt = max(skews, key=lambda item: abs(item[1] or 0.0))
    assert worst is not None
    detail = f"{worst:+.3f} s against peer …{peer[-8:]} (±{rtt / 2:.3f} s, over {len(skews)} peer(s))"
    if abs(worst) <= limit:
        return passed(name, detail)
    fix = "turn on time sync (`timedatectl set-ntp true`, or chrony): averaging rounds meet in time windows"
    return failed(name, f"{detail}, more than {limit:g} s", fix)


# --- the runner ----------------------------------------------------------------------------------------------
def run_doctor(
    config: NodeConfig,
    manifest: Manifest,
    timeout: float,
    emit: Callable[[Check], None] = lambda _: None,
    locate_p2pd: Callable[[], Optional[Path]] = p2pd_path,
) -> List[Check]:
    """Every check, in order; ``emit`` sees each one as soon as it is done. ``timeout``: seconds to join
    through the bootstrap peers, and for each answer."""
    checks: List[Check] = []

    def add(check: Check) -> None:
        checks.append(check)
        emit(check)

    binary = locate_p2pd()
    daemon = check_p2pd(binary)
    add(daemon)
    listening = [check_listen_port(m) for m in config.host_maddrs]
    for check in listening:
        add(check)
    identity = read_identity(config.identity_file(), binary if daemon.ok else None)
    if not config.initial_peers or not daemon.ok:
        why = "needs the p2p daemon" if config.initial_peers else _NO_PEERS
        for name in ("bootstrap peers", "reachable from outside", "clock skew"):
            add(skipped(name, why))
        add(_unasked(identity, why))
    else:
        hosts = doctor_host_maddrs(config.host_maddrs, [c.ok for c in listening])
        with contextlib.closing(_ask_the_swarm(config, manifest, timeout, hosts, identity)) as answers:
            for check in answers:  # closing: the swarm is closed even if emit raises
                add(check)
    need = checkpoint_need_bytes(config, manifest) if config.checkpoint_dir else 0
    add(check_checkpoint_dir(config.checkpoint_dir, need))
    add(check_data(config, manifest))
    add(check_device(config.device))
    return checks


def _ask_the_swarm(
    config: NodeConfig, manifest: Manifest, timeout: float, hosts: Sequence[str], identity: "Check | str"
) -> Generator[Check, None, None]:
    """The checks that ask the bootstrap peers, through one light-client swarm, closed when the last is out."""
    from node.net import HivemindSwarm, route_hivemind_logs

    route_hivemind_logs()
    try:
        swarm = HivemindSwarm.open(
            initial_peers=config.initial_peers,
            host_maddrs=hosts,
            announce_maddrs=config.announce_maddrs,
            client_mode=True,
            startup_timeout=timeout,
        )
    except PeerUnreachable as e:
        yield failed("bootstrap peers", str(e), _FIX_PEER)
        for name in ("reachable from outside", "clock skew"):
            yield skipped(name, "no bootstrap peer answered")
        yield _unasked(identity, "no bootstrap peer answered")
        return
    try:
        for maddr in config.initial_peers:
            yield swarm.run(check_bootstrap_peer(swarm, maddr, manifest, timeout), timeout + 5)
        ports = listen_ports(list(config.announce_maddrs) or swarm.visible_maddrs())
        peers = dict.fromkeys(peer_id_of(m) for m in config.initial_peers)
        samples = [swarm.run(dial_back(swarm, peer, ports, timeout), timeout + 5) for peer in peers] if ports else []
        yield check_reachability(samples, ports, config)
        yield check_clock_skew(samples)
        if isinstance(identity, str):  # a key that exists: is a running peer using it?
            asked = check_identity(swarm, identity, config.identity_file() or "", manifest.swarm_id, timeout)
            identity = swarm.run(asked, timeout + 5)
        yield identity
    finally:
        swarm.close()


def _unasked(identity: "Check | str", why: str) -> Check:
    """The identity check when there is no swarm to ask: what reading the key found, else a skip."""
    return identity if isinstance(identity, Check) else skipped("identity", f"peer id …{identity[-8:]}: {why}")
