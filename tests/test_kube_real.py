"""
Cluster mode against a real kube-apiserver (issue 16): etcd, kube-apiserver
and kube-controller-manager built from their Go modules
(L{tests.support.kubeapi}), started once for the test run, with C{k8s/}
applied.  The proxy runs as the ServiceAccount of C{k8s/rbac.yaml} with a
TokenRequest token, never as the admin, so each test also proves the
shipped RBAC sufficient for what it does.

What the verified fake (L{connectors_proxy.testing.fakekube}) is trusted
for in C{tests.test_kube_e2e} is checked here against the real thing:
client tokens as the Connectors CSI driver makes them, real TokenReview and
SubjectAccessReview (with the C{connectors/proxy} subresource), garbage
collection of C{c-NAME}, status subresource isolation, secret rotation,
a relist after C{410 Gone}, an API server outage, and leader election
between two daemons, audited by the API server itself.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import secrets
import signal
import time
from collections.abc import Callable
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.protocols import portforward
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from connectors_proxy.kube.cluster import ClusterMode
from connectors_proxy.kube.config import load_kubeconfig
from connectors_proxy.kube.identity import KubeIdentityVerifier
from connectors_proxy.model.objects import ObjectRef
from connectors_proxy.model.state import Store

from .support import kubeapi
from .support.kubeapi import API_AUDIENCE, PROXY_NAMESPACE, PROXY_SA, KubeAPI
from .support.waiting import eventually, sleep
from .test_fakekube_contract import KubeHTTP, _TrustPolicy
from .test_kube_e2e import Upstream, conditions, connector, listen_upstream, oci_class, secret

CR = "/apis/connectors.alauda.io/v1alpha1"
RBAC = "/apis/rbac.authorization.k8s.io/v1"
SKIP = kubeapi.skip_reason()


def jwt_claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))  # type: ignore[no-any-return]


class _ForwardClient(portforward.ProxyClient):
    def connectionMade(self) -> None:
        open_ = self.peer.factory.open
        open_.add(self)
        if self.peer not in open_ or self.peer.transport.disconnecting:  # cut while connecting
            self.transport.abortConnection()
            return
        super().connectionMade()

    def connectionLost(self, reason: Any = None) -> None:
        self.peer.factory.open.discard(self)
        super().connectionLost(reason)


class _ForwardClientFactory(portforward.ProxyClientFactory):
    protocol = _ForwardClient

    def buildProtocol(self, addr: Any) -> Any:
        self.server.factory.connecting -= 1
        return super().buildProtocol(addr)

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        self.server.factory.connecting -= 1
        super().clientConnectionFailed(connector, reason)


class _ForwardServer(portforward.ProxyServer):
    """Both sides of every forwarded connection are tracked, so a cut is complete."""

    clientProtocolFactory = _ForwardClientFactory

    def connectionMade(self) -> None:
        self.factory.open.add(self)
        self.factory.connecting += 1
        super().connectionMade()

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.open.discard(self)
        super().connectionLost(reason)


class Forwarder:
    """
    A TCP hop between the proxy and the API server that a test can cut and
    refuse, to make the proxy miss events (the API server itself runs on).
    """

    def __init__(self, target_port: int) -> None:
        self.factory = portforward.ProxyFactory("127.0.0.1", target_port)
        self.factory.protocol = _ForwardServer
        self.factory.open = set()
        self.factory.connecting = 0
        self.listening: Any = None
        self.port = 0

    def accept(self) -> None:
        self.listening = reactor.listenTCP(self.port, self.factory, interface="127.0.0.1")
        self.port = self.listening.getHost().port

    async def refuse(self) -> None:
        if self.listening is not None:
            listening, self.listening = self.listening, None
            await listening.stopListening()

    async def cut(self) -> None:
        while self.factory.open or self.factory.connecting:
            for side in list(self.factory.open):
                side.transport.abortConnection()
            await sleep(0.05)
        await sleep(0.05)

    async def close(self) -> None:
        await self.refuse()
        await self.cut()


class RealClusterCase(TestCase):
    """A namespace of its own in the shared real cluster, and an admin client."""

    timeout = 300  # the first test of a run starts the control plane
    if SKIP:
        skip = SKIP

    def setUp(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._setup())

    async def _setup(self) -> None:
        self.cluster: KubeAPI = await kubeapi.shared_cluster()
        # Registered first, so it runs last: after everything else let go.
        self.addCleanup(lambda: Deferred.fromCoroutine(kubeapi.settle(self.cluster.port)))
        self.kube = KubeHTTP(self.cluster.url, self.cluster.admin_token,
                             _TrustPolicy(self.cluster.ca_pem, None, True))
        self.ns = "rt-" + secrets.token_hex(4)
        await self.admin("POST", "/api/v1/namespaces",
                         {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self.ns}})
        self.addCleanup(lambda: Deferred.fromCoroutine(
            self.kube.call("DELETE", f"/api/v1/namespaces/{self.ns}")))
        # The class every test's Connectors use (cluster-scoped: made once).
        reply = await self.kube.call("POST", f"{CR}/connectorclasses", oci_class())
        self.assertIn(reply.code, (201, 409), reply.body)

    async def admin(self, method: str, path: str, body: Any = None, ok: tuple[int, ...] = (200, 201),
                    **kw: Any) -> Any:
        reply = await self.kube.call(method, path, body, **kw)
        self.assertIn(reply.code, ok, (method, path, reply.body))
        return reply.body

    async def get(self, path: str) -> Any:
        reply = await self.kube.call("GET", path)
        return reply.body if reply.code == 200 else None

    def connector_path(self, name: str = "harbor", sub: str = "") -> str:
        return f"{CR}/namespaces/{self.ns}/connectors/{name}" + (f"/{sub}" if sub else "")

    def service_path(self, name: str = "harbor") -> str:
        return f"/api/v1/namespaces/{self.ns}/services/c-{name}"

    async def seed(self, name: str = "harbor", address: str = "https://harbor.example.com",
                   password: str = "p1") -> None:
        await self.admin("POST", f"/api/v1/namespaces/{self.ns}/secrets",
                         secret(name + "-secret", ns=self.ns, password=password))
        await self.admin("POST", f"{CR}/namespaces/{self.ns}/connectors", connector(name, ns=self.ns, address=address))

    async def wait_for(self, check: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
        """Like L{eventually}, for checks that call the API server."""
        deadline = time.monotonic() + timeout
        while True:
            value = await check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await sleep(0.1)

    async def ready(self, name: str = "harbor") -> bool:
        obj = await self.get(self.connector_path(name))
        return conditions(obj).get("Ready") == ("True", "Ready") and \
            await self.get(self.service_path(name)) is not None

    def start_mode(self, kubeconfig: str | None = None, **kw: Any) -> ClusterMode:
        """Cluster mode in this process, as the proxy's ServiceAccount."""
        kw.setdefault("stale_after", 5.0)
        mode = ClusterMode(reactor, load_kubeconfig(kubeconfig or self.cluster.proxy_kubeconfig), Store(), **kw)
        mode.startService()
        self.addCleanup(mode.stopService)
        return mode

    async def service_account(self, name: str, verbs_on: dict[str, list[str]] | None = None) -> None:
        """A ServiceAccount in this namespace, bound to a Role of C{resource: names} C{get} rules."""
        await self.admin("POST", f"/api/v1/namespaces/{self.ns}/serviceaccounts",
                         {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}})
        if not verbs_on:
            return
        rules = [{"apiGroups": ["connectors.alauda.io"], "resources": [resource], "resourceNames": names,
                  "verbs": ["get"]} for resource, names in verbs_on.items()]
        await self.admin("POST", f"{RBAC}/namespaces/{self.ns}/roles", {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": name},
            "rules": rules})
        await self.admin("POST", f"{RBAC}/namespaces/{self.ns}/rolebindings", {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": self.ns}]})

    async def csi_token(self, sa: str, connector_name: str = "harbor", seconds: int = 1800) -> str:
        """A client token as the Connectors CSI driver requests it (TokenRequest API)."""
        reply = await self.kube.call("POST", f"/api/v1/namespaces/{self.ns}/serviceaccounts/{sa}/token", {
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"audiences": [API_AUDIENCE, f"http://c-{connector_name}.{self.ns}.svc.cluster.local"],
                     "expirationSeconds": seconds}})
        self.assertEqual(reply.code, 201, reply.body)
        return reply.body["status"]["token"]  # type: ignore[no-any-return]

    def own_kubeconfig(self) -> tuple[str, str]:
        """A kubeconfig with a token of the proxy's own (its JTI names it in the audit log): (path, JTI)."""
        token = self.cluster.token_request(PROXY_NAMESPACE, PROXY_SA, seconds=3600)
        path = self.cluster.write_kubeconfig(self.mktemp() + ".kubeconfig", token, PROXY_NAMESPACE)
        return path, jwt_claims(token)["jti"]

    def audited_writes(self, jtis: dict[str, str], namespaces: tuple[str, ...]) -> list[dict[str, Any]]:
        """
        Successful writes in C{namespaces} made with the tokens C{jtis}
        (C{who -> JTI}), from the API server's audit log: C{who}, C{verb},
        C{resource} (with C{/subresource}), C{name}, C{at} (epoch seconds).
        """
        writes = []
        for event in self.cluster.audit_events():
            ref = event.get("objectRef") or {}
            code = (event.get("responseStatus") or {}).get("code", 0)
            extra = (event.get("user") or {}).get("extra") or {}
            credential = " ".join(extra.get("authentication.kubernetes.io/credential-id", []))
            who = [n for n, jti in jtis.items() if jti in credential]
            if who and 200 <= code < 300 and ref.get("namespace") in namespaces:
                resource = ref.get("resource", "") + ("/" + ref["subresource"] if ref.get("subresource") else "")
                at = datetime.datetime.fromisoformat(event["stageTimestamp"].replace("Z", "+00:00")).timestamp()
                writes.append({"who": who[0], "verb": event["verb"], "resource": resource,
                               "name": ref.get("name", ""), "at": at})
        return writes

    def serve(self, mode: ClusterMode) -> str:
        """The proxy's site on a free port, for C{mode}; its URL."""
        from .support.proxy import serve_site

        return serve_site(self, mode.store, mode.verifier)

    def upstream(self) -> tuple[Upstream, str]:
        return listen_upstream(self)


class IdentityTests(RealClusterCase):
    """Client tokens and authorization, answered by the real API server."""

    async def _csi_tokens(self) -> None:
        upstream, address = self.upstream()
        password = secrets.token_hex(8)
        await self.seed(address=address + "/api", password=password)
        await self.service_account("builder", {"connectors": ["harbor"]})
        await self.service_account("stranger")
        mode = self.start_mode()
        await self.wait_for(self.ready, what="Service and Ready status written as the proxy's ServiceAccount")
        url = self.serve(mode) + f"/namespaces/{self.ns}/connectors/harbor/v1/x"
        token = await self.csi_token("builder")
        claims = jwt_claims(token)
        self.assertEqual(claims["aud"], [API_AUDIENCE, f"http://c-harbor.{self.ns}.svc.cluster.local"])
        self.assertEqual(claims["exp"] - claims["iat"], 1800)
        pool = HTTPConnectionPool(reactor, persistent=False)

        async def call(token: str | None) -> int:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            response = await treq.get(url, headers=headers, pool=pool)
            await response.content()
            return response.code  # type: ignore[no-any-return]

        self.assertEqual(await call(token), 200)
        expected = "Basic " + base64.b64encode(f"robot:{password}".encode()).decode()
        self.assertEqual(upstream.seen[-1], {"authorization": expected, "path": "/api/v1/x"})
        # The forward-proxy form's Basic carries the same token.
        response = await treq.get(url, auth=("anything", token), pool=pool)
        await response.content()
        self.assertEqual(response.code, 200)
        # Another workload: a valid token without RBAC is 403; junk and a
        # token for someone else's audience are 401.
        self.assertEqual(await call(await self.csi_token("stranger")), 403)
        self.assertEqual(await call("junk-" + secrets.token_hex(8)), 401)
        other = self.cluster.token_request(self.ns, "builder", audiences=["somewhere-else"], seconds=600)
        self.assertEqual(await call(other), 401)
        self.assertEqual(await call(None), 401)
        # An audience the daemon is told to ask for (--token-audience): the
        # CSI token names c-NAME's address, so it passes that review too.
        for audiences, accepted in (((f"http://c-harbor.{self.ns}.svc.cluster.local",), True),
                                    (("http://c-other.elsewhere.svc.cluster.local",), False)):
            verifier = KubeIdentityVerifier(mode.client, reactor, audiences=audiences)
            identity = await verifier.authenticate(token)
            self.assertEqual(identity is not None, accepted, audiences)
            if identity is not None:
                self.assertEqual(identity.username, f"system:serviceaccount:{self.ns}:builder")
                self.assertIn(f"system:serviceaccounts:{self.ns}", identity.groups)
        self.assertTrue(all(s["authorization"] == expected for s in upstream.seen))

    def test_csi_tokens_through_the_proxy(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._csi_tokens())

    async def _proxy_subresource(self) -> None:
        await self.seed()
        await self.service_account("reader", {"connectors": ["harbor"]})
        await self.service_account("user", {"connectors": ["harbor"], "connectors/proxy": ["harbor"]})
        await self.service_account("proxy-only", {"connectors/proxy": ["harbor"]})
        mode = self.start_mode(write=False)
        answers = {}
        for strict in (False, True):
            verifier = KubeIdentityVerifier(mode.client, reactor, proxy_subresource=strict)
            for sa in ("reader", "user", "proxy-only"):
                identity = await verifier.authenticate(
                    self.cluster.token_request(self.ns, sa, audiences=[API_AUDIENCE], seconds=600))
                assert identity is not None, sa
                answers[(strict, sa)] = (await verifier.authorize(identity, self.ns, "harbor"),
                                         await verifier.authorize(identity, self.ns, "other"))
        self.assertEqual(answers, {
            (False, "reader"): (True, False), (False, "user"): (True, False),
            (False, "proxy-only"): (False, False),
            (True, "reader"): (False, False), (True, "user"): (True, False),
            (True, "proxy-only"): (False, False)})

    def test_subject_access_review_with_proxy_subresource(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._proxy_subresource())


class WritesTests(RealClusterCase):
    """What cluster mode writes, and what the real control plane does with it."""

    async def _collected(self) -> None:
        await self.seed()
        self.start_mode()
        await self.wait_for(self.ready, what="Service and Ready status")
        service = await self.get(self.service_path())
        owner = service["metadata"]["ownerReferences"][0]
        connector_obj = await self.get(self.connector_path())
        self.assertEqual((owner["uid"], owner["controller"], owner["blockOwnerDeletion"]),
                         (connector_obj["metadata"]["uid"], True, True))
        await self.admin("DELETE", self.connector_path())

        async def collected() -> bool:
            return await self.get(self.service_path()) is None
        # kube-controller-manager's garbage collector removes it; the proxy
        # must not put it back for a Connector that is gone.
        await self.wait_for(collected, timeout=60, what="Service c-harbor garbage-collected")
        await sleep(2)
        self.assertIsNone(await self.get(self.service_path()))

    def test_service_collected_after_connector_deleted(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._collected())

    async def _cold_start(self) -> None:
        await self.seed()
        long_name = "x" * 62  # c-NAME would be 64 characters: no valid Service name
        await self.seed(long_name)
        await self.admin("POST", f"{CR}/namespaces/{self.ns}/connectors",
                         dict(connector("orphan", ns=self.ns), spec={"connectorClassName": "no-such-class",
                                                                     "address": "https://a.example.com"}))
        kubeconfig, jti = self.own_kubeconfig()
        self.start_mode(kubeconfig)
        await self.wait_for(self.ready, what="Service and Ready status")

        async def condition(name: str, type_: str, expected: tuple[str, str]) -> bool:
            return conditions(await self.get(self.connector_path(name))).get(type_) == expected
        await self.wait_for(lambda: condition(long_name, "ProxyServiceReady", ("False", "InvalidServiceName")),
                            what="InvalidServiceName")
        await self.wait_for(lambda: condition("orphan", "ConnectorClassReady", ("False", "ConnectorClassNotFound")),
                            what="ConnectorClassNotFound")
        service = await self.get(self.service_path())
        self.assertEqual((service["spec"]["type"], service["spec"]["externalName"]),
                         ("ExternalName", "connectors-proxy.connectors-system.svc.cluster.local"))
        self.assertEqual(service["metadata"]["labels"]["app.kubernetes.io/managed-by"], "connectors-proxy")
        status = (await self.get(self.connector_path()))["status"]
        self.assertEqual((status["proxy"]["httpAddress"]["url"], status["observedGeneration"]),
                         (f"http://c-harbor.{self.ns}.svc.cluster.local", 1))
        # Then nothing: bookmarks, our own writes coming back, time passing.
        await sleep(3)
        writes = self.audited_writes({"proxy": jti}, (self.ns,))
        await sleep(3)
        self.assertEqual(self.audited_writes({"proxy": jti}, (self.ns,)), writes, "writes after settling")
        self.assertEqual(sorted((w["verb"], w["resource"], w["name"]) for w in writes), sorted([
            ("create", "services", "c-harbor"), ("update", "connectors/status", "harbor"),
            ("update", "connectors/status", long_name), ("update", "connectors/status", "orphan")]))
        # A Service deleted or edited by hand is put back.
        await self.admin("DELETE", self.service_path())
        await self.wait_for(lambda: self.get(self.service_path()), what="the Service back")
        edited = await self.get(self.service_path())
        edited["spec"] = {"type": "ClusterIP", "ports": [{"name": "x", "port": 1234}]}
        await self.admin("PUT", self.service_path(), edited)

        async def undone() -> bool:
            spec = ((await self.get(self.service_path())) or {}).get("spec", {})
            return spec.get("type") == "ExternalName" and [p["port"] for p in spec.get("ports", [])] == [80]
        await self.wait_for(undone, what="the edit undone")

    def test_cold_start_conditions_zero_writes_and_put_back(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._cold_start())

    async def _status(self) -> None:
        await self.seed()
        self.start_mode()
        await self.wait_for(self.ready, what="Ready")
        # Another controller's condition, written through the status subresource.
        obj = await self.get(self.connector_path())
        obj["status"]["conditions"].append({"type": "LivenessReady", "status": "True", "reason": "Alive",
                                            "message": "", "lastTransitionTime": "2024-01-01T00:00:00Z"})
        await self.admin("PUT", self.connector_path(sub="status"), obj)
        # A spec change: generation 2, observed by the proxy; the other
        # controller's condition stays, the spec is not touched by status writes.
        await self.admin("PATCH", self.connector_path(), {"spec": {"address": "https://moved.example.com"}},
                         content_type="application/merge-patch+json")

        async def observed() -> Any:
            obj = await self.get(self.connector_path())
            return obj if obj["status"].get("observedGeneration") == 2 else None
        obj = await self.wait_for(observed, what="observedGeneration 2")
        self.assertEqual(obj["metadata"]["generation"], 2)
        self.assertEqual(obj["spec"]["address"], "https://moved.example.com")
        self.assertEqual(conditions(obj).get("LivenessReady"), ("True", "Alive"))
        # The proxy's ServiceAccount may write status, not the Connector itself.
        proxy = KubeHTTP(self.cluster.url, self.cluster.proxy_token, _TrustPolicy(self.cluster.ca_pem, None, True))
        reply = await proxy.call("PUT", self.connector_path(), obj)
        self.assertEqual(reply.code, 403, reply.body)

    def test_status_subresource_and_others_conditions(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._status())

    async def _rotation(self) -> None:
        await self.seed()
        mode = self.start_mode()
        await eventually(lambda: mode.store.ready, timeout=30, what="synced")
        ref = ObjectRef(self.ns, "harbor-secret")
        for round_ in range(3):
            password = f"rotated-{round_}"
            started = time.monotonic()
            await self.admin("PUT", f"/api/v1/namespaces/{self.ns}/secrets/harbor-secret",
                             secret("harbor-secret", ns=self.ns, password=password, extra="x" * 100_000))
            await eventually(lambda p=password.encode(): mode.store.snapshot.secrets[ref].data["password"] == p,
                             timeout=2.0, what="the rotated Secret within 2 s")
            self.assertLess(time.monotonic() - started, 2.0)

    def test_secret_rotation_within_two_seconds(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._rotation())


class WatchTests(RealClusterCase):
    """Reflectors over a connection the test cuts, against the real watch cache."""

    async def forwarded_mode(self) -> tuple[ClusterMode, Forwarder]:
        forwarder = Forwarder(self.cluster.port)
        forwarder.accept()
        self.addCleanup(lambda: Deferred.fromCoroutine(forwarder.close()))
        # The API server's certificate names 127.0.0.1, which the hop keeps.
        path = self.mktemp() + ".kubeconfig"
        kubeconfig = self.cluster.write_kubeconfig(path, self.cluster.proxy_token, PROXY_NAMESPACE)
        with open(kubeconfig) as f:
            text = f.read().replace(f":{self.cluster.port}", f":{forwarder.port}")
        with open(kubeconfig, "w") as f:
            f.write(text)
        mode = self.start_mode(kubeconfig)
        await eventually(lambda: mode.store.ready, timeout=30, what="synced")
        return mode, forwarder

    async def _resume(self) -> None:
        await self.seed()
        mode, forwarder = await self.forwarded_mode()
        ref = ObjectRef(self.ns, "harbor-secret")
        await forwarder.cut()
        await self.admin("PUT", f"/api/v1/namespaces/{self.ns}/secrets/harbor-secret",
                         secret("harbor-secret", ns=self.ns, password="while-cut"))
        await eventually(lambda: mode.store.snapshot.secrets[ref].data["password"] == b"while-cut",
                         timeout=15, what="the change made while the watch was cut")

    def test_watch_cut_resumes(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._resume())

    async def _gone(self) -> None:
        from .support.proxy import capture_logs

        logs = capture_logs(self)
        await self.seed()
        mode, forwarder = await self.forwarded_mode()
        ref = ObjectRef(self.ns, "harbor-secret")
        await forwarder.refuse()
        await forwarder.cut()
        await self.admin("PUT", f"/api/v1/namespaces/{self.ns}/secrets/harbor-secret",
                         secret("harbor-secret", ns=self.ns, password="after-compaction"))
        await self.admin("POST", f"/api/v1/namespaces/{self.ns}/secrets", secret("new-secret", ns=self.ns))
        # History gone: etcd compacted, and the API server's watch cache
        # (which outlives a compaction) started again from now.
        await deferToThread(self.cluster.compact)
        await deferToThread(self.cluster.restart_apiserver)
        forwarder.accept()
        await eventually(lambda: ObjectRef(self.ns, "new-secret") in mode.store.snapshot.secrets
                         and mode.store.snapshot.secrets[ref].data["password"] == b"after-compaction",
                         timeout=60, what="listed again after 410")
        self.assertIn("resourceVersion expired, listing again", logs.text())

    def test_gone_lists_again(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._gone())

    async def _outage(self) -> None:
        upstream, address = self.upstream()
        await self.seed(address=address)
        await self.service_account("builder", {"connectors": ["harbor"]})
        # Reviews cached longer than the outage: what is being checked is
        # that objects are served from the last state, not review caching.
        mode = self.start_mode(review_ttl=300.0, stale_after=5.0)
        await eventually(lambda: mode.store.ready, timeout=30, what="synced")
        url = self.serve(mode) + f"/namespaces/{self.ns}/connectors/harbor/x"
        token = await self.csi_token("builder")
        pool = HTTPConnectionPool(reactor, persistent=False)

        async def call() -> int:
            response = await treq.get(url, headers={"Authorization": f"Bearer {token}"}, pool=pool)
            await response.content()
            return response.code  # type: ignore[no-any-return]
        self.assertEqual(await call(), 200)
        await deferToThread(self.cluster.stop_apiserver)
        stopped = time.monotonic()
        codes = []
        while time.monotonic() - stopped < 30:
            codes.append(await call())
            await sleep(1)
        self.assertEqual(set(codes), {200}, "served from the last state while the API server is away")
        self.assertFalse(mode.store.ready, "stale after stale_after while away")
        await deferToThread(self.cluster.start_apiserver)
        await self.admin("PUT", f"/api/v1/namespaces/{self.ns}/secrets/harbor-secret",
                         secret("harbor-secret", ns=self.ns, password="after-outage"))
        ref = ObjectRef(self.ns, "harbor-secret")
        await eventually(lambda: mode.store.ready
                         and mode.store.snapshot.secrets[ref].data["password"] == b"after-outage",
                         timeout=60, what="watches resumed after the outage")
        self.assertEqual(await call(), 200)
        self.assertEqual(upstream.seen[-1]["authorization"],
                         "Basic " + base64.b64encode(b"robot:after-outage").decode())

    def test_apiserver_outage(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._outage())


class LeaderElectionTests(RealClusterCase):
    """Two daemons (C{twistd connectors-proxy --leader-elect}) on one Lease."""

    timeout = 400
    lease_duration = 15.0  # the daemon's defaults
    retry_period = 2.0

    async def _leaders(self) -> None:
        from .support.proxy import start_proxy_process, until_ready

        upstream, address = self.upstream()
        await self.seed(address=address)
        await self.service_account("builder", {"connectors": ["harbor"]})
        lease_path = f"/apis/coordination.k8s.io/v1/namespaces/{PROXY_NAMESPACE}/leases/connectors-proxy"
        # A fresh Lease: an earlier test's holder must not delay this one.
        await self.kube.call("DELETE", lease_path)
        credentials: dict[str, str] = {}
        daemons = {}
        for name in ("a", "b"):
            kubeconfig, credentials[name] = self.own_kubeconfig()
            daemons[name] = await start_proxy_process(
                self, ["--kubeconfig", kubeconfig, "--leader-elect"], env={"POD_NAME": "daemon-" + name})
            if name == "a":
                async def a_leads() -> bool:
                    lease = await self.get(lease_path)
                    return bool(lease and lease["spec"].get("holderIdentity", "").startswith("daemon-a_"))
                await self.wait_for(a_leads, timeout=60, what="daemon a holds the Lease")
        await self.wait_for(self.ready, timeout=60, what="Service and status written by the leader")
        token = await self.csi_token("builder")
        pool = HTTPConnectionPool(reactor, persistent=False)
        for daemon in daemons.values():  # both serve; only one writes
            await until_ready(self, daemon.admin_port, daemon.log, pool)
            response = await treq.get(f"{daemon.url}/namespaces/{self.ns}/connectors/harbor/x",
                                      headers={"Authorization": f"Bearer {token}"}, pool=pool)
            self.assertEqual(response.code, 200, await response.content())
        await sleep(2 * self.retry_period)
        os.killpg(daemons["a"].server.process.pid, signal.SIGKILL)
        killed_at = time.time()
        killed = time.monotonic()
        await self.admin("DELETE", self.service_path())

        async def put_back() -> bool:
            return await self.get(self.service_path()) is not None
        await self.wait_for(put_back, timeout=60, what="daemon b puts the Service back")
        took = time.monotonic() - killed
        self.assertLess(took, self.lease_duration + 2 * self.retry_period + 3,
                        "the other daemon writes within the lease duration")
        lease = await self.get(lease_path)
        self.assertTrue(lease["spec"]["holderIdentity"].startswith("daemon-b_"))
        # The API server's audit log: which token wrote what, and when.
        await sleep(1)
        writes = self.audited_writes(credentials, (self.ns, PROXY_NAMESPACE))
        self.assertTrue(writes, "the audit log names the daemons' tokens")
        for write in writes:
            if write["who"] == "a":
                self.assertLess(write["at"], killed_at, ("a wrote after its death", write))
            else:
                self.assertGreater(write["at"], killed_at, ("b wrote while a held the Lease", write))
        self.assertIn(("b", "services"), [(w["who"], w["resource"]) for w in writes])

    def test_leader_election_two_daemons(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._leaders())
