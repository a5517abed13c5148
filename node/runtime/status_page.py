"""What the swarm page (``/`` and ``/status.json`` of the metrics server) shows, as plain JSON-safe data.

Built from what the metrics and `node status` read: this node's progress, the swarm view (peer records,
which come from the network), the manifest's modules and the round history. A pure function of those,
so a unit test builds it without sockets; the HTTP thread calls it on every poll of ``/status.json``.

Bounds: peers are capped at ``MAX_PEERS`` (the swarm view is not), free-text fields a peer wrote at
``MAX_TEXT`` characters, the round history at the last ``MAX_ROUNDS`` rounds. Non-finite numbers become
null (JSON has no NaN, and a browser's JSON.parse refuses it). The page renders every string with
``textContent``: nothing here is escaped for HTML, and nothing needs to be.
"""

from __future__ import annotations

import math
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from prometheus_client.core import Metric

from node.ops import module_coverage
from node.runtime.report import RoundSummary
from node.swarm import SwarmView

SCHEMA = 1  # bump when a field of the JSON changes meaning or goes away
MAX_PEERS = 256
MAX_TEXT = 64
MAX_ROUNDS = 500
RESULTS = ("ok", "partial", "failed")


def page_status(
    node: Mapping[str, Any],
    view: SwarmView,
    module_names: Sequence[str],
    history: Sequence[RoundSummary],
    health: Tuple[bool, Mapping[str, object]],
    averaging: Mapping[str, Mapping[str, float]],
    now: Optional[float] = None,
) -> Dict[str, Any]:
    """The ``/status.json`` document.

    ``node``: this node's own fields (peer_id, swarm_id, manifest, version, device, outer_round, rounds_done,
    local_steps, loss, eval_loss, samples_per_second, modules, ready); ``health``: ``Health.check()``;
    ``averaging``: module rounds so far by module kind and result (``{"trunk": {"ok": 3, ...}, ...}``).
    """
    now = time.time() if now is None else now
    healthy, details = health
    me = dict(node, healthy=healthy, health=str(details.get("reason") or details.get("status") or ""))
    return {
        "schema": SCHEMA,
        "time": now,
        "node": _clean(me),
        "peers": _peers(view, str(node.get("peer_id")), now),
        "peers_total": len(view.peers),
        "rejected_records": view.rejected_records,
        **_coverage(view, module_names),
        "rounds": [_round(summary) for summary in list(history)[-MAX_ROUNDS:]],
        "averaging": {kind: {r: int(counts.get(r, 0)) for r in RESULTS} for kind, counts in averaging.items()},
    }


def outcome_counts(families: Iterable[Metric]) -> Dict[str, Dict[str, float]]:
    """``{module_kind: {result: rounds}}`` from the families of the ``commons_averaging_rounds`` counter."""
    counts: Dict[str, Dict[str, float]] = {}
    for family in families:
        for sample in family.samples:
            if sample.name.endswith("_total"):
                counts.setdefault(sample.labels["module_kind"], {})[sample.labels["result"]] = sample.value
    return counts


def _peers(view: SwarmView, me: str, now: float) -> List[Dict[str, Any]]:
    """Every peer's record (this node first), newest knowledge the view has; ``age_seconds`` since it was stored."""
    ordered = sorted(view.peers.items(), key=lambda item: (item[0] != me, item[0]))[:MAX_PEERS]
    return [
        _clean({
            "peer_id": peer_id,
            "me": peer_id == me,
            "modules": list(record.modules),
            "outer_round": record.outer_round,
            "local_steps": record.local_steps,
            "loss": record.loss,
            "samples_per_second": record.samples_per_second,
            "age_seconds": max(0.0, round(now - view.seen_at.get(peer_id, now), 1)),
            "device": record.device[:MAX_TEXT],
            "version": record.version[:MAX_TEXT],
            "data": record.data,
        })
        for peer_id, record in ordered
    ]  # fmt: skip


def _coverage(view: SwarmView, module_names: Sequence[str]) -> Dict[str, Any]:
    """Every module of the manifest, in its order, with its hosts (a module nobody hosts has none); replica
    counts as the swarm view's metrics and `node status` count them (node.ops.module_coverage)."""
    coverage = module_coverage(view.peers.values(), module_names)
    modules = [{"module": m, "replicas": n, "hosts": view.hosts_of(m)} for m, n in coverage.replicas.items()]
    return {"modules": modules, "uncovered": coverage.uncovered, "expert_capacity": coverage.expert_capacity,
            "uncovered_beyond_capacity": coverage.uncovered_beyond_capacity}  # fmt: skip


def _round(summary: RoundSummary) -> Dict[str, Any]:
    """A round's summary, trimmed to what the page draws; ``trunk_result`` is the trunk's outcome (report.py:
    classify), "alone" where nobody else hosts it."""
    result = "alone" if summary["trunk_group"] <= 1 and summary["trunk_result"] == "ok" else summary["trunk_result"]
    keys = ("round", "steps", "loss", "eval_loss", "trunk_group", "trunk_fraction", "trunk_resync", "expert_groups",
            "averaging_seconds", "waited_seconds")  # fmt: skip
    return _clean({**{k: summary.get(k) for k in keys}, "trunk_result": result})


def _clean(entry: Mapping[str, Any]) -> Dict[str, Any]:
    """Non-finite floats (a diverged loss) as None: JSON has no NaN."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in entry.items()}
