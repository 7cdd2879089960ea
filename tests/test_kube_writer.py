"""
Cluster mode end to end on a L{Clock} against the in-memory API double:
watches feed the proxy's Store, and the writer keeps proxy Services and
Connector status right, with zero writes when nothing changed.
"""

from __future__ import annotations

import base64
import copy
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from connectors_proxy.kube.client import CONNECTOR_CLASSES, CONNECTORS, SECRETS, SERVICES, KubeError
from connectors_proxy.kube.cluster import ClusterMode
from connectors_proxy.kube.config import KubeConfig
from connectors_proxy.kube.writer import IInventory
from connectors_proxy.model.objects import ObjectRef
from connectors_proxy.model.state import Store

from .test_kube_memory import MemoryKube, settle

CONFIG = KubeConfig(server="https://127.0.0.1:1")


def oci_class(proxy: bool = True) -> dict[str, Any]:
    spec: dict[str, Any] = {"auth": {"types": [
        {"name": "basicAuth", "secretType": "kubernetes.io/basic-auth"}]}}
    if proxy:
        spec["proxy"] = {"ref": {"kind": "Service", "name": "connectors-proxy",
                                 "namespace": "connectors-system"}}
    return {"apiVersion": "connectors.alauda.io/v1alpha1", "kind": "ConnectorClass",
            "metadata": {"name": "oci",
                         "annotations": {"proxy.connectors.alauda.io/protocol": "oci"}},
            "spec": spec}


def connector(name: str = "harbor", ns: str = "default") -> dict[str, Any]:
    return {"apiVersion": "connectors.alauda.io/v1alpha1", "kind": "Connector",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"connectorClassName": "oci", "address": "https://harbor.example.com",
                     "auth": {"name": "basicAuth", "secretRef": {"name": name + "-secret"}}}}


def secret(name: str = "harbor-secret", ns: str = "default", password: str = "p1") -> dict[str, Any]:
    def b64(s: str) -> str:
        return base64.b64encode(s.encode()).decode()
    return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/basic-auth",
            "metadata": {"name": name, "namespace": ns},
            "data": {"username": b64("robot"), "password": b64(password)}}


def conditions(obj: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"])
            for c in (obj.get("status") or {}).get("conditions", [])}


class ClusterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.kube = MemoryKube(self.clock)
        self.store = Store()

    def start(self, **kw: Any) -> ClusterMode:
        mode = ClusterMode(self.clock, CONFIG, self.store, client=self.kube, **kw)
        mode.startService()
        self.addCleanup(mode.stopService)
        settle(self.clock)
        return mode

    def connector_obj(self, name: str = "harbor", ns: str = "default") -> dict[str, Any]:
        return self.kube.objects["connectors"][(ns, name)]

    def service_obj(self, name: str = "harbor", ns: str = "default") -> dict[str, Any] | None:
        return self.kube.objects.get("services", {}).get((ns, "c-" + name))

    def seed(self) -> None:
        self.kube.put(CONNECTOR_CLASSES, oci_class())
        self.kube.put(SECRETS, secret())
        self.kube.put(CONNECTORS, connector())

    def test_connector_gets_service_and_status(self) -> None:
        self.seed()
        mode = self.start()
        svc = self.service_obj()
        assert svc is not None
        self.assertEqual(svc["spec"]["externalName"],
                         "connectors-proxy.connectors-system.svc.cluster.local")
        self.assertEqual(svc["metadata"]["ownerReferences"][0]["uid"],
                         self.connector_obj()["metadata"]["uid"])
        status = self.connector_obj()["status"]
        self.assertEqual(status["proxy"]["httpAddress"]["url"],
                         "http://c-harbor.default.svc.cluster.local")
        self.assertEqual(status["observedGeneration"], 1)
        self.assertEqual(conditions(self.connector_obj())["Ready"], ("True", "Ready"))
        assert mode.writer is not None
        self.assertEqual(mode.writer.counters.creates, 1)
        self.assertEqual(mode.writer.counters.status_writes, 1)

    def test_store_is_fed_and_ready(self) -> None:
        self.seed()
        self.assertFalse(self.store.ready)
        self.start()
        self.assertTrue(self.store.ready)
        snap = self.store.snapshot
        self.assertIn("oci", snap.classes)
        self.assertIn(ObjectRef("default", "harbor"), snap.connectors)
        self.assertEqual(snap.secrets[ObjectRef("default", "harbor-secret")].data["password"], b"p1")

    def test_rotated_secret_is_in_the_next_snapshot(self) -> None:
        self.seed()
        self.start()
        self.kube.put(SECRETS, secret(password="p2"))
        # The watch event arrives on the next turn; the snapshot follows on
        # the turn after: far below the 2 s the spec allows.
        settle(self.clock)
        self.assertEqual(self.clock.seconds(), 0)
        ref = ObjectRef("default", "harbor-secret")
        self.assertEqual(self.store.snapshot.secrets[ref].data["password"], b"p2")

    def test_not_ready_until_synced_and_while_stale(self) -> None:
        self.seed()
        self.kube.go_down()
        self.start(stale_after=10.0)
        self.assertFalse(self.store.ready)
        self.kube.come_back()
        settle(self.clock, 2)
        self.assertTrue(self.store.ready)
        self.kube.go_down()
        settle(self.clock, 11)
        self.assertFalse(self.store.ready)
        self.assertIn(ObjectRef("default", "harbor"), self.store.snapshot.connectors,
                      "the last known state is still served")
        self.kube.come_back()
        settle(self.clock, 40)
        self.assertTrue(self.store.ready)

    def test_deleted_service_is_put_back(self) -> None:
        self.seed()
        self.start()
        self.kube.remove(SERVICES, "default", "c-harbor")
        settle(self.clock)
        self.assertIsNotNone(self.service_obj())

    def test_edited_service_is_put_back(self) -> None:
        self.seed()
        self.start()
        svc = copy.deepcopy(self.service_obj())
        assert svc is not None
        svc["spec"]["externalName"] = "evil.example.com"
        svc["metadata"]["labels"]["extra"] = "kept"
        self.kube.put(SERVICES, svc)
        settle(self.clock)
        fixed = self.service_obj()
        assert fixed is not None
        self.assertEqual(fixed["spec"]["externalName"],
                         "connectors-proxy.connectors-system.svc.cluster.local")
        self.assertEqual(fixed["metadata"]["labels"]["extra"], "kept")

    def test_unlabelled_service_is_put_back(self) -> None:
        # Removing our label takes the Service out of the labelled watch:
        # the create that follows finds it (409) and takes it back.
        self.seed()
        self.start()
        svc = copy.deepcopy(self.service_obj())
        assert svc is not None
        svc["metadata"]["labels"] = {}
        self.kube.put(SERVICES, svc)
        settle(self.clock)
        fixed = self.service_obj()
        assert fixed is not None
        self.assertEqual(fixed["metadata"]["labels"]["app.kubernetes.io/managed-by"],
                         "connectors-proxy")

    def test_missing_class(self) -> None:
        self.kube.put(SECRETS, secret())
        self.kube.put(CONNECTORS, connector())
        self.start()
        self.assertIsNone(self.service_obj())
        conds = conditions(self.connector_obj())
        self.assertEqual(conds["ConnectorClassReady"], ("False", "ConnectorClassNotFound"))
        self.assertEqual(conds["Ready"], ("False", "ConnectorClassNotFound"))
        # The class appears: the Connector becomes ready.
        self.kube.put(CONNECTOR_CLASSES, oci_class())
        settle(self.clock)
        self.assertIsNotNone(self.service_obj())
        self.assertEqual(conditions(self.connector_obj())["Ready"], ("True", "Ready"))

    def test_missing_secret_then_created(self) -> None:
        self.kube.put(CONNECTOR_CLASSES, oci_class())
        self.kube.put(CONNECTORS, connector())
        self.start()
        self.assertEqual(conditions(self.connector_obj())["SecretReady"],
                         ("False", "SecretNotFound"))
        self.kube.put(SECRETS, secret())
        settle(self.clock)
        self.assertEqual(conditions(self.connector_obj())["SecretReady"], ("True", "SecretFound"))

    def test_name_too_long(self) -> None:
        name = "x" * 62
        self.kube.put(CONNECTOR_CLASSES, oci_class())
        self.kube.put(SECRETS, secret(name + "-secret"))
        self.kube.put(CONNECTORS, connector(name))
        self.start()
        self.assertEqual(self.kube.objects.get("services", {}), {})
        self.assertEqual(conditions(self.connector_obj(name))["ProxyServiceReady"],
                         ("False", "InvalidServiceName"))

    def test_zero_writes_when_unchanged(self) -> None:
        self.seed()
        for i in range(20):
            self.kube.put(SECRETS, secret(f"c{i}-secret"))
            self.kube.put(CONNECTORS, connector(f"c{i}"))
        mode = self.start()
        converged = self.kube.writes()
        self.assertEqual(converged, 42)  # 21 Services + 21 statuses
        # Time passes, watches break and resume, bookmarks, a full resync,
        # a relist after 410, a Secret rotates: nothing to write.
        settle(self.clock, 30)
        self.kube.cut_watches()
        settle(self.clock, 5)
        self.kube.bookmark()
        self.kube.expire_watches("connectors")
        settle(self.clock, 5)
        self.kube.put(SECRETS, secret(password="rotated"))
        settle(self.clock, 700)
        self.assertEqual(self.kube.writes(), converged)
        assert mode.writer is not None
        self.assertGreater(mode.writer.counters.reconciles, 42)
        # A second replica starting on this cluster writes nothing either.
        mode.stopService()
        self.start()
        self.assertEqual(self.kube.writes(), converged)

    def test_conflict_is_retried(self) -> None:
        self.seed()
        self.kube.fail["replace_status"] = [KubeError(409, "Conflict", "modified")]
        mode = self.start()
        self.assertEqual(conditions(self.connector_obj())["Ready"], ("True", "Ready"))
        assert mode.writer is not None
        self.assertEqual(mode.writer.counters.conflicts, 1)
        self.assertEqual(mode.writer.counters.failures, 0)
        self.assertEqual(self.kube.count("get", "connectors"), 1)

    def test_real_conflict_recomputes(self) -> None:
        # Another client changes the Connector's spec after our cache saw
        # it: our write is refused, we read it again and write the new
        # generation.
        self.seed()
        real = self.kube.replace_status
        calls: list[int] = []

        def racing(resource: Any, ns: Any, name: Any, body: Any) -> Any:
            if not calls:
                calls.append(1)
                changed = copy.deepcopy(self.connector_obj())
                changed["spec"]["address"] = "https://harbor2.example.com"
                self.kube.put(CONNECTORS, changed)
            return real(resource, ns, name, body)
        self.kube.replace_status = racing  # type: ignore[method-assign,assignment]
        self.start()
        self.assertEqual(self.connector_obj()["status"]["observedGeneration"], 2)

    def test_errors_back_off_per_connector(self) -> None:
        self.seed()
        boom = KubeError(500, "InternalError", "etcd is sad")
        self.kube.fail["create"] = [boom, boom, boom]
        mode = self.start()
        self.assertIsNone(self.service_obj())
        settle(self.clock, 0.6)
        settle(self.clock, 1.1)
        self.assertIsNone(self.service_obj())
        settle(self.clock, 2.1)
        self.assertIsNotNone(self.service_obj())
        assert mode.writer is not None
        self.assertEqual(mode.writer.counters.failures, 3)
        self.assertEqual(self.kube.count("create", "services"), 4)

    def test_class_loses_proxy_deletes_service(self) -> None:
        self.seed()
        self.start()
        self.kube.put(CONNECTOR_CLASSES, oci_class(proxy=False))
        settle(self.clock)
        self.assertIsNone(self.service_obj())
        self.assertEqual(conditions(self.connector_obj())["ProxyServiceReady"], ("True", "NonProxy"))
        self.assertNotIn("proxy", self.connector_obj()["status"])

    def test_invalid_objects_are_skipped_with_a_condition(self) -> None:
        self.seed()
        bad = connector("bad")
        bad["spec"]["address"] = "not a url"
        self.kube.put(CONNECTORS, bad)
        bad_secret = secret("harbor-secret")
        bad_secret["data"]["password"] = "%%%"
        self.kube.put(SECRETS, bad_secret)
        self.start()
        self.assertNotIn(ObjectRef("default", "bad"), self.store.snapshot.connectors)
        self.assertIn(ObjectRef("default", "harbor"), self.store.snapshot.connectors)
        self.assertEqual(conditions(self.connector_obj("bad"))["Ready"],
                         ("False", "InvalidConnector"))
        self.assertEqual(conditions(self.connector_obj())["SecretReady"],
                         ("False", "InvalidSecret"))
        self.assertNotIn(ObjectRef("default", "harbor-secret"), self.store.snapshot.secrets)
        self.assertIsNone(self.service_obj("bad"))

    def test_no_writes_without_write_permission_or_leadership(self) -> None:
        self.seed()
        self.start(write=False)
        self.assertEqual(self.kube.writes(), 0)
        self.assertTrue(self.store.ready)

    def test_rate_limit(self) -> None:
        self.kube.put(CONNECTOR_CLASSES, oci_class())
        for i in range(30):
            self.kube.put(SECRETS, secret(f"c{i}-secret"))
            self.kube.put(CONNECTORS, connector(f"c{i}"))
        self.start(qps=10.0)  # burst 20
        self.assertEqual(self.kube.writes(), 20)
        settle(self.clock, 1.0)
        self.assertEqual(self.kube.writes(), 30)
        settle(self.clock, 10)
        self.assertEqual(self.kube.writes(), 60)

    def test_leader_only_writes(self) -> None:
        self.seed()
        a = self.start(leader_elect=True, identity="a", lease_namespace="cs")
        b = self.start(leader_elect=True, identity="b", lease_namespace="cs")
        settle(self.clock, 1)
        self.assertEqual([a.is_leader, b.is_leader], [True, False])
        self.assertEqual(conditions(self.connector_obj())["Ready"], ("True", "Ready"))
        # The leader crashes; the follower takes over and repairs.
        assert a.elector is not None
        a.elector.stop(release=False)
        a.stopService()
        self.kube.remove(SERVICES, "default", "c-harbor")
        settle(self.clock, 1)
        self.assertIsNone(self.service_obj(), "nobody leads yet")
        settle(self.clock, 25)
        self.assertTrue(b.is_leader)
        self.assertIsNotNone(self.service_obj())


