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
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from connectors_proxy.interfaces import Identity, IIdentityVerifier
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
