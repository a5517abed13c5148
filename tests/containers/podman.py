"""podman for the containers tier: this machine's images, and the containers, networks and volumes a test makes.

Images, built when missing and otherwise reused (podman's layer cache turns a rebuild after a code change
into seconds: only the layer that installs the project runs again):

- BASE_IMAGE: Debian bookworm from Debian's packages (``debootstrap --variant=minbase`` with python3, its
  venv module and pip), imported as an image. It stands in for the public ``python:3.11-slim-bookworm`` the
  Dockerfiles default to, since no image registry is reachable from this project's machines.
- NODE_IMAGE: deploy/Dockerfile on BASE_IMAGE, torch pinned by the Makefile's TORCH_SPEC. Where a local
  directory of wheels holds a torch wheel (pip's find-links here: a CPU build), it is mounted into the build
  and handed to pip (TORCH_FIND_LINKS), and torch's own dependencies come from PyPI; elsewhere the
  Dockerfile's defaults apply (PyTorch's CPU index).
- PROMETHEUS_IMAGE: deploy/prometheus/Dockerfile on BASE_IMAGE (Debian's prometheus package).

Every podman command runs with CONTAINERS_CONF set to containers.conf beside this file (runc, ulimits
within this machine's), unless the caller's environment names another. Everything a test creates carries
its ``Scope``'s unique prefix and is removed by ``Scope.remove()``, which then checks that nothing is left.

``python -m tests.containers.podman`` builds the three images (make container-images).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from tests.procs import REPO

BASE_IMAGE = "localhost/commons-debian-base:bookworm"
NODE_IMAGE = "localhost/commons-node:latest"  # the names deploy/compose.yaml uses by default
PROMETHEUS_IMAGE = "localhost/commons-prometheus:latest"
CONTAINERS_CONF = Path(__file__).with_name("containers.conf")
PACKAGES = "podman runc debootstrap golang-github-containernetworking-plugin-dnsname"
INSTALL = f"make container-packages (as root: apt-get install --no-install-recommends {PACKAGES})"
# Where debootstrap's base gets its Python: bookworm's python3 is 3.11, the version the Dockerfile's default
# base image has, and the one this machine's local torch wheel is built for.
SUITE = "bookworm"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def environment() -> Dict[str, str]:
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    return env


def run(*args: str, timeout: float = 120, check: bool = True) -> str:
    """Run ``podman args...``; its stdout. AssertionError with podman's stderr when it fails and ``check``."""
    done = subprocess.run(["podman", *args], capture_output=True, timeout=timeout, env=environment())
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:3])}... exited {done.returncode}: {done.stderr.decode()}")
    return done.stdout.decode()


def image_exists(name: str) -> bool:
    return subprocess.run(["podman", "image", "exists", name], capture_output=True, env=environment()).returncode == 0


def missing_tools() -> List[str]:
    """The programs the tier needs that this machine lacks (podman-compose comes with the dev extras)."""
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    if not any(Path(d, "dnsname").exists() for d in ("/usr/lib/cni", "/opt/cni/bin")):
        missing.append("the CNI dnsname plugin")  # containers on a network find each other by name with it
    return missing


def torch_spec() -> str:
    """The Makefile's TORCH_SPEC: the image pins torch as `make install` does."""
    found = re.search(r"^TORCH_SPEC \?= (\S+)$", (REPO / "Makefile").read_text(), re.M)
    assert found, "the Makefile sets no TORCH_SPEC"
    return found.group(1)


def local_torch_wheels() -> Optional[Path]:
    """A local directory holding a torch wheel, from COMMONS_TORCH_WHEELS or pip's find-links (PIP_FIND_LINKS)."""
    for entry in (os.environ.get("COMMONS_TORCH_WHEELS", "") + " " + os.environ.get("PIP_FIND_LINKS", "")).split():
        path = Path(entry.removeprefix("file://"))
        if path.is_dir() and any(path.glob("torch-*.whl")):
            return path
    return None


def ensure_base_image() -> float:
    """Build BASE_IMAGE unless it exists (debootstrap needs root, ~1 min and ~300 MB); the seconds it took."""
    if image_exists(BASE_IMAGE):
        return 0.0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="commons-debootstrap-", dir="/var/tmp") as tmp:
        root = Path(tmp) / "root"
        subprocess.run(
            ["debootstrap", "--variant=minbase", "--include=python3,python3-venv,python3-pip", SUITE, str(root)],
            check=True, capture_output=True, timeout=900,
        )  # fmt: skip
        # The downloaded packages and package lists are the build's, not the image's (a Dockerfile that
        # installs packages runs apt-get update first).
        tar = subprocess.Popen(
            ["tar", "-C", str(root), "--exclude=./var/cache/apt/archives/*.deb",
             "--exclude=./var/lib/apt/lists/*_Packages", "-c", "."],
            stdout=subprocess.PIPE,
        )  # fmt: skip
        imported = subprocess.run(
            ["podman", "import", "--change", 'CMD ["python3"]', "-", BASE_IMAGE],
            stdin=tar.stdout, capture_output=True, env=environment(), timeout=600,
        )  # fmt: skip
        assert tar.stdout is not None
        tar.stdout.close()
        assert tar.wait() == 0 and imported.returncode == 0, imported.stderr.decode()
    return time.monotonic() - started


