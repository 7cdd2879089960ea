# -*- test-case-name: tests.test_upstream_client_hostile -*-
"""
A hostile review of the upstream HTTP/1.1 client (L{connectors_proxy.upstream.client},
L{connectors_proxy.upstream.framing}) and of how the relay uses it: what a
broken or hostile upstream can make it do to the next exchange on a reused
connection, to the proxy's resources, and to what clients receive.

The first classes are findings: each test fails until the client is fixed.
L{GuardTests} pins down suspected issues that turned out fine.
"""

from __future__ import annotations

import base64
import gzip
import secrets
import time
from typing import Any

from twisted.internet import main, ssl
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from connectors_proxy.tls.mint import CertificateAuthority
from connectors_proxy.upstream.bodies import BytesProducer
from connectors_proxy.upstream.client import MAX_ORIGINS, READ_SIZE, HTTP11Agent
from connectors_proxy.upstream.framing import ChunkedReader, Framing, MalformedResponse, framing, parse_head
from connectors_proxy.upstream.timeouts import UpstreamTimeout, UpstreamTimeouts

from .support.memory import Upstream, bearer, memory_proxy, request_bytes
from .support.proxy import basic_secret, connector, connector_class, sa
from .test_upstream_client import OK, ClientTestCase, Reader, Upload


def outcome(d: Deferred[Any]) -> Any:
    """What C{d} fired with (a result or a Failure), or fail the test if it has not fired."""
    results: list[Any] = []
    d.addBoth(results.append)
    if not results:
        raise AssertionError(f"{d!r} has not fired")
    return results[0]


# -- response smuggling and desync ---------------------------------------------------


class DesyncTests(ClientTestCase):
    def test_transfer_encoding_on_http10_is_not_reused(self) -> None:
        """
        RFC 9112 section 6.1: an HTTP/1.0 message with Transfer-Encoding has
        faulty framing; the connection is closed after it (even with
        Connection: keep-alive).  An HTTP/1.0 hop in front of the upstream
        does not know chunked: its idea of where the body ends differs.
        """
        d = self.get()
        protocol, transport = self.endpoint.last()
        protocol.dataReceived(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
                              b"2\r\nok\r\n0\r\n\r\n")
        self.read(self.successResultOf(d))
        self.assertEqual(self.agent.idle_connections(), 0)
        self.assertTrue(transport.disconnecting)

    def test_bytes_after_a_chunked_body_read_late_close_the_connection(self) -> None:
        """
        A chunked body that arrives before its reader is kept unparsed.  If
        more reads arrive before the reader does (a TLS transport hands on
        every record it has decrypted, paused or not), the bytes after the
        body must still make the connection unusable, as they do when the
        reader was there: here they are dropped unseen and the connection
        goes back to the pool, out of step with the upstream.
        """
        d = self.get()
        protocol, transport = self.endpoint.last()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!")
        reader = self.read(self.successResultOf(d))
        self.assertEqual(b"".join(reader.data), b"ok")
        self.assertEqual(self.agent.idle_connections(), 0)
        self.get()
        self.assertEqual(len(self.endpoint.connections), 2, "the next request went on the out-of-step connection")

    def test_transfer_codings_other_than_chunked_refused(self) -> None:
        """
        The proxy never sends TE, so an upstream may apply no transfer coding
        but chunked (RFC 9110 section 10.1.4), and the proxy cannot decode
        any other.  Relaying the coded bytes with Transfer-Encoding dropped
        hands the client a body it cannot read as what it is (and one the
        reflection masker cannot read either: see L{RelayTests}).  The old
        Agent refused every coding but chunked.
        """
        for coding in (b"gzip, chunked", b"chunked, identity", b"gzip"):
            d = self.get()
            protocol, transport = self.endpoint.last()
            protocol.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + coding + b"\r\n\r\n")
            failure = self.failureResultOf(d, ResponseFailed)
            failure.value.reasons[0].trap(MalformedResponse)
            self.assertTrue(transport.aborted, coding)

    def test_content_length_of_a_head_answer_is_checked(self) -> None:
        """
        The Content-Length of an answer to HEAD is handed on (the relay
        copies it to the client) without the checks a GET's gets: a list of
        two lengths or garbage reaches the client.
        """
        for value in (b"1, 2", b"-1", b"abc", b"+5"):
            d = self.get(method=b"HEAD")
            protocol, _ = self.endpoint.last()
            protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: " + value + b"\r\n\r\n")
            result = outcome(d)
            if isinstance(result, Failure):
                result.trap(ResponseFailed)
                continue
            lengths = result.headers.getRawHeaders(b"content-length", [])
            self.assertTrue(len(lengths) <= 1 and all(v.isdigit() for v in lengths),
                            f"HEAD answer's Content-Length {value!r} handed on as {lengths!r}")

    def test_head_ending_in_lf_then_crlf(self) -> None:
        """
        head_end takes a bare LF as a line end, but misses an empty line
        ended by CRLF after a line ended by LF when a CRLFCRLF follows later
        in the same read (in the body): the same response is refused or
        relayed depending on how it was cut into reads.
        """
        head, body = b"HTTP/1.1 200 OK\nContent-Length: 6\n\r\n", b"ab\r\n\r\n"
        # Cut after the head: relayed.
        d = self.get()
        protocol, _ = self.endpoint.last()
        protocol.dataReceived(head)
        protocol.dataReceived(body)
        self.assertEqual(b"".join(self.read(self.successResultOf(d)).data), body)
        # In one read: refused as malformed.
        d = self.get()
        protocol, _ = self.endpoint.last()
        protocol.dataReceived(head + body)
        self.assertEqual(b"".join(self.read(self.successResultOf(d)).data), body)


