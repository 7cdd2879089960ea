"""
Per-Connector concurrency limits: the bookkeeping (with a L{Clock}), the
glue to a request, and a loopback proxy where one Connector is saturated
while another stays fast.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from twisted.web.test.requesthelper import DummyRequest

from connectors_proxy.model.objects import ObjectRef
from connectors_proxy.server import errors
from connectors_proxy.server.limits import RETRY_AFTER, ConcurrencyLimiter, LimitExceeded, Permit, admit

from .support.proxy import basic_secret, connector, connector_class, sa, start_proxy
from .support.waiting import eventually


def _result(d: Deferred[Any]) -> Any:
    """The result of a fired Deferred (its Failure if it failed)."""
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    return box[0]


class LimiterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.limiter = ConcurrencyLimiter(self.clock, max_active=2, max_queue=2, queue_timeout=5.0)

    def test_admits_up_to_the_limit_then_queues_then_refuses(self) -> None:
        permits = [_result(self.limiter.acquire("a")) for _ in range(2)]
        self.assertTrue(all(isinstance(p, Permit) for p in permits))
        queued = [self.limiter.acquire("a") for _ in range(2)]
        self.assertFalse(any(d.called for d in queued))
        refused = _result(self.limiter.acquire("a"))
        self.assertIsInstance(refused, Failure)
        error = refused.value
        self.assertIsInstance(error, LimitExceeded)
        self.assertEqual((error.active, error.waiting, error.timed_out), (2, 2, False))
        lane = self.limiter.lane("a")
        self.assertEqual((lane.active, len(lane.waiting), lane.rejected, lane.queued, lane.admitted),
                         (2, 2, 1, 2, 2))
        for d in queued:
            d.addErrback(lambda f: None)
            d.cancel()

    def test_release_admits_waiters_in_arrival_order(self) -> None:
        first = _result(self.limiter.acquire("a"))
        _result(self.limiter.acquire("a"))
        order: list[str] = []
        one = self.limiter.acquire("a").addCallback(lambda p: order.append("one") or p)
        two = self.limiter.acquire("a").addCallback(lambda p: order.append("two") or p)
        first.release()
        self.assertEqual(order, ["one"])
        self.assertFalse(two.called)
        _result(one).release()
        self.assertEqual(order, ["one", "two"])
        self.assertEqual(self.limiter.lane("a").active, 2)
        # The waiters' timers are gone once they are admitted.
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_release_is_idempotent(self) -> None:
        permit = _result(self.limiter.acquire("a"))
        permit.release()
        permit.release()
        self.assertEqual(self.limiter.lane("a").active, 0)

    def test_queue_timeout(self) -> None:
        for _ in range(2):
            self.limiter.acquire("a")
        waiting = self.limiter.acquire("a")
        self.clock.advance(4.9)
        self.assertFalse(waiting.called)
        self.clock.advance(0.2)
        failure = _result(waiting)
        self.assertIsInstance(failure.value, LimitExceeded)
        self.assertTrue(failure.value.timed_out)
        lane = self.limiter.lane("a")
        self.assertEqual((len(lane.waiting), lane.timed_out), (0, 1))

    def test_cancel_leaves_the_queue(self) -> None:
        for _ in range(2):
            self.limiter.acquire("a")
        waiting = self.limiter.acquire("a")
        waiting.addErrback(lambda f: None)
        waiting.cancel()
        self.assertEqual(len(self.limiter.lane("a").waiting), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_lanes_are_independent(self) -> None:
        for _ in range(2):
            self.limiter.acquire("a")
        for _ in range(2):
            self.limiter.acquire("a").addErrback(lambda f: None)
        self.assertIsInstance(_result(self.limiter.acquire("b")), Permit)

    def test_zero_means_unlimited_but_counted(self) -> None:
        limiter = ConcurrencyLimiter(self.clock, max_active=0, max_queue=0)
        permits = [_result(limiter.acquire("a")) for _ in range(1000)]
        self.assertEqual(limiter.lane("a").active, 1000)
        for p in permits:
            p.release()
        self.assertEqual(limiter.lane("a").active, 0)

    def test_waiter_releasing_at_once(self) -> None:
        """A waiter whose callback releases straight away hands its slot on."""
        first = _result(self.limiter.acquire("a"))
        _result(self.limiter.acquire("a"))
        quick = self.limiter.acquire("a").addCallback(lambda p: p.release())
        later = self.limiter.acquire("a")
        first.release()
        self.assertTrue(quick.called)
        self.assertIsInstance(_result(later), Permit)
        self.assertEqual(self.limiter.lane("a").active, 2)


class FairnessTests(SynchronousTestCase):
    """
    Turns between identities on one lane (max 4 slots, so a share of 2): an
    identity alone may use every slot; once another identity waits, freed
    slots go to the identities in turn and none is admitted past 2.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.limiter = ConcurrencyLimiter(self.clock, max_active=4, max_queue=8, queue_timeout=5.0)
        self.lane = self.limiter.lane("shared")
        self.order: list[str] = []

    def request(self, who: str) -> Deferred[Permit]:
        """Ask for a slot as C{who}; admissions are recorded in C{self.order}."""
        def admitted(permit: Permit) -> Permit:
            self.order.append(who)
            return permit
        return self.limiter.acquire("shared", who).addCallback(admitted)

    def test_alone_an_identity_uses_every_slot(self) -> None:
        requests = [self.request("a") for _ in range(8)]
        self.assertEqual(self.order, ["a"] * 4)
        self.assertEqual((self.lane.held, self.lane.n_waiting), ({"a": 4}, 4))
        # Nobody else waits: its own next request takes the freed slot.
        _result(requests[0]).release()
        self.assertEqual(self.order, ["a"] * 5)
        self.assertEqual(self.lane.held, {"a": 4})
        for d in requests[5:]:
            d.addErrback(lambda f: None).cancel()

    def test_another_identity_gets_the_next_free_slot(self) -> None:
        heavy = [self.request("a") for _ in range(8)]
        light = [self.request("b") for _ in range(2)]
        self.assertEqual(self.lane.held, {"a": 4})
        _result(heavy[0]).release()
        # b's first request, not a's fifth, although a asked first.
        self.assertEqual(self.order[4:], ["b"])
        self.assertEqual(self.lane.held, {"a": 3, "b": 1})
        _result(heavy[1]).release()
        # a holds 2 (its share) and b still waits: b again.
        self.assertEqual(self.order[4:], ["b", "b"])
        self.assertEqual(self.lane.held, {"a": 2, "b": 2})
        # b has nobody waiting any more: a alone may take what b frees.
        _result(light[0]).release()
        self.assertEqual(self.order[4:], ["b", "b", "a"])
        self.assertEqual(self.lane.held, {"a": 3, "b": 1})
        for d in heavy[5:]:
            d.addErrback(lambda f: None).cancel()

    def test_heavy_identity_never_admitted_past_half_while_others_wait(self) -> None:
        held: list[Permit] = []
        over: list[dict[Hashable, int]] = []

        def watch(permit: Permit, who: str) -> Permit:
            others_wait = any(w != who for w in self.lane.turns)
            if others_wait and self.lane.held[who] > self.limiter.share:
                over.append(dict(self.lane.held))
            held.append(permit)
            return permit

        for _ in range(8):
            self.limiter.acquire("shared", "a").addCallback(watch, "a")
        for who in ("b", "c", "b", "c"):
            self.limiter.acquire("shared", who).addCallback(watch, who)
        # Release the oldest permit, one at a time, until everybody is served.
        while held:
            held.pop(0).release()
        self.assertEqual(over, [])
        self.assertEqual((self.lane.active, self.lane.n_waiting, self.lane.held), (0, 0, {}))
        self.assertEqual(self.lane.admitted, 12)

    def test_round_robin(self) -> None:
        limiter = ConcurrencyLimiter(self.clock, max_active=1, max_queue=8)
        first = _result(limiter.acquire("k", "x"))
        order: list[str] = []
        for who in ("a", "a", "a", "b", "b", "c"):
            limiter.acquire("k", who).addCallback(lambda p, who=who: order.append(who) or p.release())
        first.release()
        self.assertEqual(order, ["a", "b", "c", "a", "b", "a"])

    def test_queue_timeout(self) -> None:
        for _ in range(4):
            self.request("a")
        a = self.request("a")
        b = self.request("b")
        self.clock.advance(5.1)
        for d in (a, b):
            failure = _result(d)
            self.assertIsInstance(failure.value, LimitExceeded)
            self.assertTrue(failure.value.timed_out)
        self.assertEqual((self.lane.n_waiting, self.lane.timed_out), (0, 2))
        self.assertEqual((dict(self.lane.queues), list(self.lane.turns)), ({}, []))

    def test_cancelled_waiter_no_longer_holds_back_others(self) -> None:
        heavy = [self.request("a") for _ in range(5)]
        light = self.request("b")
        light.addErrback(lambda f: None)
        light.cancel()
        self.assertEqual((self.lane.n_waiting, list(self.lane.turns)), (1, ["a"]))
        # b is gone: a's fifth request takes the freed slot.
        _result(heavy[0]).release()
        self.assertEqual(self.order, ["a"] * 5)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_full_queue_pushes_out_the_identity_with_most_waiters(self) -> None:
        """
        A queue of 4 filled by one identity: a newcomer takes the place of
        that identity's newest waiter, until every identity has as many as
        the newcomer would; then the newcomer is refused.
        """
        limiter = ConcurrencyLimiter(self.clock, max_active=2, max_queue=4)
        lane = limiter.lane("k")
        for _ in range(2):
            limiter.acquire("k", "a")
        flood = [limiter.acquire("k", "a") for _ in range(4)]
        # Alone, a may fill the queue; its next request is refused.
        own = _result(limiter.acquire("k", "a"))
        self.assertFalse(own.value.displaced)
        b = limiter.acquire("k", "b")
        self.assertFalse(b.called)
        pushed = _result(flood[3])
        self.assertIsInstance(pushed.value, LimitExceeded)
        self.assertEqual((pushed.value.timed_out, pushed.value.displaced), (False, True))
        for who in ("c", "d"):
            self.assertFalse(limiter.acquire("k", who).called)
        self.assertTrue(flood[2].called and flood[1].called)
        self.assertFalse(flood[0].called)
        self.assertEqual({who: len(q) for who, q in lane.queues.items()}, {"a": 1, "b": 1, "c": 1, "d": 1})
        # Everybody has one waiter: a fifth identity is refused, nobody is pushed out.
        refused = _result(limiter.acquire("k", "e"))
        self.assertFalse(refused.value.displaced)
        self.assertEqual((lane.n_waiting, lane.rejected, lane.queued), (4, 5, 7))
        for d in flood[:3]:
            d.addErrback(lambda f: None)

    def test_admit_queues_by_identity(self) -> None:
        """
        L{admit} queues the request as its identity: pushed out of a full
        queue by another identity, it gets a 503 that says why.
        """
        limiter = ConcurrencyLimiter(self.clock, max_active=1, max_queue=2)
        _result(limiter.acquire("k", "a"))
        limiter.acquire("k", "a").addErrback(lambda f: None)
        request = DummyRequest([b""])
        d = Deferred.fromCoroutine(admit(limiter, request, "k", "ns/shared", "a"))
        self.assertEqual({who: len(q) for who, q in limiter.lane("k").queues.items()}, {"a": 2})
        limiter.acquire("k", "b")
        failure = _result(d)
        self.assertEqual(failure.value.status, 503)
        self.assertIn("this client had the most requests", failure.value.message)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"retry-after"), [str(RETRY_AFTER).encode()])
        self.assertEqual({who: len(q) for who, q in limiter.lane("k").queues.items()}, {"a": 1, "b": 1})


class AdmitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.limiter = ConcurrencyLimiter(Clock(), max_active=1, max_queue=1)
        self.key = ObjectRef("ns", "busy")

    def test_slot_released_when_the_response_ends(self) -> None:
        request = DummyRequest([b""])
        _result(Deferred.fromCoroutine(admit(self.limiter, request, self.key, "ns/busy")))
        self.assertEqual(self.limiter.lane(self.key).active, 1)
        request.finish()
        self.assertEqual(self.limiter.lane(self.key).active, 0)

    def test_full_queue_is_503_with_retry_after(self) -> None:
        self.limiter.acquire(self.key)
        self.limiter.acquire(self.key)
        request = DummyRequest([b""])
        failure = _result(Deferred.fromCoroutine(admit(self.limiter, request, self.key, "ns/busy")))
        self.assertIsInstance(failure.value, errors.ProxyError)
        self.assertEqual(failure.value.status, 503)
        self.assertIn("ns/busy is busy", failure.value.message)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"retry-after"), [str(RETRY_AFTER).encode()])

    def test_client_leaving_the_queue(self) -> None:
        self.limiter.acquire(self.key)
        request = DummyRequest([b""])
        d = Deferred.fromCoroutine(admit(self.limiter, request, self.key, "ns/busy"))
        self.assertEqual(len(self.limiter.lane(self.key).waiting), 1)
        request.processingFailed(Failure(ConnectionError("gone")))
        failure = _result(d)
        self.assertEqual(failure.value.status, 499)
        self.assertEqual(len(self.limiter.lane(self.key).waiting), 0)


