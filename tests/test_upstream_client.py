# -*- test-case-name: tests.test_upstream_client -*-
"""
The upstream HTTP/1.1 client on in-memory transports and a L{Clock}: what
it writes, how it frames what it reads, when it reuses a connection, its
timeouts, cancellation and backpressure.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import (
    PotentialDataLoss,
    RequestGenerationFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory
from zope.interface import implementer

from connectors_proxy.upstream.bodies import BytesProducer
from connectors_proxy.upstream.client import HTTP11Agent, split_url
from connectors_proxy.upstream.framing import MalformedResponse
from connectors_proxy.upstream.timeouts import UpstreamTimeout, UpstreamTimeouts


class Transport(StringTransport):
    """A StringTransport that counts writes and remembers an abort."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


@implementer(IStreamClientEndpoint, IAgentEndpointFactory)
class Endpoint:
    """Connects at once (or when the test says) to in-memory transports; one endpoint for every origin."""

    def __init__(self, hold: bool = False) -> None:
        self.connections: list[tuple[Any, Transport]] = []
        self.hold = hold
        self.waiting: list[Deferred[Any]] = []
        self.origins: list[bytes] = []

    def endpointForURI(self, uri: Any) -> Endpoint:
        self.origins.append(uri.toBytes())
        return self

    def connect(self, factory: Any) -> Deferred[Any]:
        if self.hold:
            d: Deferred[Any] = Deferred()
            self.waiting.append(d)
            return d
        protocol = factory.buildProtocol(None)
        transport = Transport()
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return succeed(protocol)

    def last(self) -> tuple[Any, Transport]:
        return self.connections[-1]


class Reader(Protocol):
    """A body reader that keeps what it is given."""

    def __init__(self, framed: bool = False) -> None:
        self.data: list[bytes] = []
        self.framed: list[tuple[bytes, int]] = []
        self.reason: Failure | None = None
        self.framed_wanted = framed

    def connectionMade(self) -> None:
        self.wants_framed = self.framed_wanted

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)

    def framedReceived(self, data: bytes, payload: int) -> None:
        self.framed.append((data, payload))

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # type: ignore[assignment]
        self.reason = reason


class Upload:
    """A request body the test feeds."""

    def __init__(self, length: Any) -> None:
        self.length = length
        self.consumer: Any = None
        self.done: Deferred[None] = Deferred()
        self.stopped = False

    def startProducing(self, consumer: Any) -> Deferred[None]:
        self.consumer = consumer
        return self.done

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        self.stopped = True


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class ClientTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.endpoint = Endpoint()
        self.agent = HTTP11Agent(self.clock, self.endpoint, UpstreamTimeouts(headers=10, idle=5))

    def get(self, url: bytes = b"http://upstream:8080/a?b=1", method: bytes = b"GET",
            headers: Headers | None = None, body: Any = None) -> Deferred[Any]:
        return self.agent.request(method, url, headers, body)

    def read(self, response: Any, framed: bool = False) -> Reader:
        reader = Reader(framed)
        response.deliverBody(reader)
        return reader


