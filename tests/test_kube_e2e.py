"""
Cluster mode against the verified fake API server
(L{connectors_proxy.testing.fakekube}) over real HTTP on 127.0.0.1: the
client, reflectors, writer, leader election and identity reviews as the
daemon runs them, with the RBAC of C{k8s/rbac.yaml}.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import secrets
import time
from collections.abc import Iterable
from typing import Any

import yaml
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from connectors_proxy.auth.interfaces import Identity
from connectors_proxy.kube.cluster import ClusterMode
from connectors_proxy.kube.config import load_kubeconfig
from connectors_proxy.kube.identity import ReviewUnavailable
from connectors_proxy.model.objects import ObjectRef
from connectors_proxy.model.state import Store
from connectors_proxy.testing.fakekube import FakeKube, start_fake_kube

from .support.waiting import eventually, sleep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROXY_SA = "system:serviceaccount:connectors-system:connectors-proxy"


def oci_class(proxy: bool = True) -> dict[str, Any]:
    spec: dict[str, Any] = {"auth": {"types": [
        {"name": "basicAuth", "secretType": "kubernetes.io/basic-auth"}]}}
    if proxy:
        spec["proxy"] = {"ref": {"kind": "Service", "name": "connectors-proxy",
                                 "namespace": "connectors-system"}}
    return {"apiVersion": "connectors.alauda.io/v1alpha1", "kind": "ConnectorClass",
            "metadata": {"name": "rest"}, "spec": spec}


def connector(name: str = "harbor", ns: str = "team",
              address: str = "https://harbor.example.com") -> dict[str, Any]:
    return {"apiVersion": "connectors.alauda.io/v1alpha1", "kind": "Connector",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"connectorClassName": "rest", "address": address,
                     "auth": {"name": "basicAuth", "secretRef": {"name": name + "-secret"}}}}


def secret(name: str = "harbor-secret", ns: str = "team", password: str = "p1",
           extra: str = "") -> dict[str, Any]:
    data = {"username": "robot", "password": password}
    if extra:
        data["extra"] = extra
    return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/basic-auth",
            "metadata": {"name": name, "namespace": ns},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


def namespace(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def conditions(obj: dict[str, Any] | None) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c.get("reason", ""))
            for c in ((obj or {}).get("status") or {}).get("conditions", [])}


#: The client workloads' ServiceAccount.
BUILDER = "system:serviceaccount:team:builder"


def builder_token(fake: FakeKube, name: str = "harbor", groups: Iterable[str] = ()) -> str:
    """A new token of L{BUILDER}, which may use Connector C{team/NAME}."""
    token = secrets.token_hex(16)
    fake.add_token(token, BUILDER, groups=groups)
    fake.allow(user=BUILDER, verbs=["get"], api_groups=["connectors.alauda.io"],
               resources=["connectors"], namespace="team", names=[name])
    return token


def start_cluster_mode(test: TestCase, server: Any, proxy_token: str, **kw: Any) -> ClusterMode:
    """Cluster mode against C{server}, as the proxy's ServiceAccount (C{proxy_token}); stopped at cleanup."""
    path = test.mktemp() + ".kubeconfig"
    server.write_kubeconfig(path, token=proxy_token, namespace="connectors-system")
    kw.setdefault("stale_after", 1.0)
    mode = ClusterMode(reactor, load_kubeconfig(path), Store(), **kw)
    mode.startService()
    test.addCleanup(mode.stopService)
    return mode


class ClusterModeTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.fake, self.server = start_fake_kube(self, reactor, bookmark_interval=0.5)
        self.fake.apply(namespace("team"), namespace("connectors-system"))
        self.apply_rbac(self.fake)
        self.proxy_token = secrets.token_hex(16)
        self.fake.add_token(self.proxy_token, PROXY_SA,
                            groups=["system:serviceaccounts",
                                    "system:serviceaccounts:connectors-system"])

    @staticmethod
    def apply_rbac(fake: FakeKube) -> None:
        with open(os.path.join(ROOT, "k8s", "rbac.yaml")) as f:
            docs = [d for d in yaml.safe_load_all(f) if d and d["kind"] != "ServiceAccount"]
        fake.apply(*docs)

    def seed(self) -> None:
        self.fake.apply(oci_class(), secret(), connector())

    def start(self, **kw: Any) -> ClusterMode:
        return start_cluster_mode(self, self.server, self.proxy_token, **kw)

    def connector_obj(self, name: str = "harbor") -> dict[str, Any] | None:
        return self.fake.object("connectors", "team", name)

    def service_obj(self, name: str = "harbor") -> dict[str, Any] | None:
        return self.fake.object("services", "team", "c-" + name)

    def ready(self, name: str = "harbor") -> bool:
        return conditions(self.connector_obj(name)).get("Ready") == ("True", "Ready") and \
            self.service_obj(name) is not None

    async def _cold_start(self) -> None:
        self.seed()
        mode = self.start()
        await eventually(self.ready, what="Service and Ready status")
        svc = self.service_obj()
        assert svc is not None
        self.assertEqual(svc["spec"]["type"], "ExternalName")
        self.assertEqual(svc["spec"]["externalName"],
                         "connectors-proxy.connectors-system.svc.cluster.local")
        self.assertEqual(svc["metadata"]["labels"]["app.kubernetes.io/managed-by"],
                         "connectors-proxy")
        owner = svc["metadata"]["ownerReferences"][0]
        self.assertEqual((owner["kind"], owner["uid"], owner["controller"],
                          owner["blockOwnerDeletion"]),
                         ("Connector", self.connector_obj()["metadata"]["uid"], True, True))  # type: ignore[index]
        status = self.connector_obj()["status"]  # type: ignore[index]
        self.assertEqual(status["proxy"]["httpAddress"]["url"],
                         "http://c-harbor.team.svc.cluster.local")
        self.assertEqual(status["observedGeneration"], 1)
        await eventually(lambda: mode.store.ready, what="store ready")
        self.assertIn(ObjectRef("team", "harbor"), mode.store.snapshot.connectors)
        # Exactly one create and one status write, then nothing: bookmarks,
        # our own write coming back over the watch, time passing.
        await sleep(1.5)
        self.assertEqual(self.fake.count("create", "services"), 1)
        self.assertEqual(self.fake.count("update", "connectors/status"), 1)
        self.assertEqual(self.fake.writes(), 2)

    def test_cold_start_and_zero_writes(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._cold_start())

    async def _invalid_policy(self) -> None:
        self.seed()
        self.start()
        await eventually(self.ready, what="Service and Ready status")
        canary = "canary-" + secrets.token_hex(8)
        broken = oci_class()
        # The comment holds a canary: no policy text reaches the status.
        broken["spec"]["proxy"]["authExtractor"] = {
            "rego": f"package proxy\n# {canary}\nauth := {{\"token\":\n"}
        self.fake.apply(broken)

        def invalid() -> bool:
            conds = conditions(self.connector_obj())
            return conds.get("ConnectorClassReady") == ("False", "InvalidPolicy") and \
                conds.get("Ready") == ("False", "InvalidPolicy")

        await eventually(invalid, what="InvalidPolicy on the Connector")
        status = self.connector_obj()["status"]  # type: ignore[index]
        message = next(c["message"] for c in status["conditions"] if c["type"] == "ConnectorClassReady")
        self.assertIn("ConnectorClass rest", message)
        self.assertIn("authExtractor", message)
        self.assertIn("does not compile", message)
        self.assertNotIn(canary, json.dumps(status))
        fixed = oci_class()
        fixed["spec"]["proxy"]["authExtractor"] = {
            "rego": "package proxy\nimport rego.v1\nauth := {\"token\": input.request.headers[\"Private-Token\"][0]}\n"}
        self.fake.apply(fixed)
        await eventually(self.ready, what="Ready again once the policy compiles")
        self.assertEqual(conditions(self.connector_obj())["ConnectorClassReady"], ("True", "ConnectorClassFound"))

    def test_invalid_policy(self) -> Deferred[None]:
        """
        A ConnectorClass whose authExtractor does not compile (checked in an
        evaluator process) puts C{InvalidPolicy} on its Connectors, naming
        the class and hook without the policy's text; fixing it clears it.
        """
        return Deferred.fromCoroutine(self._invalid_policy())

    async def _service_put_back(self) -> None:
        self.seed()
        self.start()
        await eventually(self.ready)
        self.fake.remove("services", "team", "c-harbor")
        await eventually(self.service_obj, what="the Service back")
        edited = copy.deepcopy(self.service_obj())
        assert edited is not None
        edited["spec"] = {"type": "ClusterIP", "ports": [{"name": "x", "port": 1234}]}
        self.fake.apply(edited)
        await eventually(lambda: (self.service_obj() or {}).get("spec", {}).get("type")
                         == "ExternalName", what="the edit undone")
        svc = self.service_obj()
        assert svc is not None
        self.assertEqual([p["port"] for p in svc["spec"]["ports"]], [80])
        self.assertFalse(svc["spec"].get("clusterIP"))

    def test_service_put_back(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._service_put_back())

    async def _conditions(self) -> None:
        self.fake.apply(secret("x" * 62 + "-secret"), connector("x" * 62), connector("orphan"))
        self.start()
        await eventually(lambda: conditions(self.connector_obj("orphan")).get("ConnectorClassReady")
                         == ("False", "ConnectorClassNotFound"), what="ConnectorClassNotFound")
        self.fake.apply(oci_class())
        await eventually(lambda: conditions(self.connector_obj("x" * 62)).get("ProxyServiceReady")
                         == ("False", "InvalidServiceName"), what="InvalidServiceName")
        await eventually(lambda: conditions(self.connector_obj("orphan")).get("SecretReady")
                         == ("False", "SecretNotFound"), what="SecretNotFound")
        self.assertEqual([s["metadata"]["name"] for s in self.fake.objects("services", "team")],
                         ["c-orphan"])

    def test_conditions(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._conditions())

    async def _deleted_connector(self) -> None:
        self.seed()
        self.start()
        await eventually(self.ready)
        self.fake.remove("connectors", "team", "harbor")
        # The API server's garbage collector removes the Service; we do not
        # bring it back for a Connector that is gone.
        await eventually(lambda: self.service_obj() is None, what="Service collected")
        await sleep(0.5)
        self.assertIsNone(self.service_obj())

    def test_deleted_connector(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._deleted_connector())

    async def _resume(self) -> None:
        self.seed()
        mode = self.start()
        await eventually(self.ready)
        lists = self.fake.count("list", "secrets")
        await self.server.cut_connections()
        self.fake.apply(secret(password="while-away"))
        ref = ObjectRef("team", "harbor-secret")
        await eventually(lambda: mode.store.snapshot.secrets[ref].data["password"] == b"while-away",
                         what="the change made while the watch was cut")
        self.assertEqual(self.fake.count("list", "secrets"), lists, "resumed, not listed again")

    def test_watch_cut_resumes(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._resume())

    async def _gone(self) -> None:
        self.seed()
        mode = self.start()
        await eventually(self.ready)
        lists = self.fake.count("list", "secrets")
        await self.server.refuse()
        await self.server.cut_connections()
        self.fake.apply(secret(password="after-compaction"), secret("new-secret"))
        self.fake.compact()
        self.server.accept()
        ref = ObjectRef("team", "harbor-secret")
        await eventually(lambda: ObjectRef("team", "new-secret") in mode.store.snapshot.secrets
                         and mode.store.snapshot.secrets[ref].data["password"]
                         == b"after-compaction", timeout=20, what="relisted after 410")
        self.assertGreater(self.fake.count("list", "secrets"), lists)

    def test_gone_lists_again(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._gone())

    async def _rotation(self) -> None:
        self.seed()
        mode = self.start()
        await eventually(lambda: mode.store.ready)
        ref = ObjectRef("team", "harbor-secret")
        started = time.monotonic()
        # A large Secret: its watch event is far over 16 KiB.
        self.fake.apply(secret(password="rotated", extra="x" * 200_000))
        await eventually(lambda: mode.store.snapshot.secrets[ref].data["password"] == b"rotated",
                         timeout=2.0, what="the rotated Secret within 2 s")
        self.assertLess(time.monotonic() - started, 2.0)

    def test_rotated_secret_within_two_seconds(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._rotation())

    async def _stale(self) -> None:
        self.seed()
        mode = self.start(stale_after=0.5)
        await eventually(lambda: mode.store.ready)
        await self.server.refuse()
        await self.server.cut_connections()
        await eventually(lambda: not mode.store.ready, what="stale")
        self.assertIn(ObjectRef("team", "harbor"), mode.store.snapshot.connectors)
        self.server.accept()
        await eventually(lambda: mode.store.ready, timeout=15, what="ready again")

    def test_stale_while_away(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stale())

    async def _leaders(self) -> None:
        self.seed()
        timings = {"lease_duration": 2.0, "renew_deadline": 1.5, "retry_period": 0.2}
        a = self.start(leader_elect=True, identity="a", **timings)
        await eventually(lambda: a.is_leader, what="a leads")
        b = self.start(leader_elect=True, identity="b", **timings)
        await eventually(self.ready)
        await sleep(0.5)
        self.assertEqual([a.is_leader, b.is_leader], [True, False])
        lease = self.fake.object("leases", "connectors-system", "connectors-proxy")
        assert lease is not None
        self.assertEqual(lease["spec"]["holderIdentity"], "a")
        # a dies without releasing; b takes over and repairs.
        assert a.elector is not None
        a.elector.stop(release=False)
        await a.stopService()
        died = time.monotonic()
        self.fake.remove("services", "team", "c-harbor")
        await eventually(lambda: b.is_leader, timeout=10, what="b leads")
        self.assertLess(time.monotonic() - died, 2.0 + 2 * 0.2 * 2.2 + 0.5)
        await eventually(self.service_obj, what="b puts the Service back")
        lease = self.fake.object("leases", "connectors-system", "connectors-proxy")
        assert lease is not None
        self.assertEqual((lease["spec"]["holderIdentity"], lease["spec"]["leaseTransitions"]),
                         ("b", 1))

    def test_leader_election(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._leaders())

    async def _identity(self) -> None:
        self.seed()
        mode = self.start()
        client_token = builder_token(self.fake, groups=["system:serviceaccounts"])
        v = mode.verifier
        for _ in range(1000):
            identity = await v.authenticate(client_token)
            assert identity is not None
            self.assertTrue(await v.authorize(identity, "team", "harbor"))
        self.assertEqual(identity.username, BUILDER)
        self.assertEqual(self.fake.count("create", "tokenreviews"), 1)
        self.assertEqual(self.fake.count("create", "subjectaccessreviews"), 1)
        self.assertFalse(await v.authorize(identity, "team", "other"))
        self.assertIsNone(await v.authenticate("not-a-token"))
        self.fake.unavailable = True
        try:
            await v.authenticate(secrets.token_hex(8))
        except ReviewUnavailable:
            pass
        else:
            self.fail("no ReviewUnavailable")
        try:
            await v.authorize(Identity("someone"), "team", "harbor")
        except ReviewUnavailable:
            pass
        else:
            self.fail("no ReviewUnavailable")

    def test_identity_reviews(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._identity())


