# -*- test-case-name: tests.test_fakekube_contract -*-
"""
The HTTP face of L{connectors_proxy.testing.fakekube.FakeKube}: a
twisted.web resource that maps kube-apiserver URLs and verbs onto the
fake's API (authentication, RBAC, request counting, watch streams with
bookmarks and timeouts), and the server that listens on a loopback port and
can refuse connections or cut them, as a restarting API server does.
"""

from __future__ import annotations

import base64
import datetime
import json
import uuid
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote

import yaml
from attrs import define, field
from twisted.internet import ssl
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import connectionDone
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from connectors_proxy.testing.fakekube_auth import Attributes, User
from connectors_proxy.testing.fakekube_model import (
    JSON,
    METHOD_NOT_ALLOWED,
    PAGE_NOT_FOUND,
    RESOURCES,
    UNAUTHORIZED,
    UNAVAILABLE,
    ApiError,
    ResourceType,
    bad_request,
    forbidden,
    resource_type,
)

if TYPE_CHECKING:
    from connectors_proxy.testing.fakekube import FakeKube, Watch

_TRUE = ("1", "t", "T", "true", "TRUE", "True")
_BODY_TYPES = ("application/json", "application/yaml")
#: Reason phrases Go's net/http sends and twisted.web does not know.
_PHRASES = {422: b"Unprocessable Entity", 429: b"Too Many Requests", 504: b"Gateway Timeout"}


@define
class Target:
    """What a URL names: a collection or an object, maybe a subresource."""

    rtype: ResourceType
    namespace: str | None
    name: str | None
    subresource: str = ""
    legacy_watch: bool = False

    @property
    def resource(self) -> str:
        """The resource as RBAC and the request counters name it: C{connectors/status}."""
        return self.rtype.plural + ("/" + self.subresource if self.subresource else "")


def parse_target(segments: list[str]) -> Target | None:
    """C{["apis", "g", "v", "namespaces", "ns", "plural", "name", "sub"]} -> L{Target}."""
    if segments[:2] == ["api", "v1"]:
        group, version, rest = "", "v1", segments[2:]
    elif len(segments) >= 3 and segments[0] == "apis":
        group, version, rest = segments[1], segments[2], segments[3:]
    else:
        return None
    legacy = bool(rest) and rest[0] == "watch"
    if legacy:
        rest = rest[1:]
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces" and resource_type(group, version, rest[2]) is not None:
        namespace, rest = rest[1], rest[2:]
    if not rest or len(rest) > 3:
        return None
    rtype = resource_type(group, version, rest[0])
    if rtype is None:
        return None
    name = rest[1] if len(rest) > 1 else None
    sub = rest[2] if len(rest) > 2 else ""
    if rtype.namespaced and name is not None and namespace is None:
        return None
    if not rtype.namespaced and namespace is not None:
        return None
    if sub and sub not in rtype.subresources:
        return None
    return Target(rtype, namespace, name, sub, legacy)


def _verb(method: bytes, target: Target, watch: bool) -> str:
    if method in (b"GET", b"HEAD"):
        if watch or target.legacy_watch:
            return "watch"
        return "get" if target.name is not None else "list"
    if target.legacy_watch:
        raise METHOD_NOT_ALLOWED
    verbs = {b"POST": "create", b"PUT": "update", b"PATCH": "patch", b"DELETE": "delete"}
    verb = verbs.get(method)
    if verb is None:
        raise METHOD_NOT_ALLOWED
    if target.rtype.virtual:
        if verb != "create" or target.name is not None:
            raise METHOD_NOT_ALLOWED
        return verb
    if verb == "create":
        if target.name is None and not target.subresource:
            if target.rtype.namespaced and target.namespace is None:
                raise METHOD_NOT_ALLOWED
            return verb
        if target.subresource == "token":
            return verb
        raise METHOD_NOT_ALLOWED
    if target.name is None:
        if verb == "delete" and (target.namespace is not None or not target.rtype.namespaced):
            return "deletecollection"
        raise METHOD_NOT_ALLOWED
    if target.subresource == "token":
        raise METHOD_NOT_ALLOWED
    if target.subresource and verb == "delete":
        raise METHOD_NOT_ALLOWED
    return verb