class RequestTests(ClientTestCase):
    def test_head_in_one_write(self) -> None:
        self.get(headers=Headers({b"X-A": [b"1", b"2"]}))
        protocol, transport = self.endpoint.last()
        self.assertEqual(transport.value(),
                         b"GET /a?b=1 HTTP/1.1\r\nX-A: 1\r\nX-A: 2\r\nHost: upstream:8080\r\n\r\n")
        self.assertEqual(transport.writes, 1)

    def test_default_ports_and_bodiless_post(self) -> None:
        self.get(b"https://upstream", method=b"POST")
        self.assertEqual(self.endpoint.last()[1].value(),
                         b"POST / HTTP/1.1\r\nContent-Length: 0\r\nHost: upstream\r\n\r\n")

    def test_fragment_dropped(self) -> None:
        self.assertEqual(split_url(b"http://h:1/p?q#frag"), (b"http://h:1", b"/p?q"))
        self.assertEqual(split_url(b"http://[::1]:1?q"), (b"http://[::1]:1", b"/?q"))
        self.assertEqual(split_url(b"http://h/a?b/c"), (b"http://h", b"/a?b/c"))
        self.assertEqual(split_url(b"http://h?x/y"), (b"http://h", b"/?x/y"))
        self.assertEqual(split_url(b"https://h"), (b"https://h", b"/"))

    def test_bad_requests_fail_before_connecting(self) -> None:
        for method, url in [(b"GET", b"/relative"), (b"G ET", b"http://h/"), (b"GET", b"http://h/a b"),
                            (b"GET", b"http://h/a\r\nX: y")]:
            self.failureResultOf(self.agent.request(method, url), ValueError)
        self.assertEqual(self.endpoint.connections, [])

    def test_sized_upload(self) -> None:
        upload = Upload(5)
        d = self.get(method=b"PUT", body=upload)
        protocol, transport = self.endpoint.last()
        upload.consumer.write(b"hel")
        upload.consumer.write(b"lo")
        upload.done.callback(None)
        self.assertTrue(transport.value().endswith(b"Content-Length: 5\r\nHost: upstream:8080\r\n\r\nhello"))
        self.assertIs(transport.producer, None)
        protocol.dataReceived(OK)
        self.assertEqual(self.successResultOf(d).code, 200)
        self.assertEqual(self.agent.idle_connections(), 1)

    def test_upload_longer_than_announced(self) -> None:
        upload = Upload(2)
        self.get(method=b"PUT", body=upload)
        self.assertRaises(ValueError, upload.consumer.write, b"abc")

    def test_upload_shorter_than_announced_fails(self) -> None:
        upload = Upload(5)
        d = self.get(method=b"PUT", body=upload)
        protocol, transport = self.endpoint.last()
        upload.consumer.write(b"abc")
        upload.done.callback(None)
        self.failureResultOf(d, RequestGenerationFailed)
        self.assertTrue(transport.aborted)

    def test_chunked_upload(self) -> None:
        upload = Upload(UNKNOWN_LENGTH)
        self.get(method=b"POST", body=upload)
        protocol, transport = self.endpoint.last()
        upload.consumer.write(b"hello")
        upload.done.callback(None)
        self.assertTrue(transport.value().endswith(b"Transfer-Encoding: chunked\r\nHost: upstream:8080\r\n\r\n"
                                                   b"5\r\nhello\r\n0\r\n\r\n"))

    def test_failed_upload(self) -> None:
        upload = Upload(5)
        d = self.get(method=b"PUT", body=upload)
        protocol, transport = self.endpoint.last()
        upload.done.errback(ConnectionLost("client went away"))
        self.failureResultOf(d, RequestGenerationFailed)
        self.assertTrue(transport.aborted)

    def test_early_answer_to_an_upload(self) -> None:
        """An answer before the upload ends (401, 413): relayed; the upload stops, the connection closes."""
        upload = Upload(1000)
        d = self.get(method=b"PUT", body=upload)
        protocol, transport = self.endpoint.last()
        upload.consumer.write(b"x" * 10)
        protocol.dataReceived(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.successResultOf(d).code, 413)
        self.assertTrue(upload.stopped)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.agent.idle_connections(), 0)


