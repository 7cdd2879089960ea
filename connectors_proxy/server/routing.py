# -*- test-case-name: tests.test_routing -*-
"""
Where a request is routed: which Connector it names, and what part of the
request target goes to the upstream.  Pure functions over bytes.

A request names its Connector by host (C{c-NAME.NS.svc.CLUSTER-DOMAIN},
C{c-NAME.NS.svc}, C{c-NAME.NS}; in the Host header or an absolute-form
target) or by path (C{/namespaces/NS/connectors/NAME/...}; for OCI clients,
whose paths start with C{/v2/}, C{/v2/namespaces/NS/connectors/NAME/REPO...}).
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import unquote_to_bytes, urlsplit

from attrs import evolve, field, frozen

# A DNS-1123 label: what a namespace or a host-routable Connector name is.
_LABEL = rb"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_PATH_ROUTE = re.compile(rb"^/namespaces/(" + _LABEL + rb")/connectors/(" + _LABEL + rb")(/.*)?$", re.S)
_OCI_PATH_ROUTE = re.compile(
    rb"^/v2/namespaces/(" + _LABEL + rb")/connectors/(" + _LABEL + rb")(/.*)?$", re.S
)
_HOST_ROUTE = re.compile(rb"^c-(" + _LABEL + rb")\.(" + _LABEL + rb")$")


class BadTarget(ValueError):
    """The request target cannot be served safely (a 400 for the client)."""


@frozen
class Route:
    """
    What a request addresses.

    @ivar namespace: the Connector's namespace, or C{None} when the request
        names no Connector (an OCI C{/v2/} ping in path mode, a forward-proxy
        request for some origin, or nothing at all).
    @ivar rest: the path and query to append to the Connector's address,
        byte for byte as the client sent them.
    @ivar client_prefix: the path the client put in front of C{rest}; upstream
        paths are mapped back under it (C{b""} in host mode).
    @ivar oci_path: C{True} for OCI path mode (C{rest} is then C{/v2/REPO...}).
    @ivar origin: for absolute-form targets whose host is not a Connector host
        (forward-proxy use), the target's C{scheme://host[:port]}.
    @ivar host: for requests routed by a Connector host name (C{Host} or an
        absolute-form target), that name as the client wrote it, without a
        trailing dot, with the port only when it is a number.  The only host
        the proxy ever passes on as C{X-Forwarded-Host}: a raw client C{Host}
        is never passed on, since upstreams build URLs on it.
    """

    namespace: str | None
    name: str | None
    rest: bytes
    client_prefix: bytes = b""
    oci_path: bool = False
    origin: bytes | None = None
    # Not part of what is addressed: routes compare equal whichever spelling
    # of the Connector's host name named them.
    host: bytes | None = field(default=None, eq=False)

    @property
    def names_connector(self) -> bool:
        return self.namespace is not None and self.name is not None


def split_target(target: bytes) -> tuple[bytes | None, bytes]:
    """
    Split a request target into (absolute-form origin or C{None}, path+query).

    C{b"http://h:1/a?b"} gives C{(b"http://h:1", b"/a?b")}; C{b"/a"} gives
    C{(None, b"/a")}.
    """
    lower = target[:8].lower()
    if lower.startswith(b"http://") or lower.startswith(b"https://"):
        scheme_end = target.index(b"://") + 3
        slash = target.find(b"/", scheme_end)
        query = target.find(b"?", scheme_end)
        cut = min(i for i in (slash, query, len(target)) if i >= 0)
        origin, path = target[:cut], target[cut:]
        if not path.startswith(b"/"):
            path = b"/" + path
        if origin[scheme_end:] == b"" or b"@" in origin[scheme_end:]:
            raise BadTarget("absolute-form target has no host, or carries credentials")
        try:
            port = urlsplit(origin.decode("latin-1")).port
        except ValueError:
            port = -1
        if port is not None and not 0 < port < 65536:
            raise BadTarget("absolute-form target has an invalid host or port")
        return origin, path
    if target == b"*" or not target.startswith(b"/"):
        raise BadTarget("request target must be a path starting with '/' or an absolute http URL")
    return None, target


def host_connector(host: bytes, cluster_domain: str) -> tuple[str, str] | None:
    """
    The C{(namespace, name)} a host name designates, or C{None}.  The port and
    a trailing dot are ignored; letters are compared case-insensitively.
    """
    name = host.strip().lower()
    if name.startswith(b"["):
        return None
    name = name.rsplit(b":", 1)[0] if b":" in name else name
    name = name.rstrip(b".")
    for suffix in (b".svc." + cluster_domain.lower().encode("ascii"), b".svc"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    match = _HOST_ROUTE.match(name)
    if match is None:
        return None
    return match.group(2).decode("ascii"), match.group(1).decode("ascii")


# IIS's non-standard C{%uXXXX} escape: servers that know it decode it like
# C{%XX}, so C{%u002e%u002e} is C{..} to them.
_U_ESCAPE = re.compile(rb"%[uU]([0-9a-fA-F]{4})")
# Overlong UTF-8: a character in more bytes than it needs (C{C0 AE} is C{.},
# C{C0 AF} is C{/}, C{E0 80 AE} is C{.} again).  Never valid UTF-8, yet
# lenient decoders read it as the short form.
_OVERLONG = re.compile(rb"[\xc0\xc1][\x80-\xbf]|\xe0[\x80-\x9f]|\xf0[\x80-\x8f]")
# A dot segment padded with whitespace or control characters: servers that
# trim segments (Java's String.trim() drops everything up to U+0020) see
# C{..%20} as C{..}.
_PADDED_DOTS = re.compile(r"[\s\x00-\x20\x7f]*\.\.?[\s\x00-\x20\x7f]*")
_SEPARATORS = re.compile(r"[/\\]")
# A path with none of what check_rest decodes or folds: no "%", backslash,
# ";", whitespace, control or non-ASCII byte.
_PLAIN_PATH = re.compile(rb"[A-Za-z0-9\-._~!$&'()*+,=:@/]*")


def _decode_segment(segment: bytes) -> tuple[bytes, bool]:
    """
    Percent-decode a path segment (C{%XX} and C{%uXXXX}), repeatedly to
    catch double encoding; also whether a C{%uXXXX} escape was decoded.
    """
    decoded, escaped_u = segment, False
    for _ in range(4):
        more = unquote_to_bytes(decoded)
        if b"%" in more:
            u_free = _U_ESCAPE.sub(
                lambda m: chr(int(m.group(1), 16)).encode("utf-8", "surrogatepass"), more)
            escaped_u = escaped_u or u_free != more
            more = u_free
        if more == decoded:
            break
        decoded = more
    return decoded, escaped_u


def _dot_segment(parts: list[str], padded: bool) -> bool:
    """Whether one of C{parts} is C{.} or C{..} (padded with whitespace if C{padded})."""
    for part in parts:
        # Servlet containers drop ";params" from a segment before
        # resolving it, so "..;x" climbs like "..".
        name = part.split(";", 1)[0]
        if name in (".", "..") or (padded and _PADDED_DOTS.fullmatch(name) is not None):
            return True
    return False


def _routed_host(host: bytes | None) -> bytes | None:
    """A Connector host name C{host_connector} accepted, as C{Route.host} keeps it."""
    if host is None:
        return None
    name, sep, port = host.strip().rpartition(b":")
    if not sep:
        name, port = port, b""
    name = name.rstrip(b".")
    if port.isdigit() and 0 < int(port) < 65536:
        return name + b":" + port
    return name


def check_rest(rest: bytes) -> None:
    """
    Refuse a path that could climb out of where it was authorized: any
    segment that is C{.} or C{..} once percent-decoding (repeated, to catch
    double encoding, and including IIS's C{%uXXXX}) and backslashes are taken
    into account, or once a server that is lenient about what a dot is would
    read it so: padded with whitespace (C{..%20}), overlong UTF-8
    (C{%c0%ae}), Unicode lookalikes that NFKC folds to dots or slashes
    (fullwidth C{%ef%bc%8e}).  Encoded slashes themselves are allowed and
    passed on verbatim.

    @raise BadTarget: naming what is wrong with the path.
    """
    path = rest.split(b"?", 1)[0]
    if _PLAIN_PATH.fullmatch(path) is not None:
        # Most paths: nothing escaped, padded or non-ASCII, so a dot
        # segment can only be written plainly (checked without decoding).
        if b"." in path and any(segment in (b".", b"..") for segment in path.split(b"/")):
            raise BadTarget("path contains a '.' or '..' segment (also when percent-encoded)")
        return
    for segment in path.split(b"/"):
        decoded, escaped_u = _decode_segment(segment)
        if b"\x00" in decoded:
            raise BadTarget("path contains a NUL byte")
        if _OVERLONG.search(decoded) is not None:
            raise BadTarget("path contains an overlong UTF-8 sequence (such as %c0%ae, a disguised '.' or '/')")
        # surrogateescape: bytes that are not UTF-8 (legacy Latin-1 names)
        # pass through unchanged and can never read as a dot.
        text = decoded.decode("utf-8", "surrogateescape")
        parts = _SEPARATORS.split(text)
        if _dot_segment(parts, padded=False):
            if escaped_u:
                raise BadTarget("path contains a '.' or '..' segment written with %u escapes")
            raise BadTarget("path contains a '.' or '..' segment (also when percent-encoded)")
        if _dot_segment(parts, padded=True):
            raise BadTarget("path contains a '.' or '..' segment padded with whitespace or control characters")
        if not text.isascii() and _dot_segment(_SEPARATORS.split(unicodedata.normalize("NFKC", text)), padded=True):
            raise BadTarget("path contains a '.' or '..' segment written with Unicode lookalikes (such as fullwidth dots)")


def _path_named(path: bytes) -> Route | None:
    """
    The Connector a path names in path form (C{/namespaces/NS/connectors/NAME/REST},
    or C{/v2/namespaces/NS/connectors/NAME/REPO...} for OCI clients), with the
    prefix stripped once, or C{None}.  C{path} may carry a query.
    """
    bare, mark, query = path.partition(b"?")
    oci = _OCI_PATH_ROUTE.match(bare)
    if oci is not None:
        rest = b"/v2" + (oci.group(3) or b"/") + mark + query
        check_rest(rest)
        return Route(oci.group(1).decode(), oci.group(2).decode(), rest,
                     client_prefix=bare[: oci.end(2)], oci_path=True)
    by_path = _PATH_ROUTE.match(bare)
    if by_path is not None:
        rest = (by_path.group(3) or b"") + mark + query
        check_rest(rest)
        return Route(by_path.group(1).decode(), by_path.group(2).decode(), rest,
                     client_prefix=bare[: by_path.end(2)])
    return None


def route(target: bytes, host: bytes | None, cluster_domain: str) -> Route:
    """
    Route one request.  Raises L{BadTarget} for targets that must not be
    forwarded at all.

    A request may name its Connector by host and by path at once: upstream's
    path-resolver addresses are C{http://c-NAME.NS.svc.cluster.local/namespaces/NS/connectors/NAME}.
    The prefix is then stripped once, and a host and a path that name
    different Connectors are refused, since either reading would send the
    request somewhere the client did not mean.
    """
    origin, path = split_target(target)
    if origin is not None:
        host = origin.split(b"://", 1)[1]
    by_host = host_connector(host, cluster_domain) if host else None
    if by_host is not None:
        named = _path_named(path)
        if named is not None:
            if (named.namespace, named.name) != by_host:
                raise BadTarget(
                    f"the host names Connector {by_host[0]}/{by_host[1]} but the path names "
                    f"Connector {named.namespace}/{named.name}"
                )
            return evolve(named, host=_routed_host(host))
        check_rest(path)
        return Route(by_host[0], by_host[1], path, host=_routed_host(host))
    if origin is not None:
        check_rest(path)
        return Route(None, None, path, origin=origin)
    named = _path_named(path)
    if named is not None:
        return named
    check_rest(path)
    return Route(None, None, path)
