"""--log-format json: one JSON object per line, node and generation on every one."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from vpblu import logformat


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_every_json_line_has_node_and_generation(restore_root: None) -> None:
    out = io.StringIO()
    logformat.configure("INFO", "json", node="node1", stream=out)
    log = logging.getLogger("vpblu.test")
    log.info("before any generation %d", 1)
    generation = {"now": 17179869190}
    logformat.attach_generation(lambda: generation["now"])
    log.warning("peer %s changed", "node2", extra={"peer": "node2"})
    log.info("about another node", extra={"node": "node3", "generation": 5})
    log.debug("below the level")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    first, second, third, fourth = lines(out)
    assert first["node"] == "node1" and first["generation"] is None
    assert first["message"] == "before any generation 1" and first["level"] == "INFO"
    assert first["logger"] == "vpblu.test" and str(first["time"]).endswith("Z")
    assert second["generation"] == 17179869190 and second["peer"] == "node2"
    assert third["node"] == "node3" and third["generation"] == 5
    assert "ValueError: boom" in str(fourth["exception"]) and fourth["level"] == "ERROR"


def test_a_failing_generation_source_never_fails_the_line(restore_root: None) -> None:
    out = io.StringIO()
    logformat.configure("INFO", "json", stream=out)

    def broken() -> int:
        raise RuntimeError("gone")

    logformat.attach_generation(broken)
    logging.getLogger("vpblu.test").info("still logged")
    (line,) = lines(out)
    assert line["generation"] is None and line["node"] is None


def test_text_stays_text_and_a_bad_format_is_refused(restore_root: None) -> None:
    out = io.StringIO()
    logformat.configure("INFO", "text", stream=out)
    logformat.attach_generation(lambda: 3)  # no-op for text
    logging.getLogger("vpblu.test").info("plain")
    assert out.getvalue().rstrip().endswith("INFO vpblu.test: plain")
    with pytest.raises(ValueError, match="--log-format must be one of text, json"):
        logformat.configure("INFO", "xml")
