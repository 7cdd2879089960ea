# -*- test-case-name: tests.test_connect,tests.test_connect_memory -*-
"""
TLS for intercepted C{CONNECT} tunnels: the proxy answers a client's TLS
inside a tunnel to a listed Connector's host with a certificate for that
host, minted by C{--proxy-ca-cert}/C{--proxy-ca-key}.

It is the C{cptls:} machinery of L{connectors_proxy.tls.serve} with other
names: the CA files are read and checked by L{ServerTLS}, read again every
second (and on C{SIGHUP}) and compared by content, so a rotated Secret is
used for the next handshake; leaves are minted per host (EC P-256, DNS or
IP subjectAltName, valid for L{INTERCEPT_LIFETIME}, minted again two thirds
through) and their contexts kept by L{connectors_proxy.tls.mint.LeafCache};
the TLS policy (1.2 and up, ECDHE with AEAD, ALPN C{http/1.1} only) is
L{make_context}'s.

What differs is who asks.  A host is only ever minted for after the router
found it under a listed Connector's address, so a client cannot make the
proxy mint for names of its choosing; and a client whose SNI names another
host than its C{CONNECT} did gets a failed handshake, never a certificate
for either name.  A client that does not start TLS at all gets a plain
C{400} saying so.

The bytes that cross the client's connection each way (TLS records) are
counted for the C{CONNECT}'s own access line.
"""

from __future__ import annotations

import datetime
import weakref
from collections.abc import Iterable
from typing import Any

from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IProtocol, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from connectors_proxy.server.connect import TunnelStats
from connectors_proxy.tls.serve import ServerTLS, TLSFiles

log = Logger()

#: How long a minted host certificate is valid (minted again two thirds through).
INTERCEPT_LIFETIME = datetime.timedelta(days=1)

_TLS_HANDSHAKE = b"\x16"
_NOT_TLS_BODY = (b"connectors-proxy: this CONNECT tunnel is intercepted and expects TLS: "
                 b"use it for https:// URLs (plain http:// goes through the proxy without CONNECT)\n")
#: What a client that does not speak TLS inside an intercepted tunnel gets.
NOT_TLS_ANSWER = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
                  b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_NOT_TLS_BODY), _NOT_TLS_BODY))


def _refusing_context() -> SSL.Context:
    """
    A context with no certificate at all: a handshake switched to it (an
    SNI name that is not the tunnel's host) fails with a handshake alert.
    """
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    return ctx


@implementer(IOpenSSLServerConnectionCreator)
class _OneContext:
    """Server connections from one context."""

    def __init__(self, context: SSL.Context) -> None:
        self._context = context

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self._context, None)


