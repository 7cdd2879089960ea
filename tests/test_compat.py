"""
The private Twisted names L{connectors_proxy.compat} wraps, each pinned by
what the proxy needs of it, through Twisted's own classes in memory
(C{StringTransport}, C{MemoryReactorClock}): if a Twisted release renames
or changes one, its test here fails with a message that says so, instead
of the channel, the relay or the drain misbehaving quietly.

And the rule that makes this module the only place to look: no private
Twisted name is used anywhere else in C{connectors_proxy/}.
"""

from __future__ import annotations

import ast
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from twisted.copyright import version as twisted_version
from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.testing import MemoryReactor, MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import Request as ClientRequest
from twisted.web.client import HTTP11ClientProtocol, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from connectors_proxy import compat
from connectors_proxy.server.headers import canonical_name

PACKAGE = os.path.dirname(os.path.abspath(compat.__file__))


class PinnedTestCase(SynchronousTestCase):
    """A test case whose L{pinned} turns any failure into one that names Twisted's change."""

    @contextmanager
    def pinned(self, what: str) -> Iterator[None]:
        """
        Run the block; if anything in it fails (an assertion, a missing
        attribute, a changed signature), fail with a message that says
        Twisted changed C{what} and where to adapt to it.
        """
        try:
            yield
        except Exception as e:
            raise self.failureException(
                f"Twisted {twisted_version} changed {what}; update connectors_proxy/compat.py "
                f"({type(e).__name__}: {e})"
            ) from e


def client_request() -> Any:
    return ClientRequest(b"GET", b"/", Headers({b"host": [b"upstream"]}), None, persistent=True)


class Body(Protocol):
    """Collects a response body."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.done: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.done = reason


@implementer(IStreamClientEndpoint)
class MemoryEndpoint:
    """An endpoint whose connections are client protocols over a L{StringTransport}."""

    def __init__(self) -> None:
        self.factories: list[Any] = []
        self.protocols: list[Any] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        self.factories.append(factory)
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        self.protocols.append(protocol)
        return succeed(protocol)


class Client(PinnedTestCase):
    """The upstream client's names (L{connectors_proxy.upstream.agents})."""

    def one_request(self, pool: HTTPConnectionPool) -> tuple[Any, Body]:
        """One request through C{pool} to a memory endpoint, answered and its body read."""
        endpoint = MemoryEndpoint()
        protocol = self.successResultOf(pool.getConnection(("http", b"upstream", 80), endpoint))
        d: Deferred[IResponse] = protocol.request(client_request())
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        body = Body()
        self.successResultOf(d).deliverBody(body)
        self.assertEqual(b"".join(body.data), b"ok")
        return protocol, body

    def test_client_factory(self) -> None:
        def callback(protocol: Any) -> None:
            pass

        with self.pinned("_HTTP11ClientFactory(quiescentCallback, metadata)"):
            factory = compat.HTTP11ClientFactory(callback, "meta")
            self.assertIsInstance(factory.buildProtocol(None), HTTP11ClientProtocol)

    def test_set_pool_factory(self) -> None:
        class Mine(compat.HTTP11ClientFactory):  # type: ignore[misc, valid-type]
            pass

        pool = HTTPConnectionPool(MemoryReactorClock(), persistent=True)
        compat.set_pool_factory(pool, Mine)
        endpoint = MemoryEndpoint()
        with self.pinned("HTTPConnectionPool._factory (the factory its connections are built with)"):
            self.successResultOf(pool.getConnection(("http", b"upstream", 80), endpoint))
            [factory] = endpoint.factories
            self.assertIsInstance(factory, Mine)

    def test_keep_connection(self) -> None:
        kept: list[tuple[Any, Any]] = []

        class Recording(compat.HTTPConnectionPoolCompat):
            def keep_connection(self, key: Any, connection: Any) -> None:
                kept.append((key, connection))
                super().keep_connection(key, connection)

        pool = Recording(MemoryReactorClock(), persistent=True)
        with self.pinned("HTTPConnectionPool._putConnection (called when a connection is done with a request)"):
            protocol, _ = self.one_request(pool)
            self.assertEqual(kept, [(("http", b"upstream", 80), protocol)])
        pool.closeCachedConnections()


# -- the server channel -----------------------------------------------------------


class Hold(Resource):
    """Keeps every request open (the channel's state is looked at meanwhile)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []

    def render(self, request: Request) -> Any:
        self.requests.append(request)
        return NOT_DONE_YET


class ChunkRequest(Request):
    """A request that records its body's chunks on its channel instead of spooling them."""

    channel: Any

    def handleContentChunk(self, data: bytes) -> None:
        self.channel.chunks.append(data)


