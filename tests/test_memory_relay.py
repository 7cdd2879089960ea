"""
The streaming relay in memory (SPEC sections 5 and 6): URLs mapped back to
the client's address, hop-by-hop rules, bodies streamed both ways with
backpressure, and what a client or upstream going away does to the other.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from typing import Any

from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from connectors_proxy.server.channel import STREAM_BUFFER, ProxyRequest

from .support.memory import (
    READ_SIZE,
    MemoryTransport,
    Response,
    Scripted,
    bearer,
    chunk,
    memory_proxy,
    request_bytes,
)
from .support.proxy import basic_secret, connector, connector_class, sa

PATH = b"/namespaces/default/connectors/api"


@implementer(IPushProducer)
class BodyProducer:
    """An upstream response body of C{data}, written only while the connection is not paused."""

    def __init__(self, request: Request, data: bytes, size: int = 16 * 1024) -> None:
        self.request = request
        self.data = data
        self.size = size
        self.sent = 0
        self.paused = False
        self.pauses = 0
        self.stopped = False

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and not self.stopped and self.sent < len(self.data):
            piece = self.data[self.sent:self.sent + self.size]
            self.sent += len(piece)
            self.request.write(piece)
        if self.sent == len(self.data) and not self.stopped:
            self.stopped = True
            self.request.unregisterProducer()
            self.request.finish()

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def stopProducing(self) -> None:
        self.stopped = True


class Upstream(Scripted):
    """The stand-in REST server: a few paths with scripted answers."""

    def __init__(self) -> None:
        super().__init__(self.answer_for)
        self.big = os.urandom(4 * 1024 * 1024 + 3)
        self.producers: list[BodyProducer] = []
        self.pending: list[Request] = []
        self.lost: list[Failure] = []
        self.chunks = [b"%d:" % i + os.urandom(i * 7) for i in range(1, 40)]

    def answer_for(self, request: Request) -> Any:
        path = request.path.removeprefix(b"/base")
        if path.startswith(b"/redirect"):
            request.setResponseCode(302)
            request.setHeader(b"Location", {
                b"/redirect-abs": b"http://api.test/base/small?a=1",
                b"/redirect-rel": b"/base/small",
                b"/redirect-above": b"/other/x",
                b"/redirect-foreign": b"http://elsewhere.test/base/x",
                b"/redirect-root": b"http://api.test/base",
            }[path])
            return b""
        if path == b"/paged":
            request.setHeader(b"Link", b'<http://api.test/base/paged?page=2>; rel="next"')
            return b"[]"
        if path == b"/hops":
            request.responseHeaders.setRawHeaders(b"Connection", [b"X-Up-Hop"])
            for name, values in [(b"X-Up-Hop", [b"1"]), (b"Keep-Alive", [b"timeout=5"]),
                                 (b"Proxy-Authenticate", [b'Basic realm="upstream"']),
                                 (b"Set-Cookie", [b"session=1", b"other=2"]), (b"Set-Cookie2", [b"old=1"]),
                                 (b"X-Multi", [b"one", b"two"]), (b"Content-Type", [b"text/plain"])]:
                request.responseHeaders.setRawHeaders(name, values)
            return b"hops"
        if path == b"/big":
            request.setHeader(b"Content-Length", b"%d" % len(self.big))
            producer = BodyProducer(request, self.big)
            self.producers.append(producer)
            request.registerProducer(producer, True)
            producer.resumeProducing()
            return NOT_DONE_YET
        if path == b"/upload":
            assert request.content is not None
            body = request.content.read()
            return b"got %d %s" % (len(body), hashlib.sha256(body).hexdigest().encode())
        if path == b"/malformed":
            # A broken upstream that quotes the request's credentials in a
            # line that is no header field.
            authorization = request.getHeader(b"authorization") or b""
            request.channel.transport.write(b"HTTP/1.1 200 OK\r\nEcho " + authorization + b"\r\n\r\n")  # type: ignore[union-attr]
            return NOT_DONE_YET
        if path in (b"/chunks", b"/text-chunks"):
            # Many small chunks, written at once: they reach the proxy in one read.
            request.setHeader(b"Content-Type", b"text/plain" if path == b"/text-chunks" else b"application/octet-stream")
            for piece in self.chunks:
                request.write(piece)
            request.finish()
            return NOT_DONE_YET
        if path in (b"/hang", b"/partial", b"/partial-chunked"):
            self.pending.append(request)
            request.notifyFinish().addErrback(self.lost.append)
            if path == b"/partial":
                request.setHeader(b"Content-Length", b"1000")
            if path != b"/hang":
                request.write(b"p" * 100)
            return NOT_DONE_YET
        return b"ok " + request.uri


class RelayTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.token = secrets.token_hex(12)
        self.password = secrets.token_hex(8)
        self.proxy = memory_proxy(self, [
            connector_class("http"), basic_secret("default", "creds", "robot", self.password),
            connector("default", "api", "http", "http://api.test/base", secret="creds"),
        ], {self.token: sa("default")})
        self.resource = Upstream()
        self.upstream = self.proxy.upstream("http://api.test", self.resource)

    def get(self, target: bytes, *headers: tuple[bytes, bytes], host: bytes = b"proxy.local:8080") -> Response:
        return self.proxy.request(request_bytes(b"GET", target, [bearer(self.token), *headers], host=host))


class LocationTests(RelayTestCase):
    """C{Location} and C{Link} pointing at the upstream come back pointing at the proxy, as the client addressed it."""

    def test_path_mode(self) -> None:
        expected = {
            b"/redirect-abs": b"http://proxy.local:8080/namespaces/default/connectors/api/small?a=1",
            b"/redirect-rel": b"/namespaces/default/connectors/api/small",
            b"/redirect-root": b"http://proxy.local:8080/namespaces/default/connectors/api",
            # Above the Connector's prefix or on another origin: not reachable through it, left alone.
            b"/redirect-above": b"/other/x",
            b"/redirect-foreign": b"http://elsewhere.test/base/x",
        }
        for path, location in expected.items():
            response = self.get(PATH + path)
            self.assertEqual((response.code, response.header(b"location")), (302, [location]), path)

    def test_host_mode(self) -> None:
        expected = {
            b"/redirect-abs": b"http://c-api.default.svc/small?a=1",
            b"/redirect-rel": b"/small",
            b"/redirect-root": b"http://c-api.default.svc/",
        }
        for path, location in expected.items():
            response = self.get(path, host=b"c-api.default.svc")
            self.assertEqual(response.header(b"location"), [location], path)

    def test_link(self) -> None:
        """SPEC 5: C{Link} pagination pointing at the upstream is mapped back, like C{Location}."""
        response = self.get(PATH + b"/paged")
        self.assertEqual(response.header(b"link"),
                         [b'<http://proxy.local:8080/namespaces/default/connectors/api/paged?page=2>; rel="next"'])


class HopByHopTests(RelayTestCase):
    def test_request_headers(self) -> None:
        """
        Hop-by-hop fields, and those the client's C{Connection} names, stay
        on the client's hop; repeated end-to-end fields go on in order.
        """
        self.get(PATH + b"/x", (b"Connection", b"keep-alive, X-Hop"), (b"X-Hop", b"1"), (b"Keep-Alive", b"300"),
                 (b"TE", b"trailers"), (b"Upgrade", b"h2c"), (b"Proxy-Connection", b"keep-alive"),
                 (b"Trailer", b"X-T"), (b"Accept", b"a"), (b"Accept", b"b"), (b"Git-Protocol", b"version=2"))
        headers = self.upstream.headers()
        self.assertEqual(sorted(headers), [b"accept", b"authorization", b"git-protocol", b"host",
                                           b"x-forwarded-for", b"x-forwarded-proto"])
        self.assertEqual(headers[b"accept"], [b"a", b"b"])

    def test_response_headers(self) -> None:
        """
        The upstream's hop-by-hop fields and its cookies (a session of the
        Connector's identity) never reach the client; repeated fields do, in order.
        """
        response = self.get(PATH + b"/hops")
        self.assertEqual((response.code, response.body), (200, b"hops"))
        self.assertEqual(response.names - {b"x-up-hop"},
                         {b"content-type", b"x-multi", b"server", b"date", b"content-length"})
        self.assertEqual(response.header(b"x-multi"), [b"one", b"two"])
        self.assertEqual(response.header(b"content-length"), [b"4"])

    def test_response_connection_names(self) -> None:
        """SPEC 10: headers the upstream's C{Connection} names are dropped."""
        response = self.get(PATH + b"/hops")
        self.assertEqual(response.header(b"x-up-hop"), [])


