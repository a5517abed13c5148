"""`node status`: join the DHT as a light client and describe the swarm."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

from node.errors import PeerUnreachable, SwarmMismatch
from node.net import HivemindSwarm, peer_id_of
from node.swarm import SwarmView, ask, read_peers
from protocol.wire import WireError


def swarm_status(view: SwarmView, swarm_id: str) -> Dict[str, Any]:
    """The documented JSON shape: swarm id, one entry per peer, replica count per module."""
    peers: List[Dict[str, Any]] = []
    replicas: Dict[str, int] = {}
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
            }
        )
        for module in record.modules:
            replicas[module] = replicas.get(module, 0) + 1
    modules = [{"module": m, "replicas": n} for m, n in sorted(replicas.items(), key=lambda kv: _module_order(kv[0]))]
    return {"swarm_id": swarm_id, "peers": peers, "modules": modules}


def _module_order(module: str) -> Tuple[int, int]:
    if module == "trunk":
        return (-1, -1)
    _, layer, index = module.split(".")
    return (int(layer), int(index))


def read_swarm(initial_peers: Sequence[str], timeout: float = 20.0, swarm_id: str = "") -> Tuple[str, SwarmView]:
    """Ask the first bootstrap peer that answers for its swarm id, then read that swarm's records."""
    swarm = HivemindSwarm.open(initial_peers=initial_peers, client_mode=True, startup_timeout=timeout)
    try:
        errors = []
        for maddr in initial_peers:
            try:
                reply = swarm.run(ask(swarm, peer_id_of(maddr), swarm_id, timeout), timeout=timeout + 5)
            except (TimeoutError, ConnectionError, WireError) as e:
                errors.append(str(e))
                continue
            if not reply.accepted:
                raise SwarmMismatch(f"peer {peer_id_of(maddr)[-8:]} refused: {reply.reason}")
            view = swarm.run(read_peers(swarm, reply.swarm_id), timeout=timeout)
            return reply.swarm_id, view
        raise PeerUnreachable("no bootstrap peer answered as a Commons node (" + "; ".join(errors) + ")")
    finally:
        swarm.close()


def format_table(status: Dict[str, Any]) -> str:
    lines = [f"swarm {status['swarm_id']}: {len(status['peers'])} peer(s)", ""]
    header = f"{'peer':<14} {'round':>5} {'steps':>7} {'loss':>7} {'samples/s':>10}  modules"
    lines.append(header)
    for peer in status["peers"]:
        loss = f"{peer['loss']:.3f}" if peer["loss"] is not None else "-"
        rate = f"{peer['samples_per_second']:.1f}" if peer["samples_per_second"] is not None else "-"
        experts = [m for m in peer["modules"] if m != "trunk"]
        modules = "trunk" + (", " + ", ".join(experts) if experts else "")
        short_id = "…" + peer["peer_id"][-12:]
        counters = f"{peer['outer_round']:>5} {peer['local_steps']:>7} {loss:>7} {rate:>10}"
        lines.append(f"{short_id:<14} {counters}  {modules}")
    lines.append("")
    lines.append("replicas: " + ", ".join(f"{m['module']}={m['replicas']}" for m in status["modules"]))
    return "\n".join(lines)


def format_prometheus(view: SwarmView) -> str:
    """The swarm view in Prometheus text format (for a textfile collector or a one-off look)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import generate_latest

    from node.ops import SwarmViewCollector

    modules = sorted({m for record in view.peers.values() for m in record.modules}, key=_module_order)
    registry = CollectorRegistry()
    registry.register(SwarmViewCollector(lambda: view, modules))
    return generate_latest(registry).decode()
