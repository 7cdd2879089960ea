# -*- test-case-name: tests.test_rego -*-
"""
Where a ConnectorClass's Rego hooks (L{connectors_proxy.auth.rego}) meet a
request: the C{input.request} each policy sees, built from the request (and
only as much of it as the policy reads), and what their answers change
before the request goes upstream.

 - L{extract}: the client's token where the class's C{authExtractor} finds
   it (a C{Private-Token} header, a query parameter, a JSON body field).
   The header, parameter or field that carried it is removed: a client's
   token never reaches the upstream, and no log line shows it.
 - L{generate}: the Connector's credentials where the class's C{generator}
   places them (headers in L{connectors_proxy.upstream.relay.request_headers},
   query parameters in L{Target.upstream_url}, JSON body fields here).

A request body is read only for a policy that reads C{input.request.body},
or for a generator that places credentials in the body, and then at most
L{BODY_LIMIT} bytes of it (a larger one is refused with 413): everything
else streams, as for any class.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs, unquote, unquote_plus, urlsplit

from attrs import evolve
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from zope.interface import implementer

from connectors_proxy.auth.identity import Presented
from connectors_proxy.auth.rego import HookFailed, Reads, RegoHooks, reads_of
from connectors_proxy.model.credentials import RegoCredentials
from connectors_proxy.model.objects import ConnectorClass
from connectors_proxy.server import errors
from connectors_proxy.server.channel import ProxyRequest, RequestBody
from connectors_proxy.server.routing import Route
from connectors_proxy.upstream.bodies import BytesProducer
from connectors_proxy.upstream.relay import forwarded_headers
from connectors_proxy.upstream.target import Target

# The most of a request body the proxy reads for a hook.
BODY_LIMIT = 64 * 1024

_TOKEN_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_ABSENT = object()


# -- input.request -------------------------------------------------------------


def canonical_header(name: str) -> str:
    """
    Go's C{textproto.CanonicalMIMEHeaderKey}: C{private-token} ->
    C{Private-Token}; a name with characters a header name may not hold
    is left as it is.
    """
    if not _TOKEN_NAME.match(name):
        return name
    out = []
    upper = True
    for c in name:
        out.append(c.upper() if upper and c.isascii() else c.lower() if c.isascii() else c)
        upper = c == "-"
    return "".join(out)


def header_map(headers: Headers, only: frozenset[str] | None = None) -> dict[str, list[str]]:
    """
    Headers as Go's C{http.Header} holds them: canonical names, lists of
    values, no C{Host}; only those named C{only} when given.
    """
    out: dict[str, list[str]] = {}
    for name, values in headers.getAllRawHeaders():
        key = canonical_header(name.decode("latin-1"))
        if key == "Host" or (only is not None and key not in only):
            continue
        out.setdefault(key, []).extend(v.decode("latin-1") for v in values)
    return out


def query_map(query: bytes, only: frozenset[str] | None = None) -> dict[str, list[str]]:
    """
    A query string as Go's C{url.Values}: names to lists of values, blank
    values kept; only those named C{only} when given.
    """
    parsed = parse_qs(query.decode("latin-1"), keep_blank_values=True, encoding="utf-8", errors="replace")
    return parsed if only is None else {k: v for k, v in parsed.items() if k in only}


def _json_body(raw: bytes) -> Any:
    """The body's JSON value, or L{_ABSENT} when it is empty or not JSON."""
    if not raw.strip():
        return _ABSENT
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return _ABSENT


def _request_input(method: bytes, target: bytes, host: str, headers: Headers, reads: Reads,
                   body: Any) -> dict[str, Any]:
    """C{input.request}: what C{reads} says the policy may read, and nothing else."""
    path, _, query = target.partition(b"?")
    given: dict[str, Any] = {}
    if "method" in reads:
        given["method"] = method.decode("latin-1")
    if "path" in reads:
        given["path"] = unquote(path.decode("latin-1"), errors="replace")
    if "host" in reads:
        given["host"] = host
    if "headers" in reads:
        given["headers"] = header_map(headers, reads.headers)
    if "query" in reads:
        given["query"] = query_map(query, reads.query)
    if "body" in reads and body is not _ABSENT:
        given["body"] = body
    return given