class StreamingTests(RelayTestCase):
    def test_slow_client_pauses_the_upstream(self) -> None:
        """
        A client that stops reading fills the proxy's send buffer up to
        L{STREAM_BUFFER}, then the upstream is paused: the proxy holds no
        more than that (plus one read), and the upstream produces no more
        than what the buffers hold.  When the client reads again, the rest
        arrives, byte for byte.
        """
        client = self.proxy.connect()
        client.transport.pauseProducing()
        client.send(request_bytes(b"GET", PATH + b"/big", [bearer(self.token)]))
        [producer] = self.resource.producers
        assert client.server is not None
        held = len(client.server.out)
        self.assertEqual((bytes(client.received), producer.paused), (b"", True))
        self.assertTrue(STREAM_BUFFER < held <= STREAM_BUFFER + READ_SIZE + 1024, held)
        upstream_held = len(self.upstream.pipes[0].server.out)
        self.assertTrue(0 < upstream_held <= MemoryTransport.bufferSize + 16 * 1024, upstream_held)
        self.assertTrue(producer.sent <= held + upstream_held + 2 * READ_SIZE, producer.sent)
        # Nothing moves while the client does not read.
        self.proxy.clock.advance(1)
        self.proxy.network.flush()
        self.assertEqual(len(client.server.out), held)
        client.resume_reading()
        response = client.response()
        self.assertEqual(response.header(b"content-length"), [b"%d" % len(self.resource.big)])
        self.assertTrue(response.complete)
        self.assertEqual(hashlib.sha256(response.body).digest(), hashlib.sha256(self.resource.big).digest())
        self.assertEqual((producer.sent, producer.paused), (len(self.resource.big), False))
        self.assertGreater(producer.pauses, 1)

    def test_chunked_upload(self) -> None:
        """A chunked request body is relayed as it arrives, chunked, and completely."""
        pieces = [os.urandom(n) for n in (1, 1000, 70000, 5)]
        client = self.proxy.connect()
        client.send(request_bytes(b"POST", PATH + b"/upload", [bearer(self.token),
                                                                 (b"Transfer-Encoding", b"chunked")]))
        for piece in pieces:
            client.send(chunk(piece))
        self.assertEqual(self.upstream.requests, [])  # the upstream Site reads the whole body first
        client.send(chunk(b""))
        whole = b"".join(pieces)
        response = client.response()
        self.assertEqual(response.body, b"got %d %s" % (len(whole), hashlib.sha256(whole).hexdigest().encode()))
        headers = self.upstream.headers()
        self.assertEqual(headers[b"transfer-encoding"], [b"chunked"])
        self.assertNotIn(b"content-length", headers)
        self.assertEqual(self.upstream.body(), whole)

    def test_slow_upstream_pauses_the_client(self) -> None:
        """
        An upstream that stops reading an upload stops the proxy reading
        from the client: the client's bytes wait on its side, not in the proxy.
        """
        data = os.urandom(2 * 1024 * 1024)
        client = self.proxy.connect()
        client.send(request_bytes(b"PUT", PATH + b"/upload", [bearer(self.token),
                                                                (b"Content-Length", b"%d" % len(data))]))
        [pipe] = self.upstream.pipes
        pipe.server.pauseProducing()
        client.send(data)
        read_by_proxy = client.transport.written - len(client.transport.out)
        self.assertTrue(read_by_proxy < MemoryTransport.bufferSize + 3 * READ_SIZE, read_by_proxy)
        self.assertGreater(len(client.transport.out), len(data) - MemoryTransport.bufferSize - 3 * READ_SIZE)
        pipe.server.resumeProducing()
        self.proxy.network.flush()
        self.assertEqual(client.response().body,
                         b"got %d %s" % (len(data), hashlib.sha256(data).hexdigest().encode()))
        self.assertEqual(self.upstream.body(), data)
        [access] = self.proxy.logs.access()
        self.assertEqual((access["status"], access["bytes_in"]), (200, len(data)))


