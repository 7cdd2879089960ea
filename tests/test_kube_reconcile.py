"""
The pure cluster-mode decisions: the proxy Service C{c-NAME} and the
Connector status, and that an unchanged Connector needs no write at all.
"""

from __future__ import annotations

import copy
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from connectors_proxy.kube.reconcile import (
    CONNECTOR_LABEL,
    MANAGED_BY_LABEL,
    Decision,
    World,
    decide,
    desired_service,
    dns1035_problem,
    format_time,
    service_matches,
)
from connectors_proxy.model.objects import (
    InvalidObject,
    ObjectRef,
    parse_connector,
    parse_connector_class,
    parse_secret,
)

T0 = format_time(1_700_000_000)
T1 = format_time(1_700_000_100)


def connector(name: str = "harbor", ns: str = "default", cls: str = "oci",
              secret: str | None = "harbor-secret", generation: int = 3,
              status: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"connectorClassName": cls, "address": "https://harbor.example.com"}
    if secret:
        spec["auth"] = {"name": "basicAuth", "secretRef": {"name": secret}}
    obj: dict[str, Any] = {
        "apiVersion": "connectors.alauda.io/v1alpha1", "kind": "Connector",
        "metadata": {"name": name, "namespace": ns, "uid": "uid-" + name,
                     "generation": generation, "resourceVersion": "10"},
        "spec": spec,
    }
    if status is not None:
        obj["status"] = status
    return obj


def connector_class(name: str = "oci", proxy: bool = True, optional: bool = False) -> Any:
    spec: dict[str, Any] = {"auth": {"types": [
        {"name": "basicAuth", "secretType": "kubernetes.io/basic-auth", "optional": optional}]}}
    if proxy:
        spec["proxy"] = {"ref": {"kind": "Service", "name": "connectors-proxy-service",
                                 "namespace": "connectors-system"}}
    return parse_connector_class({"apiVersion": "connectors.alauda.io/v1alpha1",
                                  "kind": "ConnectorClass", "metadata": {"name": name},
                                  "spec": spec})


def secret(name: str = "harbor-secret", ns: str = "default",
           type: str = "kubernetes.io/basic-auth") -> Any:
    return parse_secret({"apiVersion": "v1", "kind": "Secret", "type": type,
                         "metadata": {"name": name, "namespace": ns},
                         "stringData": {"username": "u", "password": "p"}})


def world(classes: tuple[Any, ...] = (), secrets: tuple[Any, ...] = (), **kw: Any) -> World:
    return World(classes={c.name: c for c in classes},
                 secrets={ObjectRef(s.namespace, s.name): s for s in secrets}, **kw)


def run(raw: dict[str, Any], w: World, live_service: dict[str, Any] | None = None,
        now: str = T0) -> Decision:
    try:
        parsed: Any = parse_connector(raw)
    except InvalidObject as e:
        parsed = e
    return decide(raw, parsed, w, live_service, now)


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def apply(raw: dict[str, Any], decision: Decision) -> dict[str, Any]:
    """What the live objects look like after the writer applied C{decision}."""
    out = copy.deepcopy(raw)
    if decision.status is not None:
        out["status"] = decision.status
    return out


