# -*- test-case-name: tests.test_connect,tests.test_connect_memory -*-
"""
C{CONNECT host:port}, as far as the client side of the wire is concerned:
reading its target, and what an intercepted tunnel remembers of its
C{CONNECT} for the requests inside it.  Pure functions over bytes.

The channel (L{connectors_proxy.server.channel}) hands the connection to a
tunnel after the C{200}; the router decides whether there is one (identity,
listed Connectors, C{--forward-unlisted}); the TLS that terminates an
intercepted tunnel is L{connectors_proxy.tls.intercept}'s, the byte relay
of a plain one L{connectors_proxy.upstream.tunnel}'s.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from attrs import define, field, frozen

from connectors_proxy.server.headers import same_origin
from connectors_proxy.server.routing import BadTarget, split_target

# A DNS name as a CONNECT target may carry it: letters, digits, hyphens,
# underscores (seen in internal names) and dots; no user info, no path.
_HOST_NAME = re.compile(r"^[a-z0-9_](?:[a-z0-9_.-]{0,251}[a-z0-9_])?$")

#: What the proxy answers a C{CONNECT} it relays with, before the tunnel's first byte.
ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


@define
class TunnelStats:
    """
    What went through a C{CONNECT}'s tunnel once its C{200} was sent, as
    its own access line shows it: bytes from the client (C{received}) and
    bytes to it (C{sent}), as they crossed the client's connection (for an
    intercepted tunnel, the TLS records, so the heads and bodies of the
    requests inside plus their TLS framing; for a plain one, the bytes
    relayed).
    """

    received: int = 0
    sent: int = 0


def parse_authority(target: bytes) -> tuple[str, int]:
    """
    The C{(host, port)} of a C{CONNECT} request target (RFC 9110 section
    9.3.6: C{host:port}, the port required; an IPv6 address in brackets).
    The host is returned lower case, without brackets or a trailing dot.

    @raise BadTarget: anything else (a path, a URL, user info, no port).
    """
    try:
        text = target.decode("ascii")
    except UnicodeDecodeError:
        raise BadTarget("CONNECT target must be host:port in ASCII") from None
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise BadTarget("CONNECT target must be host:port, with a port from 1 to 65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            address = ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise BadTarget("CONNECT target has an invalid IPv6 address") from None
        return str(address), int(port_text)
    host = host.lower().rstrip(".")
    try:
        return str(ipaddress.IPv4Address(host)), int(port_text)
    except ValueError:
        pass
    if not _HOST_NAME.match(host) or ".." in host:
        raise BadTarget("CONNECT target must be host:port (a DNS name or an IP address)")
    return host, int(port_text)


def authority(host: str, port: int) -> str:
    """C{host:port}, an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@frozen
class ConnectContext:
    """
    What an intercepted C{CONNECT} established, for every request read
    inside its tunnel: where the client said it was going, and who it said
    it was.  The requests inside are served as absolute-form
    C{https://host:port/...} requests with the C{CONNECT}'s credentials.

    @ivar host: the target host, as L{parse_authority} returned it.
    @ivar port: the target port.
    @ivar proxy_authorization: the C{CONNECT}'s C{Proxy-Authorization} value.
    @ivar certified: the identity a verified client certificate proved on
        the connection the C{CONNECT} came in on (a C{cptls:} listener with
        C{clientCA=}), else C{None}.
    @ivar origin: C{https://host:port}, the origin the requests inside
        address (made once per tunnel, not per request).
    """

    host: str
    port: int
    proxy_authorization: bytes | None = field(repr=False)
    certified: Any = None
    origin: bytes = field(init=False, repr=False, eq=False)

    @origin.default
    def _origin(self) -> bytes:
        return b"https://" + authority(self.host, self.port).encode("ascii")


def _host_matches(context: ConnectContext, host: bytes) -> bool:
    """Whether a C{Host} header names the tunnel's target (its port optional)."""
    text = host.strip().decode("latin-1").lower()
    if text.startswith("["):
        name, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            return False
    else:
        name, _, port = text.partition(":")
    name = name.rstrip(".")
    if port and (not port.isdigit() or int(port) != context.port):
        return False
    if name == context.host:
        # The usual case, without ipaddress's ValueError for a DNS name.
        return True
    try:
        return ipaddress.ip_address(name) == ipaddress.ip_address(context.host)
    except ValueError:
        return name == context.host


def inner_target(context: ConnectContext, uri: bytes, host: bytes | None) -> bytes:
    """
    The absolute-form target a request read inside an intercepted tunnel is
    routed as: the tunnel's origin and the request's path.

    @raise BadTarget: the request names another origin than the tunnel's,
        in an absolute-form target or in its C{Host}: it would otherwise be
        served with credentials chosen for a host it is not going to.
    """
    origin, path = split_target(uri)
    if origin is not None and not same_origin(origin.decode("latin-1"), context.origin.decode("ascii")):
        raise BadTarget(f"a request inside a tunnel to {authority(context.host, context.port)} "
                        f"must be for that origin")
    if host is not None and not _host_matches(context, host):
        raise BadTarget(f"the Host header does not name {authority(context.host, context.port)}, "
                        f"the target of this CONNECT tunnel")
    return context.origin + path
