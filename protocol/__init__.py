"""Everything that crosses the wire or the DHT; imports nothing from node/.

- version    the protocol version number
- manifest   the swarm manifest (YAML) and its canonical hash, the swarm id
- typed      the loader of typed trees of frozen dataclasses from plain data (manifest and node config)
- records    DHT keys and record schemas (peer records, readiness for averaging)
- wire       stream messages: hello, tensor parts/results, state transfer, acks and their refusal codes
- frames     the two framing layers: stream frames (8-byte length) and message frames (4-byte header length)
- handlers   the names of the request handlers a node serves
"""

from protocol.manifest import Manifest, ManifestError, load_manifest, parse_manifest
from protocol.version import PROTOCOL_VERSION

__all__ = ["Manifest", "ManifestError", "load_manifest", "parse_manifest", "PROTOCOL_VERSION"]