class Channel(compat.HTTPChannelCompat):
    """Records what the compatibility names say at each step of the parse."""

    bound: int | None = None

    def __init__(self) -> None:
        super().__init__()
        self.bad = 0
        self.chunks: list[bytes] = []
        self.at_headers: list[tuple[int, int, bytes]] = []
        self.at_end: list[tuple[int, int, tuple[bytes, bytes, bytes], bytes]] = []

    def bad_request(self) -> None:
        self.bad += 1
        super().bad_request()

    def headerReceived(self, line: bytes) -> bool:
        self.at_headers.append((self.head_bytes, self.head_count, self.request_version))
        accepted: bool = super().headerReceived(line)
        if accepted and self.bound is not None and line.lower().startswith(b"transfer-encoding:"):
            self.bound_chunk_sizes(self.bound)
        return accepted

    def allHeadersReceived(self) -> None:
        self.at_end.append((self.head_bytes, self.head_count, self.request_line, self.request_version))
        super().allHeadersReceived()


class Server(PinnedTestCase):
    """The server channel's names (L{connectors_proxy.server.channel})."""

    def setUp(self) -> None:
        self.root = Hold()
        self.site = Site(self.root, reactor=MemoryReactorClock())
        self.site.protocol = Channel  # type: ignore[assignment]
        self.site.requestFactory = ChunkRequest
        self.channel: Channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))  # type: ignore[assignment]
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)
        self.addCleanup(self.channel.connectionLost, Failure(ConnectionDone()))

    def assert_bad_request(self, data: bytes, what: str) -> None:
        with self.pinned(f"HTTPChannel._respondToBadRequestAndDisconnect (no longer called for {what})"):
            self.channel.dataReceived(data)
            self.assertEqual(self.channel.bad, 1)
            self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 400 Bad Request\r\n"), self.transport.value())
            self.assertTrue(self.transport.disconnecting)

    def test_bad_request_line(self) -> None:
        self.assert_bad_request(b"NONSENSE\r\n\r\n", "a malformed request line")

    def test_bad_header(self) -> None:
        self.assert_bad_request(b"GET / HTTP/1.1\r\nNo colon here\r\n\r\n", "a header without a colon")

    def test_bad_framing(self) -> None:
        self.assert_bad_request(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                                "two Content-Length headers")

    def test_bad_chunk(self) -> None:
        self.assert_bad_request(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "a malformed chunk size")

    def test_head_state(self) -> None:
        lines = [b"GET /p?q=1 HTTP/1.1", b"Host: h", b"X-A: 1"]
        with self.pinned("HTTPChannel._receivedHeaderSize, _receivedHeaderCount, _command, _path or _version"):
            self.assertEqual((self.channel.head_bytes, self.channel.head_count), (0, 0))
            self.channel.dataReceived(b"\r\n".join(lines) + b"\r\n\r\n")
            # When a header is parsed, the bytes so far include it (Twisted
            # parses a header when the next line arrives); the request line's
            # version is known.
            self.assertEqual(self.channel.at_headers, [
                (len(lines[0]) + len(lines[1]) + len(lines[2]), 0, b"HTTP/1.1"),
                (len(lines[0]) + len(lines[1]) + len(lines[2]), 1, b"HTTP/1.1"),
            ])
            self.assertEqual(self.channel.at_end, [
                (sum(map(len, lines)), 2, (b"GET", b"/p?q=1", b"HTTP/1.1"), b"HTTP/1.1"),
            ])
            # A request without a body is complete: the count starts over,
            # so 0 bytes means "at a request line" for the next one.
            self.assertEqual((self.channel.head_bytes, self.channel.head_count), (0, 0))
            self.root.requests[0].finish()
            self.channel.dataReceived(b"GET / HTTP/1.0\r\n")
            self.assertEqual(self.channel.head_bytes, len(b"GET / HTTP/1.0"))

    def test_head_bytes_before_first_header(self) -> None:
        with self.pinned("HTTPChannel._receivedHeaderSize (not counting the request line)"):
            self.channel.dataReceived(b"GET / HTTP/1.1\r\n")
            self.assertEqual((self.channel.head_bytes, self.channel.head_count), (len(b"GET / HTTP/1.1"), 0))

    def chunked(self, bound: int | None, size: int) -> None:
        self.channel.bound = bound
        self.channel.dataReceived(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                                  b"10\r\n0123456789abcdef\r\n")
        self.channel.dataReceived(b"%x\r\n" % size + b"x" * size + b"\r\n0\r\n\r\n")

    def test_bound_chunk_sizes(self) -> None:
        with self.pinned("_ChunkedTransferDecoder, its _dataReceived_CHUNK_LENGTH and length, "
                         "_MalformedChunkedDataError or HTTPChannel._transferDecoder"):
            self.chunked(bound=16, size=17)
            self.assertEqual(self.channel.chunks, [b"0123456789abcdef"])  # not a byte of the long chunk
            self.assertEqual(self.channel.bad, 1)
            self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 400 Bad Request\r\n"))

    def test_chunks_within_bound(self) -> None:
        with self.pinned("_ChunkedTransferDecoder (a bounded decoder refuses a chunk within its bound)"):
            self.chunked(bound=16, size=16)
            self.assertEqual(b"".join(self.channel.chunks), b"0123456789abcdef" + b"x" * 16)
            self.assertEqual(self.channel.bad, 0)
            self.assertEqual(len(self.root.requests), 1)

    def test_unbounded(self) -> None:
        # The control: without the bound, Twisted takes the long chunk.
        self.chunked(bound=None, size=17)
        self.assertEqual(b"".join(self.channel.chunks), b"0123456789abcdef" + b"x" * 17)
        self.assertEqual(self.channel.bad, 0)

    def test_request_gone(self) -> None:
        self.channel.dataReceived(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        [request] = self.root.requests
        with self.pinned("Request._disconnected (set when the client goes away)"):
            self.assertFalse(compat.request_gone(request))
            self.channel.connectionLost(Failure(ConnectionDone()))
            self.assertTrue(compat.request_gone(request))
            self.assertFalse(request.finished)


# -- header values ------------------------------------------------------------------


class HeaderValues(PinnedTestCase):
    def test_raw_headers(self) -> None:
        headers = Headers({b"content-type": [b"text/plain"]})
        with self.pinned("Headers._rawHeaders (values by canonical name)"):
            raw = compat.raw_headers(headers)
            self.assertEqual(raw, {b"Content-Type": [b"text/plain"]})
            raw[canonical_name(b"www-authenticate")] = [b"Basic", b"Bearer"]
            self.assertEqual(headers.getRawHeaders(b"WWW-authenticate"), [b"Basic", b"Bearer"])
            self.assertEqual(list(headers.getAllRawHeaders())[-1], (b"WWW-Authenticate", [b"Basic", b"Bearer"]))


# -- sending without queueing ----------------------------------------------------------


class SendNow(PinnedTestCase):
    def connection(self) -> tuple[Any, socket.socket, MemoryReactor]:
        mine, peer = socket.socketpair()
        mine.setblocking(False)
        peer.setblocking(False)
        self.addCleanup(mine.close)
        self.addCleanup(peer.close)
        reactor = MemoryReactor()
        connection = tcp.Connection(mine, Protocol(), reactor)
        connection.connected = 1
        return connection, peer, reactor

    def test_sent_at_once_when_nothing_is_queued(self) -> None:
        connection, peer, reactor = self.connection()
        with self.pinned("tcp.Connection._tempDataBuffer, dataBuffer, offset or writeSomeData"):
            compat.send_now(connection, b"GET / HTTP/1.1\r\n\r\n")
            self.assertEqual(peer.recv(100), b"GET / HTTP/1.1\r\n\r\n")
            # Nothing queued, no writer registered.
            self.assertEqual(reactor.getWriters(), [])

    def test_queued_behind_what_is_queued(self) -> None:
        connection, peer, reactor = self.connection()
        connection.write(b"first ")
        with self.pinned("tcp.Connection._tempDataBuffer, dataBuffer, offset or writeSomeData"):
            compat.send_now(connection, b"second")
            self.assertRaises(BlockingIOError, peer.recv, 100)
            self.assertEqual(reactor.getWriters(), [connection])
            connection.doWrite()
            self.assertEqual(peer.recv(100), b"first second")

    def test_what_the_socket_does_not_take_is_queued(self) -> None:
        connection, peer, reactor = self.connection()
        big = b"x" * (16 << 20)
        with self.pinned("tcp.Connection._tempDataBuffer, dataBuffer, offset or writeSomeData"):
            compat.send_now(connection, big)
            self.assertEqual(reactor.getWriters(), [connection])
            received = 0
            while received < len(big):
                try:
                    received += len(peer.recv(1 << 20))
                except BlockingIOError:
                    connection.doWrite()
            self.assertEqual(received, len(big))

    def test_other_transports_write(self) -> None:
        transport = StringTransport()
        compat.send_now(transport, b"data")
        self.assertEqual(transport.value(), b"data")


# -- the listener TLS context ---------------------------------------------------------


class ListenerTLS(PinnedTestCase):
    """The drain's name (L{connectors_proxy.ops.drain.reloadable_tls})."""

    def test_tls_context_factory(self) -> None:
        reactor = MemoryReactorClock()
        original, replacement = CertificateOptions(), CertificateOptions()
        endpoint = SSL4ServerEndpoint(reactor, 0, original)
        with self.pinned("SSL4ServerEndpoint._sslContextFactory (what it hands to listenSSL)"):
            self.assertIs(compat.tls_context_factory(endpoint), original)
            compat.set_tls_context_factory(endpoint, replacement)
            self.assertIs(compat.tls_context_factory(endpoint), replacement)
            endpoint.listen(Factory.forProtocol(Protocol))
            [(port, factory, context, backlog, interface)] = reactor.sslServers
            self.assertIs(context, replacement)


# -- nowhere else ---------------------------------------------------------------------


# Twisted's private names the proxy has used: one-word ones cannot be told
# from the proxy's own by their spelling.
KNOWN_PRIVATE = frozenset({
    "_disconnected", "_version", "_command", "_path", "_parser", "_connections", "_factory",
    "_transferDecoder", "_sslContextFactory", "_quiescentCallback",
})


def private_twisted_uses(source: str) -> list[tuple[int, str]]:
    """
    The lines of C{source} that use a private Twisted name: a private
    name imported from, or read off, a Twisted module; a camelCase private
    attribute (Twisted's spelling; the proxy's own are snake_case); one of
    L{KNOWN_PRIVATE}.
    """
    tree = ast.parse(source)
    twisted_modules: set[str] = set()
    other_modules: set[str] = set()
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "twisted":
            for alias in node.names:
                if alias.name.startswith("_"):
                    found.append((node.lineno, f"from {node.module} import {alias.name}"))
                else:
                    twisted_modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                bound = (alias.asname or alias.name).split(".")[0]
                (twisted_modules if alias.name.split(".")[0] == "twisted" else other_modules).add(bound)

    def private(name: str) -> bool:
        return name.startswith("_") and not name.startswith("__")

    def camel(name: str) -> bool:
        return any(c.isupper() for c in name.lstrip("_").split("_")[0])

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr):
            owner = node.value.id if isinstance(node.value, ast.Name) else None
            if owner in twisted_modules:
                found.append((node.lineno, f"{owner}.{node.attr}"))
            elif owner not in other_modules and (node.attr in KNOWN_PRIVATE or camel(node.attr)):
                found.append((node.lineno, node.attr))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and private(node.name) and camel(node.name):
            # An override of a private Twisted method.
            found.append((node.lineno, node.name))
    return sorted(found)


