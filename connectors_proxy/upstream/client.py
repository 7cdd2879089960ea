# -*- test-case-name: tests.test_upstream_client,tests.test_memory_relay -*-
"""
The proxy's upstream HTTP/1.1 client: an L{IAgent} on Twisted transports,
lean where every relayed request pays.

Twisted's L{twisted.web.client.Agent} cost about 270 us of CPU a request
here (a Deferred chain per request, a line-by-line parser, a connection
pool built for generality), four times the server side's share (issue 15).
This client keeps the same interface (C{request} -> L{IResponse} with
C{deliverBody}) so the relay, the protocol resources and the in-memory
tests are unchanged, and does the least per request:

  - one pool of keep-alive connections per origin (per agent, and there is
    one agent per TLS identity: L{connectors_proxy.upstream.agents});
    the newest idle connection is reused first; idle ones are closed after
    C{idle_timeout} by one timer per agent, not one per connection;
  - the request head is written in one write;
  - the response head is found with one C{find} and parsed by
    L{connectors_proxy.upstream.framing.parse_head}; a small body that came
    with it frees the connection at once, before the caller reads it;
  - response bodies stream with C{IPushProducer} backpressure: the body's
    reader pauses the upstream connection, and the request body is paused
    by the upstream's transport when its buffer is full;
  - a chunked body is handed on as it came (L{ChunkedReader} framed) to a
    reader that takes chunked bytes (the relay, to a HTTP/1.1 client),
    instead of being decoded and encoded again;
  - the timeouts of L{connectors_proxy.upstream.timeouts} are kept here:
    one timer from the request's last byte to the response head, and an
    idle check while a body streams.

A connection is reused only when the whole exchange was framed with
certainty; anything odd (an early answer to an unfinished upload, bytes
after the response, a malformed head) closes it.  A request sent on a
reused connection that the upstream had closed meanwhile (the keep-alive
race) is sent again on a new one when it has no body.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    PotentialDataLoss,
    RequestGenerationFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from connectors_proxy import compat
from connectors_proxy.server.headers import canonical_name
from connectors_proxy.upstream.framing import (
    CONNECTION_FIELDS,
    MAX_HEAD,
    ChunkedReader,
    Framing,
    Head,
    MalformedResponse,
    framing,
    head_end,
    parse_head,
)
from connectors_proxy.upstream.timeouts import UpstreamTimeout, UpstreamTimeouts

MAX_IDLE_PER_ORIGIN = 64
IDLE_TIMEOUT = 30.0
# How much is read from a plain-TCP upstream at a time (Twisted's default:
# 64 KiB).  Each read costs the same Python work whatever its size; see
# bench/masking.py.  It is also how much the connection buffers before
# pausing a request body's producer.
READ_SIZE = 256 * 1024
# Endpoints kept per agent: redirects may name any host.
MAX_ORIGINS = 1024
# Interim (1xx) answers skipped before a final one; more is a hostile upstream.
MAX_INTERIM = 16

# Request targets and methods are written as given: refuse what would break
# the request line (the relay builds them from already parsed requests).
_BAD_TARGET = re.compile(rb"[\x00-\x20\x7f]")
_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


def split_url(url: bytes) -> tuple[bytes, bytes]:
    """
    C{(origin, request target)} of an absolute C{http(s)} URL: the target
    is its path and query (C{/} when it has none); a fragment is dropped.

    @raise ValueError: not an absolute URL.
    """
    scheme_end = url.find(b"://")
    if scheme_end <= 0:
        raise ValueError(f"not an absolute URL: {url[:80]!r}")
    hash_at = url.find(b"#")
    if hash_at >= 0:
        url = url[:hash_at]
    authority = scheme_end + 3
    cut = url.find(b"/", authority)
    query = url.find(b"?", authority, cut if cut >= 0 else len(url))
    if query >= 0:
        cut = query
    elif cut < 0:
        cut = len(url)
    target = url[cut:]
    if not target.startswith(b"/"):
        target = b"/" + target
    return url[:cut], target


@implementer(IResponse)
class Response:
    """
    An upstream response: its head, and its body as C{deliverBody}
    delivers it (to an L{IProtocol}, whose transport is an
    L{IPushProducer} that pauses or stops the upstream).

    A body reader may take a chunked body in its own framing: its
    transport's C{framing} is L{Framing.CHUNKED}, and if, by the end of its
    C{connectionMade}, the reader has set C{wants_framed} to C{True}, the
    body reaches its C{framedReceived(data, payload)} as the framed bytes
    L{ChunkedReader} hands on, C{payload} being how many payload bytes
    they carry.
    """

    request = None
    previousResponse = None

    def __init__(self, exchange: _Exchange, head: Head, headers: Headers, length: Any) -> None:
        self._exchange = exchange
        self.version = (b"HTTP", head.version[0], head.version[1])
        self.code = head.code
        self.phrase = head.phrase
        self.headers = headers
        self.length = length

    def deliverBody(self, protocol: Any) -> None:
        self._exchange.deliver(protocol)

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response  # type: ignore[misc]


def _response_headers(method: bytes, head: Head) -> Headers:
    """
    The fields of C{head} that describe the response (not the connection),
    minus those its C{Connection} field nominates (RFC 9110 section
    7.6.1).  Content-Length stays in answers to HEAD and in 304s.
    """
    headers = Headers()
    # The parser has checked every value (no CR, LF or other control
    # character): they go in as they are.
    raw = compat.raw_headers(headers)
    keep_length = method == b"HEAD" or head.code == 304
    nominated: set[bytes] = set()
    for name, value in head.fields:
        if name in CONNECTION_FIELDS:
            if name == b"connection":
                nominated.update(t.strip().lower() for t in value.split(b",") if t.strip())
            if not (keep_length and name == b"content-length"):
                continue
        key = canonical_name(name)
        values = raw.get(key)
        if values is None:
            raw[key] = [value]
        else:
            values.append(value)
    for name in nominated:
        headers.removeHeader(name)
    return headers


@implementer(IPushProducer)
class _Exchange:
    """
    One request and its response, on one connection.  It is the Deferred's
    owner, the body reader's transport (an L{IPushProducer}: pausing it
    pauses the connection), and the timers' holder.  Once it is over, its
    producer methods do nothing: a reader that calls them late cannot touch
    the connection's next exchange.
    """

    framing = Framing.NONE

    def __init__(self, agent: HTTP11Agent, origin: bytes, method: bytes, target: bytes, headers: Headers,
                 body: IBodyProducer | None) -> None:
        self.agent = agent
        self.origin = origin
        self.method = method
        self.target = target
        self.headers = headers
        self.body = body
        self.result: Deferred[IResponse] = Deferred(self._cancel)
        self.connection: _Connection | None = None
        self.connecting: Deferred[Any] | None = None
        self.reused = False
        self.retried = False
        self.body_sent = body is None
        self.got_bytes = False
        self.response: Response | None = None
        self.reusable = False
        self.reader: Any = None
        self.chunked: ChunkedReader | None = None
        self.remaining = 0
        self.pending: list[bytes] = []
        self.complete = False
        self.over = False
        self.paused = False
        self.timer: IDelayedCall | None = None
        self.last = 0.0
        self.timed_out: str | None = None
        self.cancelled = False
        self.stopped = False
        self.interim = 0

    # -- sending ------------------------------------------------------------

    def head_bytes(self) -> bytes:
        parts = [self.method, b" ", self.target, b" HTTP/1.1\r\n"]
        body = self.body
        if body is None:
            # RFC 9110 section 8.6: a method whose semantics anticipate a body says it has none.
            if self.method in (b"POST", b"PUT", b"PATCH"):
                parts.append(b"Content-Length: 0\r\n")
        elif body.length is UNKNOWN_LENGTH:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        else:
            parts.append(b"Content-Length: %d\r\n" % body.length)
        for name, values in self.headers.getAllRawHeaders():
            for value in values:
                parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def send(self, connection: _Connection) -> None:
        self.connection = connection
        connection.exchange = self
        transport = connection.transport
        compat.send_now(transport, self.head_bytes())
        if self.body is None:
            self._sent()
            return
        consumer = _BodyConsumer(transport, self.body.length)
        transport.registerProducer(self.body, True)
        try:
            produced = self.body.startProducing(consumer)
        except Exception:
            produced = Deferred()
            produced.errback()
        produced.addCallbacks(self._body_done, self._body_failed, callbackArgs=(consumer,))

    def _body_done(self, _: object, consumer: _BodyConsumer) -> None:
        connection = self.connection
        if connection is None or connection.exchange is not self:
            return
        transport = connection.transport
        transport.unregisterProducer()
        if consumer.written != consumer.length and consumer.length is not UNKNOWN_LENGTH:
            self._fail_sending(ValueError(
                f"request body ended after {consumer.written} of {consumer.length} bytes"))
            return
        if consumer.length is UNKNOWN_LENGTH:
            transport.write(b"0\r\n\r\n")
        self.body_sent = True
        if self.complete:
            connection.exchange_over(self)
        else:
            self._sent()

    def _body_failed(self, reason: Failure) -> None:
        connection = self.connection
        if connection is None or connection.exchange is not self:
            return
        connection.transport.unregisterProducer()
        self._fail_sending(reason)

    def _fail_sending(self, reason: Failure | Exception) -> None:
        failure = reason if isinstance(reason, Failure) else Failure(reason)
        if not self.result.called:
            self.result.errback(Failure(RequestGenerationFailed([failure])))
        self.abort()

    def _sent(self) -> None:
        """The whole request is out: the upstream's turn (the headers timeout starts)."""
        if self.response is None:
            seconds = self.agent.timeouts.headers
            if seconds:
                self.timer = self.agent.reactor.callLater(seconds, self._headers_too_slow)

    def _headers_too_slow(self) -> None:
        self.timer = None
        if self.response is None and not self.over:
            self.timed_out = "headers"
            if not self.result.called:
                self.result.errback(Failure(UpstreamTimeout("headers", self.agent.timeouts.headers)))
            self.abort()

    def _cancel(self, _: Deferred[IResponse]) -> None:
        # The caller gave up (its client went away): the result then fails
        # with CancelledError, and the connection is not reused.
        self.cancelled = True
        if self.connecting is not None:
            self.connecting.cancel()
        self.abort()

    def abort(self) -> None:
        """Close this exchange's connection (not to be reused)."""
        self._stop_timer()
        connection = self.connection
        if connection is not None and connection.exchange is self:
            self.reusable = False
            connection.transport.abortConnection()

    def _stop_timer(self) -> None:
        if self.timer is not None:
            if self.timer.active():
                self.timer.cancel()
            self.timer = None

    # -- receiving ----------------------------------------------------------

    def head_received(self, head: Head, reusable: bool, kind: Framing, length: int | None) -> None:
        self._stop_timer()
        self.framing = kind
        self.reusable = reusable
        if kind is Framing.LENGTH:
            assert length is not None
            self.remaining = length
            self.complete = length == 0
        elif kind is Framing.NONE:
            self.complete = True
        headers = _response_headers(self.method, head)
        self.response = Response(self, head, headers, length if kind is Framing.LENGTH else
                                 (0 if kind is Framing.NONE else UNKNOWN_LENGTH))
        if not self.body_sent and self.body is not None:
            # An answer before the upload is finished (401, 413...): it is
            # the answer, and the rest of the upload is not wanted; the
            # connection cannot be reused (the upstream may not read it).
            self.reusable = False
        if not self.result.called:
            self.result.callback(self.response)

    def body_received(self, data: bytes) -> int:
        """Bytes of the body; returns how many were the body's (the rest follow it)."""
        if self.framing is Framing.LENGTH:
            if len(data) > self.remaining:
                # Bytes after the body: nothing pipelines here, so the
                # connection is out of step.
                self.reusable = False
                used = self.remaining
                data = data[:used]
            else:
                used = len(data)
            self.remaining -= used
            self._to_reader(data, used)
            if not self.remaining:
                self.body_complete()
            return used
        if self.framing is Framing.CHUNKED:
            if self.chunked is None:
                if self.reader is None:
                    # Not read yet: kept as it came, decided when it is.
                    self.pending.append(data)
                    self.connection_pause()
                    return len(data)
                self.chunked = ChunkedReader(getattr(self.reader, "wants_framed", False))
            chunked = self.chunked
            before = chunked.payload
            pieces, used = chunked.feed(data)
            self._to_reader_pieces(pieces, chunked.payload - before)
            if used < len(data):
                self.reusable = False
            if chunked.done:
                self.body_complete()
            return used
        # Framing.CLOSE
        self._to_reader(data, len(data))
        return len(data)

    def _to_reader(self, data: bytes, size: int) -> None:
        if not data:
            return
        self.last = self.agent.reactor.seconds()
        if self.reader is None:
            self.pending.append(data)
            if self.framing is Framing.CLOSE or self.remaining:
                # Nobody reads it yet: read no more from the upstream.
                self.connection_pause()
        else:
            self.reader.dataReceived(data)

    def _to_reader_pieces(self, pieces: list[bytes], payload: int) -> None:
        if not pieces:
            return
        self.last = self.agent.reactor.seconds()
        reader = self.reader
        if self.chunked is not None and self.chunked.framed:
            reader.framedReceived(pieces[0] if len(pieces) == 1 else b"".join(pieces), payload)
        else:
            for piece in pieces:
                reader.dataReceived(piece)

    def body_complete(self) -> None:
        self.complete = True
        connection = self.connection
        if connection is not None and connection.exchange is self and (self.body_sent or self.body is None):
            connection.exchange_over(self)
        elif connection is not None and connection.exchange is self:
            # The upload is still going: stop it, and close after.
            self.reusable = False
            if self.body is not None:
                connection.transport.unregisterProducer()
                self.body.stopProducing()
            connection.exchange_over(self)
            # The rest of the upload in the send buffer is not wanted: do
            # not wait for the upstream to read it.
            connection.transport.abortConnection()
        if self.reader is not None:
            self._finish_reader(Failure(ResponseDone()))

    def connection_lost(self, reason: Failure) -> None:
        """The connection closed while this exchange used it."""
        self._stop_timer()
        retry = (self.response is None and self.reused and not self.got_bytes and not self.retried
                 and self.body is None and self.method in _IDEMPOTENT)
        if self.body is not None and not self.body_sent:
            self.body.stopProducing()
        if self.response is None:
            if self.result.called or self.cancelled:
                return
            if self.timed_out:
                return
            if retry:
                # The keep-alive race: the upstream closed the idle
                # connection as the request went out.  Once more, on a new one.
                self.agent.retry(self)
                return
            kind = ResponseNeverReceived if not self.got_bytes else ResponseFailed
            self.result.errback(Failure(kind([reason])))
            return
        if self.complete:
            return
        if self.framing is Framing.CLOSE and reason.check(ConnectionDone) and not self.timed_out:
            self.complete = True
            ending = Failure(PotentialDataLoss())
        elif self.timed_out == "body":
            ending = Failure(UpstreamTimeout("body", self.agent.timeouts.idle))
        else:
            ending = Failure(ResponseFailed([reason]))
        if self.reader is not None:
            self._finish_reader(ending)
        else:
            self.pending_end = ending

    pending_end: Failure | None = None

    def malformed(self, problem: MalformedResponse) -> None:
        """The response cannot be framed: fail it and close."""
        failure = Failure(problem)
        if self.response is None:
            if not self.result.called:
                self.result.errback(Failure(ResponseFailed([failure])))
        else:
            self.pending_end = Failure(ResponseFailed([failure]))
            if self.reader is not None:
                self._finish_reader(self.pending_end)
        self.abort()

    # -- the body's reader --------------------------------------------------

    def deliver(self, reader: Any) -> None:
        if self.reader is not None:
            raise RuntimeError("the response body is already being read")
        self.reader = reader
        reader.makeConnection(self)
        pending, self.pending = self.pending, []
        if self.framing is Framing.CHUNKED and not self.complete:
            self.chunked = ChunkedReader(getattr(reader, "wants_framed", False))
            # In one piece, so that bytes after the body (in whichever read
            # they came) are seen, and the connection is not reused.
            try:
                if pending:
                    self.body_received(b"".join(pending))
            except MalformedResponse as problem:
                self.malformed(problem)
                return
        else:
            for data in pending:
                if self.reader is None:
                    break
                reader.dataReceived(data)
        if self.pending_end is not None:
            self._finish_reader(self.pending_end)
            return
        if self.stopped:
            # The reader stopped the body while taking what had come: the
            # connection is closing, and its loss ends the body.
            return
        if self.complete or self.over:
            if not self.over:
                self._finish_reader(Failure(ResponseDone()))
            return
        idle = self.agent.timeouts.idle
        if idle:
            self.last = self.agent.reactor.seconds()
            self.timer = self.agent.reactor.callLater(idle, self._idle_check)
        if not self.paused:
            self.connection_resume()

    def _finish_reader(self, reason: Failure) -> None:
        self._stop_timer()
        reader, self.reader = self.reader, _Finished
        self.over = True
        if reader is not None and reader is not _Finished:
            reader.connectionLost(reason)

    def _idle_check(self) -> None:
        self.timer = None
        if self.over or self.complete:
            return
        idle = self.agent.timeouts.idle
        now = self.agent.reactor.seconds()
        if self.paused:
            self.timer = self.agent.reactor.callLater(idle, self._idle_check)
            return
        remaining = self.last + idle - now
        if remaining > 0:
            self.timer = self.agent.reactor.callLater(remaining, self._idle_check)
            return
        self.timed_out = "body"
        self.abort()

    def connection_pause(self) -> None:
        connection = self.connection
        if connection is not None and connection.exchange is self:
            connection.transport.pauseProducing()

    def connection_resume(self) -> None:
        connection = self.connection
        if connection is not None and connection.exchange is self:
            connection.transport.resumeProducing()

    # IPushProducer, for the body's reader.

    def pauseProducing(self) -> None:
        if self.over:
            return
        self.paused = True
        self.connection_pause()

    def resumeProducing(self) -> None:
        if self.over:
            return
        self.paused = False
        # The pause was the proxy's doing: the idle clock starts again.
        self.last = self.agent.reactor.seconds()
        self.connection_resume()

    def stopProducing(self) -> None:
        if self.over or self.complete:
            return
        self.stopped = True
        self.abort()


