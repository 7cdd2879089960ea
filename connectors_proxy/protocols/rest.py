# -*- test-case-name: tests.test_memory_protocols,tests.test_rest_integration -*-
"""
The REST protocol: any method, credentials injected (see docs/ for the
Secret types), the body streamed both ways; errors as C{text/plain}.  The
other protocol resources follow this shape and add their own work.
"""

from __future__ import annotations

from connectors_proxy.protocols import ProtocolResource
from connectors_proxy.server.channel import ProxyRequest
from connectors_proxy.upstream import relay
from connectors_proxy.upstream.target import Target


class RestResource(ProtocolResource):
    async def serve(self, request: ProxyRequest, target: Target) -> None:
        """Relay C{request} to its Connector."""
        await relay.proxy(request, target)
