"""Benchmark: how fast a newcomer downloads the trunk from 1 vs 3 donors on loopback.

Usage: python -m bench.state_download
Uses a wider manifest (trunk ~4.4 M params: 35 MB of [global copy; momentum]) and long
rounds, so the donors' state does not move during the download.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import List

from tests.procs import NodeProcess

MANIFEST = """\
name: bench-wide
model: {seq_len: 128, d_model: 512, n_layers: 4, n_heads: 8, n_experts: 4, top_k: 1, expert_hidden: 512}
training: {batch_size: 2, inner_steps: 100000, eval_batches: 1}
"""


def downloaded(node: NodeProcess) -> dict:
    (event,) = node.events("state_downloaded")
    return event


def run(donors: int, tmp: Path) -> dict:
    manifest = tmp / "wide.yaml"
    manifest.write_text(MANIFEST)
    nodes: List[NodeProcess] = []
    try:
        for index in range(donors + 1):
            args = ["start", "--manifest", str(manifest), "--metrics-addr", "127.0.0.1:0", "--log-format", "json"]
            args += ["--experts", "1" if index < donors else "0"]
            if nodes:
                args += ["--initial-peers", nodes[0].maddr]
            if index == donors:
                time.sleep(3)  # let every donor's record reach the DHT
            node = NodeProcess.node(args, tmp / f"d{donors}-{index}", f"n{index}")
            nodes.append(node)
            node.wait_ready(180)
        return downloaded(nodes[-1])
    finally:
        for node in nodes:
            node.cleanup()


def main() -> None:
    print("| donors | MB | seconds | MB/s |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for donors in (1, 3):
            event = run(donors, Path(tmp))
            mb = event["bytes"] / 1e6
            print(f"| {donors} | {mb:.1f} | {event['seconds']:.2f} | {mb / event['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
