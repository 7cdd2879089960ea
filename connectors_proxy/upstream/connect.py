# -*- test-case-name: tests.test_faults -*-
"""
How the proxy connects to an upstream: an endpoint per origin that fails
as soon as the connection is refused.

L{twisted.internet.endpoints.HostnameEndpoint} (what L{Agent} uses) starts
one attempt per resolved address, C{attemptDelay} (0.3 s) apart, and only
learns that no address is left at the next tick: every refused connection
cost 0.3 s before the 502, even to an IP address, which it also sends to
the resolver's thread pool.  Here:

  - an IP address is connected to directly (no resolver, no thread);
  - a host name is resolved, and its addresses tried in the resolver's
    order; the next attempt starts when the one before has failed, or
    after C{ATTEMPT_DELAY} if it is still pending (Happy Eyeballs, as
    HostnameEndpoint does); the first connection wins and the others are
    cancelled; when the last attempt fails, the connect fails at once.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import IAddress, IResolutionReceiver, IStreamClientEndpoint
from twisted.python.failure import Failure
from twisted.web.client import URI
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

# As HostnameEndpoint's default: how long one address may take to connect
# before the next is tried beside it.
ATTEMPT_DELAY = 0.3


def tcp_endpoint(reactor: Any, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    """A TCP endpoint to the IP address C{host} (v4 or v6)."""
    if isIPv6Address(host):
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)


@implementer(IResolutionReceiver)
class Addresses:
    """Collects a name resolution's addresses; C{done} fires with them."""

    def __init__(self) -> None:
        self.addresses: list[IAddress] = []
        self.done: Deferred[list[IAddress]] = Deferred()

    def resolutionBegan(self, resolutionInProgress: Any) -> None:
        pass

    def addressResolved(self, address: IAddress) -> None:
        self.addresses.append(address)

    def resolutionComplete(self) -> None:
        self.done.callback(self.addresses)


@implementer(IStreamClientEndpoint)
class FastFailEndpoint:
    """
    Connects to C{host} (a name) on C{port}, trying its addresses as the
    module docstring says.

    @param timeout: seconds each attempt may take to connect.
    """

    def __init__(self, reactor: Any, host: str, port: int, timeout: float,
                 attempt_delay: float = ATTEMPT_DELAY) -> None:
        self._reactor = reactor
        self._host = host
        self._port = port
        self._timeout = timeout
        self._attempt_delay = attempt_delay

    def __repr__(self) -> str:
        return f"<FastFailEndpoint {self._host}:{self._port}>"

    def connect(self, factory: Any) -> Deferred[Any]:
        receiver = Addresses()
        self._reactor.nameResolver.resolveHostName(receiver, self._host, portNumber=self._port)
        attempt = _Attempts(self._reactor, self._host, self._port, self._timeout, self._attempt_delay, factory)
        result: Deferred[Any] = Deferred(lambda _: attempt.cancel())
        attempt.result = result
        receiver.done.addCallback(attempt.start)
        return result


class _Attempts:
    """One connect: the attempts in flight over a host's addresses."""

    result: Deferred[Any]

    def __init__(self, reactor: Any, host: str, port: int, timeout: float, delay: float, factory: Any) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.timeout = timeout
        self.delay = delay
        self.factory = factory
        self.addresses: list[IAddress] = []
        self.started = 0
        self.pending: list[Deferred[Any]] = []
        self.failure: Failure | None = None
        self.timer: Any = None
        self.done = False

    def start(self, addresses: list[IAddress]) -> None:
        if self.done:
            return
        self.addresses = [a for a in addresses if getattr(a, "host", None)]
        if not self.addresses:
            self._finish(Failure(DNSLookupError(f"no results for hostname lookup: {self.host}")))
            return
        self._next()

    def _next(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if self.done or self.started >= len(self.addresses):
            return
        address = self.addresses[self.started]
        self.started += 1
        d = tcp_endpoint(self.reactor, address.host, self.port, self.timeout).connect(  # type: ignore[attr-defined]
            self.factory)
        self.pending.append(d)
        d.addCallbacks(self._connected, self._failed, errbackArgs=(d,))
        if self.started < len(self.addresses):
            self.timer = self.reactor.callLater(self.delay, self._next)

    def _connected(self, protocol: Any) -> None:
        if self.done:
            # Another attempt won (or the connect was cancelled meanwhile).
            protocol.transport.loseConnection()
            return
        self._finish(protocol)

    def _failed(self, failure: Failure, d: Deferred[Any]) -> None:
        if d in self.pending:
            self.pending.remove(d)
        if self.done:
            return
        self.failure = failure
        if self.pending:
            return  # another attempt may still connect
        if self.started < len(self.addresses):
            self._next()  # at once: no reason to wait for the delay
        else:
            self._finish(failure)

    def _stop(self) -> None:
        """No attempt more: the delay's timer stopped, those still pending cancelled."""
        self.done = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        for d in list(self.pending):
            d.cancel()
        self.pending = []

    def _finish(self, outcome: Any) -> None:
        self._stop()
        if isinstance(outcome, Failure):
            self.result.errback(outcome)
        else:
            self.result.callback(outcome)

    def cancel(self) -> None:
        """The connect was cancelled (its Deferred errbacks with CancelledError)."""
        self._stop()


def upstream_endpoint(reactor: Any, uri: URI, policy: IPolicyForHTTPS, timeout: float) -> IStreamClientEndpoint:
    """
    The endpoint for C{uri}'s origin, as Agent's standard endpoint factory
    builds it (TLS from C{policy} for C{https}) but connecting as this
    module says.
    """
    try:
        host = uri.host.decode("ascii")
    except UnicodeDecodeError:
        host = ""
    endpoint: IStreamClientEndpoint
    if host and (isIPAddress(host) or isIPv6Address(host)):
        endpoint = tcp_endpoint(reactor, host, uri.port, timeout)
    elif host:
        endpoint = FastFailEndpoint(reactor, host, uri.port, timeout)
    else:
        # Not ASCII: HostnameEndpoint knows how to encode it (IDNA).
        endpoint = HostnameEndpoint(reactor, uri.host, uri.port, timeout=timeout)
    if uri.scheme == b"http":
        return endpoint
    if uri.scheme == b"https":
        return wrapClientTLS(policy.creatorForNetloc(uri.host, uri.port), endpoint)
    raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")


@implementer(IAgentEndpointFactory)
class UpstreamEndpoints:
    """An L{IAgentEndpointFactory} of L{upstream_endpoint}s."""

    def __init__(self, reactor: Any, policy: IPolicyForHTTPS, timeout: float) -> None:
        self._reactor = reactor
        self._policy = policy
        self._timeout = timeout

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        return upstream_endpoint(self._reactor, uri, self._policy, self._timeout)
