"""The averaging engine: forming a group per module and round, and the all-reduce within it.

- matchmaking  forms an averaging group per module and round, and its message size
- slices       which member reduces which slice of which chunk
- robust       robust aggregation of a slice (outlier screen, CenteredClip); distances for the reducer check
- resultcheck  the check of reducers' results, a pure function: distance to our part, held-back re-sync state
- inbox        parts and results received, senders excluded per round and why
- deadlines    how long one module waits for peers, learned from its earlier rounds
- memory       what outlives a run: one ModuleMemory per module; the node's averaging counters
- run          AllReduceRun: one butterfly all-reduce of one group in one round, and its outcome
- averager     the node's averaging service: serves parts and results, starts a run per group and round
"""

from typing import TYPE_CHECKING

from node._lazy import lazy_exports

if TYPE_CHECKING:  # the surface, imported on first use (node/_lazy.py)
    from node.averaging.averager import Averager as Averager
    from node.averaging.matchmaking import Group as Group
    from node.averaging.matchmaking import Matchmaker as Matchmaker
    from node.averaging.matchmaking import largest_message_bytes as largest_message_bytes
    from node.averaging.memory import AveragingStats as AveragingStats
    from node.averaging.memory import ModuleMemory as ModuleMemory
    from node.averaging.run import AllReduceResult as AllReduceResult
    from node.averaging.run import AllReduceRun as AllReduceRun
else:
    __getattr__, __all__ = lazy_exports(__name__, __file__)
