# -*- test-case-name: tests.test_rest_integration -*-
"""
The protocol resources: one per ConnectorClass protocol (REST, git, OCI).

Each is a leaf L{twisted.web.resource.Resource} whose C{serve} coroutine
does the protocol's work for a request the root resource has already
authenticated, authorized and routed (C{request.target}).  The root awaits
C{serve} directly; C{render} is there for anything that renders it the
ordinary twisted.web way.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from connectors_proxy.server.channel import ProxyRequest
from connectors_proxy.server.errors import ProxyError
from connectors_proxy.upstream.target import Target


class ProtocolResource(Resource):
    isLeaf = True

    async def serve(self, request: ProxyRequest) -> None:
        """Serve C{request}, whose routed L{Target} is C{request.target}; answer every error."""
        raise NotImplementedError

    def render(self, request: ProxyRequest) -> Any:  # type: ignore[override]
        Deferred.fromCoroutine(self.serve(request))
        return NOT_DONE_YET


def naming_connector(error: ProxyError, target: Target) -> ProxyError:
    """C{error}, its message starting with the Connector it is about."""
    if target.label in error.message:
        return error
    return ProxyError(error.status, error.code, f"{target.label}: {error.message}")
