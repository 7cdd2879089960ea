# -*- test-case-name: tests.test_resource -*-
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
from connectors_proxy.model.state import Snapshot, Store
from connectors_proxy.protocols import ProtocolResource
from connectors_proxy.server import accesslog, errors, limits
from connectors_proxy.server.channel import ProxyRequest
from connectors_proxy.server.errors import OCI_PING_HEADERS
from connectors_proxy.server.headers import same_origin
from connectors_proxy.server.routing import BadTarget, Route, route
from connectors_proxy.tls.serve import client_identity
from connectors_proxy.upstream.agents import ConnectorAgents
from connectors_proxy.upstream.relay import send_bytes, send_error
from connectors_proxy.upstream.target import Target, client_base

log = Logger()


def is_oci_path(rest: bytes) -> bool:
    return rest == b"/v2" or rest.startswith(b"/v2/")


def is_oci_ping(rest: bytes) -> bool:
    return rest.split(b"?", 1)[0] in (b"/v2", b"/v2/")


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
        oci = False
        try:
            try:
                r = route(request.uri, request.getHeader(b"host"), self.cluster_domain)
            except BadTarget as e:
                raise errors.bad_request(str(e)) from None
            oci = r.oci_path or is_oci_path(r.rest)
            target = await self._resolve(request, r, context)
            if target is None:
                # An OCI ping in path mode: no Connector, only authentication.
                send_bytes(request, 200, OCI_PING_HEADERS, b"{}")
                return
            context["protocol"] = target.connector_class.protocol
            request.target = target
            resource = self.protocols.get(target.connector_class.protocol)
            if resource is None:
                raise errors.unavailable(f"protocol {target.connector_class.protocol!r} is not served here")
            if self.limiter is not None:
                await limits.admit(self.limiter, request, target.connector.ref, str(target.connector.ref),
                                   target.identity.username)
            await resource.serve(request)
        except errors.ProxyError as e:
            send_error(request, e, oci)
        except Exception:
            log.failure("routing {uri} failed", uri=accesslog.redact_target(request.uri))
            send_error(request, errors.ProxyError(500, "INTERNAL", "internal error (see the proxy's log)"), oci)

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
        elif is_oci_ping(r.rest):
            return None
        else:
            raise errors.not_found(
                "the request names no Connector: use host c-NAME.NAMESPACE.svc or path "
                "/namespaces/NAMESPACE/connectors/NAME/..."
            )
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
            status=request.code if not isinstance(result, Failure) or request.startedWriting else 499,
            bytes_in=request.body.received if request.body is not None else 0,
            bytes_out=request.sentLength,
            duration_ms=round((time.monotonic() - started) * 1000, 2),
        )
        accesslog.emit(record)
        for observer in self.observers:
            observer(request, record)