class ServiceTests(SynchronousTestCase):
    def test_desired_service(self) -> None:
        c = parse_connector(connector())
        svc = desired_service(c, connector_class(), "cluster.local", serve_tls=False)
        self.assertEqual(svc["metadata"]["name"], "c-harbor")
        self.assertEqual(svc["metadata"]["namespace"], "default")
        self.assertEqual(svc["metadata"]["labels"], {
            MANAGED_BY_LABEL: "connectors-proxy", CONNECTOR_LABEL: "harbor"})
        self.assertEqual(svc["metadata"]["ownerReferences"], [{
            "apiVersion": "connectors.alauda.io/v1alpha1", "kind": "Connector",
            "name": "harbor", "uid": "uid-harbor", "controller": True,
            "blockOwnerDeletion": True}])
        self.assertEqual(svc["spec"]["type"], "ExternalName")
        self.assertEqual(svc["spec"]["externalName"],
                         "connectors-proxy-service.connectors-system.svc.cluster.local")
        self.assertEqual([(p["name"], p["port"]) for p in svc["spec"]["ports"]], [("http", 80)])

    def test_tls_adds_https_port_and_domain_is_used(self) -> None:
        c = parse_connector(connector())
        svc = desired_service(c, connector_class(), "corp.example", serve_tls=True)
        self.assertEqual([(p["name"], p["port"]) for p in svc["spec"]["ports"]],
                         [("http", 80), ("https", 443)])
        self.assertTrue(svc["spec"]["externalName"].endswith(".svc.corp.example"))

    def test_server_defaults_are_not_differences(self) -> None:
        c = parse_connector(connector())
        desired = desired_service(c, connector_class(), "cluster.local", False)
        live = copy.deepcopy(desired)
        live["spec"]["sessionAffinity"] = "None"
        live["metadata"]["labels"]["team"] = "a"
        live["metadata"]["resourceVersion"] = "5"
        for port in live["spec"]["ports"]:
            del port["targetPort"], port["protocol"]
        self.assertTrue(service_matches(live, desired))
        live["spec"]["externalName"] = "elsewhere.example.com"
        self.assertFalse(service_matches(live, desired))

    def test_dns1035(self) -> None:
        self.assertIsNone(dns1035_problem("c-" + "a" * 61))
        self.assertIn("63", dns1035_problem("c-" + "a" * 62) or "")
        self.assertIsNotNone(dns1035_problem("c-a.b"))
        self.assertIsNotNone(dns1035_problem("c-a-"))


