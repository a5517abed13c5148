"""Benchmark: the bytes each node of a swarm sends when nothing is being averaged (peer records, reads of the
DHT, pings, transport): what a swarm costs per second whatever it trains, beside what its rounds cost.

Usage (root): python -m bench.idle_traffic [--peers 4] [--mbit 20] [--settle 40] [--seconds 60] [--out DIR]
Each peer is a real ``python -m node start`` in its own network namespace (bench/netns.py), on the default
manifest with ``training.inner_steps`` so large that no round ends during the run (the nodes train, post no
readiness and average nothing). After every node is ready and ``--settle`` seconds have passed (newcomers'
state downloads are over), each host's transmitted bytes are read from the kernel's counter of its link, and
again ``--seconds`` later. Prints bytes per second per host (median, mean, worst) and writes results.md into
``--out``. Nothing passes or fails on a number. Needs root; otherwise prints why and exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List

import yaml

from bench.convergence import tx_bytes
from bench.netns import JsonProcess, SkipBenchmark, TestNetwork, start_nodes
from protocol.manifest import DEFAULT_MANIFEST_NAME
from tests.procs import REPO, child_env

NO_ROUND_STEPS = 1_000_000  # local steps per round: none ends within the run


def idle_manifest(path: Path) -> Path:
    text = (REPO / "protocol" / DEFAULT_MANIFEST_NAME).read_text()
    data = yaml.safe_load(text)
    data["name"] = "commons-idle-traffic"
    data["training"]["inner_steps"] = NO_ROUND_STEPS
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def measure(args: argparse.Namespace, tmp: Path) -> List[float]:
    """Bytes per second each host sent over ``args.seconds``, after every node was ready and settled."""
    manifest = idle_manifest(tmp / "manifest.yaml")
    with TestNetwork(hosts=args.peers, mbit=args.mbit) as net:
        nodes: List[JsonProcess] = []
        try:
            start_nodes(
                net, lambda host: [sys.executable, "-m", "node", "start", "--log-format", "json", "--manifest",
                                   str(manifest), "--host-maddrs", f"/ip4/{net.ip(host)}/tcp/0",
                                   "--metrics-addr", f"{net.ip(host)}:9347"],
                lambda host: tmp / f"node-{host}", nodes, env=child_env(),
            )  # fmt: skip
            time.sleep(args.settle)
            before = [tx_bytes(net, h) for h in range(args.peers)]
            started = time.monotonic()
            time.sleep(args.seconds)
            after = [tx_bytes(net, h) for h in range(args.peers)]
            elapsed = time.monotonic() - started
            if any(node.proc.poll() is not None for node in nodes):
                raise RuntimeError(f"a node stopped during the run; see {tmp}")
        finally:
            for node in nodes:
                node.close()
    return [(b - a) / elapsed for a, b in zip(before, after, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--mbit", type=float, default=20.0)
    parser.add_argument("--settle", type=float, default=40.0, help="seconds after the last node is ready")
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds measured")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "idle-traffic")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rates = measure(args, Path(tmp))
    except SkipBenchmark as skip:
        print(skip)
        return
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    text = (
        f"Idle traffic: {args.peers} real nodes, default manifest with no round ending, {args.mbit:g} Mbit/s links; "
        f"commit {commit.stdout.strip()}, {time.strftime('%Y-%m-%d')}; {args.seconds:g} s measured after "
        f"{args.settle:g} s settling\n\n"
        "| bytes sent per second per host | median | mean | worst |\n|---|---|---|---|\n"
        f"| every byte on the link | {statistics.median(rates):,.0f} | {statistics.mean(rates):,.0f} | "
        f"{max(rates):,.0f} |\n\nper host: {', '.join(f'{r:,.0f}' for r in rates)}\n"
    )
    (args.out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