class ChunkSizeTests(SynchronousTestCase):
    def test_framed_chunk_size_beyond_2_53_not_handed_on(self) -> None:
        """
        Framed, chunk-size lines reach the client as the upstream wrote
        them.  The channel refuses request chunk sizes over 2^53 because
        other parsers (JavaScript's doubles, narrower integers) read them
        differently, which lets bytes inside one huge chunk be read by the
        client as chunks and responses of their own.  The old Agent decoded
        and Twisted re-chunked, so no upstream size ever reached a client.
        """
        reader = ChunkedReader(framed=True)
        try:
            pieces, _ = reader.feed(b"20000000000001\r\nabc")
        except MalformedResponse:
            return
        out = b"".join(pieces)
        size = int(out.split(b"\r\n", 1)[0].split(b";")[0], 16)
        self.assertLessEqual(size, 2**53, f"chunk-size line handed on: {out[:40]!r}")


class InterimTests(ClientTestCase):
    def test_endless_interim_answers_refused(self) -> None:
        """
        1xx answers are skipped without limit: an upstream sending them
        forever keeps the proxy parsing (about 0.1 s of CPU per 256 KiB read,
        quadratic in the read: each skip copies the rest of the buffer)
        until the headers timeout, and forever with --upstream-timeout 0.
        Go's client allows 5.
        """
        d = self.get()
        protocol, transport = self.endpoint.last()
        for _ in range(1000):
            protocol.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\n")
            if d.called:
                break
        failure = self.failureResultOf(d, ResponseFailed)
        failure.value.reasons[0].trap(MalformedResponse)
        self.assertTrue(transport.aborted)


# -- resource leaks ----------------------------------------------------------------


class _Reactor:
    """The reactor a L{FileDescriptor} needs: which descriptors want to write."""

    def __init__(self) -> None:
        self.writers: set[Any] = set()

    def addReader(self, reader: Any) -> None:
        pass

    def removeReader(self, reader: Any) -> None:
        pass

    def addWriter(self, writer: Any) -> None:
        self.writers.add(writer)

    def removeWriter(self, writer: Any) -> None:
        self.writers.discard(writer)


class _Socket(FileDescriptor):
    """A connected socket's write side, as Twisted's TCP transport runs it; the peer reads when the test says."""

    def __init__(self, reactor: _Reactor) -> None:
        super().__init__(reactor)  # type: ignore[arg-type]
        self.connected = 1
        self.draining = False
        self.aborted = False

    def writeSomeData(self, data: bytes) -> int:
        return len(data) if self.draining else 0

    def abortConnection(self) -> None:
        self.aborted = True
        self.stopReading()
        self.stopWriting()

    def getPeer(self) -> Any:
        return None

    def getHost(self) -> Any:
        return None