# -- bodies --------------------------------------------------------------------


class BufferedBody(BytesProducer, RequestBody):
    """
    A request body the proxy has read whole (at most L{BODY_LIMIT}), in place
    of the streaming one: it can be sent upstream, as often as needed.
    """

    def __init__(self, request: ProxyRequest, data: bytes, received: int) -> None:
        RequestBody.__init__(self, request, len(data))
        BytesProducer.__init__(self, data)
        self.received = received
        self._complete = True

    def data_received(self, data: bytes) -> None:
        pass

    def all_received(self) -> None:
        pass


@implementer(IConsumer)
class _Collect:
    def __init__(self, limit: int, over: Any) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.limit = limit
        self.over = over

    def write(self, data: bytes) -> None:
        if self.size > self.limit:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.over()
            return
        self.chunks.append(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


def _too_large(class_name: str, limit: int) -> errors.ProxyError:
    return errors.ProxyError(413, "TOO_LARGE",
                             f"ConnectorClass {class_name} reads the request body for its Rego hooks; "
                             f"bodies over {limit // 1024} KiB are refused")


async def buffered_body(request: ProxyRequest, class_name: str, limit: int = BODY_LIMIT) -> bytes:
    """
    The whole request body (C{b""} when there is none), read once and then
    kept as the request's L{BufferedBody}; over C{limit} bytes a 413.
    """
    body = request.body
    if body is None:
        return b""
    if isinstance(body, BufferedBody):
        return body.data
    if isinstance(body.length, int) and body.length > limit:
        raise _too_large(class_name, limit)
    outcome: Deferred[bytes] = Deferred()

    def settle(result: bytes | Failure) -> None:
        if outcome.called:
            return
        if isinstance(result, bytes):
            outcome.callback(result)
        else:
            outcome.errback(result)

    def over() -> None:
        # Reading stops; the connection closes after the answer, since the
        # rest of the body was never read.
        body.stopProducing()
        settle(Failure(_too_large(class_name, limit)))

    collect = _Collect(limit, over)
    request.notifyFinish().addErrback(
        lambda f: settle(Failure(errors.ProxyError(499, "CLIENT_CLOSED", "client went away"))))
    body.startProducing(collect).addCallbacks(lambda _: settle(b"".join(collect.chunks)), settle)
    data = await outcome
    request.body = BufferedBody(request, data, body.received)
    return data


def _replace_body(request: ProxyRequest, data: bytes) -> None:
    received = request.body.received if request.body is not None else 0
    request.body = BufferedBody(request, data, received)
    request.requestHeaders.setRawHeaders(b"Content-Length", [str(len(data)).encode("ascii")])
    request.requestHeaders.removeHeader(b"Transfer-Encoding")


# -- the extractor -------------------------------------------------------------


def _carries(value: bytes, token: bytes) -> bool:
    """
    Whether a header value carries the token: alone, after a scheme
    (C{Bearer T}), or anywhere in it when the token is long enough not to
    turn up by chance (a ServiceAccount token is a JWT).
    """
    words = value.split()
    return bool(words) and (value.strip() == token or words[-1] == token or (len(token) >= 16 and token in value))


def _without_parameter(target: bytes, token: str) -> bytes:
    """C{target} (path and query) without the query parameters whose value is C{token}."""
    path, sep, query = target.partition(b"?")
    if not sep:
        return target
    kept = [item for item in query.split(b"&")
            if unquote_plus(item.partition(b"=")[2].decode("latin-1"), encoding="utf-8") != token]
    return path + (b"?" + b"&".join(kept) if any(kept) else b"")


def _without_value(doc: Any, token: str) -> Any:
    """A JSON value without the object members and array items that are C{token}."""
    if isinstance(doc, dict):
        return {k: _without_value(v, token) for k, v in doc.items() if v != token}
    if isinstance(doc, list):
        return [_without_value(v, token) for v in doc if v != token]
    return doc


def strip_token(request: ProxyRequest, r: Route, token: str, body: Any) -> Route:
    """
    Remove the extracted C{token} from the request: from its headers, its
    query (in C{request.uri}, for the access log, and in the route, for the
    upstream) and its JSON body.  Returns the route without it.
    """
    raw = token.encode("utf-8")
    headers = request.requestHeaders
    for name, values in list(headers.getAllRawHeaders()):
        kept = [v for v in values if not _carries(v, raw)]
        if len(kept) != len(values):
            if kept:
                headers.setRawHeaders(name, kept)
            else:
                headers.removeHeader(name)
    if b"?" in request.uri:
        uri = _without_parameter(request.uri, token)
        if uri != request.uri:
            request.uri = uri
            r = evolve(r, rest=_without_parameter(r.rest, token))
    if body is not _ABSENT:
        cleaned = _without_value(body, token)
        if cleaned != body:
            _replace_body(request, json.dumps(cleaned, separators=(",", ":")).encode("utf-8"))
    return r


async def extract(hooks: RegoHooks, request: ProxyRequest, connector_class: ConnectorClass, r: Route,
                  presented: Presented | None) -> tuple[Presented | None, Route]:
    """
    What the client presented, once the class's C{authExtractor} has looked:
    its token when it finds one (the Connectors listed in a
    C{Proxy-Authorization} kept), else C{presented} (Basic or Bearer, or
    nothing: 401).  A policy that fails is a 503 naming the class.
    """
    policy = connector_class.extractor
    assert policy is not None
    reads = reads_of(policy)
    body: Any = _ABSENT
    if "body" in reads:
        body = _json_body(await buffered_body(request, connector_class.name))
    given = _request_input(request.method, request.uri, (request.getHeader(b"host") or b"").decode("latin-1"),
                           request.requestHeaders, reads, body)
    try:
        token = await hooks.extract(connector_class.name, policy, given)
    except HookFailed as e:
        raise errors.unavailable(e.message) from None
    if token is None:
        return presented, r
    r = strip_token(request, r, token, body)
    return Presented(token, presented.listed if presented is not None else ()), r


# -- the generator -------------------------------------------------------------


def place_in_body(raw: bytes, pairs: tuple[tuple[str, str], ...], class_name: str) -> bytes:
    """A JSON object body with C{pairs} (name, JSON text) set; an empty body becomes C{{}} first."""
    doc: Any = {} if not raw.strip() else _json_body(raw)
    if not isinstance(doc, dict):
        raise errors.ProxyError(415, "UNSUPPORTED_MEDIA_TYPE",
                                f"ConnectorClass {class_name} places credentials in a JSON body, "
                                "and this request's body is not a JSON object")
    for name, value in pairs:
        doc[name] = json.loads(value)
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")


async def generate(hooks: RegoHooks, request: ProxyRequest, target: Target) -> Target:
    """
    C{target} with its credentials placed by its class's generator (as it
    is when the class has none for the Connector's auth type).  A policy
    that fails is a 503 naming the class.
    """
    credentials = target.credentials
    if not isinstance(credentials, RegoCredentials):
        return target
    body: Any = _ABSENT
    if "body" in reads_of(credentials.generator):
        body = _json_body(await buffered_body(request, credentials.class_name))
    upstream = target.upstream_base + target.route.rest

    def request_input(wanted: Reads) -> Mapping[str, Any]:
        parts = urlsplit(upstream)
        headers = forwarded_headers(request, route=target.route) if "headers" in wanted else Headers()
        return _request_input(request.method, upstream[len(parts.scheme) + 3 + len(parts.netloc):] or b"/",
                              parts.netloc.decode("latin-1"), headers, wanted, body)

    try:
        placed = await hooks.generate(credentials, request_input)
    except HookFailed as e:
        raise errors.unavailable(e.message) from None
    placement = placed.placement
    if placement is not None and placement.position == "body":
        raw = await buffered_body(request, credentials.class_name)
        _replace_body(request, place_in_body(raw, placement.pairs, credentials.class_name))
        if placement.content_type or not request.requestHeaders.hasHeader(b"content-type"):
            content_type = placement.content_type or "application/json"
            request.requestHeaders.setRawHeaders(b"Content-Type", [content_type.encode("utf-8")])
    return evolve(target, credentials=placed)