class ManyConnectorsTests(SynchronousTestCase):
    def test_thousands_of_no_op_reconciles_do_not_nest(self) -> None:
        # With an answer at hand (nothing to write), a reconcile finishes
        # synchronously; the queue must be worked in a loop, not by
        # recursion.
        clock = Clock()
        kube = MemoryKube(clock)
        kube.put(CONNECTOR_CLASSES, oci_class())
        for i in range(1200):
            kube.put(SECRETS, secret(f"c{i}-secret"))
            kube.put(CONNECTORS, connector(f"c{i}"))
        first = ClusterMode(clock, CONFIG, Store(), client=kube, qps=1e6)
        first.startService()
        settle(clock, 1)
        self.assertEqual(kube.writes(), 2400)
        first.stopService()
        second = ClusterMode(clock, CONFIG, Store(), client=kube)
        second.startService()
        self.addCleanup(second.stopService)
        settle(clock, 1)
        assert second.writer is not None
        self.assertEqual(second.writer.counters.reconciles, 1200)
        self.assertEqual(kube.writes(), 2400)


@implementer(IInventory)
class _Inventory:
    def __init__(self, raw: dict[str, Any]) -> None:
        from connectors_proxy.model.objects import parse_connector, parse_connector_class
        self.raw = raw
        self.parsed = parse_connector(raw)
        self.classes = {"oci": parse_connector_class(oci_class())}

    def connector(self, key: Any) -> Any:
        return self.raw, self.parsed

    def service(self, key: Any) -> Any:
        return None

    def world(self) -> Any:
        from connectors_proxy.kube.reconcile import World
        return World(classes=self.classes)

    def connector_keys(self) -> Any:
        return [("default", "harbor")]