@implementer(IStreamClientEndpoint, IAgentEndpointFactory)
class _SocketEndpoint:
    def __init__(self) -> None:
        self.reactor = _Reactor()
        self.connections: list[tuple[Any, _Socket]] = []

    def endpointForURI(self, uri: Any) -> _SocketEndpoint:
        return self

    def connect(self, factory: Any) -> Deferred[Any]:
        protocol = factory.buildProtocol(None)
        transport = _Socket(self.reactor)
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return succeed(protocol)


class _UnbufferedTLS(TLSMemoryBIOFactory):
    # The buffering transport flushes on the global reactor; this one writes at once.
    protocol = TLSMemoryBIOProtocol


class _EarlyAnswer(Protocol):
    """An upstream that refuses an upload as soon as its head is in."""

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" in data:
            self.transport.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")  # type: ignore[union-attr]


@implementer(IStreamClientEndpoint, IAgentEndpointFactory)
class _TLSEndpoint:
    """Real TLS (Twisted's TLSMemoryBIOProtocol) both ways, over transports the test pumps."""

    def __init__(self) -> None:
        now = time.time()
        ca = CertificateAuthority.generate("hostile review CA", now)
        leaf = ca.mint(["upstream"], now)
        self.server_options = ssl.PrivateCertificate.loadPEM(leaf.key_pem() + leaf.cert_pem()).options()
        self.client_options = ssl.optionsForClientTLS("upstream", trustRoot=ssl.Certificate.loadPEM(ca.cert_pem()))
        self.client_tcp, self.server_tcp = StringTransport(), StringTransport()

    def endpointForURI(self, uri: Any) -> _TLSEndpoint:
        return self

    def connect(self, factory: Any) -> Deferred[Any]:
        self.client: Any = _UnbufferedTLS(self.client_options, True, factory).buildProtocol(None)
        self.server: Any = _UnbufferedTLS(self.server_options, False, Factory.forProtocol(_EarlyAnswer)).buildProtocol(None)
        self.client.makeConnection(self.client_tcp)
        self.server.makeConnection(self.server_tcp)
        return succeed(self.client.wrappedProtocol)

    def pump(self) -> None:
        for _ in range(20):
            up, down = self.client_tcp.value(), self.server_tcp.value()
            self.client_tcp.clear()
            self.server_tcp.clear()
            if up:
                self.server.dataReceived(up)
            if down:
                self.client.dataReceived(down)
            if not up and not down:
                return


