"""Unit tests for logging setup: JSON lines, readable text, hivemind's records included."""

from __future__ import annotations

import io
import json
import logging
import re
from typing import Iterator

import pytest

from node.ops.logs import setup_logging


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved_root = (list(root.handlers), root.level)
    watched = [logging.getLogger(name) for name in ("hivemind", "hivemind.foo", "node", "node.test")]
    saved = [(lg, list(lg.handlers), lg.level, lg.propagate) for lg in watched]
    try:
        yield
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved_root[0]:
            root.addHandler(handler)
        root.setLevel(saved_root[1])
        for lg, handlers, level, propagate in saved:
            for handler in list(lg.handlers):
                lg.removeHandler(handler)
            for handler in handlers:
                lg.addHandler(handler)
            lg.setLevel(level)
            lg.propagate = propagate


def _lines(stream: io.StringIO) -> list:
    return [line for line in stream.getvalue().splitlines() if line]


def test_json_lines_with_extra_fields() -> None:
    stream = io.StringIO()
    setup_logging("json", "info", stream=stream)
    logger = logging.getLogger("node.test")
    logger.info("round %d done", 3, extra={"round": 3, "eval_loss": 2.5})
    logger.warning("second line\nwith a newline")
    logger.debug("hidden at info")
    lines = _lines(stream)
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == "round 3 done"
    assert first["level"] == "info" and first["logger"] == "node.test"
    assert first["round"] == 3 and first["eval_loss"] == 2.5
    assert isinstance(first["timestamp"], float)
    assert {"timestamp", "level", "logger", "message"} <= set(second)
    assert second["message"] == "second line\nwith a newline" and second["level"] in ("warning", "warn")
    # No LogRecord internals leak into the object.
    assert not {"args", "msg", "levelno", "pathname", "exc_info"} & set(first)


def test_json_exception_and_unserializable_extra() -> None:
    stream = io.StringIO()
    setup_logging("json", "info", stream=stream)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("node.test").exception("failed", extra={"obj": object()})
    (line,) = _lines(stream)
    entry = json.loads(line)
    assert entry["level"] == "error" and "RuntimeError: boom" in entry["exception"]
    assert isinstance(entry["obj"], str)


def test_text_format_is_readable() -> None:
    stream = io.StringIO()
    setup_logging("text", "debug", stream=stream)
    logging.getLogger("node.test").info("hello %s", "world", extra={"round": 1})
    logging.getLogger("node.test").debug("details")
    lines = _lines(stream)
    assert len(lines) == 2
    assert re.fullmatch(r"\d\d:\d\d:\d\d INFO +node\.test: hello world", lines[0])
    assert lines[1].endswith("DEBUG   node.test: details")
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[0])


def test_level_filters() -> None:
    stream = io.StringIO()
    setup_logging("text", "warning", stream=stream)
    logging.getLogger("node.test").info("not shown")
    logging.getLogger("node.test").error("shown")
    assert len(_lines(stream)) == 1 and "shown" in stream.getvalue()


def test_hivemind_records_go_through_the_same_handler() -> None:
    stream = io.StringIO()
    setup_logging("json", "info", stream=stream)
    logging.getLogger("hivemind.foo").warning("from hivemind")
    logging.getLogger("hivemind.foo").info("routine hivemind chatter")  # kept out at info
    lines = _lines(stream)
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["logger"] == "hivemind.foo" and entry["message"] == "from hivemind"
    assert entry["level"] in ("warning", "warn")


def test_hivemind_debug_when_asked() -> None:
    stream = io.StringIO()
    setup_logging("json", "debug", stream=stream)
    logging.getLogger("hivemind.foo").debug("hivemind details")
    assert [json.loads(line)["message"] for line in _lines(stream)] == ["hivemind details"]


def test_setup_twice_keeps_one_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging("json", "info", stream=first)
    setup_logging("text", "info", stream=second)
    logging.getLogger("node.test").warning("once")
    assert first.getvalue() == "" and len(_lines(second)) == 1
    assert len(logging.getLogger().handlers) == 1


def test_json_level_names_match_log_level_option() -> None:
    stream = io.StringIO()
    setup_logging("json", "debug", stream=stream)
    logger = logging.getLogger("node.test")
    for method in (logger.debug, logger.info, logger.warning, logger.error):
        method("x")
    assert [json.loads(line)["level"] for line in _lines(stream)] == ["debug", "info", "warning", "error"]


def test_module_field_of_our_records() -> None:
    stream = io.StringIO()
    setup_logging("json", "info", stream=stream)
    logging.getLogger("node.test").info("averaged", extra={"round": 2, "module_name": "expert.0.1"})
    entry = json.loads(_lines(stream)[-1])
    assert entry["module"] == "expert.0.1" and entry["round"] == 2


def test_hivemind_own_handler_is_turned_off_and_the_level_kept() -> None:
    """hivemind adds a handler of its own when imported; the adapter sends its records to ours instead."""
    from hivemind.utils.logging import get_logger

    from node.net import route_hivemind_logs

    stream = io.StringIO()
    setup_logging("json", "info", stream=stream)
    route_hivemind_logs()
    get_logger("hivemind.foo").warning("from hivemind's own logger")
    get_logger("hivemind.foo").info("routine hivemind chatter")  # kept out at info
    assert logging.getLogger("hivemind").level == logging.WARNING
    assert [json.loads(line)["message"] for line in _lines(stream)] == ["from hivemind's own logger"]
