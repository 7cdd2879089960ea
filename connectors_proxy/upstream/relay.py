# -*- test-case-name: tests.test_memory_relay,tests.test_reflection -*-
"""
The streaming relay: send a client request upstream through
L{twisted.web.client.Agent} with a persistent connection pool, and stream
the response back with backpressure in both directions.

Every protocol (REST, git, OCI) goes through here; what differs between them
(which headers, which URL, which response rewrites) is decided by the
protocol module and passed in.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError, ConnectingCancelledError, DNSLookupError, TimeoutError
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import (
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse

from connectors_proxy import compat
from connectors_proxy.model.credentials import RegoCredentials
from connectors_proxy.server.channel import ProxyRequest
from connectors_proxy.server.errors import ProxyError, bad_gateway
from connectors_proxy.server.headers import (
    client_response_headers,
    same_origin,
    upstream_request_headers,
)
from connectors_proxy.server.routing import Route
from connectors_proxy.tls.upstream import describe_tls_failure, tls_error
from connectors_proxy.upstream.framing import Framing, MalformedResponse
from connectors_proxy.upstream.reflection import DECODABLE, Inflater, Masker, Secrets, secrets_for, textual
from connectors_proxy.upstream.target import Target
from connectors_proxy.upstream.timeouts import UpstreamTimeout

# Response bodies up to this size (with a Content-Length) are relayed
# without backpressure bookkeeping: the most a slow client can pin is this.
SMALL_BODY = 64 * 1024


def forwarded_headers(request: ProxyRequest, origin: bool = True,
                      drop: frozenset[bytes] = frozenset(), route: Route | None = None) -> Headers:
    """
    The client's headers as the upstream gets them, no credentials yet
    (L{upstream_request_headers}).  C{origin=False} leaves out
    C{X-Forwarded-Host} and C{-Proto}, for upstreams that would build URLs
    on them that cannot be mapped back.

    C{X-Forwarded-Host} is only ever C{route.host}: the Connector host name
    the request was routed by.  The client's raw C{Host} is never passed on:
    servers build URLs (Git LFS hrefs, redirects) on it, so a client could
    choose where those point (and where credentials the server puts beside
    them go).
    """
    peer = request.getClientAddress()
    return upstream_request_headers(
        request.requestHeaders,
        getattr(peer, "host", "unknown"),
        route.host if origin and route is not None else None,
        (b"https" if request.isSecure() else b"http") if origin else None,
        drop,
    )


def request_headers(request: ProxyRequest, target: Target) -> Headers:
    """The upstream request headers for C{request}, with the Connector's credentials."""
    headers = forwarded_headers(request, route=target.route)
    credentials = target.credentials
    if isinstance(credentials, RegoCredentials):
        # A class's Rego generator placed them (nothing before it has).
        for name, value in credentials.header_pairs:
            headers.setRawHeaders(name, [value])
    elif credentials is not None:
        headers.setRawHeaders(b"Authorization", [credentials.authorization()])
    return headers


def _upstream_name(target: Target, url: bytes) -> str:
    """The upstream as messages name it: the Connector's address, or the other origin C{url} is on."""
    if same_origin(url.decode("latin-1"), target.connector.address):
        return target.connector.address
    # Another origin (a redirect, blob storage): its query and any
    # user:password@ could carry credentials, and messages reach the client.
    parts = urlsplit(url.decode("latin-1").split("?", 1)[0])
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def describe_failure(reason: Failure, target: Target, url: bytes | None = None) -> str:
    """A one-line explanation of why the upstream (at C{url}) could not be reached."""
    address = target.connector.address if url is None else _upstream_name(target, url)
    inner = reason.value
    if isinstance(inner, (ResponseNeverReceived, ResponseFailed)) and inner.reasons:
        inner = inner.reasons[0].value
        reason = Failure(inner)
    if tls_error(reason) is not None:
        return f"TLS to {address} failed: {describe_tls_failure(reason, urlsplit(address).hostname)}"
    connecting = describe_connect_error(inner, address)
    if connecting is not None:
        return connecting
    if isinstance(inner, MalformedResponse):
        return f"upstream {address} sent a response the proxy cannot relay: {inner}"
    return f"upstream {address} closed the connection without a complete response"


def describe_connect_error(error: BaseException | None, address: str) -> str | None:
    """Why a connection to C{address} could not be made, if C{error} says (C{None}: it does not)."""
    if isinstance(error, DNSLookupError):
        return f"cannot resolve the host of {address}"
    if isinstance(error, (TimeoutError, ConnectingCancelledError)):
        return f"timed out connecting to {address}"
    if isinstance(error, ConnectError):
        return f"cannot connect to {address} ({error.__class__.__name__})"
    return None


