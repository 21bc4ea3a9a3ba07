"""node.log keeps every field a log call passes, through the setup `cloudless node` uses."""

import json
import logging

import pytest

from cloudless.observability.logging import StructuredLogger, configure
from cloudless.raft.core import Role
from cloudless.testing.raft_sim import RaftHarness


@pytest.fixture
def node_log(tmp_path):
    """Configure logging as `cloudless node` does; yields a reader of node.log's JSON lines."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    configure(tmp_path / "logs", "debug", console=False)

    def read() -> list[dict]:
        for handler in root.handlers:
            handler.flush()
        return [json.loads(line) for line in (tmp_path / "logs" / "node.log").read_text().splitlines()]

    yield read
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])


def test_raft_became_leader_line_carries_node_and_term(node_log):
    h = RaftHarness(["a", "b", "c"])
    h.elect("a")
    assert h["a"].role is Role.LEADER
    [line] = [r for r in node_log() if r["event"] == "raft.became_leader"]
    assert line["node"] == "a"
    assert line["term"] == h["a"].term
    assert line["logger"] == "cloudless.raft.core" and line["level"] == "info"


def test_module_loggers_are_structured_loggers():
    assert isinstance(logging.getLogger("cloudless.raft.core"), StructuredLogger)


def test_reserved_record_attribute_names_are_fields_not_a_key_error(node_log):
    log = logging.getLogger("cloudless.test.reserved")
    log.warning("test.reserved", extra={"name": "busybox", "msg": "m", "message": "x", "args": [1, 2]})
    [line] = [r for r in node_log() if r["event"] == "test.reserved"]
    assert line["name"] == "busybox" and line["msg"] == "m" and line["message"] == "x" and line["args"] == [1, 2]
    assert line["logger"] == "cloudless.test.reserved"  # the record's own name is untouched


def test_fields_named_like_the_line_header_are_suffixed_and_header_kept(node_log):
    logging.getLogger("cloudless.test.header").info("test.header", extra={"event": "e", "level": 3, "ts": "t"})
    [line] = [r for r in node_log() if r["event"] == "test.header"]
    assert (line["event_"], line["level_"], line["ts_"]) == ("e", 3, "t")
    assert line["level"] == "info" and isinstance(line["ts"], float)


def test_nested_fields_form_is_flattened_and_values_stay_json(node_log):
    log = logging.getLogger("cloudless.test.nested")
    log.info("test.nested", extra={"fields": {"node": "n1", "voters": ("a", "b")}, "peer": object.__name__})
    [line] = [r for r in node_log() if r["event"] == "test.nested"]
    assert line["node"] == "n1" and line["voters"] == ["a", "b"] and line["peer"] == "object"
    assert "fields" not in line


def test_a_foreign_logger_extra_still_reaches_node_log(node_log):
    # A logger made before our class was installed (or by another library) is a plain Logger.
    foreign = logging.Logger("foreign.lib")
    foreign.parent = logging.getLogger()
    foreign.info("foreign.event", extra={"remote": "1.2.3.4:5"})
    [line] = [r for r in node_log() if r["event"] == "foreign.event"]
    assert line["remote"] == "1.2.3.4:5"


def test_exception_traceback_is_kept(node_log):
    log = logging.getLogger("cloudless.test.exc")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("test.failed", extra={"what": "x"})
    [line] = [r for r in node_log() if r["event"] == "test.failed"]
    assert line["what"] == "x" and "RuntimeError: boom" in line["exception"]
