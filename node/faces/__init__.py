"""The doors users come through, on top of everything else.

- cli     the `node` command: `node start`, `node status`, `node doctor`, `node demo`, and the founders' tools
- members `node keygen`, `node invite`, `node revoke`: keys, invites and revocations of members-only swarms
- status  `node status`: the swarm as seen from the DHT, as a table, JSON or Prometheus text
- doctor  `node doctor`: will `node start` work here? one pass/fail line per check, with its fix
- demo    `node demo`: N local nodes as processes, shown live, every one stopped when it ends
- api     CommonsNode: the Python API for notebooks and scripts
"""

from typing import TYPE_CHECKING

from node._lazy import lazy_exports

if TYPE_CHECKING:  # the surface, imported on first use (node/_lazy.py)
    from node.faces.api import CommonsNode as CommonsNode
    from node.faces.api import StateError as StateError
    from node.faces.cli import main as main
    from node.faces.demo import run_demo as run_demo
else:
    __getattr__, __all__ = lazy_exports(__name__, __file__)
