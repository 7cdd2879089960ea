# -*- test-case-name: tests.test_git -*-
"""
The Git protocol (SPEC section 6): smart HTTP (C{info/refs?service=...},
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
 - Git LFS batch responses (C{POST .../info/lfs/objects/batch}) get every
   action C{href} that points at the Git server mapped back to the address
   the client used, and the upstream's own credentials in those actions'
   C{header} removed: the client authenticates the transfer to the proxy
   with its own token, and the proxy injects the Connector's credentials.
 - Errors on LFS paths are LFS JSON (C{{"message": ...}}), which git-lfs
   prints; elsewhere C{text/plain}, which git prints.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from typing import Any

from attrs import frozen
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from .. import errors, relay
from ..accesslog import redact_target
from ..errors import ProxyError, bad_gateway
from ..headers import same_origin
from ..relay import Target
from ..streaming import ProxyRequest
from . import ProtocolResource, naming_connector

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


@frozen
class GitRequest:
    """
    What a Git client asks for.

    @ivar kind: C{discovery} (C{info/refs}), C{rpc} (C{git-upload-pack} and
        friends), C{dumb} (plain file GETs of the dumb protocol), C{lfs-batch},
        C{lfs} (other LFS API calls and transfers), or C{other}.
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
        return self.kind in ("lfs", "lfs-batch")


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


def classify(method: bytes, rest: bytes) -> GitRequest:
    """
    Classify a request by its method and upstream path and query (the part
    after the Connector's address).  Pure; used to pick the response
    handling and the error format, and the seam for per-operation
    authorization (fetch vs push) later.
    """
    path, _, query = rest.partition(b"?")
    if b"/info/lfs/" in path or path.startswith(b"info/lfs/"):
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


def rewrite_lfs_batch(doc: Any, to_client: Callable[[str], str], upstream_address: str | None = None) -> Any:
    """
    Rewrite a decoded LFS batch response in place and return it: every
    action whose C{href} C{to_client} maps (it pointed at the Git server)
    gets the mapped C{href} and loses its credential headers.  Actions on
    other origins (presigned storage URLs) are left as the server sent them:
    the client fetches those directly.  A document of an unexpected shape is
    returned as is.
    """
    objects = doc.get("objects") if isinstance(doc, dict) else None
    if not isinstance(objects, list):
        return doc
    for entry in objects:
        actions = entry.get("actions") if isinstance(entry, dict) else None
        if not isinstance(actions, dict):
            continue
        for action in actions.values():
            if not isinstance(action, dict) or not isinstance(action.get("href"), str):
                continue
            mapped = to_client(action["href"])
            # Credentials the Git server hands out for its own host are the
            # Connector's business even when the href is outside the address's
            # path prefix (and so cannot be mapped): they never reach the client.
            own_host = upstream_address is not None and same_origin(action["href"], upstream_address)
            if mapped == action["href"] and not own_host:
                continue
            action["href"] = mapped
            header = action.get("header")
            if isinstance(header, dict):
                kept = {k: v for k, v in header.items() if not _is_credential_header(str(k))}
                if kept:
                    action["header"] = kept
                else:
                    del action["header"]
    return doc


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
        return errors.error_response(error, oci=False)
    headers = Headers()
    body = json.dumps({"message": f"connectors-proxy: {error.message}"}).encode() + b"\n"
    headers.setRawHeaders(b"Content-Type", [LFS_MEDIA_TYPE])
    if error.status == 401:
        headers.setRawHeaders(b"LFS-Authenticate", [errors.REALM_CHALLENGE])
        headers.setRawHeaders(b"WWW-Authenticate", [errors.REALM_CHALLENGE])
    return headers, body


def send_error(request: ProxyRequest, error: ProxyError, lfs: bool) -> None:
    """Answer with C{error} (or cut the connection if the response has started)."""
    if not lfs or request.startedWriting or request.finished or request._disconnected:
        relay.send_error(request, error, oci=False)
        return
    headers, body = error_response(error, lfs=True)
    relay.send_bytes(request, error.status, headers, body)


async def _relay_lfs_batch(request: ProxyRequest, target: Target) -> None:
    headers = relay.request_headers(request, target)
    # The proxy rewrites this body, so it must be able to read it.
    headers.setRawHeaders(b"Accept-Encoding", [b"identity"])
    response = await relay.send(target, request.method, target.upstream_url(), headers, request.body, request)
    if response.code == 401:
        await relay.discard(response)
        raise upstream_refused(target)
    out = relay.response_headers(target, response)
    body = await relay.read_body(response, LFS_BATCH_LIMIT)
    if not 200 <= response.code < 300:
        # An error document: no actions to rewrite.
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
    rewritten = rewrite_lfs_batch(doc, lambda href: target.to_client(href.encode("utf-8")).decode("utf-8"),
                                  target.connector.address)
    out.removeHeader(b"content-encoding")
    relay.send_bytes(request, response.code, out, json.dumps(rewritten).encode("utf-8"))


class GitResource(ProtocolResource):
    """The resource the router hands Connectors of a C{git} class."""

    async def serve(self, request: ProxyRequest) -> None:
        """Relay one Git (or Git LFS) request to the Connector of C{request.target}."""
        target: Target = request.target
        kind = classify(request.method, target.route.rest)
        try:
            if kind.kind == "lfs-batch":
                await _relay_lfs_batch(request, target)
                return
            response = await relay.send(target, request.method, target.upstream_url(),
                                        relay.request_headers(request, target), request.body, request)
            if response.code == 401:
                await relay.discard(response)
                raise upstream_refused(target)
            await relay.stream_response(request, response, relay.response_headers(target, response))
        except ProxyError as e:
            send_error(request, naming_connector(e, target), kind.is_lfs)
        except Exception:
            # A bug, not the client's or the server's doing: log it, and answer
            # rather than leave git waiting for the idle timeout.
            log.failure("git request {uri} failed", uri=redact_target(request.uri))
            send_error(request, ProxyError(500, "INTERNAL", "internal error (see the proxy's log)"), kind.is_lfs)
