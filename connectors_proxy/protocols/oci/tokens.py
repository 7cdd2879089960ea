# -*- test-case-name: tests.test_oci_tokens -*-
"""
The cache of registry tokens: one token per (Connector, realm, service,
scope, credentials), kept until shortly before it expires; concurrent
requests that need the same token share one request to the realm.

A pull of an image is a burst of requests for one scope; without sharing,
ten parallel layer downloads would cost ten token requests each time the
token runs out.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from typing import Generic, TypeVar

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from connectors_proxy.protocols.oci.auth import IssuedToken, RegistryCredentials


@frozen
class TokenKey:
    """
    What a token is for.  C{credentials} is a fingerprint (never the secret
    itself), so that a rotated Secret gets new tokens at once rather than
    when the old ones expire.
    """

    connector: str
    realm: str
    service: str
    scope: str
    credentials: str = ""


@functools.lru_cache(maxsize=1024)
def fingerprint(credentials: RegistryCredentials | None) -> str:
    """A short, non-reversible name for a set of credentials (for cache keys)."""
    if credentials is None:
        return "anonymous"
    material = "\0".join([
        credentials.username, credentials.password or "", credentials.identity_token or "",
        credentials.bearer or "",
    ])
    return hashlib.sha256(material.encode()).hexdigest()[:16]


@frozen
class CachedToken:
    value: str = field(repr=False)
    expires_at: float


K = TypeVar("K")
V = TypeVar("V")


@define
class SingleFlight(Generic[K, V]):
    """
    At most one piece of work per key at a time: callers that ask while it
    runs wait for its result.  A failure reaches every waiter and is not
    remembered.  Cancelling one waiter (its client went away) leaves the
    work and the other waiters alone.
    """

    _flights: dict[K, list[Deferred[V]]] = field(factory=dict)

    def run(self, key: K, work: Callable[[], Deferred[V]]) -> Deferred[V]:
        waiter: Deferred[V] = Deferred(lambda d: self._cancel(key, d))
        waiters = self._flights.get(key)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        waiters = self._flights[key] = [waiter]
        try:
            working = work()
        except Exception:
            working = fail()
        working.addBoth(self._done, key, waiters)
        return waiter

    def running(self, key: K) -> bool:
        return key in self._flights

    def _cancel(self, key: K, waiter: Deferred[V]) -> None:
        waiters = self._flights.get(key)
        if waiters is not None and waiter in waiters:
            waiters.remove(waiter)

    def _done(self, result: V | Failure, key: K, waiters: list[Deferred[V]]) -> None:
        if self._flights.get(key) is waiters:
            del self._flights[key]
        # With no waiter left a failure ends here: the next caller tries again.
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)


@define
class TokenCache:
    """
    Tokens by L{TokenKey}.  C{clock} is injected so tests can expire tokens
    without sleeping.  A token is used until C{margin} of its life is left
    (at most C{max_margin} seconds), so that a request does not set off
    with a token that expires on the way.
    """

    clock: IReactorTime
    margin: float = 0.1
    max_margin: float = 10.0
    max_entries: int = 10000
    _tokens: dict[TokenKey, CachedToken] = field(factory=dict)
    _flights: SingleFlight[TokenKey, str] = field(factory=SingleFlight)
    fetches: int = 0
    # Told of each cache answer and each realm request, by Connector
    # ("ns/name"): the daemon's metrics.
    on_hit: Callable[[str], None] | None = None
    on_request: Callable[[str, bool], None] | None = None

    def cached(self, key: TokenKey) -> str | None:
        """The token for C{key} if one is fresh, without asking the realm."""
        token = self._tokens.get(key)
        if token is None:
            return None
        if token.expires_at <= self.clock.seconds():
            del self._tokens[key]
            return None
        return token.value

    def get(self, key: TokenKey, fetch: Callable[[], Deferred[IssuedToken]]) -> Deferred[str]:
        """
        A fresh token for C{key}: the cached one, the answer of a request
        already in flight for C{key}, or the answer of C{fetch()}.  A failed
        fetch fails every waiter and is not cached.
        """
        value = self.cached(key)
        if value is not None:
            if self.on_hit is not None:
                self.on_hit(key.connector)
            return succeed(value)

        def work() -> Deferred[str]:
            self.fetches += 1
            d = fetch().addCallback(self._landed, key)
            if self.on_request is not None:
                report = self.on_request

                def done(result: object) -> object:
                    report(key.connector, not isinstance(result, Failure))
                    return result

                d.addBoth(done)
            return d

        return self._flights.run(key, work)

    def invalidate(self, key: TokenKey, value: str) -> None:
        """
        Forget the token for C{key} when it is still C{value} (the upstream
        refused it).  A token that another request already replaced stays, so
        a burst of 401s for one stale token causes one new token request.
        """
        token = self._tokens.get(key)
        if token is not None and token.value == value:
            del self._tokens[key]

    def _landed(self, issued: IssuedToken, key: TokenKey) -> str:
        life = issued.expires_in
        expires_at = self.clock.seconds() + life - min(life * self.margin, self.max_margin)
        self._store(key, CachedToken(issued.value, expires_at))
        return issued.value

    def _store(self, key: TokenKey, token: CachedToken) -> None:
        if len(self._tokens) >= self.max_entries:
            now = self.clock.seconds()
            for stale in [k for k, t in self._tokens.items() if t.expires_at <= now]:
                del self._tokens[stale]
            while len(self._tokens) >= self.max_entries:
                # Oldest inserted first: dicts keep insertion order.
                del self._tokens[next(iter(self._tokens))]
        self._tokens[key] = token
