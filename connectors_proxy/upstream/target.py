# -*- test-case-name: tests.test_memory_relay,tests.test_oci_protocol -*-
"""
The routed target of a request: what the root resource hands to a
protocol once the request is authenticated, authorized and routed.
"""

from __future__ import annotations

from attrs import evolve, field, frozen
from twisted.web.iweb import IAgent

from connectors_proxy.auth.interfaces import Identity
from connectors_proxy.model.credentials import Credentials, RegoCredentials, with_query
from connectors_proxy.model.objects import Connector, ConnectorClass
from connectors_proxy.server.channel import ProxyRequest
from connectors_proxy.server.headers import rewrite_location, same_origin
from connectors_proxy.server.routing import Route


@frozen
class Target:
    """
    Everything known about a request once it has been authenticated,
    authorized and routed: the Connector, its class, the credentials to
    inject, how the client addressed it, and the agent that reaches it.
    """

    connector: Connector
    connector_class: ConnectorClass
    identity: Identity
    route: Route
    credentials: Credentials | None = field(repr=False)
    agent: IAgent = field(repr=False)
    client_base: bytes
    # For origins other than the Connector's (blob storage a registry
    # redirects to): the Connector's CA is trusted, but its client
    # certificate is not presented there.
    foreign_agent: IAgent | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        """How messages name the Connector: C{Connector NS/NAME}."""
        return f"Connector {self.connector.ref}"

    @property
    def upstream_base(self) -> bytes:
        return self.connector.address.encode("utf-8")

    def for_url(self, url: bytes) -> Target:
        """
        This target for a request to C{url}: itself on the Connector's own
        origin; elsewhere (a token realm, blob storage) without the
        Connector's client certificate.
        """
        if self.foreign_agent is None or same_origin(url.decode("latin-1"), self.connector.address):
            return self
        return evolve(self, agent=self.foreign_agent)

    def upstream_url(self, rest: bytes | None = None) -> bytes:
        url = self.upstream_base + (self.route.rest if rest is None else rest)
        credentials = self.credentials
        if isinstance(credentials, RegoCredentials) and credentials.query_pairs:
            # A class's Rego generator places them in the query.
            url = with_query(url, credentials.query_pairs)
        return url

    def to_client(self, url: bytes) -> bytes:
        """Map an upstream URL (absolute or path) back to what the client uses."""
        prefix = self.route.client_prefix
        if self.route.oci_path:
            # OCI path mode: upstream /v2/REPO... is /v2/namespaces/NS/connectors/NAME/REPO... for the
            # client, so the prefix replaces the leading /v2.
            mapped = rewrite_location(url, self.upstream_base, self.client_base, b"\0")
            return mapped.replace(b"\0/v2", prefix, 1) if b"\0/v2" in mapped else mapped.replace(b"\0", b"", 1)
        return rewrite_location(url, self.upstream_base, self.client_base, prefix)


def client_base(request: ProxyRequest) -> bytes:
    """C{scheme://host[:port]} as the client reached the proxy."""
    scheme = b"https" if request.isSecure() else b"http"
    host = request.getHeader(b"host")
    if not host:
        addr = request.getHost()
        host = f"{addr.host}:{addr.port}".encode()
    return scheme + b"://" + host
