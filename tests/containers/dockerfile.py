"""What a Dockerfile tells a container runtime, read from the file: ENV, ENTRYPOINT, CMD, HEALTHCHECK, VOLUME.

Tests read deploy/Dockerfile through this instead of repeating what it says, so that a change there is the
change they test. Only the final stage counts, as in a built image. The forms the image needs are the only
ones accepted: ENTRYPOINT, CMD and HEALTHCHECK CMD in exec (JSON) form, as a shell in between would take the
stop signal meant for the node; anything else is a ValueError naming the line.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

from tests.procs import REPO

NODE_DOCKERFILE = REPO / "deploy" / "Dockerfile"


@dataclass
class Image:
    """The final stage's settings, as `podman inspect` would show them for the built image."""

    env: Dict[str, str] = field(default_factory=dict)
    entrypoint: List[str] = field(default_factory=list)
    cmd: List[str] = field(default_factory=list)
    healthcheck: List[str] = field(default_factory=list)
    volumes: List[str] = field(default_factory=list)
    exposed: List[str] = field(default_factory=list)
    stop_signal: str = "SIGTERM"
    user: str = ""  # USER: "uid[:gid]" or a name; "" when the image runs as root

    @property
    def command(self) -> List[str]:
        """What the container runs: ENTRYPOINT followed by CMD."""
        return self.entrypoint + self.cmd


def instructions(text: str) -> List[Tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction: comments dropped, continuation lines joined."""
    found: List[Tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if pending and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, rest = pending.strip().partition(" ")
        found.append((keyword.upper(), rest.strip()))
        pending = ""
    return found


def _exec_form(line: str, what: str) -> List[str]:
    try:
        value = json.loads(line)
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be in exec form, a JSON list of strings: {line!r}")
    return value


def _env_pairs(rest: str, env: Dict[str, str]) -> None:
    """``ENV a=1 b="x y"`` (or the old ``ENV name value``), with ``$NAME``/``${NAME}`` from earlier ENV lines."""
    words = shlex.split(rest)
    if words and "=" not in words[0]:
        words = [f"{words[0]}={' '.join(words[1:])}"]
    for word in words:
        name, _, value = word.partition("=")
        env[name] = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), value)


def read_image(path: Path = NODE_DOCKERFILE) -> Image:
    image = Image()
    for keyword, rest in instructions(path.read_text()):
        if keyword == "FROM":
            image = Image()  # a new stage: only the last one is the image
        elif keyword == "ENV":
            _env_pairs(rest, image.env)
        elif keyword == "ENTRYPOINT":
            image.entrypoint, image.cmd = _exec_form(rest, "ENTRYPOINT"), []  # a new ENTRYPOINT resets CMD
        elif keyword == "CMD":
            image.cmd = _exec_form(rest, "CMD")
        elif keyword == "HEALTHCHECK":
            check = re.search(r"(?:^|\s)CMD\s+(.*)$", rest)
            if check is None:
                raise ValueError(f"HEALTHCHECK without CMD: {rest!r}")
            image.healthcheck = _exec_form(check.group(1), "HEALTHCHECK CMD")
        elif keyword == "VOLUME":
            image.volumes += _exec_form(rest, "VOLUME") if rest.startswith("[") else rest.split()
        elif keyword == "EXPOSE":
            image.exposed += rest.split()
        elif keyword == "STOPSIGNAL":
            image.stop_signal = rest
        elif keyword == "USER":
            image.user = rest
    return image
