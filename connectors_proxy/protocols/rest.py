# -*- test-case-name: tests.test_rest_integration -*-
"""
The REST protocol: any method, credentials injected (SPEC section 2), the
body streamed both ways.  The other protocol resources follow this shape:
read C{request.target}, do the protocol's work through L{relay}, turn a
L{ProxyError} into the protocol's error body.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from .. import relay
from ..errors import ProxyError
from ..streaming import ProxyRequest


async def serve(request: ProxyRequest, oci_errors: bool = False) -> None:
    """Relay C{request} to its Connector, answering errors in the given style."""
    try:
        await relay.proxy(request, request.target)
    except ProxyError as e:
        relay.send_error(request, e, oci_errors)


class RestResource(Resource):
    isLeaf = True
    serve = staticmethod(serve)

    def render(self, request: ProxyRequest) -> Any:  # type: ignore[override]
        Deferred.fromCoroutine(serve(request))
        return NOT_DONE_YET
