"""
The asynchronous API client: URLs, verbs, headers and bodies on the wire;
errors as L{KubeError}; watch streams split on newlines with no line limit;
TLS with the cluster CA and a client certificate; rotating token files.

Protocol-level tests run without sockets; the rest against a small
twisted.web server on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from typing import Any

from OpenSSL import SSL, crypto
from service_identity import VerificationError
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.ssl import Certificate, CertificateOptions
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import ResponseDone, ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from connectors_proxy.kube.client import (
    CONNECTOR_CLASSES,
    CONNECTORS,
    SECRETS,
    SERVICES,
    KubeClient,
    KubeError,
    WatchProtocol,
)
from connectors_proxy.kube.config import KubeConfig
from connectors_proxy.tls.mint import CertificateAuthority, Leaf


class _Transport:
    stopped = False

    def stopProducing(self) -> None:
        self.stopped = True


class WatchProtocolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.protocol = WatchProtocol(lambda k, o: self.events.append((k, o)), self.clock, 30.0)
        self.transport = _Transport()
        self.protocol.makeConnection(self.transport)  # type: ignore[arg-type]

    def stream(self, *events: dict[str, Any]) -> bytes:
        return b"".join(json.dumps(e).encode() + b"\n" for e in events)

    def test_any_chunking(self) -> None:
        data = self.stream({"type": "ADDED", "object": {"a": 1}},
                           {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "9"}}},
                           {"type": "DELETED", "object": {"b": "x\ny"}})
        for size in (1, 2, 7, 1000):
            del self.events[:]
            for i in range(0, len(data), size):
                self.protocol.dataReceived(data[i:i + size])
            self.assertEqual([k for k, _ in self.events], ["ADDED", "BOOKMARK", "DELETED"])
            self.assertEqual(self.events[2][1], {"b": "x\ny"})

    def test_events_larger_than_16k(self) -> None:
        big = secrets.token_hex(150_000)  # 300 KB in one event
        data = self.stream({"type": "MODIFIED", "object": {"data": big}})
        for i in range(0, len(data), 4096):
            self.protocol.dataReceived(data[i:i + 4096])
        self.assertEqual(self.events, [("MODIFIED", {"data": big})])

    def test_end_of_stream(self) -> None:
        self.protocol.dataReceived(self.stream({"type": "ADDED", "object": {}}))
        self.protocol.connectionLost(Failure(ResponseDone()))
        self.assertIsNone(self.successResultOf(self.protocol.done))

    def test_cut_mid_event(self) -> None:
        self.protocol.dataReceived(b'{"type": "ADDED", "obj')
        self.protocol.connectionLost(Failure(ResponseDone()))
        self.assertEqual(self.failureResultOf(self.protocol.done, KubeError).value.reason,
                         "BadEvent")

    def test_garbage(self) -> None:
        self.protocol.dataReceived(b"<html>\n")
        self.failureResultOf(self.protocol.done, KubeError)
        self.assertTrue(self.transport.stopped)

    def test_consumer_error_ends_the_watch(self) -> None:
        protocol = WatchProtocol(lambda k, o: 1 / 0, self.clock, None)
        transport = _Transport()
        protocol.makeConnection(transport)  # type: ignore[arg-type]
        protocol.dataReceived(self.stream({"type": "ADDED", "object": {}},
                                          {"type": "ADDED", "object": {}}))
        self.failureResultOf(protocol.done, ZeroDivisionError)
        self.assertTrue(transport.stopped)
        self.assertEqual(protocol.events, 1)

    def test_idle_stream_is_closed(self) -> None:
        self.clock.advance(29)
        self.protocol.dataReceived(self.stream({"type": "BOOKMARK", "object": {}}))
        self.clock.advance(29)
        self.assertNoResult(self.protocol.done)
        self.clock.advance(1.5)
        self.assertEqual(self.failureResultOf(self.protocol.done, KubeError).value.reason,
                         "Timeout")
        self.assertTrue(self.transport.stopped)

    def test_stop_and_cancel(self) -> None:
        self.protocol.done.cancel()
        self.assertTrue(self.transport.stopped)
        self.assertIsNone(self.successResultOf(self.protocol.done))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class Recorder(Resource):
    """Records requests; answers from C{self.answers} (code, body) or a watch stream."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[dict[str, Any]] = []
        self.answers: list[tuple[int, Any]] = []
        self.streams: list[Request] = []

    def render(self, request: Request) -> bytes | int:  # type: ignore[override]
        body = request.content.read() if request.content else b""
        self.requests.append({
            "method": request.method.decode(), "uri": request.uri.decode(),
            "authorization": (request.getHeader(b"authorization") or b"").decode(),
            "content-type": (request.getHeader(b"content-type") or b"").decode(),
            "body": json.loads(body) if body else None})
        if b"watch=true" in request.uri and not self.answers:
            request.setHeader(b"content-type", b"application/json")
            request.write(b"")
            self.streams.append(request)
            return NOT_DONE_YET
        code, answer = self.answers.pop(0) if self.answers else (200, {"kind": "Thing"})
        if code == -1:
            return NOT_DONE_YET  # never answer
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        return answer if isinstance(answer, bytes) else json.dumps(answer).encode()


