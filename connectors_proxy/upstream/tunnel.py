# -*- test-case-name: tests.test_connect -*-
"""
The plain byte tunnel of a C{CONNECT} to a target that is no listed
Connector's (C{--forward-unlisted allow}): the client's bytes go to the
target and back untouched.  Nothing is read, decrypted or added: no
credentials ever travel through such a tunnel but the client's own.

Where the target may be is decided as for forward-proxy requests
(L{connectors_proxy.upstream.forward}): loopback, link-local and this
host's own addresses are refused before or right after connecting, and the
connection goes to the very address that was checked.

Each direction is paced by the other: the two transports are registered as
each other's producers (as L{twisted.protocols.portforward} does), so a
client that reads slowly pauses reading from the target and the reverse;
a tunnel costs its two sockets and their kernel buffers, never a growing
queue.  A tunnel without a byte either way for the idle timeout is closed.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocol, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from twisted.web.client import URI

from connectors_proxy.server.connect import TunnelStats
from connectors_proxy.tls.upstream import upstream_policy
from connectors_proxy.upstream.agents import CONNECT_TIMEOUT
from connectors_proxy.upstream.forward import ForwardAgents, GuardedEndpoint, system_resolver


class _Side(Protocol):
    """One end of a tunnel: what it reads is written to the other end."""

    # A TCP (or TLS) transport: a producer and a consumer.
    transport: Any

    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.tunnel.side_lost(self)


class _ClientSide(_Side):
    def connectionMade(self) -> None:
        self.tunnel.client_attached()

    def dataReceived(self, data: bytes) -> None:
        self.tunnel.stats.received += len(data)
        self.tunnel.resetTimeout()
        self.tunnel.upstream.transport.write(data)


class _UpstreamSide(_Side):
    def connectionMade(self) -> None:
        # Nothing is read from the target until the client's side is there
        # to take it (a server that speaks first).
        self.transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        self.tunnel.stats.sent += len(data)
        self.tunnel.resetTimeout()
        self.tunnel.client.transport.write(data)


class Tunnel(TimeoutMixin):
    """
    Two connected protocols relaying bytes between a client and a target.

    L{upstream} is connected first (L{open_tunnel}); once the client has
    its C{200}, the channel hands its connection to L{client}, and the
    bytes flow.  When either end closes, the other is closed after what it
    was sent is flushed.
    """

    def __init__(self, clock: IReactorTime, idle_timeout: float | None) -> None:
        self.client = _ClientSide(self)
        self.upstream = _UpstreamSide(self)
        self.stats = TunnelStats()
        self.callLater = clock.callLater  # type: ignore[method-assign,assignment]  # TimeoutMixin's clock
        self._idle_timeout = idle_timeout or None
        self._closed = False

    def client_attached(self) -> None:
        client, upstream = self.client.transport, self.upstream.transport
        if self._closed or upstream is None:
            client.loseConnection()
            return
        # Each side's writes pace the other side's reads.
        upstream.registerProducer(client, True)
        client.registerProducer(upstream, True)
        upstream.resumeProducing()
        self.setTimeout(self._idle_timeout)

    def side_lost(self, side: _Side) -> None:
        if self._closed:
            return
        self._closed = True
        self.setTimeout(None)
        other = self.upstream if side is self.client else self.client
        if other.transport is not None:
            other.transport.loseConnection()

    def timeoutConnection(self) -> None:
        # Idle both ways: nothing is lost by cutting it.
        for side in (self.client, self.upstream):
            if side.transport is not None:
                side.transport.abortConnection()

    def abort(self) -> None:
        """Close both ends now (the client went away before the tunnel was up)."""
        self.timeoutConnection()
        self.setTimeout(None)


class _Once(Factory):
    """Builds the one protocol it was given."""

    def __init__(self, protocol: IProtocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Any:
        return self._protocol


def open_tunnel(agents: ForwardAgents, host: str, port: int, clock: IReactorTime,
                idle_timeout: float | None) -> Deferred[Tunnel]:
    """
    Connect a L{Tunnel} to C{host:port} through the forward proxy's guard
    and resolver (those of C{agents}, as unlisted forward-proxy requests
    use them).

    @raise connectors_proxy.upstream.forward.ForwardRefused: (asynchronously)
        the target is somewhere the forward proxy never goes.
    """
    tunnel = Tunnel(clock, idle_timeout)
    name = host.encode("ascii")
    netloc = (b"[" + name + b"]" if b":" in name else name) + b":%d" % port
    # Not https: the endpoint is plain TCP, the TLS inside is the client's.
    uri = URI(b"tunnel", netloc, name, port, b"", b"", b"", b"")
    resolve = agents.resolve or system_resolver(agents.reactor)
    endpoint = GuardedEndpoint(uri, resolve, agents.connect_to(agents.reactor, upstream_policy(None), CONNECT_TIMEOUT),
                               agents.guard)
    d: Deferred[Any] = endpoint.connect(_Once(tunnel.upstream))
    return d.addCallback(lambda _: tunnel)
