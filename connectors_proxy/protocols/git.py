# -*- test-case-name: tests.test_git -*-
"""
The Git protocol (docs/git.md): smart HTTP (C{info/refs?service=...},
C{git-upload-pack}, C{git-receive-pack}), dumb HTTP GETs and Git LFS,
relayed with the Connector's credentials through the shared relay.

Bodies are streamed untouched both ways: C{Git-Protocol} (v2),
C{Content-Encoding: gzip} and chunked request bodies reach the Git server as
the client sent them.  What this module adds to the plain relay:

 - An upstream C{401} means the Connector's own credentials were refused (or
   it has none).  Relayed as is, git would ask its user for a password that
   cannot help (the proxy replaces whatever the client sends), so it
   becomes a C{502} whose C{text/plain} body git prints as C{remote: ...},
   naming the Connector and its Secret; the upstream challenge and body are
   dropped.
 - Git LFS batch responses (C{POST .../info/lfs/objects/batch}) never hand
   a credential to the client, whatever origin an action names.  An action
   C{href} under the Connector's address is mapped back to the address the
   client used, its credential headers removed (the proxy injects the
   Connector's credentials on the transfer).  Any other action that carries
   credentials (a server whose external URL differs from C{spec.address}
   copies the request's C{Authorization} into every action) gets an opaque,
   expiring proxy URL instead (L{LFSRelays}): the proxy keeps the C{href}
   and its headers, and relays the transfer there itself.  Actions without
   credentials on other origins (presigned storage URLs) are left alone.
 - Errors on LFS paths are LFS JSON (C{{"message": ...}}), which git-lfs
   prints; elsewhere C{text/plain}, which git prints.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
import zlib
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

from attrs import define, field, frozen
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from connectors_proxy.model.credentials import Credentials
from connectors_proxy.protocols import ProtocolResource, naming_connector
from connectors_proxy.server import errors
from connectors_proxy.server.channel import ProxyRequest
from connectors_proxy.server.errors import ProxyError, bad_gateway, not_found
from connectors_proxy.server.headers import same_origin
from connectors_proxy.server.routing import Route
from connectors_proxy.upstream import relay
from connectors_proxy.upstream.reflection import secrets_for
from connectors_proxy.upstream.target import Target

log = Logger()

LFS_MEDIA_TYPE = b"application/vnd.git-lfs+json"

# A batch response names at most a few hundred objects (git-lfs asks for
# 100 at a time): a few hundred bytes each.  Anything larger is not a batch
# response the proxy should hold in memory.
LFS_BATCH_LIMIT = 8 * 1024 * 1024


# Headers in an LFS action that carry the Git server's credentials for the
# transfer.  Dropped for transfers that go through the proxy, which injects
# the Connector's credentials itself.  Any header whose name mentions a
# token or auth is treated the same (GitLab's Private-Token, X-Auth-Token...).
_CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})

FETCH = "fetch"
PUSH = "push"

# Where the proxy URLs of relayed LFS actions live, beside the batch
# endpoint: .../info/lfs/objects/.connectors-proxy?token=TOKEN.  No LFS
# server has such a path (object ids are hex), and a "token" query value
# is redacted from the access log.
RELAY_PATH = b"info/lfs/objects/.connectors-proxy"

# How long a relayed action's proxy URL lives: the action's own expiry,
# at most an hour (a leaked URL is short-lived), 15 minutes when the server
# names none.  git-lfs asks for a new batch when an action has expired.
RELAY_DEFAULT_SECONDS = 15 * 60
RELAY_MAX_SECONDS = 60 * 60

# Which methods each basic-transfer action is for; other (custom adapter)
# actions take any.
_ACTION_METHODS = {
    "download": frozenset({b"GET", b"HEAD"}),
    "upload": frozenset({b"PUT"}),
    "verify": frozenset({b"POST"}),
}

# Headers the relay never takes from an action: framing is the relay's own.
_NOT_RELAYED = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection", b"te",
                          b"upgrade", b"keep-alive", b"trailer", b"expect"})
_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class Clock(Protocol):
    """What L{LFSRelays} needs of a clock (an C{IReactorTime} will do)."""

    def seconds(self) -> float:
        """Now, in seconds since the epoch."""


class _WallClock:
    """The clock of a L{GitResource} built without one: wall time."""

    def seconds(self) -> float:
        return time.time()


Owner = tuple[str, str]


@frozen
class RelayedAction:
    """
    An LFS action the proxy relays: where to send the transfer, with which
    headers (the credentials the Git server gave, which only it sees).

    @ivar owner: C{(connector ref, identity)} that got the proxy URL; only
        the same identity through the same Connector may use it.
    @ivar methods: the methods the action is for, C{None} for any.
    @ivar expires: when the proxy URL stops working, on the table's clock.
    """

    owner: Owner
    href: str = field(repr=False)
    headers: tuple[tuple[bytes, bytes], ...] = field(repr=False)
    methods: frozenset[bytes] | None
    expires: float

    @property
    def size(self) -> int:
        """Roughly the bytes this entry holds, for the table's bound."""
        return 200 + len(self.href) + sum(len(k) + len(v) for k, v in self.headers)


