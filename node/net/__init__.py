"""The network adapter: the only package that talks to hivemind.

- hivemind   Swarm: hivemind's DHT and p2p streams behind one object, on its own event loop thread

Every coroutine here runs on the Swarm's loop; multiaddrs go in and come out as strings, and hivemind's
exceptions become ours.
"""

from typing import TYPE_CHECKING

from node._lazy import lazy_exports

if TYPE_CHECKING:  # the surface, imported on first use (node/_lazy.py)
    from node.net.hivemind import LoopThread as LoopThread
    from node.net.hivemind import Swarm as Swarm
    from node.net.hivemind import now as now
else:
    __getattr__, __all__ = lazy_exports(__name__, __file__)
