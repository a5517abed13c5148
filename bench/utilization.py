"""Benchmark: compute utilization of a swarm of real nodes on the default manifest over slow links.

Usage (root): python -m bench.utilization [--peers 4] [--mbit 20 100] [--rounds 10] [--private K] [--out DIR]
Each peer is a real ``python -m node start`` in its own network namespace (bench/netns.py), every
link ``--mbit`` up and down, default manifest, default options. Nodes join one after another; the
measured rounds are those every node trained through after the last node's warm-up round (joining,
first resync), before the first node's last round (drained while leaving). From every JSON round log:

* compute share = time inside training steps / wall time, between the end of the warm-up round and the
  end of its last round (``step_seconds_total`` and the log timestamps: evaluation, applying rounds,
  checkpoints and any wait for the network all count against it);
* not-waiting share = 1 - time training stood still for averaging / the same wall time (the issue's
  "computing, not waiting for averaging");
* per round: averaging seconds on the network, seconds training waited, trunk group size, fraction.

``--private K`` runs each link rate a second time, in the same run, with the last K nodes behind NAT routers
(bench/netns.py): they find themselves private and take part as send-only members.

Writes results.md and results.png into ``--out`` and prints the table. Nothing passes or fails on a number.
Needs root; otherwise prints why and exits 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from bench.netns import JsonProcess, SkipBenchmark, TestNetwork, start_nodes
from tests.procs import REPO, child_env, log_records


def common_rounds(per_node: List[List[Dict[str, Any]]], most: Optional[int] = None) -> range:
    """Rounds every node trained through: after the last node's first (warm-up) round, before the first
    node's last round (which may be drained while leaving, with nothing left to overlap); the first ``most``."""
    first = max(entries[0]["round"] for entries in per_node) + 1
    last = min(entries[-1]["round"] for entries in per_node) - 1
    if most is not None:
        last = min(last, first + most - 1)
    return range(first, last + 1)


def node_figures(entries: List[Dict[str, Any]], window: range, peers: int) -> Dict[str, float]:
    """Utilization of one node over the rounds in ``window``: from the end of the round before it to the
    end of its last round."""
    inside = [i for i, e in enumerate(entries) if e["round"] in window and i > 0]
    before, last = entries[inside[0] - 1], entries[inside[-1]]
    measured = [entries[i] for i in inside]
    wall = last["timestamp"] - before["timestamp"]
    computing = last["step_seconds_total"] - before["step_seconds_total"]
    waited = sum(e["waited_seconds"] for e in measured)
    return {
        "rounds": len(measured),
        "wall": wall,
        "compute_share": computing / wall,
        "not_waiting_share": 1 - waited / wall,
        "waited_per_round": waited / len(measured),
        "averaging_per_round": statistics.median(e["averaging_seconds"] for e in measured),
        "steps_per_second": (last["steps_total"] - before["steps_total"]) / wall,
        "full_groups": sum(1 for e in measured if e["trunk_group"] == peers),
        "min_fraction": min(e["trunk_fraction"] for e in measured),
    }


def run_swarm(mbit: float, args: argparse.Namespace, logs: Path, private: int = 0) -> List[Dict[str, Any]]:
    """Start ``args.peers`` nodes in their own namespaces (the last ``private`` behind NAT), let them train,
    return every node's round entries."""
    with TestNetwork(hosts=args.peers, mbit=mbit, private=range(args.peers - private, args.peers)) as net:
        nodes: List[JsonProcess] = []
        start_nodes(
            net, lambda host: [sys.executable, "-m", "node", "start", "--log-format", "json",
                               "--host-maddrs", f"/ip4/{net.ip(host)}/tcp/0", "--metrics-addr", f"{net.ip(host)}:9347",
                               "--max-rounds", str(4 * args.rounds + 10)],
            lambda host: logs / f"{mbit:g}mbit-{private}nat-{host}", nodes, env=child_env(),
        )  # fmt: skip
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline and all(node.proc.poll() is None for node in nodes):
            per_node = [log_records(node.log_path, "round") for node in nodes]
            if all(per_node) and len(common_rounds(per_node)) >= args.rounds:
                break
            time.sleep(2.0)
        else:
            print("  stopped before every node trained through the rounds asked for (timeout or exit); "
                  f"see {logs}", file=sys.stderr)  # fmt: skip
        for node in nodes:
            node.close()  # SIGTERM: each node finishes or abandons its round and leaves cleanly
        return [log_records(node.log_path, "round") for node in nodes]


