"""
Cluster-mode identity: TokenReview and SubjectAccessReview answers, cached
per period, shared while in flight, keyed without the raw token, and API
server failures reported as "unavailable" (503), never as "invalid" (401).
"""

from __future__ import annotations

import secrets
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from connectors_proxy.auth.interfaces import Identity, IIdentityVerifier
from connectors_proxy.kube.client import KubeError
from connectors_proxy.kube.identity import KubeIdentityVerifier, ReviewUnavailable, token_key

from .test_kube_memory import MemoryKube

USER = {"username": "system:serviceaccount:team:builder", "uid": "u-1",
        "groups": ["system:serviceaccounts", "system:serviceaccounts:team"]}


class _Held(MemoryKube):
    """Reviews wait until the test releases them, to see concurrent callers."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.held: list[tuple[Deferred[Any], Deferred[Any]]] = []

    def create_token_review(self, token: str, audiences: tuple[str, ...] = ()) -> Deferred[Any]:
        inner = super().create_token_review(token, audiences)
        outer: Deferred[Any] = Deferred()
        self.held.append((inner, outer))
        return outer

    def release(self) -> None:
        for inner, outer in self.held:
            inner.chainDeferred(outer)
        self.held = []


class IdentityTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.kube = MemoryKube(self.clock)
        self.token = secrets.token_hex(16)
        self.kube.tokens[self.token] = USER
        self.verifier = KubeIdentityVerifier(self.kube, self.clock, ttl=10.0, negative_ttl=5.0)

    def test_interface(self) -> None:
        verifyObject(IIdentityVerifier, self.verifier)

    def test_authenticate(self) -> None:
        identity = self.successResultOf(self.verifier.authenticate(self.token))
        self.assertEqual(identity, Identity("system:serviceaccount:team:builder", "u-1",
                                            ("system:serviceaccounts",
                                             "system:serviceaccounts:team")))
        self.assertIsNone(self.successResultOf(self.verifier.authenticate("wrong")))

    def test_authorize_sends_the_right_review(self) -> None:
        seen: list[dict[str, Any]] = []
        self.kube.allow = lambda spec: seen.append(spec) or True  # type: ignore[func-returns-value]
        identity = self.successResultOf(self.verifier.authenticate(self.token))
        self.assertTrue(self.successResultOf(self.verifier.authorize(identity, "team", "harbor")))
        self.assertEqual(seen, [{
            "user": "system:serviceaccount:team:builder", "uid": "u-1",
            "groups": ["system:serviceaccounts", "system:serviceaccounts:team"],
            "resourceAttributes": {"namespace": "team", "verb": "get",
                                   "group": "connectors.alauda.io", "resource": "connectors",
                                   "name": "harbor"}}])

    def test_denied(self) -> None:
        self.kube.allow = lambda spec: spec["resourceAttributes"]["namespace"] == "team"
        identity = self.successResultOf(self.verifier.authenticate(self.token))
        self.assertTrue(self.successResultOf(self.verifier.authorize(identity, "team", "a")))
        self.assertFalse(self.successResultOf(self.verifier.authorize(identity, "other", "a")))

    def test_thousand_requests_one_review_each_per_period(self) -> None:
        for _ in range(1000):
            identity = self.successResultOf(self.verifier.authenticate(self.token))
            self.assertTrue(self.successResultOf(
                self.verifier.authorize(identity, "team", "harbor")))
            self.clock.advance(0.009)  # 1,000 requests over 9 s, inside one period
        self.assertEqual(self.kube.count("tokenreview"), 1)
        self.assertEqual(self.kube.count("subjectaccessreview"), 1)
        self.assertEqual(self.verifier.tokens.hits, 999)
        self.assertEqual(self.verifier.access.hits, 999)
        # The next period costs one more of each.
        self.clock.advance(1.5)
        identity = self.successResultOf(self.verifier.authenticate(self.token))
        self.successResultOf(self.verifier.authorize(identity, "team", "harbor"))
        self.assertEqual(self.kube.count("tokenreview"), 2)
        self.assertEqual(self.kube.count("subjectaccessreview"), 2)

    def test_invalid_tokens_cached_briefly(self) -> None:
        for _ in range(10):
            self.assertIsNone(self.successResultOf(self.verifier.authenticate("bad")))
        self.assertEqual(self.kube.count("tokenreview"), 1)
        self.clock.advance(5.1)
        self.successResultOf(self.verifier.authenticate("bad"))
        self.assertEqual(self.kube.count("tokenreview"), 2)

    def test_concurrent_reviews_are_shared(self) -> None:
        kube = _Held(self.clock)
        kube.tokens[self.token] = USER
        verifier = KubeIdentityVerifier(kube, self.clock)
        pending = [verifier.authenticate(self.token) for _ in range(50)]
        other = verifier.authenticate("other-token")
        self.assertEqual(len(kube.held), 2)
        for d in pending:
            self.assertNoResult(d)
        kube.release()
        results = {self.successResultOf(d) for d in pending}
        self.assertEqual(len(results), 1)
        self.assertIsNone(self.successResultOf(other))

    def test_junk_tokens_cannot_flood_the_api_server(self) -> None:
        kube = _Held(self.clock)
        verifier = KubeIdentityVerifier(kube, self.clock, max_in_flight=8)
        pending = [verifier.authenticate(f"junk-{i}") for i in range(20)]
        self.assertEqual(len(kube.held), 8)
        for d in pending[8:]:
            self.failureResultOf(d, ReviewUnavailable)
        self.assertIsNone(self.successResultOf(verifier.authenticate("x" * 20000)))  # no review at all
        self.assertEqual(len(kube.held), 8)
        kube.release()
        for d in pending[:8]:
            self.assertIsNone(self.successResultOf(d))
        self.assertEqual(verifier.in_flight, 0)

    def test_api_server_errors_are_unavailable_not_invalid(self) -> None:
        self.kube.go_down()
        failure = self.failureResultOf(self.verifier.authenticate(self.token), ReviewUnavailable)
        self.assertIn("TokenReview", str(failure.value))
        self.kube.come_back()
        self.kube.fail["tokenreview"] = [KubeError(500, "InternalError", "boom")]
        self.failureResultOf(self.verifier.authenticate(self.token), ReviewUnavailable)
        # Failures are not cached: the next request asks again.
        self.assertIsNotNone(self.successResultOf(self.verifier.authenticate(self.token)))
        identity = Identity("system:serviceaccount:team:builder")
        self.kube.fail["subjectaccessreview"] = [KubeError(503, "ServiceUnavailable", "x")]
        self.failureResultOf(self.verifier.authorize(identity, "team", "a"), ReviewUnavailable)

    def test_token_never_in_keys_or_logs(self) -> None:
        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        self.successResultOf(self.verifier.authenticate(self.token))
        token2 = secrets.token_hex(16)
        # An API server that echoes the token in its error.
        self.kube.fail["tokenreview"] = [KubeError(400, "BadRequest", f"bad token {token2}")]
        self.failureResultOf(self.verifier.authenticate(token2), ReviewUnavailable)
        self.kube.fail["tokenreview"] = [ConnectionRefusedError()]
        self.failureResultOf(self.verifier.authenticate(token2), ReviewUnavailable)
        keys = " ".join(map(str, self.verifier.tokens._entries))
        self.assertIn(token_key(self.token), keys)
        for token in (self.token, token2):
            self.assertNotIn(token, keys)
            self.assertNotIn(token, repr(logged))
        self.assertTrue(logged, "the failures were logged")

    def test_proxy_subresource(self) -> None:
        verifier = KubeIdentityVerifier(self.kube, self.clock, proxy_subresource=True)
        seen: list[Any] = []

        def allow(spec: dict[str, Any]) -> bool:
            seen.append(spec["resourceAttributes"].get("subresource"))
            return spec["resourceAttributes"].get("subresource") != "proxy" or \
                spec["resourceAttributes"]["name"] == "open"
        self.kube.allow = allow
        identity = Identity("system:serviceaccount:team:builder")
        self.assertFalse(self.successResultOf(verifier.authorize(identity, "team", "closed")))
        self.assertTrue(self.successResultOf(verifier.authorize(identity, "team", "open")))
        self.assertEqual(seen, [None, "proxy", None, "proxy"])

    def test_audiences(self) -> None:
        verifier = KubeIdentityVerifier(self.kube, self.clock, audiences=("connectors-proxy",))
        self.assertIsNotNone(self.successResultOf(verifier.authenticate(self.token)))
        # A server that answers with other audiences than asked is not trusted.
        real = self.kube.create_token_review

        def other_audience(token: str, audiences: tuple[str, ...] = ()) -> Any:
            d = real(token, audiences)
            d.addCallback(lambda status: dict(status, audiences=["https://kubernetes"]))
            return d
        self.kube.create_token_review = other_audience  # type: ignore[method-assign]
        fresh = KubeIdentityVerifier(self.kube, self.clock, audiences=("connectors-proxy",))
        self.assertIsNone(self.successResultOf(fresh.authenticate(self.token)))

    def test_cache_is_bounded(self) -> None:
        verifier = KubeIdentityVerifier(self.kube, self.clock)
        verifier.tokens.max_entries = 100
        for i in range(1000):
            self.successResultOf(verifier.authenticate(f"t{i}"))
        self.assertLessEqual(len(verifier.tokens._entries), 100)


class _Hung(MemoryKube):
    """An API server that accepts review calls and never answers (SIGSTOPped)."""

    hung = False

    def create_token_review(self, token: str, audiences: tuple[str, ...] = ()) -> Deferred[Any]:
        if self.hung:
            self.calls.append(("tokenreview", "tokenreviews"))
            return Deferred()
        return super().create_token_review(token, audiences)

    def create_subject_access_review(self, spec: dict[str, Any]) -> Deferred[Any]:
        if self.hung:
            self.calls.append(("subjectaccessreview", "subjectaccessreviews"))
            return Deferred()
        return super().create_subject_access_review(spec)


class OutageTests(SynchronousTestCase):
    """
    Reviews during an API server outage: the last answers served up to the
    staleness bound, never an error answer or a denial turned into an allow,
    a short timeout, a circuit, and one log line each way.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.kube = _Hung(self.clock)
        self.token = secrets.token_hex(16)
        self.kube.tokens[self.token] = USER
        self.verifier = KubeIdentityVerifier(self.kube, self.clock, ttl=10.0, negative_ttl=5.0,
                                             stale=60.0, timeout=3.0, stale_after=20.0)
        self.logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.logged if e.get("event") == name]

    def request(self) -> bool:
        """One request's reviews: True when it would be served, False when refused (401/403/503)."""
        d = self.verifier.authenticate(self.token)
        results: list[Any] = []
        d.addBoth(results.append)
        if not results or not isinstance(results[0], Identity):
            if results and not isinstance(results[0], Identity | None):
                results[0].trap(ReviewUnavailable)
            return False
        allowed: list[Any] = []
        self.verifier.authorize(results[0], "team", "harbor").addBoth(allowed.append)
        if allowed and not isinstance(allowed[0], bool):
            allowed[0].trap(ReviewUnavailable)
            return False
        return bool(allowed and allowed[0])

    def test_refused_api_server_served_within_the_bound(self) -> None:
        self.assertTrue(self.request())
        self.kube.go_down()
        served = refused = 0
        for _ in range(90):  # one request a second for 90 s
            self.clock.advance(1)
            if self.request():
                served += 1
            else:
                refused += 1
        # Answers obtained at t=0 are served until t=60, then refused.
        self.assertEqual((served, refused), (60, 30))
        self.assertEqual(len(self.events("reviews-stale")), 1)
        self.assertTrue(self.verifier.is_stale)
        # The circuit keeps calls to the dead API server far below one per request.
        self.assertLess(self.kube.count("tokenreview") + self.kube.count("subjectaccessreview"), 40)
        self.kube.come_back()
        self.clock.advance(11)  # past the circuit's longest backoff
        self.assertTrue(self.request())
        [recovered] = self.events("reviews-recovered")
        # t=10..60 served stale (two reviews each; before that the answers were fresh).
        self.assertEqual((recovered["stale"], recovered["refused"]), (102, 30))
        self.assertFalse(self.verifier.is_stale)
        self.assertEqual(len(self.events("reviews-stale")), 1)
        self.assertFalse([e for e in self.logged if e.get("log_failure")], "no traceback")

    def test_hung_api_server_times_out_then_fails_fast(self) -> None:
        self.assertTrue(self.request())
        self.clock.advance(11)
        self.kube.hung = True
        other = self.verifier.authenticate("never-seen")
        d = self.verifier.authenticate(self.token)
        self.assertNoResult(d)
        self.clock.advance(3)  # the review's own timeout, not the client's 30 s
        self.assertIsInstance(self.successResultOf(d), Identity)
        self.failureResultOf(other, ReviewUnavailable)
        self.assertTrue(self.verifier.circuit.is_open)
        calls = len(self.kube.calls)
        # While open, nothing waits and nothing is sent.
        for _ in range(50):
            self.assertIsInstance(self.successResultOf(self.verifier.authenticate(self.token)), Identity)
            self.failureResultOf(self.verifier.authenticate("never-seen"), ReviewUnavailable)
        self.assertEqual(len(self.kube.calls), calls)
        # After the backoff, one trial call at a time.
        self.clock.advance(1)
        for _ in range(5):
            self.successResultOf(self.verifier.authenticate(self.token))
        self.assertEqual(len(self.kube.calls), calls + 1)
        self.kube.hung = False
        self.clock.advance(3)
        self.clock.advance(2)
        self.successResultOf(self.verifier.authenticate(self.token))
        self.assertIsNone(self.verifier.outage_since)
        self.assertEqual(len(self.events("reviews-recovered")), 1)

    def test_denials_and_invalid_tokens_never_become_allows(self) -> None:
        self.kube.allow = lambda spec: False
        identity = self.successResultOf(self.verifier.authenticate(self.token))
        self.assertFalse(self.successResultOf(self.verifier.authorize(identity, "team", "harbor")))
        self.assertIsNone(self.successResultOf(self.verifier.authenticate("bad")))
        self.kube.go_down()
        for _ in range(70):
            self.clock.advance(1)
            for d in (self.verifier.authorize(identity, "team", "harbor"), self.verifier.authenticate("bad")):
                result: list[Any] = []
                d.addBoth(result.append)
                if isinstance(result[0], Failure):
                    result[0].trap(ReviewUnavailable)
                else:
                    self.assertIn(result[0], (False, None))

    def test_answers_are_not_outages(self) -> None:
        self.assertTrue(self.request())
        self.clock.advance(11)
        # The API server answers with an error: no stale answer, no outage.
        self.kube.fail["tokenreview"] = [KubeError(500, "InternalError", "boom"), KubeError(403, "Forbidden", "no")]
        for _ in range(2):
            failure = self.failureResultOf(self.verifier.authenticate(self.token), ReviewUnavailable)
            self.assertFalse(failure.value.outage)
        self.assertIsNone(self.verifier.outage_since)
        self.assertFalse(self.verifier.circuit.is_open)
        # A gateway saying the API server is away is one.
        self.kube.fail["tokenreview"] = [KubeError(503, "ServiceUnavailable", "etcd")]
        self.assertIsInstance(self.successResultOf(self.verifier.authenticate(self.token)), Identity)
        self.assertIsNotNone(self.verifier.outage_since)

    def test_review_errors_warned_once_per_change(self) -> None:
        """
        An error answer (the proxy's own RBAC refusing its reviews) fails
        every request until it is fixed, but is warned once, not per
        request; a different error is warned once more, and so is the
        recovery.  Each kind of review has its own: a working TokenReview
        does not end a failing SubjectAccessReview's error.
        """
        def warnings() -> list[str]:
            return [formatEvent(e) for e in self.logged if e.get("log_level") == LogLevel.warn]

        forbidden = 'tokenreviews.authentication.k8s.io is forbidden: User "system:serviceaccount:cp:proxy" cannot'
        self.kube.fail["tokenreview"] = [KubeError(403, "Forbidden", forbidden) for _ in range(50)]
        for _ in range(50):
            self.clock.advance(1)
            self.assertFalse(self.request())
        self.assertEqual(warnings(), [f"TokenReview failed: 403 Forbidden: {forbidden}"])
        self.kube.fail["tokenreview"] = [KubeError(500, "InternalError", "boom") for _ in range(10)]
        for _ in range(10):
            self.assertFalse(self.request())
        self.assertEqual(len(warnings()), 2)
        self.assertEqual(warnings()[1], "TokenReview failed: 500 InternalError: boom")
        # TokenReviews work again, SubjectAccessReviews are refused.
        self.kube.fail["subjectaccessreview"] = [KubeError(403, "Forbidden", "no") for _ in range(20)]
        for _ in range(20):
            self.clock.advance(11)  # past the cached answers
            self.assertFalse(self.request())
        self.assertEqual(warnings()[2:], ["TokenReview answers again (60 calls failed since the first error)",
                                          "SubjectAccessReview failed: 403 Forbidden: no"])
        self.clock.advance(11)
        self.assertTrue(self.request())
        self.assertEqual(warnings()[4:], ["SubjectAccessReview answers again (20 calls failed since the first error)"])
        self.assertIsNone(self.verifier.outage_since)

    def test_readiness_follows_a_long_outage(self) -> None:
        changes: list[bool] = []
        self.verifier.on_stale_change.append(lambda: changes.append(self.verifier.is_stale))
        self.assertTrue(self.request())
        self.kube.go_down()
        self.clock.advance(11)
        self.request()
        self.assertFalse(self.verifier.is_stale)
        self.clock.advance(20)
        self.assertEqual(changes, [True])
        self.kube.come_back()
        self.clock.advance(11)
        self.request()
        self.assertEqual(changes, [True, False])

    def test_no_staleness_when_disabled(self) -> None:
        verifier = KubeIdentityVerifier(self.kube, self.clock, stale=0.0)
        self.successResultOf(verifier.authenticate(self.token))
        self.clock.advance(11)
        self.kube.go_down()
        self.failureResultOf(verifier.authenticate(self.token), ReviewUnavailable)