@define(eq=False)
class WatchStream:
    """Writes one watch's events to its HTTP response; owns its bookmark and timeout timers."""

    request: Request
    clock: Any
    watch: Watch | None = None
    _timeout: IDelayedCall | None = None
    _bookmarks: LoopingCall | None = None
    _done: bool = False

    def emit(self, event: JSON) -> None:
        if not self._done:
            self.request.write(json.dumps(event, separators=(",", ":")).encode("utf-8") + b"\n")

    def start(self, watch: Watch, timeout: float, bookmark_interval: float) -> None:
        self.watch = watch
        self.request.write(b"")  # the headers go out at once, as the real server flushes them
        self._timeout = self.clock.callLater(timeout, self.end, True)
        if watch.bookmarks and bookmark_interval > 0:
            self._bookmarks = LoopingCall(watch.bookmark)
            self._bookmarks.clock = self.clock
            self._bookmarks.start(bookmark_interval, now=False)
        self.request.notifyFinish().addBoth(self._finished)

    def _stop_timers(self) -> None:
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None
        if self._bookmarks is not None and self._bookmarks.running:
            self._bookmarks.stop()
        self._bookmarks = None
        if self.watch is not None:
            self.watch.stop()

    def _finished(self, _: object) -> None:
        self._done = True
        self._stop_timers()

    def end(self, clean: bool) -> None:
        """Close the stream: a clean end of the chunked body, or a dropped connection."""
        if self._done:
            return
        self._done = True
        self._stop_timers()
        if clean:
            self.request.finish()
        else:
            cast(Any, self.request.transport).abortConnection()