class LeakTests(ClientTestCase):
    def test_early_answer_to_an_upload_over_tls_closes(self) -> None:
        """
        The same over TLS, with nothing buffered: TLSMemoryBIOProtocol
        starts its close only once no producer is registered, so the
        upload left registered keeps every early-answered TLS upload's
        connection (a 401 or 413 to a push) open until the upstream closes
        it.
        """
        endpoint = _TLSEndpoint()
        agent = HTTP11Agent(self.clock, endpoint, UpstreamTimeouts(headers=10, idle=5))
        upload: Any = Upload(1000)
        d = agent.request(b"PUT", b"https://upstream/blob", None, upload)
        upload.consumer.write(b"x" * 10)
        endpoint.pump()
        self.assertEqual(self.successResultOf(d).code, 413)
        self.assertTrue(upload.stopped)
        self.assertTrue(endpoint.client_tcp.disconnecting, "the TLS connection is never closed")

    def test_early_answer_to_a_large_upload_closes(self) -> None:
        """
        An answer (413) that ends while the upload is still going stops the
        upload but leaves it registered as the transport's producer.  When
        the upload had filled the send buffer (its producer paused, as for
        any upload the upstream refuses), Twisted's transport, once the
        buffer drains, resumes the stopped producer instead of closing: the
        connection is never closed (nor ever reused), and no timer ends it.
        """
        endpoint = _SocketEndpoint()
        agent = HTTP11Agent(self.clock, endpoint, UpstreamTimeouts(headers=10, idle=5))
        upload: Any = Upload(10 * READ_SIZE)
        d = agent.request(b"PUT", b"http://upstream/blob", None, upload)
        protocol, transport = endpoint.connections[-1]
        upload.consumer.write(b"x" * (READ_SIZE + 1))
        self.assertTrue(transport.producerPaused)
        protocol.dataReceived(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.successResultOf(d).code, 413)
        self.assertTrue(upload.stopped)
        # The upstream reads what was buffered (a lingering close).
        transport.draining = True
        result = None
        while transport in endpoint.reactor.writers and result is None:
            result = transport.doWrite()
        self.assertTrue(transport.aborted or result is main.CONNECTION_DONE,
                        "the connection stays open after the upstream read the buffered upload")

    def test_unread_chunked_body_then_close_resumes_reading(self) -> None:
        """
        A connection that is not reused is closed gracefully, but reading
        stays paused if it was (here: a chunked body that came before its
        reader).  Over TLS, a graceful close waits for the upstream's
        close_notify, which a paused transport never reads: the connection
        (and its socket, in CLOSE_WAIT) is never closed, and no timer ends it.
        """
        d = self.get()
        protocol, transport = self.endpoint.last()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
                              b"2\r\nok\r\n0\r\n\r\n")
        self.assertEqual(transport.producerState, "paused")
        reader = self.read(self.successResultOf(d))
        self.assertEqual(b"".join(reader.data), b"ok")
        self.assertTrue(transport.disconnecting)
        self.assertTrue(transport.producerState == "producing" or transport.aborted,
                        "closed gracefully with reading paused")

    def test_paused_body_then_close_resumes_reading(self) -> None:
        """
        The same when the body's reader paused the upstream (a slow client)
        and the last bytes were already read (a TLS transport hands on all it
        decrypted): the body completes, the connection closes with reading
        paused.
        """
        d = self.get()
        protocol, transport = self.endpoint.last()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 10\r\n\r\nabc")
        reader = self.read(self.successResultOf(d))
        producer: Any = reader.transport
        producer.pauseProducing()
        protocol.dataReceived(b"defghij")
        assert reader.reason is not None
        reader.reason.trap(ResponseDone)
        self.assertTrue(transport.disconnecting)
        self.assertTrue(transport.producerState == "producing" or transport.aborted,
                        "closed gracefully with reading paused")

    def test_malformed_chunked_body_read_late_fails_the_reader(self) -> None:
        """
        A chunked body that came before its reader is parsed in
        deliverBody, where a MalformedResponse is not caught (it is in
        dataReceived): deliverBody raises it to the caller, the reader
        (already connected: the relay's has written the client's head and
        registered the exchange as its producer) never hears of the end of
        its body, and the connection is left open and paused, with no timer
        to end it.  (The relay attaches its reader at once, in the same
        read, so it meets this only when something awaits between
        send() and stream_response().)
        """
        d = self.get()
        protocol, transport = self.endpoint.last()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
        reader = Reader()
        self.successResultOf(d).deliverBody(reader)
        assert reader.reason is not None, "the reader never learnt its body ended"
        reader.reason.trap(ResponseFailed)
        self.assertTrue(transport.aborted)

    def test_unsolicited_bytes_take_an_idle_connection_out_of_the_pool(self) -> None:
        """
        Bytes on an idle connection abort it, but it stays in the pool until
        its connectionLost (a later reactor turn for Twisted's TCP): a request
        in between is sent on the aborted connection, and one with a body
        then fails (502) instead of going on a new connection.
        """
        d = self.get()
        protocol, transport = self.endpoint.last()
        protocol.dataReceived(OK)
        self.read(self.successResultOf(d))
        self.assertEqual(self.agent.idle_connections(), 1)
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")
        self.assertTrue(transport.aborted)
        self.assertEqual(self.agent.idle_connections(), 0)
        self.get(method=b"POST", body=BytesProducer(b"x"))
        self.assertEqual(len(self.endpoint.connections), 2)

    def test_pool_forgets_origins(self) -> None:
        """
        The pool keeps one list per origin ever used, emptied but never
        removed: with --forward-unlisted a client names any host, so each
        new host name is memory kept for the life of the process (the
        endpoint cache beside it is bounded by MAX_ORIGINS).
        """
        for i in range(2 * MAX_ORIGINS):
            d = self.get(b"http://h%d.test/" % i)
            self.endpoint.last()[0].dataReceived(OK)
            self.read(self.successResultOf(d))
        self.clock.advance(100)
        self.assertEqual(self.agent.idle_connections(), 0)
        self.assertLessEqual(len(self.agent._idle), MAX_ORIGINS)

    def test_close_is_final(self) -> None:
        """
        close() (at shutdown) closes the idle connections, but those in use
        that finish afterwards go back to the pool, and the sweeper is
        scheduled again.
        """
        d = self.get()
        protocol, transport = self.endpoint.last()
        self.agent.close()
        protocol.dataReceived(OK)
        self.read(self.successResultOf(d))
        self.assertEqual(self.agent.idle_connections(), 0)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])