def relayed_headers(header: Any) -> tuple[tuple[bytes, bytes], ...]:
    """
    An action's C{header} as the relay sends it: entries that are not valid
    header fields (or that are framing) left out, so one odd entry cannot
    break the transfer or split the request.
    """
    if not isinstance(header, dict):
        return ()
    out = []
    for name, value in header.items():
        if not isinstance(name, str) or not isinstance(value, (str, int, float)) or isinstance(value, bool):
            continue
        raw_name, raw_value = name.encode("utf-8"), str(value).encode("utf-8")
        if (_TOKEN.match(raw_name) is None or raw_name.lower() in _NOT_RELAYED
                or any(c in raw_value for c in b"\r\n\0")):
            continue
        out.append((raw_name, raw_value))
    return tuple(out)


@define
class LFSRelays:
    """
    The LFS actions the proxy relays, by the unguessable token in their
    proxy URL.  Per process and in memory: the credentials stay here, and
    the client gets only the token.  Bounded: at most C{max_entries} and
    about C{max_bytes}, the oldest going first, and at most C{max_per_owner}
    per identity and Connector, so one client asking for batch after batch
    cannot push everybody else's transfers out.
    """

    clock: Clock
    max_entries: int = 100_000
    max_bytes: int = 64 * 1024 * 1024
    max_per_owner: int = 10_000
    # Insertion order is expiry order, near enough (lifetimes are capped):
    # the oldest entries are at the front.
    _entries: dict[str, RelayedAction] = field(factory=dict, init=False)
    _owned: dict[Owner, dict[str, None]] = field(factory=dict, init=False)
    _bytes: int = field(default=0, init=False)

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, owner: Owner, href: str, headers: tuple[tuple[bytes, bytes], ...], lifetime: float,
            methods: frozenset[bytes] | None = None) -> str:
        """Keep one action for C{lifetime} seconds; its new token."""
        now = self.clock.seconds()
        entry = RelayedAction(owner, href, headers, methods, now + lifetime)
        while self._entries:
            oldest = next(iter(self._entries))
            if (self._entries[oldest].expires > now and len(self._entries) < self.max_entries
                    and self._bytes + entry.size <= self.max_bytes):
                break
            self._drop(oldest)
        owned = self._owned.setdefault(owner, {})
        while len(owned) >= self.max_per_owner:
            self._drop(next(iter(owned)))
        token = secrets.token_urlsafe(32)
        self._entries[token] = entry
        owned[token] = None
        self._bytes += entry.size
        return token

    def get(self, token: str, owner: Owner) -> RelayedAction | None:
        """The action of C{token} if C{owner} got it and it has not expired."""
        entry = self._entries.get(token)
        if entry is None or entry.owner != owner:
            return None
        if entry.expires <= self.clock.seconds():
            self._drop(token)
            return None
        return entry

    def _drop(self, token: str) -> None:
        entry = self._entries.pop(token)
        self._bytes -= entry.size
        owned = self._owned[entry.owner]
        del owned[token]
        if not owned:
            del self._owned[entry.owner]


def action_lifetime(action: dict[str, Any], now: float | None) -> float:
    """
    How long the proxy URL of C{action} lives: the earlier of its
    C{expires_in} and C{expires_at} (read against C{now}, when given),
    L{RELAY_DEFAULT_SECONDS} when it has neither, at most
    L{RELAY_MAX_SECONDS} and at least a second.
    """
    candidates = []
    expires_in = action.get("expires_in")
    if isinstance(expires_in, (int, float)) and not isinstance(expires_in, bool) and math.isfinite(expires_in):
        candidates.append(float(expires_in))
    expires_at = action.get("expires_at")
    if isinstance(expires_at, str) and now is not None:
        try:
            when = datetime.fromisoformat(expires_at)
        except ValueError:
            pass
        else:
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            candidates.append(when.timestamp() - now)
    lifetime = min(candidates) if candidates else RELAY_DEFAULT_SECONDS
    return max(1.0, min(lifetime, RELAY_MAX_SECONDS))