class DecideTests(SynchronousTestCase):
    def test_new_connector_creates_service_and_status(self) -> None:
        raw = connector()
        d = run(raw, world((connector_class(),), (secret(),)))
        assert d.service is not None and d.status is not None
        self.assertEqual(d.service.verb, "create")
        self.assertEqual(d.service.body["metadata"]["name"], "c-harbor")
        self.assertEqual(d.status["observedGeneration"], 3)
        self.assertEqual(d.status["proxy"]["httpAddress"]["url"],
                         "http://c-harbor.default.svc.cluster.local")
        self.assertEqual(conditions(d.status), {
            "ConnectorClassReady": ("True", "ConnectorClassFound"),
            "SecretReady": ("True", "SecretFound"),
            "ProxyServiceReady": ("True", "ServiceReady"),
            "Ready": ("True", "Ready"),
        })
        for cond in d.status["conditions"]:
            self.assertEqual(cond["lastTransitionTime"], T0)
            self.assertIsInstance(cond["message"], str)

    def test_unchanged_means_no_write(self) -> None:
        w = world((connector_class(),), (secret(),))
        raw = connector()
        first = run(raw, w)
        assert first.service is not None
        live_svc = dict(first.service.body, metadata=dict(first.service.body["metadata"],
                                                          resourceVersion="7", uid="s1"))
        again = run(apply(raw, first), w, live_svc, now=T1)
        self.assertEqual(again, Decision(None, None))

    def test_class_not_found(self) -> None:
        d = run(connector(), world((), (secret(),)))
        assert d.status is not None
        self.assertIsNone(d.service)
        conds = conditions(d.status)
        self.assertEqual(conds["ConnectorClassReady"], ("False", "ConnectorClassNotFound"))
        self.assertEqual(conds["Ready"], ("False", "ConnectorClassNotFound"))
        self.assertNotIn("proxy", d.status)

    def test_invalid_policy(self) -> None:
        """
        A class whose Rego policy does not compile: C{ConnectorClassReady}
        and C{Ready} are C{False} with reason C{InvalidPolicy}, naming the
        class and hook; once it compiles again, both are C{True}.
        """
        problem = "its authExtractor Rego policy does not compile: line 3: unexpected token"
        broken = world((connector_class(),), (secret(),), invalid_policies={"oci": problem})
        d = run(connector(), broken)
        assert d.status is not None
        conds = conditions(d.status)
        self.assertEqual(conds["ConnectorClassReady"], ("False", "InvalidPolicy"))
        self.assertEqual(conds["Ready"], ("False", "InvalidPolicy"))
        message = next(c["message"] for c in d.status["conditions"] if c["type"] == "ConnectorClassReady")
        self.assertEqual(message, "ConnectorClass oci: " + problem)
        # The Service is still kept: the class is there, only its policy is broken.
        self.assertIsNotNone(d.service)
        fixed = run(apply(connector(), d), world((connector_class(),), (secret(),)), now=T1)
        assert fixed.status is not None
        conds = conditions(fixed.status)
        self.assertEqual(conds["ConnectorClassReady"], ("True", "ConnectorClassFound"))
        self.assertEqual(conds["Ready"], ("True", "Ready"))

    def test_name_too_long(self) -> None:
        name = "a" * 62
        raw = connector(name=name)
        d = run(raw, world((connector_class(),), (secret(),)))
        assert d.status is not None
        self.assertIsNone(d.service)
        conds = conditions(d.status)
        self.assertEqual(conds["ProxyServiceReady"], ("False", "InvalidServiceName"))
        self.assertEqual(conds["Ready"], ("False", "InvalidServiceName"))
        self.assertNotIn("proxy", d.status)
        # One character shorter fits.
        ok = run(connector(name="a" * 61), world((connector_class(),), (secret(),)))
        assert ok.service is not None
        self.assertEqual(ok.service.verb, "create")

    def test_secret_conditions(self) -> None:
        missing = run(connector(), world((connector_class(),)))
        assert missing.status is not None
        self.assertEqual(conditions(missing.status)["SecretReady"], ("False", "SecretNotFound"))
        self.assertEqual(conditions(missing.status)["Ready"], ("False", "SecretNotFound"))
        optional = run(connector(secret=None), world((connector_class(optional=True),)))
        assert optional.status is not None
        self.assertEqual(conditions(optional.status)["SecretReady"], ("True", "SecretOptional"))
        anonymous = run(connector(secret=None), world((connector_class(),)))
        assert anonymous.status is not None
        self.assertEqual(conditions(anonymous.status)["SecretReady"], ("True", "SecretOptional"))
        no_ref = connector(secret=None)
        no_ref["spec"]["auth"] = {"name": "basicAuth"}
        required = run(no_ref, world((connector_class(),)))
        assert required.status is not None
        self.assertEqual(conditions(required.status)["SecretReady"], ("False", "SecretNotFound"))
        wrong = run(connector(), world((connector_class(),),
                                       (secret(type="connectors.cpaas.io/bearer-token"),)))
        assert wrong.status is not None
        self.assertEqual(conditions(wrong.status)["SecretReady"], ("False", "SecretTypeMismatch"))
        invalid = run(connector(), World(classes={"oci": connector_class()},
                                         invalid_secrets={ObjectRef("default", "harbor-secret"):
                                                          "data.x: is not valid base64"}))
        assert invalid.status is not None
        self.assertEqual(conditions(invalid.status)["SecretReady"], ("False", "InvalidSecret"))

    def test_non_proxy_class(self) -> None:
        c = parse_connector(connector())
        owned = desired_service(c, connector_class(), "cluster.local", False)
        owned["metadata"]["uid"] = "svc-uid"
        d = run(connector(), world((connector_class(proxy=False),), (secret(),)), owned)
        assert d.status is not None and d.service is not None
        self.assertEqual(d.service.verb, "delete")
        self.assertEqual(d.service.body["metadata"]["uid"], "svc-uid")
        self.assertEqual(conditions(d.status)["ProxyServiceReady"], ("True", "NonProxy"))
        self.assertEqual(conditions(d.status)["Ready"], ("True", "Ready"))
        self.assertNotIn("proxy", d.status)

    def test_foreign_service_is_left_alone(self) -> None:
        foreign = {"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": "c-harbor", "namespace": "default", "uid": "x"},
                   "spec": {"type": "ClusterIP", "clusterIP": "10.0.0.1"}}
        d = run(connector(), world((connector_class(),), (secret(),)), foreign)
        assert d.status is not None
        self.assertIsNone(d.service)
        self.assertEqual(conditions(d.status)["ProxyServiceReady"], ("False", "ServiceConflict"))

    def test_hand_edited_service_is_put_back(self) -> None:
        c = parse_connector(connector())
        live = desired_service(c, connector_class(), "cluster.local", False)
        live["metadata"].update(resourceVersion="9", uid="svc-uid")
        live["metadata"]["labels"] = {"team": "a"}  # our labels removed by hand
        live["metadata"]["annotations"] = {"note": "kept"}
        live["spec"] = {"type": "ClusterIP", "clusterIP": "10.0.0.9", "clusterIPs": ["10.0.0.9"],
                        "ports": [{"name": "x", "port": 1}]}
        d = run(connector(), world((connector_class(),), (secret(),)), live)
        assert d.service is not None
        self.assertEqual(d.service.verb, "replace")
        body = d.service.body
        self.assertEqual(body["metadata"]["resourceVersion"], "9")
        self.assertEqual(body["metadata"]["annotations"], {"note": "kept"})
        self.assertEqual(body["metadata"]["labels"]["team"], "a")
        self.assertEqual(body["metadata"]["labels"][MANAGED_BY_LABEL], "connectors-proxy")
        self.assertNotIn("clusterIP", body["spec"])
        self.assertEqual(body["spec"]["type"], "ExternalName")
        self.assertTrue(service_matches(body, desired_service(c, connector_class(),
                                                              "cluster.local", False)))

    def test_transition_time_kept_while_status_unchanged(self) -> None:
        w_missing = world((connector_class(),))
        first = run(connector(), w_missing, now=T0)
        raw = apply(connector(), first)
        # Still failing, for another reason: the time stays.
        wrong = world((connector_class(),), (secret(type="Opaque"),))
        second = run(raw, wrong, now=T1)
        assert second.status is not None
        by_type = {c["type"]: c for c in second.status["conditions"]}
        self.assertEqual(by_type["SecretReady"]["reason"], "SecretTypeMismatch")
        self.assertEqual(by_type["SecretReady"]["lastTransitionTime"], T0)
        # Fixed: the time moves.
        third = run(apply(raw, second), world((connector_class(),), (secret(),)), now=T1)
        assert third.status is not None
        by_type = {c["type"]: c for c in third.status["conditions"]}
        self.assertEqual(by_type["SecretReady"]["status"], "True")
        self.assertEqual(by_type["SecretReady"]["lastTransitionTime"], T1)
        self.assertEqual(by_type["ConnectorClassReady"]["lastTransitionTime"], T0)

    def test_other_writers_fields_kept(self) -> None:
        status = {"observedGeneration": 1, "api": {"path": "/x"},
                  "conditions": [{"type": "LivenessReady", "status": "True", "reason": "Alive",
                                  "message": "", "lastTransitionTime": T0}]}
        d = run(connector(status=status), world((connector_class(),), (secret(),)))
        assert d.status is not None
        self.assertEqual(d.status["api"], {"path": "/x"})
        self.assertEqual(d.status["conditions"][0]["type"], "LivenessReady")
        self.assertEqual(d.status["observedGeneration"], 3)

    def test_generation_change_is_written(self) -> None:
        w = world((connector_class(),), (secret(),))
        raw = apply(connector(generation=3), run(connector(generation=3), w))
        raw["metadata"]["generation"] = 4
        d = run(raw, w, now=T1)
        assert d.status is not None
        self.assertEqual(d.status["observedGeneration"], 4)

    def test_invalid_connector(self) -> None:
        raw = connector()
        raw["spec"]["address"] = "ftp://nope"
        d = run(raw, world((connector_class(),), (secret(),)))
        assert d.status is not None
        self.assertIsNone(d.service)
        self.assertEqual(conditions(d.status)["Ready"], ("False", "InvalidConnector"))
        ready = [c for c in d.status["conditions"] if c["type"] == "Ready"][0]
        self.assertIn("spec.address", ready["message"])
