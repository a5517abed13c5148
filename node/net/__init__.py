"""The network adapter: one typed port that every user of the network depends on, and its implementations.

- port         SwarmPort: peer id, call, serve, store, read, now (the contract of every implementation)
- addresses    multiaddrs as users give them: validate_maddr, validate_peer_maddr, peer_id_of (py-multiaddr)
- loop         the uvloop event loop thread every network coroutine of a node runs on
- streams      framed request/response over p2p streams; the pool of idle streams we reuse; what peers may hold (Limits)
- hivemind     HivemindSwarm: hivemind's DHT and p2p streams, SignedRecords (the only module importing hivemind)
- admission    members-only swarms: who we serve (invites, revocations), the invite we present, refusal counts
- identity     the identity key file: check, read, create (Ed25519); sign and verify; peer id of a public key
- inprocess    InProcessNetwork / InProcessSwarm: peers in one event loop, with kill and byte counts (tests)
- faults       the in-process network's fault rules: drop, delay, corrupt, truncate, close
- virtualtime  run_virtual, VirtualClock: an event loop whose clock jumps to the next timer (tests)
"""

from typing import TYPE_CHECKING

from node._lazy import lazy_exports

if TYPE_CHECKING:  # the surface, imported on first use (node/_lazy.py)
    from node.net.addresses import ip_and_port as ip_and_port
    from node.net.addresses import peer_id_of as peer_id_of
    from node.net.addresses import validate_maddr as validate_maddr
    from node.net.addresses import validate_peer_maddr as validate_peer_maddr
    from node.net.admission import Admission as Admission
    from node.net.admission import Refusal as Refusal
    from node.net.faults import Faults as Faults
    from node.net.faults import Rule as Rule
    from node.net.faults import flip_bit as flip_bit
    from node.net.hivemind import HivemindSwarm as HivemindSwarm
    from node.net.hivemind import route_hivemind_logs as route_hivemind_logs
    from node.net.identity import Identity as Identity
    from node.net.identity import check_identity_file as check_identity_file
    from node.net.identity import read_identity as read_identity
    from node.net.identity import verify as verify
    from node.net.identity import write_atomically as write_atomically
    from node.net.identity import write_new_identity as write_new_identity
    from node.net.inprocess import InProcessNetwork as InProcessNetwork
    from node.net.inprocess import InProcessSwarm as InProcessSwarm
    from node.net.loop import LoopThread as LoopThread
    from node.net.port import REMOTE_ADDRESS as REMOTE_ADDRESS
    from node.net.port import Clock as Clock
    from node.net.port import Handler as Handler
    from node.net.port import Refused as Refused
    from node.net.port import SwarmPort as SwarmPort
    from node.net.streams import Buckets as Buckets
    from node.net.virtualtime import VirtualClock as VirtualClock
    from node.net.virtualtime import VirtualDeadlock as VirtualDeadlock
    from node.net.virtualtime import VirtualEventLoop as VirtualEventLoop
    from node.net.virtualtime import run_virtual as run_virtual
else:
    __getattr__, __all__ = lazy_exports(__name__, __file__)
