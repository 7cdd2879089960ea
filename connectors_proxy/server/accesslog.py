# -*- test-case-name: tests.test_accesslog -*-
"""
One access-log event per request (SPEC section 9), emitted through
L{twisted.logger} so the same event becomes a text line or a JSON object
depending on C{--log-format}.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

from attrs import frozen
from twisted.logger import Logger

# Query parameters whose values are never logged: the SPEC's four, and the
# names common tools use for the same thing.
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


def redact_target(target: bytes) -> str:
    """
    The request target for a log line: the values of secret-looking query
    parameters (C{token}, C{access_token}, C{password}, C{secret}) replaced
    by C{REDACTED}; anything that is not text shown escaped.
    """
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


_FIELDS = tuple(a.name for a in AccessRecord.__attrs_attrs__)  # type: ignore[attr-defined]


def emit(record: AccessRecord) -> None:
    fields = {name: getattr(record, name) for name in _FIELDS}
    # Formatted here once with str.format (C code); the observers use it
    # instead of twisted.logger's pure-Python formatter.
    log.info(ACCESS_FORMAT, access=True, access_text=ACCESS_FORMAT.format(**fields), **fields)