# -- what reaches the client --------------------------------------------------------


class _Raw(Protocol):
    """An upstream that answers each request head with the bytes C{answer(head)} makes."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            self.transport.write(self.answer(head))  # type: ignore[union-attr]


class _RawSite:
    """Stands in for L{tests.support.memory.UpstreamSite}: raw bytes instead of twisted.web."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.seen: list[Any] = []

    def buildProtocol(self, addr: Any) -> _Raw:
        return _Raw(self.answer)


class RelayTests(SynchronousTestCase):
    def test_transfer_coded_body_cannot_carry_a_reflected_secret(self) -> None:
        """
        SPEC 10: a text body reflecting the injected credentials has them
        masked.  Under a transfer coding the client drops after chunked
        (gzip), the masker sees compressed bytes and lets them through; the
        client, told nothing of the coding, gunzips them.
        """
        token, password = secrets.token_hex(12), secrets.token_hex(8)
        proxy = memory_proxy(self, [
            connector_class("http"), basic_secret("default", "creds", "robot", password),
            connector("default", "api", "http", "http://api.test", secret="creds"),
        ], {token: sa("default")})

        def answer(head: bytes) -> bytes:
            echoed = b"\n".join(line for line in head.split(b"\r\n") if line.lower().startswith(b"authorization:"))
            body = gzip.compress(b"you sent " + echoed)
            return (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                    b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))

        proxy.upstreams["http://api.test:80"] = Upstream("http://api.test:80", _RawSite(answer))  # type: ignore[arg-type]
        response = proxy.request(request_bytes(b"GET", b"/namespaces/default/connectors/api/x", [bearer(token)]))
        try:
            seen = gzip.decompress(response.body)
        except Exception:
            seen = response.body
        credential = base64.b64encode(f"robot:{password}".encode())
        self.assertNotIn(credential, seen)
        self.assertNotIn(credential, proxy.received())


# -- suspected issues that turned out fine --------------------------------------------