class ClientTests(TestCase):
    def setUp(self) -> None:
        self.recorder = Recorder()
        self.site = Site(self.recorder)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.token = secrets.token_hex(16)
        self.client = self.make_client(KubeConfig(
            server=f"http://127.0.0.1:{self.port.getHost().port}",
            authorization="Bearer " + self.token))

    def make_client(self, config: KubeConfig, **kw: Any) -> KubeClient:
        client = KubeClient(reactor, config, **kw)
        self.addCleanup(client.close)
        return client

    def tearDown(self) -> Deferred[None]:
        for request in self.recorder.streams:
            if not request.finished and not request._disconnected:
                request.finish()
        return deferLater(reactor, 0.01, lambda: None)

    async def _verbs(self) -> None:
        c = self.client
        await c.get(CONNECTORS, "team", "harbor")
        await c.list(SECRETS, label_selector="a=b", field_selector="type!=x", limit=10,
                     continue_="tok")
        await c.list(CONNECTOR_CLASSES)
        await c.create(SERVICES, "team", {"metadata": {"name": "c-harbor"}})
        await c.replace(SERVICES, "team", "c-harbor", {"metadata": {"name": "c-harbor"}})
        await c.replace_status(CONNECTORS, "team", "harbor", {"status": {"a": 1}})
        await c.delete(SERVICES, "team", "c-harbor", preconditions={"uid": "u1"})
        await c.create_token_review("client-token", ("aud",))
        await c.create_subject_access_review({"user": "u"})

    def test_requests_on_the_wire(self) -> Deferred[None]:
        d = Deferred.fromCoroutine(self._verbs())

        def check(_: object) -> None:
            r = self.recorder.requests
            self.assertEqual([(x["method"], x["uri"]) for x in r], [
                ("GET", "/apis/connectors.alauda.io/v1alpha1/namespaces/team/connectors/harbor"),
                ("GET", "/api/v1/secrets?labelSelector=a%3Db&fieldSelector=type%21%3Dx&limit=10"
                        "&continue=tok"),
                ("GET", "/apis/connectors.alauda.io/v1alpha1/connectorclasses"),
                ("POST", "/api/v1/namespaces/team/services"),
                ("PUT", "/api/v1/namespaces/team/services/c-harbor"),
                ("PUT", "/apis/connectors.alauda.io/v1alpha1/namespaces/team/connectors/harbor"
                        "/status"),
                ("DELETE", "/api/v1/namespaces/team/services/c-harbor"),
                ("POST", "/apis/authentication.k8s.io/v1/tokenreviews"),
                ("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews"),
            ])
            self.assertTrue(all(x["authorization"] == "Bearer " + self.token for x in r))
            self.assertEqual(r[3]["body"], {"apiVersion": "v1", "kind": "Service",
                                            "metadata": {"name": "c-harbor"}})
            self.assertEqual(r[3]["content-type"], "application/json")
            self.assertEqual(r[5]["body"]["kind"], "Connector")
            self.assertEqual(r[6]["body"]["preconditions"], {"uid": "u1"})
            self.assertEqual(r[7]["body"], {"apiVersion": "authentication.k8s.io/v1",
                                            "kind": "TokenReview",
                                            "spec": {"token": "client-token",
                                                     "audiences": ["aud"]}})
        return d.addCallback(check)

    def test_errors(self) -> Deferred[None]:
        self.recorder.answers = [
            (409, {"kind": "Status", "status": "Failure", "reason": "Conflict", "code": 409,
                   "message": "the object has been modified"}),
            (502, b"<html>bad gateway</html>"),
        ]

        async def go() -> None:
            try:
                await self.client.get(SERVICES, "a", "b")
            except KubeError as e:
                self.assertEqual((e.code, e.reason, e.message),
                                 (409, "Conflict", "the object has been modified"))
                self.assertTrue(e.conflict)
            else:
                self.fail("no error")
            try:
                await self.client.get(SERVICES, "a", "b")
            except KubeError as e:
                self.assertEqual(e.code, 502)
                self.assertIn("bad gateway", e.message)
            else:
                self.fail("no error")
        return Deferred.fromCoroutine(go())

    def test_timeout(self) -> Deferred[None]:
        client = self.make_client(KubeConfig(server=f"http://127.0.0.1:{self.port.getHost().port}"),
                                  timeout=0.2)
        self.recorder.answers = [(-1, None)]

        async def go() -> None:
            started = time.monotonic()
            try:
                await client.get(SERVICES, "a", "b")
            except ResponseNeverReceived:
                # The client's own deadline, not an immediate connection error.
                self.assertGreaterEqual(time.monotonic() - started, 0.15)
                self.assertLess(time.monotonic() - started, 5)
            else:
                self.fail("no timeout")
        return Deferred.fromCoroutine(go())

    def test_watch_stream(self) -> Deferred[None]:
        events: list[tuple[str, Any]] = []

        async def go() -> None:
            watch = await self.client.watch(SECRETS, lambda k, o: events.append((k, o)),
                                            resource_version="5", timeout_seconds=60)
            uri = self.recorder.requests[-1]["uri"]
            for part in ("watch=true", "resourceVersion=5", "allowWatchBookmarks=true",
                         "timeoutSeconds=60"):
                self.assertIn(part, uri)
            stream = self.recorder.streams[-1]
            big = "x" * 100_000
            payload = (json.dumps({"type": "ADDED", "object": {"big": big}}) + "\n"
                       + json.dumps({"type": "BOOKMARK", "object": {"m": 1}}) + "\n").encode()
            stream.write(payload[:50_000])
            stream.write(payload[50_000:])
            for _ in range(100):
                if len(events) == 2:
                    break
                await deferLater(reactor, 0.01, lambda: None)
            self.assertEqual([k for k, _ in events], ["ADDED", "BOOKMARK"])
            self.assertEqual(events[0][1]["big"], big)
            stream.finish()
            self.assertIsNone(await watch.done)
        return Deferred.fromCoroutine(go())

    def test_watch_stop_closes_connection(self) -> Deferred[None]:
        async def go() -> None:
            watch = await self.client.watch(SECRETS, lambda k, o: None)
            stream = self.recorder.streams[-1]
            lost = stream.notifyFinish()
            watch.stop()
            self.assertIsNone(await watch.done)
            try:
                await lost
            except Exception:  # noqa: BLE001 - the client went away: that is the point
                pass
        return Deferred.fromCoroutine(go())

    def test_watch_refused(self) -> Deferred[None]:
        self.recorder.answers = [(410, {"kind": "Status", "code": 410, "reason": "Expired",
                                        "message": "too old resource version: 1 (50)"})]

        async def go() -> None:
            try:
                await self.client.watch(SECRETS, lambda k, o: None, resource_version="1")
            except KubeError as e:
                self.assertTrue(e.gone)
            else:
                self.fail("no 410")
        return Deferred.fromCoroutine(go())

    def test_token_file_reread_on_401(self) -> Deferred[None]:
        folder = self.mktemp()
        os.makedirs(folder)
        path = os.path.join(folder, "token")
        with open(path, "w") as f:
            f.write("old")
        client = self.make_client(KubeConfig(server=f"http://127.0.0.1:{self.port.getHost().port}",
                                             token_file=path))

        async def go() -> None:
            await client.get(SERVICES, "a", "b")
            with open(path, "w") as f:
                f.write("new")
            self.recorder.answers = [(401, {"kind": "Status", "code": 401,
                                            "reason": "Unauthorized"}), (200, {})]
            await client.get(SERVICES, "a", "b")
            auths = [r["authorization"] for r in self.recorder.requests]
            self.assertEqual(auths, ["Bearer old", "Bearer old", "Bearer new"])
        return Deferred.fromCoroutine(go())


