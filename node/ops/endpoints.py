"""The node's HTTP endpoints: /metrics, /metrics/swarm, /healthz, /readyz, and the swarm page.

A small threaded HTTP server (stdlib) on its own thread, owned by the Node and shut down
with it. Health is decided from a ``Health`` object the training loop updates:

- /readyz  200 once the node has joined its swarm and printed its ready line, until it
           starts leaving; 503 otherwise.
- /healthz 200 while the node is joined and made progress (a training step or an
           averaging round) within ``stall_seconds``; 503 with a JSON reason otherwise,
           e.g. when its data source is unavailable or the swarm's records cannot be read.
- /        the swarm page (page.html, self-contained: it requests nothing but /status.json here).
- /status.json  the page's data, from a callable the runtime hands in (this package knows nothing of it).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.resources
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from node.errors import ConfigError

logger = logging.getLogger(__name__)

# Loopback only unless asked; 9100 would collide with node_exporter on the same host.
DEFAULT_METRICS_ADDR = "127.0.0.1:9347"


def validate_host_port(text: str, what: str) -> Tuple[str, int]:
    """``HOST:PORT`` (an IPv6 host in brackets) as (host, port); ConfigError naming ``what`` otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what}: {text!r} must be HOST:PORT, e.g. 127.0.0.1:9347")
    return host.strip("[]"), int(port)


@dataclass
class Health:
    """Written by the training thread, read by HTTP threads (single attribute writes only)."""

    stall_seconds: float
    clock: Callable[[], float] = time.monotonic
    joined: bool = False
    leaving: bool = False
    data_error: Optional[str] = None
    last_progress: float = field(default=0.0)
    swarm_error: Callable[[], Optional[str]] = lambda: None  # e.g. the swarm's records cannot be read (runtime)

    def progress(self) -> None:
        self.last_progress = self.clock()

    def check(self) -> Tuple[bool, Dict[str, object]]:
        """(healthy, details) for /healthz."""
        if not self.joined:
            return False, {"status": "unhealthy", "reason": "not joined to a swarm yet"}
        if self.leaving:
            return False, {"status": "unhealthy", "reason": "leaving the swarm"}
        if self.data_error:
            return False, {"status": "unhealthy", "reason": f"data source unavailable: {self.data_error}"}
        swarm_error = self.swarm_error()
        if swarm_error:
            return False, {"status": "unhealthy", "reason": swarm_error}
        idle = self.clock() - self.last_progress
        if idle > self.stall_seconds:
            return False, {"status": "unhealthy", "reason": f"no training progress for {idle:.0f}s"}
        return True, {"status": "ok", "seconds_since_progress": round(idle, 3)}

    def ready(self) -> bool:
        return self.joined and not self.leaving


PageData = Callable[[], Mapping[str, Any]]  # the swarm page's JSON document, built by the runtime


class Endpoints:
    """Serves the node's registries and health on ``host:port`` (port 0 picks a free one); with ``page``,
    also the swarm page at ``/`` and its data at ``/status.json``."""

    def __init__(
        self, host: str, port: int, registry: CollectorRegistry, swarm: CollectorRegistry, health: Health,
        page: Optional[PageData] = None,
    ) -> None:  # fmt: skip
        routes: Dict[str, Callable[[], Tuple[int, str, bytes]]] = {
            "/metrics": lambda: (200, CONTENT_TYPE_LATEST, generate_latest(registry)),
            "/metrics/swarm": lambda: (200, CONTENT_TYPE_LATEST, generate_latest(swarm)),
            "/healthz": lambda: _json(*health.check()),
            "/readyz": lambda: _json(health.ready(), {"status": "ready" if health.ready() else "not ready"}),
        }
        headers: Dict[str, Dict[str, str]] = {}  # per route, beyond the usual ones
        if page is not None:
            html, policy = swarm_page()
            routes["/"] = lambda: (200, "text/html; charset=utf-8", html)
            routes["/status.json"] = lambda: _page_data(page)
            headers["/"] = {"Content-Security-Policy": policy}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                path = self.path.split("?", 1)[0]
                route = routes.get(path)
                code, kind, body = route() if route else (404, "text/plain", b"not found\n")
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("X-Content-Type-Options", "nosniff")
                for name, value in headers.get(path, {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                logger.debug("http: " + format, *args)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="endpoints", daemon=True)
        self._thread.start()

    @property
    def address(self) -> Tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def url(self, path: str = "/metrics") -> str:
        """A URL a browser on this machine can open: listening on every interface (0.0.0.0 or ::), the
        loopback address of the same family stands in for the unroutable wildcard."""
        host, port = self.address
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}{path}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _json(ok: bool, details: Dict[str, object]) -> Tuple[int, str, bytes]:
    return (200 if ok else 503), "application/json", (json.dumps(details) + "\n").encode()


def _page_data(page: PageData) -> Tuple[int, str, bytes]:
    """The page's JSON; a failure to build it is a 500 the page shows, not a dead connection."""
    try:
        return 200, "application/json", (json.dumps(page(), allow_nan=False) + "\n").encode()
    except Exception as e:  # a bug in the builder: log it, keep serving
        logger.warning("building /status.json failed: %r", e)
        return 500, "application/json", (json.dumps({"error": f"building the page data failed: {e!r}"}) + "\n").encode()


def swarm_page() -> Tuple[bytes, str]:
    """The page (package data, read once per server) and its Content-Security-Policy: the page's own inline
    script and styles, requests to this server only (so nothing a peer wrote could load or send anything)."""
    html = importlib.resources.files("node.ops").joinpath("page.html").read_bytes()
    scripts = re.findall(rb"<script>(.*?)</script>", html, flags=re.DOTALL)
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s).digest()).decode()}'" for s in scripts)
    policy = (f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; connect-src 'self'; "
              "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")  # fmt: skip
    return html, policy


def open_endpoints(
    address: str, registry: CollectorRegistry, swarm: CollectorRegistry, health: Health,
    page: Optional[PageData] = None,
) -> Endpoints:  # fmt: skip
    """Serve on ``address`` (HOST:PORT). If the default address is taken (a second node on this
    host), serve on a free port instead and say so; a taken address the user chose is an error."""
    host, port = validate_host_port(address, "--metrics-addr")
    try:
        return Endpoints(host, port, registry, swarm, health, page)
    except OSError as e:
        if address != DEFAULT_METRICS_ADDR:
            raise ConfigError(f"--metrics-addr {address}: {e.strerror}; pick another address") from None
        logger.warning("metrics port %d is taken (%s); serving on a free port instead", port, e.strerror)
        return Endpoints(host, 0, registry, swarm, health, page)
