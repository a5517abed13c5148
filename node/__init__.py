"""Commons node: one process of a peer-to-peer mixture-of-experts training swarm.

Map of this package (imports point down the list):
- errors      user-facing error types and their exit codes
- config      the typed config tree behind flags, COMMONS_* variables and config files
- logs        text / JSON logging to stderr, hivemind's records included
- model       byte-level mixture-of-experts transformer; module/expert split
- data        streams the user's text files (or the default corpus) with a held-out split
- training    inner AdamW steps and evaluation
- diloco      per-module global copy and outer Nesterov step
- placement   which experts to host, from DHT replica counts
- procs       processes by parent or group, their descendants, CPU time and RSS (/proc)
- allocator   glibc malloc settings of `node start`: a step's freed memory is kept for the next
- swarm       the only hivemind adapter: DHT, p2p streams, event loop thread
- handshake   hello exchange; refuses other manifests / protocol versions
- membership  announces this node and reads peer records
- matchmaking forms an averaging group per module and round, and its message size
- deadlines   how long to wait for peers, learned from earlier rounds
- robust      robust aggregation of a slice (outlier screen, CenteredClip); the reducer check
- inbox       parts and results received, senders excluded per round
- slices      which member reduces which slice of which chunk
- report      a module's round outcome, round summaries and their log lines
- resultcheck the check of reducers' results: distance to our part, the majority's state on a re-sync
- averaging   butterfly all-reduce within a group: validation, backup reducers, compression
- rounds      one outer round of every hosted module, overlapped with training or not
- metrics     Prometheus metrics on an injectable registry; collectors for averager, helpers, swarm view
- endpoints   /metrics, /metrics/swarm, /healthz, /readyz over a small HTTP server
- checkpoint  atomic checksummed generations in --checkpoint-dir; resume
- statesync   serving module state to newcomers, downloading it from several donors
- runtime     the Node: join, train rounds, average, leave
- status      `node status`: the swarm as seen from the DHT
- cli         `node start` / `node status` command line
- api         CommonsNode: the Python API for notebooks and scripts
"""

import os as _os

__version__ = "0.1.0"

# hivemind shares memory between its processes with torch's "file_system" strategy unless
# told otherwise, which starts a torch_shm_manager daemon that outlives the node's own
# children. File descriptors need no daemon. Read when hivemind is first imported.
_os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")

__all__ = ["CommonsNode", "StateError", "SwarmModel", "__version__"]

_LAZY = {"CommonsNode": "node.api", "StateError": "node.api", "SwarmModel": "node.training"}


def __getattr__(name: str):
    """Import the API on first use: `node --help` and config errors must not wait for torch."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'node' has no attribute {name!r}")
