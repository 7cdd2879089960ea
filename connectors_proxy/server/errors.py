# -*- test-case-name: tests.test_errors -*-
"""
Errors the proxy itself answers with: a status, a machine-readable code and a
message that names the problem and what to fix.  Never a traceback, never a
credential.

Two bodies: C{text/plain} for REST and git clients (git prints it to the
user), and the OCI error body C{{"errors":[{"code","message"}]}} for
registry clients.
"""

from __future__ import annotations

import json

from twisted.web.http_headers import Headers

REALM_CHALLENGE = b'Basic realm="connectors-proxy"'

# The answer to an OCI "/v2/" ping, which the proxy gives itself.
OCI_PING_HEADERS = {
    b"Content-Type": b"application/json",
    b"Docker-Distribution-API-Version": b"registry/2.0",
}


class ProxyError(Exception):
    """
    A request the proxy refuses or cannot complete.

    @ivar code: an OCI-style code (C{UNAUTHORIZED}, C{DENIED}, C{NAME_UNKNOWN},
        C{BAD_REQUEST}, C{UPSTREAM_UNAVAILABLE}...), also shown to REST clients.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"ProxyError({self.status}, {self.code!r}, {self.message!r})"


def unauthorized(message: str) -> ProxyError:
    return ProxyError(401, "UNAUTHORIZED", message)


def forbidden(message: str) -> ProxyError:
    return ProxyError(403, "DENIED", message)


def not_found(message: str) -> ProxyError:
    return ProxyError(404, "NAME_UNKNOWN", message)


def bad_request(message: str) -> ProxyError:
    return ProxyError(400, "BAD_REQUEST", message)


def bad_gateway(message: str) -> ProxyError:
    return ProxyError(502, "UPSTREAM_ERROR", message)


def unavailable(message: str) -> ProxyError:
    return ProxyError(503, "UNAVAILABLE", message)


def error_response(error: ProxyError, oci: bool) -> tuple[Headers, bytes]:
    """The headers and body of the response for C{error}."""
    headers = Headers()
    if oci:
        body = json.dumps({"errors": [{"code": error.code, "message": error.message}]}).encode() + b"\n"
        headers.setRawHeaders(b"Content-Type", [b"application/json"])
        headers.setRawHeaders(b"Docker-Distribution-API-Version", [b"registry/2.0"])
    else:
        body = f"connectors-proxy: {error.message}\n".encode()
        headers.setRawHeaders(b"Content-Type", [b"text/plain; charset=utf-8"])
    if error.status == 401:
        headers.setRawHeaders(b"WWW-Authenticate", [REALM_CHALLENGE])
    headers.setRawHeaders(b"Content-Length", [str(len(body)).encode()])
    return headers, body
