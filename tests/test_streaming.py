"""
The streaming channel and request, driven through a StringTransport: no
sockets, no reactor, a Clock for timeouts.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from connectors_proxy.server.channel import DRAIN_SECONDS, ProxyRequest, ProxySite


class Capture(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[ProxyRequest] = []

    def render(self, request: ProxyRequest):  # type: ignore[no-untyped-def, override]
        self.requests.append(request)
        return NOT_DONE_YET


class Consumer:
    def __init__(self) -> None:
        self.data: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.data.append(data)

    def registerProducer(self, producer, streaming):  # type: ignore[no-untyped-def]
        pass

    def unregisterProducer(self) -> None:
        pass


class Streaming(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.root = Capture()
        self.site = ProxySite(self.root, self.clock)
        self.channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)
        self.addCleanup(self.channel.connectionLost, None)

    def test_dispatched_before_body_and_continue_only_when_wanted(self) -> None:
        self.channel.dataReceived(b"PUT /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n")
        [request] = self.root.requests
        self.assertEqual((request.method, request.uri), (b"PUT", b"/x"))
        self.assertEqual(self.transport.value(), b"")  # no 100 Continue before the upstream wants the body
        self.assertEqual(self.transport.producerState, "paused")  # not reading the body
        consumer = Consumer()
        assert request.body is not None
        done = request.body.startProducing(consumer)
        self.assertEqual(self.transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertEqual(self.transport.producerState, "producing")
        self.channel.dataReceived(b"01234")
        request.body.pauseProducing()
        self.assertEqual(self.transport.producerState, "paused")
        self.channel.dataReceived(b"56789")  # already in flight when paused: kept, not lost
        self.assertEqual(b"".join(consumer.data), b"01234")
        self.assertNoResult(done)
        request.body.resumeProducing()
        self.assertEqual(b"".join(consumer.data), b"0123456789")
        self.successResultOf(done)
        self.assertEqual(request.body.received, 10)

    def test_chunked_body(self) -> None:
        self.channel.dataReceived(b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        [request] = self.root.requests
        assert request.body is not None
        consumer = Consumer()
        done = request.body.startProducing(consumer)
        self.channel.dataReceived(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
        self.assertEqual(b"".join(consumer.data), b"abcde")
        self.successResultOf(done)

    def test_request_without_body_dispatched_normally(self) -> None:
        self.channel.dataReceived(b"GET /x?a=1 HTTP/1.1\r\nHost: a\r\n\r\n")
        [request] = self.root.requests
        self.assertIsNone(request.body)
        self.assertEqual((request.path, request.uri), (b"/x", b"/x?a=1"))

    def test_refused_before_body_closes_after_bounded_drain(self) -> None:
        self.channel.dataReceived(b"PUT /x HTTP/1.1\r\nContent-Length: 100000000\r\n\r\nsome")
        [request] = self.root.requests
        request.setResponseCode(401)
        request.write(b"no")
        request.finish()
        self.assertIn(b"401", self.transport.value())
        self.assertIn(b"Connection: close", self.transport.value())
        self.channel.dataReceived(b"x" * 1000)  # discarded
        self.assertEqual(len(self.root.requests), 1)
        self.clock.advance(DRAIN_SECONDS)
        self.assertTrue(self.transport.disconnecting)

    def test_expectation_other_than_continue(self) -> None:
        self.channel.dataReceived(b"PUT /x HTTP/1.1\r\nExpect: teapot\r\nContent-Length: 1\r\n\r\n")
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 417"))
        self.assertEqual(self.root.requests, [])

    def test_slow_headers(self) -> None:
        self.channel.dataReceived(b"GET / HTTP/1.1\r\n")
        self.clock.advance(29)
        self.channel.dataReceived(b"X-A: 1\r\n")
        self.assertEqual(self.transport.value(), b"")
        self.clock.advance(1)
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 408"))

    def test_slow_first_line(self) -> None:
        for _ in range(29):
            self.channel.dataReceived(b"G")
            self.clock.advance(1)
        self.assertEqual(self.transport.value(), b"")
        self.clock.advance(1)
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 408"))

    def test_bare_line_feeds(self) -> None:
        self.channel.dataReceived(b"GET / HTTP/1.1\nHost: x\n\n")
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 400"))
        self.assertEqual(self.root.requests, [])

    def test_line_feeds_in_a_body_are_fine(self) -> None:
        self.channel.dataReceived(b"PUT /x HTTP/1.1\r\nContent-Length: 4\r\n\r\na\nb\n")
        [request] = self.root.requests
        self.assertEqual(self.transport.value(), b"")
        assert request.body is not None
        consumer = Consumer()
        request.body.startProducing(consumer)
        self.assertEqual(b"".join(consumer.data), b"a\nb\n")

    def test_split_crlf(self) -> None:
        self.channel.dataReceived(b"GET / HTTP/1.1\r")
        self.channel.dataReceived(b"\nHost: x\r\n\r\n")
        self.assertEqual(len(self.root.requests), 1)
