# -*- test-case-name: tests.test_memory_relay,tests.test_tls_proxy -*-
"""
The upstream agents: one L{Agent} and persistent connection pool per TLS
identity (extra CA, client certificate), so a connection opened with one
Connector's client certificate or CA is never reused for another's; and,
per Connector, which of them it uses (its CA and certificate Secrets
parsed once per Secret version).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attrs import define, field
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.web.client import Agent, HTTP11ClientProtocol, HTTPConnectionPool
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from connectors_proxy import compat
from connectors_proxy.model.objects import Connector, Secret
from connectors_proxy.model.state import Snapshot
from connectors_proxy.server import errors
from connectors_proxy.tls.upstream import load_ca_bundle, load_client_certificate
from connectors_proxy.upstream.connect import UpstreamEndpoints
from connectors_proxy.upstream.timeouts import TimedAgent, UpstreamTimeouts

# Idle upstream connections kept per host: enough that a burst of parallel
# requests (50 wrk connections, 10 parallel layer pulls) reuses connections
# instead of opening new ones each time.
MAX_IDLE_PER_HOST = 64
IDLE_TIMEOUT = 30
CONNECT_TIMEOUT = 10.0
# How much is read from a plain-TCP upstream at a time (Twisted's default: 64 KiB).
UPSTREAM_READ_SIZE = 256 * 1024
@implementer(IAgentEndpointFactory)
class _CachingEndpointFactory:
    """
    Agent builds a new endpoint for every request (parsing and
    IDNA-encoding the host each time); endpoints are reusable, so keep one
    per origin.  Bounded: redirects may name any host.
    """

    MAX = 1024

    def __init__(self, reactor: Any, policy: IPolicyForHTTPS, connect_timeout: float) -> None:
        # Not Agent's own factory: its HostnameEndpoint makes a refused
        # connection cost 0.3 s (see upstream/connect.py).
        self._inner = UpstreamEndpoints(reactor, policy, connect_timeout)
        self._cache: dict[tuple[bytes, bytes, int], Any] = {}

    def endpointForURI(self, uri: Any) -> Any:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._cache.get(key)
        if endpoint is None:
            if len(self._cache) >= self.MAX:
                self._cache.clear()
            endpoint = self._cache[key] = self._inner.endpointForURI(uri)
        return endpoint


def _drop_nominated(response: IResponse, parser: Any) -> IResponse:
    """
    Remove from C{response}'s headers those its C{Connection} header names
    (RFC 9110 section 7.6.1: they are for this hop only, and an upstream
    may mark anything so).  Twisted's client parser keeps C{Connection} in
    its C{connHeaders}, out of C{response.headers}, and drops nothing.
    """
    for value in parser.connHeaders.getRawHeaders(b"connection", []):
        for name in value.split(b","):
            if name.strip():
                response.headers.removeHeader(name.strip())
    return response


class _ClientProtocol(HTTP11ClientProtocol):
    """
    L{HTTP11ClientProtocol} that drops the response headers C{Connection}
    nominates, and reads a plain-TCP upstream in bigger pieces.
    """

    def connectionMade(self) -> None:
        super().connectionMade()
        # Each piece read costs the same Python work (client parser, relay,
        # the masker's calls) whatever its size: reading 256 KiB instead of
        # Twisted's 64 KiB takes a sixth off the CPU of a 1 GiB download
        # (bench/masking.py), which pays for masking reflected credentials.
        # FileDescriptor.bufferSize is also how much this connection buffers
        # before pausing a request body's producer: one more read, bounded.
        # A TLS upstream's plaintext comes in TLS records whatever this is.
        if isinstance(self.transport, FileDescriptor):
            self.transport.bufferSize = UPSTREAM_READ_SIZE

    def request(self, request: Any) -> Deferred[IResponse]:
        d: Deferred[IResponse] = super().request(request)
        # The parser of this request holds Connection in its connHeaders.
        # Read when the response arrives, not now: a 1xx answer resets them.
        parser = compat.response_parser(self)
        if parser is not None:
            d.addCallback(_drop_nominated, parser)
        return d


class _QuietClientFactory(compat.HTTP11ClientFactory):
    # One "Starting factory" line per upstream connection is noise.
    noisy = False

    def buildProtocol(self, addr: Any) -> _ClientProtocol:
        # As Twisted's own factory builds its protocol, with the callback
        # that gives the connection back to the pool.
        return _ClientProtocol(compat.quiescent_callback(self))


@define
class Agents:
    """
    The upstream agents: one connection pool per TLS identity, so a
    connection opened with one Connector's client certificate or CA is never
    reused for another's.
    """

    reactor: IReactorTime
    policy_for: Callable[[bytes | None, bytes | None, bytes | None], IPolicyForHTTPS]
    # How an agent turns URIs into endpoints: over TCP and TLS by default;
    # the in-memory tests connect to resources instead.
    endpoints: Callable[[IReactorTime, IPolicyForHTTPS, float], IAgentEndpointFactory] = field(
        default=lambda reactor, policy, timeout: _CachingEndpointFactory(reactor, policy, timeout))
    # How long an upstream may take to answer, and to send the next bytes of a body.
    timeouts: UpstreamTimeouts = field(factory=UpstreamTimeouts)
    _agents: dict[tuple[bytes | None, bytes | None, bytes | None], IAgent] = field(factory=dict)
    _pools: list[HTTPConnectionPool] = field(factory=list)

    def agent(self, ca_pem: bytes | None = None, cert_pem: bytes | None = None,
              key_pem: bytes | None = None) -> IAgent:
        key = (ca_pem, cert_pem, key_pem)
        agent = self._agents.get(key)
        if agent is None:
            pool = HTTPConnectionPool(self.reactor, persistent=True)
            compat.set_pool_factory(pool, _QuietClientFactory)
            pool.maxPersistentPerHost = MAX_IDLE_PER_HOST
            pool.cachedConnectionTimeout = IDLE_TIMEOUT
            self._pools.append(pool)
            agent = TimedAgent(Agent.usingEndpointFactory(
                self.reactor, self.endpoints(self.reactor, self.policy_for(ca_pem, cert_pem, key_pem),
                                             CONNECT_TIMEOUT), pool=pool), self.reactor, self.timeouts)
            self._agents[key] = agent
        return agent

    def idle_connections(self) -> int:
        """Idle upstream connections kept for reuse, over all pools."""
        return sum(compat.idle_connections(pool) for pool in self._pools)

    def close(self) -> Deferred[list[Any]]:
        return gatherResults([pool.closeCachedConnections() for pool in self._pools])


# A reload makes new Secret objects; the cache is keyed on their identity and
# bounded, since Secrets come and go.
_MAX_CACHED = 4096


@define
class ConnectorAgents:
    """
    The agents for each Connector's TLS configuration: one for its address,
    and one without its client certificate for other origins (token realms,
    blob storage).  Parsing PEM is costly, so the answer is kept per pair of
    Secret objects.
    """

    agents: Agents
    _cache: dict[tuple[int, int], tuple[Secret | None, Secret | None, tuple[IAgent, IAgent]]] = field(
        factory=dict)

    def for_connector(self, connector: Connector, snapshot: Snapshot) -> tuple[IAgent, IAgent]:
        """
        C{(agent, foreign_agent)} for C{connector}.

        @raise ProxyError: 503 when a CA or certificate Secret is missing or
            does not parse.
        """
        ca_secret = snapshot.secret(connector.ca_secret_ref)
        cert_secret = snapshot.secret(connector.client_cert_secret_ref)
        if connector.ca_secret_ref is not None and ca_secret is None:
            raise errors.unavailable(f"CA Secret {connector.ca_secret_ref} of Connector {connector.ref} not found")
        if connector.client_cert_secret_ref is not None and cert_secret is None:
            raise errors.unavailable(
                f"client certificate Secret {connector.client_cert_secret_ref} of Connector {connector.ref} not found"
            )
        key = (id(ca_secret), id(cert_secret))
        cached = self._cache.get(key)
        if cached is not None and cached[0] is ca_secret and cached[1] is cert_secret:
            return cached[2]
        ca = cert = private_key = None
        if ca_secret is not None:
            try:
                ca = load_ca_bundle(ca_secret.data)
            except ValueError as e:
                raise errors.unavailable(f"CA Secret {connector.ca_secret_ref}: {e}") from None
        if cert_secret is not None:
            try:
                cert, private_key = load_client_certificate(cert_secret.data)
            except ValueError as e:
                raise errors.unavailable(f"client certificate Secret {connector.client_cert_secret_ref}: {e}") from None
        agents = (self.agents.agent(ca, cert, private_key), self.agents.agent(ca))
        if len(self._cache) > _MAX_CACHED:
            self._cache.clear()
        self._cache[key] = (ca_secret, cert_secret, agents)
        return agents
