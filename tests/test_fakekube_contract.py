"""
The contract of a Kubernetes API server, as the cluster mode relies on it,
checked against three servers with one suite (L{ContractMixin}):

- the project's fake (L{connectors_proxy.testing.fakekube}) over loopback;
- kmock, a third-party emulator, for the subset it serves (run in a
  subprocess; what it lacks is skipped with the reason, never silently);
- a real cluster: the one C{KUBECONFIG} names when set (the CRDs of
  C{k8s/} applied), else a real kube-apiserver started on loopback from the
  binaries C{.ci/build-kube} builds (L{tests.support.kubeapi}).

Then the fake's own features that tests lean on (counters, outages, RBAC
for callers, clocks), the pure helpers, and the official C{kubernetes}
package as a real client against the fake.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlencode

import treq
from attrs import define
from twisted.internet import reactor
from twisted.internet import ssl as tssl
from twisted.internet.defer import Deferred, DeferredQueue, ensureDeferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ResponseDone,
    ResponseNeverReceived,
)
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from connectors_proxy.testing.fakekube import FakeKube, start_fake_kube
from connectors_proxy.testing.fakekube_http import parse_target
from connectors_proxy.testing.fakekube_model import (
    ApiError,
    json_patch,
    merge_patch,
    parse_field_selector,
    parse_label_selector,
    resource_by_name,
    strategic_merge_patch,
)
from connectors_proxy.testing.fakekube_strategy import read_manifests

from .support import kubeapi
from .support.procs import free_port, start_server

ROOT = Path(__file__).resolve().parents[1]
CR = "/apis/connectors.alauda.io/v1alpha1"
CR_VERSION = "connectors.alauda.io/v1alpha1"
AUDIENCE = "connectors-proxy"


# --- a tiny client ------------------------------------------------------------

@define
class Reply:
    code: int
    body: Any


_END = object()


class _Lines(Protocol):
    """Newline-delimited JSON events into a queue; no line length limit (events can be large)."""

    def __init__(self, queue: DeferredQueue[Any]) -> None:
        self.queue = queue
        self.buffer = b""
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            if line.strip():
                self.queue.put(json.loads(line))

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reason = reason
        self.queue.put(_END)


@define(eq=False)
class Watch:
    """An open watch: events one by one, then how the stream ended."""

    queue: DeferredQueue[Any]
    lines: _Lines

    async def next(self, timeout: float = 10.0, bookmarks: bool = False) -> dict[str, Any] | None:
        """The next event (BOOKMARKs skipped unless asked for), or C{None} once the stream ended."""
        while True:
            d = self.queue.get()
            d.addTimeout(timeout, reactor)
            event = await d
            if event is _END:
                self.queue.put(_END)
                return None
            if event["type"] == "BOOKMARK" and not bookmarks:
                continue
            return event  # type: ignore[no-any-return]

    @property
    def ended_cleanly(self) -> bool:
        return self.lines.reason is not None and self.lines.reason.check(ResponseDone) is not None

    def close(self) -> None:
        transport = self.lines.transport
        if transport is not None and self.lines.reason is None:
            cast(Any, transport).stopProducing()  # a response body's transport is a producer


@implementer(IPolicyForHTTPS)
class _TrustPolicy:
    """TLS as a kubeconfig says: its CA (or none to check), its client certificate."""

    def __init__(self, ca_pem: bytes | None, client_pem: bytes | None, verify: bool) -> None:
        self.ca_pem, self.client_pem, self.verify = ca_pem, client_pem, verify

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        client = tssl.PrivateCertificate.loadPEM(self.client_pem) if self.client_pem else None
        if not self.verify:
            return tssl.CertificateOptions(verify=False)
        trust = tssl.Certificate.loadPEM(self.ca_pem) if self.ca_pem else tssl.platformTrust()
        return tssl.optionsForClientTLS(hostname.decode("ascii"), trustRoot=trust, clientCertificate=client)


class KubeHTTP:
    """Plain HTTP against an API server: JSON in, C{Reply} out; watches as L{Watch}."""

    def __init__(self, url: str, token: str | None, policy: IPolicyForHTTPS | None = None) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, contextFactory=policy or BrowserLikePolicyForHTTPS(), pool=self.pool)
        self.http = treq.client.HTTPClient(self.agent)

    def _headers(self, content_type: str | None, token: str | None) -> dict[bytes | str, list[bytes | str]]:
        headers: dict[bytes | str, list[bytes | str]] = {b"Accept": [b"application/json"]}
        token = self.token if token is None else token
        if token:
            headers[b"Authorization"] = [b"Bearer " + token.encode()]
        if content_type:
            headers[b"Content-Type"] = [content_type.encode()]
        return headers

    async def call(self, method: str, path: str, body: Any = None, *, params: dict[str, str] | None = None,
                   content_type: str = "application/json", token: str | None = None) -> Reply:
        url = self.url + path + ("?" + urlencode(params) if params else "")
        data = None if body is None else json.dumps(body).encode()
        response = await self.http.request(method, url, data=data,
                                           headers=self._headers(content_type if data else None, token))
        raw = await treq.content(response)
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw
        return Reply(response.code, parsed)

    async def watch(self, path: str, **params: str) -> Watch:
        query = {"watch": "true", **params}
        response = await self.agent.request(b"GET", (self.url + path + "?" + urlencode(query)).encode(),
                                            treq.client.Headers(self._headers(None, None)))  # type: ignore[arg-type,type-var]
        if response.code != 200:
            raise AssertionError(f"watch {path} answered {response.code}: {await treq.content(response)!r}")
        queue: DeferredQueue[Any] = DeferredQueue()
        lines = _Lines(queue)
        response.deliverBody(lines)
        return Watch(queue, lines)


# --- backends -----------------------------------------------------------------

#: Capabilities a test may need; a backend without one says why.
KMOCK_LACKS = {
    "created-201": "kmock answers 200 to a create, without uid, resourceVersion or creationTimestamp",
    "resource-version": "kmock has no resourceVersion: no 409 conflicts, lists say '...'",
    "put": "kmock does not serve PUT (only merge PATCH updates)",
    "status-isolation": "kmock merges status writes into the object and keeps status on the main resource",
    "generation": "kmock does not keep metadata.generation",
    "watch-resume": "kmock watches cannot resume from a resourceVersion",
    "compaction": "kmock has no history to compact (no 410 Gone)",
    "bookmarks": "kmock sends no BOOKMARK events",
    "watch-timeout": "kmock ignores timeoutSeconds",
    "selectors": "kmock ignores labelSelector and fieldSelector",
    "gc": "kmock has no ownerReference garbage collection",
    "reviews": "kmock serves no TokenReview / SubjectAccessReview / TokenRequest",
    "validation": "kmock validates nothing and applies no defaults",
    "typed-lists": "kmock returns list items as stored, kind and apiVersion included",
    "authn": "kmock authenticates nobody",
    "status-reasons": "kmock's Status bodies carry its own reasons (e.g. 'Object Not Found')",
}
REAL_LACKS = {
    "compaction": "etcd compaction cannot be forced from a test on a real cluster",
    "bookmarks": "a real API server paces bookmarks itself (about once a minute); the fake checks them",
}


class Backend:
    """How a test reaches one API server, and what that server lacks."""

    name = ""
    lacks: dict[str, str] = {}
    client: KubeHTTP

    async def start(self, test: TestCase) -> None:
        raise NotImplementedError

    async def make_namespace(self, test: TestCase, name: str) -> None:
        reply = await self.client.call("POST", "/api/v1/namespaces",
                                       {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        test.assertIn(reply.code, (200, 201), reply.body)
        test.addCleanup(lambda: ensureDeferred(self.client.call("DELETE", f"/api/v1/namespaces/{name}")))

    async def compact(self) -> None:
        raise SkipTest(self.lacks["compaction"])

    async def send_bookmarks(self) -> None:
        raise SkipTest(self.lacks["bookmarks"])

    async def bookmark_time(self) -> None:
        """Make it time for bookmarks, changing nothing (a real server keeps its own pace)."""


class FakeBackend(Backend):
    name = "fake"
    lacks: dict[str, str] = {}

    async def start(self, test: TestCase) -> None:
        self.fake, self.server = start_fake_kube(test, reactor)
        self.client = KubeHTTP(self.server.url, self.fake.admin_token)

    async def compact(self) -> None:
        self.fake.compact()

    async def send_bookmarks(self) -> None:
        # Progress first (elsewhere): a bookmark reports a newer version.
        self.fake.apply({"apiVersion": "v1", "kind": "Namespace",
                         "metadata": {"name": "bookmark-" + secrets.token_hex(4)}})
        self.fake.send_bookmarks()

    async def bookmark_time(self) -> None:
        self.fake.send_bookmarks()


KMOCK_SCRIPT = """
import asyncio, sys
import kmock

