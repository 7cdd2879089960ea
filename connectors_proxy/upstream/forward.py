# -*- test-case-name: tests.test_upstream_compat -*-
"""
Where a forward-proxy request for a target that is no listed Connector's
may go (SPEC section 5: C{--forward-unlisted allow}).

Such a request is relayed without credentials, but a workload must not use
the proxy to reach what it could not reach itself, or what only the proxy's
own host can: loopback, link-local addresses (the cloud metadata service at
169.254.169.254, C{fe80::/10}) and the proxy's own listeners are refused.
Names are checked by what they resolve to, and the connection is made to
the very address that was checked (no second lookup a DNS answer could
change in between); once connected, a peer that is one of this host's own
addresses (a listener bound to the pod IP) is refused too.

The agents here are separate from the Connectors' (their own pool), so a
connection opened for an unlisted target is never reused for a Connector.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from typing import Any

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import (
    IAddress,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.web.client import URI
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from connectors_proxy.tls.upstream import upstream_policy
from connectors_proxy.upstream.agents import Agents
from connectors_proxy.upstream.connect import Addresses, tcp_endpoint
from connectors_proxy.upstream.timeouts import UpstreamTimeouts


class ForwardRefused(Exception):
    """
    A forward-proxy target is somewhere the proxy never relays to; the
    client gets a 403 with this message.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# IPv4 0.0.0.0/8 ("this network"): connecting to any of it reaches this
# host on Linux, like 0.0.0.0 itself.
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")


def _unwrapped(address: ipaddress.IPv4Address | ipaddress.IPv6Address,
               ) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The IPv4 address inside an IPv4-mapped (C{::ffff:a.b.c.d}) or -compatible (C{::a.b.c.d}) one."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if int(address) >> 32 == 0 and int(address) > 1:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def refused_address(host: str) -> str | None:
    """
    Why the IP address C{host} may not be reached through the forward
    proxy (C{"a loopback address"}...), or C{None} when it may.
    """
    try:
        address = _unwrapped(ipaddress.ip_address(host.split("%", 1)[0]))
    except ValueError:
        return "not an IP address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address (such as the cloud metadata service)"
    if address.is_unspecified or (isinstance(address, ipaddress.IPv4Address) and address in _THIS_NETWORK):
        return "an address of this host"
    if address.is_multicast:
        return "a multicast address"
    return None


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


@frozen
class ForwardGuard:
    """
    The forward proxy's refusals, as a value.

    @ivar exempt: C{(address, port)} pairs let through all the same.  Empty
        in the daemon; tests use it to reach a loopback stand-in for the
        internet.
    """

    exempt: frozenset[tuple[str, int]] = frozenset()

    def check(self, address: str, port: int, target: str) -> None:
        """
        @raise ForwardRefused: when C{address:port} (what C{target}
            resolved to) may not be reached.
        """
        why = refused_address(address)
        if why is not None and (address, port) not in self.exempt:
            shown = target if target == address else f"{target} ({address})"
            raise ForwardRefused(f"{shown} is {why}: the forward proxy does not go there")

    def check_connected(self, transport: Any, port: int, target: str) -> None:
        """
        @raise ForwardRefused: when the connection reached one of this
            host's own addresses: a local peer is where the kernel puts the
            local end too (the proxy's listeners, on the pod IP or any other).
        """
        peer, local = transport.getPeer(), transport.getHost()
        host = getattr(peer, "host", None)
        if host is not None and host == getattr(local, "host", None) and (host, port) not in self.exempt:
            raise ForwardRefused(f"{target} ({host}) is this proxy's own host: the forward proxy does not go there")


Resolve = Callable[[str, int], Deferred[Sequence[str]]]
"""Resolves a host name to its IP addresses (as text)."""


def _hosts(addresses: list[IAddress]) -> Sequence[str]:
    return [a.host for a in addresses]  # type: ignore[attr-defined]