def summarize(
    mbit: float, per_node: List[List[Dict[str, Any]]], peers: int, most: int, private: int = 0
) -> Dict[str, Any]:
    window = common_rounds(per_node, most) if all(per_node) else range(0)
    if len(per_node) < peers or len(window) == 0:
        return {"mbit": mbit, "private": private, "error": "the nodes shared no round after warm-up (see the logs)"}
    figures = [node_figures(entries, window, peers) for entries in per_node]
    return {
        "mbit": mbit,
        "private": private,
        "nodes": len(figures),
        "rounds": min(f["rounds"] for f in figures),
        "compute_share": [f["compute_share"] for f in figures],
        "not_waiting_share": [f["not_waiting_share"] for f in figures],
        "waited_per_round": statistics.median(f["waited_per_round"] for f in figures),
        "averaging_per_round": statistics.median(f["averaging_per_round"] for f in figures),
        "steps_per_second": statistics.median(f["steps_per_second"] for f in figures),
        "full_groups": f"{sum(f['full_groups'] for f in figures)}/{sum(f['rounds'] for f in figures)}",
        "min_fraction": min(f["min_fraction"] for f in figures),
        "series": per_node,
    }


def table(rows: List[Dict[str, Any]], peers: int) -> str:
    lines = [
        "| link | nodes (behind NAT) | measured rounds | compute share (min–max) | "
        "not waiting for averaging (min–max) | "
        f"training waited s/round | averaging s/round on the network | steps/s per node | "
        f"rounds with all {peers} in the trunk group | lowest fraction averaged |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['mbit']:g} Mbit/s | ({r['private']}) | | {r['error']} | | | | | | |")
            continue
        share, free = r["compute_share"], r["not_waiting_share"]
        lines.append(
            f"| {r['mbit']:g} Mbit/s | {r['nodes']} ({r['private']}) | {r['rounds']} | "
            f"{min(share):.1%}–{max(share):.1%} | "
            f"{min(free):.1%}–{max(free):.1%} | {r['waited_per_round']:.2f} | {r['averaging_per_round']:.2f} | "
            f"{r['steps_per_second']:.2f} | {r['full_groups']} | {r['min_fraction']:.2f} |"
        )
    return "\n".join(lines)


def plot(rows: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "error" not in r]
    fig, axes = plt.subplots(1, len(rows), figsize=(6 * len(rows), 4), squeeze=False)
    for ax, r in zip(axes[0], rows, strict=True):
        for index, entries in enumerate(r["series"]):
            measured = entries[1:-1]
            ax.plot([e["round"] for e in measured], [e["averaging_seconds"] for e in measured], "o-",
                    label=f"node {index}: averaging on the network")  # fmt: skip
            ax.plot([e["round"] for e in measured], [e["waited_seconds"] for e in measured], "x--",
                    label=f"node {index}: training waited")  # fmt: skip
        ax.set_title(f"{r['mbit']:g} Mbit/s links, {r['private']} node(s) behind NAT")
        ax.set_xlabel("outer round")
        ax.set_ylabel("seconds")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--mbit", type=float, nargs="+", default=[20.0, 100.0])
    parser.add_argument("--rounds", type=int, default=10, help="rounds to measure (nodes run more)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds a swarm may take")
    parser.add_argument("--private", type=int, default=0, help="also run each rate with this many nodes behind NAT")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "utilization")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for mbit in args.mbit:
                for private in sorted({0, args.private}):
                    started = time.perf_counter()
                    per_node = run_swarm(mbit, args, Path(tmp), private)
                    rows.append(summarize(mbit, per_node, args.peers, args.rounds, private))
                    seconds = time.perf_counter() - started
                    print(f"  {mbit:g} Mbit/s swarm ({private} behind NAT) done in {seconds:.0f}s", file=sys.stderr)
    except SkipBenchmark as skip:
        print(skip)
        return
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    header = (f"Utilization: {args.peers} real nodes, default manifest, each in its own network namespace; "
              f"commit {commit.stdout.strip()}, {time.strftime('%Y-%m-%d')}\n\n")  # fmt: skip
    text = header + table(rows, args.peers) + "\n"
    (args.out / "results.md").write_text(text)
    (args.out / "rounds.json").write_text(json.dumps([{k: v for k, v in r.items()} for r in rows], indent=1))
    plot(rows, args.out / "results.png")
    print(text)


if __name__ == "__main__":
    main()
