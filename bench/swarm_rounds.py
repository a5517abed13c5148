"""Benchmark: steps/s and seconds per averaging round of N local nodes on the default manifest.

Usage: python -m bench.swarm_rounds [--peers 1 2 3] [--rounds 6]
Starts real `node start` processes on loopback (one BLAS thread each, as on a shared
2-core machine), reads their JSON round logs, prints a Markdown table. Not a test:
nothing here passes or fails on a number.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import List

from tests.procs import NodeProcess


def run(peers: int, rounds: int, workdir: Path) -> dict:
    nodes: List[NodeProcess] = []
    try:
        for index in range(peers):
            args = ["start", "--log-format", "json", "--max-rounds", str(rounds + 1)]
            if nodes:
                args += ["--initial-peers", nodes[0].maddr]
            node = NodeProcess.node(args, workdir / f"p{peers}-{index}", f"node{index}")
            nodes.append(node)
            node.wait_ready(120)
        for node in nodes:
            node.proc.wait(timeout=60 * rounds + 120)
    finally:
        for node in nodes:
            node.cleanup()
    entries = [entry for node in nodes for entry in node.events("round")]
    full = [e for e in entries[1:] if e["trunk_group"] == peers] or entries[1:]  # skip warm-up rounds
    return {
        "peers": peers,
        "rounds": len(full),
        "steps_per_second": statistics.median(e["steps"] / e["compute_seconds"] for e in full),
        "averaging_seconds": statistics.median(e["averaging_seconds"] for e in full),
        # with overlapped rounds training only stops for the part of a round still on the network
        "waited_seconds": statistics.median(e.get("waited_seconds", e["averaging_seconds"]) for e in full),
        "utilization": sum(e["compute_seconds"] for e in full)
        / sum(e["compute_seconds"] + e.get("waited_seconds", e["averaging_seconds"]) for e in full),
        "trunk_seconds": statistics.median(e["trunk_seconds"] for e in full),
        "full_group_rounds": sum(e["trunk_group"] == peers for e in entries),
        "all_rounds": len(entries),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peers", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    print("| peers | steps/s per node | averaging s/round (all modules) | training waited s/round | "
          "compute share | trunk s/round | rounds in one full group |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for peers in args.peers:
            r = run(peers, args.rounds, Path(tmp))
            print(
                f"| {r['peers']} | {r['steps_per_second']:.1f} | {r['averaging_seconds']:.2f} | "
                f"{r['waited_seconds']:.2f} | {r['utilization']:.1%} | "
                f"{r['trunk_seconds']:.2f} | {r['full_group_rounds']}/{r['all_rounds']} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
