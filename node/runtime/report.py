"""What a finished round looks like in the logs and in a node's history (plain data)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

logger = logging.getLogger("node")

RoundSummary = Dict[str, Any]  # one finished round as plain data (round_summary): a history entry, a log line


@dataclass(frozen=True)
class ModuleOutcome:
    """How one module's averaging round went, as the node reports and counts it."""

    module: str
    group_size: int
    averaged_fraction: float
    resync: bool
    seconds: float
    result: str  # ok | partial | failed
    dropped: int = 0
    numel: int = 0


def classify(group_size: int, fraction: float, expected_others: int) -> str:
    """ok: averaged in full, or nobody else hosts the module; partial: some of it; failed: none of it."""
    if group_size == 1:
        return "ok" if expected_others == 0 else "failed"
    if fraction >= 1.0:
        return "ok"
    return "partial" if fraction > 0 else "failed"



def round_summary(
    round_number: int,
    steps: int,
    loss: Optional[float],
    eval_loss: Optional[float],
    outcomes: List[ModuleOutcome],
    timing: Optional[Dict[str, Any]] = None,
) -> RoundSummary:
    """One round as plain data: also the fields of its JSON log line (event "round").

    ``eval_loss`` is None on a round whose held-out split was not scored (see EvalCadence).
    """
    trunk = next(o for o in outcomes if o.module == "trunk")
    return {
        "event": "round",
        "round": round_number,
        "steps": steps,
        "loss": loss,
        "eval_loss": eval_loss,
        "trunk_group": trunk.group_size,
        "trunk_fraction": trunk.averaged_fraction,
        "trunk_resync": trunk.resync,
        "trunk_result": trunk.result,
        "trunk_seconds": round(trunk.seconds, 3),
        **(timing or {}),
        "expert_groups": [o.group_size for o in outcomes if o.module != "trunk"],
    }


def log_round(summary: RoundSummary, outcomes: List[ModuleOutcome]) -> None:
    """One line per round at INFO; one per module (INFO when not fully averaged, else DEBUG)."""
    for outcome in outcomes:
        logger.log(
            logging.DEBUG if outcome.result == "ok" else logging.INFO,
            "round %d: %s %s (group %d, %.0f%% averaged, %d dropped, %.2fs)",
            summary["round"],
            outcome.module,
            outcome.result,
            outcome.group_size,
            100 * outcome.averaged_fraction,
            outcome.dropped,
            outcome.seconds,
            extra={
                "event": "module_round",
                "round": summary["round"],
                "module_name": outcome.module,
                "result": outcome.result,
                "group_size": outcome.group_size,
                "fraction": outcome.averaged_fraction,
            },
        )
    eval_loss = summary["eval_loss"]
    logger.info(
        "round %d: %d steps, loss %.3f, eval %s, trunk group %d (%.0f%% averaged%s, %.2fs), expert groups %s",
        summary["round"],
        summary["steps"],
        summary["loss"] if summary["loss"] is not None else float("nan"),
        f"{eval_loss:.3f}" if eval_loss is not None else "-",
        summary["trunk_group"],
        100 * summary["trunk_fraction"],
        ", resync" if summary["trunk_resync"] else "",
        summary["trunk_seconds"],
        summary["expert_groups"],
        extra=summary,
    )
