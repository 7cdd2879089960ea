# -*- test-case-name: tests.test_memory_relay,tests.test_tls_proxy -*-
"""
The upstream agents: one L{HTTP11Agent} (with its keep-alive pool) per TLS
identity (extra CA, client certificate), so a connection opened with one
Connector's client certificate or CA is never reused for another's; and,
per Connector, which of them it uses (its CA and certificate Secrets
parsed once per Secret version).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IPolicyForHTTPS

from connectors_proxy.model.objects import Connector, Secret
from connectors_proxy.model.state import Snapshot
from connectors_proxy.server import errors
from connectors_proxy.tls.capool import GlobalCAPool, merge_bundles, secret_ca_bundle
from connectors_proxy.tls.upstream import load_ca_bundle, load_client_certificate
from connectors_proxy.upstream.client import HTTP11Agent
from connectors_proxy.upstream.connect import UpstreamEndpoints
from connectors_proxy.upstream.timeouts import UpstreamTimeouts

CONNECT_TIMEOUT = 10.0


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
        default=UpstreamEndpoints)
    # How long an upstream may take to answer, and to send the next bytes of a body.
    timeouts: UpstreamTimeouts = field(factory=UpstreamTimeouts)
    _agents: dict[tuple[bytes | None, bytes | None, bytes | None], HTTP11Agent] = field(factory=dict)

    def agent(self, ca_pem: bytes | None = None, cert_pem: bytes | None = None,
              key_pem: bytes | None = None) -> IAgent:
        key = (ca_pem, cert_pem, key_pem)
        agent = self._agents.get(key)
        if agent is None:
            agent = self._agents[key] = HTTP11Agent(
                self.reactor, self.endpoints(self.reactor, self.policy_for(ca_pem, cert_pem, key_pem), CONNECT_TIMEOUT),
                self.timeouts)
        return agent

    def idle_connections(self) -> int:
        """Idle upstream connections kept for reuse, over all pools."""
        return sum(agent.idle_connections() for agent in self._agents.values())

    def close(self) -> Deferred[list[Any]]:
        return gatherResults([agent.close() for agent in self._agents.values()])


# A reload makes new Secret objects; the cache is keyed on their identity and
# bounded, since Secrets come and go.
_MAX_CACHED = 4096


@define
class ConnectorAgents:
    """
    The agents for each Connector's TLS configuration: one for its address,
    and one without its client certificate for other origins (token realms,
    blob storage).  Parsing PEM is costly, so the answer is kept per pair of
    Secret objects (and global CA pool).

    With upstream's C{enable-custom-ca-certs} on, the CA bundle is the
    global pool (the install namespace's labelled Secrets) plus the
    Connector's own Secret read upstream's way (L{connectors_proxy.tls.capool});
    off, the Connector's own Secret alone, as before the flag existed.
    """

    agents: Agents
    _cache: dict[tuple[int, int, bool, bytes | None],
                 tuple[Secret | None, Secret | None, tuple[IAgent, IAgent]]] = field(factory=dict)
    _pool: GlobalCAPool = field(factory=GlobalCAPool)

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
        custom = snapshot.flags.custom_ca_certs
        pool = self._pool.bundle(snapshot.ca_secrets) if custom else None
        key = (id(ca_secret), id(cert_secret), custom, pool)
        cached = self._cache.get(key)
        if cached is not None and cached[0] is ca_secret and cached[1] is cert_secret:
            return cached[2]
        ca = cert = private_key = None
        if ca_secret is not None:
            try:
                ca = secret_ca_bundle(ca_secret.data) if custom else load_ca_bundle(ca_secret.data)
            except ValueError as e:
                raise errors.unavailable(f"CA Secret {connector.ca_secret_ref}: {e}") from None
        if pool is not None:
            ca = merge_bundles(pool, ca)
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
