# -*- test-case-name: tests.test_kube_client -*-
"""
A small asynchronous Kubernetes API client over C{twisted.web.client.Agent}.

Only what the proxy needs: CRUD on a few resources, the status subresource,
watches, TokenReview and SubjectAccessReview.  Objects are
plain decoded JSON (C{dict}); the callers that care turn them into values.

Watch streams are newline-delimited JSON.  They are split on C{b"\\n"} by
L{WatchProtocol} with no line length limit: a single event carries a whole
object, and Secrets or Connectors with large annotations easily pass the
16 KiB that C{LineOnlyReceiver} would allow.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from attrs import field, frozen
from OpenSSL import crypto
from twisted.internet import ssl
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, ResponseDone, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IPolicyForHTTPS, IResponse
from zope.interface import Attribute, Interface, implementer

from connectors_proxy import compat
from connectors_proxy.compat import HTTPConnectionPoolCompat
from connectors_proxy.kube.config import KubeConfig, TokenSource
from connectors_proxy.tls.upstream import certificates
from connectors_proxy.upstream.bodies import BytesProducer
from connectors_proxy.upstream.connect import UpstreamEndpoints

JSON = dict[str, Any]
EventCallback = Callable[[str, JSON], None]

USER_AGENT = b"connectors-proxy"


@frozen
class Resource:
    """One kind of API object and how its URLs are spelled."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None, name: str | None = None,
             subresource: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace is not None:
            base += "/namespaces/" + quote(namespace, safe="")
        base += "/" + self.plural
        if name is not None:
            base += "/" + quote(name, safe="")
            if subresource:
                base += "/" + subresource
        return base


CONNECTORS = Resource("connectors.alauda.io", "v1alpha1", "connectors", "Connector", True)
CONNECTOR_CLASSES = Resource("connectors.alauda.io", "v1alpha1", "connectorclasses",
                             "ConnectorClass", False)
SECRETS = Resource("", "v1", "secrets", "Secret", True)
SERVICES = Resource("", "v1", "services", "Service", True)
CONFIG_MAPS = Resource("", "v1", "configmaps", "ConfigMap", True)
LEASES = Resource("coordination.k8s.io", "v1", "leases", "Lease", True)
TOKEN_REVIEWS = Resource("authentication.k8s.io", "v1", "tokenreviews", "TokenReview", False)
SUBJECT_ACCESS_REVIEWS = Resource("authorization.k8s.io", "v1", "subjectaccessreviews",
                                  "SubjectAccessReview", False)


class KubeError(Exception):
    """
    The API server answered with an error status.

    @ivar code: the HTTP status (or the C{code} of a watch C{ERROR} event).
    @ivar reason: the C{Status} reason (C{NotFound}, C{Conflict},
        C{AlreadyExists}, C{Expired}, C{Gone}...), or the HTTP phrase.
    @ivar message: the server's message.
    """

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message

    @classmethod
    def from_status(cls, code: int, body: bytes | Mapping[str, Any], phrase: str = "") -> KubeError:
        status: Any = body
        if isinstance(body, bytes):
            try:
                status = json.loads(body)
            except ValueError:
                status = None
            if not isinstance(status, Mapping):
                text = body[:500].decode("utf-8", "replace").strip()
                return cls(code, phrase or "Error", text)
        if isinstance(status.get("code"), int) and status["code"]:
            code = status["code"]
        return cls(code, str(status.get("reason") or phrase or "Error"),
                   str(status.get("message") or ""))

    @property
    def not_found(self) -> bool:
        return self.code == 404

    @property
    def conflict(self) -> bool:
        """A stale write (409 C{Conflict}) or a create of an existing name (409 C{AlreadyExists})."""
        return self.code == 409

    @property
    def already_exists(self) -> bool:
        return self.code == 409 and self.reason == "AlreadyExists"

    @property
    def gone(self) -> bool:
        """The resourceVersion asked for is older than the server keeps (410)."""
        return self.code == 410


class IWatch(Interface):
    """A running watch stream."""

    def stop() -> None:
        """Close the stream; C{done} then fires with C{None}."""

    done = Attribute(
        "Deferred firing with None when the stream ends, or failing (KubeError for an "
        "ERROR event the caller raised, a connection error otherwise)."
    )