class ChunkedTests(RelayTestCase):
    def written(self) -> list[tuple[str, int]]:
        calls: list[tuple[str, int]] = []
        write, write_chunks = ProxyRequest.write, ProxyRequest.write_chunks

        def spy_write(request: ProxyRequest, data: bytes) -> None:
            if data:
                calls.append(("write", len(data)))
            write(request, data)

        def spy_chunks(request: ProxyRequest, data: bytes, payload: int) -> None:
            calls.append(("chunks", payload))
            write_chunks(request, data, payload)

        self.patch(ProxyRequest, "write", spy_write)
        self.patch(ProxyRequest, "write_chunks", spy_chunks)
        return calls

    def test_binary_chunks_handed_on_in_their_framing(self) -> None:
        """
        Issue 15: a chunked body the client also gets chunked is not
        decoded and encoded again: the chunks of one upstream read go out
        in one write, as they came.
        """
        calls = self.written()
        client = self.proxy.connect()
        client.send(request_bytes(b"GET", PATH + b"/chunks", [bearer(self.token)]))
        response = client.response()
        payload = b"".join(self.resource.chunks)
        self.assertEqual((response.code, response.body, response.complete), (200, payload, True))
        self.assertEqual(response.header(b"transfer-encoding"), [b"chunked"])
        raw = bytes(client.received)
        framed = raw[raw.index(b"\r\n\r\n") + 4:]
        self.assertEqual(framed, b"".join(b"%x\r\n%b\r\n" % (len(c), c) for c in self.resource.chunks) + b"0\r\n\r\n")
        self.assertEqual([kind for kind, _ in calls], ["chunks"] * len(calls))
        self.assertLess(len(calls), len(self.resource.chunks))
        self.assertEqual(sum(size for _, size in calls), len(payload))
        [access] = self.proxy.logs.access()
        self.assertEqual(access["bytes_out"], len(payload))

    def test_text_chunks_decoded_to_be_masked(self) -> None:
        """Text is decoded (reflected credentials are masked in it) and sent as the relay writes it."""
        calls = self.written()
        response = self.get(PATH + b"/text-chunks")
        self.assertEqual((response.code, response.body), (200, b"".join(self.resource.chunks)))
        self.assertNotIn("chunks", [kind for kind, _ in calls])

    def test_http_10_client_gets_the_body_decoded(self) -> None:
        calls = self.written()
        client = self.proxy.connect()
        client.send(request_bytes(b"GET", PATH + b"/chunks", [bearer(self.token)]).replace(b"HTTP/1.1", b"HTTP/1.0", 1))
        self.proxy.network.flush()
        raw = bytes(client.received)
        self.assertTrue(raw.startswith(b"HTTP/1.0 200"), raw[:40])
        self.assertEqual(raw[raw.index(b"\r\n\r\n") + 4:], b"".join(self.resource.chunks))
        self.assertNotIn("chunks", [kind for kind, _ in calls])