async def main(port):
    emulator = kmock.KubernetesEmulator()
    for resource in ("v1/namespaces", "v1/secrets", "v1/services", "v1/serviceaccounts",
                     "connectors.alauda.io/v1alpha1/connectors",
                     "connectors.alauda.io/v1alpha1/connectorclasses"):
        emulator.resources[resource] = {}
    async with emulator, kmock.Server(emulator, port=port):
        await asyncio.Event().wait()

asyncio.run(main(int(sys.argv[1])))
"""


class KmockBackend(Backend):
    name = "kmock"
    lacks = KMOCK_LACKS

    async def start(self, test: TestCase) -> None:
        port = free_port()
        await start_server(test, [sys.executable, "-c", KMOCK_SCRIPT, str(port)], port=port, name="kmock")
        self.client = KubeHTTP(f"http://127.0.0.1:{port}", "kmock-ignores-tokens")

    async def make_namespace(self, test: TestCase, name: str) -> None:
        """kmock needs no namespace objects (and fails to parse C{POST /api/v1/namespaces})."""


class RealClusterBackend(Backend):
    """The cluster C{KUBECONFIG} names (or any kubeconfig file, e.g. one the fake wrote)."""

    name = "real"
    lacks = REAL_LACKS

    def __init__(self, kubeconfig: str | None = None) -> None:
        self.kubeconfig = kubeconfig or os.environ.get("KUBECONFIG", "")

    async def start(self, test: TestCase) -> None:
        self.client = client_from_kubeconfig(self.kubeconfig)
        reply = await self.client.call("GET", CR)
        if reply.code != 200:
            raise AssertionError(f"the cluster serves no {CR_VERSION} ({reply.code}): "
                                 "kubectl apply -f k8s/crd-connectors.yaml -f k8s/crd-connectorclasses.yaml")


class LocalAPIServerBackend(Backend):
    """
    The real kube-apiserver (with etcd and the garbage collector) of
    L{tests.support.kubeapi}, started once for the whole test run; each test
    works in a namespace of its own.
    """

    name = "kube-apiserver"
    lacks: dict[str, str] = {}

    async def start(self, test: TestCase) -> None:
        self.cluster = await kubeapi.shared_cluster()
        # Registered first, so it runs last: after the watches and the namespace go.
        test.addCleanup(lambda: ensureDeferred(kubeapi.settle(self.cluster.port)))
        self.client = KubeHTTP(self.cluster.url, self.cluster.admin_token,
                               _TrustPolicy(self.cluster.ca_pem, None, True))

    async def compact(self) -> None:
        # An etcd compaction alone does not expire a version: the API
        # server's watch cache still serves it.  History is really gone once
        # the cache starts again after the compaction (an API server restart).
        from twisted.internet.threads import deferToThread
        await deferToThread(self.cluster.compact)
        await deferToThread(self.cluster.restart_apiserver)

    async def send_bookmarks(self) -> None:
        """
        The server paces bookmarks itself (2 s before a watch's
        C{timeoutSeconds} at the latest) and sends one only when it has
        progress to report: a Secret written elsewhere is that progress.
        """
        reply = await self.client.call("POST", "/api/v1/namespaces/default/secrets",
                                       {"apiVersion": "v1", "kind": "Secret",
                                        "metadata": {"generateName": "bookmark-"}})
        assert reply.code == 201, reply.body


def real_backend() -> Backend:
    """The cluster C{KUBECONFIG} names, else the local real API server."""
    return RealClusterBackend() if os.environ.get("KUBECONFIG") else LocalAPIServerBackend()


def client_from_kubeconfig(path: str) -> KubeHTTP:
    """A L{KubeHTTP} for a kubeconfig, read by the official client (exec plugins and all)."""
    from kubernetes import client as kclient
    from kubernetes import config as kconfig

    cfg = kclient.Configuration()
    kconfig.load_kube_config(config_file=path, client_configuration=cfg)

    def read(name: str | None) -> bytes | None:
        return Path(name).read_bytes() if name else None
    client_pem = None
    if cfg.cert_file and cfg.key_file:
        client_pem = (read(cfg.cert_file) or b"") + b"\n" + (read(cfg.key_file) or b"")
    header = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix("authorization") or ""
    token = header.split(" ", 1)[1] if header.lower().startswith("bearer ") else None
    return KubeHTTP(cfg.host, token, _TrustPolicy(read(cfg.ssl_ca_cert), client_pem, bool(cfg.verify_ssl)))


# --- the contract -------------------------------------------------------------

def secret(name: str, **data: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "type": "Opaque",
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


def connector(name: str, address: str = "https://git.example.com", **meta: Any) -> dict[str, Any]:
    return {"apiVersion": CR_VERSION, "kind": "Connector", "metadata": {"name": name, **meta},
            "spec": {"connectorClassName": "git", "address": address}}


def needs(*capabilities: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a contract test with the capabilities it relies on (checked before the backend starts)."""
    def mark(test: Callable[..., Any]) -> Callable[..., Any]:
        test.needs = capabilities  # type: ignore[attr-defined]
        return test
    return mark


