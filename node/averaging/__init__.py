"""The averaging engine: forming a group per module and round, and the all-reduce within it.

- matchmaking  forms an averaging group per module and round, and its message size
- slices       which member reduces which slice of which chunk
- robust       robust aggregation of a slice (outlier screen, CenteredClip); distances for the reducer check
- resultcheck  the check of reducers' results: distance to our part, the majority's state on a re-sync
- inbox        parts and results received, senders excluded per round
- deadlines    how long to wait for peers, learned from earlier rounds
- averager     butterfly all-reduce within a group: validation, backup reducers, compression
"""

from typing import TYPE_CHECKING

from node._lazy import lazy_exports

if TYPE_CHECKING:  # the surface, imported on first use (node/_lazy.py)
    from node.averaging.averager import AllReduceResult as AllReduceResult
    from node.averaging.averager import Averager as Averager
    from node.averaging.averager import AveragingStats as AveragingStats
    from node.averaging.matchmaking import Group as Group
    from node.averaging.matchmaking import Matchmaker as Matchmaker
else:
    __getattr__, __all__ = lazy_exports(__name__, __file__)
