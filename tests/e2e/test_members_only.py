"""End to end: a members-only swarm of three real `node start` processes, and outsiders.

Outsiders (no invite, an expired invite, an invite forged with another key, a revoked one) try the hello, DHT
writes and reads, an averaging join and a state download against a member, with the node's own classes: every
request is refused and counted by reason on the member's side, the outsider never appears in a group or in
`node status`, and `node start` / `node status` give it one line and exit code 7. A member revoked while it runs
(`node revoke --initial-peers`) and one whose invite expires while it runs are dropped from groups and stop with
exit code 7 within the stated time (node/swarm/invites.py: a poll every 10 s).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

from node.faces import members
from node.net import Admission, HivemindSwarm, Refused, read_identity
from node.swarm import ask
from protocol import handlers
from protocol.contributions import Vouch
from protocol.manifest import load_manifest
from protocol.records import PeerRecord, contributions_key, peers_key, ready_key
from tests.procs import NodeProcess, child_env, http_get, write_text_corpus, write_tiny_manifest

pytestmark = pytest.mark.e2e

EXPIRES_AFTER = 70  # seconds from the invites' making to the expiry of the third member's
REVOCATION_SECONDS = 25.0  # the stated time (two polls) and a margin for a loaded machine


def cli(args: List[str], cwd: Path, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node", *args], cwd=cwd, env=child_env(), capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def refused_counts(metrics_url: str) -> Dict[Tuple[str, str], float]:
    status, body = http_get(metrics_url)
    assert status == 200
    pattern = re.compile(r'^commons_requests_refused_total\{reason="(\w+)",request="(\w+)"\} ([0-9.e+]+)$')
    found = {}
    for line in body.decode().splitlines():
        match = pattern.match(line)
        if match:
            found[(match.group(2), match.group(1))] = float(match.group(3))
    return found


def group_sizes_since(node: NodeProcess, since: float) -> List[int]:
    return [e["trunk_group"] for e in node.events("round") if e["timestamp"] >= since]


def wait_for(predicate, timeout: float, what: str, nodes: List[NodeProcess]) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.5)
    raise AssertionError(f"{what} within {timeout:g}s; " + "\n".join(n.stderr_tail(8) for n in nodes))


class Swarm:
    """The founder, the manifest and the member keys and invites of one members-only swarm, on disk."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.founder = root / "founder.key"
        founder = members.keygen(str(self.founder))
        self.manifest = write_tiny_manifest(root / "manifest.yaml", experts=2, steps=10)
        self.manifest.write_text(self.manifest.read_text() + f"membership: {{founders: [{founder['public_key']}]}}\n")
        self.swarm_id = load_manifest(str(self.manifest)).swarm_id
        self.corpus = write_text_corpus(root / "text.txt")

    def key(self, name: str) -> Tuple[Path, str]:
        path = self.root / f"{name}.key"
        return path, members.keygen(str(path))["peer_id"]

    def invite(self, name: str, peer_id: str, expires: str = "1h", now: Optional[float] = None,
               founder: Optional[Path] = None, manifest: Optional[Path] = None) -> Path:  # fmt: skip
        path = self.root / f"{name}.invite"
        members.invite(str(manifest or self.manifest), str(founder or self.founder), peer_id, f"org-{name}", expires,
                       str(path), now=now)  # fmt: skip
        return path

    def start(self, name: str, key: Path, invite: Optional[Path], peers: List[str]) -> NodeProcess:
        args = ["start", "--manifest", str(self.manifest), "--data", str(self.corpus), "--experts", "1",
                "--identity", str(key), "--log-format", "json", "--metrics-addr", "127.0.0.1:0",
                "--checkpoint-dir", str(self.root / name / "checkpoints")]  # fmt: skip
        if invite is not None:
            args += ["--invite", str(invite)]
        if peers:
            args += ["--initial-peers", *peers]
        return NodeProcess.node(args, self.root / name, name)


