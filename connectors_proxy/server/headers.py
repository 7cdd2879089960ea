# -*- test-case-name: tests.test_headers -*-
"""
Header rewriting between client and upstream, as pure functions over
L{twisted.web.http_headers.Headers}.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from twisted.web.http_headers import Headers

from connectors_proxy import compat
from connectors_proxy.upstream.reflection import NO_SECRETS, Secrets, drop_reflected

# RFC 9110 section 7.6.1 connection-specific fields, plus the proxy's own
# authentication fields, which are for this hop only.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"proxy-authorization", b"proxy-authenticate",
})

# Never copied to the upstream: the client's own credentials (they are a
# Kubernetes token, not the tool's), and the framing Agent writes itself.
_NOT_UPSTREAM = frozenset({b"authorization", b"host", b"content-length", b"expect"})

# What a client says of the origin it reached is never passed on as is: the
# proxy says it (or, for registries that build URLs on it, nothing).
_FORWARDED_ORIGIN = frozenset({b"x-forwarded-host", b"x-forwarded-proto"})

# Never copied back to the client: framing Twisted writes itself, and
# upstream session cookies: a session opened with the Connector's
# credentials is a credential too, and would outlive the client's token.
_NOT_DOWNSTREAM = frozenset({b"content-length", b"date", b"server", b"set-cookie", b"set-cookie2"})


def _connection_tokens(headers: Headers) -> set[bytes]:
    tokens: set[bytes] = set()
    for value in headers.getRawHeaders(b"connection", []):
        tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


# What each direction drops, hop-by-hop fields included: built once, not per request.
_UPSTREAM_DROPPED = HOP_BY_HOP | _NOT_UPSTREAM | _FORWARDED_ORIGIN
_DOWNSTREAM_DROPPED = HOP_BY_HOP | _NOT_DOWNSTREAM


def _copy(headers: Headers, dropped: frozenset[bytes]) -> Headers:
    """C{headers} without the names in C{dropped} (which holds L{HOP_BY_HOP}) or nominated by C{Connection}."""
    nominated = _connection_tokens(headers)
    if nominated:
        dropped = dropped | nominated
    out = Headers()
    # Values of a Headers are valid already: copied as they are, not set
    # again one by one (which encodes each name and sanitizes each value).
    kept = compat.raw_headers(out)
    for name, values in compat.raw_headers(headers).items():
        if name.lower() not in dropped:
            kept[name] = list(values)
    return out


_CANONICAL: dict[bytes, bytes] = {}
_MAX_CANONICAL = 4096


def canonical_name(name: bytes) -> bytes:
    """
    The name under which L{Headers} keeps the header C{name} (in any
    case), as it would write it: C{b"Content-Type"}, C{b"WWW-Authenticate"}.
    Cached: a response's header names are few and recur.
    """
    canonical = _CANONICAL.get(name)
    if canonical is None:
        probe = Headers()
        probe.addRawHeader(name, b"")
        canonical = next(iter(probe.getAllRawHeaders()))[0]
        if len(_CANONICAL) < _MAX_CANONICAL:
            _CANONICAL[name] = canonical
    return canonical


def upstream_request_headers(client: Headers, client_address: str, client_host: bytes | None,
                             client_scheme: bytes | None, drop: frozenset[bytes] = frozenset()) -> Headers:
    """
    The headers to send upstream for a client request, before credentials
    are added: hop-by-hop fields, the client's Authorization and
    Proxy-Authorization, Host, Content-Length and the names in C{drop}
    removed; repeated headers kept in order; C{X-Forwarded-For} extended,
    C{X-Forwarded-Proto} and C{X-Forwarded-Host} set when C{client_scheme}
    and C{client_host} are given (and replaced, not passed on, when not).
    """
    out = _copy(client, _UPSTREAM_DROPPED | drop if drop else _UPSTREAM_DROPPED)
    forwarded_for = b", ".join(client.getRawHeaders(b"x-forwarded-for", []))
    addr = client_address.encode("ascii", "replace")
    out.setRawHeaders(b"X-Forwarded-For", [forwarded_for + b", " + addr if forwarded_for else addr])
    if client_scheme:
        out.setRawHeaders(b"X-Forwarded-Proto", [client_scheme])
    if client_host:
        out.setRawHeaders(b"X-Forwarded-Host", [client_host])
    return out


def client_response_headers(upstream: Headers, secrets: Secrets = NO_SECRETS) -> Headers:
    """
    The upstream response's headers as the client gets them: hop-by-hop
    fields dropped, and values that contain one of C{secrets} (reflected
    credentials, README.md "Reflected credentials"); the rest kept (repeated ones too).
    C{Location} is rewritten separately, by L{rewrite_location}.

    The names the upstream's C{Connection} header nominates never get
    here: the upstream client drops them with that header
    (L{connectors_proxy.upstream.client}).
    """
    out = _copy(upstream, _DOWNSTREAM_DROPPED)
    drop_reflected(out, secrets)
    return out


def rewrite_location(location: bytes, upstream_base: bytes, client_base: bytes,
                     client_prefix: bytes) -> bytes:
    """
    Map a C{Location} (or any URL the upstream hands out) that points at the
    upstream back to the address the client used.

    @param upstream_base: the Connector's address, C{scheme://host[:port][/prefix]},
        without a trailing slash.
    @param client_base: C{scheme://host[:port]} as the client reached the proxy.
    @param client_prefix: the path the client put before the upstream path
        (C{b""} in host mode, C{/namespaces/NS/connectors/NAME} in path mode).

    URLs that point elsewhere are returned unchanged.
    """
    scheme_end = upstream_base.find(b"://") + 3
    path_start = upstream_base.find(b"/", scheme_end)
    origin = upstream_base if path_start < 0 else upstream_base[:path_start]
    prefix = b"" if path_start < 0 else upstream_base[path_start:]

    if location.startswith(b"//"):
        location = upstream_base.split(b":", 1)[0] + b":" + location
    if location.lower().startswith(origin.lower() + b"/") or location.lower() == origin.lower():
        path = location[len(origin):] or b"/"
        absolute = True
    elif location.startswith(b"/"):
        path = location
        absolute = False
    else:
        return location
    if prefix and not (path == prefix or path.startswith(prefix + b"/") or path.startswith(prefix + b"?")):
        # Points above the Connector's path prefix: the client cannot reach
        # it through this Connector, so leave it as the upstream said.
        return location
    mapped = client_prefix + path[len(prefix):]
    if not mapped.startswith(b"/"):
        mapped = b"/" + mapped
    return client_base + mapped if absolute else mapped


def origin(url: str) -> tuple[str, str, int] | None:
    """C{(scheme, host, port)} of an absolute URL, default ports filled in; C{None} if it has none."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if not parts.hostname or scheme not in ("http", "https"):
        return None
    return scheme, parts.hostname.lower(), port or (443 if scheme == "https" else 80)


def same_origin(a: str, b: str) -> bool:
    """Whether two absolute URLs name the same scheme, host and port."""
    first = origin(a)
    return first is not None and first == origin(b)
