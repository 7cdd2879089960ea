"""
The list + watch cache: resume from the last resourceVersion (bookmarks
included), list again after 410 and report only differences, back off on
errors, keep serving while the API server is away, say when it is stale.
All on a L{Clock} against the in-memory API double.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from connectors_proxy.kube.client import SECRETS, SERVICES
from connectors_proxy.kube.reflector import Backoff, Reflector

from .test_kube_memory import MemoryKube, MemoryWatch, settle


def secret(name: str, value: str = "a", ns: str = "ns") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns}, "data": {"k": value}}


class ReflectorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.kube = MemoryKube(self.clock)
        self.events: list[tuple[str, str]] = []

    def reflector(self, **kw: Any) -> Reflector:
        kw.setdefault("backoff", Backoff(random=lambda: 0.0))
        r = Reflector(self.kube, self.clock, kw.pop("resource", SECRETS), random=lambda: 0.0,
                      **kw)
        r.listen(lambda event, key, old, new: self.events.append((event, key[1])))
        r.start()
        self.addCleanup(r.stop)
        return r

    def test_list_then_watch(self) -> None:
        self.kube.put(SECRETS, secret("a"))
        r = self.reflector()
        settle(self.clock)
        self.successResultOf(r.synced)
        self.assertEqual(list(r.items), [("ns", "a")])
        self.assertEqual(self.events, [("ADDED", "a")])
        self.kube.put(SECRETS, secret("b"))
        self.kube.put(SECRETS, secret("a", "changed"))
        self.kube.remove(SECRETS, "ns", "b")
        settle(self.clock)
        self.assertEqual(self.events[1:], [("ADDED", "b"), ("MODIFIED", "a"), ("DELETED", "b")])
        self.assertEqual(r.get(("ns", "a"))["data"], {"k": "changed"})
        self.assertEqual(r.resource_version, str(self.kube.last_rv))
        self.assertEqual((r.lists, r.watches), (1, 1))

    def test_pages(self) -> None:
        for i in range(7):
            self.kube.put(SECRETS, secret(f"s{i}"))
        r = self.reflector(page_size=3)
        settle(self.clock)
        self.assertEqual(len(r.items), 7)
        self.assertEqual(self.kube.count("list"), 3)

    def test_selectors_are_sent(self) -> None:
        self.kube.put(SERVICES, {"metadata": {"name": "mine", "namespace": "ns",
                                              "labels": {"app.kubernetes.io/managed-by": "x"}}})
        self.kube.put(SERVICES, {"metadata": {"name": "other", "namespace": "ns"}})
        r = self.reflector(resource=SERVICES, label_selector="app.kubernetes.io/managed-by=x")
        settle(self.clock)
        self.assertEqual(list(r.items), [("ns", "mine")])

    def test_reconnect_resumes_from_last_version(self) -> None:
        self.kube.put(SECRETS, secret("a"))
        r = self.reflector()
        settle(self.clock)
        self.kube.cut_watches()
        self.kube.put(SECRETS, secret("b"))  # happens while we are away
        settle(self.clock, 5)
        self.assertIn(("ns", "b"), r.items)
        self.assertEqual(r.lists, 1, "a resumed watch must not list again")
        self.assertEqual(r.watches, 2)
        self.assertEqual(self.events, [("ADDED", "a"), ("ADDED", "b")])

    def test_bookmark_moves_resource_version(self) -> None:
        self.kube.put(SECRETS, secret("a"))
        r = self.reflector()
        settle(self.clock)
        # Changes to other kinds move the global resourceVersion; a
        # bookmark tells the watch about it.
        self.kube.put(SERVICES, {"metadata": {"name": "x", "namespace": "ns"}})
        self.kube.bookmark()
        settle(self.clock)
        self.assertEqual(r.resource_version, str(self.kube.last_rv))
        # So history up to the bookmark may be compacted without a 410.
        self.kube.compact("secrets")
        self.kube.cut_watches()
        settle(self.clock, 5)
        self.assertEqual(r.lists, 1)
        self.assertEqual(r.watches, 2)

    def test_gone_on_reconnect_lists_again_and_reports_differences(self) -> None:
        for name in ("keep", "change", "drop"):
            self.kube.put(SECRETS, secret(name))
        r = self.reflector()
        settle(self.clock)
        self.kube.cut_watches()
        self.kube.put(SECRETS, secret("change", "new"))
        self.kube.remove(SECRETS, "ns", "drop")
        self.kube.put(SECRETS, secret("new"))
        self.kube.compact("secrets")
        del self.events[:]
        settle(self.clock, 5)
        self.assertEqual(r.lists, 2)
        self.assertEqual(sorted(self.events),
                         [("ADDED", "new"), ("DELETED", "drop"), ("MODIFIED", "change")])
        self.assertEqual(sorted(k[1] for k in r.items), ["change", "keep", "new"])

    def test_gone_error_event_lists_again(self) -> None:
        self.kube.put(SECRETS, secret("a"))
        r = self.reflector()
        settle(self.clock)
        self.kube.expire_watches("secrets")
        settle(self.clock)
        self.assertEqual(r.lists, 2)
        self.assertEqual(self.events, [("ADDED", "a")], "an unchanged relist reports nothing")
        self.kube.put(SECRETS, secret("b"))
        settle(self.clock)
        self.assertIn(("ns", "b"), r.items)

    def test_backoff_is_exponential_and_capped(self) -> None:
        self.kube.go_down()
        times: list[float] = []
        real_list = self.kube.list

        def timed_list(*a: Any, **kw: Any) -> Any:
            times.append(self.clock.seconds())
            return real_list(*a, **kw)
        self.kube.list = timed_list  # type: ignore[method-assign]
        r = self.reflector(backoff=Backoff(initial=1.0, cap=8.0, random=lambda: 0.0))
        settle(self.clock, 40, step=0.5)
        self.assertEqual(times, [0, 1, 3, 7, 15, 23, 31, 39])
        self.assertFalse(r.is_synced)
        # Once back, the next attempt succeeds and the backoff starts over.
        self.kube.come_back()
        settle(self.clock, 8)
        self.assertTrue(r.is_synced)
        self.kube.go_down()
        watches = self.kube.count("watch")
        settle(self.clock, 4, step=0.5)
        # The broken watch had been healthy: retried after 1 s, then 2 s.
        self.assertEqual(self.kube.count("watch") - watches, 2)

    def test_backoff_jitter(self) -> None:
        b = Backoff(initial=1.0, factor=2.0, cap=30.0, jitter=1.0, random=lambda: 0.5)
        self.assertEqual([b.delay() for _ in range(7)], [1.5, 3.0, 6.0, 12.0, 24.0, 45.0, 45.0])
        b.reset()
        self.assertEqual(b.delay(), 1.5)

    def test_keeps_serving_while_away_then_stale(self) -> None:
        self.kube.put(SECRETS, secret("a"))
        states: list[tuple[bool, bool]] = []
        r = self.reflector(stale_after=10.0)
        r.listen_state(lambda r: states.append((r.connected, r.stale)))
        settle(self.clock)
        self.kube.go_down()
        settle(self.clock, 9)
        self.assertFalse(r.stale)
        self.assertIn(("ns", "a"), r.items)
        settle(self.clock, 2)
        self.assertTrue(r.stale)
        self.assertIn(("ns", "a"), r.items, "the last known objects stay readable")
        self.kube.come_back()
        self.kube.put(SECRETS, secret("b"))
        settle(self.clock, 31)
        self.assertFalse(r.stale)
        self.assertIn(("ns", "b"), r.items)
        self.assertEqual(states[-1], (True, False))
        self.assertIn((False, True), states)

    def test_transform(self) -> None:
        self.kube.put(SECRETS, secret("a"))
        r = self.reflector(transform=lambda obj: obj["metadata"]["name"].upper())
        settle(self.clock)
        self.assertEqual(r.get(("ns", "a")), "A")

    def test_stop(self) -> None:
        r = self.reflector()
        settle(self.clock)
        r.stop()
        self.assertEqual(self.kube.watches, [])
        self.kube.put(SECRETS, secret("late"))
        settle(self.clock, 60)
        self.assertNotIn(("ns", "late"), r.items)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class _EmptyWatchClient(MemoryKube):
    """A server that accepts watches and closes them at once, empty."""

    def watch(self, resource: Any, on_event: Any, **kw: Any) -> Any:  # type: ignore[override]
        self.calls.append(("watch", resource.plural))
        w = MemoryWatch(self, resource, on_event, lambda o: True)
        w.done.callback(None)
        return succeed(w)


class EmptyWatchTests(SynchronousTestCase):
    def test_no_spin(self) -> None:
        clock = Clock()
        kube = _EmptyWatchClient(clock)
        r = Reflector(kube, clock, SECRETS, backoff=Backoff(initial=1.0, cap=4.0,
                                                            random=lambda: 0.0))
        r.start()
        self.addCleanup(r.stop)
        settle(clock, 20)
        # 1 + 2 + 4 + 4 + 4 + 4 ... seconds apart, not thousands of watches.
        self.assertLess(kube.count("watch"), 10)
        self.assertGreater(kube.count("watch"), 3)
