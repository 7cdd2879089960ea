# -*- test-case-name: tests.test_kube_identity -*-
"""
Cluster-mode client identity: L{IIdentityVerifier} answered by the API
server (TokenReview, then SubjectAccessReview), with short-lived caches.

  - Both answers are cached for C{ttl} seconds (failed logins and denials
    for C{negative_ttl}), so a workload sending a steady stream of requests
    costs one review of each kind per period, not one per request.
  - Concurrent requests that need the same answer share one review.
  - The token cache is keyed by a SHA-256 of the token: no raw client token
    is kept as a key or written to a log.
  - When the API server cannot answer, the Deferred fails with
    L{ReviewUnavailable} (the HTTP layer answers 503: a client must not be
    told its token is bad because the API server was restarting).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

from attrs import define, field
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel
from zope.interface import implementer

from ..identity import token_digest
from ..interfaces import Identity, IIdentityVerifier
from .client import IKubeClient, KubeError

log = Logger()

T = TypeVar("T")


class ReviewUnavailable(Exception):
    """The API server could not answer a review; the request gets a 503."""


# ServiceAccount tokens are JWTs of a few hundred bytes to a few KiB.
MAX_TOKEN_LENGTH = 16 * 1024


def token_key(token: str) -> str:
    """The cache key for a token: its SHA-256, never the token itself."""
    return token_digest(token).hex()


@define
class _Entry:
    value: Any
    expires: float


@define
class ReviewCache:
    """
    Answers by key with expiry, and one shared lookup per key in flight.

    @ivar hits: answers served from the cache (or a shared lookup).
    @ivar misses: lookups started.
    """

    clock: IReactorTime
    max_entries: int = 50_000
    hits: int = 0
    misses: int = 0
    _entries: dict[Hashable, _Entry] = field(factory=dict)
    _waiting: dict[Hashable, list[Deferred[Any]]] = field(factory=dict)

    def get(self, key: Hashable, lookup: Callable[[], Awaitable[T]],
            ttl: Callable[[T], float]) -> Deferred[T]:
        now = self.clock.seconds()
        entry = self._entries.get(key)
        if entry is not None:
            if entry.expires > now:
                self.hits += 1
                return succeed(entry.value)
            del self._entries[key]
        d: Deferred[T] = Deferred()
        waiters = self._waiting.get(key)
        if waiters is not None:
            self.hits += 1
            waiters.append(d)
            return d
        self.misses += 1
        self._waiting[key] = [d]
        Deferred.fromCoroutine(self._lookup(key, lookup, ttl))
        return d

    async def _lookup(self, key: Hashable, lookup: Callable[[], Awaitable[T]],
                      ttl: Callable[[T], float]) -> None:
        try:
            value = await lookup()
        except Exception as e:  # noqa: BLE001 - handed to every waiter, never cached
            for d in self._waiting.pop(key, []):
                d.errback(e)
            return
        seconds = ttl(value)
        if seconds > 0:
            if len(self._entries) >= self.max_entries:
                self._prune()
            self._entries[key] = _Entry(value, self.clock.seconds() + seconds)
        for d in self._waiting.pop(key, []):
            d.callback(value)

    def _prune(self) -> None:
        now = self.clock.seconds()
        for key in [k for k, e in self._entries.items() if e.expires <= now]:
            del self._entries[key]
        # Still full (a flood of distinct tokens): drop the oldest half.
        if len(self._entries) >= self.max_entries:
            for key in list(self._entries)[: len(self._entries) // 2]:
                del self._entries[key]


@implementer(IIdentityVerifier)
@define
class KubeIdentityVerifier:
    """
    @param audiences: the audiences the TokenReview asks for (empty: the API
        server's own); a token minted for another audience is refused.
    @param ttl: seconds a positive answer is reused.
    @param negative_ttl: seconds an invalid token or a denial is reused.
    @param proxy_subresource: also require C{get} on the C{connectors/proxy}
        subresource (a stricter RBAC rule than reading the Connector).
    """

    client: IKubeClient
    clock: IReactorTime
    audiences: tuple[str, ...] = ()
    ttl: float = 10.0
    negative_ttl: float = 5.0
    proxy_subresource: bool = False
    max_in_flight: int = 64
    tokens: ReviewCache = field(init=False)
    access: ReviewCache = field(init=False)
    in_flight: int = 0

    def __attrs_post_init__(self) -> None:
        self.tokens = ReviewCache(self.clock)
        self.access = ReviewCache(self.clock)

    def authenticate(self, token: str) -> Deferred[Identity | None]:
        key = token_key(token)
        return self.tokens.get(
            key, lambda: self._token_review(token),
            lambda identity: self.ttl if identity is not None else self.negative_ttl)

    def authorize(self, identity: Identity, namespace: str, name: str) -> Deferred[bool]:
        key = (identity.username, identity.uid, identity.groups, namespace, name)
        return self.access.get(
            key, lambda: self._access_review(identity, namespace, name),
            lambda allowed: self.ttl if allowed else self.negative_ttl)

    async def _token_review(self, token: str) -> Identity | None:
        if len(token) > MAX_TOKEN_LENGTH or not token.isprintable():
            # Not a token any API server issues: no review for it.
            return None
        if self.in_flight >= self.max_in_flight:
            # A flood of distinct junk tokens must not become a flood of
            # TokenReviews against the API server: past the cap, refuse
            # with 503 (clients retry) instead of queueing without bound.
            raise ReviewUnavailable("too many token reviews in flight")
        self.in_flight += 1
        try:
            status = await self.client.create_token_review(token, self.audiences)
        except Exception as e:  # noqa: BLE001 - any failure: the answer cannot be had
            raise self._unavailable("TokenReview", e, token) from None
        finally:
            self.in_flight -= 1
        if status.get("error") and not status.get("authenticated"):
            log.debug("TokenReview refused a token: {error}",
                      error=str(status["error"]).replace(token, "<token>")[:200])
        if not status.get("authenticated"):
            return None
        user = status.get("user") or {}
        username = user.get("username")
        if not isinstance(username, str) or not username:
            return None
        if self.audiences:
            granted = status.get("audiences")
            if isinstance(granted, list) and not set(granted) & set(self.audiences):
                return None
        groups = tuple(g for g in user.get("groups") or () if isinstance(g, str))
        return Identity(username=username, uid=str(user.get("uid") or ""), groups=groups)

    async def _access_review(self, identity: Identity, namespace: str, name: str) -> bool:
        checks = [None, "proxy"] if self.proxy_subresource else [None]
        for subresource in checks:
            attributes: dict[str, Any] = {
                "namespace": namespace, "verb": "get", "group": "connectors.alauda.io",
                "resource": "connectors", "name": name,
            }
            if subresource:
                attributes["subresource"] = subresource
            spec: dict[str, Any] = {"user": identity.username, "groups": list(identity.groups),
                                    "resourceAttributes": attributes}
            if identity.uid:
                spec["uid"] = identity.uid
            try:
                status = await self.client.create_subject_access_review(spec)
            except Exception as e:  # noqa: BLE001 - any failure: the answer cannot be had
                raise self._unavailable("SubjectAccessReview", e, None) from None
            if status.get("evaluationError") and not status.get("allowed"):
                log.emit(LogLevel.warn, "SubjectAccessReview for {user} on {ns}/{name}: {error}",
                         user=identity.username, ns=namespace, name=name,
                         error=str(status["evaluationError"])[:200])
            if not status.get("allowed") or status.get("denied"):
                return False
        return True

    def _unavailable(self, what: str, e: Exception, token: str | None) -> ReviewUnavailable:
        detail = str(e) if isinstance(e, KubeError) else type(e).__name__
        if token:
            # Should an API server ever echo the request, the token stays out of logs.
            detail = detail.replace(token, "<token>")
        log.emit(LogLevel.warn, "{what} failed: {error}", what=what, error=detail)
        return ReviewUnavailable(f"{what} failed: {detail}")
