# -*- test-case-name: tests.test_rest_integration -*-
"""
The REST protocol: any method, credentials injected (SPEC section 2), the
body streamed both ways.  The other protocol resources follow this shape:
read C{request.target}, do the protocol's work through L{relay}, turn a
L{ProxyError} into the protocol's error body.
"""

from __future__ import annotations

from .. import relay
from ..errors import ProxyError
from ..streaming import ProxyRequest
from . import ProtocolResource


class RestResource(ProtocolResource):
    async def serve(self, request: ProxyRequest) -> None:
        """Relay C{request} to its Connector; errors as text."""
        try:
            await relay.proxy(request, request.target)
        except ProxyError as e:
            relay.send_error(request, e, oci=False)
