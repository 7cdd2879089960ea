# -*- test-case-name: tests.test_rest_integration -*-
"""
The REST protocol: any method, credentials injected (SPEC section 2), the
body streamed both ways.  The other protocol resources follow this shape:
read C{request.target}, do the protocol's work through L{relay}, turn a
L{ProxyError} into the protocol's error body.
"""

from __future__ import annotations

from connectors_proxy.protocols import ProtocolResource
from connectors_proxy.server.channel import ProxyRequest
from connectors_proxy.server.errors import ProxyError
from connectors_proxy.upstream import relay


class RestResource(ProtocolResource):
    async def serve(self, request: ProxyRequest) -> None:
        """Relay C{request} to its Connector; errors as text."""
        try:
            await relay.proxy(request, request.target)
        except ProxyError as e:
            relay.send_error(request, e, oci=False)