class Held(Resource):
    """An upstream whose responses wait until the test releases them."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[Any] = []

    def render_GET(self, request: Any) -> Any:
        if request.path.endswith(b"/slow"):
            self.waiting.append(request)
            return NOT_DONE_YET
        return b"fast\n"

    def release_all(self) -> None:
        waiting, self.waiting = self.waiting, []
        for request in waiting:
            request.write(b"slow\n")
            request.finish()


class NoisyNeighbourTests(TestCase):
    timeout = 60

    async def _setup(self) -> tuple[Any, Held]:
        upstream = Held()
        port = reactor.listenTCP(0, Site(upstream), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(upstream.release_all)
        address = f"http://127.0.0.1:{port.getHost().port}"
        token = "t-" + self.id()
        proxy = await start_proxy(self, [
            connector_class("rest"),
            basic_secret("team", "creds", "u", "p"),
            connector("team", "noisy", "rest", address, secret="creds"),
            connector("team", "quiet", "rest", address, secret="creds"),
        ], {token: sa("team")})
        proxy.root.limiter = ConcurrencyLimiter(reactor, max_active=2, max_queue=2, queue_timeout=30.0)
        self.headers = {"Authorization": f"Bearer {token}"}
        return proxy, upstream

    def test_busy_connector_refuses_past_its_queue_while_another_stays_fast(self) -> Deferred[None]:
        async def run() -> None:
            proxy, upstream = await self._setup()
            lane = proxy.root.limiter.lane(ObjectRef("team", "noisy"))
            held = [treq.get(proxy.path_url("team", "noisy", "/slow"), headers=self.headers, persistent=False)
                    for _ in range(4)]
            await eventually(lambda: len(upstream.waiting) == 2 and len(lane.waiting) == 2)

            refused = await treq.get(proxy.path_url("team", "noisy", "/slow"), headers=self.headers,
                                     persistent=False)
            self.assertEqual(refused.code, 503)
            self.assertEqual(refused.headers.getRawHeaders(b"retry-after"), [b"1"])
            self.assertIn(b"team/noisy is busy", await refused.content())

            started = time.monotonic()
            quick = await treq.get(proxy.path_url("team", "quiet", "/fast"), headers=self.headers,
                                   persistent=False)
            self.assertEqual((quick.code, await quick.content()), (200, b"fast\n"))
            self.assertLess(time.monotonic() - started, 1.0)

            # Released, the running two finish and the queued two get their turn.
            upstream.release_all()
            await eventually(lambda: len(upstream.waiting) == 2)
            upstream.release_all()
            responses = await gatherResults(held)
            self.assertEqual([r.code for r in responses], [200] * 4)
            self.assertEqual([await r.content() for r in responses], [b"slow\n"] * 4)
            await eventually(lambda: lane.active == 0)
            self.assertEqual((lane.admitted, lane.rejected), (4, 1))

        return Deferred.fromCoroutine(run())
