# -*- test-case-name: tests.test_memory_router,tests.test_hostile -*-
"""
Where a request is routed and checked: the root resource.

For every request, in this order and before the upstream is contacted:
route (400 for targets that cannot be served safely), token present (401),
token valid (401), identity allowed on the Connector (403), Connector known
(404); then the Connector's credentials and agent are resolved into a
L{Target} and the request is handed to the resource of the class's protocol
(REST, git, OCI).  One access-log event is written when the response ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from attrs import define, evolve, field
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from connectors_proxy.auth.identity import Presented, presented_token
from connectors_proxy.auth.interfaces import Identity, IIdentityVerifier, VerifierUnavailable
from connectors_proxy.model.credentials import CredentialsUnavailable, resolve
from connectors_proxy.model.objects import Connector, ObjectRef
from connectors_proxy.model.protocols import DEFAULT as DEFAULT_PROTOCOL
from connectors_proxy.model.state import Snapshot, Store
from connectors_proxy.protocols import ProtocolResource
from connectors_proxy.server import accesslog, errors, limits
from connectors_proxy.server.channel import ProxyRequest
from connectors_proxy.server.headers import same_origin
from connectors_proxy.server.routing import BadTarget, Route, route
from connectors_proxy.tls.serve import client_identity
from connectors_proxy.upstream.agents import ConnectorAgents
from connectors_proxy.upstream.relay import send_error
from connectors_proxy.upstream.target import Target, client_base

log = Logger()


NAMES_NO_CONNECTOR = ("the request names no Connector: use host c-NAME.NAMESPACE.svc or path "
                      "/namespaces/NAMESPACE/connectors/NAME/...")


def forward_connector(route_: Route, listed: tuple[ObjectRef, ...],
                      snapshot: Snapshot) -> tuple[ObjectRef, Route] | None:
    """
    For a forward-proxy request (absolute-form target whose host is not a
    Connector host), the listed Connector whose address serves that origin
    and whose path prefix covers the path, and the route re-expressed
    relative to that address.
    """
    assert route_.origin is not None
    wanted = route_.origin.decode("latin-1")
    path = route_.rest.split(b"?", 1)[0]
    for ref in listed:
        connector = snapshot.connectors.get(ref)
        if connector is None or not same_origin(connector.address, wanted):
            continue
        prefix = urlsplit(connector.address).path.rstrip("/").encode("utf-8")
        if not prefix or path == prefix or path.startswith(prefix + b"/"):
            return ref, evolve(route_, rest=route_.rest[len(prefix):], client_prefix=prefix)
    return None


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
    isLeaf = True

    def __attrs_post_init__(self) -> None:
        Resource.__init__(self)

    def render(self, request: ProxyRequest) -> Any:  # type: ignore[override]
        started = time.monotonic()
        context: dict[str, str] = {}
        request.notifyFinish().addBoth(self._finished, request, started, context)
        Deferred.fromCoroutine(self._serve(request, context))
        return NOT_DONE_YET

    async def _serve(self, request: ProxyRequest, context: dict[str, str]) -> None:
        # Whose error format applies: text until the request is known to be
        # another protocol's (by its path before routing, by its Connector's
        # class after).
        protocol = self.protocols[DEFAULT_PROTOCOL]
        target: Target | None = None
        try:
            try:
                r = route(request.uri, request.getHeader(b"host"), self.cluster_domain)
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
                await limits.admit(self.limiter, request, target.connector.ref, str(target.connector.ref),
                                   target.identity.username)
            await protocol.serve(request, target)
            return
        except errors.ProxyError as e:
            error = e
        except Exception:
            log.failure("serving {uri} failed", uri=accesslog.redact_target(request.uri))
            error = errors.ProxyError(500, "INTERNAL", "internal error (see the proxy's log)")
        send_error(request, error.status, *protocol.error_response(request, error, target))

    def _claimant(self, r: Route) -> ProtocolResource:
        """The protocol whose clients send requests like C{r}'s (text/REST when none claims it)."""
        for resource in self.protocols.values():
            if resource.claims(r):
                return resource
        return self.protocols[DEFAULT_PROTOCOL]

    async def _authenticate(self, request: ProxyRequest) -> tuple[Identity, Presented | None]:
        # A client certificate verified by a cptls listener with clientCA=
        # is an identity of its own; otherwise the token decides.
        certified = client_identity(request.channel.transport)
        presented = presented_token(request.getHeader(b"authorization"), request.getHeader(b"proxy-authorization"))
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

    async def _resolve(self, request: ProxyRequest, r: Route, context: dict[str, str]) -> Target | None:
        """The routed target of C{request}, or C{None} when it names no Connector."""
        identity, presented = await self._authenticate(request)
        context["identity"] = identity.username

        snapshot = self.store.snapshot
        if r.names_connector:
            ref = ObjectRef(r.namespace or "", r.name or "")
        elif r.origin is not None:
            found = forward_connector(r, presented.listed if presented else (), snapshot)
            if found is None:
                raise errors.forbidden(
                    f"{r.origin.decode('latin-1')} is not the address of a Connector you listed; "
                    "this proxy only forwards to Connectors"
                )
            ref, r = found
        else:
            # No Connector named: a protocol may still answer (the OCI ping).
            return None
        context["namespace"], context["connector"] = ref.namespace, ref.name

        try:
            allowed = await self.verifier.authorize(identity, ref.namespace, ref.name)
        except VerifierUnavailable:
            raise errors.unavailable("cannot check access right now; retry later") from None
        except Exception:
            log.failure("access review failed")
            raise errors.unavailable("cannot check access right now; retry later") from None
        if not allowed:
            raise errors.forbidden(f"{identity.username} may not use Connector {ref}")

        connector = snapshot.connectors.get(ref)
        if connector is None:
            raise errors.not_found(f"Connector {ref} not found")
        return self._target(request, snapshot, connector, identity, r)

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
                  context: Mapping[str, str]) -> None:
        peer = request.getClientAddress()
        record = accesslog.AccessRecord(
            client=getattr(peer, "host", "-"),
            identity=context.get("identity", "-"),
            namespace=context.get("namespace", "-"),
            connector=context.get("connector", "-"),
            protocol=context.get("protocol", "-"),
            method=request.method.decode("latin-1"),
            path=accesslog.redact_target(request.uri),
            status=accesslog.status_of(request.code, isinstance(result, Failure), bool(request.startedWriting),
                                       request.fault),
            bytes_in=request.body.received if request.body is not None else 0,
            bytes_out=request.sentLength,
            duration_ms=round((time.monotonic() - started) * 1000, 2),
            fault=request.fault,
        )
        accesslog.emit(record)
        for observer in self.observers:
            observer(request, record)