def secret_markers(credentials: Credentials | None) -> tuple[str, ...]:
    """
    What betrays the Connector's secret in an LFS action, as text (the
    batch answer is decoded JSON): every form L{secrets_for} knows (raw,
    URL-encoded, the injected header value, base64 at every alignment).
    """
    return tuple(dict.fromkeys(n.decode("utf-8", "replace") for n in secrets_for(credentials).everywhere))


@frozen
class GitRequest:
    """
    What a Git client asks for.

    @ivar kind: C{discovery} (C{info/refs}), C{rpc} (C{git-upload-pack} and
        friends), C{dumb} (plain file GETs of the dumb protocol), C{lfs-batch},
        C{lfs-relay} (a transfer through a proxy URL of L{LFSRelays}), C{lfs}
        (other LFS API calls and transfers), or C{other}.
    @ivar service: C{git-upload-pack}, C{git-receive-pack} or
        C{git-upload-archive} for smart requests, else C{None}.
    @ivar operation: C{fetch} or C{push} when the request alone tells
        (C{None} for LFS, whose batch body says which).
    """

    kind: str
    service: str | None = None
    operation: str | None = None

    @property
    def is_lfs(self) -> bool:
        return self.kind in ("lfs", "lfs-batch", "lfs-relay")


_SERVICES = {
    "git-upload-pack": FETCH,
    "git-upload-archive": FETCH,
    "git-receive-pack": PUSH,
}


def _query_param(query: bytes, name: bytes) -> bytes | None:
    for pair in query.split(b"&"):
        key, _, value = pair.partition(b"=")
        if key == name:
            return value
    return None


def _is_lfs_path(rest: bytes) -> bool:
    path = rest.split(b"?", 1)[0]
    return b"/info/lfs/" in path or path.startswith(b"info/lfs/")


def classify(method: bytes, rest: bytes) -> GitRequest:
    """
    Classify a request by its method and upstream path and query (the part
    after the Connector's address).  Pure; used to pick the response
    handling and the error format, and the seam for per-operation
    authorization (fetch vs push) later.
    """
    path, _, query = rest.partition(b"?")
    if _is_lfs_path(path):
        if path.endswith(b"/" + RELAY_PATH) or path == RELAY_PATH:
            return GitRequest("lfs-relay")
        if method == b"POST" and path.endswith(b"/info/lfs/objects/batch"):
            return GitRequest("lfs-batch")
        return GitRequest("lfs")
    if path.endswith(b"/info/refs") or path == b"info/refs":
        service = _query_param(query, b"service")
        if service is None:
            return GitRequest("dumb", operation=FETCH)
        name = service.decode("latin-1")
        return GitRequest("discovery", name, _SERVICES.get(name))
    last = path.rsplit(b"/", 1)[-1].decode("latin-1")
    if method == b"POST" and last in _SERVICES:
        return GitRequest("rpc", last, _SERVICES[last])
    if method in (b"GET", b"HEAD"):
        return GitRequest("dumb", operation=FETCH)
    return GitRequest("other")


def _is_credential_header(name: str) -> bool:
    lower = name.lower()
    return lower in _CREDENTIAL_HEADERS or "token" in lower or "auth" in lower


# A proxy URL for one credentialed action: (href, header, lifetime, methods) -> URL.
Relay = Callable[[str, Any, float, frozenset[bytes] | None], str]


def _has_marker(text: str, markers: Sequence[str]) -> bool:
    return any(marker in text for marker in markers)


def _has_userinfo(href: str) -> bool:
    try:
        return "@" in urlsplit(href).netloc
    except ValueError:
        return True


def _origin_end(url: str) -> int:
    """Where the C{scheme://host[:port]} of an absolute C{url} ends."""
    start = url.find("://") + 3
    ends = [i for i in (url.find(c, start) for c in "/?#") if i >= 0]
    return min(ends, default=len(url))


