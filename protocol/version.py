"""Wire protocol version: bump on any change to what crosses the DHT or the wire.

2: averaging acknowledgements carry a refusal code (protocol/wire.py: Refusal).
"""

PROTOCOL_VERSION = 2
