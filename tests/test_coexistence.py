"""
Running beside the upstream Connectors controller, on upstream's objects:

 - the status address as upstream writes it: host form, path form for
   classes annotated C{connectors.cpaas.io/proxy-resolver: path},
   C{spec.proxy.uri} honoured, nothing for classes without C{spec.proxy};
 - conditions the upstream controller-manager writes (C{LivenessReady},
   C{AuthReady}, C{CACertReady}) kept and counted in C{Ready};
 - C{--reconcile none}: the daemon serves and writes nothing at all, in
   process and as C{twistd} runs it with the upstream Deployment's flags.

Pure decisions first, then cluster mode against the fake API server with
the twelve upstream example classes of C{k8s/classes/} as fixtures.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import yaml
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool

from connectors_proxy.kube.cluster import ClusterMode
from connectors_proxy.kube.reconcile import World, class_proxy_url, decide, desired_service, format_time, proxy_url
from connectors_proxy.model.objects import InvalidObject, parse_connector, parse_connector_class
from connectors_proxy.testing.fakekube import start_fake_kube

from . import test_kube_e2e as e2e
from .support.procs import free_port, start_server
from .support.proxy import until_ready
from .support.waiting import eventually, sleep
from .test_kube_e2e import PROXY_SA, namespace

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ROOT / "k8s" / "classes"
UPSTREAM_CLASSES = ("git", "github", "gitlab", "oci", "harbor", "maven", "npm", "pypi", "k8s", "sonarqube",
                    "nexus", "jfrog")
T0 = format_time(1_700_000_000)


def upstream_class(name: str) -> dict[str, Any]:
    """One of the upstream example classes, as shipped in k8s/classes/."""
    [doc] = [d for d in yaml.safe_load_all((CLASSES / f"{name}.yaml").read_text()) if d]
    return doc


def klass(name: str = "rest", proxy: dict[str, Any] | None = None, resolver: str | None = None,
          auth: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"auth": {"types": [auth or {"name": "basicAuth", "secretType": "kubernetes.io/basic-auth",
                                                        "optional": True}]}}
    if proxy is not None:
        spec["proxy"] = proxy
    meta: dict[str, Any] = {"name": name}
    if resolver is not None:
        meta["annotations"] = {"connectors.cpaas.io/proxy-resolver": resolver}
    return {"apiVersion": "connectors.alauda.io/v1alpha1", "kind": "ConnectorClass", "metadata": meta, "spec": spec}


REF = {"ref": {"kind": "Service", "name": "connectors-proxy-service", "namespace": "connectors-system"}}


def connector(name: str = "c1", ns: str = "team", cls: str = "rest", address: str = "https://tool.example.com",
              secret: str | None = None, auth: str = "basicAuth", status: dict[str, Any] | None = None
              ) -> dict[str, Any]:
    spec: dict[str, Any] = {"connectorClassName": cls, "address": address}
    if secret is not None:
        spec["auth"] = {"name": auth, "secretRef": {"name": secret}}
    obj: dict[str, Any] = {"apiVersion": "connectors.alauda.io/v1alpha1", "kind": "Connector",
                           "metadata": {"name": name, "namespace": ns, "uid": "uid-" + name, "generation": 1},
                           "spec": spec}
    if status is not None:
        obj["status"] = status
    return obj


def secret_doc(name: str, ns: str = "team", type: str = "kubernetes.io/basic-auth", **data: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "type": type, "metadata": {"name": name, "namespace": ns},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


def parse_failure(raw: dict[str, Any]) -> InvalidObject:
    """What the cluster-mode parser makes of C{raw}, which must not parse."""
    try:
        parse_connector(raw)
    except InvalidObject as e:
        return e
    raise AssertionError("parsed")


def conditions(obj: dict[str, Any] | None) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c.get("reason", ""))
            for c in ((obj or {}).get("status") or {}).get("conditions", [])}


def foreign(kind: str, status: str, reason: str, severity: str | None = None) -> dict[str, Any]:
    cond = {"type": kind, "status": status, "reason": reason, "message": f"{kind} by the controller-manager",
            "lastTransitionTime": "2024-05-01T00:00:00Z"}
    if severity:
        cond["severity"] = severity
    return cond


class StatusAddressTests(SynchronousTestCase):
    """C{status.proxy.httpAddress.url} as upstream writes it (checklist items 14 and 15)."""

    def decide(self, cls_doc: dict[str, Any], raw: dict[str, Any] | None = None,
               domain: str = "cluster.local") -> Any:
        cls = parse_connector_class(cls_doc)
        raw = raw or connector(cls=cls.name)
        world = World(classes={cls.name: cls}, cluster_domain=domain)
        return decide(raw, parse_connector(raw), world, None, T0)

    def test_host_form_by_default(self) -> None:
        for resolver in (None, "host", "bogus"):
            decision = self.decide(klass(proxy=REF, resolver=resolver))
            self.assertEqual(decision.status["proxy"]["httpAddress"]["url"], "http://c-c1.team.svc.cluster.local")

    def test_path_form(self) -> None:
        for resolver in ("path", "Path"):
            decision = self.decide(klass(proxy=REF, resolver=resolver), domain="corp.example")
            self.assertEqual(decision.status["proxy"]["httpAddress"]["url"],
                             "http://c-c1.team.svc.corp.example/namespaces/team/connectors/c1")

    def test_upstream_classes(self) -> None:
        """oci and harbor in path form, the ten others in host form."""
        for name in UPSTREAM_CLASSES:
            decision = self.decide(upstream_class(name))
            url = decision.status["proxy"]["httpAddress"]["url"]
            if name in ("oci", "harbor"):
                self.assertEqual(url, "http://c-c1.team.svc.cluster.local/namespaces/team/connectors/c1", name)
            else:
                self.assertEqual(url, "http://c-c1.team.svc.cluster.local", name)
            self.assertEqual(decision.service.body["spec"]["externalName"],
                             "connectors-proxy-service.connectors-system.svc.cluster.local", name)

    def test_no_spec_proxy(self) -> None:
        """ProxyServiceReady True/NonProxy, no status.proxy, no Service; Ready stays True."""
        live = {"proxy": {"httpAddress": {"url": "http://c-c1.team.svc.cluster.local"}}}
        decision = self.decide(klass(proxy=None), connector(status=live))
        self.assertIsNone(decision.service)
        self.assertNotIn("proxy", decision.status)
        conds = {c["type"]: (c["status"], c["reason"]) for c in decision.status["conditions"]}
        self.assertEqual(conds["ProxyServiceReady"], ("True", "NonProxy"))
        self.assertEqual(conds["Ready"][0], "True")

    def test_relative_uri(self) -> None:
        """A path relative to the ref's address: the Connector's address carries it too."""
        cls = parse_connector_class(klass(proxy=dict(REF, uri="/proxy/")))
        self.assertEqual(class_proxy_url(cls, "cluster.local"),
                         "http://connectors-proxy-service.connectors-system.svc.cluster.local/proxy/")
        self.assertEqual(proxy_url(parse_connector(connector()), "cluster.local", cls),
                         "http://c-c1.team.svc.cluster.local/proxy")

    def test_absolute_uri_alone(self) -> None:
        """No ref: the Service aliases the URI's host; scheme and port come from the URI."""
        doc = klass(proxy={"uri": "https://proxy.example.com:8443"}, resolver="path")
        decision = self.decide(doc)
        self.assertEqual(decision.service.body["spec"]["externalName"], "proxy.example.com")
        self.assertEqual(decision.status["proxy"]["httpAddress"]["url"],
                         "https://c-c1.team.svc.cluster.local:8443/namespaces/team/connectors/c1")

    def test_absolute_uri_beside_a_ref(self) -> None:
        """The Service follows the ref (an object the cluster knows); the address takes the URI's port."""
        cls = parse_connector_class(klass(proxy=dict(REF, uri="http://other.example:8080")))
        c = parse_connector(connector())
        self.assertEqual(desired_service(c, cls, "cluster.local", False)["spec"]["externalName"],
                         "connectors-proxy-service.connectors-system.svc.cluster.local")
        self.assertEqual(proxy_url(c, "cluster.local", cls), "http://c-c1.team.svc.cluster.local:8080")

    def test_connector_without_a_class(self) -> None:
        """Upstream's schema allows it; the status says so as upstream's controller does."""
        raw = connector()
        del raw["spec"]["connectorClassName"]
        decision = decide(raw, parse_failure(raw), World(), None, T0)
        conds = {c["type"]: (c["status"], c["reason"]) for c in decision.status["conditions"]}
        self.assertEqual(conds, {"ConnectorClassReady": ("False", "ConnectorClassNotFound"),
                                 "Ready": ("False", "ConnectorClassNotFound")})
        self.assertIsNone(decision.service)

    def test_other_address_fields_are_kept(self) -> None:
        """Fields of httpAddress another writer set (CACerts, audience) stay; only url is ours."""
        live = {"proxy": {"httpAddress": {"url": "old", "CACerts": "PEM", "audience": "aud"}}}
        decision = self.decide(klass(proxy=REF, resolver="path"), connector(status=live))
        self.assertEqual(decision.status["proxy"]["httpAddress"],
                         {"url": "http://c-c1.team.svc.cluster.local/namespaces/team/connectors/c1",
                          "CACerts": "PEM", "audience": "aud"})


