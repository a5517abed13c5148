"""Logging to stderr as readable text or one JSON object per line; hivemind's logs included."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Dict, TextIO

# hivemind renames WARNING to "WARN" process-wide; JSON logs keep the names --log-level takes.
_LEVEL_NAMES = {10: "debug", 20: "info", 30: "warning", 40: "error", 50: "critical"}
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """timestamp, level, logger, message, plus any ``extra={...}`` fields (event, round, loss, ...)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: Dict[str, Any] = {
            "timestamp": round(record.created, 3),
            "level": _LEVEL_NAMES.get(record.levelno, record.levelname.lower()),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                # LogRecord owns "module" (the Python module): callers pass module_name for ours.
                entry["module" if key == "module_name" else key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        self.converter = time.localtime


def setup_logging(log_format: str = "text", level: str = "info", stream: TextIO = sys.stderr) -> None:
    """Install one stderr handler on the root logger and send hivemind's records through it (with
    node.net.route_hivemind_logs once hivemind is imported)."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # hivemind installs a handler of its own when it is imported: node/net/hivemind.py turns it off
    # (route_hivemind_logs) and keeps the level set here.
    hivemind_logger = logging.getLogger("hivemind")
    for old in list(hivemind_logger.handlers):  # whatever its own setup left there
        hivemind_logger.removeHandler(old)
    hivemind_logger.propagate = True
    # hivemind logs routine events at INFO; keep them unless the user asked for debug output.
    hivemind_logger.setLevel(logging.DEBUG if level == "debug" else max(logging.WARNING, root.level))