def _on_upstream(href: str, upstream_address: str | None, aliases: Sequence[str]) -> str:
    """
    C{href} as an absolute URL on the Connector's own origin when it is
    relative to it or names one of C{aliases} (other names of that origin);
    else as it is.
    """
    if upstream_address is None:
        return href
    origin = upstream_address[:_origin_end(upstream_address)]
    if href.startswith("//"):
        return origin.split(":", 1)[0] + ":" + href
    if href.startswith("/"):
        return origin + href
    if any(same_origin(href, alias) for alias in aliases):
        return origin + href[_origin_end(href):]
    return href


def _set_header(action: dict[str, Any], kept: dict[str, Any]) -> None:
    if kept:
        action["header"] = kept
    else:
        action.pop("header", None)


def _mask(value: Any, markers: Sequence[str], exempt: set[str]) -> Any:
    """
    C{value} with every marker in its strings replaced by as many C{*}
    (but strings in C{exempt}); lists and mappings are changed in place.
    """
    if isinstance(value, str):
        if value in exempt:
            return value
        for marker in markers:
            value = value.replace(marker, "*" * len(marker))
        return value
    if isinstance(value, list):
        value[:] = [_mask(v, markers, exempt) for v in value]
    elif isinstance(value, dict):
        items = [(_mask(k, markers, exempt), _mask(v, markers, exempt)) for k, v in value.items()]
        value.clear()
        value.update(items)
    return value


def rewrite_lfs_batch(doc: Any, to_client: Callable[[str], str], upstream_address: str | None = None, *,
                      relay: Relay | None = None, markers: Sequence[str] = (), aliases: Sequence[str] = (),
                      now: float | None = None) -> Any:
    """
    Rewrite a decoded LFS batch response so that no action carries a
    credential to the client, and return it.  For each action:

     - its C{href} under the Connector's address (C{to_client} maps it):
       the mapped C{href}, without credential headers (the proxy injects the
       Connector's credentials when the client follows it);
     - otherwise, when it carries credentials (a credential-looking header,
       one of the secret C{markers} in a header value or in the C{href}, or
       user info in the C{href}): the proxy URL C{relay} gives for it,
       without credential headers, its C{expires_in} set to the URL's
       lifetime.  This is the Git server under another name (its external
       URL, another spelling of its host): the server's credentials are for
       it, not for the client.  Without C{relay}, the credential headers are
       removed (and an action whose C{href} holds a secret is removed);
     - otherwise (presigned storage URLs) as the server sent it: the client
       fetches those directly.

    C{aliases} are origins that name the Git server too (the host the proxy
    sent as C{X-Forwarded-Host}): their C{href}s are handled as if on
    C{upstream_address}, which the proxy relays to instead of to itself.
    Relative C{href}s are made absolute on C{upstream_address}.  Any other
    string in the document that holds a marker is masked with C{*} (also in
    a document of an unexpected shape).  The document is changed in place.
    """
    objects = doc.get("objects") if isinstance(doc, dict) else None
    produced: set[str] = set()
    for entry in objects if isinstance(objects, list) else ():
        actions = entry.get("actions") if isinstance(entry, dict) else None
        if not isinstance(actions, dict):
            continue
        for name, action in list(actions.items()):
            if not isinstance(action, dict):
                continue
            header = action.get("header") or {}
            # A header that is not a mapping cannot be sorted out: all of it
            # counts as credentials.
            readable = isinstance(header, dict)
            kept = {k: v for k, v in header.items()
                    if not _is_credential_header(str(k)) and not _has_marker(str(v), markers)} if readable else {}
            credentialed = not readable or len(kept) != len(header)
            href = action.get("href")
            if not isinstance(href, str):
                # Nothing to follow: credentials, if any, are just removed.
                if credentialed:
                    _set_header(action, kept)
                continue
            secret_href = _has_marker(href, markers) or _has_userinfo(href)
            canonical = _on_upstream(href, upstream_address, aliases)
            mapped = to_client(canonical)
            if mapped != canonical and not secret_href:
                action["href"] = mapped
            elif credentialed or secret_href:
                # The credentials are the Git server's for itself (even on its
                # own host outside the address's path prefix, which cannot be
                # mapped): they never reach the client.
                if relay is not None:
                    lifetime = action_lifetime(action, now)
                    action["href"] = relay(canonical, header, lifetime, _ACTION_METHODS.get(str(name)))
                    action["expires_in"] = int(lifetime)
                    action.pop("expires_at", None)
                elif secret_href:
                    del actions[name]
                    continue
            else:
                continue
            produced.add(action["href"])
            _set_header(action, kept)
    return _mask(doc, markers, produced) if markers else doc