def unreachable(reason: Failure, target: Target, url: bytes) -> ProxyError:
    """The 502 for an upstream (at C{url}) that could not be reached: L{describe_failure} says why."""
    return bad_gateway(describe_failure(reason, target, url))


async def send(target: Target, method: bytes, url: bytes, headers: Headers,
               body: IBodyProducer | None, request: ProxyRequest | None = None,
               failed: Callable[[Failure, Target, bytes], ProxyError] = unreachable) -> IResponse:
    """
    Send one request upstream.  A client that goes away while we wait
    cancels it.  Failures to reach the upstream become the L{ProxyError}
    C{failed} makes of them (by default L{unreachable}: a 502 whose message
    says why, naming no credential).
    """
    # The client adds the origin's Host (worked out once per origin) when there is none.
    d = target.agent.request(method, url, headers, body)
    if request is not None:
        cancel = _on_disconnect(request, d.cancel)
    try:
        response: IResponse = await d
    except CancelledError:
        raise ProxyError(499, "CLIENT_CLOSED", "client went away") from None
    except UpstreamTimeout as e:
        # The upstream's fault, not the client's: 504, and the access log says so.
        if request is not None:
            request.fault = e.fault
        raise ProxyError(504, "UPSTREAM_TIMEOUT", f"upstream {_upstream_name(target, url)}: {e}") from None
    except Exception:
        raise failed(Failure(), target, url) from None
    finally:
        if request is not None:
            cancel()
    return response


def _on_disconnect(request: ProxyRequest, action: Callable[[], object]) -> Callable[[], None]:
    """
    Run C{action} if the client disconnects; the returned callable disarms
    it.  A request is watched once (one C{notifyFinish} Deferred, however
    many sends and responses it goes through): each call only replaces the
    action that watch runs.
    """
    if not request.disconnect_watched:
        request.disconnect_watched = True
        request.notifyFinish().addErrback(_client_lost, request)
    request.on_disconnect = action

    def disarm() -> None:
        if request.on_disconnect is action:
            request.on_disconnect = None

    return disarm


def _client_lost(reason: Failure, request: ProxyRequest) -> None:
    action, request.on_disconnect = request.on_disconnect, None
    if action is not None:
        action()


def response_headers(target: Target, response: IResponse, secrets: Secrets) -> Headers:
    """
    Upstream response headers for the client, with C{Location} mapped back,
    and without values that reflect C{secrets} (those of the target's
    credentials: L{secrets_for}, worked out once per response by the caller).
    """
    headers = client_response_headers(response.headers, secrets)
    locations = headers.getRawHeaders(b"location")
    if locations:
        mapped = [loc for loc in (target.to_client(loc) for loc in locations) if not secrets.found_in(loc)]
        if mapped:
            headers.setRawHeaders(b"Location", mapped)
        else:
            headers.removeHeader(b"location")
    links = headers.getRawHeaders(b"link")
    if links:
        # Pagination (RFC 8288) pointing at the upstream, mapped back like Location.
        headers.setRawHeaders(b"Link", [_LINK_TARGET.sub(lambda m: b"<" + target.to_client(m.group(1)) + b">", link)
                                        for link in links])
    return headers


_LINK_TARGET = re.compile(rb"<([^>]*)>")


