"""
Odd and hostile input (SPEC section 10) on a real socket: each gets a clear
answer or a prompt close, never a hang, and the next client is served.
"""

from __future__ import annotations

import secrets
import socket

from twisted.internet import threads
from twisted.internet.defer import inlineCallbacks

from .support.proxy import basic
from .support.wire import NginxBehindProxy


class HostileInput(NginxBehindProxy):
    @inlineCallbacks
    def assertStillServes(self):  # type: ignore[no-untyped-def]
        auth = basic("x", self.token)
        answer, _ = yield self.ask(b"GET /namespaces/default/connectors/basic/small.txt HTTP/1.1\r\n"
                                   b"Host: proxy\r\nAuthorization: " + auth + b"\r\nConnection: close\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer[:200])
        self.assertTrue(answer.endswith(b"hello from basic\n"))

    @inlineCallbacks
    def test_junk_and_malformed_lines(self):  # type: ignore[no-untyped-def]
        for junk in (b"\x00\x01\x02garbage\r\n\r\n", b"GET\r\n\r\n", b"GET / HTTP/9.9 extra\r\n\r\n",
                     b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n"):
            answer, took = yield self.ask(junk)
            self.assertTrue(answer.startswith(b"HTTP/1.1 400"), (junk, answer))
            self.assertLess(took, 3)
        yield self.assertStillServes()

    @inlineCallbacks
    def test_oversized_headers(self):  # type: ignore[no-untyped-def]
        many = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"a" * 100) for i in range(200))
        answer, _ = yield self.ask(b"GET / HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 431"), answer[:100])
        answer, _ = yield self.ask(b"GET / HTTP/1.1\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 431"), answer[:100])
        answer, _ = yield self.ask(b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(600)) + b"\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 431"), answer[:100])  # too many, each small
        answer, _ = yield self.ask(b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 414"), answer[:100])
        yield self.assertStillServes()

    @inlineCallbacks
    def test_ambiguous_framing_is_refused(self):  # type: ignore[no-untyped-def]
        auth = basic("x", self.token)
        head = (b"POST /namespaces/default/connectors/basic/echo HTTP/1.1\r\nHost: p\r\nAuthorization: "
                + auth + b"\r\n")
        for framing in (b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
                        b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
                        b"Content-Length: 5\r\nContent-Length: 5\r\n",
                        b"Content-Length: 5\r\nContent-Length: 6\r\n",
                        b"Transfer-Encoding: gzip, chunked\r\n",
                        b"Content-Length: -5\r\n"):
            answer, _ = yield self.ask(head + framing + b"\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n")
            self.assertTrue(answer.startswith(b"HTTP/1.1 400"), (framing, answer[:200]))
            self.assertEqual(answer.count(b"HTTP/1.1"), 1)
        self.assertEqual(self.nginx.requests(), [])
        yield self.assertStillServes()

    @inlineCallbacks
    def test_tls_client_hello_on_plain_listener(self):  # type: ignore[no-untyped-def]
        hello = bytes.fromhex("16030100a5010000a10303") + secrets.token_bytes(32) + b"\x00" * 40
        answer, took = yield self.ask(b"\x16", timeout=10)  # even a lone first byte
        self.assertLess(took, 2)
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer)
        answer, took = yield self.ask(hello, timeout=10)
        self.assertLess(took, 2)
        # A plain HTTP answer saying so, then close: TLS clients read it as
        # "server gave HTTP response to HTTPS client" (Go) or "wrong version number".
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer)
        self.assertIn(b"this port speaks plain HTTP", answer)
        yield self.assertStillServes()

    @inlineCallbacks
    def test_slow_headers_are_bounded(self):  # type: ignore[no-untyped-def]
        import connectors_proxy.server.channel as streaming
        self.patch(streaming, "HEADER_SECONDS", 0.5)
        answer, took = yield self.ask(b"GET / HTTP/1.1\r\nHost: x\r\n", timeout=10)
        self.assertTrue(answer.startswith(b"HTTP/1.1 408"), answer)
        self.assertLess(took, 5)

    @inlineCallbacks
    def test_many_idle_connections_do_not_stop_others(self):  # type: ignore[no-untyped-def]
        def open_idle() -> list[socket.socket]:
            conns = [socket.create_connection(("127.0.0.1", self.proxy.port), timeout=10) for _ in range(200)]
            for s in conns[:50]:
                s.sendall(b"GET / HTTP/1.1\r\n")  # half a request each
            return conns

        # Connect from a thread: the reactor must keep accepting meanwhile.
        idle = yield threads.deferToThread(open_idle)
        try:
            yield self.assertStillServes()
        finally:
            for s in idle:
                s.close()

    @inlineCallbacks
    def test_pipelined_requests_in_order(self):  # type: ignore[no-untyped-def]
        auth = basic("x", self.token)
        one = (b"GET /namespaces/default/connectors/basic/small.txt HTTP/1.1\r\nHost: p\r\n"
               b"Authorization: " + auth + b"\r\n\r\n")
        answer, _ = yield self.ask(one + one + one.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
        self.assertEqual(answer.count(b"HTTP/1.1 200"), 3)
        self.assertEqual(answer.count(b"hello from basic\n"), 3)
