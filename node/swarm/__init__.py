"""The swarm as each peer sees it: who is in it, who may train with us, who hosts what, state for newcomers.

- contributions  members-only swarms: receipts for the parts we reduce, vouches, the receipt log (Ledger)
- hello       the hello exchange; refuses other manifests / protocol versions
- invites     members-only swarms: this node's own invite, the founders' revocations spread through the DHT
- membership  announces this node and reads every peer's record (SwarmView)
- placement   which experts to host, from the replica counts in peer records (and this node's routing affinity);
              swaps announced before they are made (SwapNotice)
- reachability  can others dial us: the dial-back server and probe (public / private / unknown)
- statesync   serving module state to newcomers, downloading it from several donors (or just its head: a gate)
"""

from typing import TYPE_CHECKING

from node._lazy import lazy_exports

if TYPE_CHECKING:  # the surface, imported on first use (node/_lazy.py)
    from node.swarm.contributions import LOG_NAME as LOG_NAME
    from node.swarm.contributions import Ledger as Ledger
    from node.swarm.contributions import ReceiptLog as ReceiptLog
    from node.swarm.contributions import by_organisation as by_organisation
    from node.swarm.contributions import chain_head as chain_head
    from node.swarm.contributions import vouches_in as vouches_in
    from node.swarm.hello import Greeter as Greeter
    from node.swarm.hello import ask as ask
    from node.swarm.hello import check_admitted as check_admitted
    from node.swarm.hello import check_bootstrap_peers as check_bootstrap_peers
    from node.swarm.invites import REVOCATION_POLL_SECONDS as REVOCATION_POLL_SECONDS
    from node.swarm.invites import Revocations as Revocations
    from node.swarm.invites import admission_for as admission_for
    from node.swarm.invites import presenting as presenting
    from node.swarm.invites import read_invite_file as read_invite_file
    from node.swarm.membership import RECORD_TTL_SECONDS as RECORD_TTL_SECONDS
    from node.swarm.membership import Membership as Membership
    from node.swarm.membership import SwarmView as SwarmView
    from node.swarm.membership import read_peers as read_peers
    from node.swarm.placement import SWAP_NOTICE_SECONDS as SWAP_NOTICE_SECONDS
    from node.swarm.placement import Swap as Swap
    from node.swarm.placement import SwapNotice as SwapNotice
    from node.swarm.placement import choose_experts as choose_experts
    from node.swarm.placement import follow_swap as follow_swap
    from node.swarm.placement import rebalance as rebalance
    from node.swarm.placement import replica_counts as replica_counts
    from node.swarm.reachability import DialBackServer as DialBackServer
    from node.swarm.reachability import Verdict as Verdict
    from node.swarm.reachability import ask_dialback as ask_dialback
    from node.swarm.reachability import decide as decide
    from node.swarm.reachability import listen_ports as listen_ports
    from node.swarm.reachability import probe as probe
    from node.swarm.statesync import RANGE_ELEMENTS as RANGE_ELEMENTS
    from node.swarm.statesync import StateServer as StateServer
    from node.swarm.statesync import download_modules as download_modules
    from node.swarm.statesync import exact_fetcher as exact_fetcher
    from node.swarm.statesync import fetch_heads as fetch_heads
else:
    __getattr__, __all__ = lazy_exports(__name__, __file__)