def system_resolver(reactor: Any) -> Resolve:
    """Resolve with the reactor's resolver (the system's, as Twisted's own endpoints do)."""

    def resolve(host: str, port: int) -> Deferred[Sequence[str]]:
        receiver = Addresses()
        reactor.nameResolver.resolveHostName(receiver, host, port)
        return receiver.done.addCallback(_hosts)

    return resolve


ConnectTo = Callable[[URI, str], IStreamClientEndpoint]
"""The endpoint that reaches C{uri}'s target at the already checked address."""


def direct(reactor: Any, policy: IPolicyForHTTPS, timeout: float) -> ConnectTo:
    """TCP to the checked address; TLS on top for C{https}, verified against the URL's host name."""

    def connect_to(uri: URI, address: str) -> IStreamClientEndpoint:
        tcp = tcp_endpoint(reactor, address, uri.port, timeout)
        if uri.scheme == b"https":
            return wrapClientTLS(policy.creatorForNetloc(uri.host, uri.port), tcp)
        return tcp

    return connect_to


@implementer(IStreamClientEndpoint)
@define
class GuardedEndpoint:
    """Resolves, checks every address, connects to a checked one, checks the connection."""

    uri: URI
    resolve: Resolve
    connect_to: ConnectTo
    guard: ForwardGuard

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        return Deferred.fromCoroutine(self._connect(factory))

    async def _connect(self, factory: IProtocolFactory) -> IProtocol:
        host = self.uri.host.decode("ascii", "replace")
        target = f"{host}:{self.uri.port}"
        addresses = [host] if is_ip(host) else list(await self.resolve(host, self.uri.port))
        if not addresses:
            raise DNSLookupError(host)
        # Every address is checked, not only the one used: a name that also
        # resolves to loopback is not one to trust with the others.
        for address in addresses:
            self.guard.check(address, self.uri.port, host)
        failure: Exception = DNSLookupError(host)
        for address in addresses:
            try:
                protocol: IProtocol = await self.connect_to(self.uri, address).connect(factory)
            except ConnectError as e:
                failure = e
                continue
            transport = getattr(protocol, "transport", None)
            if transport is not None:
                try:
                    self.guard.check_connected(transport, self.uri.port, target)
                except ForwardRefused:
                    # Nothing was sent: the HTTP client writes only once this fires.
                    transport.abortConnection()
                    raise
            return protocol
        raise failure


@implementer(IAgentEndpointFactory)
@define
class GuardedEndpoints:
    """An L{IAgentEndpointFactory} of L{GuardedEndpoint}s."""

    resolve: Resolve
    connect_to: ConnectTo
    guard: ForwardGuard

    def endpointForURI(self, uri: URI) -> GuardedEndpoint:
        return GuardedEndpoint(uri, self.resolve, self.connect_to, self.guard)


@define
class ForwardAgents:
    """
    The agent for unlisted forward-proxy targets, and how to close its pool.

    @ivar resolve: the name resolver (default: the reactor's).
    @ivar connect_to: how a checked address is reached (default: TCP, and TLS
        for C{https}; the in-memory tests connect to resources).
    """

    reactor: Any
    guard: ForwardGuard = field(factory=ForwardGuard)
    resolve: Resolve | None = None
    connect_to: Callable[[Any, IPolicyForHTTPS, float], ConnectTo] = direct
    timeouts: UpstreamTimeouts = field(factory=UpstreamTimeouts)
    _agents: Agents | None = None

    def agent(self) -> Any:
        if self._agents is None:
            resolve = self.resolve or system_resolver(self.reactor)
            self._agents = Agents(
                self.reactor, upstream_policy,
                endpoints=lambda reactor, policy, timeout: GuardedEndpoints(
                    resolve, self.connect_to(reactor, policy, timeout), self.guard),
                timeouts=self.timeouts)
        return self._agents.agent()

    def close(self) -> Deferred[Any]:
        if self._agents is None:
            return succeed(None)
        return self._agents.close()
