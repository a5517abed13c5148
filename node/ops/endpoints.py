"""The node's HTTP endpoints: /metrics, /metrics/swarm, /healthz, /readyz.

A small threaded HTTP server (stdlib) on its own thread, owned by the Node and shut down
with it. Health is decided from a ``Health`` object the training loop updates:

- /readyz  200 once the node has joined its swarm and printed its ready line, until it
           starts leaving; 503 otherwise.
- /healthz 200 while the node is joined and made progress (a training step or an
           averaging round) within ``stall_seconds``; 503 with a JSON reason otherwise,
           e.g. when its data source is unavailable.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, Optional, Tuple

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
        raise ConfigError(f"{what}: {text!r} must be HOST:PORT, e.g. 127.0.0.1:9100")
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
        idle = self.clock() - self.last_progress
        if idle > self.stall_seconds:
            return False, {"status": "unhealthy", "reason": f"no training progress for {idle:.0f}s"}
        return True, {"status": "ok", "seconds_since_progress": round(idle, 3)}

    def ready(self) -> bool:
        return self.joined and not self.leaving


class Endpoints:
    """Serves the node's registries and health on ``host:port`` (port 0 picks a free one)."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, swarm: CollectorRegistry, health: Health):
        routes: Dict[str, Callable[[], Tuple[int, str, bytes]]] = {
            "/metrics": lambda: (200, CONTENT_TYPE_LATEST, generate_latest(registry)),
            "/metrics/swarm": lambda: (200, CONTENT_TYPE_LATEST, generate_latest(swarm)),
            "/healthz": lambda: _json(*health.check()),
            "/readyz": lambda: _json(health.ready(), {"status": "ready" if health.ready() else "not ready"}),
        }

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                route = routes.get(self.path.split("?", 1)[0])
                code, kind, body = route() if route else (404, "text/plain", b"not found\n")
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
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
        host, port = self.address
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}{path}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _json(ok: bool, details: Dict[str, object]) -> Tuple[int, str, bytes]:
    return (200 if ok else 503), "application/json", (json.dumps(details) + "\n").encode()


def open_endpoints(address: str, registry: CollectorRegistry, swarm: CollectorRegistry, health: Health) -> Endpoints:
    """Serve on ``address`` (HOST:PORT). If the default address is taken (a second node on this
    host), serve on a free port instead and say so; a taken address the user chose is an error."""
    host, port = validate_host_port(address, "--metrics-addr")
    try:
        return Endpoints(host, port, registry, swarm, health)
    except OSError as e:
        if address != DEFAULT_METRICS_ADDR:
            raise ConfigError(f"--metrics-addr {address}: {e.strerror}; pick another address") from None
        logger.warning("metrics port %d is taken (%s); serving on a free port instead", port, e.strerror)
        return Endpoints(host, 0, registry, swarm, health)