class IKubeClient(Interface):
    """
    The calls the cluster-mode code makes.  L{KubeClient} speaks HTTP; tests
    may pass an in-memory double.
    """

    def list(resource: Resource, namespace: str | None = None, label_selector: str | None = None,
             field_selector: str | None = None, limit: int | None = None,
             continue_: str | None = None) -> Deferred[JSON]:
        """The C{...List} object (C{items}, C{metadata.resourceVersion}, C{metadata.continue})."""

    def get(resource: Resource, namespace: str | None, name: str) -> Deferred[JSON]:
        """One object; L{KubeError} 404 when absent."""

    def create(resource: Resource, namespace: str | None, body: JSON) -> Deferred[JSON]:
        """Create C{body}; 409 C{AlreadyExists} when the name is taken."""

    def replace(resource: Resource, namespace: str | None, name: str, body: JSON) -> Deferred[JSON]:
        """PUT; 409 C{Conflict} when C{metadata.resourceVersion} is stale."""

    def replace_status(resource: Resource, namespace: str | None, name: str,
                       body: JSON) -> Deferred[JSON]:
        """PUT to the C{status} subresource; 409 when stale."""

    def delete(resource: Resource, namespace: str | None, name: str,
               preconditions: Mapping[str, str] | None = None) -> Deferred[JSON]:
        """Delete, optionally only if C{uid}/C{resourceVersion} still match."""

    def watch(resource: Resource, on_event: EventCallback, namespace: str | None = None,
              resource_version: str | None = None, label_selector: str | None = None,
              field_selector: str | None = None, timeout_seconds: int | None = None,
              allow_bookmarks: bool = True) -> Deferred[IWatch]:
        """
        Start a watch.  Fires with the L{IWatch} once the server accepted it
        (HTTP 200), fails with L{KubeError} otherwise (410 when the
        resourceVersion is too old).  C{on_event(type, object)} is called
        for every event; an exception it raises ends the watch with that
        failure.
        """

    def create_token_review(token: str, audiences: tuple[str, ...] = ()) -> Deferred[JSON]:
        """The TokenReview's C{status}."""

    def create_subject_access_review(spec: JSON) -> Deferred[JSON]:
        """The SubjectAccessReview's C{status}."""


@implementer(IPolicyForHTTPS)
@frozen
class KubeTLSPolicy:
    """
    TLS to the API server: its CA (or the platform trust store), its name
    (or C{tls-server-name}), and our client certificate if configured.
    """

    config: KubeConfig
    # Agent asks for a creator on every request, pooled connection or not:
    # build each once (parsing PEM and making a context costs ~0.3 ms).
    _creators: dict[tuple[bytes, int], Any] = field(factory=dict, eq=False, repr=False)

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        creator = self._creators.get((hostname, port))
        if creator is None:
            creator = self._creators[hostname, port] = self._creator(hostname)
        return creator

    def _creator(self, hostname: bytes) -> Any:
        name = self.config.tls_server_name or hostname.decode("ascii")
        client_cert = None
        if self.config.client_cert_pem and self.config.client_key_pem:
            client_cert = ssl.PrivateCertificate.load(
                self.config.client_cert_pem,
                ssl.KeyPair.load(self.config.client_key_pem, crypto.FILETYPE_PEM),
                crypto.FILETYPE_PEM,
            )
        if self.config.insecure:
            options = ssl.CertificateOptions(
                verify=False,
                privateKey=client_cert.privateKey.original if client_cert else None,
                certificate=client_cert.original if client_cert else None,
            )
            return options
        trust: Any = ssl.platformTrust()
        if self.config.ca_pem:
            trust = ssl.trustRootFromCertificates([
                ssl.Certificate(crypto.X509.from_cryptography(cert))
                for cert in certificates(self.config.ca_pem, "the cluster CA (certificate-authority)")
            ])
        return ssl.optionsForClientTLS(name, trustRoot=trust, clientCertificate=client_cert)


