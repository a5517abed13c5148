"""Wire protocol version: bump on any change to what crosses the DHT or the wire.

2: averaging acknowledgements carry a refusal code (protocol/wire.py: Refusal).
3: every DHT record is signed by the peer its subkey names (node/net/hivemind.py: SignedRecords); unsigned
   records are refused. Also new, optional for older readers: dial-back, reachability, send-only members.
4: a receiver keeps averaging mail only for the round it posted for, and answers earlier mail ``too_early``
   (protocol/wire.py: Refusal.TOO_EARLY); senders send it again. Frames are bounded by the manifest.
5: a group whose members hold different states but a strict majority one averages a normal round, and the others
   adopt the majority's state (node/runtime/rounds.py); older peers would re-sync that group. New tensor encodings
   ``topk2`` and ``topk8`` (protocol/sparse.py) for ``compression: sparse``.
"""

PROTOCOL_VERSION = 5
