"""
Lease leader election on a L{Clock}: one leader at a time, a crashed
holder replaced within the lease duration (plus the retry periods), a
clean hand-over on release, and a leader that cannot renew steps down.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from connectors_proxy.kube.client import LEASES
from connectors_proxy.kube.leader import LeaderElector, format_micro_time

from .test_kube_memory import MemoryKube, settle


class LeaderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.kube = MemoryKube(self.clock)
        self.timeline: list[tuple[float, str, bool]] = []

    def elector(self, identity: str, **kw: Any) -> LeaderElector:
        e = LeaderElector(self.kube, self.clock, "connectors-system", "connectors-proxy",
                          identity, random=lambda: 0.0, **kw)
        e.on_change(lambda leader: self.timeline.append((self.clock.seconds(), identity, leader)))
        e.start()
        self.addCleanup(e.stop, release=False)
        return e

    def lease(self) -> dict[str, Any]:
        return self.kube.objects["leases"][("connectors-system", "connectors-proxy")]["spec"]

    def leaders(self, *electors: LeaderElector) -> list[str]:
        return [e.identity for e in electors if e.is_leader]

    def test_first_elector_creates_the_lease(self) -> None:
        a = self.elector("a")
        settle(self.clock)
        self.assertTrue(a.is_leader)
        spec = self.lease()
        self.assertEqual(spec["holderIdentity"], "a")
        self.assertEqual(spec["leaseDurationSeconds"], 15)
        self.assertEqual(spec["leaseTransitions"], 0)
        self.assertEqual(spec["acquireTime"], format_micro_time(self.clock.seconds()))
        self.assertEqual(spec["renewTime"], spec["acquireTime"])

    def test_renews(self) -> None:
        self.elector("a")
        settle(self.clock)
        acquired = self.lease()["acquireTime"]
        settle(self.clock, 10)
        spec = self.lease()
        self.assertEqual(spec["acquireTime"], acquired)
        self.assertNotEqual(spec["renewTime"], acquired)
        self.assertGreaterEqual(self.kube.count("replace", "leases"), 4)

    def test_one_leader_and_crash_hand_over(self) -> None:
        a = self.elector("a")
        settle(self.clock)
        b = self.elector("b")
        for _ in range(30):
            settle(self.clock, 1)
            self.assertEqual(self.leaders(a, b), ["a"])
        last_renew = self.clock.seconds()
        a.stop(release=False)  # a crash: no release
        settle(self.clock, 1)
        self.assertEqual(self.leaders(a, b), [])
        while not b.is_leader:
            settle(self.clock, 0.5)
            self.assertLess(self.clock.seconds() - last_renew, 60)
        # Within the lease duration plus two retry periods of the last renewal.
        self.assertLessEqual(self.clock.seconds() - last_renew, 15 + 2 * 2 + 0.5)
        self.assertGreaterEqual(self.clock.seconds() - last_renew, 15 - 2)
        spec = self.lease()
        self.assertEqual(spec["holderIdentity"], "b")
        self.assertEqual(spec["leaseTransitions"], 1)
        # Never two leaders at once.
        leading: set[str] = set()
        for _, who, leader in self.timeline:
            (leading.add if leader else leading.discard)(who)
            self.assertLessEqual(len(leading), 1)

    def test_release_hands_over_quickly(self) -> None:
        a = self.elector("a")
        settle(self.clock)
        b = self.elector("b")
        settle(self.clock, 3)
        self.successResultOf(a.stop())
        self.assertEqual(self.lease()["holderIdentity"], "")
        released = self.clock.seconds()
        while not b.is_leader:
            settle(self.clock, 0.1)
        self.assertLessEqual(self.clock.seconds() - released, 2 * 2.2 + 0.2)

    def test_leader_that_cannot_renew_steps_down(self) -> None:
        a = self.elector("a")
        settle(self.clock)
        self.kube.go_down()
        settle(self.clock, 9)
        self.assertTrue(a.is_leader)
        settle(self.clock, 2)
        self.assertFalse(a.is_leader)
        self.assertEqual(self.timeline[-1][1:], ("a", False))
        self.kube.come_back()
        settle(self.clock, 5)
        self.assertTrue(a.is_leader, "its own lease: it takes it again")

    def test_leader_that_sees_another_holder_steps_down(self) -> None:
        a = self.elector("a")
        settle(self.clock)
        obj = self.kube.objects["leases"][("connectors-system", "connectors-proxy")]
        self.kube.put(LEASES, dict(obj, spec=dict(obj["spec"], holderIdentity="intruder")))
        settle(self.clock, 2.5)
        self.assertFalse(a.is_leader)

    def test_simultaneous_start(self) -> None:
        electors = [self.elector(name) for name in "abc"]
        settle(self.clock, 5)
        self.assertEqual(len(self.leaders(*electors)), 1)


class MicroTimeTests(SynchronousTestCase):
    def test_format(self) -> None:
        self.assertEqual(format_micro_time(0.5), "1970-01-01T00:00:00.500000Z")
        self.assertEqual(format_micro_time(1.9999999), "1970-01-01T00:00:02.000000Z")