class GuardTests(ClientTestCase):
    def test_content_length_edge_cases(self) -> None:
        def frame(value: bytes) -> Any:
            return framing(b"GET", parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: " + value))

        self.assertEqual(frame(b"007"), (Framing.LENGTH, 7, True))
        self.assertEqual(frame(b" 7 "), (Framing.LENGTH, 7, True))
        for bad in (b"+7", b"7 7", b"", b"0x7", b"7;", b"7,", b"\xd9\xa7", b"1" * 19):
            self.assertRaises(MalformedResponse, frame, bad)

    def test_chunked_casing_last_chunk_extensions_trailers(self) -> None:
        d = self.get()
        protocol, _ = self.endpoint.last()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n"
                              b"2\r\nok\r\n0;x=\"a;b\"\r\nX-T: 1\r\nX-U: 2\r\n\r\n")
        reader = self.read(self.successResultOf(d), framed=True)
        self.assertEqual(reader.framed, [(b"2\r\nok\r\n", 2)])
        self.assertEqual(self.agent.idle_connections(), 1)

    def test_quoted_extension_with_crlf_refused(self) -> None:
        """A quoted string cannot hold CR or LF (RFC 9110 5.6.4): the line ends there, and what follows is not a chunk."""
        d = self.get()
        protocol, transport = self.endpoint.last()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        reader = self.read(self.successResultOf(d))
        protocol.dataReceived(b'2;a="x\r\n"\r\nok\r\n0\r\n\r\n')
        self.assertTrue(transport.aborted)
        assert reader.reason is not None
        reader.reason.trap(ResponseFailed)

    def test_endless_trailers_cut_by_the_idle_timeout(self) -> None:
        d = self.get()
        protocol, transport = self.endpoint.last()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n")
        reader = self.read(self.successResultOf(d))
        for _ in range(10):
            self.clock.advance(1)
            protocol.dataReceived(b"X-T: 1\r\n" * 100)
        self.assertTrue(transport.aborted)
        protocol.connectionLost(Failure(ConnectionDone()))
        assert reader.reason is not None
        reader.reason.trap(UpstreamTimeout)

    def test_endless_head_refused(self) -> None:
        d = self.get()
        protocol, transport = self.endpoint.last()
        for _ in range(100):
            protocol.dataReceived(b"X-A: " + b"a" * 1000 + b"\r\n" if d.called is False else b"")
        self.failureResultOf(d, ResponseFailed)
        self.assertTrue(transport.aborted)

    def test_bodies_on_bodiless_answers_close_the_connection(self) -> None:
        for method, answer in [(b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
                               (b"GET", b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\n\r\n"),
                               (b"GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 2\r\n\r\nok")]:
            d = self.get(method=method)
            protocol, transport = self.endpoint.last()
            protocol.dataReceived(answer)
            self.read(self.successResultOf(d))
            self.assertTrue(transport.disconnecting, answer)
        self.assertEqual(self.agent.idle_connections(), 0)

    def test_stale_timers_do_not_touch_the_next_exchange(self) -> None:
        d = self.get()
        protocol, transport = self.endpoint.last()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        reader = self.read(self.successResultOf(d))
        protocol.dataReceived(b"cd")
        d2 = self.get()
        self.assertEqual(len(self.endpoint.connections), 1)
        self.clock.advance(9.9)
        self.assertNoResult(d2)
        protocol.dataReceived(OK)
        self.assertEqual(self.successResultOf(d2).code, 200)
        assert reader.reason is not None
        reader.reason.trap(ResponseDone)
        self.assertFalse(transport.aborted)

    def test_upload_not_retried_and_no_double_callback(self) -> None:
        """A reused connection lost under an upload: one failure, no second attempt, no timer left."""
        d = self.get()
        protocol, _ = self.endpoint.last()
        protocol.dataReceived(OK)
        self.read(self.successResultOf(d))
        upload = Upload(3)
        d = self.get(method=b"PUT", body=upload)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, Exception)
        upload.done.callback(None)
        self.assertEqual(len(self.endpoint.connections), 1)
        # No headers timer left behind (the pool's sweeper is the only call).
        calls: Any = self.clock.getDelayedCalls()
        self.assertEqual([c.func.__name__ for c in calls], ["_sweep"])

    def test_reflected_errors_name_no_response_bytes(self) -> None:
        # Not hexadecimal: it must not read as a chunk size.
        secret = b"s" + secrets.token_hex(8).encode()
        for answer in (b"HTTP/1.1 200 " + secret + b"\r\nX: \x01" + secret + b"\r\n\r\n",
                       b"HTTP/1.1 200 OK\r\n" + secret + b"\r\n\r\n",
                       b"HTTP/1.1 200 OK\r\nContent-Length: " + secret + b"\r\n\r\n"):
            d = self.get()
            self.endpoint.last()[0].dataReceived(answer)
            result = outcome(d)
            self.assertIsInstance(result, Failure)
            self.assertNotIn(secret.decode(), str(result.value) + repr(result.value.reasons))
        d = self.get()
        protocol, _ = self.endpoint.last()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        reader = self.read(self.successResultOf(d))
        protocol.dataReceived(secret + b"\r\n")
        assert reader.reason is not None
        ended: Any = reader.reason.value
        self.assertNotIn(secret.decode(), str(ended) + repr(ended.reasons))
