"""Start `node start` in a pod of the `commons` StatefulSet, joined to the pods already running.

The peers are found, not configured: the headless Service's DNS name (JOIN_SERVICE) resolves to the ready
pods, and each pod's /status.json, on its metrics port, names its peer id. Pod 0 starts the swarm when no
pod is ready (the first start, or every pod down); any other pod waits for one, so a cluster never holds
two swarms of the same manifest. COMMONS_INITIAL_PEERS, when set (peers outside the cluster), is kept and
the pods found are added to it. Then this process becomes the node (exec): it gets the pod's SIGTERM.

kustomize ships this file as the ConfigMap `commons-join` (kustomization.yaml); tests/unit/test_deploy_assets.py
runs it with a fake DNS and HTTP.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import urllib.request
from typing import Callable, List, Mapping, Optional

WAIT_SECONDS = 5.0


def port_of(maddr: str, protocol: str = "tcp") -> str:
    """The port of a multiaddr such as /ip4/0.0.0.0/tcp/31337."""
    parts = maddr.strip("/").split("/")
    return parts[parts.index(protocol) + 1]


def peer_maddr(ip: str, port: str, peer_id: str) -> str:
    return f"/{'ip6' if ':' in ip else 'ip4'}/{ip}/tcp/{port}/p2p/{peer_id}"


def resolve(name: str) -> List[str]:
    """The addresses ``name`` resolves to: for a headless Service, its ready pods (none while it has none)."""
    try:
        return sorted({str(info[4][0]) for info in socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)})
    except socket.gaierror:
        return []


def fetch_peer_id(url: str) -> Optional[str]:
    """The peer id in a node's /status.json, or None when it does not answer with one."""
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return str(json.load(answer)["node"]["peer_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def ready_peers(
    env: Mapping[str, str],
    resolve: Callable[[str], List[str]] = resolve,
    fetch_peer_id: Callable[[str], Optional[str]] = fetch_peer_id,
) -> List[str]:
    """Multiaddrs of the ready pods of the StatefulSet other than this one."""
    p2p_port = port_of(env["COMMONS_HOST_MADDRS"].replace(",", " ").split()[0])
    metrics_port = env["COMMONS_METRICS_ADDR"].rpartition(":")[2]
    peers = []
    for ip in resolve(env["JOIN_SERVICE"]):
        if ip == env.get("POD_IP"):
            continue
        peer_id = fetch_peer_id(f"http://{'[' + ip + ']' if ':' in ip else ip}:{metrics_port}/status.json")
        if peer_id:
            peers.append(peer_maddr(ip, p2p_port, peer_id))
    return peers


def initial_peers(
    env: Mapping[str, str],
    find: Callable[[Mapping[str, str]], List[str]] = ready_peers,
    sleep: Callable[[float], None] = time.sleep,
) -> List[str]:
    """What COMMONS_INITIAL_PEERS becomes: the peers given plus the pods found; empty only for pod 0."""
    given = env.get("COMMONS_INITIAL_PEERS", "").replace(",", " ").split()
    seed = env["POD_NAME"].rpartition("-")[2] == "0"
    while True:
        found = find(env)
        if found or given or seed:
            return given + found
        print(f"join: no ready pod behind {env['JOIN_SERVICE']} yet; asking again in {WAIT_SECONDS:.0f} s",
              file=sys.stderr, flush=True)  # fmt: skip
        sleep(WAIT_SECONDS)


def main() -> None:
    env = dict(os.environ)
    peers = initial_peers(env)
    if peers:
        os.environ["COMMONS_INITIAL_PEERS"] = " ".join(peers)
    else:
        os.environ.pop("COMMONS_INITIAL_PEERS", None)
        print("join: no ready pod and no peer given: this pod starts the swarm", file=sys.stderr, flush=True)
    os.execv(sys.executable, [sys.executable, "-m", "node", "start"])


if __name__ == "__main__":
    main()
