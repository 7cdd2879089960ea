"""
An in-memory L{IKubeClient} for fast, deterministic cluster-mode unit tests
(with a L{Clock}), and the tests that keep it honest on the points the
cluster-mode code depends on: resourceVersions, 409 on stale writes and
taken names, the status subresource, watches from a resourceVersion, 410
after compaction, bookmarks, pagination.

End-to-end tests against the verified fake API server over HTTP are in
C{tests.test_kube_e2e}.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from connectors_proxy.kube.client import (
    CONNECTORS,
    JSON,
    SECRETS,
    SERVICES,
    EventCallback,
    IKubeClient,
    IWatch,
    KubeError,
    Resource,
)

Key = tuple[str, str]


@implementer(IWatch)
class MemoryWatch:
    def __init__(self, server: MemoryKube, resource: Resource, on_event: EventCallback,
                 match: Callable[[JSON], bool]) -> None:
        self.server = server
        self.resource = resource
        self.on_event = on_event
        self.match = match
        self.done: Deferred[None] = Deferred(lambda d: self.stop())
        self.events = 0

    def deliver(self, kind: str, obj: JSON) -> None:
        if self.done.called:
            return
        self.events += 1
        try:
            self.on_event(kind, copy.deepcopy(obj))
        except Exception:
            self._end(Failure())

    def stop(self) -> None:
        self._end(None)

    def _end(self, failure: Failure | None) -> None:
        if self in self.server.watches:
            self.server.watches.remove(self)
        if not self.done.called:
            if failure is None:
                self.done.callback(None)
            else:
                self.done.errback(failure)


def _labels_match(selector: str | None, obj: JSON) -> bool:
    if not selector:
        return True
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for req in selector.split(","):
        k, _, v = req.partition("=")
        if labels.get(k) != v:
            return False
    return True


def _fields_match(selector: str | None, obj: JSON) -> bool:
    if not selector:
        return True
    values = {"type": obj.get("type", ""), "metadata.name": obj["metadata"]["name"],
              "metadata.namespace": obj["metadata"].get("namespace", "")}
    for req in selector.split(","):
        if "!=" in req:
            k, v = req.split("!=")
            if values[k] == v:
                return False
        else:
            k, v = req.split("=")
            if values[k] != v:
                return False
    return True


@implementer(IKubeClient)
class MemoryKube:
    """
    A tiny API server and client in one.  Answers synchronously; watch
    events are delivered on the next C{clock} turn (as a network would),
    so tests advance the clock to let them through.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.rv = itertools.count(1)
        self.last_rv = 0
        self.objects: dict[str, dict[Key, JSON]] = {}
        self.history: dict[str, list[tuple[int, str, JSON, JSON | None]]] = {}
        self.oldest: dict[str, int] = {}
        self.watches: list[MemoryWatch] = []
        self.calls: list[tuple[str, str]] = []
        self.down = False
        self.fail: dict[str, list[KubeError]] = {}
        self.tokens: dict[str, JSON] = {}
        self.allow: Callable[[JSON], bool] = lambda spec: True
        self.uid = itertools.count(1)

    # -- test controls --------------------------------------------------------

    def count(self, verb: str, plural: str | None = None) -> int:
        return sum(1 for v, p in self.calls if v == verb and (plural is None or p == plural))

    def writes(self) -> int:
        return sum(1 for v, _ in self.calls
                   if v in ("create", "replace", "replace_status", "delete"))

    def go_down(self) -> None:
        """Refuse every request and cut every watch, as a dead API server would."""
        self.down = True
        self.cut_watches()

    def come_back(self) -> None:
        self.down = False

    def cut_watches(self) -> None:
        for w in list(self.watches):
            w._end(Failure(ConnectionLost("cut by the test")))

    def compact(self, plural: str) -> None:
        """Forget history: watches from older resourceVersions get 410."""
        self.history[plural] = []
        self.oldest[plural] = self.last_rv + 1

    def expire_watches(self, plural: str) -> None:
        """Running watches of C{plural} get an C{ERROR} 410 event."""
        self.compact(plural)
        for w in list(self.watches):
            if w.resource.plural == plural:
                w.deliver("ERROR", {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                    "code": 410, "reason": "Expired",
                                    "message": "too old resource version"})

    def bookmark(self) -> None:
        rv = str(self.last_rv)
        for w in list(self.watches):
            self.clock.callLater(0, w.deliver, "BOOKMARK", {
                "kind": w.resource.kind, "apiVersion": w.resource.api_version,
                "metadata": {"resourceVersion": rv}})

    def put(self, resource: Resource, obj: JSON) -> JSON:
        """Create or overwrite, as another client would (no checks)."""
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        key = (meta.get("namespace", "") if resource.namespaced else "", meta["name"])
        store = self.objects.setdefault(resource.plural, {})
        old = store.get(key)
        meta.setdefault("uid", old["metadata"]["uid"] if old else f"uid-{next(self.uid)}")
        if resource is CONNECTORS:
            meta["generation"] = (old["metadata"].get("generation", 0) + 1) if old else 1
        obj.setdefault("apiVersion", resource.api_version)
        obj.setdefault("kind", resource.kind)
        return self._store(resource, key, obj, "MODIFIED" if old else "ADDED")

    def remove(self, resource: Resource, namespace: str, name: str) -> None:
        key = (namespace if resource.namespaced else "", name)
        obj = self.objects.get(resource.plural, {}).pop(key)
        rv = self._next_rv()
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(rv)
        self._event(resource, rv, "DELETED", obj)

    def _next_rv(self) -> int:
        self.last_rv = next(self.rv)
        return self.last_rv

    def _store(self, resource: Resource, key: Key, obj: JSON, kind: str) -> JSON:
        rv = self._next_rv()
        obj["metadata"]["resourceVersion"] = str(rv)
        old = self.objects.setdefault(resource.plural, {}).get(key)
        self.objects[resource.plural][key] = obj
        self._event(resource, rv, kind, obj, old)
        return copy.deepcopy(obj)

    def _event(self, resource: Resource, rv: int, kind: str, obj: JSON,
               old: JSON | None = None) -> None:
        snapshot = copy.deepcopy(obj)
        before = copy.deepcopy(old) if old is not None else None
        self.history.setdefault(resource.plural, []).append((rv, kind, snapshot, before))
        for w in list(self.watches):
            if w.resource.plural == resource.plural:
                self._maybe_deliver(w, kind, snapshot, before)

    def _maybe_deliver(self, w: MemoryWatch, kind: str, obj: JSON, old: JSON | None) -> None:
        # As the API server does for selector watches: an object that
        # leaves the selection is DELETED, one that enters it is ADDED.
        now, then = w.match(obj), old is not None and w.match(old)
        if kind == "MODIFIED" and then and not now:
            kind = "DELETED"
        elif kind == "MODIFIED" and now and not then:
            kind = "ADDED"
        elif not now:
            return
        self.clock.callLater(0, w.deliver, kind, obj)

    # -- IKubeClient ----------------------------------------------------------

    def _check(self, verb: str, resource: Resource) -> None:
        self.calls.append((verb, resource.plural))
        if self.down:
            raise ConnectionRefusedError("the API server is down (test)")
        queue = self.fail.get(verb)
        if queue:
            raise queue.pop(0)

    def _key(self, resource: Resource, namespace: str | None, name: str) -> Key:
        return (namespace or "" if resource.namespaced else "", name)

    def _call(self, verb: str, resource: Resource, fn: Callable[[], Any]) -> Deferred[Any]:
        try:
            self._check(verb, resource)
            return succeed(fn())
        except Exception:
            return fail()

    def list(self, resource: Resource, namespace: str | None = None,
             label_selector: str | None = None, field_selector: str | None = None,
             limit: int | None = None, continue_: str | None = None) -> Deferred[JSON]:
        def do() -> JSON:
            items = [copy.deepcopy(o) for k, o in sorted(self.objects.get(resource.plural, {}).items())
                     if (namespace is None or k[0] == namespace)
                     and _labels_match(label_selector, o) and _fields_match(field_selector, o)]
            start = int(continue_ or 0)
            meta: JSON = {"resourceVersion": str(self.last_rv)}
            if limit and start + limit < len(items):
                meta["continue"] = str(start + limit)
            page = items[start:start + limit] if limit else items
            return {"kind": resource.kind + "List", "apiVersion": resource.api_version,
                    "metadata": meta, "items": page}
        return self._call("list", resource, do)

    def get(self, resource: Resource, namespace: str | None, name: str) -> Deferred[JSON]:
        def do() -> JSON:
            obj = self.objects.get(resource.plural, {}).get(self._key(resource, namespace, name))
            if obj is None:
                raise KubeError(404, "NotFound", f'{resource.plural} "{name}" not found')
            return copy.deepcopy(obj)
        return self._call("get", resource, do)

    def create(self, resource: Resource, namespace: str | None, body: JSON) -> Deferred[JSON]:
        def do() -> JSON:
            obj = copy.deepcopy(body)
            meta = obj.setdefault("metadata", {})
            if resource.namespaced:
                meta["namespace"] = namespace
            key = self._key(resource, namespace, meta["name"])
            if key in self.objects.get(resource.plural, {}):
                raise KubeError(409, "AlreadyExists",
                                f'{resource.plural} "{meta["name"]}" already exists')
            meta["uid"] = f"uid-{next(self.uid)}"
            meta.pop("resourceVersion", None)
            if resource is CONNECTORS:
                meta["generation"] = 1
            return self._store(resource, key, obj, "ADDED")
        return self._call("create", resource, do)

    def _update(self, resource: Resource, namespace: str | None, name: str, body: JSON,
                status: bool) -> JSON:
        key = self._key(resource, namespace, name)
        old = self.objects.get(resource.plural, {}).get(key)
        if old is None:
            raise KubeError(404, "NotFound", f'{resource.plural} "{name}" not found')
        rv = (body.get("metadata") or {}).get("resourceVersion")
        if rv and rv != old["metadata"]["resourceVersion"]:
            raise KubeError(409, "Conflict", "the object has been modified; please apply your "
                            "changes to the latest version and try again")
        new = copy.deepcopy(old)
        if status:
            new["status"] = copy.deepcopy(body.get("status"))
        else:
            for k, v in body.items():
                if k not in ("metadata", "status"):
                    new[k] = copy.deepcopy(v)
            for k in ("labels", "annotations", "ownerReferences"):
                if k in body.get("metadata", {}):
                    new["metadata"][k] = copy.deepcopy(body["metadata"][k])
                else:
                    new["metadata"].pop(k, None)
            if resource is CONNECTORS and new.get("spec") != old.get("spec"):
                new["metadata"]["generation"] = old["metadata"].get("generation", 0) + 1
        if new == old:
            return copy.deepcopy(old)
        return self._store(resource, key, new, "MODIFIED")

    def replace(self, resource: Resource, namespace: str | None, name: str,
                body: JSON) -> Deferred[JSON]:
        return self._call("replace", resource,
                          lambda: self._update(resource, namespace, name, body, False))

    def replace_status(self, resource: Resource, namespace: str | None, name: str,
                       body: JSON) -> Deferred[JSON]:
        return self._call("replace_status", resource,
                          lambda: self._update(resource, namespace, name, body, True))


    def delete(self, resource: Resource, namespace: str | None, name: str,
               preconditions: Mapping[str, str] | None = None) -> Deferred[JSON]:
        def do() -> JSON:
            key = self._key(resource, namespace, name)
            old = self.objects.get(resource.plural, {}).get(key)
            if old is None:
                raise KubeError(404, "NotFound", f'{resource.plural} "{name}" not found')
            for k, v in (preconditions or {}).items():
                if old["metadata"].get(k) != v:
                    raise KubeError(409, "Conflict", f"precondition failed: {k}")
            self.remove(resource, key[0], name)
            return {"kind": "Status", "status": "Success"}
        return self._call("delete", resource, do)

    def watch(self, resource: Resource, on_event: EventCallback, namespace: str | None = None,
              resource_version: str | None = None, label_selector: str | None = None,
              field_selector: str | None = None, timeout_seconds: int | None = None,
              allow_bookmarks: bool = True) -> Deferred[IWatch]:
        def do() -> IWatch:
            def match(obj: JSON) -> bool:
                return ((namespace is None or obj["metadata"].get("namespace") == namespace)
                        and _labels_match(label_selector, obj)
                        and _fields_match(field_selector, obj))
            w = MemoryWatch(self, resource, on_event, match)
            since = int(resource_version or 0)
            if since and since + 1 < self.oldest.get(resource.plural, 0):
                raise KubeError(410, "Expired", "too old resource version")
            self.watches.append(w)
            for rv, kind, obj, old in self.history.get(resource.plural, []):
                if rv > since:
                    self._maybe_deliver(w, kind, obj, old)
            return w
        return self._call("watch", resource, do)

    def create_token_review(self, token: str, audiences: tuple[str, ...] = ()) -> Deferred[JSON]:
        def do() -> JSON:
            user = self.tokens.get(token)
            if user is None:
                return {"authenticated": False, "error": "invalid bearer token"}
            return {"authenticated": True, "user": user, "audiences": list(audiences)}
        return self._call("tokenreview", Resource("", "", "tokenreviews", "", False), do)

    def create_subject_access_review(self, spec: JSON) -> Deferred[JSON]:
        return self._call("subjectaccessreview",
                          Resource("", "", "subjectaccessreviews", "", False),
                          lambda: {"allowed": bool(self.allow(spec))})