class _FinishedReader:
    """Stands in for a body reader that has been told the body ended."""

    def dataReceived(self, data: bytes) -> None:
        pass

    def framedReceived(self, data: bytes, payload: int) -> None:
        pass


_Finished = _FinishedReader()


@implementer(IConsumer)
class _BodyConsumer:
    """
    Writes a request body to the upstream: as it is with a known length
    (refusing more than announced), in chunks without one.
    """

    def __init__(self, transport: Any, length: Any) -> None:
        self.transport = transport
        self.length = length
        self.written = 0
        self._chunked = length is UNKNOWN_LENGTH

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.written += len(data)
        if self._chunked:
            self.transport.writeSequence((b"%x\r\n" % len(data), data, b"\r\n"))
            return
        if self.written > self.length:
            raise ValueError(f"request body longer than its {self.length} bytes")
        self.transport.write(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()


class _Connection(Protocol):
    """One upstream connection: reads responses for its exchanges in turn."""

    transport: Any

    def __init__(self, agent: HTTP11Agent, origin: bytes) -> None:
        self.agent = agent
        self.origin = origin
        self.exchange: _Exchange | None = None
        self.buffer = b""
        self.idle_since = 0.0
        self.closed = False

    def connectionMade(self) -> None:
        transport = self.transport
        if isinstance(transport, FileDescriptor):
            transport.bufferSize = READ_SIZE
        nodelay = getattr(transport, "setTcpNoDelay", None)
        if nodelay is not None:
            try:
                nodelay(True)
            except OSError:
                pass

    def dataReceived(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            # Nothing was asked: the connection is out of step (and out of
            # the pool now, not at its connectionLost).
            self.closed = True
            self.agent.forget(self)
            self.transport.abortConnection()
            return
        exchange.got_bytes = True
        try:
            while data and self.exchange is exchange:
                if exchange.response is None:
                    data = self._head(exchange, data)
                else:
                    used = exchange.body_received(data)
                    if used < len(data):
                        # Bytes after the response: nothing pipelines here.
                        exchange.reusable = False
                        if exchange.complete:
                            self.transport.abortConnection()
                        return
                    data = b""
        except MalformedResponse as problem:
            exchange.malformed(problem)

    def _head(self, exchange: _Exchange, data: bytes) -> bytes:
        """Read head bytes; returns what follows the head (if it is complete)."""
        buffer = self.buffer + data if self.buffer else data
        end, body_start = head_end(buffer)
        if end < 0:
            if len(buffer) > MAX_HEAD:
                raise MalformedResponse(f"response head larger than {MAX_HEAD} bytes")
            self.buffer = buffer
            return b""
        self.buffer = b""
        if end > MAX_HEAD:
            raise MalformedResponse(f"response head larger than {MAX_HEAD} bytes")
        head = parse_head(buffer[:end])
        if 100 <= head.code < 200:
            if head.code == 101:
                raise MalformedResponse("the upstream switched protocols (101), which the proxy does not relay")
            # Interim (100 Continue, 103 Early Hints): the final answer follows.
            exchange.interim += 1
            if exchange.interim > MAX_INTERIM:
                raise MalformedResponse(f"more than {MAX_INTERIM} interim (1xx) responses")
            return buffer[body_start:]
        kind, length, reusable = framing(exchange.method, head)
        rest = buffer[body_start:]
        exchange.head_received(head, reusable, kind, length)
        if exchange.complete:
            # No body (HEAD, 204, 304, Content-Length: 0): done already.
            if rest:
                exchange.reusable = False
            exchange.body_complete()
            return b""
        return rest

    def exchange_over(self, exchange: _Exchange) -> None:
        """The response has been read whole (its body may still be waiting for its reader)."""
        if self.exchange is not exchange:
            return
        self.exchange = None
        # Reading resumes either way: a TLS close waits for the upstream's
        # close_notify, which a paused transport would never read.
        self.transport.resumeProducing()
        if exchange.reusable and exchange.body_sent and not self.closed:
            self.agent.keep(self)
        else:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # type: ignore[assignment]
        self.closed = True
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.connection_lost(reason)
        else:
            self.agent.forget(self)


class _Factory(ClientFactory):
    noisy = False

    def __init__(self, agent: HTTP11Agent, origin: bytes) -> None:
        self.agent = agent
        self.origin = origin

    def buildProtocol(self, addr: Any) -> _Connection:
        return _Connection(self.agent, self.origin)


@implementer(IAgent)
class HTTP11Agent:
    """
    An L{IAgent} with its own keep-alive pool (see the module docstring).

    @param endpoints: makes the endpoint of each origin (TCP or TLS, with
        this agent's TLS identity; in memory in tests).
    """

    def __init__(self, reactor: IReactorTime, endpoints: IAgentEndpointFactory,
                 timeouts: UpstreamTimeouts = UpstreamTimeouts(), max_idle: int = MAX_IDLE_PER_ORIGIN,
                 idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.reactor = reactor
        self.timeouts = timeouts
        self._endpoints = endpoints
        self._max_idle = max_idle
        self._idle_timeout = idle_timeout
        self._idle: dict[bytes, list[_Connection]] = {}
        self._origins: dict[bytes, tuple[Any, _Factory, bytes]] = {}
        self._sweeper: IDelayedCall | None = None
        self._closed = False

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None,
                bodyProducer: IBodyProducer | None = None) -> Deferred[IResponse]:
        try:
            origin, target = split_url(uri)
            if _METHOD.fullmatch(method) is None:
                raise ValueError(f"bad method {method[:20]!r}")
            if _BAD_TARGET.search(target) is not None:
                raise ValueError("request target with a space or control character")
            endpoint, factory, host = self._origin(origin)
        except Exception:
            failed: Deferred[IResponse] = Deferred()
            failed.errback()
            return failed
        if headers is None:
            headers = Headers()
        if not headers.hasHeader(b"host"):
            headers.setRawHeaders(b"Host", [host])
        exchange = _Exchange(self, origin, method, target, headers, bodyProducer)
        self._start(exchange, endpoint, factory)
        return exchange.result

    def _origin(self, origin: bytes) -> tuple[Any, _Factory, bytes]:
        known = self._origins.get(origin)
        if known is None:
            uri = URI.fromBytes(origin + b"/")
            host = b"[" + uri.host + b"]" if b":" in uri.host else uri.host
            if (uri.scheme, uri.port) not in ((b"http", 80), (b"https", 443)):
                host = b"%b:%d" % (host, uri.port)
            if len(self._origins) >= MAX_ORIGINS:
                self._origins.clear()
            known = self._origins[origin] = (self._endpoints.endpointForURI(uri), _Factory(self, origin), host)
        return known

    def _start(self, exchange: _Exchange, endpoint: Any, factory: _Factory, fresh: bool = False) -> None:
        idle = None if fresh else self._idle.get(exchange.origin)
        now = self.reactor.seconds()
        while idle:
            connection = idle.pop()
            if connection.closed:
                continue
            if now - connection.idle_since > self._idle_timeout:
                connection.transport.loseConnection()
                continue
            exchange.reused = True
            exchange.send(connection)
            return
        connecting = exchange.connecting = endpoint.connect(factory)

        def connected(connection: _Connection) -> None:
            exchange.connecting = None
            if exchange.cancelled or exchange.result.called:
                connection.transport.loseConnection()
                return
            exchange.send(connection)

        def failed(reason: Failure) -> None:
            exchange.connecting = None
            # A cancelled caller gets CancelledError (from its Deferred), not
            # the endpoint's own "connecting cancelled".
            if not exchange.result.called and not exchange.cancelled:
                exchange.result.errback(reason)

        connecting.addCallbacks(connected, failed)

    def retry(self, exchange: _Exchange) -> None:
        """Send C{exchange} again, on a new connection."""
        exchange.retried = True
        exchange.reused = False
        exchange.got_bytes = False
        exchange.connection = None
        endpoint, factory, _ = self._origin(exchange.origin)
        self._start(exchange, endpoint, factory, fresh=True)

    def keep(self, connection: _Connection) -> None:
        """C{connection} is done with its exchange and may carry another."""
        if self._closed:
            connection.transport.loseConnection()
            return
        idle = self._idle.setdefault(connection.origin, [])
        if len(idle) >= self._max_idle:
            connection.transport.loseConnection()
            return
        connection.idle_since = self.reactor.seconds()
        idle.append(connection)
        if self._sweeper is None and self._idle_timeout:
            self._sweeper = self.reactor.callLater(self._idle_timeout, self._sweep)

    def forget(self, connection: _Connection) -> None:
        """An idle C{connection} closed."""
        idle = self._idle.get(connection.origin)
        if idle and connection in idle:
            idle.remove(connection)
            if not idle:
                del self._idle[connection.origin]

    def _sweep(self) -> None:
        """Close connections idle for longer than the idle timeout."""
        self._sweeper = None
        now = self.reactor.seconds()
        left = 0
        for origin, idle in list(self._idle.items()):
            for connection in [c for c in idle if now - c.idle_since >= self._idle_timeout]:
                idle.remove(connection)
                connection.transport.loseConnection()
            if not idle:
                del self._idle[origin]
            left += len(idle)
        if left:
            self._sweeper = self.reactor.callLater(self._idle_timeout / 2, self._sweep)

    def idle_connections(self) -> int:
        """Idle connections kept for reuse."""
        return sum(len(idle) for idle in self._idle.values())

    def close(self) -> Deferred[None]:
        """Close the idle connections (those in use finish their exchange, then close)."""
        self._closed = True
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None
        for idle in self._idle.values():
            for connection in idle:
                connection.transport.loseConnection()
        self._idle.clear()
        done: Deferred[None] = Deferred()
        done.callback(None)
        return done