class ResponseTests(ClientTestCase):
    def respond(self, data: bytes, method: bytes = b"GET") -> tuple[Any, Any, Transport]:
        d = self.get(method=method)
        protocol, transport = self.endpoint.last()
        protocol.dataReceived(data)
        return self.successResultOf(d), protocol, transport

    def test_small_body_frees_the_connection_before_it_is_read(self) -> None:
        response, _, transport = self.respond(OK)
        self.assertEqual(self.agent.idle_connections(), 1)
        reader = self.read(response)
        self.assertEqual(b"".join(reader.data), b"ok")
        assert reader.reason is not None
        reader.reason.trap(ResponseDone)
        self.assertEqual(response.length, 2)

    def test_keep_alive_reuses_the_newest_connection(self) -> None:
        for _ in range(3):
            response, protocol, _ = self.respond(OK)
            self.read(response)
        self.assertEqual(len(self.endpoint.connections), 1)
        self.assertEqual(self.endpoint.origins, [b"http://upstream:8080/"])

    def test_connection_close_and_http_10_not_reused(self) -> None:
        for answer in (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                       b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"):
            response, _, transport = self.respond(answer)
            self.assertTrue(transport.disconnecting)
        self.assertEqual(self.agent.idle_connections(), 0)

    def test_headers(self) -> None:
        response, _, _ = self.respond(
            b"HTTP/1.1 200 OK\r\nConnection: X-Hop, keep-alive\r\nX-Hop: secret\r\nKeep-Alive: 5\r\n"
            b"X-End: kept\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(list(response.headers.getAllRawHeaders()), [(b"X-End", [b"kept"])])
        self.assertEqual(response.version, (b"HTTP", 1, 1))
        self.assertEqual(self.agent.idle_connections(), 1)

    def test_head_keeps_its_length(self) -> None:
        response, _, _ = self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", method=b"HEAD")
        self.assertEqual(response.headers.getRawHeaders(b"content-length"), [b"1234"])
        self.assertEqual(response.length, 0)
        self.assertEqual(self.agent.idle_connections(), 1)

    def test_interim_answers_skipped(self) -> None:
        response, _, _ = self.respond(b"HTTP/1.1 100 Continue\r\nX-A: 1\r\n\r\nHTTP/1.1 103 Early\r\n\r\n" + OK)
        self.assertEqual((response.code, response.headers.hasHeader(b"x-a")), (200, False))

    def test_head_split_across_reads(self) -> None:
        d = self.get()
        protocol, _ = self.endpoint.last()
        for byte in OK:
            protocol.dataReceived(bytes([byte]))
        self.assertEqual(b"".join(self.read(self.successResultOf(d)).data), b"ok")

    def test_malformed_head(self) -> None:
        d = self.get()
        protocol, transport = self.endpoint.last()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
        failure = self.failureResultOf(d, ResponseFailed)
        failure.value.reasons[0].trap(MalformedResponse)
        self.assertTrue(transport.aborted)

    def test_head_too_large(self) -> None:
        d = self.get()
        protocol, transport = self.endpoint.last()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\n" + b"X-A: " + b"a" * 70000)
        self.failureResultOf(d, ResponseFailed)
        self.assertTrue(transport.aborted)

    def test_switching_protocols_refused(self) -> None:
        d = self.get()
        self.endpoint.last()[0].dataReceived(b"HTTP/1.1 101 Switching\r\nUpgrade: x\r\n\r\n")
        self.failureResultOf(d, ResponseFailed)

    def test_bytes_after_the_response_close_it(self) -> None:
        response, _, transport = self.respond(OK + b"HTTP/1.1 200 OK\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.agent.idle_connections(), 0)
        self.assertEqual(b"".join(self.read(response).data), b"ok")

    def test_until_close(self) -> None:
        response, protocol, _ = self.respond(b"HTTP/1.1 200 OK\r\n\r\nsome")
        reader = self.read(response)
        protocol.dataReceived(b" more")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(b"".join(reader.data), b"some more")
        assert reader.reason is not None
        reader.reason.trap(PotentialDataLoss)

    def test_truncated_body(self) -> None:
        response, protocol, _ = self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        reader = self.read(response)
        protocol.connectionLost(Failure(ConnectionDone()))
        assert reader.reason is not None
        reader.reason.trap(ResponseFailed)
        self.assertEqual(reader.data, [b"abc"])

    def test_chunked_decoded(self) -> None:
        response, protocol, _ = self.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel")
        reader = self.read(response)
        protocol.dataReceived(b"lo\r\n0\r\n\r\n")
        self.assertEqual(b"".join(reader.data), b"hello")
        self.assertEqual(self.agent.idle_connections(), 1)

    def test_chunked_framed(self) -> None:
        response, protocol, _ = self.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel")
        reader = self.read(response, framed=True)
        protocol.dataReceived(b"lo\r\n3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\n")
        self.assertEqual(reader.framed, [(b"5\r\nhel", 3), (b"lo\r\n3\r\nabc\r\n", 5)])
        assert reader.reason is not None
        reader.reason.trap(ResponseDone)
        self.assertEqual(self.agent.idle_connections(), 1)

    def test_a_body_nobody_reads_yet_pauses_the_upstream(self) -> None:
        response, protocol, transport = self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        self.assertEqual(transport.producerState, "paused")
        reader = self.read(response)
        self.assertEqual(transport.producerState, "producing")
        protocol.dataReceived(b"defghij")
        self.assertEqual(b"".join(reader.data), b"abcdefghij")

    def test_reader_backpressure(self) -> None:
        response, protocol, transport = self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        reader = self.read(response)
        assert reader.transport is not None
        reader.transport.pauseProducing()
        self.assertEqual(transport.producerState, "paused")
        reader.transport.resumeProducing()
        self.assertEqual(transport.producerState, "producing")
        reader.transport.stopProducing()
        self.assertTrue(transport.aborted)

    def test_a_late_reader_cannot_touch_the_next_exchange(self) -> None:
        response, protocol, transport = self.respond(OK)
        reader = self.read(response)
        d = self.get()
        self.assertEqual(len(self.endpoint.connections), 1)
        assert reader.transport is not None
        reader.transport.pauseProducing()
        reader.transport.stopProducing()
        self.assertEqual((transport.producerState, transport.aborted), ("producing", False))
        protocol.dataReceived(OK)
        self.assertEqual(self.successResultOf(d).code, 200)


class ReuseRaceTests(ClientTestCase):
    def idle_connection(self) -> tuple[Any, Transport]:
        response, = [self.successResultOf(self.respond_ok())]
        self.read(response)
        return self.endpoint.last()

    def respond_ok(self) -> Deferred[Any]:
        d = self.get()
        self.endpoint.last()[0].dataReceived(OK)
        return d

    def test_get_sent_again_on_a_new_connection(self) -> None:
        stale, _ = self.idle_connection()
        d = self.get()
        stale.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.endpoint.connections), 2)
        fresh, transport = self.endpoint.last()
        self.assertTrue(transport.value().startswith(b"GET /a?b=1 HTTP/1.1"))
        fresh.dataReceived(OK)
        self.assertEqual(self.successResultOf(d).code, 200)

    def test_upload_not_sent_again(self) -> None:
        stale, _ = self.idle_connection()
        d = self.get(method=b"PUT", body=BytesProducer(b"abc"))
        stale.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, ResponseNeverReceived)
        self.assertEqual(len(self.endpoint.connections), 1)

    def test_idle_connection_closed_by_the_upstream_is_forgotten(self) -> None:
        stale, _ = self.idle_connection()
        stale.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.agent.idle_connections(), 0)

    def test_idle_connections_closed_after_the_idle_timeout(self) -> None:
        _, transport = self.idle_connection()
        self.clock.advance(29)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.agent.idle_connections(), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_never_answered(self) -> None:
        d = self.get()
        self.endpoint.last()[0].connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(d, ResponseNeverReceived)