class NowhereElse(SynchronousTestCase):
    """Private Twisted names are used only in C{connectors_proxy/compat.py}."""

    def test_detector(self) -> None:
        self.assertEqual(private_twisted_uses(
            "import argparse\n"
            "from twisted.web import http\n"
            "from twisted.web.client import _HTTP11ClientFactory\n"
            "class C(http._ChunkedTransferDecoder):\n"
            "    def _dataReceived_CHUNK_LENGTH(self): return self._receivedHeaderSize\n"
            "gone = request._disconnected\n"
            "mine = self._own_thing, self._early, argparse._SubParsersAction\n"
            "def _path(): pass\n"
        ), [(3, "from twisted.web.client import _HTTP11ClientFactory"), (4, "http._ChunkedTransferDecoder"),
            (5, "_dataReceived_CHUNK_LENGTH"), (5, "_receivedHeaderSize"), (6, "_disconnected")])

    def test_only_in_compat(self) -> None:
        uses: list[str] = []
        for folder, _, files in os.walk(PACKAGE):
            for name in sorted(files):
                path = os.path.join(folder, name)
                if not name.endswith(".py") or path == os.path.join(PACKAGE, "compat.py"):
                    continue
                with open(path, encoding="utf-8") as f:
                    for line, what in private_twisted_uses(f.read()):
                        uses.append(f"{os.path.relpath(path, PACKAGE)}:{line}: {what}")
        self.assertEqual(uses, [], "private Twisted names outside connectors_proxy/compat.py: "
                                   "give each a public name there (and a test here)")
