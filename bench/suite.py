"""The whole benchmark suite, one item after another, into one output directory.

Usage (root, for the network namespaces): python -m bench.suite [--out bench-results] [--only NAME ...]
Runs each item in its own process (so one failing item does not stop the others), each writing its
Markdown table and PNG plots into ``--out/<item>/``, then writes ``--out/README.md``: the machine, the
date, the commit and every item's table, with its exit status and duration. Items run one at a time:
they measure throughput, and two at once on a small machine would measure each other.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

from tests.procs import REPO

ITEMS: Dict[str, List[str]] = {  # name -> module and arguments; each also gets --out <dir>/<name>
    "wan": ["bench.wan_averaging"],
    "utilization": ["bench.utilization"],
    "convergence": ["bench.convergence"],
    "overhead": ["bench.overhead"],
    "scale": ["bench.scale"],
    "transport": ["bench.transport"],
}
TITLES = {
    "wan": "1. Averaging round: 4 peers, 40 MB fp32, 100 Mbit/s",
    "utilization": "2. Utilization: a 4-node swarm on the default manifest over 20 and 100 Mbit/s links",
    "convergence": "3. Convergence parity: one node, 4 DiLoCo nodes, 4-process DDP (gloo)",
    "overhead": "4. Node overhead: a node's steps/s vs a plain PyTorch loop",
    "scale": "5. Scale: many nodes on loopback",
    "transport": "6. Transport: p2pd stream vs a Commons averaging round on loopback",
}


def machine() -> str:
    import hivemind
    import torch

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    return (f"{os.cpu_count()} CPU cores, {memory:.0f} GiB, GPU: {gpu}; Linux {platform.release()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}, hivemind {hivemind.__version__}; commit "
            f"{commit.stdout.strip()}; {time.strftime('%Y-%m-%d %H:%M')}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench-results")
    parser.add_argument("--only", nargs="+", choices=list(ITEMS), default=list(ITEMS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sections = [f"# Commons benchmark suite\n\n{machine()}\n"]
    for name in args.only:
        out = args.out / name
        started = time.perf_counter()
        print(f"== {TITLES[name]}", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, "-m", *ITEMS[name], "--out", str(out)], cwd=REPO)
        minutes = (time.perf_counter() - started) / 60
        results = out / "results.md"
        body = results.read_text() if results.exists() else "(no results written; see the output above)\n"
        plots = "".join(f"\n![{p.stem}]({name}/{p.name})\n" for p in sorted(out.glob("*.png")))
        sections.append(f"## {TITLES[name]}\n\nexit status {done.returncode}, {minutes:.1f} min\n\n{body}{plots}")
        (args.out / "README.md").write_text("\n".join(sections))
    print(f"wrote {args.out / 'README.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
