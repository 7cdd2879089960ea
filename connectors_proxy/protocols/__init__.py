# -*- test-case-name: tests.test_memory_protocols,tests.test_memory_router -*-
"""
The protocol resources: one per ConnectorClass protocol (REST, git, OCI),
listed in L{connectors_proxy.model.protocols}.

Each is a leaf L{twisted.web.resource.Resource}.  The router awaits its
L{ProtocolResource.serve} with the routed L{Target} of a request it has
already authenticated and authorized; whatever goes wrong is raised as a
L{ProxyError}, and the router asks the same protocol to render it
(L{ProtocolResource.error_response}), so each protocol's clients get
errors in the form they understand (git prints C{text/plain}, git-lfs reads
LFS JSON, registry clients read the OCI error body).
"""

from __future__ import annotations

from typing import Any

from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from connectors_proxy.ops.metrics import ProxyMetrics
from connectors_proxy.server import errors
from connectors_proxy.server.channel import ProxyRequest
from connectors_proxy.server.errors import ProxyError
from connectors_proxy.server.routing import Route
from connectors_proxy.upstream.target import Target


class ProtocolResource(Resource):
    """
    The base of the protocol resources.  A subclass is built with the
    reactor as its one argument (the registry builds them so).
    """

    isLeaf = True

    def __init__(self, reactor: Any = None) -> None:
        Resource.__init__(self)

    def report_to(self, metrics: ProxyMetrics) -> None:
        """Feed the protocol's own counters (e.g. OCI token requests) to C{metrics}."""

    def claims(self, route: Route) -> bool:
        """
        Whether a request routed so far to C{route}, before its Connector
        (and so its protocol) is known, is one of this protocol's: the
        router's own refusals (401, 403, 404) are then rendered by it.
        """
        return False

    def serve_unrouted(self, request: ProxyRequest, route: Route) -> bool:
        """
        Answer an authenticated request that names no Connector, if this
        protocol has an answer for it (the OCI C{/v2/} ping); C{False} if not.
        """
        return False

    async def serve(self, request: ProxyRequest, target: Target) -> None:
        """
        Serve C{request} for its routed C{target}.

        @raise ProxyError: the request cannot be served; the router renders
            it with L{error_response}.
        """
        raise NotImplementedError

    def error_response(self, request: ProxyRequest, error: ProxyError,
                       target: Target | None) -> tuple[Headers, bytes]:
        """
        The headers and body of the response for C{error}.  C{target} is
        C{None} when the router refused the request before routing it.
        """
        return errors.text_response(error)


def naming_connector(error: ProxyError, target: Target) -> ProxyError:
    """C{error}, its message starting with the Connector it is about."""
    if target.label in error.message:
        return error
    return ProxyError(error.status, error.code, f"{target.label}: {error.message}")
