"""How the controller and the daemon log: `--log-format text|json`.

Owns the process's logging setup (one handler on the root logger, stderr) and
the JSON line format, one object per line for a log pipeline (Loki, Elastic,
Cloud Logging) to index without parsing prose:

    {"time": "2026-11-27T09:30:01.123Z", "level": "INFO", "logger": "vpblu.node.stream",
     "message": "...", "node": "node1", "generation": 17179869190}

Every line carries `node` and `generation` (null when not known yet):

- `node`: the node the line is about when the call site says so
  (`log.info(..., extra={"node": name})`), else the process's own node: the
  daemon's `--node-name`, the controller's `NODE_NAME` (the Deployment sets
  it from `spec.nodeName`);
- `generation`: the call site's `extra={"generation": g}`, else the process's
  own: the daemon's applied generation, the leader's current desired-state
  generation (a follower's last one while it led, or null).

The process's generation is read through a callable that its metrics object
attaches once it exists (`attach_generation`): the formatter never imports an
actor and no actor knows about log formats. Logging is process-wide by
nature (the root logger), so the formatter is found on the root handler
rather than passed around; nothing else here is global. An exception's
traceback goes in `exception` as text. Fields a call site adds through
`extra` that JSON can carry are kept; private key material must never be
logged in the first place (nothing here filters it).
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The attributes every LogRecord has; anything else came through `extra`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, with `node` and `generation` on every one."""

    def __init__(self, node: str | None = None) -> None:
        super().__init__()
        self.node = node
        self._generation: Callable[[], int | None] | None = None

    def follow_generation(self, generation: Callable[[], int | None]) -> None:
        self._generation = generation

    def generation(self) -> int | None:
        if self._generation is None:
            return None
        try:
            return self._generation()
        except Exception:  # a log line must never fail because of its context
            return None

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "node": self.node,
            "generation": self.generation(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value if _plain(value) else repr(value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=repr)


def _plain(value: object) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def configure(level: str, log_format: str = "text", *, node: str | None = None,
              stream: Any = None) -> logging.Handler:
    """Install the process's one log handler (replacing any) and return it."""
    if log_format not in FORMATS:
        raise ValueError(f"--log-format must be one of {', '.join(FORMATS)}, not {log_format!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter(node) if log_format == "json"
                         else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def attach_generation(generation: Callable[[], int | None]) -> None:
    """Let JSON lines carry the process's generation from now on (a no-op for
    text logs, and when logging was not set up by `configure`)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, JsonFormatter):
            handler.formatter.follow_generation(generation)
