# -*- test-case-name: tests.test_operator -*-
"""
Upstream timeouts: an upstream that accepts a request and never answers,
or that stops in the middle of a body, must not hold a client, a
per-Connector slot and an upstream connection forever (SPEC section 10).

L{TimedAgent} wraps the L{IAgent} of each upstream pool
(L{connectors_proxy.upstream.agents.Agents}), so every upstream request
(REST, git, OCI blobs, token realms) gets both timeouts:

  - B{headers} (C{--upstream-timeout}): the response headers must arrive
    this long after the request was sent, its body included (a 1 GiB push
    takes as long as it takes; the clock starts when its last byte is
    written).  Past it the request is cancelled (its connection closed) and
    fails with L{UpstreamTimeout}, which the relay answers with C{504}.
  - B{idle} (C{--upstream-idle-timeout}): once the body is being read, no
    byte for this long cuts it; the body's reader sees L{UpstreamTimeout}
    as the reason its body ended.  Time during which the proxy itself has
    paused the upstream (a slow client: backpressure) does not count.

Only public Twisted interfaces are used: the wrapped agent, body producer,
response and protocol are all seen through C{IAgent}, C{IBodyProducer},
C{IResponse} and C{IProtocol}.
"""

from __future__ import annotations

from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

DEFAULT_HEADERS_TIMEOUT = 60.0
DEFAULT_IDLE_TIMEOUT = 60.0

# What the access log's "fault" field says for each.
HEADERS_FAULT = "upstream-timeout"
IDLE_FAULT = "upstream-idle-timeout"


@frozen
class UpstreamTimeouts:
    """
    @ivar headers: seconds from the end of the request to the response
        headers (C{0}: no limit).
    @ivar idle: seconds without a byte of response body (C{0}: no limit).
    """

    headers: float = DEFAULT_HEADERS_TIMEOUT
    idle: float = DEFAULT_IDLE_TIMEOUT


class UpstreamTimeout(Exception):
    """
    The upstream took too long: no response headers (C{phase} C{"headers"})
    or no body byte (C{"body"}) within C{seconds}.
    """

    def __init__(self, phase: str, seconds: float) -> None:
        super().__init__(phase, seconds)
        self.phase = phase
        self.seconds = seconds

    @property
    def fault(self) -> str:
        """The access log's name for it."""
        return HEADERS_FAULT if self.phase == "headers" else IDLE_FAULT

    def __str__(self) -> str:
        if self.phase == "headers":
            return f"no response within {self.seconds:g}s (--upstream-timeout)"
        return f"no data for {self.seconds:g}s in the middle of the response body (--upstream-idle-timeout)"


@implementer(IAgent)
class TimedAgent:
    """An L{IAgent} whose requests and response bodies time out (see the module docstring)."""

    def __init__(self, agent: IAgent, clock: IReactorTime, timeouts: UpstreamTimeouts) -> None:
        self._agent = agent
        self._clock = clock
        self._timeouts = timeouts

    def request(self, method: bytes, uri: bytes, headers: Any = None,
                bodyProducer: IBodyProducer | None = None) -> Deferred[IResponse]:
        timeouts = self._timeouts
        if not timeouts.headers and not timeouts.idle:
            return self._agent.request(method, uri, headers, bodyProducer)
        watch = _HeadersWatch(self._clock, timeouts)
        if bodyProducer is not None and timeouts.headers:
            bodyProducer = _SentBody(bodyProducer, watch.start)
        inner = self._agent.request(method, uri, headers, bodyProducer)
        return watch.follow(inner, start=bodyProducer is None or not timeouts.headers)


