"""A module whose round expected peers but averaged with none does not step (node/runtime/rounds.py).

The production RoundAverager, Matchmaker and Averager on an in-process network in virtual time; the membership
says another peer hosts the module, but that peer never joins a group. The module's parameters keep their local
progress (its next pseudo-gradient holds it), its error feedback is taken back, and after UNSTEPPED_ROUNDS such
rounds in a row it steps alone, as a lone node does.
"""

from __future__ import annotations

import dataclasses
import types
from typing import List, Optional

import numpy as np
import torch

from node.averaging import Averager, Matchmaker
from node.net import InProcessNetwork, VirtualClock, run_virtual
from node.runtime.rounds import UNSTEPPED_ROUNDS, Averaged, RoundAverager, apply, prepare
from node.training import ModuleState
from protocol.manifest import AveragingSpec, OuterOptimizerSpec

SWARM_ID = "c" * 16
SPEC = AveragingSpec(gather_seconds=1.0, part_timeout_seconds=5.0, round_timeout_seconds=30.0, compression="sparse")


class View:
    """The membership's view: ``peer-b`` hosts every module and is seen ready, but never posts."""

    seen_at: dict = {}  # noqa: RUF012

    def hosts_of(self, module: str, exclude: Optional[str] = None, round_number: Optional[int] = None) -> List[str]:
        return ["peer-b"]


def rounds_of_a_peer_nobody_joins(count: int) -> List[Averaged]:
    clock = VirtualClock()
    network = InProcessNetwork(clock=clock.wall)
    params = [torch.nn.Parameter(torch.zeros(5000))]
    state = ModuleState("trunk", params, OuterOptimizerSpec(lr=0.7, momentum=0.9))
    out: List[Averaged] = []

    async def main() -> None:
        port = network.join("peer-a")
        averager = Averager(port, SWARM_ID, hosted=lambda: {"trunk"}, spec=SPEC, clock=clock.monotonic)
        await averager.start()
        matchmaker = Matchmaker(port, SWARM_ID, SPEC.gather_seconds, smallest_message=SPEC.message_bytes)
        membership = types.SimpleNamespace(view=View())
        rounds = RoundAverager("peer-a", matchmaker, averager, membership, SPEC)  # type: ignore[arg-type]
        try:
            for round_number in range(count):
                with torch.no_grad():
                    params[0].sub_(0.01)  # this round's local steps
                before = params[0].detach().clone()
                global_before, momentum_before = state.global_flat.clone(), state.momentum.clone()
                prepared = prepare({"trunk": state})
                (averaged,) = await rounds.average(prepared, round_number)
                apply(types.SimpleNamespace(prepared=prepared), [averaged], overlap=False)  # type: ignore[arg-type]
                if not averaged.step:  # the parameters keep every local step, the global copy stands
                    torch.testing.assert_close(params[0].detach(), before)
                    assert torch.equal(state.global_flat, global_before)
                    assert torch.equal(state.momentum, momentum_before)
                    assert averager.memory("trunk").residual is None  # nothing owed: nothing was ever applied
                out.append(averaged)
        finally:
            await network.close()

    run_virtual(main(), clock=clock)
    return out


def test_rounds_that_average_with_nobody_do_not_step_until_the_limit_then_step_alone() -> None:
    rounds = rounds_of_a_peer_nobody_joins(UNSTEPPED_ROUNDS + 2)
    assert [r.step for r in rounds] == [False] * UNSTEPPED_ROUNDS + [True, False]
    assert all(r.outcome.result == "failed" for r in rounds)
    stepped = rounds[UNSTEPPED_ROUNDS]
    # it stepped on its own whole pseudo-gradient: every local step of the rounds it did not step
    np.testing.assert_allclose(stepped.vector, np.full(5000, 0.01 * (UNSTEPPED_ROUNDS + 1)), rtol=1e-5)


def test_a_lone_node_steps_every_round() -> None:
    """Nobody else hosts the module: a swarm of one trains as DiLoCo alone (the rule is for expected peers)."""
    clock = VirtualClock()
    network = InProcessNetwork(clock=clock.wall)

    async def main() -> List[Averaged]:
        port = network.join("peer-a")
        averager = Averager(port, SWARM_ID, hosted=lambda: {"trunk"}, spec=SPEC, clock=clock.monotonic)
        matchmaker = Matchmaker(port, SWARM_ID, SPEC.gather_seconds, smallest_message=SPEC.message_bytes)
        view = dataclasses.make_dataclass("Alone", [])()
        view.hosts_of = lambda *a, **k: []  # type: ignore[attr-defined]
        view.seen_at = {}  # type: ignore[attr-defined]
        rounds = RoundAverager("peer-a", matchmaker, averager, types.SimpleNamespace(view=view), SPEC)  # type: ignore[arg-type]
        state = ModuleState("trunk", [torch.nn.Parameter(torch.ones(10))], OuterOptimizerSpec())
        try:
            return [(await rounds.average(prepare({"trunk": state}), r))[0] for r in range(3)]
        finally:
            await network.close()

    assert all(r.step and r.outcome.result == "ok" for r in run_virtual(main(), clock=clock))
