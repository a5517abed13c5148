"""The swarm page's data (/status.json) from a swarm view and a round history, and the page's own safety rules.

The page itself runs in a real browser in tests/e2e/test_page.py; here, without sockets: the JSON's shape,
what a hostile peer record turns into (the same text, bounded; the page renders it with textContent), and
a static check that the page never parses text as HTML and loads nothing from elsewhere.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from node.ops.endpoints import swarm_page
from node.ops.metrics import NodeMetrics
from node.runtime.report import ModuleOutcome, classify, round_summary
from node.runtime.status_page import MAX_ROUNDS, MAX_TEXT, SCHEMA, outcome_counts, page_status
from node.swarm.membership import SwarmView
from protocol.records import PeerRecord

PAGE = Path(__file__).resolve().parents[2] / "node" / "ops" / "page.html"
MODULES = ["trunk", "expert.0.0", "expert.0.1", "expert.1.0"]
HOSTILE = '<img src=x onerror="alert(1)">'


def _view() -> SwarmView:
    view = SwarmView(rejected_records=2)
    view.peers["me"] = PeerRecord(peer_id="me", modules=["trunk", "expert.0.1"], outer_round=3, local_steps=30,
                                  loss=2.5, samples_per_second=40.0)  # fmt: skip
    view.peers[HOSTILE] = PeerRecord(peer_id=HOSTILE, modules=["trunk", "expert.0.1", "expert.9.9"], outer_round=2,
                                     local_steps=20, device="<b>" + "x" * 200, version="</script>")  # fmt: skip
    view.seen_at.update({"me": 1000.0, HOSTILE: 990.0})
    return view


def _history(rounds: int) -> list:
    history = []
    for r in range(rounds):
        group, fraction = (1 if r == 0 else 2), (1.0 if r != 2 else 0.5)
        result = classify(group, fraction, expected_others=group - 1)  # alone only when nobody else hosts it
        trunk = ModuleOutcome("trunk", group, fraction, r == 1, 0.1, result, numel=10)
        expert = ModuleOutcome("expert.0.1", 2, 1.0, False, 0.1, "ok", numel=5)
        loss = float("nan") if r == 3 else 3.0 - 0.1 * r
        history.append(round_summary(r, 10, loss, 3.1 if r % 2 == 0 else None, [trunk, expert],
                                     {"averaging_seconds": 0.2, "waited_seconds": 0.05}))  # fmt: skip
    return history


def _me() -> dict:
    return {"peer_id": "me", "swarm_id": "abc", "manifest": "tiny", "version": "0.1.0", "device": "cpu",
            "outer_round": 4, "rounds_done": 4, "local_steps": 40, "loss": float("inf"), "eval_loss": 3.1,
            "samples_per_second": 40.0, "modules": ["trunk", "expert.0.1"], "ready": True}  # fmt: skip


def test_the_page_data_has_its_documented_shape() -> None:
    status = page_status(_me(), _view(), MODULES, _history(4), (True, {"status": "ok"}), {}, now=1001.0)
    json.dumps(status, allow_nan=False)  # plain, finite data: a browser's JSON.parse takes it
    assert set(status) == {"schema", "time", "node", "peers", "peers_total", "rejected_records", "modules",
                           "uncovered", "expert_capacity", "uncovered_beyond_capacity", "rounds",
                           "averaging"}  # fmt: skip
    assert status["schema"] == SCHEMA and status["time"] == 1001.0
    me = status["node"]
    assert me["peer_id"] == "me" and me["healthy"] is True and me["health"] == "ok"
    assert me["loss"] is None and me["eval_loss"] == 3.1  # inf is no number JSON knows
    assert [p["peer_id"] for p in status["peers"]] == ["me", HOSTILE]  # this node first
    first, other = status["peers"]
    assert first["me"] and not other["me"]
    assert first["age_seconds"] == 1.0 and other["age_seconds"] == 11.0
    assert status["peers_total"] == 2 and status["rejected_records"] == 2


def test_every_module_of_the_manifest_is_listed_with_its_hosts() -> None:
    status = page_status(_me(), _view(), MODULES, [], (True, {"status": "ok"}), {})
    modules = {m["module"]: m for m in status["modules"]}
    assert list(modules) == MODULES  # the manifest's order; expert.9.9 (not in it) is left out
    assert modules["trunk"] == {"module": "trunk", "replicas": 2, "hosts": sorted(["me", HOSTILE])}
    assert modules["expert.0.1"]["replicas"] == 2
    assert modules["expert.0.0"] == {"module": "expert.0.0", "replicas": 0, "hosts": []}  # nobody hosts it
    assert status["uncovered"] == 2 and status["expert_capacity"] == 2  # expert.9.9 is no module of ours
    assert status["uncovered_beyond_capacity"] == 1  # two expert hosts, three experts: one could be hosted


def test_peer_written_text_stays_text_and_is_bounded() -> None:
    """The JSON carries what a peer wrote as it was (the page puts it in textContent), cut to MAX_TEXT."""
    status = page_status(_me(), _view(), MODULES, [], (False, {"reason": "leaving the swarm"}), {})
    other = status["peers"][1]
    assert other["peer_id"] == HOSTILE and other["version"] == "</script>"
    assert other["device"] == ("<b>" + "x" * 200)[:MAX_TEXT]
    assert status["node"]["healthy"] is False and status["node"]["health"] == "leaving the swarm"


def test_rounds_are_the_history_trimmed_with_the_trunk_result() -> None:
    status = page_status(_me(), _view(), MODULES, _history(4), (True, {}), {})
    rounds = status["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert [r["trunk_result"] for r in rounds] == ["alone", "ok", "partial", "ok"]
    assert rounds[1]["trunk_resync"] is True and rounds[1]["expert_groups"] == [2]
    assert rounds[3]["loss"] is None and rounds[2]["eval_loss"] == 3.1 and rounds[1]["eval_loss"] is None
    assert rounds[0]["averaging_seconds"] == 0.2 and "trunk_seconds" not in rounds[0]
    long = page_status(_me(), _view(), MODULES, _history(MAX_ROUNDS + 3), (True, {}), {})["rounds"]
    assert len(long) == MAX_ROUNDS and long[-1]["round"] == MAX_ROUNDS + 2


def test_outcome_counts_read_the_metrics_counter() -> None:
    metrics = NodeMetrics(CollectorRegistry(), version="0", protocol_version=2)
    metrics.observe_round([ModuleOutcome("trunk", 2, 1.0, False, 0.1, "ok", numel=1),
                           ModuleOutcome("expert.0.1", 1, 0.0, False, 0.1, "failed", numel=1)])  # fmt: skip
    counts = outcome_counts(metrics.rounds.collect())
    assert counts["trunk"] == {"ok": 1.0, "partial": 0.0, "failed": 0.0}
    assert counts["expert"] == {"ok": 0.0, "partial": 0.0, "failed": 1.0}
    status = page_status(_me(), _view(), MODULES, [], (True, {}), counts)
    assert status["averaging"] == {"trunk": {"ok": 1, "partial": 0, "failed": 0},
                                   "expert": {"ok": 0, "partial": 0, "failed": 1}}  # fmt: skip


def test_the_page_parses_no_text_as_html_and_loads_nothing_from_elsewhere() -> None:
    html = PAGE.read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in html, sink
    assert not re.search(r"(src|href)\s*=|url\(|@import|https?://(?!www\.w3\.org/2000/svg)", html)
    assert 'fetch("status.json"' in html


def test_the_page_policy_allows_its_own_script_only() -> None:
    body, policy = swarm_page()
    script = re.search(rb"<script>(.*?)</script>", body, flags=re.DOTALL)
    assert script is not None
    digest = base64.b64encode(hashlib.sha256(script.group(1)).digest()).decode()
    assert f"script-src 'sha256-{digest}';" in policy
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "unsafe-eval" not in policy
    assert body.startswith(b"<!doctype html>")
