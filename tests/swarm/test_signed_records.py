"""Only a record's owner can write it, over real DHT processes (node/net/hivemind.py SignedRecords): an attacker
with the manifest writes "leaving" and a round of 10^9 under an honest peer's subkey, through a Commons swarm and
through a hivemind DHT that signs nothing and checks nothing (modified code); the honest peers keep reading the
owner's own record, and count what they refused."""

from __future__ import annotations

import time

import hivemind
import pytest

from node.net import HivemindSwarm
from node.swarm.membership import read_peers
from protocol.records import PeerRecord, peers_key

pytestmark = pytest.mark.swarm
SWARM = "0123456789abcdef"


def test_forged_records_under_an_honest_subkey_are_refused_and_the_owners_stand() -> None:
    owner = HivemindSwarm.open()
    reader = HivemindSwarm.open(initial_peers=owner.visible_maddrs())
    attacker = HivemindSwarm.open(initial_peers=owner.visible_maddrs())
    rogue = None
    try:
        key = peers_key(SWARM)
        honest = PeerRecord(peer_id=owner.peer_id, modules=["trunk"], outer_round=3, local_steps=10)
        assert owner.run(owner.store(key, owner.peer_id, honest.dict(), owner.now() + 30), timeout=30)
        forged = honest.copy(update={"leaving": True, "outer_round": 10**9}).dict()
        far = owner.now() + 3600 * 24
        # Every DHT node checks signatures: none stores the forgery.
        assert not attacker.run(attacker.store(key, owner.peer_id, forged, far), timeout=30)
        # A DHT node that checks nothing (modified code) stores it, and hands it out: every reader drops it.
        rogue = hivemind.DHT(initial_peers=owner.visible_maddrs(), start=True)
        rogue.store(key, forged, far, subkey=owner.peer_id)
        attacker.run(attacker.store(key, owner.peer_id, forged, far), timeout=30)  # now the rogue takes it
        time.sleep(0.5)
        for port in (reader, owner, attacker):
            view = port.run(read_peers(port, SWARM), timeout=30)
            record = view.peers[owner.peer_id]
            assert record.leaving is False and record.outer_round == 3, port.peer_id
        assert reader.records_refused + owner.records_refused > 0  # the forgeries were seen, and refused
    finally:
        if rogue is not None:
            rogue.shutdown()
        for swarm in (attacker, reader, owner):
            swarm.close()
