"""Tests for L{connectors_proxy.protocols.oci.tokens}: the token cache."""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from connectors_proxy.protocols.oci.auth import IssuedToken, RegistryCredentials
from connectors_proxy.protocols.oci.tokens import SingleFlight, TokenCache, TokenKey, fingerprint

KEY = TokenKey("default/harbor", "http://t/token", "reg", "repository:a:pull", "fp")


class Realm:
    """A fake realm: each fetch is a Deferred the test fires."""

    def __init__(self) -> None:
        self.pending: list[Deferred[IssuedToken]] = []
        self.count = 0

    def fetch(self) -> Deferred[IssuedToken]:
        self.count += 1
        d: Deferred[IssuedToken] = Deferred()
        self.pending.append(d)
        return d


class TokenCacheTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.cache = TokenCache(self.clock)
        self.realm = Realm()

    def test_concurrent_requests_share_one_fetch(self) -> None:
        results = [self.later(self.cache.get(KEY, self.realm.fetch)) for _ in range(10)]
        self.assertEqual(self.realm.count, 1)
        self.realm.pending[0].callback(IssuedToken("tok1", 300))
        self.assertEqual([r() for r in results], ["tok1"] * 10)
        # Cached now: no new fetch.
        self.assertEqual(self.successResultOf(self.cache.get(KEY, self.realm.fetch)), "tok1")
        self.assertEqual(self.realm.count, 1)
        self.assertEqual(self.cache.fetches, 1)

    def later(self, d: Deferred[str]):  # type: ignore[no-untyped-def]
        box: list[str] = []
        d.addCallback(box.append)
        return lambda: box[0]

    def test_metrics_hooks(self) -> None:
        events: list[tuple[str, ...]] = []
        self.cache.on_hit = lambda connector: events.append(("hit", connector))
        self.cache.on_request = lambda connector, ok: events.append(("request", connector, str(ok)))
        d = self.cache.get(KEY, self.realm.fetch)
        self.realm.pending[0].callback(IssuedToken("tok1", 300))
        self.successResultOf(d)
        self.successResultOf(self.cache.get(KEY, self.realm.fetch))
        other = TokenKey("default/harbor", "http://t/token", "reg", "repository:b:pull", "fp")
        failed = self.cache.get(other, self.realm.fetch)
        self.realm.pending[1].errback(RuntimeError("realm down"))
        self.failureResultOf(failed, RuntimeError)
        self.assertEqual(events, [("request", "default/harbor", "True"), ("hit", "default/harbor"),
                                  ("request", "default/harbor", "False")])

    def test_expiry_with_margin(self) -> None:
        d = self.cache.get(KEY, self.realm.fetch)
        self.realm.pending[0].callback(IssuedToken("tok1", 300))
        self.assertEqual(self.successResultOf(d), "tok1")
        # 300 s tokens are used until 10 s (the maximum margin) before expiry.
        self.clock.advance(289)
        self.assertEqual(self.cache.cached(KEY), "tok1")
        self.clock.advance(2)
        self.assertIsNone(self.cache.cached(KEY))
        d = self.cache.get(KEY, self.realm.fetch)
        self.assertEqual(self.realm.count, 2)
        self.realm.pending[1].callback(IssuedToken("tok2", 20))
        self.assertEqual(self.successResultOf(d), "tok2")
        # A 20 s token: 10% margin.
        self.clock.advance(17.9)
        self.assertEqual(self.cache.cached(KEY), "tok2")
        self.clock.advance(0.2)
        self.assertIsNone(self.cache.cached(KEY))

    def test_keys_are_separate(self) -> None:
        other = TokenKey("default/harbor", "http://t/token", "reg", "repository:a:pull,push", "fp")
        self.cache.get(KEY, self.realm.fetch)
        self.cache.get(other, self.realm.fetch)
        self.assertEqual(self.realm.count, 2)

    def test_failure_is_shared_and_not_cached(self) -> None:
        d1 = self.cache.get(KEY, self.realm.fetch)
        d2 = self.cache.get(KEY, self.realm.fetch)
        self.realm.pending[0].errback(ValueError("realm down"))
        self.failureResultOf(d1, ValueError)
        self.failureResultOf(d2, ValueError)
        d3 = self.cache.get(KEY, self.realm.fetch)
        self.assertEqual(self.realm.count, 2)
        self.realm.pending[1].callback(IssuedToken("tok", 60))
        self.assertEqual(self.successResultOf(d3), "tok")

    def test_fetch_raising(self) -> None:
        def boom() -> Deferred[IssuedToken]:
            raise RuntimeError("no")
        self.failureResultOf(self.cache.get(KEY, boom), RuntimeError)
        self.assertFalse(self.cache._flights.running(KEY))

    def test_cancel_one_waiter(self) -> None:
        d1 = self.cache.get(KEY, self.realm.fetch)
        d2 = self.cache.get(KEY, self.realm.fetch)
        d1.cancel()
        self.failureResultOf(d1, CancelledError)
        self.realm.pending[0].callback(IssuedToken("tok", 60))
        self.assertEqual(self.successResultOf(d2), "tok")
        self.assertEqual(self.cache.cached(KEY), "tok")

    def test_cancel_every_waiter_still_caches(self) -> None:
        d1 = self.cache.get(KEY, self.realm.fetch)
        d1.cancel()
        self.failureResultOf(d1, CancelledError)
        self.realm.pending[0].callback(IssuedToken("tok", 60))
        self.assertEqual(self.cache.cached(KEY), "tok")

    def test_invalidate_only_the_stale_token(self) -> None:
        d = self.cache.get(KEY, self.realm.fetch)
        self.realm.pending[0].callback(IssuedToken("old", 300))
        self.successResultOf(d)
        # Two requests got 401 with "old": the first invalidates and refetches...
        self.cache.invalidate(KEY, "old")
        d = self.cache.get(KEY, self.realm.fetch)
        self.realm.pending[1].callback(IssuedToken("new", 300))
        self.successResultOf(d)
        # ...the second's invalidate of "old" must not throw "new" away.
        self.cache.invalidate(KEY, "old")
        self.assertEqual(self.cache.cached(KEY), "new")
        self.assertEqual(self.realm.count, 2)

    def test_bounded(self) -> None:
        cache = TokenCache(self.clock, max_entries=3)
        for i in range(5):
            key = TokenKey("c", "r", "s", f"scope{i}")
            d = cache.get(key, lambda i=i: Deferred.fromCoroutine(_issued(f"t{i}")))
            self.successResultOf(d)
        self.assertEqual(len(cache._tokens), 3)
        self.assertEqual(cache.cached(TokenKey("c", "r", "s", "scope4")), "t4")
        self.assertIsNone(cache.cached(TokenKey("c", "r", "s", "scope0")))

    def test_fingerprint(self) -> None:
        a = fingerprint(RegistryCredentials("u", "canary-password"))
        self.assertNotIn("canary", a)
        self.assertNotEqual(a, fingerprint(RegistryCredentials("u", "other")))
        self.assertEqual(a, fingerprint(RegistryCredentials("u", "canary-password")))
        self.assertEqual(fingerprint(None), "anonymous")


async def _issued(value: str) -> IssuedToken:
    return IssuedToken(value, 60)


class SingleFlightTests(SynchronousTestCase):
    def test_shared_and_forgotten(self) -> None:
        flights: SingleFlight[str, int] = SingleFlight()
        pending: list[Deferred[int]] = []

        def work() -> Deferred[int]:
            d: Deferred[int] = Deferred()
            pending.append(d)
            return d

        a, b = flights.run("k", work), flights.run("k", work)
        other = flights.run("other", work)
        self.assertEqual(len(pending), 2)
        self.assertTrue(flights.running("k"))
        pending[0].callback(7)
        self.assertEqual((self.successResultOf(a), self.successResultOf(b)), (7, 7))
        self.assertFalse(flights.running("k"))
        self.assertNoResult(other)
        # Done work is not remembered: the next call works again.
        flights.run("k", work)
        self.assertEqual(len(pending), 3)
