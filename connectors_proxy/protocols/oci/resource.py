# -*- test-case-name: tests.test_oci_integration -*-
"""
The OCI protocol (distribution specification; docs/oci.md):
registry clients (skopeo, podman, docker, crane...) pull and push through the
proxy with only their own token, and the proxy authenticates to the
registry with the Connector's credentials.

What this module adds to the shared relay:

 - C{/v2/} is answered by the proxy (the root resource has already checked
   the client's token), so clients never see the registry's challenge.
 - Upstream auth: the registry's scheme is learned once per Connector by an
   anonymous C{GET /v2/}.  C{Bearer realm,service} registries get a token
   from the realm with the Connector's credentials, for the scopes the
   request needs (computed before the request, so a body that cannot be
   sent twice goes out with a sufficient token), cached per (Connector,
   realm, service, scope, credentials) in a L{TokenCache} that shares one
   realm request among concurrent requests.  C{Basic} registries get the
   credentials themselves.  A 401 for a request without a body (which can
   be sent again) refreshes the token once, with the scopes the challenge
   names, and retries.  No token or challenge ever reaches the client (an error may name the realm URL).
 - Path mode: repository names C{namespaces/NS/connectors/NAME/REPO} (the
   router already strips the prefix from the path) are mapped back in
   C{Location}, C{Link}, C{from=}/C{last=}, tag lists, catalogs and error
   details.
 - Blob redirects to another origin (a storage backend) are followed by the
   proxy without credentials; redirects on the registry's origin are
   rewritten to point at the proxy.
 - Errors are OCI error bodies with codes clients know.
"""

from __future__ import annotations

import json
from io import BytesIO
from urllib.parse import urljoin

from attrs import define, field, frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.client import FileBodyProducer
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from connectors_proxy.ops.metrics import ProxyMetrics
from connectors_proxy.protocols import ProtocolResource, naming_connector
from connectors_proxy.protocols.oci.auth import (
    Challenge,
    IssuedToken,
    RegistryCredentials,
    TokenResponseError,
    asks_basic,
    bearer_challenge,
    parse_challenges,
    parse_token_response,
    realm_allowed,
    registry_credentials,
    token_request,
)
from connectors_proxy.protocols.oci.names import (
    BLOB,
    CATALOG,
    MAX_REWRITTEN_BODY,
    PING,
    TAGS,
    NameMap,
    OciPath,
    merge_scopes,
    parse_oci_path,
    rewrite_json_names,
    rewrite_link,
    rewrite_upstream_url,
    scopes_for,
)
from connectors_proxy.protocols.oci.tokens import SingleFlight, TokenCache, TokenKey, fingerprint
from connectors_proxy.server import errors
from connectors_proxy.server.channel import ProxyRequest
from connectors_proxy.server.errors import ProxyError, bad_gateway
from connectors_proxy.server.headers import client_response_headers
from connectors_proxy.server.routing import Route
from connectors_proxy.upstream import relay
from connectors_proxy.upstream.reflection import Secrets, drop_reflected, secrets_for
from connectors_proxy.upstream.target import Target

log = Logger()

_NO_COOKIES = frozenset({b"cookie"})

# Token answers are a JWT or an opaque string and a few fields.
TOKEN_RESPONSE_LIMIT = 1024 * 1024
# Redirects followed for one blob (registry -> CDN -> signed URL ...).
MAX_REDIRECTS = 5

# Request headers that go to a storage backend when the proxy follows a blob
# redirect: what a download needs, nothing that identifies or authenticates.
_FOLLOW_HEADERS = (b"range", b"if-range", b"accept", b"user-agent")
# Response headers of a storage backend that the client gets.
_BLOB_HEADERS = (b"content-type", b"content-range", b"accept-ranges", b"etag", b"last-modified")

# Never to the client: the registry's challenges (the client would go to the
# realm itself) and its cookies (a session of the Connector's identity).
_NOT_TO_CLIENT = (b"www-authenticate", b"set-cookie")


@frozen
class Scheme:
    """
    How a registry wants to be authenticated: C{bearer} (token from
    C{challenge}'s realm), C{basic}, C{bearer-direct} (a C{Bearer}
    challenge without realm: the Connector's token as it is), or C{none}.
    """

    kind: str
    challenge: Challenge | None = None


NONE = Scheme("none")


