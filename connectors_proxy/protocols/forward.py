# -*- test-case-name: tests.test_upstream_compat -*-
"""
The forward-proxy relay for targets that are no listed Connector's
(C{--forward-unlisted allow}, upstream's behaviour: Maven fetching Central
through the proxy it was given for its own repository).

The request goes out as the client sent it, minus what is for this hop
(hop-by-hop fields, C{Proxy-Authorization}) and minus the client's
C{Authorization} (a ServiceAccount token is for the proxy, never for a
third party); no credentials are added; the response comes back as the
target sent it (cookies too: they are the client's own session there).
Where the target may be is L{connectors_proxy.upstream.forward}'s call.
"""

from __future__ import annotations

from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from connectors_proxy.protocols import ProtocolResource
from connectors_proxy.server import errors
from connectors_proxy.server.channel import ProxyRequest
from connectors_proxy.server.headers import HOP_BY_HOP
from connectors_proxy.upstream import relay
from connectors_proxy.upstream.forward import ForwardRefused
from connectors_proxy.upstream.reflection import NO_SECRETS
from connectors_proxy.upstream.target import Target

#: The protocol name unlisted forward-proxy targets are served (and counted) under.
FORWARD = "forward"

# Framing Twisted writes itself, and what the proxy's own response carries.
_NOT_DOWNSTREAM = frozenset({b"content-length", b"date", b"server"})


def response_headers(upstream: Headers) -> Headers:
    """The target's response headers, minus hop-by-hop fields and those its C{Connection} names."""
    nominated = {t.strip().lower() for v in upstream.getRawHeaders(b"connection", []) for t in v.split(b",")}
    dropped = HOP_BY_HOP | _NOT_DOWNSTREAM | nominated
    out = Headers()
    for name, values in upstream.getAllRawHeaders():
        if name.lower() not in dropped:
            out.setRawHeaders(name, list(values))
    return out


def _describe(reason: Failure, url: bytes) -> str:
    where = url.decode("latin-1").split("?", 1)[0]
    return relay.describe_connect_error(reason.value, where) or f"{where} closed the connection without a complete response"


def _failed(reason: Failure, target: Target, url: bytes) -> errors.ProxyError:
    """A target the guarded agent refused is a 403; one it could not reach, a 502 naming the URL."""
    if isinstance(reason.value, ForwardRefused):
        return errors.forbidden(reason.value.message)
    return errors.bad_gateway(_describe(reason, url))


class ForwardResource(ProtocolResource):
    """Relays a forward-proxy request to a target that is no listed Connector's, without credentials."""

    async def serve(self, request: ProxyRequest, target: Target) -> None:
        url = target.upstream_url()
        headers = relay.forwarded_headers(request, origin=False, route=target.route)
        response = await relay.send(target, request.method, url, headers, request.body, request, failed=_failed)
        await relay.stream_response(request, response, response_headers(response.headers), NO_SECRETS)
