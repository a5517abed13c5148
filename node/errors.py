"""The errors a user can cause, each with the exit code `node` ends with.

User errors end in one line on stderr and a stable exit code (documented in README.md);
anything else is a bug and exits with code 1 and a traceback.
"""

from __future__ import annotations


class CommonsError(Exception):
    """Base of every error the node reports to the user as one line."""

    exit_code = 1


class ConfigError(CommonsError, ValueError):
    """A flag, environment variable, config file or manifest value is wrong."""

    exit_code = 2


class DataPathError(CommonsError, ValueError):
    """The training data cannot be found or read."""

    exit_code = 3


class PeerUnreachable(CommonsError):
    """No bootstrap peer answered, or the networking daemon could not start."""

    exit_code = 4


class SwarmMismatch(CommonsError):
    """The peers reached train another manifest or speak another protocol version."""

    exit_code = 5


class ChecksFailed(CommonsError):
    """`node doctor` found a check that failed (each is printed with its fix)."""

    exit_code = 6


class NotAMember(CommonsError):
    """A members-only swarm refuses this node: no invite, expired, signed by a non-founder, revoked."""

    exit_code = 7


class EvidenceInvalid(CommonsError):
    """`node contributions --verify`: the evidence does not hold (a signature, an invite, a total)."""

    exit_code = 8


EXIT_CODES = {
    0: "clean exit (including Ctrl+C / SIGTERM)",
    1: "internal error (a bug: please report it with the traceback)",
    ConfigError.exit_code: "bad flag, environment variable, config file, multiaddr or manifest",
    DataPathError.exit_code: "training data path missing, empty or unreadable",
    PeerUnreachable.exit_code: "no bootstrap peer reachable, or the p2p daemon failed to start",
    SwarmMismatch.exit_code: "bootstrap peers train a different manifest or protocol version",
    ChecksFailed.exit_code: "`node doctor`: a check failed (the FAIL lines say what to fix)",
    NotAMember.exit_code: "members-only swarm: no invite, invite expired, not signed by its founders, or revoked",
    EvidenceInvalid.exit_code: "`node contributions --verify`: the evidence does not verify (the line says where)",
}
