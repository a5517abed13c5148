"""Wire protocol version: bump on any change to what crosses the DHT or the wire."""

PROTOCOL_VERSION = 1
