"""Benchmark: cost of a scrape. Starts a 3-node swarm on the default manifest, then times
/metrics and /metrics/swarm on one node (median of 100 requests) and prints an excerpt.

Usage: python -m bench.scrape
"""

from __future__ import annotations

import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import List

from tests.procs import NodeProcess


def timed_get(url: str) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=10) as response:
        response.read()
    return time.perf_counter() - started


def main() -> None:
    nodes: List[NodeProcess] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for index in range(3):
                args = ["start", "--metrics-addr", "127.0.0.1:0"]
                if nodes:
                    args += ["--initial-peers", nodes[0].maddr]
                node = NodeProcess.node(args, Path(tmp) / f"n{index}", f"n{index}")
                nodes.append(node)
                node.wait_ready(120)
            time.sleep(30)  # a few rounds
            url = nodes[0].ready["metrics_url"]
            for path in (url, url + "/swarm"):
                samples = [timed_get(path) for _ in range(100)]
                print(
                    f"{path.rsplit(':', 1)[1]}: median {1000 * statistics.median(samples):.2f} ms, "
                    f"p95 {1000 * sorted(samples)[94]:.2f} ms over 100 scrapes"
                )
            with urllib.request.urlopen(url, timeout=10) as response:
                text = response.read().decode()
            print(
                "\n".join(
                    line
                    for line in text.splitlines()
                    if line.startswith("commons_") and "_created" not in line and "_bucket" not in line
                )
            )
            with urllib.request.urlopen(url + "/swarm", timeout=10) as response:
                print(response.read().decode())
        finally:
            for node in nodes:
                node.cleanup()


if __name__ == "__main__":
    main()
