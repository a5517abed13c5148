"""The network adapter: one typed port that every user of the network depends on, and its implementations.

- port       SwarmPort: peer id, call, serve, store, read, now (the contract of every implementation)
- loop       the uvloop event loop thread every network coroutine of a node runs on
- streams    framed request/response over p2p streams; the pool of idle streams we reuse
- hivemind   HivemindSwarm: hivemind's DHT and p2p streams (the only module that imports hivemind)
"""

from typing import TYPE_CHECKING

from node._lazy import lazy_exports

if TYPE_CHECKING:  # the surface, imported on first use (node/_lazy.py)
    from node.net.hivemind import HivemindSwarm as HivemindSwarm
    from node.net.loop import LoopThread as LoopThread
    from node.net.port import Clock as Clock
    from node.net.port import Handler as Handler
    from node.net.port import SwarmPort as SwarmPort
else:
    __getattr__, __all__ = lazy_exports(__name__, __file__)