class _PendingClient(MemoryKube):
    """Service creates wait for the test to answer them."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.pending: list[Any] = []

    def create(self, resource: Any, namespace: Any, body: Any) -> Any:
        from twisted.internet.defer import Deferred
        d: Deferred[Any] = Deferred()
        self.pending.append(d)
        return d


class WriterQueueTests(SynchronousTestCase):
    def test_marked_again_while_failing_leaves_no_timer_behind(self) -> None:
        from zope.interface.verify import verifyObject

        from connectors_proxy.kube.writer import Writer
        clock = Clock()
        client = _PendingClient(clock)
        raw = connector()
        raw["metadata"]["uid"] = "u1"
        inventory = _Inventory(raw)
        verifyObject(IInventory, inventory)
        writer = Writer(client, clock, inventory)  # type: ignore[arg-type]
        key = ("default", "harbor")
        writer.enqueue(key)
        writer.enqueue(key)  # an event while in flight: done once more afterwards
        self.assertEqual(len(client.pending), 1, "never two at once for one Connector")
        client.pending.pop().errback(KubeError(500, "InternalError", "x"))
        self.assertEqual(len(client.pending), 1, "the second pass runs at once")
        client.pending.pop().errback(KubeError(500, "InternalError", "x"))
        self.assertEqual(len(clock.getDelayedCalls()), 1, "one retry timer per Connector")
        self.assertEqual(writer.counters.failures, 2)
        clock.advance(1.0)  # 0.5 s, then 1 s backoff
        self.assertEqual(len(client.pending), 1)
        writer.stop()
        client.pending.pop().errback(KubeError(500, "InternalError", "x"))
        self.assertEqual(clock.getDelayedCalls(), [])