def build(dockerfile: Path, context: Path, tag: str, args: Dict[str, str], volumes: Sequence[str] = ()) -> float:
    """``podman build`` in Docker's image format (OCI images drop HEALTHCHECK); the seconds it took."""
    started = time.monotonic()
    command = ["build", "--format", "docker", "--network", "host", "-f", str(dockerfile), "-t", tag]
    for name, value in args.items():
        command += ["--build-arg", f"{name}={value}"]
    for volume in volumes:
        command += ["-v", volume]
    done = subprocess.run(["podman", *command, str(context)], capture_output=True, env=environment(), timeout=1800)
    assert done.returncode == 0, f"podman build of {tag} failed:\n{done.stdout.decode()[-4000:]}{done.stderr.decode()}"
    return time.monotonic() - started


def build_node_image(tag: str = NODE_IMAGE) -> float:
    args = {"BASE_IMAGE": BASE_IMAGE, "TORCH_SPEC": torch_spec()}
    volumes: List[str] = []
    wheels = local_torch_wheels()
    if wheels is not None:
        # PyPI's torch is a multi-GB CUDA build and PyTorch's index is out of reach here: the local wheel
        # wins, and PyPI serves torch's own dependencies.
        args.update(TORCH_INDEX_URL="https://pypi.org/simple", TORCH_FIND_LINKS="/wheels")
        volumes.append(f"{wheels}:/wheels:ro")
    if HOST_CA_BUNDLE.is_file():
        # pip in the build trusts what this machine trusts (PyPI may be reached through a TLS-inspecting
        # proxy whose CA only the host knows). Mounted for the build only: the image keeps Debian's bundle.
        volumes.append(f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro")
    return build(REPO / "deploy" / "Dockerfile", REPO, tag, args, volumes)


def build_prometheus_image(tag: str = PROMETHEUS_IMAGE) -> float:
    context = REPO / "deploy" / "prometheus"
    return build(context / "Dockerfile", context, tag, {"BASE_IMAGE": BASE_IMAGE})


def build_images() -> Dict[str, float]:
    """All three images; seconds per image (0 for a base image that was there already)."""
    return {
        BASE_IMAGE: ensure_base_image(),
        NODE_IMAGE: build_node_image(),
        PROMETHEUS_IMAGE: build_prometheus_image(),
    }


def image_size(name: str) -> int:
    return int(run("image", "inspect", "--format", "{{.Size}}", name).strip())


class Scope:
    """A unique prefix for one test's containers, networks and volumes (a compose project's name too), and
    the removal of everything whose name carries it, also after a failure."""

    def __init__(self) -> None:
        self.prefix = f"commons-test-{os.getpid()}-{secrets.token_hex(3)}"

    def name(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    def network(self) -> str:
        name = self.name("net")
        run("network", "create", name)
        return name

    def _named(self, kind: str) -> List[str]:
        if kind == "container":
            listing = ["container", "ls", "--all", "--format", "{{.Names}}"]
        else:
            listing = [kind, "ls", "--format", "{{.Name}}"]
        listed = run(*listing, "--filter", f"name={self.prefix}", check=False)
        return [name for name in listed.split() if name.startswith(self.prefix)]

    def remove(self) -> List[str]:
        """Remove what this scope named (its containers' anonymous volumes too); what could not be removed."""
        containers = self._named("container")
        if containers:
            run("rm", "--force", "--volumes", "--ignore", "--time", "5", *containers, check=False)
        for kind in ("volume", "network"):
            for name in self._named(kind):
                run(kind, "rm", "--force", name, check=False)
        return self._named("container") + self._named("volume") + self._named("network")


def main() -> int:
    missing = missing_tools()
    if missing:
        print(f"missing: {', '.join(missing)}; install them with {INSTALL}", file=sys.stderr)
        return 1
    for image, seconds in build_images().items():
        size = image_size(image) / 1e6
        print(f"{image}: {'built in %.0f s' % seconds if seconds else 'already there'}, {size:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
