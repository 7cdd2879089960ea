# -*- test-case-name: tests.test_manifests -*-
"""
The daemon's log observers: C{--log-format text} (one human line per
event) and C{--log-format json} (one JSON object per line, nothing else on
the stream, so log shippers can parse every line).
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import ILogObserver, LogLevel, formatEvent
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
        if event.get("fault"):
            # Only on requests the proxy or the upstream cut (timeouts, drain).
            out["fault"] = event["fault"]
        if event.get("truncated"):
            # Only on responses that started and did not end complete.
            out["truncated"] = event["truncated"]
        if event.get("mode") not in (None, "reverse"):
            # Only on requests that did not come to the proxy as its own: forward,
            # connect (inside a CONNECT tunnel) or tunnel (the CONNECT itself).
            out["mode"] = event["mode"]
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


# Access lines are flushed in batches: those of one reactor turn (under
# load, the requests that ended together) in one write, as soon as the turn
# is over, so a client that got its response finds its line already there;
# anything else is flushed at once.
FLUSH_SECONDS = 0.0


@implementer(ILogObserver)
class LineObserver:
    """
    Writes each event at or above C{level} as one line (JSON or text) to a
    stream.  With a C{clock}, access lines are flushed in batches rather
    than one write system call per request.
    """

    def __init__(self, stream: IO[str], json_format: bool, level: LogLevel = LogLevel.info,
                 clock: IReactorTime | None = None) -> None:
        self._stream = stream
        self._format = json_line if json_format else text_line
        self._level = level
        self._clock = clock
        self._flush_call: IDelayedCall | None = None

    def __call__(self, event: Mapping[str, Any]) -> None:
        level = event.get("log_level")
        if level is not None and level < self._level:
            return
        try:
            line = self._format(event)
        except Exception as e:  # a bad format string must not kill logging
            line = json.dumps({"time": _time(event), "level": "error",
                               "message": f"unformattable log event: {e!r}"})
        self._stream.write(line + "\n")
        if self._clock is None or not event.get("access"):
            self.flush()
        elif self._flush_call is None:
            self._flush_call = self._clock.callLater(FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        self._stream.flush()


# How much of the log the proxy's own stdout buffer holds between flushes.
STDOUT_BUFFER = 64 * 1024


def buffered_stdout() -> IO[str]:
    """
    Standard output as a stream the observer alone flushes.  Python's
    C{sys.stdout} writes every line through at once when
    C{PYTHONUNBUFFERED} is set (as container images often do): one write
    system call per request, which undid the batching of access lines
    (about 15 us a request here).  Falls back to C{sys.stdout} when it is
    not a file (tests replace it).
    """
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return sys.stdout
    raw = io.FileIO(fd, "w", closefd=False)
    return io.TextIOWrapper(io.BufferedWriter(raw, STDOUT_BUFFER), encoding=sys.stdout.encoding or "utf-8",
                            errors="backslashreplace", write_through=False)


def observer(log_format: str, level: str = "info", stream: IO[str] | None = None,
             clock: IReactorTime | None = None) -> LineObserver:
    return LineObserver(stream or buffered_stdout(), log_format == "json", LEVELS[level], clock)