class _HeadersWatch:
    """The headers timer of one request, and the Deferred its caller gets."""

    def __init__(self, clock: IReactorTime, timeouts: UpstreamTimeouts) -> None:
        self._clock = clock
        self._timeouts = timeouts
        self._timer: IDelayedCall | None = None
        self._inner: Deferred[IResponse] | None = None
        self._done = False
        self._fired = False

    def follow(self, inner: Deferred[IResponse], start: bool) -> Deferred[IResponse]:
        self._inner = inner
        # Cancelling ours (a client that went away) cancels the request.
        result: Deferred[IResponse] = Deferred(lambda _: inner.cancel())

        def answered(response: IResponse) -> None:
            self._stop()
            if not result.called:
                wrapped: IResponse = _TimedResponse(response, self._clock, self._timeouts.idle) \
                    if self._timeouts.idle else response
                result.callback(wrapped)

        def failed(reason: Failure) -> None:
            self._stop()
            if result.called:
                return
            if self._fired:
                result.errback(Failure(UpstreamTimeout("headers", self._timeouts.headers)))
            else:
                result.errback(reason)

        inner.addCallbacks(answered, failed)
        if start:
            self.start()
        return result

    def start(self) -> None:
        """The request is out (its body included): the upstream's turn."""
        if self._done or self._timer is not None or not self._timeouts.headers:
            return
        self._timer = self._clock.callLater(self._timeouts.headers, self._expire)

    def _expire(self) -> None:
        self._timer = None
        if self._done or self._inner is None:
            return
        self._fired = True
        # Twisted closes the connection of a cancelled request.
        self._inner.cancel()

    def _stop(self) -> None:
        self._done = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


@implementer(IBodyProducer)
class _SentBody:
    """A request body that says when its last byte has been written."""

    def __init__(self, body: IBodyProducer, sent: Any) -> None:
        self._body = body
        self._sent = sent
        self.length = body.length

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        d: Deferred[None] = self._body.startProducing(consumer)

        def written(result: None) -> None:
            self._sent()
            return result

        d.addCallback(written)
        return d

    def pauseProducing(self) -> None:
        self._body.pauseProducing()

    def resumeProducing(self) -> None:
        self._body.resumeProducing()

    def stopProducing(self) -> None:
        self._body.stopProducing()


@implementer(IResponse)
class _TimedResponse:
    """An L{IResponse} whose body delivery is cut after C{idle} seconds without a byte."""

    def __init__(self, response: IResponse, clock: IReactorTime, idle: float) -> None:
        self._response = response
        self._clock = clock
        self._idle = idle

    def __getattr__(self, name: str) -> Any:
        # version, code, phrase, headers, length, request, previousResponse...
        return getattr(self._response, name)

    def deliverBody(self, protocol: Any) -> None:
        self._response.deliverBody(_IdleWatch(protocol, self._clock, self._idle))

    def setPreviousResponse(self, response: IResponse) -> None:
        self._response.setPreviousResponse(response)


@implementer(IPushProducer)
class _IdleWatch(Protocol):
    """
    Stands between a response body and its reader: counts the time since
    the last byte (while not paused by the reader), and cuts the body when
    it exceeds the limit.  To the reader it is the transport (so its
    pauses are seen); to the response it is the protocol.

    Per chunk it only notes the time: the timer is moved when it fires, not
    on every read.
    """

    def __init__(self, reader: Any, clock: IReactorTime, idle: float) -> None:
        self._reader = reader
        self._clock = clock
        self._idle = idle
        self._last = 0.0
        self._paused = False
        self._timer: IDelayedCall | None = None
        self._expired = False
        self._upstream: Any = None

    # Protocol: what the response calls.

    def makeConnection(self, transport: Any) -> None:
        self._upstream = transport
        self._last = self._clock.seconds()
        self._timer = self._clock.callLater(self._idle, self._check)
        self._reader.makeConnection(self)

    def dataReceived(self, data: bytes) -> None:
        self._last = self._clock.seconds()
        self._reader.dataReceived(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # type: ignore[assignment]
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._expired:
            reason = Failure(UpstreamTimeout("body", self._idle))
        self._reader.connectionLost(reason)

    # IPushProducer: what the reader (and the client channel it registers
    # us with) calls.

    def pauseProducing(self) -> None:
        self._paused = True
        self._upstream.pauseProducing()

    def resumeProducing(self) -> None:
        # A pause is the proxy's doing, not the upstream's: count from now.
        self._paused = False
        self._last = self._clock.seconds()
        self._upstream.resumeProducing()

    def stopProducing(self) -> None:
        self._upstream.stopProducing()

    def _check(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        if self._paused:
            self._timer = self._clock.callLater(self._idle, self._check)
            return
        remaining = self._last + self._idle - now
        if remaining > 0:
            self._timer = self._clock.callLater(remaining, self._check)
            return
        self._expired = True
        self._upstream.stopProducing()
