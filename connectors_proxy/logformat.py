# -*- test-case-name: tests.test_logformat -*-
"""
The daemon's log observers: C{--log-format text} (one human line per
event) and C{--log-format json} (one JSON object per line, nothing else on
the stream, so log shippers can parse every line).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
)
from zope.interface import implementer

LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn, "error": LogLevel.error}

# Access-log fields, in their documented order.
ACCESS_FIELDS = ("client", "identity", "namespace", "connector", "protocol", "method", "path",
                 "status", "bytes_in", "bytes_out", "duration_ms")


_second: list[Any] = [None, ""]


def _time(event: Mapping[str, Any]) -> str:
    stamp = event.get("log_time") or 0.0
    second = int(stamp)
    if _second[0] != second:
        # Formatting a datetime costs more than the rest of the line.
        _second[0] = second
        _second[1] = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{_second[1]}.{int((stamp - second) * 1000):03d}Z"


def _message(event: Mapping[str, Any]) -> str:
    text = event.get("access_text")
    return text if text is not None else formatEvent(dict(event))


def _level(event: Mapping[str, Any]) -> str:
    level = event.get("log_level")
    return level.name if level is not None else "info"


def _failure_text(event: Mapping[str, Any]) -> str | None:
    failure = event.get("log_failure")
    if failure is None:
        return None
    try:
        return str(failure.getTraceback())
    except Exception:
        return repr(failure.value)


def json_line(event: Mapping[str, Any]) -> str:
    """One event as one JSON object with stable field names."""
    out: dict[str, Any] = {
        "time": _time(event),
        "level": _level(event),
        "logger": event.get("log_namespace", ""),
        "message": _message(event),
    }
    if event.get("access"):
        out["event"] = "access"
        for name in ACCESS_FIELDS:
            out[name] = event.get(name)
    elif isinstance(event.get("event"), str):
        # Operational events (drain, reload, signal) name themselves with
        # "event" and carry their own plain fields.
        for name, value in event.items():
            if not name.startswith("log_") and name not in out and isinstance(value, (str, int, float, bool)):
                out[name] = value
    traceback = _failure_text(event)
    if traceback:
        out["traceback"] = traceback
    return json.dumps(out, default=str, separators=(",", ":"))


def text_line(event: Mapping[str, Any]) -> str:
    line = f"{_time(event)} [{_level(event)}] {_message(event)}"
    traceback = _failure_text(event)
    if traceback:
        line += "\n" + traceback.rstrip()
    return line


@implementer(ILogObserver)
class LineObserver:
    """Writes each event as one line (JSON or text) to a stream."""

    def __init__(self, stream: IO[str], json_format: bool) -> None:
        self._stream = stream
        self._format = json_line if json_format else text_line

    def __call__(self, event: Mapping[str, Any]) -> None:
        try:
            line = self._format(event)
        except Exception as e:  # a bad format string must not kill logging
            line = json.dumps({"time": _time(event), "level": "error",
                               "message": f"unformattable log event: {e!r}"})
        self._stream.write(line + "\n")
        self._stream.flush()


def observer(log_format: str, level: str = "info", stream: IO[str] | None = None) -> ILogObserver:
    predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])
    return FilteringLogObserver(LineObserver(stream or sys.stdout, log_format == "json"), [predicate])