def attack(swarm: Swarm, key: Path, invite: Optional[Path], member: str, maddr: str) -> Dict[str, object]:
    """An outsider's every request to ``member``, with the node's own classes; what each got."""
    admission = None
    if invite is not None:
        blob = invite.read_bytes().strip()
        admission = Admission(None, swarm.swarm_id, blob)
    # A DHT client: a store succeeds only where a member takes it (a DHT server would also keep its own copy).
    outsider = HivemindSwarm.open(initial_peers=[maddr], identity_path=str(key), admission=admission,
                                  ensure_bootstrap=False, startup_timeout=20, client_mode=True)  # fmt: skip
    got: Dict[str, object] = {}
    try:
        for name, handler in (("hello", None), ("avg", handlers.averaging(swarm.swarm_id)),
                              ("state", handlers.state(swarm.swarm_id))):  # fmt: skip
            call = outsider.call(member, handler, bytes(16), 10) if handler else None
            request = ask(outsider, member, "", 10) if call is None else call
            try:
                outsider.run(request, timeout=20)
                got[name] = "answered"
            except Refused as e:
                got[name] = e.reason
            except (ConnectionError, TimeoutError) as e:
                got[name] = f"no answer: {e}"
        # DHT writes (hivemind keeps a copy in the writer's own storage whatever the others say: the members'
        # refusal counts and `node status` below show that none took them) and a read, which no member answers.
        now = outsider.now()
        record = PeerRecord(peer_id=outsider.peer_id, modules=["trunk"], outer_round=10**6, local_steps=0)
        outsider.run(outsider.store(peers_key(swarm.swarm_id), outsider.peer_id, record.dict(), now + 10), timeout=30)
        outsider.run(outsider.store(ready_key(swarm.swarm_id, "trunk", 1), outsider.peer_id, {"posted_at": now},
                                    now + 10), timeout=30)  # fmt: skip
        found = outsider.run(outsider.read(peers_key(swarm.swarm_id)), timeout=30)
        got["read"] = sorted(set(found) - {outsider.peer_id})
    finally:
        outsider.close()
    return got


def forge_contributions(swarm: Swarm, key: Path, invite: Path, maddr: str, voucher_key: Path) -> str:
    """A member that never trained says it did: a peer record with 10^9 local steps (hosting nothing, so nobody
    waits for it in a group) and a summary full of vouches it made up (one it signed about itself, one by a key
    that is no member, one that names another voucher)."""
    admission = Admission(None, swarm.swarm_id, invite.read_bytes().strip())
    me = read_identity(str(key))
    stranger = read_identity(str(voucher_key))
    forger = HivemindSwarm.open(initial_peers=[maddr], identity_path=str(key), admission=admission,
                                ensure_bootstrap=False, startup_timeout=20, client_mode=True)  # fmt: skip
    try:
        big = Vouch(swarm.swarm_id, me.peer_id, me.peer_id, 10**6, 10**9, ("trunk",), 10**12, 10**12, 10**6)
        fakes = [big.signed(me.public, me.sign),
                 replace(big, voucher=stranger.peer_id).signed(stranger.public, stranger.sign),
                 replace(big, voucher=members_peer(swarm, "a")).signed(me.public, me.sign)]  # fmt: skip
        now = forger.now()
        record = PeerRecord(peer_id=me.peer_id, modules=[], outer_round=0, local_steps=10**9,
                            invite=invite.read_text().strip())  # fmt: skip
        assert forger.run(forger.store(peers_key(swarm.swarm_id), me.peer_id, record.dict(), now + 60), timeout=30)
        summary = {"vouched": [v.to_bytes().decode() for v in fakes], "log": {"receipts": 10**6, "head": "0" * 64}}
        assert forger.run(forger.store(contributions_key(swarm.swarm_id), me.peer_id, summary, now + 60), timeout=30)
    finally:
        forger.close()
    return me.peer_id


def members_peer(swarm: Swarm, name: str) -> str:
    return read_identity(str(swarm.root / f"{name}.key")).peer_id


