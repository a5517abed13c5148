"""Wire protocol version: bump on any change to what crosses the DHT or the wire.

2: averaging acknowledgements carry a refusal code (protocol/wire.py: Refusal).
3: every DHT record is signed by the peer its subkey names (node/net/hivemind.py: SignedRecords); unsigned
   records are refused. Also new, optional for older readers: dial-back, reachability, send-only members.
4: a receiver keeps averaging mail only for the round it posted for, and answers earlier mail ``too_early``
   (protocol/wire.py: Refusal.TOO_EARLY); senders send it again. Frames are bounded by the manifest.
"""

PROTOCOL_VERSION = 4