def _dump(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode("utf-8") + b"\n"


class FakeKubeResource(Resource):
    """Every URL of the fake API server (a leaf: it routes by itself)."""

    isLeaf = True

    def __init__(self, fake: FakeKube) -> None:
        super().__init__()
        self.fake = fake

    def render(self, request: Request) -> bytes | int:  # type: ignore[override]
        try:
            return self._route(request)
        except ApiError as e:
            return self._send(request, e.code, e.status())

    def _send(self, request: Request, code: int, body: Any) -> bytes:
        request.setResponseCode(code, _PHRASES.get(code))
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-cache, private")
        request.setHeader(b"Audit-Id", str(uuid.uuid4()).encode())
        return _dump(body)

    def _route(self, request: Request) -> bytes | int:
        fake = self.fake
        if fake.unavailable:
            raise UNAVAILABLE
        path = (request.path or b"/").decode("utf-8", "replace")
        segments = [unquote(s) for s in path.split("/") if s]
        query = {k.decode("utf-8", "replace"): v[-1].decode("utf-8", "replace")
                 for k, v in (request.args or {}).items() if v}
        if segments in (["healthz"], ["livez"], ["readyz"]):
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"ok"
        if segments == ["version"]:
            return self._send(request, 200, {"major": "1", "minor": "32", "gitVersion": "v1.32.0-fakekube",
                                             "platform": "linux/amd64"})
        user = self._authenticate(request)
        discovery = self._discovery(segments)
        if discovery is not None:
            return self._send(request, 200, discovery)
        target = parse_target(segments)
        if target is None:
            raise PAGE_NOT_FOUND
        method = request.method or b"GET"
        watch = query.get("watch", "") in _TRUE
        verb = _verb(method, target, watch)
        fake.counts[(verb, target.resource)] += 1
        # As in the real request info, a namespace object is "in" itself.
        namespace = target.name if target.rtype.plural == "namespaces" else target.namespace
        allowed, _ = fake.authorize(Attributes(user, verb, target.rtype.group, target.rtype.plural,
                                               target.subresource, namespace or "", target.name or ""))
        if not allowed:
            raise forbidden(target.resource, target.rtype.group, verb, user.name, target.namespace,
                            target.name)
        if query.get("dryRun"):
            raise bad_request("dryRun is not supported by this fake API server")
        return self._dispatch(request, user, verb, target, query)

    def _authenticate(self, request: Request) -> User:
        header = (request.getHeader(b"authorization") or b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise UNAUTHORIZED
        user = self.fake.authenticate(token.strip())
        if user is None:
            raise UNAUTHORIZED
        return user

    def _body(self, request: Request) -> Any:
        raw = request.content.read() if request.content is not None else b""
        media = (request.getHeader(b"content-type") or b"application/json").decode("latin-1")
        media = media.split(";")[0].strip().lower()
        if media not in _BODY_TYPES:
            raise ApiError(415, "UnsupportedMediaType", "the body of the request was in an unknown format - "
                           "accepted media types include: application/json, application/yaml")
        try:
            return yaml.safe_load(raw) if media == "application/yaml" else json.loads(raw or b"null")
        except (ValueError, yaml.YAMLError) as e:
            raise bad_request(f"couldn't get version/kind; json parse error: {e}") from None

    def _dispatch(self, request: Request, user: User, verb: str, target: Target,
                  query: dict[str, str]) -> bytes | int:
        fake = self.fake
        rtype, ns, name = target.rtype, target.namespace, target.name
        if verb == "watch":
            return self._watch(request, target, query)
        if verb == "list":
            limit = query.get("limit", "0")
            if not limit.isdigit():
                raise bad_request(f'invalid limit: "{limit}"')
            return self._send(request, 200, fake.list_objects(
                rtype, ns, query.get("labelSelector", ""), query.get("fieldSelector", ""), int(limit),
                query.get("continue", ""), query.get("resourceVersion", "")))
        if verb == "get":
            assert name is not None
            return self._send(request, 200, fake.get_object(rtype, ns, name))
        if verb == "create":
            body = self._body(request)
            if rtype.plural == "tokenreviews":
                return self._send(request, 201, fake.token_review(body))
            if rtype.plural == "subjectaccessreviews":
                return self._send(request, 201, fake.access_review(body))
            if rtype.plural == "selfsubjectaccessreviews":
                return self._send(request, 201, fake.access_review(body, caller=user))
            if target.subresource == "token":
                assert ns is not None and name is not None
                return self._send(request, 201, fake.token_request(ns, name, body))
            return self._send(request, 201, fake.create_object(rtype, ns, body))
        assert name is not None or verb == "deletecollection"
        if verb == "update":
            assert name is not None
            return self._send(request, 200, fake.replace_object(rtype, ns, name, self._body(request),
                                                         target.subresource))
        if verb == "patch":
            assert name is not None
            raw = request.content.read() if request.content is not None else b""
            try:
                patch = json.loads(raw)
            except ValueError as e:
                raise bad_request(f"error decoding patch: {e}") from None
            media = (request.getHeader(b"content-type") or b"").decode("latin-1")
            return self._send(request, 200, fake.patch_object(rtype, ns, name, media, patch, target.subresource))
        if verb == "deletecollection":
            return self._send(request, 200, fake.delete_collection(
                rtype, ns, query.get("labelSelector", ""), query.get("fieldSelector", "")))
        assert name is not None
        raw = request.content.read() if request.content is not None else b""
        options = self._body(request) if raw.strip() else None
        if options is not None and not isinstance(options, dict):
            raise bad_request("DeleteOptions must be an object")
        obj, gone = fake.delete_object(rtype, ns, name, options, query.get("propagationPolicy"))
        if gone and not fake.strategy(rtype).delete_returns_object:
            details: JSON = {"name": name}
            if rtype.group:
                details["group"] = rtype.group
            details.update({"kind": rtype.plural, "uid": obj["metadata"]["uid"]})
            return self._send(request, 200, {"kind": "Status", "apiVersion": "v1", "metadata": {},
                                             "status": "Success", "details": details})
        code = 202 if not gone and options and options.get("orphanDependents") is False else 200
        return self._send(request, code, obj)

    def _watch(self, request: Request, target: Target, query: dict[str, str]) -> int | bytes:
        fake = self.fake
        field_selector = query.get("fieldSelector", "")
        if target.name is not None:
            # A legacy /watch/.../NAME (or GET NAME?watch=1) watches one object.
            field_selector = ",".join(s for s in (field_selector, f"metadata.name={target.name}") if s)
        timeout = fake.watch_timeout
        if query.get("timeoutSeconds"):
            try:
                timeout = float(int(query["timeoutSeconds"]))
            except ValueError:
                raise bad_request(f'invalid timeoutSeconds: "{query["timeoutSeconds"]}"') from None
        bookmarks = query.get("allowWatchBookmarks", "") in _TRUE
        initial = query.get("sendInitialEvents", "") in _TRUE
        if initial and (not bookmarks or query.get("resourceVersionMatch") != "NotOlderThan"):
            raise ApiError(422, "Invalid", "sendInitialEvents requires allowWatchBookmarks=true and "
                           "resourceVersionMatch=NotOlderThan")
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-cache, private")
        stream = WatchStream(request, fake.clock)
        try:
            watch = fake.watch(target.rtype, target.namespace, label_selector=query.get("labelSelector", ""),
                               field_selector=field_selector, resource_version=query.get("resourceVersion", ""),
                               bookmarks=bookmarks, send_initial_events=initial, emit=stream.emit,
                               end=stream.end)
        except ApiError as e:
            if e.code != 410:
                raise
            # Past authorization, the real server reports an expired version
            # as an ERROR event on a 200 stream, then ends it.
            stream.emit({"type": "ERROR", "object": e.status()})
            request.finish()
            return NOT_DONE_YET
        stream.start(watch, timeout, fake.bookmark_interval)
        return NOT_DONE_YET

    def _discovery(self, segments: list[str]) -> JSON | None:
        groups: dict[str, list[str]] = {}
        for rtype in RESOURCES:
            if rtype.group:
                versions = groups.setdefault(rtype.group, [])
                if rtype.version not in versions:
                    versions.append(rtype.version)
        if segments == ["api"]:
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
        if segments == ["apis"]:
            return {"kind": "APIGroupList", "apiVersion": "v1",
                    "groups": [_group(name, versions) for name, versions in groups.items()]}
        if len(segments) == 2 and segments[0] == "apis" and segments[1] in groups:
            return {"kind": "APIGroup", "apiVersion": "v1", **_group(segments[1], groups[segments[1]])}
        if segments == ["api", "v1"]:
            return _resource_list("", "v1")
        if len(segments) == 3 and segments[0] == "apis" and segments[2] in groups.get(segments[1], []):
            return _resource_list(segments[1], segments[2])
        return None


def _group(name: str, versions: list[str]) -> JSON:
    listed = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
    return {"name": name, "versions": listed, "preferredVersion": listed[0]}


def _resource_list(group: str, version: str) -> JSON:
    resources = []
    for rtype in RESOURCES:
        if (rtype.group, rtype.version) != (group, version):
            continue
        verbs = ["create"] if rtype.virtual else ["create", "delete", "deletecollection", "get", "list",
                                                  "patch", "update", "watch"]
        entry: JSON = {"name": rtype.plural, "singularName": rtype.kind.lower(), "namespaced": rtype.namespaced,
                       "kind": rtype.kind, "verbs": verbs}
        if rtype.short_names:
            entry["shortNames"] = list(rtype.short_names)
        if rtype.categories:
            entry["categories"] = list(rtype.categories)
        resources.append(entry)
        for sub in sorted(rtype.subresources):
            sub_kind = "TokenRequest" if sub == "token" else rtype.kind
            sub_group = {"group": "authentication.k8s.io", "version": "v1"} if sub == "token" else {}
            resources.append({"name": f"{rtype.plural}/{sub}", "singularName": "", "namespaced": rtype.namespaced,
                              "kind": sub_kind, **sub_group,
                              "verbs": ["create"] if sub == "token" else ["get", "patch", "update"]})
    return {"kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version, "resources": resources}


class _Channel(HTTPChannel):
    """An HTTP connection the server can cut (its factory keeps the set of open ones)."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.lost: Deferred[None] = Deferred()
        self.factory.connections.add(self)  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.factory.connections.discard(self)  # type: ignore[attr-defined]
        self.lost.callback(None)


class _Site(Site):
    protocol = _Channel  # type: ignore[assignment]

    def __init__(self, resource: Resource, reactor: Any) -> None:
        super().__init__(resource, reactor=reactor)
        self.connections: set[_Channel] = set()


def _self_signed() -> tuple[bytes, bytes]:
    """A throw-away certificate for 127.0.0.1 and localhost: (cert PEM, key PEM)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fakekube")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


@define(eq=False)
class FakeKubeServer:
    """
    A L{FakeKube} listening on 127.0.0.1.  C{cut_connections} drops every
    open connection (watches included) the way an API server restart does;
    C{refuse}/C{accept} close and reopen the port on the same number.
    """

    fake: FakeKube
    reactor: Any
    site: _Site
    port: int
    ca_pem: bytes | None = None
    _tls: Any = None
    _listening: IListeningPort | None = field(default=None)

    @classmethod
    def listen(cls, fake: FakeKube, reactor: Any, port: int = 0, tls: bool = False) -> FakeKubeServer:
        site = _Site(FakeKubeResource(fake), reactor)
        ca_pem, options = None, None
        if tls:
            cert, key = _self_signed()
            ca_pem = cert
            options = ssl.PrivateCertificate.loadPEM(cert + key).options()
        server = cls(fake, reactor, site, port, ca_pem, options)
        server.accept()
        return server

    @property
    def url(self) -> str:
        return f"{'https' if self._tls else 'http'}://127.0.0.1:{self.port}"

    def accept(self) -> None:
        """Listen (again) on the server's port."""
        if self._listening is not None:
            return
        if self._tls is not None:
            self._listening = self.reactor.listenSSL(self.port, self.site, self._tls, interface="127.0.0.1")
        else:
            self._listening = self.reactor.listenTCP(self.port, self.site, interface="127.0.0.1")
        assert self._listening is not None
        self.port = cast(Any, self._listening.getHost()).port

    def refuse(self) -> Deferred[None]:
        """Stop listening: new connections are refused until L{accept}."""
        listening, self._listening = self._listening, None
        if listening is None:
            return succeed(None)
        stopped = listening.stopListening()
        return stopped if isinstance(stopped, Deferred) else succeed(None)

    def cut_connections(self) -> Deferred[Any]:
        """Drop every open connection at once; fires when all are gone."""
        lost = []
        for channel in list(self.site.connections):
            lost.append(channel.lost)
            if channel.transport is not None:
                cast(Any, channel.transport).abortConnection()
        return DeferredList(lost)

    def stop(self) -> Deferred[Any]:
        self.fake.cut_watches()
        return DeferredList([self.cut_connections(), self.refuse()])

    def write_kubeconfig(self, path: str, token: str | None = None, namespace: str = "default") -> str:
        """A kubeconfig for this server (the admin token unless C{token}); returns C{path}."""
        cluster: JSON = {"server": self.url}
        if self.ca_pem is not None:
            cluster["certificate-authority-data"] = base64.b64encode(self.ca_pem).decode("ascii")
        config = {"apiVersion": "v1", "kind": "Config", "current-context": "fakekube",
                  "clusters": [{"name": "fakekube", "cluster": cluster}],
                  "users": [{"name": "fakekube", "user": {"token": token or self.fake.admin_token}}],
                  "contexts": [{"name": "fakekube", "context": {"cluster": "fakekube", "user": "fakekube",
                                                                "namespace": namespace}}]}
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(config, f)
        return path

