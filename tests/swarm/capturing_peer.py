"""A real node that also keeps a copy of every byte it hands to the swarm, for the canary test.

Usage: python -m tests.swarm.capturing_peer OUT_DIR [node start flags...]

Everything a node sends to other peers goes through its swarm port (node/net/port.py): the requests it
``call``s, the responses its handlers return, and the values it ``store``s in the DHT (serialized the
way hivemind's DHT puts them on the wire). This peer is the production Node with that port wrapped: each
of those byte strings is appended to OUT_DIR/sent.bin, and OUT_DIR/sent.json counts them per channel
and handler, so the test can tell the capture saw real traffic. Beneath the port, p2pd encrypts every
connection (noise), so a packet capture would show ciphertext whatever the node sent: the port is the
last place the plaintext exists.
"""

from __future__ import annotations

import json
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from hivemind.utils.serializer import MSGPackSerializer

from node.faces import main as node_main
from node.net import HivemindSwarm
from node.net.port import Handler
from node.runtime import Node


class Capture:
    """Appends sent byte strings to one file; thread-safe (handlers and callers run on the swarm's loop,
    DHT stores may come from other threads)."""

    def __init__(self, out_dir: Path) -> None:
        self.bin = out_dir / "sent.bin"
        self.summary = out_dir / "sent.json"
        self.counts: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, channel: str, data: bytes) -> None:
        with self._lock:
            with self.bin.open("ab") as fh:
                fh.write(data)
            self.counts[channel] += 1
            self.bytes[channel] += len(data)
            self.summary.write_text(json.dumps({"messages": self.counts, "bytes": self.bytes}))


CAPTURE: Capture


class CapturingSwarm(HivemindSwarm):
    async def call(self, peer_id: str, name: str, request: bytes, timeout: float) -> bytes:
        CAPTURE.add(f"call {name}", request)
        return await super().call(peer_id, name, request, timeout)

    async def serve(self, name: str, handler: Handler) -> None:
        async def recorded(peer_id: str, request: bytes) -> bytes:
            response = await handler(peer_id, request)
            CAPTURE.add(f"reply {name}", response)
            return response

        await super().serve(name, recorded)

    async def store(self, key: str, subkey: str, value: Any, expiration_time: float) -> bool:
        CAPTURE.add("store", key.encode() + subkey.encode() + MSGPackSerializer.dumps(value))
        return await super().store(key, subkey, value, expiration_time)


class CapturingNode(Node):
    swarm_class = CapturingSwarm


def main() -> int:
    global CAPTURE
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    CAPTURE = Capture(out_dir)
    return node_main(["start", *sys.argv[2:]], make_node=CapturingNode)


if __name__ == "__main__":
    sys.exit(main())