class ForeignConditionTests(SynchronousTestCase):
    """Conditions of the upstream controller-manager: kept, and counted in Ready."""

    def status_for(self, *conds: dict[str, Any], annotations: dict[str, str] | None = None) -> dict[str, Any]:
        cls = parse_connector_class(klass(proxy=REF))
        live: dict[str, Any] = {"conditions": list(conds)}
        if annotations:
            live["annotations"] = annotations
        raw = connector(status=live)
        decision = decide(raw, parse_connector(raw), World(classes={"rest": cls}), None, T0)
        status: dict[str, Any] = decision.status if decision.status is not None else live
        return status

    def test_failing_liveness_makes_ready_false(self) -> None:
        status = self.status_for(foreign("LivenessReady", "False", "ConnectionFailed"),
                                 foreign("AuthReady", "True", "NonAuthProbe"))
        conds = {c["type"]: c for c in status["conditions"]}
        self.assertEqual((conds["Ready"]["status"], conds["Ready"]["reason"]), ("False", "ConnectionFailed"))
        self.assertEqual(conds["Ready"]["message"], "LivenessReady by the controller-manager")
        # Kept exactly as written, time included.
        self.assertEqual(conds["LivenessReady"], foreign("LivenessReady", "False", "ConnectionFailed"))
        self.assertEqual(conds["AuthReady"], foreign("AuthReady", "True", "NonAuthProbe"))

    def test_failing_auth_and_unknown(self) -> None:
        status = self.status_for(foreign("AuthReady", "False", "AuthenticationFailed"))
        ready = next(c for c in status["conditions"] if c["type"] == "Ready")
        self.assertEqual((ready["status"], ready["reason"]), ("False", "AuthenticationFailed"))
        status = self.status_for(foreign("LivenessReady", "Unknown", "Checking"))
        ready = next(c for c in status["conditions"] if c["type"] == "Ready")
        self.assertEqual((ready["status"], ready["reason"]), ("Unknown", "Checking"))

    def test_ca_cert_counts_unless_info(self) -> None:
        """Upstream writes CACertReady with severity Info, outside Ready; written as an error, it counts."""
        info = self.status_for(foreign("CACertReady", "False", "InvalidPEM", severity="Info"))
        self.assertEqual(conditions({"status": info})["Ready"][0], "True")
        self.assertEqual(conditions({"status": info})["CACertReady"], ("False", "InvalidPEM"))
        error = self.status_for(foreign("CACertReady", "False", "SecretNotFound"))
        self.assertEqual(conditions({"status": error})["Ready"], ("False", "SecretNotFound"))

    def test_all_true_is_ready(self) -> None:
        status = self.status_for(foreign("LivenessReady", "True", "NonLivenessProbe"),
                                 foreign("AuthReady", "True", "NonAuthProbe"),
                                 annotations={"connectors.cpaas.io/checked": "yes"})
        self.assertEqual(conditions({"status": status})["Ready"], ("True", "Ready"))
        self.assertEqual(status["annotations"], {"connectors.cpaas.io/checked": "yes"})

    def test_unknown_foreign_types_are_kept_not_counted(self) -> None:
        status = self.status_for(foreign("SomethingElse", "False", "Whatever"))
        self.assertEqual(conditions({"status": status})["SomethingElse"], ("False", "Whatever"))
        self.assertEqual(conditions({"status": status})["Ready"][0], "True")

    def test_a_settled_status_needs_no_write(self) -> None:
        """With the foreign conditions in, a second pass writes nothing (no fight with their writer)."""
        cls = parse_connector_class(klass(proxy=REF))
        world = World(classes={"rest": cls})
        raw = connector(status={"conditions": [foreign("LivenessReady", "False", "ConnectionFailed")]})
        first = decide(raw, parse_connector(raw), world, None, T0)
        settled = dict(copy.deepcopy(raw), status=first.status)
        service = first.service.body if first.service else None
        self.assertIsNone(decide(settled, parse_connector(settled), world, service, format_time(1_800_000_000)).status)


