# -*- test-case-name: tests.test_manifests,tests.test_metrics -*-
"""
One access-log event per request (docs/operations.md, "Logs"), emitted through
L{twisted.logger} so the same event becomes a text line or a JSON object
depending on C{--log-format}.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

from attrs import frozen
from twisted.logger import Logger

# Query parameters whose values are never logged: the four docs/operations.md
# names ("Logs"), and the names common tools use for the same thing.
SECRET_PARAMETERS = frozenset({
    "token", "access_token", "password", "secret", "refresh_token", "id_token", "private_token",
    "client_secret", "api_key", "apikey", "sig", "signature", "x-amz-signature", "x-amz-credential",
    "x-amz-security-token",
})
_PARAM = re.compile(rb"([^&;=]*)=([^&;]*)")

log = Logger(namespace="connectors_proxy.access")

ACCESS_FORMAT = (
    "{client} {identity} {namespace}/{connector} \"{method} {path}\" {status} "
    "in={bytes_in} out={bytes_out} {duration_ms}ms"
)


def _without_userinfo(target: bytes) -> bytes:
    """
    An absolute-form or C{CONNECT} target with its user info (a client's
    password for the target: the proxy refuses such targets, but logs
    them) replaced by C{REDACTED}.
    """
    scheme = target.find(b"://")
    start = scheme + 3 if scheme >= 0 else 0
    end = len(target)
    for mark in (b"/", b"?", b"#"):
        found = target.find(mark, start)
        if 0 <= found < end:
            end = found
    at = target.rfind(b"@", start, end)
    if at < 0:
        return target
    return target[:start] + b"REDACTED" + target[at:]


def redact_target(target: bytes) -> str:
    """
    The request target for a log line: the values of secret-looking query
    parameters (C{token}, C{access_token}, C{password}, C{secret}) and any
    user info of an absolute-form target replaced by C{REDACTED}; anything
    that is not text shown escaped.
    """
    if not target.startswith(b"/"):
        target = _without_userinfo(target)
    path, sep, query = target.partition(b"?")
    if sep:
        def redact(match: re.Match[bytes]) -> bytes:
            name = match.group(1)
            # Upstreams decode "%74oken" as "token": so does the check.
            key = unquote_to_bytes(name.replace(b"+", b" ")).decode("utf-8", "replace").strip().lower()
            if key in SECRET_PARAMETERS:
                return name + b"=REDACTED"
            return match.group(0)

        query = _PARAM.sub(redact, query)
    return (path + sep + query).decode("utf-8", "backslashreplace")


@frozen
class AccessRecord:
    client: str
    identity: str
    namespace: str
    connector: str
    protocol: str
    method: str
    path: str
    status: int
    bytes_in: int
    bytes_out: int
    duration_ms: float
    # Set when the proxy ended the request itself (see L{FAULT_STATUS}).
    fault: str | None = None
    # Set when a response that had started did not end complete: cut by
    # the "upstream" (reset mid-body), the "client" (gone mid-body) or the
    # "proxy"; its status stays the one that was sent.
    truncated: str | None = None
    # How the request reached the proxy (see L{MODES}).
    mode: str = "reverse"


#: How a request reached the proxy: addressed to it (C{reverse}), in
#: absolute form through C{http_proxy} (C{forward}), inside an intercepted
#: C{CONNECT} tunnel (C{connect}), or as the C{CONNECT} itself, logged when
#: its tunnel closes (C{tunnel}).
MODES = ("reverse", "forward", "connect", "tunnel")


# Why the proxy may end a request itself, and the status logged for it
# when no response had started: the client did not go away (499), the
# proxy or the upstream cut it.
FAULT_STATUS = {
    "upstream-timeout": 504,
    "upstream-idle-timeout": 504,
    "drain": 503,
}


def truncated_by(failed: bool, started: bool, truncated: str | None) -> str | None:
    """
    Who cut a response short: nobody for a complete one (or one that never
    started: its status says it), else what the relay recorded, and
    otherwise the client (its connection went first).
    """
    if not failed or not started:
        return None
    return truncated or "client"


def status_of(code: int, failed: bool, started: bool, fault: str | None) -> int:
    """
    The status an access line shows: the response's, or for a request that
    ended before any response (C{failed} and not C{started}), 499 (the
    client went away) unless the proxy cut it for a C{fault}.
    """
    if not failed or started:
        return code
    return FAULT_STATUS.get(fault or "", 499)


_FIELDS = tuple(a.name for a in AccessRecord.__attrs_attrs__)  # type: ignore[attr-defined]


def emit(record: AccessRecord) -> None:
    fields = {name: getattr(record, name) for name in _FIELDS}
    # Formatted here once with str.format (C code); the observers use it
    # instead of twisted.logger's pure-Python formatter.
    text = ACCESS_FORMAT.format(**fields)
    if record.fault:
        text += f" fault={record.fault}"
    if record.truncated:
        text += f" truncated={record.truncated}"
    if record.mode != "reverse":
        text += f" mode={record.mode}"
    log.info(ACCESS_FORMAT, access=True, access_text=text, **fields)
