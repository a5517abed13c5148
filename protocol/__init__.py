"""Everything that crosses the wire or the DHT.

- version    the protocol version number
- manifest   the swarm manifest (YAML) and its canonical hash, the swarm id
- records    DHT keys and record schemas (peer records, readiness for averaging)
- wire       stream messages: hello, tensor parts/results, acks
"""

from protocol.manifest import Manifest, ManifestError, load_manifest, parse_manifest
from protocol.version import PROTOCOL_VERSION

__all__ = ["Manifest", "ManifestError", "load_manifest", "parse_manifest", "PROTOCOL_VERSION"]