class _ResponseRelay(Protocol):
    """
    Writes an upstream response body to the client.  The client's channel
    pauses the upstream transport when its send buffer fills, so a slow
    client slows the upstream read instead of filling memory.
    """

    transport: Any  # the upstream connection, an IPushProducer

    def __init__(self, request: ProxyRequest, done: Deferred[int], small: bool = False,
                 masker: Masker | None = None, inflater: Inflater | None = None) -> None:
        self.request = request
        self.done = done
        self.sent = 0
        self.small = small
        # A textual body has reflected credentials masked (decoded first when
        # compressed); a binary one takes the plain dataReceived.
        self.masker = masker
        self.inflater = inflater
        self.corrupt = False
        if inflater is not None:
            self.dataReceived = self._inflate  # type: ignore[method-assign]
        elif masker is not None:
            self.dataReceived = self._mask  # type: ignore[method-assign]

    def connectionMade(self) -> None:
        if self.masker is None and getattr(self.transport, "framing", None) is Framing.CHUNKED:
            # A chunked body the client also gets chunked (HTTP/1.1) can be
            # handed on in its own framing: no decoding and no re-encoding
            # (a git clone's pack comes in many small chunks).  Whether the
            # client's response is chunked is settled when its head is
            # written, so it is written now.
            request = self.request
            if not request.startedWriting and not compat.request_gone(request):
                request.write(b"")
            self.wants_framed = bool(request.chunked)
        if self.small:
            # At most SMALL_BODY bytes will come: nothing to pace, so skip
            # the producer registration (and its pause/resume churn).
            return
        self.request.registerProducer(self.transport, True)

    wants_framed = False

    def dataReceived(self, data: bytes) -> None:
        self.sent += len(data)
        self.request.write(data)

    def framedReceived(self, data: bytes, payload: int) -> None:
        self.sent += payload
        self.request.write_chunks(data, payload)

    def _mask(self, data: bytes) -> None:
        assert self.masker is not None
        out = self.masker.feed(data)
        if out:
            self.sent += len(out)
            self.request.write(out)

    def _inflate(self, data: bytes) -> None:
        assert self.inflater is not None
        if self.corrupt:
            return
        try:
            pieces = self.inflater.feed(data)
        except zlib.error:
            # Cut, as for an upstream that broke off mid-body.
            self.corrupt = True
            self.transport.stopProducing()
            return
        for piece in pieces:
            self._mask(piece)

    def connectionLost(self, reason: Failure = ResponseDone()) -> None:  # type: ignore[assignment]
        # The client may be gone already (Twisted then drops request.channel).
        if self.request.producer is not None and getattr(self.request, "channel", None) is not None:
            self.request.unregisterProducer()
        if self.corrupt:
            self.done.errback(Failure(ResponseFailed([Failure(ValueError("corrupt compressed body"))])))
        elif reason.check(ResponseDone, PotentialDataLoss):
            self._flush()
            self.done.callback(self.sent)
        else:
            self.done.errback(reason)

    def _flush(self) -> None:
        """The body has ended: send what the masker held back."""
        if self.masker is None or self.request.finished:
            return
        if self.inflater is not None:
            try:
                self._mask(self.inflater.flush())
            except zlib.error:
                pass  # a truncated stream: what was decoded has gone out
        out = self.masker.flush()
        if out:
            self.sent += len(out)
            self.request.write(out)


def _content_codings(response: IResponse) -> list[bytes]:
    """The upstream's C{Content-Encoding}s, C{identity} left out."""
    return [c for c in (c.strip().lower() for v in response.headers.getRawHeaders(b"content-encoding", [])
                        for c in v.split(b",")) if c and c != b"identity"]


async def stream_response(request: ProxyRequest, response: IResponse, headers: Headers,
                          secrets: Secrets, code: int | None = None) -> int:
    """
    Send C{response} to the client with C{headers}, streaming its body.
    Fires with the number of body bytes relayed.  If the client goes away,
    the upstream response is abandoned (its connection closed).

    C{secrets} (those of the target's credentials: L{secrets_for})
    reflected in the status phrase, in a textual body or in any error body
    are masked as the body streams; a compressed one is decoded to be
    masked (a C{Content-Encoding} the proxy cannot decode is a 502).
    """
    status = code or response.code
    phrase = response.phrase
    masker: Masker | None = None
    inflater: Inflater | None = None
    if secrets:
        if secrets.found_in(phrase):
            phrase = secrets.mask(phrase)
        content_type = response.headers.getRawHeaders(b"content-type", [None])[0]
        bodiless = request.method == b"HEAD" or response.code in (204, 304)
        if not bodiless and (status >= 400 or textual(content_type)):
            masker = secrets.masker(error=status >= 400)
            codings = _content_codings(response)
            if codings:
                if len(codings) > 1 or codings[0] not in DECODABLE:
                    await discard(response)
                    raise bad_gateway(
                        f"the upstream answered with Content-Encoding {b', '.join(codings).decode('latin-1')}, "
                        "which the proxy cannot decode to check for reflected credentials"
                    )
                inflater = Inflater(codings[0])
                headers.removeHeader(b"content-encoding")
    request.setResponseCode(status, phrase)
    # The relay's headers become the response's (validated once, when they
    # were built), keeping what was already set on the request (Server, Date).
    for name, values in request.responseHeaders.getAllRawHeaders():
        if not headers.hasHeader(name):
            headers.setRawHeaders(name, list(values))
    request.responseHeaders = headers
    # A decoded body has a length known only at its end: no Content-Length.
    if inflater is None and (request.method == b"HEAD" or response.code == 304):
        # No body follows, but the client wants the size of the one it would get.
        length_header = response.headers.getRawHeaders(b"content-length")
        if length_header:
            request.responseHeaders.setRawHeaders(b"Content-Length", length_header[:1])
    elif inflater is None and isinstance(response.length, int):
        # Masking keeps the length: a secret becomes as many "*".
        request.responseHeaders.setRawHeaders(b"Content-Length", [str(response.length).encode()])
    done: Deferred[int] = Deferred()
    length = response.length
    relay = _ResponseRelay(request, done, small=inflater is None and isinstance(length, int) and length <= SMALL_BODY,
                           masker=masker, inflater=inflater)
    response.deliverBody(relay)
    disarm = _on_disconnect(request, lambda: relay.transport and relay.transport.stopProducing())
    try:
        sent = await done
    except Exception as e:
        # The upstream broke off mid-body: the client must not mistake the
        # truncated body for a complete one, so the connection is cut.
        if isinstance(e, UpstreamTimeout):
            request.fault = e.fault
        disarm()
        if not request.finished and request.channel is not None and not compat.request_gone(request):
            # Not the client's doing (its leaving stops the upstream too).
            request.truncated = "upstream"
            request.channel.transport.abortConnection()
        return relay.sent
    disarm()
    if not request.finished and not compat.request_gone(request):
        request.finish()
    return sent