class TimeoutTests(ClientTestCase):
    def test_headers_timer_starts_when_the_body_is_sent(self) -> None:
        upload = Upload(3)
        d = self.get(method=b"PUT", body=upload)
        protocol, transport = self.endpoint.last()
        # A long upload is not the upstream's delay.
        self.clock.advance(100)
        self.assertNoResult(d)
        upload.consumer.write(b"abc")
        upload.done.callback(None)
        self.clock.advance(9.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        failure = self.failureResultOf(d, UpstreamTimeout)
        self.assertEqual((failure.value.phase, failure.value.fault), ("headers", "upstream-timeout"))
        self.assertTrue(transport.aborted)
        protocol.connectionLost(Failure(ConnectionDone()))

    def test_answer_in_time(self) -> None:
        d = self.get()
        self.clock.advance(9)
        self.endpoint.last()[0].dataReceived(OK)
        self.read(self.successResultOf(d))
        # No timer left behind but the idle sweep of the kept connection.
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_cancel(self) -> None:
        d = self.get()
        _, transport = self.endpoint.last()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(transport.aborted)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancel_while_connecting(self) -> None:
        self.endpoint.hold = True
        d = self.get()
        d.cancel()
        self.failureResultOf(d, CancelledError)

    def body(self) -> tuple[Any, Reader, Transport]:
        d = self.get()
        protocol, transport = self.endpoint.last()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        return protocol, self.read(self.successResultOf(d)), transport

    def test_idle_body_is_cut(self) -> None:
        protocol, reader, transport = self.body()
        self.clock.advance(4.5)
        self.assertFalse(transport.aborted)
        self.clock.advance(0.6)
        self.assertTrue(transport.aborted)
        # Whatever the connection's end says, the reader learns it was the timeout.
        protocol.connectionLost(Failure(ConnectionDone()))
        assert reader.reason is not None
        self.assertEqual(reader.reason.value.phase, "body")

    def test_every_byte_resets(self) -> None:
        protocol, reader, transport = self.body()
        for _ in range(10):
            self.clock.advance(4)
            protocol.dataReceived(b"x" * 10)
        self.assertFalse(transport.aborted)
        assert reader.reason is not None
        reader.reason.trap(ResponseDone)

    def test_paused_by_the_proxy_does_not_count(self) -> None:
        protocol, reader, transport = self.body()
        assert reader.transport is not None
        reader.transport.pauseProducing()
        self.clock.advance(60)
        self.assertFalse(transport.aborted)
        reader.transport.resumeProducing()
        self.clock.advance(4.9)
        self.assertFalse(transport.aborted)
        self.clock.advance(0.2)
        self.assertTrue(transport.aborted)

    def test_no_timeouts(self) -> None:
        agent = HTTP11Agent(self.clock, self.endpoint, UpstreamTimeouts(headers=0, idle=0), idle_timeout=0)
        agent.request(b"GET", b"http://u/")
        self.assertEqual(self.clock.getDelayedCalls(), [])


class StoppingReader(Reader):
    """Stops the body at its first bytes, as a reader over its size limit does."""

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        assert self.transport is not None
        self.transport.stopProducing()


class StoppedTests(ClientTestCase):
    def test_reader_stops_while_taking_what_had_come(self) -> None:
        d = self.get()
        protocol, transport = self.endpoint.last()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nfirst")
        reader = StoppingReader()
        self.successResultOf(d).deliverBody(reader)
        self.assertTrue(transport.aborted)
        # No idle timer for a body that is already over, no resumed reading.
        self.assertEqual((transport.producerState, self.clock.getDelayedCalls()), ("paused", []))
        protocol.connectionLost(Failure(ConnectionDone()))
        assert reader.reason is not None
        reader.reason.trap(ResponseFailed)