def decode_body(body: bytes, encoding: bytes | None, limit: int) -> bytes:
    """
    Undo a C{gzip} or C{deflate} C{Content-Encoding} (at most C{limit} bytes
    out).  Raises C{ValueError} for an encoding or a body it cannot read.
    """
    coding = (encoding or b"identity").strip().lower()
    if coding in (b"", b"identity"):
        return body
    if coding in (b"gzip", b"x-gzip"):
        decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif coding == b"deflate":
        decoder = zlib.decompressobj()
    else:
        raise ValueError(f"unsupported Content-Encoding {coding.decode('latin-1')!r}")
    try:
        out = decoder.decompress(body, limit + 1)
    except zlib.error as e:
        raise ValueError(f"cannot decode the body: {e}") from None
    if len(out) > limit:
        raise ValueError(f"decoded body larger than {limit} bytes")
    return out


def upstream_refused(target: Target) -> ProxyError:
    """The error for a Git server that answered 401 to the proxy's request."""
    connector = target.connector
    where = f"{target.label} ({connector.address})"
    if target.credentials is None:
        message = (
            f"the Git server of {where} asks for authentication, and the Connector has no "
            "credentials: set spec.auth.secretRef to a Secret the server accepts"
        )
    else:
        message = (
            f"the Git server of {where} refused the credentials in Secret {connector.secret_ref} "
            "(wrong, expired, or without access to this repository): update that Secret so the server accepts it"
        )
    return bad_gateway(message)


def error_response(error: ProxyError, lfs: bool) -> tuple[Headers, bytes]:
    """The response for C{error}: LFS JSON for git-lfs, C{text/plain} for git."""
    if not lfs:
        return errors.text_response(error)
    headers = Headers()
    body = json.dumps({"message": f"connectors-proxy: {error.message}"}).encode() + b"\n"
    headers.setRawHeaders(b"Content-Type", [LFS_MEDIA_TYPE])
    if error.status == 401:
        headers.setRawHeaders(b"LFS-Authenticate", [errors.REALM_CHALLENGE])
        headers.setRawHeaders(b"WWW-Authenticate", [errors.REALM_CHALLENGE])
    return headers, body


def _relay_url(target: Target, token: str) -> str:
    """The proxy URL of a relayed action, beside the batch endpoint the client called."""
    path = target.route.rest.split(b"?", 1)[0]
    beside = path[: -len(b"batch")] + b".connectors-proxy" if path.endswith(b"/objects/batch") else b"/" + RELAY_PATH
    url = target.client_base + target.route.client_prefix + beside + b"?token=" + token.encode("ascii")
    return url.decode("utf-8", "replace")


def _aliases(request: ProxyRequest, target: Target) -> tuple[str, ...]:
    """The origin the proxy named to the Git server in X-Forwarded-Host/-Proto, if any."""
    if target.route.host is None:
        return ()
    scheme = "https" if request.isSecure() else "http"
    return (f"{scheme}://{target.route.host.decode('latin-1')}",)


def _owner(target: Target) -> Owner:
    return str(target.connector.ref), target.identity.username