class _QuietClientFactory(compat.HTTP11ClientFactory):
    # Twisted logs "Starting factory" and "Stopping factory" for every API
    # server connection: most of what cluster mode logged (issue 17).
    noisy = False


class _Pool(HTTPConnectionPoolCompat):
    """A connection pool that, once closed, keeps no connection that comes back to it."""

    closed = False

    def keep_connection(self, key: Any, connection: Any) -> None:
        if self.closed:
            # A request that was in flight at shutdown: do not park its
            # connection (with a 4-minute timer) in a pool nobody uses.
            connection.transport.loseConnection()
            return
        super().keep_connection(key, connection)


@implementer(IWatch)
class WatchProtocol(Protocol):
    """
    Splits a watch response body into events.

    Bytes are kept as a list of chunks until a newline arrives, so a
    multi-megabyte event costs one join, not a quadratic series of copies.
    An idle stream (no byte, not even a bookmark, for C{idle_timeout}
    seconds) is closed as dead: a half-open TCP connection would otherwise
    keep the reflector waiting forever.
    """

    def __init__(self, on_event: EventCallback, clock: IReactorTime,
                 idle_timeout: float | None) -> None:
        self._on_event = on_event
        self._clock = clock
        self._pending: list[bytes] = []
        self._stopped = False
        self._failure: Failure | None = None
        self._idle_timeout = idle_timeout
        self._idle: Any = None
        self.events = 0
        self.done: Deferred[None] = Deferred(lambda d: self.stop())

    def connectionMade(self) -> None:
        self._arm()

    def _arm(self) -> None:
        if self._idle_timeout is None:
            return
        if self._idle is not None and self._idle.active():
            self._idle.reset(self._idle_timeout)
        else:
            self._idle = self._clock.callLater(self._idle_timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._idle = None
        self._fail(Failure(KubeError(0, "Timeout", "watch stream idle, closing it")))

    def dataReceived(self, data: bytes) -> None:
        if self._stopped:
            return
        self._arm()
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                if start < len(data):
                    self._pending.append(data[start:])
                return
            line = data[start:end]
            if self._pending:
                self._pending.append(line)
                line = b"".join(self._pending)
                self._pending = []
            start = end + 1
            if line.strip():
                self._line(line)
                if self._stopped:
                    return

    def _line(self, line: bytes) -> None:
        try:
            event = json.loads(line)
            kind = event["type"]
            obj = event["object"]
            if not isinstance(kind, str) or not isinstance(obj, dict):
                raise TypeError("bad event")
        except (ValueError, KeyError, TypeError):
            self._fail(Failure(KubeError(0, "BadEvent", "watch stream sent an unreadable event")))
            return
        self.events += 1
        try:
            self._on_event(kind, obj)
        except Exception:  # noqa: BLE001 - whatever the consumer raised ends this watch
            self._fail(Failure())

    def _fail(self, failure: Failure) -> None:
        if self._stopped:
            return
        self._failure = failure
        self.stop()

    def stop(self) -> None:
        """Close the stream (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]  # the response body transport
        self._finish()

    def connectionLost(self, reason: Failure | None = None) -> None:
        reason = reason or Failure(ConnectionDone())
        if not self._stopped:
            self._stopped = True
            if self._pending and b"".join(self._pending).strip():
                self._failure = Failure(KubeError(0, "BadEvent", "watch stream ended mid-event"))
            elif not reason.check(ResponseDone):
                self._failure = reason
        self._finish()

    def _finish(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        if self.done.called:
            return
        if self._failure is not None:
            failure, self._failure = self._failure, None
            self.done.errback(failure)
        else:
            self.done.callback(None)


@implementer(IKubeClient)
class KubeClient:
    """
    L{IKubeClient} over HTTP(S).

    @param reactor: used for connections and timeouts.
    @param config: where and as whom.
    @param agent: an L{IAgent} to use instead of a pooled L{Agent} with the
        config's TLS (tests; a proxying agent).
    @param timeout: seconds for each non-watch request.
    """

    def __init__(self, reactor: Any, config: KubeConfig, agent: IAgent | None = None,
                 timeout: float = 30.0, token_refresh: float = 60.0) -> None:
        self._reactor = reactor
        self._config = config
        self._timeout = timeout
        self._tokens = TokenSource(config, reactor, refresh=token_refresh)
        self.pool: _Pool | None = None
        if agent is None:
            self.pool = _Pool(reactor, persistent=True)
            compat.set_pool_factory(self.pool, _QuietClientFactory)
            self.pool.maxPersistentPerHost = 16
            self.pool.retryAutomatically = False
            # The proxy's own endpoints: a refused connection fails in
            # milliseconds, not after HostnameEndpoint's 0.3 s attempt delay
            # (every review would wait that long while the API server is away).
            agent = Agent.usingEndpointFactory(
                reactor, UpstreamEndpoints(reactor, KubeTLSPolicy(config), 10.0), pool=self.pool)
        self._agent = agent
        parts = urlsplit(config.server)
        self._base = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}".encode("ascii")

    def close(self) -> Deferred[None]:
        """Close idle pooled connections (at shutdown and in tests)."""
        if self.pool is not None:
            self.pool.closed = True
            return self.pool.closeCachedConnections()  # type: ignore[no-any-return]
        return succeed(None)

    def _url(self, path: str, query: Mapping[str, object] | None = None) -> bytes:
        url = self._base + path.encode("ascii")
        if query:
            pairs = [(k, "true" if v is True else "false" if v is False else str(v))
                     for k, v in query.items() if v is not None]
            if pairs:
                url += b"?" + urlencode(pairs).encode("ascii")
        return url

    def _headers(self, content_type: bytes | None = None) -> Headers:
        headers = Headers({b"Accept": [b"application/json"], b"User-Agent": [USER_AGENT]})
        auth = self._tokens.authorization()
        if auth:
            headers.setRawHeaders(b"Authorization", [auth.encode("latin-1")])
        if content_type:
            headers.setRawHeaders(b"Content-Type", [content_type])
        return headers

    def _send(self, method: bytes, url: bytes, body: object = None,
              content_type: bytes = b"application/json", timeout: float | None = None,
              ) -> Deferred[IResponse]:
        producer = None
        if body is not None:
            producer = BytesProducer(json.dumps(body, separators=(",", ":")).encode("utf-8"))
        d: Deferred[IResponse] = self._agent.request(
            method, url, self._headers(content_type if body is not None else None), producer)
        if timeout:
            call = self._reactor.callLater(timeout, d.cancel)

            def done(result: Any) -> Any:
                if call.active():
                    call.cancel()
                return result
            d.addBoth(done)
        return d

    async def _call(self, method: bytes, path: str, query: Mapping[str, object] | None = None,
                    body: object = None, content_type: bytes = b"application/json") -> JSON:
        url = self._url(path, query)
        attempt = 0
        while True:
            # One timeout covers the headers and the body: whichever is
            # being waited for when it expires is cancelled.
            current: list[Deferred[Any]] = [self._send(method, url, body, content_type)]
            call = self._reactor.callLater(self._timeout, lambda current=current: current[0].cancel())
            try:
                response = await current[0]
                current[0] = readBody(response)
                data = await current[0]
            finally:
                if call.active():
                    call.cancel()
            if response.code == 401 and attempt == 0 and self._config.token_file:
                # The kubelet may have just rotated the token file.
                self._tokens.invalidate()
                attempt += 1
                continue
            if not 200 <= response.code < 300:
                raise KubeError.from_status(response.code, data,
                                            response.phrase.decode("latin-1", "replace"))
            try:
                result = json.loads(data)
            except ValueError:
                raise KubeError(response.code, "BadResponse", "the API server sent invalid JSON") \
                    from None
            if not isinstance(result, dict):
                raise KubeError(response.code, "BadResponse", "the API server sent a non-object")
            return result

    def _d(self, coro: Any) -> Deferred[JSON]:
        return Deferred.fromCoroutine(coro)

    def list(self, resource: Resource, namespace: str | None = None,
             label_selector: str | None = None, field_selector: str | None = None,
             limit: int | None = None, continue_: str | None = None) -> Deferred[JSON]:
        query = {"labelSelector": label_selector, "fieldSelector": field_selector,
                 "limit": limit, "continue": continue_}
        return self._d(self._call(b"GET", resource.path(namespace), query))

    def get(self, resource: Resource, namespace: str | None, name: str) -> Deferred[JSON]:
        return self._d(self._call(b"GET", resource.path(namespace, name)))

    def create(self, resource: Resource, namespace: str | None, body: JSON) -> Deferred[JSON]:
        return self._d(self._call(b"POST", resource.path(namespace), body=_typed(resource, body)))

    def replace(self, resource: Resource, namespace: str | None, name: str,
                body: JSON) -> Deferred[JSON]:
        return self._d(self._call(b"PUT", resource.path(namespace, name),
                                  body=_typed(resource, body)))

    def replace_status(self, resource: Resource, namespace: str | None, name: str,
                       body: JSON) -> Deferred[JSON]:
        return self._d(self._call(b"PUT", resource.path(namespace, name, "status"),
                                  body=_typed(resource, body)))

    def delete(self, resource: Resource, namespace: str | None, name: str,
               preconditions: Mapping[str, str] | None = None) -> Deferred[JSON]:
        body = None
        if preconditions:
            body = {"apiVersion": "v1", "kind": "DeleteOptions",
                    "preconditions": dict(preconditions)}
        return self._d(self._call(b"DELETE", resource.path(namespace, name), body=body))

    def create_token_review(self, token: str, audiences: tuple[str, ...] = ()) -> Deferred[JSON]:
        spec: JSON = {"token": token}
        if audiences:
            spec["audiences"] = list(audiences)
        return self._d(self._review(TOKEN_REVIEWS, spec))

    def create_subject_access_review(self, spec: JSON) -> Deferred[JSON]:
        return self._d(self._review(SUBJECT_ACCESS_REVIEWS, spec))

    async def _review(self, resource: Resource, spec: JSON) -> JSON:
        result = await self._call(b"POST", resource.path(), body={
            "apiVersion": resource.api_version, "kind": resource.kind, "spec": spec})
        status = result.get("status")
        return status if isinstance(status, dict) else {}

    def watch(self, resource: Resource, on_event: EventCallback, namespace: str | None = None,
              resource_version: str | None = None, label_selector: str | None = None,
              field_selector: str | None = None, timeout_seconds: int | None = None,
              allow_bookmarks: bool = True) -> Deferred[IWatch]:
        query = {"watch": True, "resourceVersion": resource_version,
                 "allowWatchBookmarks": True if allow_bookmarks else None,
                 "labelSelector": label_selector, "fieldSelector": field_selector,
                 "timeoutSeconds": timeout_seconds}
        url = self._url(resource.path(namespace), query)
        idle = None if timeout_seconds is None else timeout_seconds + 30.0
        return Deferred.fromCoroutine(self._watch(url, on_event, idle))

    async def _watch(self, url: bytes, on_event: EventCallback, idle: float | None) -> IWatch:
        attempt = 0
        while True:
            response = await self._send(b"GET", url, timeout=self._timeout)
            if response.code == 401 and attempt == 0 and self._config.token_file:
                await readBody(response)
                self._tokens.invalidate()
                attempt += 1
                continue
            break
        if response.code != 200:
            data = await readBody(response)
            raise KubeError.from_status(response.code, data,
                                        response.phrase.decode("latin-1", "replace"))
        protocol = WatchProtocol(on_event, self._reactor, idle)
        response.deliverBody(protocol)
        return protocol


def _typed(resource: Resource, body: JSON) -> JSON:
    """C{body} with C{apiVersion} and C{kind} filled in (the server requires them)."""
    if body.get("apiVersion") and body.get("kind"):
        return body
    return {"apiVersion": resource.api_version, "kind": resource.kind, **body}


__all__ = [
    "CONNECTORS",
    "CONNECTOR_CLASSES",
    "LEASES",
    "SECRETS",
    "SERVICES",
    "SUBJECT_ACCESS_REVIEWS",
    "TOKEN_REVIEWS",
    "CancelledError",
    "IKubeClient",
    "IWatch",
    "KubeClient",
    "KubeError",
    "KubeTLSPolicy",
    "Resource",
    "WatchProtocol",
]
