"""
Request smuggling (SPEC section 10): whatever another HTTP parser could frame
differently than the proxy's is refused with 400 and the connection closed,
never forwarded and never parsed as a next request.  In memory for each rule,
then on a real socket against nginx, which logs anything it was sent.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from connectors_proxy.server.channel import ProxySite

from .support.proxy import basic
from .support.wire import NginxBehindProxy
from .test_streaming import Capture, Consumer

# A request that must never be seen as one: it follows each refused head.
NEXT = b"GET /SMUGGLED HTTP/1.1\r\nHost: a\r\n\r\n"


class Parser(SynchronousTestCase):
    """The channel's parser, through a StringTransport."""

    def setUp(self) -> None:
        self.root = Capture()
        self.site = ProxySite(self.root, Clock())
        self.channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)

    def connect(self) -> None:
        self.setUp()

    def assertRefused(self, data: bytes, problem: bytes = b"", dispatched: int = 0) -> None:
        """Each of C{data}'s requests on a new connection: a lone 400, the connection closed."""
        self.connect()
        self.channel.dataReceived(data)
        answer = self.transport.value()
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), (data, answer))
        self.assertEqual(answer.count(b"HTTP/1.1 "), 1, data)
        self.assertIn(b"Connection: close", answer)
        self.assertIn(problem, answer)
        self.assertTrue(self.transport.disconnecting, data)
        self.assertEqual(len(self.root.requests), dispatched, data)
        self.assertNotIn(b"/SMUGGLED", [r.uri for r in self.root.requests])

    def test_transfer_encoding_identity(self) -> None:
        for head in (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\nContent-Length: %d\r\n\r\n"
                     % len(NEXT),
                     b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\nTransfer-Encoding: identity\r\n\r\n"
                     % len(NEXT),
                     b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n"):
            self.assertRefused(head + NEXT, b"Transfer-Encoding other than chunked")

    def test_transfer_encoding_other_than_chunked(self) -> None:
        for value in (b"chunked, identity", b"identity, chunked", b"chunked, chunked", b"gzip", b"chunked;x",
                      b"xchunked", b"\"chunked\""):
            self.assertRefused(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: " + value + b"\r\n\r\n0\r\n\r\n"
                               + NEXT, b"Transfer-Encoding other than chunked")

    def test_transfer_encoding_on_http_1_0(self) -> None:
        self.assertRefused(b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + NEXT,
                           b"Transfer-Encoding on HTTP/1.0")

    def test_obs_folded_lines(self) -> None:
        for head in (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity,\r\n chunked\r\n",
                     b"POST / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n Transfer-Encoding: chunked\r\n",
                     b"POST / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n\tmore\r\n",
                     b"POST / HTTP/1.1\r\n Host: a\r\n"):
            self.assertRefused(head + b"\r\n0\r\n\r\n" + NEXT, b"obs-folded header line")

    def test_duplicate_host(self) -> None:
        for hosts in (b"Host: a\r\nHost: b\r\n", b"Host: a\r\nhost: a\r\n", b"HOST: a\r\nX: 1\r\nHost: b\r\n"):
            self.assertRefused(b"GET / HTTP/1.1\r\n" + hosts + b"\r\n" + NEXT, b"more than one Host header")

    def test_control_characters_in_values(self) -> None:
        for value in (b"a\x00b", b"a\x01b", b"a\x7fb", b"\x1b[31m", b"a\x0bb", b"a\x0cb"):
            self.assertRefused(b"GET / HTTP/1.1\r\nHost: a\r\nX-Value: " + value + b"\r\n\r\n" + NEXT)
        self.assertRefused(b"GET / HTTP/1.1\r\nHost: a\x01\r\n\r\n", b"control character in a header value")

    def test_horizontal_tab_allowed(self) -> None:
        self.channel.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\nX-Value: a\tb\r\n\r\n")
        [request] = self.root.requests
        self.assertEqual(request.getHeader(b"x-value"), b"a\tb")
        self.assertEqual(self.transport.value(), b"")

    def test_chunk_size_over_2_53(self) -> None:
        for size in (b"ffffffffffffffffffffffff", b"20000000000001", b"000020000000000001"):
            self.assertRefused(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                               + size + b"\r\n" + b"x" * 10, dispatched=1)
            # The request that was dispatched before its body is told the
            # client is gone: its upstream exchange stops, nothing more is
            # written.
            [request] = self.root.requests
            self.assertTrue(request._disconnected)

    def test_chunked_body_up_to_the_limit(self) -> None:
        self.channel.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n")
        [request] = self.root.requests
        assert request.body is not None
        consumer = Consumer()
        done = request.body.startProducing(consumer)
        self.channel.dataReceived(b"3;ext=1\r\nabc\r\n20000000000000\r\nde")
        self.assertEqual(b"".join(consumer.data), b"abcde")
        self.assertNoResult(done)
        self.assertEqual(self.transport.value(), b"")
        self.assertFalse(self.transport.disconnecting)


class OnTheWire(NginxBehindProxy):
    """Raw bytes on a real socket, to a proxy whose Connector is a real nginx."""

    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        yield super().setUp()
        self.auth = b"Authorization: " + basic("x", self.token) + b"\r\n"

    @inlineCallbacks
    def assertRefused(self, data: bytes, problem: bytes):  # type: ignore[no-untyped-def]
        answer, took = yield self.ask(data)
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), (data, answer[:300]))
        self.assertEqual(answer.count(b"HTTP/1.1 "), 1, answer)
        self.assertIn(problem, answer)
        self.assertLess(took, 3, "the connection was not closed")

    @inlineCallbacks
    def test_transfer_encoding_identity_smuggles_nothing(self):  # type: ignore[no-untyped-def]
        # The smuggled request is one the proxy would forward (a valid token,
        # a Connector's path), so the upstream's log shows if it got through.
        smuggled = (b"GET /namespaces/default/connectors/basic/SMUGGLED HTTP/1.1\r\nHost: p\r\n" + self.auth
                    + b"\r\n")
        for auth in (self.auth, b""):
            for length in (b"Content-Length: %d\r\n" % len(smuggled), b""):
                yield self.assertRefused(b"POST /namespaces/default/connectors/basic/echo HTTP/1.1\r\nHost: p\r\n"
                                         + auth + b"Transfer-Encoding: identity\r\n" + length + b"\r\n" + smuggled,
                                         b"Transfer-Encoding other than chunked")
        self.assertEqual(self.nginx.requests(), [])

    @inlineCallbacks
    def test_other_ambiguities(self):  # type: ignore[no-untyped-def]
        path = b"/namespaces/default/connectors/basic/echo"
        for request, problem in (
            (b"POST " + path + b" HTTP/1.1\r\nHost: p\r\n" + self.auth
             + b"X-A: 1\r\n Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"obs-folded header line"),
            (b"POST " + path + b" HTTP/1.0\r\nHost: p\r\n" + self.auth
             + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"Transfer-Encoding on HTTP/1.0"),
            (b"GET " + path + b" HTTP/1.1\r\nHost: p\r\nHost: c-basic.default\r\n" + self.auth + b"\r\n",
             b"more than one Host header"),
            (b"GET " + path + b" HTTP/1.1\r\nHost: p\r\nX-A: a\x01b\r\n" + self.auth + b"\r\n",
             b"control character in a header value"),
        ):
            yield self.assertRefused(request, problem)
        self.assertEqual(self.nginx.requests(), [])

    @inlineCallbacks
    def test_chunk_size_over_2_53(self):  # type: ignore[no-untyped-def]
        yield self.assertRefused(b"PUT /namespaces/default/connectors/basic/up/x HTTP/1.1\r\nHost: p\r\n" + self.auth
                                 + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffffffffffff\r\nabc", b"Bad Request")

    @inlineCallbacks
    def test_lookalike_dot_segments(self):  # type: ignore[no-untyped-def]
        for rest in (b"..%20", b"..%09", b"%c0%ae%c0%ae", b"%ef%bc%8e%ef%bc%8e", b"%u002e%u002e", b".%c0%ae",
                     b"%2e%ef%bc%8e", b"a%c0%afb", b"%e0%80%ae%e0%80%ae"):
            answer, _ = yield self.ask(b"GET /namespaces/default/connectors/basic/" + rest + b"/x HTTP/1.1\r\n"
                                       b"Host: p\r\n" + self.auth + b"Connection: close\r\n\r\n")
            self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), (rest, answer[:300]))
            self.assertIn(b"path contains", answer)
        self.assertEqual(self.nginx.requests(), [])
