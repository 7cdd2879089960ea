# -*- test-case-name: tests.test_streaming -*-
"""
The client side of the wire: an HTTP/1.1 server channel and request that
stream request bodies instead of spooling them.

L{twisted.web.server.Request} reads the whole body before C{render} runs.
A proxy cannot afford that (a 1 GiB layer push), and must refuse an
unauthenticated request before reading its body.  So L{ProxyRequest} is
dispatched as soon as its headers are complete: the channel's reading is
paused, the request is authenticated and routed, and only when the upstream
asks for the body (L{RequestBody.startProducing}) does reading resume (and
C{100 Continue} go out).  From then on the upstream connection paces the
client: when its send buffer fills, reading from the client pauses.

The channel also hardens the parser: headers over the limit get 431, a TLS
ClientHello on a plain listener is closed at once, a request that is
refused before its body was read closes the connection after a short
bounded drain (so the client sees the answer rather than a reset).  What
could frame a request differently here than at the upstream (request
smuggling) gets 400 and the connection closed: a C{Transfer-Encoding}
other than C{chunked} or on HTTP/1.0, obs-folded header lines, a second
C{Host}, control characters in a header value, a chunk size over 2^53
(besides what Twisted refuses itself: C{Content-Length} with
C{Transfer-Encoding}, two of either, a malformed length or chunk).

A C{CONNECT} is dispatched like any request; what the client sends after
its head is kept aside (not parsed as HTTP) until the router has decided.
When it opens a tunnel, the channel hands its connection to the tunnel's
protocol (L{ProxyChannel.take_over}) and from then on only passes bytes
on.  An intercepted tunnel's requests are read by a channel of their own,
over the tunnel's TLS, that knows the C{CONNECT} it is inside
(L{ProxyChannel.connect_context}).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IConsumer, IDelayedCall, IProtocol, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from connectors_proxy import compat
from connectors_proxy.server.accesslog import redact_target
from connectors_proxy.server.connect import ConnectContext

# How long, and how much, a refused request's unread body is drained before
# the connection is cut.  Bounded: the proxy never swallows a large
# unauthenticated body.
DRAIN_SECONDS = 2.0
DRAIN_BYTES = 1 << 20

# A request's headers must be complete this long after its first byte
# arrived, however slowly they trickle in (slowloris).
HEADER_SECONDS = 30.0

# Bytes of response queued for a client before its upstream is paused.
STREAM_BUFFER = 512 * 1024

# Bytes a client may send after a CONNECT's head before the proxy has
# answered it (a ClientHello sent at once) before reading from it pauses.
CONNECT_EARLY_BYTES = 64 * 1024

# The first byte of a TLS record carrying a handshake (a ClientHello): no
# HTTP request starts with it.
_TLS_HANDSHAKE = b"\x16"
_PLAIN_HTTP_BODY = (b"connectors-proxy: this port speaks plain HTTP, not TLS: use http:// here "
                    b"(https:// needs a cptls: or ssl: listener)\n")
# What a TLS client on a plain listener gets.
PLAIN_HTTP_ANSWER = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_PLAIN_HTTP_BODY), _PLAIN_HTTP_BODY))

# Control characters that may not appear in a header value (RFC 9110 section
# 5.5; HTAB is allowed).  Twisted itself only refuses NUL, CR and LF.
_CONTROL_CHARACTERS = bytes(range(0x20)).replace(b"\t", b"") + b"\x7f"

# While reading from a client is paused, how often its socket is checked
# for the client having gone (see L{peer_closed}).
PEER_CHECK_SECONDS = 1.0

# TCP states (Linux TCP_INFO) in which the peer has closed or reset: a FIN
# received (CLOSE_WAIT) or a reset (CLOSE).
_TCP_CLOSE, _TCP_CLOSE_WAIT = 7, 8
_TCP_INFO = getattr(socket, "TCP_INFO", None)

# The largest chunk size accepted: beyond it, other parsers (JavaScript's
# doubles, 64-bit overflow) would read a different size than Twisted's
# unbounded int does, and no real body is that large.
MAX_CHUNK_SIZE = 2**53


def _socket_of(transport: Any) -> socket.socket | None:
    """The socket under C{transport} (through TLS wrappers), if any."""
    for _ in range(4):
        sock = getattr(transport, "socket", None)
        if isinstance(sock, socket.socket):
            return sock
        transport = getattr(transport, "transport", None)
        if transport is None:
            return None
    return None


def peer_closed(transport: Any) -> bool:
    """
    Whether the client on C{transport} has closed or reset its connection,
    without reading from it.

    A transport whose reading is paused (the upstream is not taking the
    request body) does not see the client's FIN or RST: the reactor does
    not read it.  Reading a little to find out would take body bytes that
    have nowhere to go, and a peek (C{MSG_PEEK}) sees the body bytes queued
    before the FIN, not the FIN.  The kernel knows regardless: on Linux the
    connection's TCP state (C{TCP_INFO}) is C{CLOSE_WAIT} once a FIN has
    arrived and C{CLOSE} after a reset, however much unread data is queued.
    Elsewhere a non-blocking peek is the fallback (it sees a reset, and a
    FIN with nothing queued before it).  A FIN counts as gone: Twisted's
    HTTP channel treats a half-close the same way once it reads it.
    """
    sock = _socket_of(transport)
    if sock is None:
        return False
    if _TCP_INFO is not None:
        try:
            state = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1)[0]
        except OSError:
            pass  # not TCP (a UNIX socket): peek instead
        else:
            return state in (_TCP_CLOSE, _TCP_CLOSE_WAIT)
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


@implementer(IBodyProducer)
class RequestBody:
    """
    The client's request body, as an L{IBodyProducer} for
    L{twisted.web.client.Agent}.  Bytes go to the upstream as they arrive;
    reading from the client is paused whenever the upstream is.
    """

    def __init__(self, request: ProxyRequest, length: int | None) -> None:
        self.length: Any = UNKNOWN_LENGTH if length is None else length
        self._request = request
        self._consumer: IConsumer | None = None
        self._buffer: list[bytes] = []
        self._paused = True
        self._complete = False
        self._stopped = False
        self._done: Deferred[None] | None = None
        self.received = 0

    # Called by the channel, as the client's bytes arrive.

    def data_received(self, data: bytes) -> None:
        if self._stopped:
            return
        self.received += len(data)
        if self._consumer is not None and not self._paused and not self._buffer:
            self._consumer.write(data)
        else:
            # Bytes that were already read when the pause took effect, or
            # that arrived because the channel resumed its transport for its
            # own reasons: keep them (at most one read's worth) and pause again.
            self._buffer.append(data)
            self._request.pause_reading()

    def all_received(self) -> None:
        self._complete = True
        if self._consumer is not None and not self._buffer:
            self._finish()

    # IBodyProducer, called by the upstream connection.

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        self._consumer = consumer
        self._done = Deferred()
        self._request.body_wanted()
        self.resumeProducing()
        return self._done

    def pauseProducing(self) -> None:
        self._paused = True
        self._request.pause_reading()

    def resumeProducing(self) -> None:
        self._paused = False
        while self._buffer and not self._paused and self._consumer is not None:
            self._consumer.write(self._buffer.pop(0))
        if self._paused:
            return
        if self._complete:
            self._finish()
        else:
            self._request.resume_reading()

    def stopProducing(self) -> None:
        # IBodyProducer: after stopProducing, the Deferred from
        # startProducing must never fire.
        self._stopped = True
        self._buffer = []

    def _finish(self) -> None:
        if self._done is not None and not self._done.called and not self._stopped:
            self._done.callback(None)

    @property
    def complete(self) -> bool:
        return self._complete


class ProxyRequest(server.Request):
    """
    A request dispatched when its headers are complete, with its body
    available as L{body} (an L{IBodyProducer}) instead of C{content}.
    """

    channel: Any
    body: RequestBody | None = None
    # Why the proxy ended this request itself, when it did (an upstream
    # timeout, a drain): the access log's "fault" field, so the log does not
    # blame the client.
    fault: str | None = None
    # Who cut a response that had started ("upstream": it broke off
    # mid-body; "client": it went away; "proxy": the proxy could not go
    # on), so the log and metrics do not count it as a complete response.
    truncated: str | None = None
    # What the relay does if the client goes away (cancel the upstream
    # request, stop its body), behind one notifyFinish watch per request.
    on_disconnect: Callable[[], object] | None = None
    disconnect_watched = False
    # Twisted's Request has a logger of its own, but under a private name.
    _log = Logger()
    _early = False
    _expect_continue = False
    _continue_sent = False

    # Channel-facing hooks.

    def gotLength(self, length: int | None) -> None:
        # Keep an empty content file so code that looks at it sees no body;
        # the bytes go to self.body instead.
        self.content = _EMPTY
        if length != 0:
            self.body = RequestBody(self, length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.body is not None and not self.finished:
            self.body.data_received(data)

    def begin(self, command: bytes, path: bytes, version: bytes) -> None:
        """Dispatch at end of headers (requests with a body)."""
        self._early = True
        self.pause_reading()
        self._set_line(command, path, version)
        self.process()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._early:
            if self.body is not None:
                self.body.all_received()
            return
        if self.body is not None:
            self.body.all_received()
        self._set_line(command, path, version)
        self.process()

    def process(self) -> None:
        # server.Request.process, minus what a leaf root never needs: path
        # segments unquoted into postpath, resource traversal, a Date
        # header formatted anew for every request.
        site = self.channel.site  # type: ignore[attr-defined]
        root = site.resource
        if not getattr(root, "isLeaf", False):
            return super().process()  # type: ignore[no-any-return]
        self.site = site
        self.setHeader(b"Server", _SERVER)
        self.setHeader(b"Date", _date_header())
        self.prepath = []
        self.postpath = []
        try:
            self.render(root)
        except BaseException:
            self.processingFailed(Failure())
        return None

    def _set_line(self, command: bytes, path: bytes, version: bytes) -> None:
        self.method, self.uri, self.clientproto = command, path, version
        self.path, _, query = path.partition(b"?")
        # Query arguments are not parsed: they go upstream verbatim.
        self.args = {}

    # Body flow control.

    def _transport(self) -> Any:
        # Twisted deletes request.channel once the request is finished (or
        # the client is gone); the body may still be asked about after that.
        channel = getattr(self, "channel", None)
        return None if channel is None else channel.transport

    def pause_reading(self) -> None:
        transport = self._transport()
        if transport is not None:
            transport.pauseProducing()
            # Paused, the reactor would not see the client leave.
            watch = getattr(self.channel, "watch_peer", None)
            if watch is not None:
                watch()

    def resume_reading(self) -> None:
        transport = self._transport()
        if transport is not None and not self.finished:
            transport.resumeProducing()
            resumed = getattr(self.channel, "reading_resumed", None)
            if resumed is not None:
                resumed()

    def body_wanted(self) -> None:
        transport = self._transport()
        if transport is not None and self._expect_continue and not self._continue_sent and not self.startedWriting:
            self._continue_sent = True
            transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    @property
    def body_pending(self) -> bool:
        """Whether some of the body has not been read from the client."""
        return self.body is not None and not self.body.complete

    def _close_if_body_pending(self) -> None:
        if self.body_pending and self.channel is not None and self.channel.persistent:
            # An answer while the body is unread: the framing of the rest of
            # this connection is unknown, so it closes after the answer.
            self.channel.persistent = False
            if not self.startedWriting:
                self.setHeader(b"Connection", b"close")

    def write(self, data: bytes) -> None:
        if not self.startedWriting:
            self._close_if_body_pending()
        super().write(data)

    def write_chunks(self, data: bytes, payload: int) -> None:
        """
        Write body bytes already in the chunked coding (whole chunks, no
        last chunk: L{finish} writes it) carrying C{payload} bytes, to a
        response that is sent chunked (L{chunked}, once its head is written).
        """
        if compat.request_gone(self) or not data:
            return
        if not self.chunked:
            raise RuntimeError("write_chunks on a response that is not sent chunked")
        self.sentLength += payload
        self.channel.write(data)

    def finish(self) -> None:
        if self.body_pending and self.channel is not None:
            self._close_if_body_pending()
            self.channel.refused_mid_body()
        super().finish()

    def processingFailed(self, reason: Failure) -> None:  # type: ignore[override]
        # Never a traceback to the client: log it, answer 500 with a line.
        self._log.failure("Unhandled error while serving {uri}", failure=reason, uri=redact_target(self.uri))
        if not self.startedWriting:
            body = b"connectors-proxy: internal error (see the proxy's log)\n"
            self.setResponseCode(500)
            self.responseHeaders.setRawHeaders(b"Content-Type", [b"text/plain; charset=utf-8"])
            self.responseHeaders.setRawHeaders(b"Content-Length", [str(len(body)).encode()])
            self.write(body)
        if not self.finished:
            self.finish()
        return reason  # type: ignore[return-value]


_SERVER = server.version
_date_cache: list[Any] = [0, b""]


def _date_header() -> bytes:
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0], _date_cache[1] = now, http.datetimeToString(now)
    return _date_cache[1]  # type: ignore[no-any-return]


class _EmptyContent:
    """A read-only empty body file shared by all requests."""

    def read(self, *args: Any) -> bytes:
        return b""

    def seek(self, *args: Any) -> int:
        return 0

    def tell(self) -> int:
        return 0

    def close(self) -> None:
        pass


_EMPTY = _EmptyContent()


class ProxyChannel(compat.HTTPChannelCompat):
    """
    L{HTTPChannel} with early dispatch and a stricter, politer parser
    (Twisted's parser state read through the public names of
    L{compat.HTTPChannelCompat}).
    """

    # Twisted types these as ITransport | None and leaves site untyped; the
    # channel only runs connected, over TCP or TLS transports.
    transport: Any
    site: Any
    _log = Logger()
    _seen_bytes = False
    _draining: int | None = None
    _refused = False
    _header_deadline: IDelayedCall | None = None
    _awaiting_headers = False
    _last_byte = b""
    _drain_deadline: IDelayedCall | None = None
    _peer_check: IDelayedCall | None = None
    _reading_paused = False
    # Inside an intercepted CONNECT tunnel: the CONNECT (the router routes
    # this channel's requests by it).
    connect_context: ConnectContext | None = None
    # After a CONNECT's 200: the protocol every byte of the connection goes to.
    tunnel: IProtocol | None = None
    # While a CONNECT is being decided: the bytes the client sent after its
    # head, kept for the tunnel (never parsed as HTTP).
    _connect_early: list[bytes] | None = None

    @property
    def _clock(self) -> IReactorTime:
        return self.site.reactor  # type: ignore[no-any-return]

    _host_address: Any = None
    _secure: bool | None = None

    def getHost(self) -> Any:
        # Request.__init__ asks for every request; it is a syscall each time.
        if self._host_address is None:
            self._host_address = super().getHost()
        return self._host_address

    def isSecure(self) -> bool:
        # A zope adaptation each call; constant for the connection.
        if self._secure is None:
            # Inside an intercepted tunnel, the client speaks TLS to the proxy.
            self._secure = self.connect_context is not None or super().isSecure()
        return self._secure

    def dataReceived(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.dataReceived(data)
            return
        if self._draining is not None:
            self._draining -= len(data)
            if self._draining <= 0:
                self.transport.abortConnection()
            return
        if not self._seen_bytes:
            self._seen_bytes = True
            if data.startswith(_TLS_HANDSHAKE):
                # A TLS client on a plain listener: it would wait forever for
                # a ServerHello.  A plain HTTP answer makes it give up at
                # once: Go clients (skopeo, podman, docker) then say "server
                # gave HTTP response to HTTPS client", OpenSSL ones "wrong
                # version number" (a TLS alert read as a TLS version problem).
                self.transport.write(PLAIN_HTTP_ANSWER)
                self.transport.loseConnection()
                return
        if self.line_mode and data:
            # Between requests or in a request's head: the head must be
            # complete in time, however slowly its first line trickles in.
            self._arm_header_deadline()
            if b"\n" in data and self._bare_line_feed(data):
                self._refuse(400, b"Bad Request")
                return
            self._last_byte = data[-1:]
        super().dataReceived(data)

    def _arm_header_deadline(self) -> None:
        if not self._awaiting_headers:
            # One timer per connection, pushed later for each request (a
            # cheap reset) instead of a new callLater and cancel per request.
            self._awaiting_headers = True
            if self._header_deadline is not None and self._header_deadline.active():
                self._header_deadline.reset(HEADER_SECONDS)
            else:
                self._header_deadline = self._clock.callLater(HEADER_SECONDS, self._headers_too_slow)

    def _bare_line_feed(self, data: bytes) -> bool:
        """
        Whether the header section in C{data} ends a line with a bare LF:
        the CRLF parser would wait forever for the end of such a line.
        """
        end = data.find(b"\r\n\r\n")
        head = data if end < 0 else data[:end]
        at = head.find(b"\n")
        while at >= 0:
            before = head[at - 1:at] if at else self._last_byte
            if before != b"\r":
                return True
            at = head.find(b"\n", at + 1)
        return False

    def lineReceived(self, line: bytes) -> None:
        if self.head_bytes + len(line) > self.totalHeadersSize or (
            line and self.head_count >= self.maxHeaders
        ):
            self._refuse(431, b"Request Header Fields Too Large")
            return
        if line[:1] in (b" ", b"\t") and self.head_bytes > 0:
            # An obs-folded header line (after the request line, which is
            # what makes the size non-zero): Twisted joins it to the header
            # before it, a server that reads it as a header of its own, or
            # ignores it, sees different headers (Transfer-Encoding
            # among them).  RFC 9112 section 5.2 allows a 400.
            self._refuse(400, b"Bad Request", b"obs-folded header line")
            return
        self._arm_header_deadline()
        super().lineReceived(line)

    def headerReceived(self, line: bytes) -> bool:
        """
        Refuse what Twisted accepts but another parser could read otherwise,
        then store the header as Twisted does.

        @param line: one header line, without its line ending.
        @return: whether the header was accepted (Twisted ignores this for
            all but a request's last header: a refusal stops parsing anyway).
        """
        name, colon, value = line.partition(b":")
        if colon:
            name = name.lower()
            value = value.strip(b" \t")
            if len(value.translate(None, _CONTROL_CHARACTERS)) != len(value):
                return self._bad_header(b"control character in a header value")
            if name == b"transfer-encoding":
                # Twisted takes "identity" as no Transfer-Encoding at all, so
                # with Content-Length the upstream gets a request framed two
                # ways, and without, the body is read as the next request.
                # The transfer-coding name is case-insensitive (RFC 9112
                # section 7); anything but "chunked" alone is refused.
                if value.lower() != b"chunked":
                    return self._bad_header(b"Transfer-Encoding other than chunked")
                # The request line's version is known before any header.
                if self.request_version != b"HTTP/1.1":
                    return self._bad_header(b"Transfer-Encoding on HTTP/1.0")
            elif name == b"host" and self.requests[-1].requestHeaders.hasHeader(b"host"):
                return self._bad_header(b"more than one Host header")
        accepted: bool = super().headerReceived(line)
        if accepted and colon and name == b"transfer-encoding":
            # Twisted has just chosen its chunked decoder for the body.
            self.bound_chunk_sizes(MAX_CHUNK_SIZE)
        return accepted

    def _bad_header(self, problem: bytes) -> bool:
        self._refuse(400, b"Bad Request", problem)
        return False

    def lineLengthExceeded(self, line: bytes) -> None:
        # The first line of a request over the limit is a URI too long;
        # any other, a header too large.
        if self.head_bytes == 0:
            self._refuse(414, b"URI Too Long")
        else:
            self._refuse(431, b"Request Header Fields Too Large")

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self._awaiting_headers:
            self._refuse(408, b"Request Timeout")

    def _cancel_header_deadline(self) -> None:
        # Disarmed, not cancelled: the next request re-arms it cheaply.
        self._awaiting_headers = False

    def _stop_header_deadline(self) -> None:
        self._awaiting_headers = False
        if self._header_deadline is not None and self._header_deadline.active():
            self._header_deadline.cancel()
        self._header_deadline = None

    def _refuse(self, code: int, phrase: bytes, problem: bytes = b"") -> None:
        self._refused = True
        self._cancel_header_deadline()
        # A request dispatched before its body (now found malformed) may be
        # talking to its upstream: it must stop at once and write nothing
        # more, and if its answer has begun, a 400 after it would be garbage.
        in_flight: ProxyRequest | None = None
        if self.requests and isinstance(self.requests[-1], ProxyRequest):
            last = self.requests[-1]
            if last._early and not last.finished and not compat.request_gone(last):
                in_flight = last
        if in_flight is None or not in_flight.startedWriting:
            body = b"connectors-proxy: " + phrase + (b": " + problem if problem else b"") + b"\n"
            self.transport.write(
                b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n%s" % (code, phrase, len(body), body)
            )
        self.loseConnection()
        # Stop parsing whatever else is buffered.
        self.dataReceived = lambda data: None  # type: ignore[method-assign]
        self.lineReceived = lambda line: None  # type: ignore[method-assign]
        if in_flight is not None:
            in_flight.connectionLost(Failure(ConnectionDone("the request was malformed")))

    def bad_request(self) -> None:
        self._refuse(400, b"Bad Request")

    def rawDataReceived(self, data: bytes) -> None:
        if self.tunnel is not None:
            # The rest of the read that carried the CONNECT's head.
            self.tunnel.dataReceived(data)
            return
        if self._connect_early is not None:
            self._connect_early.append(data)
            if sum(map(len, self._connect_early)) > CONNECT_EARLY_BYTES:
                self.transport.pauseProducing()
            return
        super().rawDataReceived(data)

    def take_over(self, protocol: IProtocol, counted: bool = True) -> None:
        """
        Hand the connection to C{protocol}, after a C{CONNECT} was answered
        with its C{200}: every byte the client sent after the C{CONNECT}'s
        head, and every byte it sends from now on, goes to C{protocol}, which
        gets the connection's transport (and registers its own producer).
        The C{CONNECT} request stays open until the connection closes.

        @param counted: whether this channel stays among its site's
            connections (drained, counted); C{False} when C{protocol} runs a
            channel of its own that the site counts instead.
        """
        early = b"".join(self._connect_early or ())
        self._connect_early = None
        self.tunnel = protocol
        self._stop_header_deadline()
        self.setTimeout(None)
        self._reading_paused = False
        transport = self.transport
        # The channel stops being the transport's producer: the tunnel's
        # protocol registers its own.
        transport.unregisterProducer()
        transport.resumeProducing()
        if not counted:
            closed = getattr(self.site, "channel_closed", None)
            if closed is not None:
                closed(self)
        protocol.makeConnection(transport)
        if early and self.tunnel is protocol:
            protocol.dataReceived(early)

    def allHeadersReceived(self) -> None:
        self._cancel_header_deadline()
        if self.request_line[0] == b"CONNECT":
            if self.length != 0:
                self._refuse(400, b"Bad Request", b"a CONNECT request has no body")
                return
            self._connect_early = []
        req = self.requests[-1]
        self.persistent = self.checkPersistence(req, self.request_version)
        req.gotLength(self.length)
        expect = req.requestHeaders.getRawHeaders(b"Expect")
        if expect:
            if expect[0].lower() != b"100-continue" or self.request_version != b"HTTP/1.1":
                self._refuse(417, b"Expectation Failed")
                return
            req._expect_continue = True
        if self.length != 0 and not self._refused:
            req.begin(*self.request_line)

    def allContentReceived(self) -> None:
        if not self.requests or self._draining is not None or self._refused:
            # The request was answered before its body was read, and the
            # connection is closing: the rest is not ours to parse.
            return
        super().allContentReceived()

    def watch_peer(self) -> None:
        """
        Reading from the client is paused (for an upstream that does not
        take the body yet, or while the request is checked): check every
        C{PEER_CHECK_SECONDS} whether the client has gone, and if so drop
        the connection, which ends its request and cancels the upstream one
        (instead of holding a slot and the upstream until the idle timeout).
        """
        self._reading_paused = True
        if self._peer_check is None or not self._peer_check.active():
            self._peer_check = self._clock.callLater(PEER_CHECK_SECONDS, self._check_peer)

    def reading_resumed(self) -> None:
        # The timer is left to lapse rather than cancelled: under
        # backpressure pauses and resumes come many times a second.
        self._reading_paused = False

    def _check_peer(self) -> None:
        self._peer_check = None
        if not self._reading_paused or self.transport is None or self._draining is not None:
            return
        if peer_closed(self.transport):
            self._log.debug("client {peer} went away while its request was paused",
                            peer=getattr(self.transport.getPeer(), "host", "-"))
            self.transport.abortConnection()
            return
        self._peer_check = self._clock.callLater(PEER_CHECK_SECONDS, self._check_peer)

    def refused_mid_body(self) -> None:
        """
        A response is ending before the request body was read: after the
        answer is written, read and discard a bounded amount for a short time
        so the client sees the answer instead of a connection reset.
        """
        if self._draining is not None or self.transport is None:
            return
        self._draining = DRAIN_BYTES
        transport = self.transport
        transport.resumeProducing()
        self._drain_deadline = self._clock.callLater(DRAIN_SECONDS, transport.abortConnection)

    def requestDone(self, request: http.Request) -> None:
        if self._connect_early is not None:
            # A CONNECT answered without a tunnel (refused): what the client
            # sent after it (already read, or still in the parser's buffer
            # when the answer came at once) was meant for a tunnel, not the
            # next request.  With nothing sent, the connection can carry a
            # retry (a client answering the 407 challenge).
            if any(self._connect_early) or self.clearLineBuffer():
                self.persistent = False
            self._connect_early = None
        if self._draining is not None:
            del self.requests[0]
            # Half-close: the response is out; keep reading (and discarding)
            # until the client closes or the drain bound is hit.  Transports
            # that cannot half-close (TLS) close after the write is flushed.
            half_close = getattr(self.transport, "loseWriteConnection", None)
            if half_close is not None:
                half_close()
            else:
                self.transport.loseConnection()
            return
        # Twisted resumes reading for the next request.
        self._reading_paused = False
        super().requestDone(request)

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        """
        The response head, in one write (L{http.HTTPChannel}'s hands the
        transport a sequence of some forty pieces, each checked and kept
        apart until the transport joins them).
        """
        parts = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        self.transport.write(b"".join(parts))

    def connectionMade(self) -> None:
        super().connectionMade()
        # Let a response stream keep up to STREAM_BUFFER queued for this
        # client before the upstream is paused: Twisted's 64 KiB default
        # pauses and resumes the upstream for nearly every chunk.
        self.transport.bufferSize = STREAM_BUFFER
        # The site counts its connections (metrics) and closes them when
        # the daemon drains; a plain Site (some tests) has no such hook.
        opened = getattr(self.site, "channel_opened", None)  # type: ignore[attr-defined]
        if opened is not None:
            opened(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.tunnel is not None:
            self.tunnel.connectionLost(reason)
        self._stop_header_deadline()
        if self._drain_deadline is not None and self._drain_deadline.active():
            self._drain_deadline.cancel()
        if self._peer_check is not None and self._peer_check.active():
            self._peer_check.cancel()
        self._peer_check = None
        closed = getattr(self.site, "channel_closed", None)  # type: ignore[attr-defined]
        if closed is not None:
            closed(self)
        super().connectionLost(reason)


class ProxySite(server.Site):
    """A L{Site} whose channels and requests stream, and that logs nothing itself."""

    protocol = ProxyChannel  # type: ignore[assignment]
    requestFactory = ProxyRequest  # type: ignore[assignment]
    displayTracebacks = False
    noisy = False

    def __init__(self, resource: Any, reactor: IReactorTime, timeout: float = 60.0) -> None:
        super().__init__(resource, timeout=timeout, reactor=reactor)
        # Open connections (read by the metrics at scrape time, closed by
        # the drain at shutdown) and how many were ever accepted.
        self.channels: set[ProxyChannel] = set()
        self.opened = 0

    def channel_opened(self, channel: ProxyChannel) -> None:
        self.channels.add(channel)
        self.opened += 1

    def channel_closed(self, channel: ProxyChannel) -> None:
        self.channels.discard(channel)

    def log(self, request: http.Request) -> None:
        # The router writes the access log, with identity and Connector.
        pass