class ContractMixin:
    """The API server behaviour cluster mode relies on, for any L{Backend}."""

    backend_factory: Callable[[], Backend]
    timeout = 60

    # Provided by TestCase.
    assertEqual: Callable[..., None]
    assertIn: Callable[..., None]
    assertNotIn: Callable[..., None]
    assertTrue: Callable[..., None]
    assertIsNone: Callable[..., None]
    assertIsNotNone: Callable[..., None]
    addCleanup: Callable[..., None]

    def setUp(self) -> Deferred[None]:
        return ensureDeferred(self._setup())

    async def _setup(self) -> None:
        self.backend = self.backend_factory()
        method = getattr(self, self._testMethodName)  # type: ignore[attr-defined]
        for capability in getattr(method, "needs", ()):
            if capability in self.backend.lacks:
                raise SkipTest(f"{self.backend.name}: {self.backend.lacks[capability]}")
        await self.backend.start(self)  # type: ignore[arg-type]
        self.kube = self.backend.client
        self.ns = "ct-" + secrets.token_hex(4)
        await self.backend.make_namespace(self, self.ns)  # type: ignore[arg-type]

    def secrets_path(self, name: str = "") -> str:
        return f"/api/v1/namespaces/{self.ns}/secrets" + (f"/{name}" if name else "")

    def connectors_path(self, name: str = "", sub: str = "") -> str:
        return f"{CR}/namespaces/{self.ns}/connectors" + "".join(f"/{p}" for p in (name, sub) if p)

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if "/namespaces/" in path:
            # Real servers fill the namespace in from the URL; kmock does not,
            # and its watches filter on the body's.
            body = dict(body, metadata=dict(body["metadata"], namespace=path.split("/namespaces/")[1].split("/")[0]))
        reply = await self.kube.call("POST", path, body)
        self.assertIn(reply.code, (200, 201), reply.body)
        return reply.body  # type: ignore[no-any-return]

    async def eventually(self, check: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
        """Real clusters do some things (garbage collection) asynchronously."""
        waited = 0.0
        while not await check():
            if waited > timeout:
                raise AssertionError("condition not reached in time")
            await deferLater(reactor, 0.2, lambda: None)
            waited += 0.2

    def watch(self, path: str, **params: str) -> Deferred[Watch]:
        async def opened() -> Watch:
            w = await self.kube.watch(path, **params)
            self.addCleanup(w.close)
            return w
        return ensureDeferred(opened())

    # -- create, read ---------------------------------------------------------

    async def test_create_get_list_round_trip(self) -> None:
        await self.create(self.secrets_path(), secret("one", token="abc"))
        await self.create(self.connectors_path(), connector("harbor"))
        got = await self.kube.call("GET", self.secrets_path("one"))
        self.assertEqual((got.code, base64.b64decode(got.body["data"]["token"])), (200, b"abc"))
        got = await self.kube.call("GET", self.connectors_path("harbor"))
        self.assertEqual(got.body["spec"], {"connectorClassName": "git", "address": "https://git.example.com"})
        listed = await self.kube.call("GET", self.connectors_path())
        self.assertEqual([i["metadata"]["name"] for i in listed.body["items"]], ["harbor"])

    @needs("created-201", "generation")
    async def test_create_answers_201_with_server_fields(self) -> None:
        reply = await self.kube.call("POST", self.connectors_path(), connector("c1"))
        self.assertEqual(reply.code, 201)
        meta = reply.body["metadata"]
        for key in ("uid", "resourceVersion", "creationTimestamp"):
            self.assertTrue(meta.get(key), key)
        self.assertEqual((meta["namespace"], meta["generation"]), (self.ns, 1))
        reply = await self.kube.call("POST", self.secrets_path(), secret("s1", a="b"))
        self.assertEqual(reply.code, 201)
        self.assertNotIn("generation", reply.body["metadata"])

    async def _create_twice(self) -> Any:
        await self.create(self.secrets_path(), secret("dup", a="1"))
        reply = await self.kube.call("POST", self.secrets_path(), secret("dup", a="2"))
        self.assertEqual((reply.code, reply.body["kind"]), (409, "Status"))
        return reply

    async def test_create_twice_conflicts(self) -> None:
        await self._create_twice()

    @needs("status-reasons")
    async def test_create_twice_says_already_exists(self) -> None:
        reply = await self._create_twice()
        self.assertEqual(reply.body["reason"], "AlreadyExists")

    async def _missing(self) -> Any:
        reply = await self.kube.call("GET", self.connectors_path("nope"))
        self.assertEqual((reply.code, reply.body["kind"], reply.body["status"]), (404, "Status", "Failure"))
        return reply

    async def test_missing_object_is_404_status(self) -> None:
        await self._missing()

    @needs("status-reasons")
    async def test_missing_object_says_not_found(self) -> None:
        reply = await self._missing()
        self.assertEqual(reply.body["reason"], "NotFound")
        self.assertEqual(reply.body["details"]["name"], "nope")

    async def test_lists_are_per_namespace(self) -> None:
        await self.create(self.secrets_path(), secret("mine", a="1"))
        other = "ct-" + secrets.token_hex(4)
        await self.backend.make_namespace(self, other)  # type: ignore[arg-type]
        await self.create(f"/api/v1/namespaces/{other}/secrets", secret("theirs", a="1"))
        listed = await self.kube.call("GET", self.secrets_path())
        names = [i["metadata"]["name"] for i in listed.body["items"]]
        self.assertIn("mine", names)
        self.assertNotIn("theirs", names)

    @needs("resource-version")
    async def test_list_has_resource_version(self) -> None:
        created = await self.create(self.secrets_path(), secret("s", a="1"))
        listed = await self.kube.call("GET", self.secrets_path())
        self.assertTrue(int(listed.body["metadata"]["resourceVersion"])
                        >= int(created["metadata"]["resourceVersion"]))
        self.assertEqual(listed.body["kind"], "SecretList")

    @needs("typed-lists")
    async def test_typed_list_items_have_no_kind(self) -> None:
        await self.create(self.secrets_path(), secret("s", a="1"))
        await self.create(self.connectors_path(), connector("c"))
        secret_item = (await self.kube.call("GET", self.secrets_path())).body["items"][0]
        self.assertNotIn("kind", secret_item)
        connector_item = (await self.kube.call("GET", self.connectors_path())).body["items"][0]
        self.assertEqual((connector_item["kind"], connector_item["apiVersion"]), ("Connector", CR_VERSION))

    @needs("selectors")
    async def test_selectors(self) -> None:
        for name, team in (("a", "red"), ("b", "blue"), ("c", "red")):
            body = secret(name, k="v")
            body["metadata"]["labels"] = {"team": team}
            await self.create(self.secrets_path(), body)

        async def names(**params: str) -> list[str]:
            reply = await self.kube.call("GET", self.secrets_path(), params=params)
            self.assertEqual(reply.code, 200, reply.body)
            return sorted(i["metadata"]["name"] for i in reply.body["items"])
        self.assertEqual(await names(labelSelector="team=red"), ["a", "c"])
        self.assertEqual(await names(labelSelector="team in (blue)"), ["b"])
        self.assertEqual(await names(labelSelector="team!=red"), ["b"])
        self.assertEqual(await names(fieldSelector="metadata.name=b"), ["b"])
        self.assertEqual(await names(labelSelector="team=red", fieldSelector="metadata.name!=a"), ["c"])

    async def test_large_objects(self) -> None:
        big = secrets.token_hex(60 * 1024)  # 120 KiB: one watch event far over 16 KiB
        w = await self.watch(self.secrets_path())
        await self.create(self.secrets_path(), secret("big", blob=big))
        event = await w.next()
        assert event is not None
        self.assertEqual(base64.b64decode(event["object"]["data"]["blob"]).decode(), big)
        got = await self.kube.call("GET", self.secrets_path("big"))
        self.assertEqual(base64.b64decode(got.body["data"]["blob"]).decode(), big)

    # -- update ---------------------------------------------------------------

    @needs("put", "resource-version")
    async def test_put_with_stale_resource_version_conflicts(self) -> None:
        created = await self.create(self.connectors_path(), connector("c"))
        first = dict(created, spec={"connectorClassName": "git", "address": "https://one.example.com"})
        reply = await self.kube.call("PUT", self.connectors_path("c"), first)
        self.assertEqual(reply.code, 200, reply.body)
        self.assertTrue(reply.body["metadata"]["resourceVersion"] != created["metadata"]["resourceVersion"])
        stale = dict(created, spec={"connectorClassName": "git", "address": "https://two.example.com"})
        reply = await self.kube.call("PUT", self.connectors_path("c"), stale)
        self.assertEqual((reply.code, reply.body["kind"], reply.body["reason"]), (409, "Status", "Conflict"))
        self.assertEqual(reply.body["details"]["name"], "c")
        got = await self.kube.call("GET", self.connectors_path("c"))
        self.assertEqual(got.body["spec"]["address"], "https://one.example.com")

    async def test_merge_patch(self) -> None:
        await self.create(self.connectors_path(), connector("c"))
        reply = await self.kube.call("PATCH", self.connectors_path("c"),
                                     {"metadata": {"labels": {"x": "y"}}, "spec": {"address": "https://new"}},
                                     content_type="application/merge-patch+json")
        self.assertEqual(reply.code, 200, reply.body)
        got = await self.kube.call("GET", self.connectors_path("c"))
        self.assertEqual((got.body["spec"]["address"], got.body["metadata"]["labels"]), ("https://new", {"x": "y"}))
        self.assertEqual(got.body["spec"]["connectorClassName"], "git")

    async def test_status_patch(self) -> None:
        await self.create(self.connectors_path(), connector("c"))
        status = {"observedGeneration": 1, "conditions": [{"type": "Ready", "status": "True", "reason": "Ok"}]}
        reply = await self.kube.call("PATCH", self.connectors_path("c", "status"), {"status": status},
                                     content_type="application/merge-patch+json")
        self.assertEqual(reply.code, 200, reply.body)
        got = await self.kube.call("GET", self.connectors_path("c"))
        self.assertEqual(got.body["status"], status)

    @needs("put", "status-isolation", "generation")
    async def test_status_subresource_isolation(self) -> None:
        created = await self.create(self.connectors_path(), dict(connector("c"), status={"observedGeneration": 9}))
        self.assertNotIn("status", created)  # a create cannot set status
        # The main resource ignores status; a spec change bumps generation.
        body = dict(created, spec={"connectorClassName": "git", "address": "https://b"},
                    status={"observedGeneration": 5})
        updated = (await self.kube.call("PUT", self.connectors_path("c"), body)).body
        self.assertNotIn("status", updated)
        self.assertEqual(updated["metadata"]["generation"], 2)
        # The status subresource ignores spec; it does not bump generation.
        body = dict(updated, spec={"connectorClassName": "git", "address": "https://ignored"},
                    status={"observedGeneration": 2})
        reply = await self.kube.call("PUT", self.connectors_path("c", "status"), body)
        self.assertEqual(reply.code, 200, reply.body)
        self.assertEqual((reply.body["spec"]["address"], reply.body["status"], reply.body["metadata"]["generation"]),
                         ("https://b", {"observedGeneration": 2}, 2))
        # Labels change the object but not its generation.
        labelled = dict(reply.body, metadata=dict(reply.body["metadata"], labels={"a": "b"}))
        reply = await self.kube.call("PUT", self.connectors_path("c"), labelled)
        self.assertEqual((reply.body["metadata"]["generation"], reply.body["metadata"]["labels"]), (2, {"a": "b"}))
        # A stale status write conflicts too.
        reply = await self.kube.call("PUT", self.connectors_path("c", "status"), body)
        self.assertEqual(reply.code, 409)

    @needs("validation")
    async def test_service_defaults_and_validation(self) -> None:
        service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "c-harbor"},
                   "spec": {"type": "ExternalName", "externalName": "proxy.system.svc.cluster.local",
                            "ports": [{"name": "http", "port": 80}]}}
        created = await self.create(f"/api/v1/namespaces/{self.ns}/services", service)
        self.assertEqual(created["spec"]["sessionAffinity"], "None")
        self.assertEqual(created["spec"]["ports"][0]["protocol"], "TCP")
        self.assertEqual(created["spec"]["ports"][0]["targetPort"], 80)
        self.assertNotIn("clusterIP", created["spec"])
        bad = dict(service, metadata={"name": "c-9.bad"})
        reply = await self.kube.call("POST", f"/api/v1/namespaces/{self.ns}/services", bad)
        self.assertEqual((reply.code, reply.body["reason"]), (422, "Invalid"))
        self.assertEqual([c["field"] for c in reply.body["details"]["causes"]], ["metadata.name"])

    # -- delete, garbage collection -----------------------------------------------

    async def test_delete(self) -> None:
        await self.create(self.secrets_path(), secret("gone", a="1"))
        reply = await self.kube.call("DELETE", self.secrets_path("gone"))
        self.assertEqual(reply.code, 200, reply.body)
        self.assertEqual((await self.kube.call("GET", self.secrets_path("gone"))).code, 404)
        self.assertEqual((await self.kube.call("DELETE", self.secrets_path("gone"))).code, 404)

    async def test_finalizers_hold_deletion(self) -> None:
        await self.create(self.connectors_path(), connector("held", finalizers=["example.com/hold"]))
        reply = await self.kube.call("DELETE", self.connectors_path("held"))
        self.assertEqual(reply.code, 200, reply.body)
        got = await self.kube.call("GET", self.connectors_path("held"))
        self.assertTrue(got.body["metadata"].get("deletionTimestamp"))
        reply = await self.kube.call("PATCH", self.connectors_path("held"), {"metadata": {"finalizers": None}},
                                     content_type="application/merge-patch+json")
        self.assertEqual(reply.code, 200, reply.body)

        async def gone() -> bool:
            return (await self.kube.call("GET", self.connectors_path("held"))).code == 404
        await self.eventually(gone)

    @needs("gc")
    async def test_owned_objects_are_collected(self) -> None:
        owner = await self.create(self.connectors_path(), connector("owner"))
        ref = {"apiVersion": CR_VERSION, "kind": "Connector", "name": "owner", "uid": owner["metadata"]["uid"],
               "controller": True, "blockOwnerDeletion": True}
        body = secret("owned", a="1")
        body["metadata"]["ownerReferences"] = [ref]
        await self.create(self.secrets_path(), body)
        await self.create(self.secrets_path(), secret("free", a="1"))
        reply = await self.kube.call("DELETE", self.connectors_path("owner"))
        self.assertEqual(reply.code, 200, reply.body)

        async def collected() -> bool:
            return (await self.kube.call("GET", self.secrets_path("owned"))).code == 404
        await self.eventually(collected)
        self.assertEqual((await self.kube.call("GET", self.secrets_path("free"))).code, 200)

    # -- watch ------------------------------------------------------------------

    async def test_watch_added_modified_deleted(self) -> None:
        w = await self.watch(self.connectors_path())
        await self.create(self.connectors_path(), connector("w"))
        await self.kube.call("PATCH", self.connectors_path("w"), {"spec": {"address": "https://changed"}},
                             content_type="application/merge-patch+json")
        await self.kube.call("DELETE", self.connectors_path("w"))
        seen = []
        for _ in range(3):
            event = await w.next()
            assert event is not None
            seen.append((event["type"], event["object"]["metadata"]["name"]))
        self.assertEqual(seen, [("ADDED", "w"), ("MODIFIED", "w"), ("DELETED", "w")])

    async def test_watch_starts_with_existing_objects(self) -> None:
        await self.create(self.secrets_path(), secret("before", a="1"))
        w = await self.watch(self.secrets_path())
        event = await w.next()
        assert event is not None
        self.assertEqual((event["type"], event["object"]["metadata"]["name"]), ("ADDED", "before"))

    @needs("watch-resume")
    async def test_watch_resumes_from_resource_version(self) -> None:
        a = await self.create(self.secrets_path(), secret("a", v="1"))
        await self.kube.call("PATCH", self.secrets_path("a"), {"data": {"v": "Mg=="}},
                             content_type="application/merge-patch+json")
        await self.create(self.secrets_path(), secret("b", v="1"))
        w = await self.watch(self.secrets_path(), resourceVersion=a["metadata"]["resourceVersion"])
        first, second = await w.next(), await w.next()
        assert first is not None and second is not None
        self.assertEqual([(e["type"], e["object"]["metadata"]["name"]) for e in (first, second)],
                         [("MODIFIED", "a"), ("ADDED", "b")])
        self.assertEqual(base64.b64decode(first["object"]["data"]["v"]), b"2")

    @needs("watch-resume", "compaction")
    async def test_watch_from_compacted_version_is_410(self) -> None:
        a = await self.create(self.secrets_path(), secret("a", v="1"))
        await self.kube.call("PATCH", self.secrets_path("a"), {"data": {"v": "Mg=="}},
                             content_type="application/merge-patch+json")
        await self.backend.compact()
        w = await self.watch(self.secrets_path(), resourceVersion=a["metadata"]["resourceVersion"])
        event = await w.next()
        assert event is not None
        self.assertEqual(event["type"], "ERROR")
        status = event["object"]
        self.assertEqual((status["kind"], status["code"], status["reason"]), ("Status", 410, "Expired"))
        self.assertIn("too old resource version", status["message"])
        self.assertIsNone(await w.next())

    @needs("bookmarks")
    async def test_bookmarks(self) -> None:
        created = await self.create(self.secrets_path(), secret("a", v="1"))
        # A real API server sends its first bookmark 2 s before timeoutSeconds
        # (else after about a minute).
        w = await self.watch(self.secrets_path(), resourceVersion=created["metadata"]["resourceVersion"],
                             allowWatchBookmarks="true", timeoutSeconds="5")
        await self.backend.send_bookmarks()
        event = await w.next(bookmarks=True)
        assert event is not None
        self.assertEqual((event["type"], event["object"]["kind"]), ("BOOKMARK", "Secret"))
        rv = event["object"]["metadata"]["resourceVersion"]
        self.assertTrue(int(rv) >= int(created["metadata"]["resourceVersion"]))
        # A bookmark's version is a valid place to resume from.
        await self.create(self.secrets_path(), secret("b", v="1"))
        resumed = await self.watch(self.secrets_path(), resourceVersion=rv)
        event = await resumed.next()
        assert event is not None
        self.assertEqual((event["type"], event["object"]["metadata"]["name"]), ("ADDED", "b"))

    @needs("bookmarks")
    async def test_bookmarks_report_progress(self) -> None:
        """A bookmark never repeats the version a watch started from (real servers skip it)."""
        created = await self.create(self.secrets_path(), secret("a", v="1"))
        rv = int(created["metadata"]["resourceVersion"])
        w = await self.watch(self.secrets_path(), resourceVersion=str(rv), allowWatchBookmarks="true",
                             timeoutSeconds="4")
        await self.backend.bookmark_time()
        while (event := await w.next(bookmarks=True)) is not None:
            self.assertEqual(event["type"], "BOOKMARK")
            self.assertTrue(int(event["object"]["metadata"]["resourceVersion"]) > rv, event)

    @needs("watch-timeout")
    async def test_watch_timeout_seconds(self) -> None:
        w = await self.watch(self.secrets_path(), timeoutSeconds="1")
        self.assertIsNone(await w.next(timeout=15))
        self.assertTrue(w.ended_cleanly)

    @needs("selectors", "watch-resume")
    async def test_watch_by_label_follows_selection(self) -> None:
        w = await self.watch(self.secrets_path(), labelSelector="pick=yes")
        body = secret("s", a="1")
        await self.create(self.secrets_path(), body)
        await self.kube.call("PATCH", self.secrets_path("s"), {"metadata": {"labels": {"pick": "yes"}}},
                             content_type="application/merge-patch+json")
        await self.kube.call("PATCH", self.secrets_path("s"), {"metadata": {"labels": {"pick": "no"}}},
                             content_type="application/merge-patch+json")
        first, second = await w.next(), await w.next()
        assert first is not None and second is not None
        self.assertEqual([first["type"], second["type"]], ["ADDED", "DELETED"])

    # -- identity -----------------------------------------------------------------

    async def service_account_token(self, name: str) -> str:
        await self.create(f"/api/v1/namespaces/{self.ns}/serviceaccounts",
                          {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}})
        reply = await self.kube.call("POST", f"/api/v1/namespaces/{self.ns}/serviceaccounts/{name}/token",
                                     {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                                      "spec": {"audiences": [AUDIENCE], "expirationSeconds": 600}})
        self.assertEqual(reply.code, 201, reply.body)
        return reply.body["status"]["token"]  # type: ignore[no-any-return]

    @needs("reviews")
    async def test_token_review(self) -> None:
        token = await self.service_account_token("app")
        review = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                  "spec": {"token": token, "audiences": [AUDIENCE]}}
        reply = await self.kube.call("POST", "/apis/authentication.k8s.io/v1/tokenreviews", review)
        self.assertEqual(reply.code, 201, reply.body)
        status = reply.body["status"]
        self.assertTrue(status["authenticated"])
        self.assertEqual(status["user"]["username"], f"system:serviceaccount:{self.ns}:app")
        self.assertIn(f"system:serviceaccounts:{self.ns}", status["user"]["groups"])
        self.assertEqual(status["audiences"], [AUDIENCE])
        for spec in ({"token": "not-a-token-" + secrets.token_hex(8), "audiences": [AUDIENCE]},
                     {"token": token, "audiences": ["some-other-audience"]}):
            reply = await self.kube.call("POST", "/apis/authentication.k8s.io/v1/tokenreviews",
                                         dict(review, spec=spec))
            self.assertEqual(reply.code, 201, reply.body)
            self.assertTrue(not reply.body["status"].get("authenticated"), reply.body["status"])

    @needs("reviews")
    async def test_subject_access_review(self) -> None:
        role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "use-harbor"},
                "rules": [{"apiGroups": ["connectors.alauda.io"], "resources": ["connectors"],
                           "resourceNames": ["harbor"], "verbs": ["get"]}]}
        binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                   "metadata": {"name": "use-harbor"},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "use-harbor"},
                   "subjects": [{"kind": "ServiceAccount", "name": "app", "namespace": self.ns}]}
        rbac = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{self.ns}"
        await self.create(rbac + "/roles", role)
        await self.create(rbac + "/rolebindings", binding)
        user = f"system:serviceaccount:{self.ns}:app"
        groups = ["system:serviceaccounts", f"system:serviceaccounts:{self.ns}", "system:authenticated"]

        async def allowed(name: str, namespace: str, verb: str = "get") -> bool:
            review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                      "spec": {"user": user, "groups": groups, "resourceAttributes": {
                          "namespace": namespace, "verb": verb, "group": "connectors.alauda.io",
                          "resource": "connectors", "name": name}}}
            reply = await self.kube.call("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", review)
            self.assertEqual(reply.code, 201, reply.body)
            return bool(reply.body["status"]["allowed"])

        async def eventually_allowed() -> bool:  # RBAC caches take a moment on real clusters
            return await allowed("harbor", self.ns)
        await self.eventually(eventually_allowed)
        self.assertEqual([await allowed("other", self.ns), await allowed("harbor", "elsewhere"),
                          await allowed("harbor", self.ns, "delete")], [False, False, False])

    @needs("authn")
    async def test_unauthenticated_is_401(self) -> None:
        reply = await self.kube.call("GET", self.secrets_path(), token="wrong-" + secrets.token_hex(8))
        self.assertEqual((reply.code, reply.body["kind"], reply.body["reason"]), (401, "Status", "Unauthorized"))