def test_a_members_only_swarm_refuses_outsiders_and_drops_revoked_and_expired_members(tmp_path):
    swarm = Swarm(tmp_path)
    keys = {name: swarm.key(name) for name in ("a", "b", "c", "d", "nobody", "late", "forger")}
    made = time.time()
    invites = {name: swarm.invite(name, keys[name][1]) for name in ("a", "b", "d")}
    invites["c"] = swarm.invite("c", keys["c"][1], expires=f"{EXPIRES_AFTER}s")
    invites["late"] = swarm.invite("late", keys["late"][1], expires="1h", now=time.time() - 7200)
    other = tmp_path / "other-founder.key"
    other_public = members.keygen(str(other))["public_key"]
    other_manifest = tmp_path / "other.yaml"
    other_manifest.write_text(swarm.manifest.read_text().split("membership:")[0] + f"membership: {{founders: "
                              f"[{other_public}]}}\n")  # fmt: skip
    forged = swarm.invite("forger", keys["forger"][1], founder=other, manifest=other_manifest)
    forged.write_bytes(forged.read_bytes().replace(json.loads(forged.read_bytes())["swarm_id"].encode(),
                                                   swarm.swarm_id.encode()))  # fmt: skip

    nodes: List[NodeProcess] = []
    try:
        first = swarm.start("a", keys["a"][0], invites["a"], [])
        nodes.append(first)
        first.wait_ready()
        for name in ("b", "c"):
            nodes.append(swarm.start(name, keys[name][0], invites[name], [first.maddr]))
        for node in nodes[1:]:
            node.wait_ready()
        a, b, c = nodes
        wait_for(lambda: any(e["trunk_group"] == 3 for e in a.events("round")), 60, "a round of all three", nodes)
        member = a.ready["peer_id"]

        # Outsiders: every request refused, with the reason, and counted on the member's side.
        for name, invite, reason in (("nobody", None, "no_invite"), ("late", invites["late"], "expired"),
                                     ("forger", forged, "wrong_signer")):  # fmt: skip
            got = attack(swarm, keys[name][0], invite, member, first.maddr)
            assert got == {"hello": reason, "avg": reason, "state": reason, "read": []}, (name, got)
        counts = refused_counts(a.ready["metrics_url"])
        for reason in ("no_invite", "expired", "wrong_signer"):
            for request in ("hello", "avg", "state", "dht"):
                assert counts.get((request, reason), 0) >= 1, (request, reason, counts)

        # `node status`: a member sees the three members with their organisations and what the others vouched
        # for each; a member that never trained and made its summary up shows nothing vouched. Outsiders: exit 7.
        boaster = forge_contributions(swarm, keys["d"][0], invites["d"], first.maddr, keys["nobody"][0])

        def member_status() -> dict:
            done = cli(["status", "--initial-peers", first.maddr, "--json", "--identity", str(keys["b"][0]),
                        "--invite", str(invites["b"])], tmp_path)  # fmt: skip
            assert done.returncode == 0, done.stderr
            return json.loads(done.stdout)

        # Receipts take a publication (5 s) to reach their member and another for its summary to carry the vouch.
        status = member_status()
        for _ in range(6):
            if all(p["contributed"]["rounds"] > 0 for p in status["peers"] if p["peer_id"] != boaster):
                break
            time.sleep(3)
            status = member_status()
        assert {p["peer_id"]: p["org"] for p in status["peers"]} == {
            keys[n][1]: f"org-{n}" for n in ("a", "b", "c", "d")
        }
        by_peer = {p["peer_id"]: p for p in status["peers"]}
        assert by_peer[boaster]["local_steps"] == 10**9  # what it says of itself
        assert by_peer[boaster]["contributed"] == {"rounds": 0.0, "modules": [], "samples": 0, "bytes": 0,
                                                  "receipts": 0, "vouchers": 0}  # fmt: skip
        for name in ("a", "b", "c"):
            vouched = by_peer[keys[name][1]]["contributed"]
            assert vouched["rounds"] > 0 and vouched["vouchers"] >= 1 and "trunk" in vouched["modules"], vouched
            assert vouched["samples"] <= 8 * 10 * (vouched["rounds"] + vouched["vouchers"])  # batch x H per round
        assert set(status["organisations"]) == {"org-a", "org-b", "org-c", "org-d"}
        assert status["organisations"]["org-d"]["rounds"] == 0
        done = cli(["status", "--initial-peers", first.maddr], tmp_path)
        assert done.returncode == 7, done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith("node: error: the swarm refused this client (no_invite)")
        outsider = swarm.start("nobody-node", keys["forger"][0], forged, [first.maddr])
        nodes.append(outsider)
        assert outsider.proc.wait(60) == 7
        assert "not signed" in outsider.stderr_tail(1) or "signed by 0 founder" in outsider.stderr_tail(1)

        # Revoke b while it runs: a and c take it within the stated time; b stops with exit 7 and one line.
        revoked_at = time.time()
        done = cli(["revoke", "--manifest", str(swarm.manifest), "--founder-key", str(swarm.founder), "--peer-id",
                    keys["b"][1], "--initial-peers", first.maddr, "--out", str(tmp_path / "b.revoked")], tmp_path)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["published"] is True
        published = time.time()
        # (c, whose invite expires EXPIRES_AFTER s after it was made, may have stopped on a slow machine)
        spread = wait_for(lambda: all(n.events("revoked") or n.proc.poll() == 7 for n in (a, c)), REVOCATION_SECONDS,
                          "the revocation at a and c", nodes)  # fmt: skip
        assert a.events("revoked")
        assert b.proc.wait(REVOCATION_SECONDS + 15) == 7
        last = b.stderr_tail(1)
        assert last.startswith("node: error: this node's invite was revoked"), last
        gone = time.time()
        # From the revocation on, no group of a or c has b in it (a group of 3 would).
        wait_for(lambda: len(group_sizes_since(a, gone + 5)) >= 2, 60, "rounds of a after b left", nodes)
        assert max(group_sizes_since(a, gone + 5)) <= 2
        # b, restarted with its revoked invite, is an outsider: refused at once, one line, exit 7.
        again = swarm.start("b-again", keys["b"][0], invites["b"], [first.maddr])
        nodes.append(again)
        assert again.proc.wait(60) == 7
        assert "revoked" in again.stderr_tail(1), again.stderr_tail(5)
        got = attack(swarm, keys["b"][0], invites["b"], member, first.maddr)  # and with the node's classes
        assert got == {"hello": "revoked", "avg": "revoked", "state": "revoked", "read": []}, got
        counts = refused_counts(a.ready["metrics_url"])
        assert all(counts.get((request, "revoked"), 0) >= 1 for request in ("hello", "avg", "state", "dht")), counts
        assert max(e["trunk_group"] for e in a.events("round")) <= 3  # never an outsider in a group

        # c's invite expires: c stops itself (one line, exit 7), and a trains alone, refusing c.
        expiry = made + EXPIRES_AFTER
        assert c.proc.wait(max(0.0, expiry - time.time()) + 25) == 7
        assert "expired" in c.stderr_tail(1), c.stderr_tail(5)
        wait_for(lambda: len(group_sizes_since(a, expiry + 15)) >= 1, 60, "a round of a after c's expiry", nodes)
        assert max(group_sizes_since(a, expiry + 15)) == 1
        assert a.proc.poll() is None  # the member in good standing trains on

        # c's evidence: the receipts a and b signed for it verify offline with the founders' keys; tampered, not.
        evidence = tmp_path / "c.evidence.json"
        done = cli(["contributions", "--checkpoint-dir", str(tmp_path / "c" / "checkpoints"), "--manifest",
                    str(swarm.manifest), "--json"], tmp_path)  # fmt: skip
        assert done.returncode == 0, done.stderr
        evidence.write_text(done.stdout)
        exported = json.loads(done.stdout)
        assert exported["peer"] == keys["c"][1] and exported["totals"]["rounds"] > 0
        done = cli(["contributions", "--verify", str(evidence), "--manifest", str(swarm.manifest)], tmp_path)
        assert done.returncode == 0, done.stderr
        verified = json.loads(done.stdout)
        assert verified["ok"] is True and verified["totals"] == exported["totals"]
        assert set(verified["vouchers"].values()) <= {"org-a", "org-b"}
        receipt = json.loads(exported["entries"][0]["receipt"])
        receipt["samples"] += 1
        exported["entries"][0]["receipt"] = json.dumps(receipt, sort_keys=True, separators=(",", ":"))
        evidence.write_text(json.dumps(exported))
        done = cli(["contributions", "--verify", str(evidence), "--manifest", str(swarm.manifest)], tmp_path)
        assert done.returncode == 8 and "signature does not hold" in done.stderr, done.stderr
        print(f"phases: revoked node gone {gone - made:.0f}s after the invites were made, c's expired {EXPIRES_AFTER}s")
        print(f"revocation: published {published - revoked_at:.1f}s after `node revoke` began, at every member "
              f"{spread:.1f}s later, revoked node gone {gone - published:.1f}s after publication")
    finally:
        leaked = [pid for n in nodes for pid in n.cleanup()]
    assert leaked == []