class _Once(Factory):
    def __init__(self, protocol: IProtocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Any:
        return self._protocol


class _Counted:
    """
    The client's transport as the TLS protocol writes to it: everything
    passed on, the bytes written counted in C{stats.sent}.  It provides
    what the transport provides, so the TLS protocol (which takes on its
    transport's interfaces) and the channel above it see the same
    connection.
    """

    def __init__(self, transport: Any, stats: TunnelStats) -> None:
        self._transport = transport
        self._stats = stats
        self._lost = False
        directlyProvides(self, providedBy(transport))

    def lost(self) -> None:
        """The connection is gone: what is written from now on (a TLS alert) never leaves."""
        self._lost = True

    def write(self, data: bytes) -> None:
        if not self._lost:
            self._stats.sent += len(data)
        self._transport.write(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        chunks = list(data)
        if not self._lost:
            self._stats.sent += sum(len(chunk) for chunk in chunks)
        self._transport.writeSequence(chunks)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class TLSOnly(Protocol):
    """
    The client end of an intercepted tunnel: TLS, or a plain C{400} when
    the client's first byte cannot start a TLS handshake (an C{http://}
    request sent through C{CONNECT}).  The bytes each way go to C{stats}.
    """

    transport: Any

    def __init__(self, tls: IProtocol, stats: TunnelStats | None = None) -> None:
        self.tls = tls
        self.stats = stats if stats is not None else TunnelStats()
        self._first = True
        self._refused = False

    def connectionMade(self) -> None:
        self.transport = _Counted(self.transport, self.stats)
        self.tls.makeConnection(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.stats.received += len(data)
        if self._first:
            self._first = False
            if not data.startswith(_TLS_HANDSHAKE):
                # The TLS side has written nothing yet (a server waits for
                # the ClientHello): the connection is still plain text.
                self._refused = True
                self.transport.write(NOT_TLS_ANSWER)
                self.transport.loseConnection()
                return
        if not self._refused:
            self.tls.dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if isinstance(self.transport, _Counted):
            self.transport.lost()
        self.tls.connectionLost(reason)


class InterceptTLS:
    """
    The proxy CA (C{--proxy-ca-cert}, C{--proxy-ca-key}) and the TLS it
    answers intercepted tunnels with.

    @param clock: for the reload loop and the certificates' lifetimes.
    @raise ValueError: naming the file and what is wrong with it.
    """

    def __init__(self, ca_cert: str, ca_key: str, clock: IReactorTime, max_cached: int = 1024,
                 lifetime: datetime.timedelta = INTERCEPT_LIFETIME) -> None:
        self.clock = clock
        self.tls = ServerTLS(TLSFiles(None, None, ca_cert, ca_key), clock, max_cached=max_cached,
                             lifetime=lifetime, default_names=("connectors-proxy",))
        # The cached contexts that check SNI already: a context cannot be
        # changed once a connection used it, so each is set up once.
        self._checking: weakref.WeakSet[SSL.Context] = weakref.WeakSet()
        self._refusing = _refusing_context()
        self.refused_names = 0

    def ca_pem(self) -> bytes:
        """The CA certificate clients must trust (PEM), as currently loaded."""
        ca = self.tls.material.ca
        assert ca is not None
        return ca.cert_pem()

    def start(self) -> None:
        """Read the files again every second while serving."""
        self.tls.start()

    def stop(self) -> None:
        self.tls.stop()

    def reload(self) -> bool:
        """Read the files now (C{SIGHUP}); whether a new CA was installed."""
        return self.tls.reload()

    def context_for(self, host: str) -> SSL.Context:
        """The context presenting a certificate for C{host} (minted when absent or due)."""
        leaves = self.tls.leaves
        assert leaves is not None  # the files always hold a CA here
        _, ctx = leaves.get((host,))
        assert isinstance(ctx, SSL.Context)
        if ctx not in self._checking:
            ctx.set_tlsext_servername_callback(self._sni_check(host))
            # An idle tunnel keeps no TLS read and write buffers (about 34
            # KiB each): a thousand idle tunnels cost a few MiB, not 50.
            ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
            self._checking.add(ctx)
        return ctx

    def _sni_check(self, host: str) -> Any:
        def check(connection: SSL.Connection) -> None:
            raw = connection.get_servername()
            if raw is None:
                # Clients send no SNI for IP addresses (and some not at all).
                return
            name = raw.decode("ascii", "replace").lower().rstrip(".")
            if name != host:
                self.refused_names += 1
                log.info("CONNECT to {host}: the client's TLS asked for {name!r}; handshake refused",
                         host=host, name=name[:255])
                connection.set_context(self._refusing)
        return check

    def protocol(self, host: str, inner: IProtocol, stats: TunnelStats | None = None) -> IProtocol:
        """
        The protocol to hand a tunnel's connection to: TLS as C{host}, with
        C{inner} (an HTTP channel) reading the requests inside; the bytes
        that cross the connection each way are added to C{stats}.
        """
        factory = TLSMemoryBIOFactory(_OneContext(self.context_for(host)), False, _Once(inner),
                                      clock=self.clock)
        tls = factory.buildProtocol(None)
        assert tls is not None
        return TLSOnly(tls, stats)