class ClusterCoexistenceTests(TestCase):
    """Cluster mode against the fake API server, with the upstream example classes."""

    timeout = 60

    def setUp(self) -> None:
        self.fake, self.server = start_fake_kube(self, reactor, bookmark_interval=0.5)
        self.fake.apply(namespace("team"), namespace("connectors-system"))
        e2e.ClusterModeTests.apply_rbac(self.fake)
        self.fake.apply(*[upstream_class(name) for name in UPSTREAM_CLASSES])
        self.proxy_token = secrets.token_hex(16)
        self.fake.add_token(self.proxy_token, PROXY_SA, groups=["system:serviceaccounts"])

    def start(self, **kw: Any) -> ClusterMode:
        return e2e.start_cluster_mode(self, self.server, self.proxy_token, **kw)

    def seed(self) -> None:
        self.fake.apply(
            secret_doc("oci-cred", type="cpaas.io/distribution-registry-token", username="u", password="p"),
            connector("registry", cls="oci", secret="oci-cred", auth="tokenAuth"),
            connector("repo", cls="git", address="https://git.example.com",
                      status={"conditions": [foreign("LivenessReady", "False", "ConnectionFailed")]}),
            connector("pkgs", cls="pypi", address="https://pypi.example.com",
                      status={"conditions": [foreign("AuthReady", "True", "NonAuthProbe"),
                                             foreign("CACertReady", "True", "NoCACert", severity="Info")],
                              "annotations": {"connectors.cpaas.io/note": "x"}}),
        )

    async def _writes(self) -> None:
        self.seed()
        self.start()

        def url(name: str) -> str | None:
            obj = self.fake.object("connectors", "team", name) or {}
            return (((obj.get("status") or {}).get("proxy") or {}).get("httpAddress") or {}).get("url")

        await eventually(lambda: url("registry") and url("repo") and url("pkgs"), what="status addresses")
        self.assertEqual(url("registry"), "http://c-registry.team.svc.cluster.local/namespaces/team/connectors/registry")
        self.assertEqual(url("repo"), "http://c-repo.team.svc.cluster.local")
        self.assertEqual(conditions(self.fake.object("connectors", "team", "registry"))["Ready"], ("True", "Ready"))
        repo = conditions(self.fake.object("connectors", "team", "repo"))
        self.assertEqual((repo["Ready"], repo["LivenessReady"]),
                         (("False", "ConnectionFailed"), ("False", "ConnectionFailed")))
        pkgs = self.fake.object("connectors", "team", "pkgs")
        self.assertEqual(conditions(pkgs)["Ready"], ("True", "Ready"))
        assert pkgs is not None
        self.assertEqual(pkgs["status"]["annotations"], {"connectors.cpaas.io/note": "x"})
        # The controller-manager's probe recovers: Ready follows without a restart.
        repo_obj = self.fake.object("connectors", "team", "repo")
        assert repo_obj is not None
        repo_obj["status"]["conditions"] = [c if c["type"] != "LivenessReady" else
                                            foreign("LivenessReady", "True", "NonLivenessProbe")
                                            for c in repo_obj["status"]["conditions"]]
        self.fake.apply(repo_obj)
        await eventually(lambda: conditions(self.fake.object("connectors", "team", "repo"))["Ready"]
                         == ("True", "Ready"), what="Ready after LivenessReady recovered")

    def test_status_beside_the_controller_manager(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._writes())

    async def _none(self) -> None:
        self.seed()
        before = {name: copy.deepcopy(self.fake.object("connectors", "team", name))
                  for name in ("registry", "repo", "pkgs")}
        self.fake.reset_counts()
        mode = self.start(write=False, leader_elect=True, resync_period=0.2)
        await eventually(lambda: mode.store.ready, what="store ready")
        snapshot = mode.store.snapshot
        self.assertEqual(snapshot.connector("team", "registry").class_name, "oci")  # type: ignore[union-attr]
        self.assertEqual(snapshot.classes["oci"].protocol, "oci")
        # Bookmarks, resync periods and a Connector edited by someone else go by.
        edited = copy.deepcopy(before["repo"])
        assert edited is not None
        edited["spec"]["address"] = "https://git2.example.com"
        self.fake.apply(edited)
        await eventually(lambda: (mode.store.snapshot.connector("team", "repo") or edited).address  # type: ignore[attr-defined]
                         == "https://git2.example.com", what="the edit seen")
        await sleep(1.5)
        self.assertEqual(self.fake.writes(), 0)
        self.assertEqual(self.fake.objects("services", "team"), [])
        self.assertIsNone(self.fake.object("leases", "connectors-system", "connectors-proxy"))
        for name in ("registry", "pkgs"):
            self.assertEqual((self.fake.object("connectors", "team", name) or {}).get("status"),
                             (before[name] or {}).get("status"))

    def test_reconcile_none_writes_nothing(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._none())