class FakeContractTests(ContractMixin, TestCase):  # type: ignore[misc]
    backend_factory = FakeBackend


class KmockContractTests(ContractMixin, TestCase):  # type: ignore[misc]
    backend_factory = KmockBackend


class RealClusterContractTests(ContractMixin, TestCase):  # type: ignore[misc]
    backend_factory = staticmethod(real_backend)
    timeout = 240  # the first test of a run starts the control plane
    if not os.environ.get("KUBECONFIG") and kubeapi.skip_reason():
        skip = kubeapi.skip_reason()


# --- the fake's own hooks, over HTTP --------------------------------------------

def rbac_docs() -> list[dict[str, Any]]:
    return [d for d in read_manifests([ROOT / "k8s" / "rbac.yaml"]) if isinstance(d, dict)]


class FakeHooksTests(TestCase):
    """What tests of the cluster mode use the fake for, beyond the contract."""

    timeout = 30

    def setUp(self) -> None:
        self.clock = Clock()
        self.fake, self.server = start_fake_kube(self, reactor, clock=self.clock, bookmark_interval=30.0)
        self.kube = KubeHTTP(self.server.url, self.fake.admin_token)

    async def open_watch(self, path: str, **params: str) -> Watch:
        w = await self.kube.watch(path, **params)
        self.addCleanup(w.close)
        return w

    async def test_counters_and_zero_write_reads(self) -> None:
        self.fake.apply(connector("c"))
        self.fake.reset_counts()
        await self.kube.call("GET", f"{CR}/namespaces/default/connectors")
        await self.kube.call("GET", f"{CR}/namespaces/default/connectors/c")
        await self.open_watch(f"{CR}/connectors")
        await self.kube.call("POST", "/apis/authentication.k8s.io/v1/tokenreviews",
                             {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                              "spec": {"token": "x"}})
        self.assertEqual(self.fake.writes(), 0)
        self.assertEqual((self.fake.count("list", "connectors"), self.fake.count("get"),
                          self.fake.count("watch", "connectors"), self.fake.counts[("create", "tokenreviews")]),
                         (1, 1, 1, 1))
        await self.kube.call("PATCH", f"{CR}/namespaces/default/connectors/c/status", {"status": {"a": 1}},
                             content_type="application/merge-patch+json")
        self.assertEqual((self.fake.writes(), self.fake.counts[("patch", "connectors/status")]), (1, 1))

    async def test_unchanged_update_writes_nothing(self) -> None:
        stored = self.fake.apply(connector("c"))[0]
        events = []
        w = await self.open_watch(f"{CR}/namespaces/default/connectors",
                                  resourceVersion=stored["metadata"]["resourceVersion"])
        reply = await self.kube.call("PUT", f"{CR}/namespaces/default/connectors/c", stored)
        self.assertEqual(reply.body["metadata"]["resourceVersion"], stored["metadata"]["resourceVersion"])
        self.fake.apply(secret("marker"))
        await self.kube.call("PATCH", f"{CR}/namespaces/default/connectors/c", {"metadata": {"labels": {"a": "b"}}},
                             content_type="application/merge-patch+json")
        event = await w.next()
        assert event is not None
        events.append(event["type"])
        self.assertEqual(events, ["MODIFIED"])  # the no-op PUT sent nothing

    async def test_watch_spellings(self) -> None:
        self.fake.apply(secret("a"), secret("b"))
        for path, params in (("/api/v1/namespaces/default/secrets", {"watch": "1"}),
                             ("/api/v1/watch/namespaces/default/secrets/b", {})):
            response = await self.kube.agent.request(
                b"GET", (self.server.url + path + ("?" + urlencode(params) if params else "")).encode(),
                treq.client.Headers({b"Authorization": [b"Bearer " + self.fake.admin_token.encode()]}))
            self.assertEqual(response.code, 200)
            queue: DeferredQueue[Any] = DeferredQueue()
            lines = _Lines(queue)
            response.deliverBody(lines)
            w = Watch(queue, lines)
            self.addCleanup(w.close)
            event = await w.next()
            assert event is not None
            self.assertEqual(event["type"], "ADDED")
            if not params:
                self.assertEqual(event["object"]["metadata"]["name"], "b")

    async def test_bookmarks_on_the_clock_and_timeout(self) -> None:
        w = await self.open_watch("/api/v1/secrets", allowWatchBookmarks="true", timeoutSeconds="100",
                                  resourceVersion=str(self.fake.resource_version))
        plain = await self.open_watch("/api/v1/secrets", resourceVersion=str(self.fake.resource_version))
        self.fake.apply(connector("elsewhere"))  # progress, for the bookmark to report
        self.clock.advance(30)
        event = await w.next(bookmarks=True)
        assert event is not None
        self.assertEqual((event["type"], event["object"]["metadata"]["resourceVersion"]),
                         ("BOOKMARK", str(self.fake.resource_version)))
        self.clock.advance(70)
        self.assertIsNone(await w.next())
        self.assertTrue(w.ended_cleanly)
        self.assertEqual(self.fake.open_watches, 1)
        self.fake.apply(secret("late"))
        event = await plain.next()
        assert event is not None
        self.assertEqual(event["type"], "ADDED")  # the watch without bookmarks saw none

    async def test_send_initial_events(self) -> None:
        self.fake.apply(secret("a"))
        w = await self.open_watch("/api/v1/namespaces/default/secrets", sendInitialEvents="true",
                                  allowWatchBookmarks="true", resourceVersionMatch="NotOlderThan")
        first, second = await w.next(), await w.next(bookmarks=True)
        assert first is not None and second is not None
        self.assertEqual((first["type"], second["type"]), ("ADDED", "BOOKMARK"))
        self.assertEqual(second["object"]["metadata"]["annotations"], {"k8s.io/initial-events-end": "true"})

    async def test_cut_watches_and_connections(self) -> None:
        w1 = await self.open_watch("/api/v1/secrets")
        self.fake.cut_watches()
        self.assertIsNone(await w1.next())
        self.assertTrue(not w1.ended_cleanly)
        w2 = await self.open_watch("/api/v1/secrets")
        self.assertEqual(self.fake.open_watches, 1)
        await self.server.cut_connections()
        self.assertIsNone(await w2.next())
        self.assertEqual(self.fake.open_watches, 0)
        w3 = await self.open_watch("/api/v1/secrets")
        self.fake.apply(secret("after"))
        event = await w3.next()
        assert event is not None
        self.assertEqual(event["object"]["metadata"]["name"], "after")

    async def test_unavailable_and_refused(self) -> None:
        self.fake.unavailable = True
        reply = await self.kube.call("GET", "/api/v1/secrets")
        self.assertEqual((reply.code, reply.body["reason"]), (503, "ServiceUnavailable"))
        self.fake.unavailable = False
        await self.server.refuse()
        with self.assertRaises(ConnectionRefusedError):
            await self.kube.call("GET", "/api/v1/secrets")
        port = self.server.port
        self.server.accept()
        self.assertEqual(self.server.port, port)
        self.assertEqual((await self.kube.call("GET", "/api/v1/secrets")).code, 200)

    async def test_callers_are_held_to_rbac(self) -> None:
        """The ServiceAccount of k8s/rbac.yaml can do what the proxy needs, and no more."""
        self.fake.apply(*([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "connectors-system"}}]
                          + rbac_docs()))
        token = secrets.token_hex(16)
        self.fake.add_token(token, "system:serviceaccount:connectors-system:connectors-proxy",
                            groups=["system:serviceaccounts", "system:serviceaccounts:connectors-system"])
        self.fake.apply(connector("c"))
        proxy = KubeHTTP(self.server.url, token)
        ok = [("GET", f"{CR}/connectors"), ("GET", "/api/v1/secrets"),
              ("GET", "/apis/coordination.k8s.io/v1/namespaces/connectors-system/leases/x")]
        for method, path in ok:
            reply = await proxy.call(method, path)
            self.assertIn(reply.code, (200, 404), (path, reply.body))
        reply = await proxy.call("GET", "/api/v1/namespaces/default/configmaps")
        self.assertEqual((reply.code, reply.body["reason"]), (403, "Forbidden"))
        self.assertEqual(reply.body["message"],
                         'configmaps is forbidden: User "system:serviceaccount:connectors-system:connectors-proxy" '
                         'cannot list resource "configmaps" in API group "" in the namespace "default"')
        reply = await proxy.call("PUT", f"{CR}/namespaces/default/connectors/c", {})
        self.assertEqual(reply.code, 403)
        self.assertIn('cannot update resource "connectors"', reply.body["message"])
        reply = await proxy.call("GET", "/apis/coordination.k8s.io/v1/namespaces/default/leases/x")
        self.assertEqual(reply.code, 403)

        async def can_i(verb: str, resource: str) -> bool:  # kubectl auth can-i
            reply = await proxy.call("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", {
                "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                "spec": {"resourceAttributes": {"verb": verb, "resource": resource}}})
            self.assertEqual(reply.code, 201, reply.body)
            return bool(reply.body["status"]["allowed"])
        self.assertEqual([await can_i("watch", "secrets"), await can_i("delete", "secrets")], [True, False])

    async def test_list_pages_and_expired_continue(self) -> None:
        self.fake.apply(*(secret(f"s{i}") for i in range(5)))
        first = (await self.kube.call("GET", "/api/v1/namespaces/default/secrets", params={"limit": "2"})).body
        self.assertEqual((len(first["items"]), first["metadata"]["remainingItemCount"]), (2, 3))
        second = (await self.kube.call("GET", "/api/v1/namespaces/default/secrets",
                                       params={"limit": "2", "continue": first["metadata"]["continue"]})).body
        self.assertEqual([i["metadata"]["name"] for i in second["items"]], ["s2", "s3"])
        self.fake.compact()
        reply = await self.kube.call("GET", "/api/v1/namespaces/default/secrets",
                                     params={"limit": "2", "continue": second["metadata"]["continue"]})
        self.assertEqual((reply.code, reply.body["reason"]), (410, "Expired"))

    async def test_patch_formats(self) -> None:
        self.fake.apply(connector("c"), {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
                                         "spec": {"ports": [{"name": "a", "port": 80}, {"name": "b", "port": 81}]}})
        path = f"{CR}/namespaces/default/connectors/c"
        reply = await self.kube.call("PATCH", path, [{"op": "replace", "path": "/spec/address", "value": "https://j"}],
                                     content_type="application/json-patch+json")
        self.assertEqual(reply.body["spec"]["address"], "https://j")
        reply = await self.kube.call("PATCH", path, [{"op": "test", "path": "/spec/address", "value": "nope"}],
                                     content_type="application/json-patch+json")
        self.assertEqual(reply.code, 422)
        for media in ("application/strategic-merge-patch+json", "application/apply-patch+yaml"):
            reply = await self.kube.call("PATCH", path, {"spec": {}}, content_type=media)
            self.assertEqual((reply.code, reply.body["reason"]), (415, "UnsupportedMediaType"))
        reply = await self.kube.call("PATCH", "/api/v1/namespaces/default/services/s",
                                     {"spec": {"ports": [{"port": 81, "name": "bee"}]}},
                                     content_type="application/strategic-merge-patch+json")
        self.assertEqual([p["name"] for p in reply.body["spec"]["ports"]], ["a", "bee"])

    async def test_tls_kubeconfig_and_the_real_cluster_client(self) -> None:
        """The real-cluster backend's client (kubeconfig, CA, token) against the fake over HTTPS."""
        fake, server = start_fake_kube(self, reactor, tls=True)
        path = server.write_kubeconfig(os.path.join(self.mktemp() + ".yaml"))
        client = client_from_kubeconfig(path)
        self.assertTrue(client.url.startswith("https://127.0.0.1:"))
        reply = await client.call("POST", "/api/v1/namespaces/default/secrets", secret("tls", a="1"))
        self.assertEqual(reply.code, 201)
        self.assertEqual((await client.call("GET", "/api/v1/namespaces/default/secrets/tls")).code, 200)
        untrusted = KubeHTTP(server.url, fake.admin_token)
        with self.assertRaises(ResponseNeverReceived):  # the fake's CA is not the system's
            await untrusted.call("GET", "/api/v1/secrets")

    async def test_discovery(self) -> None:
        groups = (await self.kube.call("GET", "/apis")).body
        self.assertIn("connectors.alauda.io", [g["name"] for g in groups["groups"]])
        resources = (await self.kube.call("GET", CR)).body["resources"]
        by_name = {r["name"]: r for r in resources}
        self.assertEqual((by_name["connectors"]["namespaced"], by_name["connectorclasses"]["namespaced"]),
                         (True, False))
        self.assertIn("connectors/status", by_name)
        self.assertEqual((await self.kube.call("GET", "/api/v1/nothings")).code, 404)


class OfficialClientTests(TestCase):
    """The official C{kubernetes} client decodes what the fake sends (it runs in threads: it blocks)."""

    timeout = 60

    async def test_typed_calls_and_watch(self) -> None:
        from kubernetes import client as kclient
        from kubernetes import config as kconfig
        from kubernetes import watch as kwatch
        from twisted.internet.threads import deferToThread

        fake, server = start_fake_kube(self, reactor)
        fake.apply(connector("harbor"), secret("s", password="p"))
        api = kconfig.new_client_from_config(server.write_kubeconfig(self.mktemp() + ".yaml"))
        self.addCleanup(api.close)
        core, custom = kclient.CoreV1Api(api), kclient.CustomObjectsApi(api)

        def work() -> tuple[Any, ...]:
            secrets_list = core.list_namespaced_secret("default")
            created = core.create_namespaced_service("default", kclient.V1Service(
                metadata=kclient.V1ObjectMeta(name="c-harbor"),
                spec=kclient.V1ServiceSpec(type="ExternalName", external_name="p.s.svc.cluster.local",
                                           ports=[kclient.V1ServicePort(name="http", port=80)])))
            connectors = custom.list_namespaced_custom_object("connectors.alauda.io", "v1alpha1", "default",
                                                              "connectors")
            events = [(e["type"], e["object"].metadata.name) for e in kwatch.Watch().stream(
                core.list_namespaced_secret, "default", timeout_seconds=1)]
            try:
                core.read_namespaced_secret("missing", "default")
                missing = None
            except kclient.ApiException as e:
                missing = e.status
            return secrets_list, created, connectors, events, missing
        secrets_list, created, connectors, events, missing = await deferToThread(work)
        self.assertEqual([s.metadata.name for s in secrets_list.items], ["s"])
        self.assertEqual(base64.b64decode(secrets_list.items[0].data["password"]), b"p")
        self.assertEqual((created.spec.session_affinity, created.spec.ports[0].target_port), ("None", 80))
        self.assertEqual([c["metadata"]["name"] for c in connectors["items"]], ["harbor"])
        self.assertEqual(events, [("ADDED", "s")])
        self.assertEqual(missing, 404)


# --- the fake's semantics, without sockets --------------------------------------

class FakeSemanticsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.fake = FakeKube(clock=self.clock)

    def rtype(self, plural: str) -> Any:
        return resource_by_name(plural)

    def error(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> ApiError:
        try:
            call(*args, **kwargs)
        except ApiError as e:
            return e
        raise AssertionError("no ApiError")

    def test_crd_schema_prunes_and_validates(self) -> None:
        body = dict(connector("c"), status={"x": 1})
        body["spec"] = dict(body["spec"], unknown="dropped",
                            params=[{"name": "p", "value": {"free": ["form"]}}])
        stored = self.fake.create_object(self.rtype("connectors"), "default", body)
        self.assertNotIn("unknown", stored["spec"])
        self.assertNotIn("status", stored)
        self.assertEqual(stored["spec"]["params"], [{"name": "p", "value": {"free": ["form"]}}])
        bad = connector("bad")
        bad["spec"] = {"address": 5, "connectorClassName": 7}
        e = self.error(self.fake.create_object, self.rtype("connectors"), "default", bad)
        self.assertEqual(e.code, 422)
        self.assertEqual(sorted(c["field"] for c in e.details["causes"]),  # type: ignore[index]
                         ["spec.address", "spec.connectorClassName"])
        self.assertTrue(e.message.startswith('Connector.connectors.alauda.io "bad" is invalid: ['))

    def test_cr_update_needs_resource_version(self) -> None:
        stored = self.fake.create_object(self.rtype("connectors"), "default", connector("c"))
        body = dict(stored, metadata={k: v for k, v in stored["metadata"].items() if k != "resourceVersion"})
        e = self.error(self.fake.replace_object, self.rtype("connectors"), "default", "c", body)
        self.assertEqual(e.code, 422)
        # Core types take an unconditional update.
        s = self.fake.create_object(self.rtype("secrets"), "default", secret("s", a="1"))
        del s["metadata"]["resourceVersion"]
        s["data"] = {"a": "Mg=="}
        self.assertEqual(self.fake.replace_object(self.rtype("secrets"), "default", "s", s)["data"], {"a": "Mg=="})

    def test_namespaces(self) -> None:
        e = self.error(self.fake.create_object, self.rtype("secrets"), "nowhere", secret("s"))
        self.assertEqual((e.code, e.message), (404, 'namespaces "nowhere" not found'))
        self.fake.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team"}})
        ns = self.fake.object("namespaces", None, "team")
        assert ns is not None
        self.assertEqual((ns["status"], ns["metadata"]["labels"]),
                         ({"phase": "Active"}, {"kubernetes.io/metadata.name": "team"}))
        self.fake.create_object(self.rtype("secrets"), "team", secret("s"))
        self.fake.create_object(self.rtype("connectors"), "team", connector("held", finalizers=["x.io/hold"]))
        marked, gone = self.fake.delete_object(self.rtype("namespaces"), None, "team")
        self.assertEqual((marked["status"]["phase"], gone), ("Terminating", False))
        self.assertIsNone(self.fake.object("secrets", "team", "s"))
        e = self.error(self.fake.create_object, self.rtype("secrets"), "team", secret("t"))
        self.assertEqual(e.code, 403)
        held = self.fake.object("connectors", "team", "held")
        assert held is not None
        held["metadata"]["finalizers"] = []
        self.fake.replace_object(self.rtype("connectors"), "team", "held", held)
        self.assertIsNone(self.fake.object("namespaces", None, "team"))

    def test_propagation_policies(self) -> None:
        owner = self.fake.create_object(self.rtype("connectors"), "default", connector("o"))
        ref = {"apiVersion": CR_VERSION, "kind": "Connector", "name": "o", "uid": owner["metadata"]["uid"]}

        def dependent(name: str) -> None:
            body = secret(name)
            body["metadata"]["ownerReferences"] = [ref]
            self.fake.create_object(self.rtype("secrets"), "default", body)
        dependent("d1")
        self.fake.delete_object(self.rtype("connectors"), "default", "o", propagation="Orphan")
        d1 = self.fake.object("secrets", "default", "d1")
        assert d1 is not None
        self.assertNotIn("ownerReferences", d1["metadata"])
        # A dependent whose owner is already gone is collected at once.
        dependent("d2")
        self.assertIsNone(self.fake.object("secrets", "default", "d2"))
        owner = self.fake.create_object(self.rtype("connectors"), "default", connector("o"))
        ref["uid"] = owner["metadata"]["uid"]
        dependent("d3")
        marked, gone = self.fake.delete_object(self.rtype("connectors"), "default", "o", propagation="Foreground")
        self.assertEqual((gone, marked["metadata"]["finalizers"]), (False, ["foregroundDeletion"]))
        self.assertIsNone(self.fake.object("secrets", "default", "d3"))
        self.assertIsNone(self.fake.object("connectors", "default", "o"))

    def test_services(self) -> None:
        svc = self.fake.create_object(self.rtype("services"), "default", {
            "metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}], "selector": {"a": "b"}}})
        spec = svc["spec"]
        self.assertEqual((spec["type"], spec["internalTrafficPolicy"], spec["clusterIPs"]),
                         ("ClusterIP", "Cluster", [spec["clusterIP"]]))
        body: dict[str, Any] = {"metadata": {"name": "s"}, "spec": {"ports": [{"port": 81}]}}
        kept = self.fake.replace_object(self.rtype("services"), "default", "s", body)
        self.assertEqual(kept["spec"]["clusterIP"], spec["clusterIP"])
        body["spec"]["clusterIP"] = "10.0.0.1"
        e = self.error(self.fake.replace_object, self.rtype("services"), "default", "s", body)
        self.assertEqual((e.code, e.details["causes"][0]["field"]), (422, "spec.clusterIPs[0]"))  # type: ignore[index]
        e = self.error(self.fake.create_object, self.rtype("services"), "default",
                       {"metadata": {"name": "x"}, "spec": {"type": "ExternalName"}})
        self.assertEqual(e.details["causes"][0]["field"], "spec.externalName")  # type: ignore[index]

    def test_secrets(self) -> None:
        stored = self.fake.create_object(self.rtype("secrets"), "default", {
            "metadata": {"name": "s"}, "type": "kubernetes.io/basic-auth",
            "data": {"username": base64.b64encode(b"u").decode()}, "stringData": {"password": "p"}})
        self.assertNotIn("stringData", stored)
        self.assertEqual(base64.b64decode(stored["data"]["password"]), b"p")
        e = self.error(self.fake.create_object, self.rtype("secrets"), "default",
                       {"metadata": {"name": "t"}, "type": "kubernetes.io/basic-auth"})
        self.assertEqual(e.code, 422)
        e = self.error(self.fake.create_object, self.rtype("secrets"), "default",
                       {"metadata": {"name": "u"}, "data": {"a": "not base64!"}})
        self.assertEqual(e.code, 400)
        canary = secrets.token_hex(8)
        e = self.error(self.fake.create_object, self.rtype("secrets"), "default", {
            "metadata": {"name": "d"}, "type": "kubernetes.io/dockerconfigjson",
            "stringData": {".dockerconfigjson": "{" + canary}})
        self.assertNotIn(canary, json.dumps(e.status()))

    def test_lease_times_are_normalized(self) -> None:
        lease = self.fake.create_object(self.rtype("leases"), "default", {
            "metadata": {"name": "l"}, "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15,
                                                "renewTime": "2024-01-02T03:04:05Z"}})
        self.assertEqual(lease["spec"]["renewTime"], "2024-01-02T03:04:05.000000Z")
        e = self.error(self.fake.create_object, self.rtype("leases"), "default", {
            "metadata": {"name": "m"}, "spec": {"leaseDurationSeconds": 0}})
        self.assertEqual(e.code, 422)

    def test_generate_name_and_create_with_resource_version(self) -> None:
        stored = self.fake.create_object(self.rtype("secrets"), "default", {"metadata": {"generateName": "x-"}})
        self.assertTrue(stored["metadata"]["name"].startswith("x-"))
        self.assertEqual(len(stored["metadata"]["name"]), 7)
        e = self.error(self.fake.create_object, self.rtype("secrets"), "default",
                       {"metadata": {"name": "y", "resourceVersion": "5"}})
        self.assertEqual(e.code, 500)

    def test_tokens_expire_and_die_with_their_service_account(self) -> None:
        self.fake.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "app"}})
        token = self.fake.token_request("default", "app", {"spec": {"audiences": ["a"], "expirationSeconds": 600}})
        jwt = token["status"]["token"]
        claims = json.loads(base64.urlsafe_b64decode(jwt.split(".")[1] + "=="))
        self.assertEqual((claims["sub"], claims["aud"]), ("system:serviceaccount:default:app", ["a"]))

        def review(audiences: list[str]) -> Any:
            return self.fake.token_review({"spec": {"token": jwt, "audiences": audiences}})["status"]
        self.assertTrue(review(["a"])["authenticated"])
        self.assertIsNone(self.fake.authenticate(jwt))  # not for the API server's own audience
        self.fake.remove("serviceaccounts", "default", "app")
        self.assertNotIn("authenticated", review(["a"]))
        self.fake.add_token("static", "alice", groups=["dev"], expires=self.clock.seconds() + 10)
        self.assertEqual(self.fake.token_review({"spec": {"token": "static"}})["status"]["user"],
                         {"username": "alice", "groups": ["dev", "system:authenticated"]})
        self.clock.advance(11)
        self.assertNotIn("authenticated", self.fake.token_review({"spec": {"token": "static"}})["status"])

    def test_allow_rules_and_review_counts_of_groups(self) -> None:
        self.fake.allow(group="devs", verbs=["get"], api_groups=["connectors.alauda.io"],
                        resources=["connectors"], namespace="default", names=["harbor"])

        def sar(groups: list[str], name: str) -> bool:
            return bool(self.fake.access_review({"spec": {"user": "bob", "groups": groups, "resourceAttributes": {
                "namespace": "default", "verb": "get", "group": "connectors.alauda.io",
                "resource": "connectors", "name": name}}})["status"]["allowed"])
        self.assertEqual([sar(["devs"], "harbor"), sar([], "harbor"), sar(["devs"], "other")], [True, False, False])
        e = self.error(self.fake.access_review, {"spec": {"resourceAttributes": {"verb": "get"}}})
        self.assertEqual(e.code, 422)

    def test_history_limit_compacts(self) -> None:
        fake = FakeKube(clock=self.clock, history_limit=3)
        first = fake.create_object(self.rtype("secrets"), "default", secret("a"))
        for i in range(4):
            fake.create_object(self.rtype("secrets"), "default", secret(f"b{i}"))
        e = self.error(fake.watch, self.rtype("secrets"), None, resource_version=first["metadata"]["resourceVersion"],
                       emit=lambda event: None, end=lambda clean: None)
        self.assertEqual((e.code, e.reason), (410, "Expired"))
        e = self.error(fake.list_objects, self.rtype("secrets"), None, resource_version="999999")
        self.assertEqual((e.code, e.details["causes"][0]["reason"]), (504, "ResourceVersionTooLarge"))  # type: ignore[index]

    def test_cluster_scoped_objects_have_no_namespace(self) -> None:
        klass = {"apiVersion": CR_VERSION, "kind": "ConnectorClass",
                 "metadata": {"name": "git", "namespace": "ignored"}, "spec": {}}
        stored = self.fake.create_object(self.rtype("connectorclasses"), None, klass)
        self.assertNotIn("namespace", stored["metadata"])
        self.assertEqual(self.fake.object("connectorclasses", None, "git"), stored)

    def test_example_manifests_are_accepted(self) -> None:
        """The objects shipped in k8s/ (classes, the upstream classes of k8s/classes/, example Connector
        and Secret) pass the fake's validation."""
        docs = [d for d in read_manifests([ROOT / "k8s", ROOT / "k8s" / "classes"])
                if isinstance(d, dict) and d.get("kind") in ("ConnectorClass", "Connector", "Secret")]
        self.assertEqual(len(self.fake.apply(*docs)), len(docs))
        self.assertEqual(len(docs), 15)


class PureHelperTests(SynchronousTestCase):
    def test_label_selectors(self) -> None:
        labels = {"app": "web", "tier": "front", "n": "5"}
        cases = {"app=web": True, "app==web": True, "app!=web": False, "app in (a, web)": True,
                 "app notin (web)": False, "tier": True, "!tier": False, "missing": False, "!missing": True,
                 "n>3": True, "n<3": False, "app=web,tier in (front,back)": True, "": True}
        for selector, expected in cases.items():
            self.assertEqual(parse_label_selector(selector)(labels), expected, selector)
        for bad in ("app=", "=web", "app in web", "a b=c", "n>x"):
            if bad == "app=":
                self.assertFalse(parse_label_selector(bad)(labels))  # an empty value is valid
                continue
            with self.assertRaises(ApiError):
                parse_label_selector(bad)

    def test_field_selectors(self) -> None:
        secrets_type = resource_by_name("secrets")
        obj = {"metadata": {"name": "a", "namespace": "ns"}, "type": "Opaque"}
        self.assertTrue(parse_field_selector(secrets_type, "metadata.name=a,type==Opaque")(obj))
        self.assertFalse(parse_field_selector(secrets_type, "metadata.namespace!=ns")(obj))
        with self.assertRaises(ApiError) as raised:
            parse_field_selector(resource_by_name("connectors"), "spec.address=x")
        self.assertIn("not a known field selector", raised.exception.message)

    def test_patches(self) -> None:
        doc = {"a": {"b": 1, "c": 2}, "l": [1, 2]}
        self.assertEqual(merge_patch(doc, {"a": {"b": None, "d": 3}, "l": [3]}), {"a": {"c": 2, "d": 3}, "l": [3]})
        self.assertEqual(json_patch(doc, [{"op": "add", "path": "/l/-", "value": 3},
                                          {"op": "move", "from": "/a/b", "path": "/b"},
                                          {"op": "remove", "path": "/a/c"}]),
                         {"a": {}, "l": [1, 2, 3], "b": 1})
        self.assertEqual(doc, {"a": {"b": 1, "c": 2}, "l": [1, 2]})  # inputs untouched
        svc = {"spec": {"ports": [{"port": 80, "name": "a"}, {"port": 81, "name": "b"}]},
               "metadata": {"finalizers": ["x"]}}
        patched = strategic_merge_patch(svc, {"spec": {"ports": [{"port": 81, "$patch": "delete"},
                                                                 {"port": 82, "name": "c"}]},
                                              "metadata": {"finalizers": ["y"]}})
        self.assertEqual([p["port"] for p in patched["spec"]["ports"]], [80, 82])
        self.assertEqual(patched["metadata"]["finalizers"], ["x", "y"])

    def test_parse_target(self) -> None:
        t = parse_target(["apis", "connectors.alauda.io", "v1alpha1", "namespaces", "ns", "connectors", "c", "status"])
        assert t is not None
        self.assertEqual((t.rtype.plural, t.namespace, t.name, t.resource), ("connectors", "ns", "c",
                                                                            "connectors/status"))
        ns = parse_target(["api", "v1", "namespaces", "ns"])
        assert ns is not None
        self.assertEqual((ns.rtype.plural, ns.name), ("namespaces", "ns"))
        for bad in (["api", "v1", "secrets", "x"], ["api", "v1", "namespaces", "ns", "secrets", "x", "status"],
                    ["apis", "connectors.alauda.io", "v1alpha1", "namespaces", "n", "connectorclasses"]):
            self.assertIsNone(parse_target(bad), bad)

