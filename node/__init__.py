"""Commons node: one process of a peer-to-peer mixture-of-experts training swarm.

Packages, bottom to top (imports point down the list; each package's __init__ maps its modules and
exports its public surface, which is all other packages import):

- errors     user-facing error types and their exit codes (a module every layer may raise from)
- ops        operations: logs, metrics, health endpoints, checkpoints, processes, malloc settings
- net        the network adapter: hivemind's DHT and p2p streams behind one object
- training   the model, this node's data, local steps, each module's DiLoCo state
- swarm      peers and their records: hello, membership, expert placement, state for newcomers
- averaging  the averaging engine: groups per module and round, the robust butterfly all-reduce
- runtime    one node's life: config, joining, the round loop, leaving
- faces      the doors: the `node` command, `node status`, the Python API (CommonsNode)

`protocol/` (beside this package) holds everything that crosses the wire or the DHT; it imports
nothing from here.
"""

import os as _os
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# hivemind shares memory between its processes with torch's "file_system" strategy unless
# told otherwise, which starts a torch_shm_manager daemon that outlives the node's own
# children. File descriptors need no daemon. Read when hivemind is first imported.
_os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")

from node._lazy import lazy_exports  # noqa: E402 (after the environment is set)

if TYPE_CHECKING:  # the public API, imported on first use: `node --help` must not wait for torch
    from node.faces.api import CommonsNode as CommonsNode
    from node.faces.api import StateError as StateError
    from node.training.trainer import SwarmModel as SwarmModel

else:
    __getattr__, _names = lazy_exports(__name__, __file__)
    __all__ = ["__version__", *_names]