class MalformedTests(RelayTestCase):
    def test_malformed_response_is_a_502_that_names_the_problem_not_the_bytes(self) -> None:
        response = self.get(PATH + b"/malformed")
        self.assertEqual(response.code, 502)
        self.assertIn(b"cannot relay: bad header field (line 2)", response.body)
        self.assertNotIn(self.password.encode(), self.proxy.received())
        self.assertNotIn(base64.b64encode(b"robot:" + self.password.encode()), self.proxy.received())
        self.assertNotIn(self.password, self.proxy.logs.text())
        # The connection it came on is not kept.
        self.assertEqual(self.proxy.agents.idle_connections(), 0)


class GoingAwayTests(RelayTestCase):
    def test_client_leaves_mid_response(self) -> None:
        """The upstream connection is closed when the client goes away during the body."""
        client = self.proxy.connect()
        client.send(request_bytes(b"GET", PATH + b"/partial", [bearer(self.token)]))
        self.assertTrue(bytes(client.received).endswith(b"\r\n\r\n" + b"p" * 100))
        client.close()
        [reason] = self.resource.lost
        self.assertTrue(self.upstream.pipes[0].closed)
        [access] = self.proxy.logs.access()
        self.assertEqual((access["status"], access["bytes_out"]), (200, 100))

    def test_client_leaves_before_the_response(self) -> None:
        """A client gone before the upstream answered cancels the upstream request; the log says 499."""
        client = self.proxy.connect()
        client.send(request_bytes(b"GET", PATH + b"/hang", [bearer(self.token)]))
        self.assertEqual(len(self.resource.pending), 1)
        client.close()
        self.assertEqual(len(self.resource.lost), 1)
        self.assertTrue(self.upstream.pipes[0].client.aborted)
        [access] = self.proxy.logs.access()
        self.assertEqual(access["status"], 499)

    def assertCut(self, path: bytes, framing: tuple[bytes, bytes]) -> None:
        client = self.proxy.connect()
        client.send(request_bytes(b"GET", PATH + path, [bearer(self.token)]))
        [request] = self.resource.pending
        upstream_end: MemoryTransport = request.channel.transport  # type: ignore[union-attr, assignment]
        upstream_end.abortConnection()
        self.proxy.network.flush()
        response = client.response()
        self.assertEqual((response.code, response.body, response.complete), (200, b"p" * 100, False))
        self.assertEqual(response.header(framing[0]), [framing[1]])
        assert client.server is not None
        self.assertEqual((client.server.aborted, client.reset), (True, True))

    def test_upstream_breaks_off_a_sized_body(self) -> None:
        """
        An upstream that breaks off mid-body: the client's connection is
        aborted, never ended cleanly after a short body.
        """
        self.assertCut(b"/partial", (b"content-length", b"1000"))

    def test_upstream_breaks_off_a_chunked_body(self) -> None:
        """Chunked: the client never gets the last chunk, and the connection is aborted."""
        self.assertCut(b"/partial-chunked", (b"transfer-encoding", b"chunked"))


class UpstreamNameTests(SynchronousTestCase):
    def test_other_origin_named_without_credentials(self) -> None:
        """A failure message naming another origin (a redirect) drops its userinfo and query: they reach the client."""
        from types import SimpleNamespace

        from connectors_proxy.upstream.relay import _upstream_name
        target = SimpleNamespace(connector=SimpleNamespace(address="http://git.test/scm"))
        self.assertEqual(_upstream_name(target, b"https://robot:s3cret@[::1]:8443/blob/1?sig=abc"),  # type: ignore[arg-type]
                         "https://[::1]:8443/blob/1")
        self.assertEqual(_upstream_name(target, b"http://git.test/scm/x?token=t"),  # type: ignore[arg-type]
                         "http://git.test/scm")