async def _relay_lfs_batch(request: ProxyRequest, target: Target, relays: LFSRelays) -> None:
    headers = relay.request_headers(request, target)
    # The proxy rewrites this body, so it must be able to read it.
    headers.setRawHeaders(b"Accept-Encoding", [b"identity"])
    response = await relay.send(target, request.method, target.upstream_url(), headers, request.body, request)
    if response.code == 401:
        await relay.discard(response)
        raise upstream_refused(target)
    secrets = secrets_for(target.credentials)
    out = relay.response_headers(target, response, secrets)
    body = await relay.read_body(response, LFS_BATCH_LIMIT)
    if not 200 <= response.code < 300:
        # An error document: no actions to rewrite, but it may quote the
        # request's credentials back.
        if not out.hasHeader(b"content-encoding"):
            body = secrets.mask(body)
        relay.send_bytes(request, response.code, out, body)
        return
    try:
        plain = decode_body(body, response.headers.getRawHeaders(b"content-encoding", [None])[0], LFS_BATCH_LIMIT)
        doc = json.loads(plain)
    except ValueError as e:
        # Fail closed: an answer the proxy cannot read might carry the
        # server's credentials in its actions.
        raise bad_gateway(
            f"the Git LFS batch response of {target.label} is not JSON the proxy can read ({e})"
        ) from None
    markers = secret_markers(target.credentials)
    owner = _owner(target)

    def relay_action(href: str, header: Any, lifetime: float, methods: frozenset[bytes] | None) -> str:
        token = relays.add(owner, href, relayed_headers(header), lifetime, methods)
        return _relay_url(target, token)

    rewritten = rewrite_lfs_batch(doc, lambda href: target.to_client(href.encode("utf-8")).decode("utf-8"),
                                  target.connector.address, relay=relay_action, markers=markers,
                                  aliases=_aliases(request, target), now=relays.clock.seconds())
    out.removeHeader(b"content-encoding")
    relay.send_bytes(request, response.code, out, json.dumps(rewritten).encode("utf-8"))


async def _relay_lfs_transfer(request: ProxyRequest, target: Target, relays: LFSRelays) -> None:
    """
    Relay one transfer to the action a proxy URL stands for, with the
    headers the Git server gave for it.  The client has passed the same
    checks as for any request to this Connector; the URL must also be its
    own (same identity, same Connector) and current.
    """
    token = _query_param(target.route.rest.partition(b"?")[2], b"token")
    action = relays.get(token.decode("latin-1"), _owner(target)) if token else None
    if action is None:
        raise not_found("this Git LFS transfer URL is unknown or has expired "
                        "(they last at most an hour, on the proxy process that gave them): run git lfs again")
    if action.methods is not None and request.method not in action.methods:
        raise ProxyError(405, "METHOD_NOT_ALLOWED", "this Git LFS transfer URL is for "
                         + " or ".join(sorted(m.decode("ascii") for m in action.methods)))
    # Nothing of the client's own origin or cookies: the href may be on any
    # origin, and only the server's headers authenticate there.
    headers = relay.forwarded_headers(request, origin=False, drop=frozenset({b"cookie"}))
    for name, value in action.headers:
        headers.setRawHeaders(name, [value])
    href = action.href.encode("utf-8")
    upstream = target.for_url(href)
    response = await relay.send(upstream, request.method, href, headers, request.body, request)
    if response.code == 401:
        await relay.discard(response)
        raise bad_gateway(f"the Git LFS server of {target.label} refused the transfer credentials it gave "
                          "in its batch answer: run git lfs again")
    await relay.relay_response(request, upstream, response)


class GitResource(ProtocolResource):
    """
    The resource the router hands Connectors of a C{git} class.

    @ivar relays: the LFS actions this process relays (see L{LFSRelays}).
    """

    def __init__(self, clock: Clock | None = None, relays: LFSRelays | None = None) -> None:
        """
        @param clock: for the lifetime of relayed LFS actions (the reactor);
            wall time when not given.
        """
        super().__init__()
        self.relays = relays if relays is not None else LFSRelays(clock or _WallClock())

    def claims(self, route: Route) -> bool:
        # git-lfs shows only LFS JSON errors: the router's own refusals on
        # LFS paths must be in that form too.
        return _is_lfs_path(route.rest)

    async def serve(self, request: ProxyRequest, target: Target) -> None:
        """Relay one Git (or Git LFS) request to C{target}."""
        kind = classify(request.method, target.route.rest)
        if kind.kind == "lfs-batch":
            await _relay_lfs_batch(request, target, self.relays)
            return
        if kind.kind == "lfs-relay":
            await _relay_lfs_transfer(request, target, self.relays)
            return
        response = await relay.send(target, request.method, target.upstream_url(),
                                    relay.request_headers(request, target), request.body, request)
        if response.code == 401:
            await relay.discard(response)
            raise upstream_refused(target)
        await relay.relay_response(request, target, response)

    def error_response(self, request: ProxyRequest, error: ProxyError,
                       target: Target | None) -> tuple[Headers, bytes]:
        """Errors name the Connector; LFS JSON on LFS paths, C{text/plain} elsewhere (git prints it)."""
        if target is None:
            return error_response(error, _is_lfs_path(request.uri))
        return error_response(naming_connector(error, target), classify(request.method, target.route.rest).is_lfs)
