"""A real peer that runs only the averaging layer (DHT, p2pd, matchmaking, all-reduce), driven over stdin.

Usage: python -m tests.swarm.averaging_peer --host-maddrs MADDR [--initial-peers MADDR ...]
       [--compression none|fp16|int8|sparse] [--aggregator centered_clip|mean] [--attack MODE] [--out DIR]
       [--part-timeout SECONDS] [--message-ask BYTES] [--log-level LEVEL]

Prints JSON lines: first {"event": "ready", "peer_id", "maddrs"}, then one reply per command.
Commands (one JSON object per line on stdin):
  {"cmd": "average", "round": R, "numel": N, "seed": S, "expected": [...], "attack": MODE?, "message_ask": B?}
      averages make_vector(R, S, N) with the group; replies {"event": "averaged", ...}; with --out,
      the result is saved as DIR/result_<R>.npy
  {"cmd": "train", "rounds": R, "inner_steps": H, "seed": S, "expected": [...], "attack": MODE?,
   "aggregator": "centered_clip"|"mean"} -> DiLoCo on a small least-squares task; replies {"event": "trained", ...}
  {"cmd": "resync", "round": R, "numel": N, "seed": S, "expected": [...], "diverge": [[lo, hi], ...]}
      one re-sync round (see Peer.resync); replies {"event": "resynced", "hash", "fraction", ...}
  {"cmd": "quit"}
An attacker is this same program running modified averaging code (tests/attacks.py: ``Attacker``):
see ATTACKS. The production Averager, Matchmaker and Swarm are used unchanged otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from node.averaging.matchmaking import Matchmaker
from node.net import HivemindSwarm as Swarm
from node.ops.procs import helper_totals
from node.runtime.rounds import leave_unstepped, majority_check
from node.training.diloco import ModuleState
from protocol.manifest import AveragingSpec, OuterOptimizerSpec
from tests.attacks import ATTACKS, Attacker, make_vector

SWARM_ID = "a" * 16
SPEC = AveragingSpec(gather_seconds=1.0, part_timeout_seconds=5.0, round_timeout_seconds=30.0)
TASK_DIM = 256
def cpu_seconds() -> dict:
    """CPU time so far of this process ("peer") and its descendants: hivemind's DHT process and p2pd."""
    helpers = helper_totals(os.getpid())
    return {"peer": time.process_time(), **{name: stat.cpu_seconds for name, stat in helpers.items()}}