def scheme_of(challenges: list[Challenge]) -> Scheme:
    """The L{Scheme} that a 401's challenges ask for."""
    bearer = bearer_challenge(challenges)
    if bearer is not None:
        return Scheme("bearer", bearer)
    if asks_basic(challenges):
        return Scheme("basic")
    if any(c.scheme == "bearer" for c in challenges):
        return Scheme("bearer-direct")
    return NONE


def refused(target: Target, scopes: tuple[str, ...]) -> ProxyError:
    """
    The registry refused the Connector's credentials (or wants some, and
    there are none).  A 403, not a 401: the client's own token was fine, and
    a 401 would make it retry with the same token.
    """
    connector = target.connector
    wanted = f" for {' '.join(scopes)}" if scopes else ""
    if target.credentials is None:
        return ProxyError(403, "DENIED", (
            f"the registry of {target.label} ({connector.address}) asks for credentials{wanted} and the "
            "Connector has none: set spec.auth.secretRef to a Secret the registry accepts"
        ))
    return ProxyError(403, "DENIED", (
        f"the registry of {target.label} ({connector.address}) refused the credentials in Secret "
        f"{connector.secret_ref}{wanted}"
    ))


def _bytes_producer(body: bytes) -> FileBodyProducer:
    return FileBodyProducer(BytesIO(body))


@define
class _Authorized:
    """The C{Authorization} for one upstream request, and the cached token it came from."""

    value: bytes | None = None
    key: TokenKey | None = None
    token: str | None = None


# The answer to a "/v2/" ping, which the proxy gives itself.
PING_HEADERS = {
    b"Content-Type": b"application/json",
    b"Docker-Distribution-API-Version": b"registry/2.0",
}


def is_oci_path(rest: bytes) -> bool:
    return rest == b"/v2" or rest.startswith(b"/v2/")


def is_oci_ping(rest: bytes) -> bool:
    return rest.split(b"?", 1)[0] in (b"/v2", b"/v2/")


def error_body(error: ProxyError) -> tuple[Headers, bytes]:
    """The OCI error response for C{error}: C{{"errors": [{"code", "message"}]}}."""
    headers = Headers()
    body = json.dumps({"errors": [{"code": error.code, "message": error.message}]}).encode() + b"\n"
    for name, value in PING_HEADERS.items():
        headers.setRawHeaders(name, [value])
    errors.challenge(headers, error)
    return headers, body


