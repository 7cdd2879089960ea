# -*- test-case-name: tests.test_memory_router,tests.test_hostile -*-
"""
Where a request is routed and checked: the root resource.

For every request, in this order and before the upstream is contacted:
route (400 for targets that cannot be served safely), token present (401),
token valid (401), identity allowed on the Connector (403), Connector known
(404); forward-proxy requests answer 407 instead of 401, and their targets
under no listed Connector follow C{--forward-unlisted}; then the Connector's credentials and agent are resolved into a
L{Target} and the request is handed to the resource of the class's protocol
(REST, git, OCI).  One access-log event is written when the response ends.

A C{CONNECT host:port} is checked the same way (407, 401, 403) before its
tunnel exists: to a listed Connector's origin it is intercepted (the
proxy's CA answers the client's TLS, L{connectors_proxy.tls.intercept},
and the requests inside are served here like any other, as absolute-form
C{https://host:port/...} requests with the C{CONNECT}'s credentials);
elsewhere it is a plain byte tunnel (L{connectors_proxy.upstream.tunnel})
or a 403, as C{--forward-unlisted} says.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Union
from urllib.parse import urlsplit

from attrs import define, evolve, field, frozen
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from connectors_proxy import compat
from connectors_proxy.auth.identity import Presented, presented_token
from connectors_proxy.auth.interfaces import Identity, IIdentityVerifier, VerifierUnavailable
from connectors_proxy.auth.rego import RegoHooks
from connectors_proxy.model.credentials import CredentialsUnavailable, resolve
from connectors_proxy.model.objects import Connector, ConnectorClass, ObjectRef
from connectors_proxy.model.protocols import DEFAULT as DEFAULT_PROTOCOL
from connectors_proxy.model.state import Snapshot, Store
from connectors_proxy.protocols import ProtocolResource
from connectors_proxy.protocols.forward import FORWARD, ForwardResource
from connectors_proxy.server import accesslog, errors, limits
from connectors_proxy.server.channel import ProxyRequest
from connectors_proxy.server.connect import (
    ESTABLISHED,
    ConnectContext,
    TunnelStats,
    authority,
    inner_target,
    parse_authority,
)
from connectors_proxy.server.headers import same_origin
from connectors_proxy.server.routing import BadTarget, Route, host_connector, route
from connectors_proxy.tls.intercept import InterceptTLS
from connectors_proxy.tls.serve import client_identity
from connectors_proxy.upstream import hooks
from connectors_proxy.upstream.agents import ConnectorAgents
from connectors_proxy.upstream.forward import ForwardAgents, ForwardRefused
from connectors_proxy.upstream.relay import describe_connect_error, send_error
from connectors_proxy.upstream.target import Target, client_base
from connectors_proxy.upstream.tunnel import open_tunnel

log = Logger()


NAMES_NO_CONNECTOR = ("the request names no Connector: use host c-NAME.NAMESPACE.svc or path "
                      "/namespaces/NAMESPACE/connectors/NAME/...")


#: C{--forward-unlisted}: what happens to forward-proxy targets under no listed Connector.
FORWARD_UNLISTED = ("allow", "deny")


def forward_unlisted_policy(value: str) -> str:
    """C{--forward-unlisted} as given, checked (a C{usage.Options} coerce function)."""
    if value not in FORWARD_UNLISTED:
        raise ValueError(f"must be {' or '.join(FORWARD_UNLISTED)}, not {value!r}")
    return value


@frozen
class Listed:
    """
    A forward-proxy target under a listed Connector's C{spec.address} or one
    of its C{spec.addressExtensions}: it gets that Connector's credentials.

    @ivar address: the address it is under (the upstream base of the request).
    @ivar prefix: that address's path, which the request path starts with.
    """

    ref: ObjectRef
    address: str
    prefix: bytes


@frozen
class Unlisted:
    """A forward-proxy target under no listed Connector, relayed without credentials."""


@frozen
class Refused:
    """A forward-proxy target the proxy does not relay to (C{--forward-unlisted deny}): 403."""

    message: str


ForwardDecision = Union[Listed, Unlisted, Refused]


def forward_decision(origin: str, path: bytes | None, listed: tuple[ObjectRef, ...], snapshot: Snapshot,
                     unlisted: str = "allow", cluster_domain: str | None = None) -> ForwardDecision:
    """
    Where a forward-proxy request for C{origin} (C{scheme://host[:port]})
    and C{path} goes: under which listed Connector, or nowhere listed.

    Each listed Connector's C{spec.address} and C{spec.addressExtensions}
    values are matched as URL prefixes: same scheme, host and port, and the
    path equal to the address's path or below it (segment-wise).  The
    longest matching prefix wins; between equal ones, the Connector listed
    first.  With C{path} C{None} (a C{CONNECT}, decided before its
    requests are read), any listed address on C{origin} matches.

    With C{cluster_domain} (a C{CONNECT}), an origin whose host is a
    Connector's proxy Service name (C{c-NAME.NS.svc.CLUSTER-DOMAIN} or
    C{c-NAME.NS.svc}, any port) is that Connector's, listed or not, as the
    same host is in a reverse-proxy request: the client named it (a tool
    given the Connector's C{https://} proxy address that also has
    C{https_proxy} set), and the identity checks decide the rest.  Its
    requests are then routed by that host, so the prefix is empty.  The
    short C{c-NAME.NS} form is not taken here: as a C{CONNECT} target it
    is as likely a public name (C{c-span.org}) that must stay a tunnel.

    @param unlisted: C{--forward-unlisted}: C{allow} gives L{Unlisted},
        C{deny} gives L{Refused}.
    """
    if cluster_domain is not None:
        host = urlsplit(origin).hostname or ""
        service = host.endswith(".svc") or host.endswith(f".svc.{cluster_domain.lower()}")
        named = host_connector(host.encode("latin-1"), cluster_domain) if service else None
        if named is not None:
            ref = ObjectRef(*named)
            connector_named = snapshot.connectors.get(ref)
            return Listed(ref, connector_named.address if connector_named is not None else "", b"")
    best: Listed | None = None
    for ref in listed:
        connector = snapshot.connectors.get(ref)
        if connector is None:
            continue
        for address in connector.addresses:
            if not same_origin(address, origin):
                continue
            prefix = urlsplit(address).path.rstrip("/").encode("utf-8")
            if path is not None and prefix and not (path == prefix or path.startswith(prefix + b"/")):
                continue
            if best is None or len(prefix) > len(best.prefix):
                best = Listed(ref, address, prefix)
    if best is not None:
        return best
    if unlisted == "allow":
        return Unlisted()
    return Refused(f"{origin} is not the address of a Connector you listed; this proxy only forwards to Connectors")


#: The Connector an unlisted forward-proxy target is counted under (log, metrics, concurrency).
UNLISTED = ObjectRef("-", "-")

#: The protocol label of a C{CONNECT}'s own access line (its tunnel's requests have their class's).
CONNECT_PROTOCOL = "connect"

FORWARD_NEEDS_CREDENTIALS = ("forward-proxy requests need 'Proxy-Authorization: Basic "
                             "base64(NAMESPACE/CONNECTOR:TOKEN)'")


def _connect_failure(error: BaseException, target: str) -> str:
    """Why a tunnel to C{target} could not be opened, for the client's 502."""
    return describe_connect_error(error, target) or f"cannot open a tunnel to {target}"


@define
class ConnectorsResource(Resource):
    """The root resource of the proxy listener."""

    store: Store
    verifier: IIdentityVerifier
    agents: ConnectorAgents
    protocols: Mapping[str, ProtocolResource]
    cluster_domain: str = "cluster.local"
    observers: list[Callable[[ProxyRequest, accesslog.AccessRecord], None]] = field(factory=list)
    # Per-Connector concurrency limit (None: unlimited).
    limiter: limits.ConcurrencyLimiter | None = None
    # Forward-proxy targets under no listed Connector: relayed without
    # credentials ("allow") or refused ("deny"); and the agents that relay
    # them (default: real ones on the Connectors' reactor).
    forward_unlisted: str = "allow"
    forward_agents: ForwardAgents | None = None
    # ConnectorClass Rego hooks; their evaluator processes start when a
    # class with hooks is first used.
    rego: RegoHooks = field(factory=RegoHooks)
    # The proxy CA that answers intercepted CONNECT tunnels
    # (--proxy-ca-cert/--proxy-ca-key); without it, a CONNECT to a listed
    # Connector gets 503.
    intercept: InterceptTLS | None = None
    isLeaf = True

    def __attrs_post_init__(self) -> None:
        Resource.__init__(self)
        if FORWARD not in self.protocols:
            # Unlisted forward-proxy targets are served like a protocol of their own.
            self.protocols = {**self.protocols, FORWARD: ForwardResource()}
        if self.forward_agents is None:
            self.forward_agents = ForwardAgents(self.agents.agents.reactor, timeouts=self.agents.agents.timeouts)

    def render(self, request: ProxyRequest) -> Any:  # type: ignore[override]
        started = time.monotonic()
        context: dict[str, Any] = {}
        request.notifyFinish().addBoth(self._finished, request, started, context)
        if request.method == b"CONNECT":
            Deferred.fromCoroutine(self._serve_connect(request, context))
        else:
            Deferred.fromCoroutine(self._serve(request, context))
        return NOT_DONE_YET

    async def _serve(self, request: ProxyRequest, context: dict[str, Any]) -> None:
        # Whose error format applies: text until the request is known to be
        # another protocol's (by its path before routing, by its Connector's
        # class after).
        protocol = self.protocols[DEFAULT_PROTOCOL]
        target: Target | None = None
        connect = _connect_context(request)
        try:
            try:
                if connect is None:
                    if not request.uri.startswith(b"/"):
                        context["mode"] = "forward"
                    r = route(request.uri, request.getHeader(b"host"), self.cluster_domain)
                else:
                    # Inside an intercepted tunnel: as if sent in absolute form to its origin.
                    context["mode"] = "connect"
                    r = route(inner_target(connect, request.uri, request.getHeader(b"host")), None,
                              self.cluster_domain)
            except BadTarget as e:
                raise errors.bad_request(str(e)) from None
            protocol = self._claimant(r)
            target = await self._resolve(request, r, context)
            if target is None:
                if not protocol.serve_unrouted(request, r):
                    raise errors.not_found(NAMES_NO_CONNECTOR)
                return
            name = target.connector_class.protocol
            context["protocol"] = name
            served = self.protocols.get(name)
            if served is None:
                raise errors.unavailable(f"protocol {name!r} is not served here")
            protocol = served
            if self.limiter is not None:
                await limits.admit(self.limiter, request, target.connector.ref, who=target.identity.username)
            await protocol.serve(request, target)
            return
        except errors.ProxyError as e:
            error = e
        except Exception:
            error = _internal_error(request, "serving {uri} failed")
        send_error(request, error.status, *protocol.error_response(request, error, target))

    def _claimant(self, r: Route) -> ProtocolResource:
        """The protocol whose clients send requests like C{r}'s (text/REST when none claims it)."""
        for resource in self.protocols.values():
            if resource.claims(r):
                return resource
        return self.protocols[DEFAULT_PROTOCOL]

    async def _authenticate(self, request: ProxyRequest, certified: Identity | None,
                            extracted: Presented | None = None) -> tuple[Identity, Presented | None]:
        # A client certificate verified by a cptls listener with clientCA=
        # (C{certified}: L{_certified}, read once per request by the caller)
        # is an identity of its own; otherwise the token decides: where the
        # class's authExtractor found it (C{extracted}), else Basic/Bearer.
        presented = extracted if extracted is not None else \
            presented_token(request.getHeader(b"authorization"), _proxy_authorization(request))
        if certified is not None:
            return certified, presented
        if presented is None:
            raise errors.unauthorized(
                "no token: send your ServiceAccount token as 'Authorization: Bearer TOKEN' "
                "or as the password of Basic authentication"
            )
        try:
            identity = await self.verifier.authenticate(presented.token)
        except VerifierUnavailable:
            # The verifier logs an outage once; a line per request would flood.
            raise errors.unavailable("cannot verify the token right now; retry later") from None
        except Exception:
            log.failure("token review failed")
            raise errors.unavailable("cannot verify the token right now; retry later") from None
        if identity is None:
            raise errors.unauthorized("the token was not accepted (unknown, expired or revoked)")
        return identity, presented

    async def _resolve(self, request: ProxyRequest, r: Route, context: dict[str, Any]) -> Target | None:
        """The routed target of C{request}, or C{None} when it names no Connector."""
        # A forward-proxy request (absolute form, no Connector host): its
        # token is in Proxy-Authorization, and without a valid one the
        # answer is the proxy's challenge (some clients send credentials
        # only after it), never a 401 the client would take for the target's.
        forward = r.origin is not None and not r.names_connector
        certified = _certified(request)
        if forward and not _proxy_authorization(request) and certified is None:
            raise errors.proxy_unauthorized(FORWARD_NEEDS_CREDENTIALS)
        extracted: Presented | None = None
        named_ref = ObjectRef(r.namespace or "", r.name or "") if r.names_connector else None
        if named_ref is not None:
            # The class's Rego authExtractor may find the token elsewhere
            # (glab's Private-Token): the class is known once the Connector
            # is, so it is looked up first (an unknown one still gets 401
            # before 404).
            peek = self.store.snapshot
            named = peek.connectors.get(named_ref)
            named_class = peek.connector_class(named) if named is not None else None
            if named_class is not None and named_class.extractor is not None:
                extracted, r = await hooks.extract(self.rego, request, named_class, r, None)
        try:
            identity, presented = await self._authenticate(request, certified, extracted)
        except errors.ProxyError as e:
            if forward and e.status == 401:
                raise errors.proxy_unauthorized(e.message) from None
            raise
        context["identity"] = identity.username

        snapshot = self.store.snapshot
        address: str | None = None
        if named_ref is not None:
            ref = named_ref
        elif r.origin is not None:
            decision = forward_decision(r.origin.decode("latin-1"), r.rest.split(b"?", 1)[0],
                                        presented.listed if presented else (), snapshot, self.forward_unlisted)
            if isinstance(decision, Refused):
                raise errors.forbidden(decision.message)
            if isinstance(decision, Unlisted):
                return self._unlisted(request, identity, r)
            ref, address = decision.ref, decision.address
            r = evolve(r, rest=r.rest[len(decision.prefix):], client_prefix=decision.prefix)
        else:
            # No Connector named: a protocol may still answer (the OCI ping).
            return None
        context["namespace"], context["connector"] = ref.namespace, ref.name
        await self._authorize(identity, ref)

        connector = snapshot.connectors.get(ref)
        if connector is None:
            raise errors.not_found(f"Connector {ref} not found")
        if address is not None and address != connector.address:
            # Under one of its addressExtensions: that is the upstream base.
            connector = evolve(connector, address=address)
        # A class's Rego generator places the credentials (per request).
        return await hooks.generate(self.rego, request, self._target(request, snapshot, connector, identity, r))

    async def _authorize(self, identity: Identity, ref: ObjectRef) -> None:
        """403 unless C{identity} may use Connector C{ref} (503 when that cannot be checked)."""
        try:
            allowed = await self.verifier.authorize(identity, ref.namespace, ref.name)
        except VerifierUnavailable:
            raise errors.unavailable("cannot check access right now; retry later") from None
        except Exception:
            log.failure("access review failed")
            raise errors.unavailable("cannot check access right now; retry later") from None
        if not allowed:
            raise errors.forbidden(f"{identity.username} may not use Connector {ref}")

    async def _serve_connect(self, request: ProxyRequest, context: dict[str, Any]) -> None:
        """
        C{CONNECT host:port}: the client's credentials first (407 without
        them, 401 turned 407, 403), then to a listed Connector's origin an
        intercepted tunnel, elsewhere a plain tunnel or 403
        (C{--forward-unlisted}); loopback, link-local and the proxy's own
        addresses are refused (403) for plain tunnels as for any unlisted
        forward-proxy target.
        """
        context["mode"] = "tunnel"
        protocol = self.protocols[DEFAULT_PROTOCOL]
        try:
            if _connect_context(request) is not None:
                raise errors.bad_request("CONNECT inside a CONNECT tunnel")
            try:
                host, port = parse_authority(request.uri)
            except BadTarget as e:
                raise errors.bad_request(str(e)) from None
            proxy_authorization = request.getHeader(b"proxy-authorization")
            certified = _certified(request)
            if not proxy_authorization and certified is None:
                raise errors.proxy_unauthorized(
                    "CONNECT needs 'Proxy-Authorization: Basic base64(NAMESPACE/CONNECTOR:TOKEN)'")
            try:
                identity, presented = await self._authenticate(request, certified)
            except errors.ProxyError as e:
                if e.status == 401:
                    raise errors.proxy_unauthorized(e.message) from None
                raise
            context["identity"] = identity.username
            decision = forward_decision(f"https://{authority(host, port)}", None,
                                        presented.listed if presented else (), self.store.snapshot,
                                        self.forward_unlisted, self.cluster_domain)
            if isinstance(decision, Refused):
                raise errors.forbidden(decision.message)
            if isinstance(decision, Unlisted):
                context["namespace"], context["connector"] = UNLISTED.namespace, UNLISTED.name
                context["protocol"] = FORWARD
                await self._tunnel(request, host, port, context)
                return
            ref = decision.ref
            context["namespace"], context["connector"] = ref.namespace, ref.name
            await self._authorize(identity, ref)
            if ref not in self.store.snapshot.connectors:
                # Named by its proxy Service host (c-NAME.NS.svc), and not there.
                raise errors.not_found(f"Connector {ref} not found")
            if self.intercept is None:
                raise errors.unavailable(
                    f"{authority(host, port)} is the address of Connector {ref}, and this proxy has no CA to "
                    f"intercept CONNECT with (--proxy-ca-cert, --proxy-ca-key)")
            context["protocol"] = CONNECT_PROTOCOL
            self._intercept(request, ConnectContext(host, port, proxy_authorization, certified), context)
            return
        except errors.ProxyError as e:
            error = e
        except Exception:
            error = _internal_error(request, "serving CONNECT {uri} failed")
        send_error(request, error.status, *protocol.error_response(request, error, None))

    def _intercept(self, request: ProxyRequest, connect: ConnectContext, context: dict[str, Any]) -> None:
        """Answer 200 and serve the tunnel's requests over TLS as C{connect.host}, on a channel of their own."""
        assert self.intercept is not None
        channel = request.channel
        inner = channel.site.buildProtocol(channel.transport.getPeer())
        inner.connect_context = connect
        # The tunnel's own bytes (TLS records each way), for the CONNECT's access line.
        stats = TunnelStats()
        try:
            protocol = self.intercept.protocol(connect.host, inner, stats)
        except ValueError as e:
            # A name the CA cannot put in a certificate.
            raise errors.bad_request(f"cannot intercept CONNECT to {connect.host}: {e}") from None
        context["tunnel"] = stats
        _established(request)
        channel.take_over(protocol, counted=False)

    async def _tunnel(self, request: ProxyRequest, host: str, port: int, context: dict[str, Any]) -> None:
        """Connect to C{host:port} through the forward proxy's guard, answer 200, relay bytes."""
        assert self.forward_agents is not None
        target = authority(host, port)
        # The idle timeout of the site's connections (the channel's own is
        # off while it handles a request).
        d = open_tunnel(self.forward_agents, host, port, self.forward_agents.reactor,
                        getattr(request.channel.site, "timeOut", None))
        # A client that leaves while the target is being reached cancels it.
        request.notifyFinish().addErrback(lambda _: d.cancel())
        try:
            tunnel = await d
        except ForwardRefused as e:
            raise errors.forbidden(e.message) from None
        except CancelledError:
            raise errors.ProxyError(499, "CLIENT_CLOSED", "client went away") from None
        except Exception as e:
            raise errors.bad_gateway(_connect_failure(e, target)) from None
        if request.finished or compat.request_gone(request):
            tunnel.abort()
            return
        context["tunnel"] = tunnel.stats
        _established(request)
        request.channel.take_over(tunnel.client)

    def _unlisted(self, request: ProxyRequest, identity: Identity, r: Route) -> Target:
        """The target of a forward-proxy request under no listed Connector: no credentials, guarded agent."""
        assert r.origin is not None and self.forward_agents is not None
        return Target(
            connector=Connector(namespace=UNLISTED.namespace, name=UNLISTED.name, class_name="",
                                address=r.origin.decode("latin-1"), auth_name=None, secret_ref=None,
                                ca_secret_ref=None),
            connector_class=ConnectorClass(name="", protocol=FORWARD, auth_types=(), proxy=None),
            identity=identity,
            route=r,
            credentials=None,
            agent=self.forward_agents.agent(),
            client_base=client_base(request),
        )

    def _target(self, request: ProxyRequest, snapshot: Snapshot, connector: Connector,
                identity: Identity, r: Route) -> Target:
        connector_class = snapshot.connector_class(connector)
        if connector_class is None:
            raise errors.unavailable(
                f"ConnectorClass {connector.class_name!r} of Connector {connector.ref} not found"
            )
        try:
            credentials = resolve(connector, connector_class, snapshot)
        except CredentialsUnavailable as e:
            raise errors.unavailable(e.message) from None
        agent, foreign_agent = self.agents.for_connector(connector, snapshot)
        return Target(
            connector=connector,
            connector_class=connector_class,
            identity=identity,
            route=r,
            credentials=credentials,
            agent=agent,
            foreign_agent=foreign_agent,
            client_base=client_base(request),
        )

    def _finished(self, result: object, request: ProxyRequest, started: float,
                  context: Mapping[str, Any]) -> None:
        failed, begun = isinstance(result, Failure), bool(request.startedWriting)
        tunnel: TunnelStats | None = context.get("tunnel")
        if tunnel is not None:
            # A CONNECT whose tunnel was open: it ends when the connection does.
            status, bytes_in, bytes_out, truncated = 200, tunnel.received, tunnel.sent, None
        else:
            status = accesslog.status_of(request.code, failed, begun, request.fault)
            bytes_in = request.body.received if request.body is not None else 0
            bytes_out, truncated = request.sentLength, accesslog.truncated_by(failed, begun, request.truncated)
        peer = request.getClientAddress()
        record = accesslog.AccessRecord(
            client=getattr(peer, "host", "-"),
            identity=context.get("identity", "-"),
            namespace=context.get("namespace", "-"),
            connector=context.get("connector", "-"),
            protocol=context.get("protocol", "-"),
            method=request.method.decode("latin-1"),
            path=accesslog.redact_target(request.uri),
            status=status,
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            duration_ms=round((time.monotonic() - started) * 1000, 2),
            fault=request.fault,
            truncated=truncated,
            mode=context.get("mode", "reverse"),
        )
        accesslog.emit(record)
        for observer in self.observers:
            observer(request, record)


def _internal_error(request: ProxyRequest, what: str) -> errors.ProxyError:
    """
    Log the exception being handled (C{what}: a log format with C{{uri}},
    given the redacted request target) and make the client's 500, which
    names nothing of it.
    """
    log.failure(what, uri=accesslog.redact_target(request.uri))
    return errors.ProxyError(500, "INTERNAL", "internal error (see the proxy's log)")


def _connect_context(request: ProxyRequest) -> ConnectContext | None:
    """The intercepted C{CONNECT} C{request} was read inside, if any."""
    return getattr(request.channel, "connect_context", None)


def _proxy_authorization(request: ProxyRequest) -> bytes | None:
    """
    The C{Proxy-Authorization} that speaks for C{request}: inside an
    intercepted tunnel, the C{CONNECT}'s (whatever the requests inside
    carry); otherwise its own.
    """
    connect = _connect_context(request)
    if connect is not None:
        return connect.proxy_authorization
    return request.getHeader(b"proxy-authorization")


def _certified(request: ProxyRequest) -> Identity | None:
    """The identity a verified client certificate proved for C{request}'s connection (or its C{CONNECT}'s)."""
    certified = client_identity(request.channel.transport)
    connect = _connect_context(request)
    if certified is None and connect is not None:
        return connect.certified  # type: ignore[no-any-return]
    return certified


def _established(request: ProxyRequest) -> None:
    """The C{200} a relayed C{CONNECT} gets: exactly the status line, no headers, no body framing."""
    request.setResponseCode(200, b"Connection established")
    request.channel.transport.write(ESTABLISHED)