class DaemonCoexistenceTests(TestCase):
    """
    C{twistd -n connectors-proxy} with the upstream Deployment's flags
    (C{--metrics-bind-address}, C{-kube-api-qps}, C{-kube-api-burst}) and
    C{--reconcile none}: it serves through upstream's classes and writes nothing.
    """

    timeout = 120

    async def _daemon(self) -> None:
        import treq

        upstream, address = e2e.listen_upstream(self)
        fake, server = start_fake_kube(self, reactor)
        fake.apply(namespace("team"), namespace("connectors-system"),
                   *[upstream_class(name) for name in UPSTREAM_CLASSES])
        e2e.ClusterModeTests.apply_rbac(fake)
        password = "canary-" + secrets.token_hex(12)
        upstream_status = {"conditions": [foreign("Ready", "True", "Ready")],
                           "proxy": {"httpAddress": {"url": "http://c-sonar.team.svc.cluster.local"}}}
        fake.apply(secret_doc("sonar-token", type="connectors.cpaas.io/bearer-token", token=password),
                   connector("sonar", cls="sonarqube", secret="sonar-token", auth="tokenAuth",
                             address=address, status=upstream_status))
        proxy_token = secrets.token_hex(16)
        fake.add_token(proxy_token, PROXY_SA, groups=["system:serviceaccounts"])
        client_token = e2e.builder_token(fake, "sonar")
        kubeconfig = server.write_kubeconfig(self.mktemp() + ".kubeconfig", token=proxy_token,
                                             namespace="connectors-system")
        port, admin = free_port(), free_port()
        argv = [
            sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.exit(run())",
            "-n", "--pidfile=", "connectors-proxy", "--kubeconfig", kubeconfig,
            "--listen", f"tcp:{port}:interface=127.0.0.1",
            f"--metrics-bind-address=127.0.0.1:{admin}", "-kube-api-qps=60", "-kube-api-burst=80",
            "--reconcile=none",
        ]
        fake.reset_counts()
        proc = await start_server(self, argv, port=port, name="connectors-proxy",
                                  env={"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")})
        pool = HTTPConnectionPool(reactor, persistent=False)
        await until_ready(self, admin, proc.log, pool)
        response = await treq.get(f"http://127.0.0.1:{port}/namespaces/team/connectors/sonar/api/system/status",
                                  headers={"Authorization": f"Bearer {client_token}"}, pool=pool)
        body = await response.content()
        self.assertEqual(response.code, 200, body)
        self.assertEqual(upstream.seen[-1]["authorization"], f"Bearer {password}")
        self.assertEqual(json.loads(body)["path"], "/api/system/status")
        metrics = await (await treq.get(f"http://127.0.0.1:{admin}/metrics", pool=pool)).text()
        self.assertIn("# TYPE", metrics)
        await sleep(1.0)
        self.assertEqual(fake.writes(), 0, "--reconcile none wrote to the API server")
        self.assertEqual(fake.objects("services", "team"), [])
        self.assertIsNone(fake.object("leases", "connectors-system", "connectors-proxy"))
        self.assertEqual(fake.object("connectors", "team", "sonar")["status"], upstream_status)  # type: ignore[index]
        for text in (proc.log(), metrics):
            self.assertNotIn(password, text)
            self.assertNotIn(client_token, text)

    def test_upstream_flags_and_reconcile_none(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._daemon())
