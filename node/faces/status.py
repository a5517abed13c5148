"""`node status`: join the DHT as a light client and describe the swarm."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from node.errors import NotAMember, PeerUnreachable, SwarmMismatch
from node.net import Admission, HivemindSwarm, Refused, peer_id_of, verify
from node.ops import module_coverage
from node.swarm import SwarmView, ask, by_organisation, read_peers, vouches_in
from protocol.contributions import totals
from protocol.membership import Invite, MembershipError
from protocol.records import contributions_key
from protocol.wire import WireError


def swarm_status(view: SwarmView, swarm_id: str, modules: Sequence[str] = ()) -> Dict[str, Any]:
    """The documented JSON shape: swarm id, one entry per peer, and the replica count of every module of the
    swarm (``modules``, as its peers say in their hello; those nobody hosts count 0), with the coverage figures
    /metrics/swarm exports (node/ops/metrics.py: module_coverage)."""
    peers: List[Dict[str, Any]] = []
    for peer_id, record in sorted(view.peers.items()):
        peers.append(
            {
                "peer_id": peer_id,
                "modules": list(record.modules),
                "outer_round": record.outer_round,
                "local_steps": record.local_steps,
                "loss": record.loss,
                "samples_per_second": record.samples_per_second,
                "last_seen": round(view.seen_at.get(peer_id, 0.0), 3),
                "device": record.device,
                "version": record.version,
                "data": record.data,
                "reachability": record.reachability or "unknown",
                "org": organisation_of(record.invite),
            }
        )
        if view.vouches is not None:  # only vouchers that are members now (their records are in the view)
            vouched = totals(v for voucher, v in view.vouches.get(peer_id, {}).items() if voucher in view.peers)
            peers[-1]["contributed"] = vouched.as_dict()
    hosted = {m for record in view.peers.values() for m in record.modules}
    known = sorted(set(modules) | hosted, key=_module_order)  # a peer's module the hello did not name still shows
    coverage = module_coverage(view.peers.values(), known)
    organisations = None
    if view.vouches is not None:
        vouches = view.vouches
        members = set(view.peers)
        per_peer = {p: totals(v for voucher, v in vouches.get(p, {}).items() if voucher in members) for p in members}
        orgs = {p["peer_id"]: p["org"] for p in peers}
        organisations = by_organisation(per_peer, orgs.get)
    return {
        "swarm_id": swarm_id,
        "peers": peers,
        **({"organisations": organisations} if organisations is not None else {}),
        "modules": [{"module": m, "replicas": n} for m, n in coverage.replicas.items()],
        "uncovered_modules": coverage.uncovered,
        "expert_capacity": coverage.expert_capacity,
        "uncovered_beyond_capacity": coverage.uncovered_beyond_capacity,
    }


def organisation_of(invite: Optional[str]) -> Optional[str]:
    """The organisation an invite names (members-only swarms; the swarm's members checked its signatures before
    they let the record in); None for a founder's node or an open swarm."""
    if not invite:
        return None
    try:
        return Invite.from_bytes(invite.encode()).org
    except MembershipError:
        return None


def _module_order(module: str) -> Tuple[int, int]:
    if module == "trunk":
        return (-1, -1)
    _, layer, index = module.split(".")
    return (int(layer), int(index))


def read_swarm(
    initial_peers: Sequence[str], timeout: float = 20.0, swarm_id: str = "", identity: Optional[str] = None,
    admission: Optional[Admission] = None,
) -> Tuple[str, SwarmView, List[str]]:
    """Ask the first bootstrap peer that answers for its swarm id and modules, then read that swarm's records.
    A members-only swarm answers only a member: ``identity`` and ``admission`` (node/swarm/invites.py presenting)
    show our invite; the key may be a running node's (this client serves nothing and leaves in seconds)."""
    swarm = HivemindSwarm.open(initial_peers=initial_peers, client_mode=True, startup_timeout=timeout,
                               identity_path=identity if admission is not None else None, admission=admission,
                               check_identity_free=False, ensure_bootstrap=False)  # fmt: skip
    try:
        errors = []
        for maddr in initial_peers:
            try:
                reply, modules = swarm.run(ask(swarm, peer_id_of(maddr), swarm_id, timeout), timeout=timeout + 5)
            except Refused as e:
                raise NotAMember(f"the swarm refused this client ({e.reason}): {e.message}") from None
            except (TimeoutError, ConnectionError, WireError) as e:
                errors.append(str(e))
                continue
            if not reply.accepted:
                raise SwarmMismatch(f"peer {peer_id_of(maddr)[-8:]} refused: {reply.reason}")
            view = swarm.run(read_peers(swarm, reply.swarm_id), timeout=timeout)
            if admission is not None:  # members-only: what the members vouched for each other
                found = swarm.run(swarm.read(contributions_key(reply.swarm_id)), timeout=timeout)
                view.vouches = vouches_in(found, admission.swarm_id, verify)
            return reply.swarm_id, view, modules
        raise PeerUnreachable("no bootstrap peer answered as a Commons node (" + "; ".join(errors) + ")")
    finally:
        swarm.close()


