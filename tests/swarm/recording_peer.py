"""A real node that also writes its module values after every round, for swarm tests.

Usage: python -m tests.swarm.recording_peer OUT_DIR [node start flags...]
After round r it writes OUT_DIR/round_<r>.npz (every module's current values) and
OUT_DIR/round_<r>.json (hosted modules and each module's group size). Everything
else is the production Node, unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from node import cli
from node.runtime import Node


class RecordingNode(Node):
    def __init__(self, config, out_dir: Path) -> None:
        super().__init__(config)
        self.out_dir = out_dir

    def _finish_round(self, outcomes, steps, timing=None) -> None:
        round_number = self.outer_round
        super()._finish_round(outcomes, steps, timing)
        model = self.trainer.model
        values = {
            m: torch.cat([p.detach().reshape(-1).cpu() for p in model.module_parameters(m)]).numpy()
            for m in self.manifest.model.module_names()
        }
        np.savez(self.out_dir / f"round_{round_number}.npz", **values)
        info = {
            "round": round_number,
            "peer_id": self.peer_id,
            "steps": steps,
            "hosted_during_round": sorted(o.module for o in outcomes),
            "outcomes": [dataclasses.asdict(o) for o in outcomes],
        }
        (self.out_dir / f"round_{round_number}.json").write_text(json.dumps(info))


def main() -> int:
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    return cli.main(["start", *sys.argv[2:]], make_node=lambda config: RecordingNode(config, out_dir))


if __name__ == "__main__":
    sys.exit(main())
