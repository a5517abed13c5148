"""Fault rules for the in-process network (node/net/inprocess.py): which messages to drop, delay, corrupt,
truncate or close, matched by sender, receiver, handler and content.

``network.faults.on(...)`` selects messages and one of its methods adds a rule acting on them:

    on(sender=None, receiver=None, handler=None, match=None, response=False, nth=1, times=1)
        .drop()             never delivered: the caller times out
        .delay(seconds)     delivered that much later
        .corrupt(change)    delivered as change(message); flip_bit(bit) makes a ready change
        .flip_bit(bit=-1)   one bit flipped (-1: the top bit of the last byte)
        .truncate(keep)     only the first ``keep`` bytes delivered
        .close()            not delivered; the caller sees ConnectionError "... closed the stream"

A selection matches a message when every filter given matches: ``sender``/``receiver`` a peer id or a
collection of them, ``handler`` the handler's name, ``match`` a predicate on the message's bytes. A rule counts
the messages it matches and acts on the ``nth`` of them and the ``times - 1`` after it (``times=None``: all
from the nth on); ``rule.fired`` counts the messages it acted on. Rules are tried in the order they were
added and every rule that acts applies (delays add up, changes compose), except that no rule sees a message
dropped or closed by an earlier one. Requests are matched when sent; with ``response=True`` a rule acts on
responses instead (the sender is then the serving peer), after the handler ran. A change or predicate that
raises is a bug in the test: the caller's ``call`` raises it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection, FrozenSet, List, Literal, Optional

Change = Callable[[bytes], bytes]  # what a corrupt rule does to a message


def flip_bit(bit: int = -1) -> Change:
    """A change flipping bit ``bit % 8`` of byte ``bit // 8`` (negative: from the end; -1 is the top bit of
    the last byte, a float32's sign there). An empty message stays empty; IndexError past a longer one's end."""

    def change(data: bytes) -> bytes:
        if not data:
            return data
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        return bytes(flipped)

    return change


@dataclass
class Fate:
    """What the fault rules made of one message: the bytes delivered, after how long, or its end."""

    data: bytes
    delay: float = 0.0
    end: Optional[Literal["drop", "close"]] = None


@dataclass(frozen=True, eq=False)
class Selection:
    """Which messages a rule acts on (see the module docstring); its methods add the rule."""

    faults: Faults
    senders: Optional[FrozenSet[str]]
    receivers: Optional[FrozenSet[str]]
    handler: Optional[str]
    match: Optional[Callable[[bytes], bool]]
    response: bool
    nth: int
    times: Optional[int]

    def matches(self, sender: str, receiver: str, handler: str, data: bytes, response: bool) -> bool:
        return (
            response == self.response
            and (self.senders is None or sender in self.senders)
            and (self.receivers is None or receiver in self.receivers)
            and (self.handler is None or handler == self.handler)
            and (self.match is None or self.match(data))
        )

    def drop(self) -> Rule:
        return self.faults._add(Rule(self, "drop"))

    def delay(self, seconds: float) -> Rule:
        if seconds < 0:
            raise ValueError(f"a delay of {seconds} s is negative")
        return self.faults._add(Rule(self, "delay", seconds=seconds))

    def corrupt(self, change: Change) -> Rule:
        return self.faults._add(Rule(self, "change", change=change))

    def flip_bit(self, bit: int = -1) -> Rule:
        return self.corrupt(flip_bit(bit))

    def truncate(self, keep: int) -> Rule:
        if keep < 0:
            raise ValueError(f"cannot keep {keep} bytes")
        return self.corrupt(lambda data: data[:keep])

    def close(self) -> Rule:
        return self.faults._add(Rule(self, "close"))


@dataclass(eq=False)
class Rule:
    """One fault rule; ``seen`` counts the messages it matched, ``fired`` those it acted on."""

    selection: Selection
    action: Literal["drop", "delay", "change", "close"]
    seconds: float = 0.0
    change: Optional[Change] = None
    seen: int = 0
    fired: int = 0

    def apply(self, fate: Fate, sender: str, receiver: str, handler: str, response: bool) -> None:
        chosen = self.selection
        if not chosen.matches(sender, receiver, handler, fate.data, response):
            return
        self.seen += 1
        if self.seen < chosen.nth or (chosen.times is not None and self.fired >= chosen.times):
            return
        self.fired += 1
        if self.action == "drop" or self.action == "close":
            fate.end = self.action
        elif self.action == "delay":
            fate.delay += self.seconds
        elif self.change is not None:
            fate.data = self.change(fate.data)


class Faults:
    """The fault rules of a network's traffic, in the order they were added."""

    def __init__(self) -> None:
        self.rules: List[Rule] = []

    def on(
        self,
        *,
        sender: str | Collection[str] | None = None,
        receiver: str | Collection[str] | None = None,
        handler: Optional[str] = None,
        match: Optional[Callable[[bytes], bool]] = None,
        response: bool = False,
        nth: int = 1,
        times: Optional[int] = 1,
    ) -> Selection:
        """Select messages; a method of the result adds the rule (``on(handler="x").drop()``)."""
        if nth < 1 or (times is not None and times < 1):
            raise ValueError(f"nth ({nth}) and times ({times}) count messages from 1")
        return Selection(self, _peer_set(sender), _peer_set(receiver), handler, match, response, nth, times)

    def fate(self, sender: str, receiver: str, handler: str, data: bytes, response: bool = False) -> Fate:
        """Apply the rules to one message, as it is sent."""
        fate = Fate(data)
        for rule in self.rules:
            rule.apply(fate, sender, receiver, handler, response)
            if fate.end is not None:
                break
        return fate

    def remove(self, rule: Rule) -> None:
        self.rules.remove(rule)

    def clear(self) -> None:
        self.rules.clear()

    def _add(self, rule: Rule) -> Rule:
        self.rules.append(rule)
        return rule


def _peer_set(peers: str | Collection[str] | None) -> Optional[FrozenSet[str]]:
    if peers is None:
        return None
    return frozenset([peers]) if isinstance(peers, str) else frozenset(peers)