class TLSClusterTests(TestCase):
    timeout = 30

    async def _tls(self) -> None:
        fake, server = start_fake_kube(self, reactor, tls=True)
        fake.apply(namespace("team"), oci_class(), secret(), connector())
        path = server.write_kubeconfig(self.mktemp() + ".kubeconfig")
        config = load_kubeconfig(path)
        self.assertTrue(config.server.startswith("https://"))
        self.assertIsNotNone(config.ca_pem)
        mode = ClusterMode(reactor, config, Store())
        mode.startService()
        self.addCleanup(mode.stopService)
        await eventually(lambda: fake.object("services", "team", "c-harbor"), what="Service over TLS")

    def test_tls(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._tls())


class Upstream(Resource):
    """A REST upstream that reports the credentials it was given."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, str]] = []

    def render(self, request: Request) -> bytes:  # type: ignore[override]
        seen = {"authorization": (request.getHeader(b"authorization") or b"").decode(),
                "path": request.uri.decode()}
        self.seen.append(seen)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(seen).encode()


def listen_upstream(test: TestCase) -> tuple[Upstream, str]:
    """An L{Upstream} on a free loopback port, stopped at cleanup; it and its address."""
    upstream = Upstream()
    listening = reactor.listenTCP(0, Site(upstream), interface="127.0.0.1")
    test.addCleanup(listening.stopListening)
    return upstream, f"http://127.0.0.1:{listening.getHost().port}"


class ThroughTheProxyTests(TestCase):
    """A REST request through the proxy, authenticated by TokenReview."""

    timeout = 60

    async def _through(self) -> None:
        import treq

        from tests.support.proxy import capture_logs, serve_site

        logs = capture_logs(self)
        upstream, address = listen_upstream(self)
        fake, server = start_fake_kube(self, reactor)
        password = secrets.token_hex(12)
        fake.apply(namespace("team"), oci_class(), secret(password=password),
                   connector(address=address + "/api"))
        client_token = builder_token(fake)
        mode = ClusterMode(reactor, load_kubeconfig(server.write_kubeconfig(
            self.mktemp() + ".kubeconfig")), Store())
        mode.startService()
        self.addCleanup(mode.stopService)
        await eventually(lambda: mode.store.ready, what="synced")
        url = serve_site(self, mode.store, mode.verifier) + "/namespaces/team/connectors/harbor/v1/x?q=1"
        pool = HTTPConnectionPool(reactor, persistent=False)

        async def get(token: str | None) -> tuple[int, bytes]:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            response = await treq.get(url, headers=headers, pool=pool)
            return response.code, await response.content()

        code, body = await get(client_token)
        self.assertEqual(code, 200, body)
        sent = json.loads(body)
        expected = "Basic " + base64.b64encode(f"robot:{password}".encode()).decode()
        self.assertEqual(upstream.seen[-1]["authorization"], expected)
        # The upstream echoed the credentials: the client gets them masked.
        self.assertNotIn(expected.split()[1], sent["authorization"])
        self.assertEqual(len(sent["authorization"]), len(expected))
        self.assertEqual(sent["path"], "/api/v1/x?q=1")
        for _ in range(20):
            code, _ = await get(client_token)
            self.assertEqual(code, 200)
        self.assertEqual(fake.count("create", "tokenreviews"), 1)
        self.assertEqual(fake.count("create", "subjectaccessreviews"), 1)
        self.assertEqual((await get(None))[0], 401)
        self.assertEqual((await get(secrets.token_hex(16)))[0], 401)
        other = secrets.token_hex(16)
        fake.add_token(other, "system:serviceaccount:elsewhere:app")
        self.assertEqual((await get(other))[0], 403)
        fake.unavailable = True
        self.assertEqual((await get(secrets.token_hex(16)))[0], 503)
        # An outage is one warning, not a traceback per request.
        self.assertEqual(self.flushLoggedErrors(ReviewUnavailable), [])
        self.assertIn("reviews stale", logs.text())
        self.assertTrue(all(s["authorization"] == expected for s in upstream.seen),
                        "the client token never reaches the upstream")
        text = logs.text()
        for canary in (password, client_token, other):
            self.assertNotIn(canary, text)

    def test_rest_through_proxy(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._through())


class DaemonTests(TestCase):
    """C{twistd -n connectors-proxy --kubeconfig ... --leader-elect} as an operator runs it."""

    timeout = 120

    async def _daemon(self) -> None:
        import treq

        from tests.support.proxy import start_proxy_process, until_ready

        upstream, address = listen_upstream(self)
        fake, server = start_fake_kube(self, reactor)
        fake.apply(namespace("team"), namespace("connectors-system"), oci_class(), secret(),
                   connector(address=address))
        ClusterModeTests.apply_rbac(fake)
        proxy_token = secrets.token_hex(16)
        fake.add_token(proxy_token, PROXY_SA, groups=["system:serviceaccounts"])
        client_token = builder_token(fake)
        kubeconfig = server.write_kubeconfig(self.mktemp() + ".kubeconfig", token=proxy_token,
                                             namespace="connectors-system")
        proxy = await start_proxy_process(self, ["--kubeconfig", kubeconfig, "--leader-elect"])
        pool = HTTPConnectionPool(reactor, persistent=False)
        await until_ready(self, proxy.admin_port, proxy.log, pool)
        await eventually(lambda: conditions(fake.object("connectors", "team", "harbor")).get("Ready")
                         == ("True", "Ready"), timeout=30, what="status written by the daemon")
        self.assertIsNotNone(fake.object("services", "team", "c-harbor"))
        lease = fake.object("leases", "connectors-system", "connectors-proxy")
        assert lease is not None
        self.assertTrue(lease["spec"]["holderIdentity"])
        response = await treq.get(f"{proxy.url}/namespaces/team/connectors/harbor/x",
                                  headers={"Authorization": f"Bearer {client_token}"}, pool=pool)
        self.assertEqual(response.code, 200, await response.content())
        self.assertTrue(upstream.seen[-1]["authorization"].startswith("Basic "))
        self.assertNotIn(client_token, proxy.log())
        self.assertNotIn(proxy_token, proxy.log())

    def test_daemon_in_cluster_mode(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._daemon())
