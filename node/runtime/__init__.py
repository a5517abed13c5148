"""One node's life: its config, joining, the round loop, leaving.

- config   the typed config tree behind flags, COMMONS_* variables and config files (help on each field)
- context  what a node has from creation on: config, manifest, metrics, health, stop flag, round history
- report   a module's round outcome, round summaries and their log lines
- rounds   one outer round of every hosted module on the network: group, all-reduce, re-sync check, apply
- affinity AffinityMeter: this node's routing affinity (placement follow_data), with the swarm's gates
- joined   Joined: everything that exists once a node has joined (swarm, trainer, services, endpoints)
- status_page  the swarm page's data (/status.json): this node, its view of the swarm, its rounds
- loop     the round loop: local steps, submit, complete, finish
- node     Node: open() joins and returns the Joined node, run() trains, close() leaves
"""

from typing import TYPE_CHECKING

from node._lazy import lazy_exports

if TYPE_CHECKING:  # the surface, imported on first use (node/_lazy.py)
    from node.runtime.config import DEVICES as DEVICES
    from node.runtime.config import ENV_PREFIX as ENV_PREFIX
    from node.runtime.config import LOG_FORMATS as LOG_FORMATS
    from node.runtime.config import LOG_LEVELS as LOG_LEVELS
    from node.runtime.config import NodeConfig as NodeConfig
    from node.runtime.config import build_config as build_config
    from node.runtime.config import read_config_file as read_config_file
    from node.runtime.joined import Joined as Joined
    from node.runtime.node import Node as Node
    from node.runtime.report import ModuleOutcome as ModuleOutcome
    from node.runtime.report import RoundSummary as RoundSummary
else:
    __getattr__, __all__ = lazy_exports(__name__, __file__)
