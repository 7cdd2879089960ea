# -*- test-case-name: tests.test_manifests,tests.test_memory_router -*-
"""
Errors the proxy itself answers with: a status, a machine-readable code and a
message that names the problem and what to fix.  Never a traceback, never a
credential.

Each protocol renders them in its clients' form
(L{connectors_proxy.protocols.ProtocolResource.error_response}); the
C{text/plain} form (REST and git: git prints it to the user) is here.
"""

from __future__ import annotations

from twisted.web.http_headers import Headers

REALM_CHALLENGE = b'Basic realm="connectors-proxy"'



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


def proxy_unauthorized(message: str) -> ProxyError:
    """A forward-proxy request without valid C{Proxy-Authorization}: 407, answered with a challenge."""
    return ProxyError(407, "UNAUTHORIZED", message)


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


def text_response(error: ProxyError) -> tuple[Headers, bytes]:
    """
    The headers and body of a C{text/plain} response for C{error} (REST and
    git clients; other protocols render their own, see
    L{connectors_proxy.protocols.ProtocolResource.error_response}).
    """
    headers = Headers()
    body = f"connectors-proxy: {error.message}\n".encode()
    headers.setRawHeaders(b"Content-Type", [b"text/plain; charset=utf-8"])
    challenge(headers, error)
    return headers, body


def challenge(headers: Headers, error: ProxyError) -> None:
    """
    A 401 carries the proxy's own Basic challenge: clients send the token
    after it.  A 407 carries it as C{Proxy-Authenticate}: forward-proxy
    clients (Java's, Sonar's, git's C{anyauth}) send C{Proxy-Authorization}
    only after that.
    """
    if error.status == 401:
        headers.setRawHeaders(b"WWW-Authenticate", [REALM_CHALLENGE])
    elif error.status == 407:
        headers.setRawHeaders(b"Proxy-Authenticate", [REALM_CHALLENGE])