def settle(clock: Clock, seconds: float = 0.0, step: float = 0.05) -> None:
    """Let deliveries and timers run: C{seconds} of clock time, then idle turns."""
    end = clock.seconds() + seconds
    while clock.seconds() < end:
        clock.advance(min(step, end - clock.seconds()))
    for _ in range(50):
        clock.advance(0)


class MemoryKubeTests(SynchronousTestCase):
    """The double behaves like the API server where the code under test cares."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.kube = MemoryKube(self.clock)

    def test_interface(self) -> None:
        verifyObject(IKubeClient, self.kube)

    def test_conflict_on_stale_write(self) -> None:
        obj = self.successResultOf(self.kube.create(SERVICES, "ns", {"metadata": {"name": "a"}}))
        self.successResultOf(self.kube.replace(SERVICES, "ns", "a", dict(obj, spec={"x": 1})))
        err = self.failureResultOf(self.kube.replace(SERVICES, "ns", "a", obj), KubeError)
        self.assertEqual(err.value.code, 409)
        again = self.failureResultOf(self.kube.create(SERVICES, "ns", {"metadata": {"name": "a"}}),
                                     KubeError)
        self.assertTrue(again.value.already_exists)

    def test_status_subresource(self) -> None:
        obj = self.kube.put(CONNECTORS, {"metadata": {"name": "c", "namespace": "ns"},
                                         "spec": {"a": 1}})
        self.successResultOf(self.kube.replace(CONNECTORS, "ns", "c", dict(obj, status={"s": 1})))
        self.assertNotIn("status", self.kube.objects["connectors"][("ns", "c")])
        self.successResultOf(self.kube.replace_status(CONNECTORS, "ns", "c",
                                                      dict(obj, spec={"b": 2}, status={"s": 1})))
        stored = self.kube.objects["connectors"][("ns", "c")]
        self.assertEqual((stored["spec"], stored["status"]), ({"a": 1}, {"s": 1}))
        self.assertEqual(stored["metadata"]["generation"], 1)

    def test_watch_resume_and_gone(self) -> None:
        self.kube.put(SECRETS, {"metadata": {"name": "a", "namespace": "ns"}})
        mark = self.kube.last_rv
        self.kube.put(SECRETS, {"metadata": {"name": "b", "namespace": "ns"}})
        seen: list[tuple[str, str]] = []
        self.successResultOf(self.kube.watch(
            SECRETS, lambda k, o: seen.append((k, o["metadata"]["name"])),
            resource_version=str(mark)))
        settle(self.clock)
        self.assertEqual(seen, [("ADDED", "b")])
        self.kube.compact("secrets")
        err = self.failureResultOf(self.kube.watch(SECRETS, lambda k, o: None,
                                                   resource_version=str(mark)), KubeError)
        self.assertTrue(err.value.gone)

    def test_pages(self) -> None:
        for i in range(5):
            self.kube.put(SECRETS, {"metadata": {"name": f"s{i}", "namespace": "ns"}})
        page = self.successResultOf(self.kube.list(SECRETS, limit=2))
        self.assertEqual(len(page["items"]), 2)
        self.assertEqual(page["metadata"]["continue"], "2")