def format_table(status: Dict[str, Any]) -> str:
    lines = [f"swarm {status['swarm_id']}: {len(status['peers'])} peer(s)", ""]
    header = f"{'peer':<14} {'round':>5} {'steps':>7} {'loss':>7} {'samples/s':>10}  {'reach':<7}  {'data':<13}"
    with_orgs = any(peer.get("org") for peer in status["peers"])  # a members-only swarm
    header += f"  {'org':<16}  modules" if with_orgs else "  modules"
    lines.append(header)
    for peer in status["peers"]:
        loss = f"{peer['loss']:.3f}" if peer["loss"] is not None else "-"
        rate = f"{peer['samples_per_second']:.1f}" if peer["samples_per_second"] is not None else "-"
        experts = [m for m in peer["modules"] if m != "trunk"]
        modules = "trunk" + (", " + ", ".join(experts) if experts else "")
        short_id = "…" + peer["peer_id"][-12:]
        counters = f"{peer['outer_round']:>5} {peer['local_steps']:>7} {loss:>7} {rate:>10}"
        data = (peer.get("data") or "-")[:13]  # "sha256:" and the first 6 hex digits tell corpora apart
        reach = peer.get("reachability") or "unknown"
        org = f"{(peer.get('org') or '-')[:16]:<16}  " if with_orgs else ""
        lines.append(f"{short_id:<14} {counters}  {reach:<7}  {data:<13}  {org}{modules}")
    lines.append("")
    lines.append("replicas: " + ", ".join(f"{m['module']}={m['replicas']}" for m in status["modules"]))
    expert_count = sum(1 for m in status["modules"] if m["module"] != "trunk")
    line = f"experts without a host: {status['uncovered_modules']} of {expert_count}"
    line += f" (the peers host {status['expert_capacity']} expert(s) in all"
    beyond = status["uncovered_beyond_capacity"]
    lines.append(line + (f"; {beyond} could be covered and are not)" if beyond else ")"))
    if "organisations" in status:  # members-only: what the other members vouched for
        lines += ["", "contributions vouched for by other members (rounds: trunk rounds' worth of parts received):",
                  f"{'who':<22} {'rounds':>8} {'samples':>10} {'MB sent':>9} {'receipts':>8}  modules"]  # fmt: skip
        rows = [("…" + p["peer_id"][-12:] + f" {(p['org'] or '')[:8]}", p["contributed"]) for p in status["peers"]]
        rows += [(f"org {org[:18]}", figures) for org, figures in status["organisations"].items()]
        for who, c in rows:
            lines.append(f"{who:<22} {c['rounds']:>8.2f} {c['samples']:>10} {c['bytes'] / 1e6:>9.2f} "
                         f"{c['receipts']:>8}  {len(c['modules'])}")  # fmt: skip
    return "\n".join(lines)


def format_prometheus(view: SwarmView, modules: Sequence[str] = ()) -> str:
    """The swarm view in Prometheus text format (for a textfile collector or a one-off look): the same
    families as /metrics/swarm, over every module of the swarm (``modules``) and any a peer hosts."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import generate_latest

    from node.ops import SwarmViewCollector

    hosted = {m for record in view.peers.values() for m in record.modules}
    modules = sorted(set(modules) | hosted, key=_module_order)
    registry = CollectorRegistry()
    registry.register(SwarmViewCollector(lambda: view, modules))
    return generate_latest(registry).decode()