def _server_options(leaf: Leaf, client_ca: CertificateAuthority) -> CertificateOptions:
    return CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(leaf.key),  # type: ignore[arg-type]
        certificate=crypto.X509.from_cryptography(leaf.certificate),
        trustRoot=Certificate.loadPEM(client_ca.cert_pem()))


class TLSTests(TestCase):
    """The cluster CA is trusted, the server name checked, our client certificate sent."""

    def setUp(self) -> None:
        now = time.time()
        self.ca = CertificateAuthority.generate("cluster CA " + secrets.token_hex(4), now)
        self.client_ca = CertificateAuthority.generate("client CA " + secrets.token_hex(4), now)
        self.leaf = self.ca.mint(["127.0.0.1", "kubernetes.default.svc"], now)
        self.client_leaf = self.client_ca.mint([], now, client=True, common_name="proxy")
        self.recorder = Recorder()
        self.port = reactor.listenSSL(0, Site(self.recorder),
                                      _server_options(self.leaf, self.client_ca),
                                      interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.server = f"https://127.0.0.1:{self.port.getHost().port}"

    def client(self, **kw: Any) -> KubeClient:
        config = KubeConfig(server=self.server, ca_pem=self.ca.cert_pem(),
                            client_cert_pem=self.client_leaf.cert_pem(),
                            client_key_pem=self.client_leaf.key_pem(), **kw)
        client = KubeClient(reactor, config)
        self.addCleanup(client.close)
        return client

    def test_ca_and_client_certificate(self) -> Deferred[Any]:
        return self.client().get(SERVICES, "a", "b")

    def test_server_name_override(self) -> Deferred[Any]:
        return self.client(tls_server_name="kubernetes.default.svc").get(SERVICES, "a", "b")

    def _refused_by(self, error: ResponseNeverReceived, kind: type, text: str = "") -> None:
        [reason] = error.reasons
        self.assertIsInstance(reason.value, kind)
        self.assertIn(text, str(reason.value))
        self.assertEqual(self.recorder.requests, [])

    def test_wrong_name_refused(self) -> Deferred[Any]:
        d = self.client(tls_server_name="evil.example.com").get(SERVICES, "a", "b")
        return self.assertFailure(d, ResponseNeverReceived).addCallback(
            self._refused_by, VerificationError)

    def test_unknown_ca_refused(self) -> Deferred[Any]:
        other = CertificateAuthority.generate("other", time.time())
        config = KubeConfig(server=self.server, ca_pem=other.cert_pem(),
                            client_cert_pem=self.client_leaf.cert_pem(),
                            client_key_pem=self.client_leaf.key_pem())
        client = KubeClient(reactor, config)
        self.addCleanup(client.close)
        d = client.get(SERVICES, "a", "b")

        def no_request(_: object) -> None:
            self.assertEqual(self.recorder.requests, [])
        return self.assertFailure(d, ResponseNeverReceived).addCallback(
            self._refused_by, SSL.Error, "certificate verify failed").addCallback(no_request)

    def test_no_client_certificate_refused(self) -> Deferred[Any]:
        client = KubeClient(reactor, KubeConfig(server=self.server, ca_pem=self.ca.cert_pem()))
        self.addCleanup(client.close)
        return self.assertFailure(client.get(SERVICES, "a", "b"), ResponseNeverReceived).addCallback(
            self._refused_by, SSL.Error, "certificate required")