class Peer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.spec = dataclasses.replace(
            SPEC,
            compression=args.compression,
            aggregator=args.aggregator,
            part_timeout_seconds=args.part_timeout,
            chunk_elements=args.chunk_elements,
            round_timeout_seconds=max(SPEC.round_timeout_seconds, 4 * args.part_timeout),
        )
        # --send-only: a peer behind NAT, as a node that found itself private runs: a DHT client, reducing nothing.
        self.swarm = Swarm.open(initial_peers=args.initial_peers, host_maddrs=args.host_maddrs,
                                client_mode=args.send_only)  # fmt: skip
        self.averager = Attacker(self.swarm, SWARM_ID, hosted=lambda: {"trunk"}, spec=self.spec)
        self.default_attack = args.attack
        self.default_ask: Optional[int] = args.message_ask
        self.matchmaker = Matchmaker(
            self.swarm, SWARM_ID, self.spec.gather_seconds, smallest_message=self.spec.message_bytes,
            reduces=not args.send_only,
        )
        self.swarm.run(self.averager.start())
        self.out = Path(args.out) if args.out else None

    def _ask(self, command: dict) -> Optional[int]:
        """The message size to post: the command's or --message-ask (0: ask nothing, as an older peer),
        else what the Averager measured, as a node posts."""
        ask = command.get("message_ask", self.default_ask)
        return self.averager.message_ask("trunk") if ask is None else (ask or None)

    def _round(
        self, round_number: int, vector: np.ndarray, expected: List[str], state: Optional[ModuleState] = None,
        ask: Optional[int] = None,
    ):  # fmt: skip
        """Form the group and all-reduce, as a node does; with ``state``, re-sync diverged global copies."""

        async def run():
            others = [p for p in expected if p != self.swarm.peer_id]
            params_hash = state.params_hash() if state is not None else "0" * 32
            expiry = self.spec.round_timeout_seconds
            group = await self.matchmaker.form_group(
                "trunk", round_number, params_hash, vector.size, others, expiry, message_bytes=ask
            )
            if state is not None and group.needs_resync:
                payload = state.payload(True, torch.from_numpy(vector))
                verify = majority_check(group.params_hashes, vector.size, self.averager._spec.aggregator)
                result = await self.averager.all_reduce(
                    group, payload, regions=[vector.size] * 3, compress=False, verify=verify
                )
            else:
                result = await self.averager.all_reduce(group, vector)
            if state is not None:  # as node/runtime/rounds.py: a slice nobody averaged is not stepped
                leave_unstepped(result, vector.size)
            return group, result

        return self.swarm.run(run(), timeout=120)

    def average(self, command: dict) -> dict:
        self.averager.attack = command.get("attack", self.default_attack)
        vector = make_vector(command["round"], command["seed"], command["numel"])
        cpu_before = cpu_seconds()
        ask = self._ask(command)
        group, result = self._round(command["round"], vector, command["expected"], ask=ask)
        cpu = {name: seconds - cpu_before.get(name, 0.0) for name, seconds in cpu_seconds().items()}
        if self.out is not None:
            np.save(self.out / f"result_{command['round']}.npy", result.vector)
        return {
            "event": "averaged",
            "round": command["round"],
            "seconds": result.seconds,
            "ended_at": time.time(),  # wall clock: with "seconds", when this peer's all-reduce started and ended
            "fraction": result.averaged_fraction,
            "group_size": len(group.members),
            "group_id": group.group_id,
            "asked": ask,  # the message size this peer posted
            "message_bytes": group.message_bytes or self.spec.message_bytes,  # what the group agreed on
            "contributors": list(result.contributors),
            "dropped": list(result.dropped),
            "rejected": dict(self.averager.stats.parts_rejected),
            "cpu": cpu,  # seconds over matchmaking and the all-reduce, by process: peer, dht, p2pd
        }

    def resync(self, command: dict) -> dict:
        """One re-sync round of a module whose global copy is make_vector(R, 0, N) on every peer, except
        in the ``diverge`` ranges of the parameters where this peer's copy is its own; replies with the
        state hash after the outer step."""
        self.averager.attack = command.get("attack", self.default_attack)
        round_number, numel = command["round"], command["numel"]
        weight = torch.nn.Parameter(torch.zeros(numel))
        state = ModuleState("trunk", [weight], OuterOptimizerSpec(lr=0.7, momentum=0.9))
        state.global_flat = torch.from_numpy(make_vector(round_number, 0, numel))
        state.momentum = torch.from_numpy(0.1 * make_vector(round_number, 1, numel))
        for lo, hi in command.get("diverge", []):
            state.global_flat[lo:hi] = torch.from_numpy(make_vector(round_number, 100 + command["seed"], hi - lo))
        state.load_global()
        delta = 0.01 * make_vector(round_number, command["seed"], numel)
        group, result = self._round(round_number, delta, command["expected"], state, self._ask(command))
        state.apply(result.vector, resync=result.vector.size != delta.size)
        return {"event": "resynced", "round": round_number, "fraction": result.averaged_fraction,
                "group_size": len(group.members), "resync": group.needs_resync, "hash": state.params_hash(),
                "rejected": dict(self.averager.stats.parts_rejected)}  # fmt: skip

    def train(self, command: dict) -> dict:
        """DiLoCo on least squares: each peer its own samples of one linear model, a shared test set."""
        self.averager.attack = command.get("attack", self.default_attack)
        self.averager._spec = dataclasses.replace(self.spec, aggregator=command.get("aggregator", "centered_clip"))
        truth = np.random.default_rng(7).standard_normal(TASK_DIM).astype(np.float32)
        rng = np.random.default_rng(command["seed"])
        test_x = torch.from_numpy(np.random.default_rng(8).standard_normal((512, TASK_DIM)).astype(np.float32))
        test_noise = torch.from_numpy(np.random.default_rng(9).standard_normal(512).astype(np.float32))
        test_y = test_x @ torch.from_numpy(truth) + 0.5 * test_noise  # the best achievable loss is ~0.25
        weight = torch.nn.Parameter(torch.zeros(TASK_DIM))
        state = ModuleState("trunk", [weight], OuterOptimizerSpec(lr=0.7, momentum=0.9))
        inner = torch.optim.SGD([weight], lr=0.05)
        losses: List[float] = []
        fractions: List[float] = []
        sizes: List[int] = []
        deviation: List[float] = []  # ||averaged - own|| / ||own|| per round
        seconds: List[float] = []
        for round_number in range(command["rounds"]):
            for _ in range(command["inner_steps"]):
                x = torch.from_numpy(rng.standard_normal((256, TASK_DIM)).astype(np.float32))
                noise = torch.from_numpy(rng.standard_normal(256).astype(np.float32))
                y = x @ torch.from_numpy(truth) + 0.5 * noise
                inner.zero_grad()
                torch.mean((x @ weight - y) ** 2).backward()
                inner.step()
            base = command.get("round_base", 0)
            delta = state.pseudo_gradient().numpy()
            group, result = self._round(base + round_number, delta, command["expected"], state)
            resync = result.vector.size != delta.size
            moved = np.linalg.norm(result.vector[: delta.size] - delta) / np.linalg.norm(delta)
            deviation.append(round(float(moved), 3))
            sizes.append(len(group.members))
            seconds.append(round(result.seconds, 3))
            state.apply(result.vector, resync=resync)
            fractions.append(result.averaged_fraction)
            with torch.no_grad():
                losses.append(float(torch.mean((test_x @ weight - test_y) ** 2)))
        return {
            "event": "trained",
            "losses": losses,
            "fractions": fractions,
            "group_sizes": sizes,
            "seconds": seconds,
            "deviation": deviation,
            "rejected": dict(self.averager.stats.parts_rejected),
        }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host-maddrs", nargs="+", default=["/ip4/127.0.0.1/tcp/0"])
    parser.add_argument("--initial-peers", nargs="*", default=[])
    parser.add_argument("--compression", default="none", choices=["none", "fp16", "int8", "sparse"])
    parser.add_argument("--aggregator", default="centered_clip", choices=["centered_clip", "mean"])
    parser.add_argument("--attack", default="none", choices=ATTACKS)
    parser.add_argument("--out", default="")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--chunk-elements", type=int, default=SPEC.chunk_elements, help="values per chunk")
    parser.add_argument("--part-timeout", type=float, default=SPEC.part_timeout_seconds, help="slow links: longer")
    parser.add_argument("--message-ask", type=int, default=None, help="message bytes to post (0: none)")
    parser.add_argument("--send-only", action="store_true", help="behind NAT: reduce no slice, DHT client")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("node").setLevel(args.log_level)
    peer = Peer(args)
    emit({"event": "ready", "peer_id": peer.swarm.peer_id, "maddrs": peer.swarm.visible_maddrs()})
    try:
        for line in sys.stdin:
            command = json.loads(line)
            if command["cmd"] == "quit":
                break
            started = time.monotonic()
            reply = {"average": peer.average, "resync": peer.resync, "train": peer.train}[command["cmd"]](command)
            emit({**reply, "wall_seconds": time.monotonic() - started})
    finally:
        peer.swarm.close()
    return 0


def emit(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
