"""deploy/constraints.txt: the exact version of every package the node needs at run time, as installed here.

    .venv/bin/python -m tests.containers.constraints > deploy/constraints.txt

The image installs its dependencies under these constraints (deploy/Dockerfile), so two builds of the
same commit get the same packages. The closure is read from the installed packages' metadata, starting at
setup.cfg's install_requires; torch's local version label (+cpu) is dropped, so that a CUDA build of the
same version satisfies it too.
"""

from __future__ import annotations

import configparser
import re
import sys
from importlib import metadata
from typing import Dict, List

from packaging.requirements import Requirement

from tests.procs import REPO

HEADER = """\
# Exact versions of everything `node start` imports, directly or not (setup.cfg's install_requires and
# their dependencies), as tested. Used by deploy/Dockerfile: pip install -c deploy/constraints.txt ...
# Regenerate after changing a dependency: .venv/bin/python -m tests.containers.constraints > deploy/constraints.txt
"""


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def roots() -> List[str]:
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    lines = config["options"]["install_requires"].strip().splitlines()
    return [Requirement(line.strip()).name for line in lines if line.strip()]


def closure() -> Dict[str, str]:
    """{normalized name: installed version} of install_requires and everything they require (no extras)."""
    found: Dict[str, str] = {}
    stack = roots()
    while stack:
        name = stack.pop()
        if normalized(name) in found:
            continue
        dist = metadata.distribution(name)
        found[normalized(name)] = dist.version.split("+", 1)[0]
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                stack.append(requirement.name)
    return found


def main() -> int:
    sys.stdout.write(HEADER + "".join(f"{name}=={version}\n" for name, version in sorted(closure().items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
