"""The corruption table: one averaging round per attack class, 3 honest peers + 1 attacker on loopback.

Usage: python -m bench.corruption [--numel 1000000]
For each class: what the honest peers counted, the fraction they averaged, whether their result
equals the honest aggregate, and the round time next to a clean round's. Not a test.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from tests.swarm import test_robust_averaging as t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--numel", type=int, default=t.NUMEL)
    args = parser.parse_args()
    t.NUMEL = args.numel
    swarm = t.AveragingSwarm(Path(tempfile.mkdtemp(prefix="commons-corruption-")), 4, t.CHUNKED)
    rows = ["| class | counter moved | honest fraction | = honest aggregate | round s | clean round s |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    try:
        rounds = iter(range(1000))
        for _ in range(2):
            swarm.average(next(rounds), {})
        for attack, reason in t.CLASSES.items():
            clean = swarm.average(next(rounds), {})
            before = [c["rejected"].get(reason, 0) for c in clean]
            r = next(rounds)
            replies = swarm.average(r, {t.ATTACKER: attack})
            if attack == "lying_reducer":  # its parts were honest and count in honest reducers' slices
                expected = t.failed_reducer_aggregate(swarm, r)
            else:
                expected = t.honest_aggregate(r, t.HONEST)
            equal = all(np.allclose(swarm.result(i, r), expected, rtol=0, atol=1e-4) for i in t.HONEST)
            moved = sum(replies[i]["rejected"].get(reason, 0) - before[i] for i in t.HONEST)
            fraction = min(replies[i]["fraction"] for i in t.HONEST)
            took = max(replies[i]["seconds"] for i in t.HONEST)
            clean_took = max(c["seconds"] for c in clean)
            rows.append(f"| {attack} | {reason} +{moved} | {fraction:.2f} | {'yes' if equal else 'NO'} | "
                        f"{took:.2f} | {clean_took:.2f} |")  # fmt: skip
    finally:
        swarm.close()
    print(f"{t.NUMEL} float32 per peer, 4 peers on loopback\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