@define
class OciResource(ProtocolResource):
    """
    The resource the router renders for Connectors of an C{oci} class.  One
    instance per proxy: it holds the token cache and what each registry's
    auth scheme is.
    """

    clock: IReactorTime
    tokens: TokenCache = field(default=None)
    _schemes: dict[tuple[str, str], Scheme] = field(factory=dict)
    _probes: SingleFlight[tuple[str, str], Scheme] = field(factory=SingleFlight)

    def __attrs_post_init__(self) -> None:
        ProtocolResource.__init__(self)
        if self.tokens is None:
            self.tokens = TokenCache(self.clock)

    # -- one request --------------------------------------------------------

    def report_to(self, metrics: ProxyMetrics) -> None:
        self.tokens.on_hit = metrics.token_cache_hit
        self.tokens.on_request = metrics.token_request

    def claims(self, route: Route) -> bool:
        # Registry clients' paths always start with /v2/: before the
        # Connector is known, the router's refusals must already be OCI
        # error bodies (and a 401 the challenge they expect).
        return route.oci_path or is_oci_path(route.rest)

    def serve_unrouted(self, request: ProxyRequest, route: Route) -> bool:
        # The /v2/ ping in path mode names no Connector: the proxy answers
        # it itself, once the client is authenticated.
        if not is_oci_ping(route.rest):
            return False
        relay.send_bytes(request, 200, PING_HEADERS, b"{}")
        return True

    def error_response(self, request: ProxyRequest, error: ProxyError,
                       target: Target | None) -> tuple[Headers, bytes]:
        """The OCI error body; an upstream fault names the Connector."""
        if target is not None and error.status >= 500:
            error = naming_connector(error, target)
        return error_body(error)

    async def serve(self, request: ProxyRequest, target: Target) -> None:
        route = target.route
        raw_path, _, raw_query = route.rest.partition(b"?")
        path = raw_path.decode("latin-1")
        oci = parse_oci_path(path)
        if oci is None:
            raise ProxyError(404, "NAME_INVALID", (
                "not a path of the OCI distribution API, or an invalid repository name"
            ))
        if oci.kind == PING:
            relay.send_bytes(request, 200, PING_HEADERS, b"{}")
            return
        names = NameMap.for_path_mode(target.connector.namespace, target.connector.name) \
            if route.oci_path else NameMap()
        query = names.upstream_query(oci, raw_query.decode("latin-1"))
        url = target.upstream_url((path + ("?" + query if query else "")).encode("latin-1"))
        scopes = scopes_for(request.method, oci, query)
        response, injected = await self._send(request, target, url, scopes)
        # The registry token the proxy got at the realm is as secret as the
        # Connector's credentials: neither may come back reflected.
        secrets = secrets_for(target.credentials, *injected)
        await self._respond(request, target, oci, names, url.decode("latin-1"), response, secrets)

    # -- upstream auth ------------------------------------------------------

    def _scheme_key(self, target: Target) -> tuple[str, str]:
        return (str(target.connector.ref), target.connector.address)

    async def _scheme(self, target: Target) -> Scheme:
        """What the registry asks for, from an anonymous C{GET /v2/} (once per Connector)."""
        key = self._scheme_key(target)
        known = self._schemes.get(key)
        if known is not None:
            return known
        return await self._probes.run(key, lambda: Deferred.fromCoroutine(self._probe(target, key)))

    async def _probe(self, target: Target, key: tuple[str, str]) -> Scheme:
        headers = Headers({b"Accept": [b"application/json"]})
        response = await relay.send(target, b"GET", target.upstream_base + b"/v2/", headers, None)
        challenges = parse_challenges(response.headers.getRawHeaders(b"www-authenticate", []))
        await relay.discard(response)
        scheme = scheme_of(challenges) if response.code == 401 else NONE
        self._schemes[key] = scheme
        return scheme

    async def _authorize(self, target: Target, scheme: Scheme, scopes: tuple[str, ...],
                         credentials: RegistryCredentials | None) -> _Authorized:
        if scheme.kind == "basic":
            return _Authorized(credentials.basic() if credentials else None)
        if scheme.kind == "bearer-direct":
            bearer = credentials.bearer if credentials else None
            return _Authorized(b"Bearer " + bearer.encode() if bearer else None)
        if scheme.kind != "bearer" or not scopes:
            return _Authorized()
        challenge = scheme.challenge
        assert challenge is not None and challenge.realm is not None
        if credentials is not None and not realm_allowed(target.connector.address, challenge.realm):
            raise bad_gateway(
                f"the registry names a token realm ({challenge.realm}) that the Connector's credentials "
                "must not be sent to (plain HTTP behind an HTTPS registry)"
            )
        key = TokenKey(str(target.connector.ref), challenge.realm,
                       challenge.service or "", " ".join(scopes), fingerprint(credentials))
        token = await self.tokens.get(
            key, lambda: Deferred.fromCoroutine(self._fetch_token(target, challenge, scopes, credentials)))
        return _Authorized(b"Bearer " + token.encode(), key, token)

    async def _fetch_token(self, target: Target, challenge: Challenge, scopes: tuple[str, ...],
                           credentials: RegistryCredentials | None) -> IssuedToken:
        spec = token_request(challenge, scopes, credentials)
        headers = Headers({name: [value] for name, value in spec.headers.items()})
        body = _bytes_producer(spec.body) if spec.body is not None else None
        response = await relay.send(target.for_url(spec.url), spec.method, spec.url, headers, body)
        answer = await relay.read_body(response, TOKEN_RESPONSE_LIMIT)
        if response.code in (401, 403):
            raise refused(target, scopes)
        if response.code != 200:
            raise bad_gateway(f"the registry's token service answered {response.code} for {' '.join(scopes)}")
        try:
            return parse_token_response(answer)
        except TokenResponseError as e:
            raise bad_gateway(str(e)) from None

    def _headers(self, request: ProxyRequest, authorization: bytes | None) -> Headers:
        # Registries build Location and Link URLs on X-Forwarded-Host and
        # -Proto: the client's host with the registry's paths, which path
        # mode and address prefixes cannot map back.  Without them the URLs
        # name the registry, and are mapped like any other.  Registry
        # clients keep no cookies; the proxy's own must not leak.
        headers = relay.forwarded_headers(request, origin=False, drop=_NO_COOKIES)
        if authorization is not None:
            headers.setRawHeaders(b"Authorization", [authorization])
        return headers

    async def _send(self, request: ProxyRequest, target: Target, url: bytes,
                    scopes: tuple[str, ...]) -> tuple[IResponse, tuple[bytes | str | None, ...]]:
        """
        Send the request upstream with the right credentials; on a 401,
        refresh once and send again when the request has no body.  Returns
        the response and what was injected (C{Authorization} values and
        registry tokens), which must not come back reflected.
        """
        credentials = registry_credentials(target.credentials)
        scheme = await self._scheme(target)
        auth = await self._authorize(target, scheme, scopes, credentials)
        response = await relay.send(target, request.method, url, self._headers(request, auth.value),
                                    request.body, request)
        if response.code != 401:
            return response, (auth.value, auth.token)
        first = auth
        challenges = parse_challenges(response.headers.getRawHeaders(b"www-authenticate", []))
        await relay.discard(response)
        fresh = scheme_of(challenges)
        if fresh != scheme:
            self._schemes[self._scheme_key(target)] = fresh
        if request.body is not None or fresh.kind == "none":
            # The body has gone upstream and cannot be sent again.
            raise refused(target, scopes)
        if auth.key is not None and auth.token is not None:
            self.tokens.invalidate(auth.key, auth.token)
        if fresh.challenge is not None:
            scopes = merge_scopes(scopes, fresh.challenge.scopes)
        auth = await self._authorize(target, fresh, scopes, credentials)
        response = await relay.send(target, request.method, url, self._headers(request, auth.value), None, request)
        if response.code == 401:
            await relay.discard(response)
            raise refused(target, scopes)
        return response, (auth.value, auth.token, first.value, first.token)

    # -- the response -------------------------------------------------------

    async def _respond(self, request: ProxyRequest, target: Target, oci: OciPath, names: NameMap,
                       url: str, response: IResponse, secrets: Secrets) -> None:
        address = target.connector.address
        client_base = target.client_base.decode("latin-1")
        headers = client_response_headers(response.headers, secrets)
        for name in _NOT_TO_CLIENT:
            headers.removeHeader(name)
        location = response.headers.getRawHeaders(b"location")
        if location:
            rewritten = rewrite_upstream_url(location[0].decode("latin-1"), url, address, names, client_base)
            if rewritten.foreign is not None and 300 <= response.code < 400 and oci.kind == BLOB:
                await relay.discard(response)
                await self._follow(request, target, oci, rewritten.foreign, secrets)
                return
            if rewritten.local is not None:
                headers.setRawHeaders(b"Location", [rewritten.local.encode("latin-1")])
        links = headers.getRawHeaders(b"link")
        if links:
            headers.setRawHeaders(b"Link", [
                rewrite_link(v.decode("latin-1"), url, address, names).encode("latin-1") for v in links
            ])
        # Rewritten URLs keep their queries: checked again.
        drop_reflected(headers, secrets)
        if names.prefix and request.method != b"HEAD" and (
            (oci.kind in (TAGS, CATALOG) and response.code == 200) or response.code >= 400
        ):
            body = await relay.read_body(response, MAX_REWRITTEN_BODY)
            kind = oci.kind if response.code == 200 else "error"
            relay.send_bytes(request, response.code, headers, secrets.mask(rewrite_json_names(kind, body, names)))
            return
        await relay.stream_response(request, response, headers, secrets=secrets)

    async def _follow(self, request: ProxyRequest, target: Target, oci: OciPath, url: str,
                      secrets: Secrets) -> None:
        """
        Fetch a blob from the storage backend a registry redirected to,
        without any credentials, and stream it to the client as if the
        registry had answered.
        """
        headers = Headers()
        for name in _FOLLOW_HEADERS:
            values = request.requestHeaders.getRawHeaders(name)
            if values:
                headers.setRawHeaders(name, values)
        for _ in range(MAX_REDIRECTS):
            raw = url.encode("latin-1")
            response = await relay.send(target.for_url(raw), request.method, raw, headers, None, request)
            location = response.headers.getRawHeaders(b"location")
            if 300 <= response.code < 400 and location:
                await relay.discard(response)
                url = urljoin(url, location[0].decode("latin-1"))
                continue
            if response.code not in (200, 206):
                await relay.discard(response)
                raise bad_gateway(f"the blob storage the registry redirected to answered {response.code}")
            out = Headers()
            for name in _BLOB_HEADERS:
                values = response.headers.getRawHeaders(name)
                if values:
                    out.setRawHeaders(name, values)
            if oci.reference:
                out.setRawHeaders(b"Docker-Content-Digest", [oci.reference.encode("latin-1")])
            drop_reflected(out, secrets)
            await relay.stream_response(request, response, out, secrets=secrets)
            return
        raise bad_gateway(f"more than {MAX_REDIRECTS} redirects for a blob")