async def read_body(response: IResponse, limit: int) -> bytes:
    """
    Read a small response body (JSON the proxy rewrites: token answers, LFS
    batch responses, tag lists).  A body over C{limit} bytes is an error:
    the proxy never buffers large bodies.
    """
    chunks: list[bytes] = []
    done: Deferred[None] = Deferred()

    class Collect(Protocol):
        transport: Any
        size = 0

        def dataReceived(self, data: bytes) -> None:
            self.size += len(data)
            if self.size > limit:
                self.transport.stopProducing()
                return
            chunks.append(data)

        def connectionLost(self, reason: Failure = ResponseDone()) -> None:  # type: ignore[assignment]
            if self.size > limit:
                done.errback(bad_gateway(f"upstream response larger than {limit} bytes"))
            elif reason.check(ResponseDone, PotentialDataLoss):
                done.callback(None)
            else:
                done.errback(bad_gateway("upstream closed the connection mid-response"))

    response.deliverBody(Collect())
    await done
    return b"".join(chunks)


# A body the proxy reads only to reuse the connection (an error page).
DISCARD_LIMIT = 64 * 1024


async def discard(response: IResponse) -> None:
    """Read and drop a small body so its connection can be reused."""
    try:
        await read_body(response, DISCARD_LIMIT)
    except ProxyError:
        pass


def send_bytes(request: ProxyRequest, code: int, headers: Mapping[bytes, bytes] | Headers,
               body: bytes) -> None:
    """Answer the client with a small body the proxy made itself."""
    request.setResponseCode(code)
    items = headers.getAllRawHeaders() if isinstance(headers, Headers) else ((k, [v]) for k, v in headers.items())
    for name, values in items:
        request.responseHeaders.setRawHeaders(name, list(values))
    request.responseHeaders.setRawHeaders(b"Content-Length", [str(len(body)).encode()])
    if body:
        request.write(body)
    if not request.finished and not compat.request_gone(request):
        request.finish()


def send_error(request: ProxyRequest, status: int, headers: Headers, body: bytes) -> None:
    """
    Answer with an error the proxy made (C{status}, C{headers}, C{body}),
    or, when the response has already started, cut the connection so the
    client sees a failure rather than a truncated success.
    """
    if request.finished or compat.request_gone(request):
        return
    if request.startedWriting:
        request.truncated = request.truncated or "proxy"
        request.channel.transport.abortConnection()
        return
    send_bytes(request, status, headers, body)


async def proxy(request: ProxyRequest, target: Target, rest: bytes | None = None) -> int:
    """
    The whole relay for one request: credentials injected, body streamed up,
    response streamed down with C{Location} mapped back.  Returns the number
    of response body bytes.
    """
    response = await send(target, request.method, target.upstream_url(rest),
                          request_headers(request, target), request.body, request)
    return await relay_response(request, target, response)


async def relay_response(request: ProxyRequest, target: Target, response: IResponse) -> int:
    """
    Stream C{response} (from C{target}'s upstream) to the client: headers
    mapped back and reflected secrets dropped, the body masked where it is
    text.  Returns the number of response body bytes.
    """
    secrets = secrets_for(target.credentials)
    return await stream_response(request, response, response_headers(target, response, secrets), secrets)
