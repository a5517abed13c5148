"""Operations: what a sysadmin sees and what the node needs from its machine.

Nothing here knows about averaging or training; the engines' state is read through callables and small
protocols (see metrics), so every other package may import this one.

- logs        text / JSON logging to stderr, hivemind's records included
- procs       processes by parent or group, their descendants, CPU time and RSS (/proc)
- allocator   glibc malloc settings of `node start`: a step's freed memory is kept for the next
- metrics     Prometheus metrics on an injectable registry; collectors for averaging, helpers, swarm view
- endpoints   /metrics, /metrics/swarm, /healthz, /readyz, the swarm page (page.html) and its /status.json
              over a small HTTP server; HOST:PORT parsing
- checkpoint  atomic checksummed generations in --checkpoint-dir
"""

from typing import TYPE_CHECKING

from node._lazy import lazy_exports

if TYPE_CHECKING:  # the surface, imported on first use (node/_lazy.py)
    from node.ops.allocator import keep_freed_memory as keep_freed_memory
    from node.ops.checkpoint import CheckpointError as CheckpointError
    from node.ops.checkpoint import CheckpointStore as CheckpointStore
    from node.ops.checkpoint import Snapshot as Snapshot
    from node.ops.checkpoint import write_generation as write_generation
    from node.ops.endpoints import DEFAULT_METRICS_ADDR as DEFAULT_METRICS_ADDR
    from node.ops.endpoints import Endpoints as Endpoints
    from node.ops.endpoints import Health as Health
    from node.ops.endpoints import PageData as PageData
    from node.ops.endpoints import open_endpoints as open_endpoints
    from node.ops.endpoints import validate_host_port as validate_host_port
    from node.ops.logs import setup_logging as setup_logging
    from node.ops.metrics import AveragerCollector as AveragerCollector
    from node.ops.metrics import Coverage as Coverage
    from node.ops.metrics import HelperProcessCollector as HelperProcessCollector
    from node.ops.metrics import NodeMetrics as NodeMetrics
    from node.ops.metrics import RecordsRefusedCollector as RecordsRefusedCollector
    from node.ops.metrics import RequestsRefusedCollector as RequestsRefusedCollector
    from node.ops.metrics import SwarmViewCollector as SwarmViewCollector
    from node.ops.metrics import module_coverage as module_coverage
    from node.ops.procs import children_of as children_of
    from node.ops.procs import descendants_of as descendants_of
    from node.ops.procs import die_with_parent as die_with_parent
    from node.ops.procs import helper_totals as helper_totals
    from node.ops.procs import in_process_group as in_process_group
    from node.ops.procs import read_stat as read_stat
else:
    __getattr__, __all__ = lazy_exports(__name__, __file__)
