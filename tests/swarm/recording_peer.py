"""A real node that also writes its module values after every round, for swarm tests.

Usage: python -m tests.swarm.recording_peer OUT_DIR [node start flags...]
After round r it writes OUT_DIR/round_<r>.npz (hosted modules' global copies, other modules'
model values) and
OUT_DIR/round_<r>.json (hosted modules and each module's group size). Everything
else is the production Node, unchanged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from node.faces import main as node_main
from node.runtime import Node
from node.swarm import StateServer
from protocol.wire import decode, encode


class BadDonor(StateServer):
    """A donor running modified code (COMMONS_TEST_BAD_DONOR): stalls, or lies in what it sends."""

    async def _handle(self, remote_peer: str, frame: bytes) -> bytes:
        mode = os.environ.get("COMMONS_TEST_BAD_DONOR", "")
        if mode == "stall":
            await asyncio.sleep(3600)
        reply = await super()._handle(remote_peer, frame)
        header, payload = decode(reply)
        if not payload:
            return reply
        values = np.frombuffer(payload, dtype="<f4")
        if mode == "poison":  # plausible, finite, wrong: scaled by 1000
            return encode(header, (values * 1000).astype("<f4").tobytes())
        if mode == "shape":  # half of what the header promises
            return encode(header, values[: values.size // 2].tobytes())
        return reply


class RecordingNode(Node):
    state_server_class = BadDonor if os.environ.get("COMMONS_TEST_BAD_DONOR") else StateServer

    def __init__(self, config, out_dir: Path) -> None:
        super().__init__(config)
        self.out_dir = out_dir

    def after_round(self, round_number, outcomes, steps) -> None:
        joined = self.joined
        model, states = joined.trainer.model, joined.hosting.states
        # Hosted modules: the global copy (with overlapped rounds the model holds global + the
        # local steps taken since); others: the model's values, which no round may touch.
        values = {
            m: states[m].global_flat.numpy().copy()
            if m in states
            else torch.cat([p.detach().reshape(-1).cpu() for p in model.module_parameters(m)]).numpy()
            for m in self.manifest.model.module_names()
        }
        np.savez(self.out_dir / f"round_{round_number}.npz", **values)
        info = {
            "round": round_number,
            "peer_id": joined.peer_id,
            "steps": steps,
            "hosted_during_round": sorted(o.module for o in outcomes),
            "outcomes": [dataclasses.asdict(o) for o in outcomes],
            "hashes": {m: state.params_hash() for m, state in states.items()},
        }
        (self.out_dir / f"round_{round_number}.json").write_text(json.dumps(info))


def main() -> int:
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    return node_main(["start", *sys.argv[2:]], make_node=lambda config: RecordingNode(config, out_dir))


if __name__ == "__main__":
    sys.exit(main())
