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
  - During an outage (the API server unreachable or not answering in time,
    as opposed to answering), the last answer for a key is served for up to
    C{stale} seconds after it was obtained: that is the longest a revoked
    token or binding keeps working while the API server is away.  Only the
    last answer is served, so a denial or an invalid token stays one; an
    outage never turns into an allow.
  - Each review has its own short timeout, and a L{Circuit} stops calling a
    dead API server on every request: while it is open, lookups fail at
    once (and are answered from the last answers where allowed), and one
    trial call at a time checks whether the API server is back.
  - An outage is logged once when it starts and once when it ends (with how
    many answers were served stale and how many requests were refused),
    never once per request; so is an error answer (the proxy's own RBAC
    refusing its reviews): once per change of the error, once when it ends.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

from attrs import define, field
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel
from zope.interface import implementer

from connectors_proxy.auth.identity import token_digest
from connectors_proxy.auth.interfaces import Identity, IIdentityVerifier, VerifierUnavailable
from connectors_proxy.kube.client import IKubeClient, KubeError

log = Logger()

T = TypeVar("T")


class ReviewUnavailable(VerifierUnavailable):
    """
    The API server could not answer a review; the request gets a 503.

    @ivar outage: the API server could not be reached or did not answer in
        time (as opposed to answering with an error): the last answers may
        be served instead.
    """

    def __init__(self, message: str, outage: bool = False) -> None:
        super().__init__(message)
        self.outage = outage


# Statuses that mean "not answering right now" rather than an answer: too
# many requests, and a gateway or load balancer in front of an API server
# that is down.
OUTAGE_CODES = frozenset({429, 502, 503, 504})


def is_outage(e: BaseException) -> bool:
    """
    Whether a review call's failure means the API server is unreachable or
    not answering (connection refused or reset, TLS failure, timeout, an
    overloaded or absent server behind a gateway), rather than an answer.
    """
    if isinstance(e, ReviewUnavailable):
        return e.outage
    if isinstance(e, KubeError):
        return e.code in OUTAGE_CODES
    return True


# ServiceAccount tokens are JWTs of a few hundred bytes to a few KiB.
MAX_TOKEN_LENGTH = 16 * 1024


# Where a TokenReview names the Pod a bound ServiceAccount token was issued for.
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"


def _pod_of(user: Any) -> str | None:
    """The Pod a TokenReview's C{status.user} names in C{extra}, or C{None}."""
    extra = user.get("extra") if isinstance(user, dict) else None
    names = extra.get(POD_NAME_EXTRA) if isinstance(extra, dict) else None
    if isinstance(names, list) and len(names) == 1 and isinstance(names[0], str) and names[0]:
        return names[0]
    return None


def pod_subresource(identity: Identity) -> str | None:
    """
    Upstream's pod-scoped subresource for C{identity}: C{proxy/v1/pod/PODNS/PODNAME},
    the Pod's namespace being its ServiceAccount's; C{None} unless the token names its Pod.
    """
    sa = identity.service_account
    if identity.pod is None or sa is None:
        return None
    return f"proxy/v1/pod/{sa[0]}/{identity.pod}"


def token_key(token: str) -> str:
    """The cache key for a token: its SHA-256, never the token itself."""
    return token_digest(token).hex()


@define
class _Entry:
    value: Any
    obtained: float
    expires: float


@define
class ReviewCache:
    """
    Answers by key with expiry, and one shared lookup per key in flight.

    An answer is fresh for its TTL.  After that it is kept until C{stale}
    seconds after it was obtained: when a lookup fails with an outage (see
    L{is_outage}), the waiters get that last answer instead of the failure;
    while C{prefer_stale()} says an outage is going on, it is served at once
    and the lookup runs in the background (it fails fast while the circuit
    is open), so no request waits for a dead API server.

    @ivar hits: answers served from the cache (or a shared lookup).
    @ivar misses: lookups started.
    @ivar stale_hits: answers served past their TTL because of an outage.
    @ivar refused: lookups failed with an outage and no answer to fall back on
        (counted per waiting request).
    """

    clock: IReactorTime
    max_entries: int = 50_000
    stale: float = 0.0
    prefer_stale: Callable[[], bool] = lambda: False
    hits: int = 0
    misses: int = 0
    stale_hits: int = 0
    refused: int = 0
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
            if not self._usable(entry, now):
                del self._entries[key]
                entry = None
        d: Deferred[T] = Deferred()
        waiters = self._waiting.get(key)
        if entry is not None and self.prefer_stale():
            # The API server is known to be away: answer now, and let one
            # lookup (which fails fast while the circuit is open) refresh it.
            self.stale_hits += 1
            if waiters is None:
                self.misses += 1
                self._waiting[key] = []
                Deferred.fromCoroutine(self._lookup(key, lookup, ttl))
            return succeed(entry.value)
        if waiters is not None:
            self.hits += 1
            waiters.append(d)
            return d
        self.misses += 1
        self._waiting[key] = [d]
        Deferred.fromCoroutine(self._lookup(key, lookup, ttl))
        return d

    def _usable(self, entry: _Entry, now: float) -> bool:
        """Whether an expired answer may still stand in during an outage."""
        return now - entry.obtained <= self.stale

    async def _lookup(self, key: Hashable, lookup: Callable[[], Awaitable[T]],
                      ttl: Callable[[T], float]) -> None:
        try:
            value = await lookup()
        except Exception as e:  # noqa: BLE001 - handed to every waiter, never cached
            waiters = self._waiting.pop(key, [])
            entry = self._entries.get(key)
            if is_outage(e) and entry is not None and self._usable(entry, self.clock.seconds()):
                self.stale_hits += len(waiters)
                for d in waiters:
                    d.callback(entry.value)
                return
            if is_outage(e):
                self.refused += len(waiters)
            for d in waiters:
                d.errback(e)
            return
        seconds = ttl(value)
        now = self.clock.seconds()
        if seconds > 0:
            if key not in self._entries and len(self._entries) >= self.max_entries:
                self._prune()
            self._entries[key] = _Entry(value, now, now + seconds)
        else:
            self._entries.pop(key, None)
        for d in self._waiting.pop(key, []):
            d.callback(value)

    def _prune(self) -> None:
        now = self.clock.seconds()
        for key in [k for k, e in self._entries.items()
                    if e.expires <= now and not self._usable(e, now)]:
            del self._entries[key]
        # Still full (a flood of distinct tokens): drop the oldest half.
        if len(self._entries) >= self.max_entries:
            for key in list(self._entries)[: len(self._entries) // 2]:
                del self._entries[key]


@define
class Circuit:
    """
    A circuit breaker for calls to one API server.

    Closed, every call goes through.  After C{threshold} outages in a row it
    opens: calls are refused at once for C{backoff} seconds (doubling with
    each failed trial, up to C{max_backoff}); then one trial call at a time
    is let through, and its success closes the circuit.
    """

    clock: IReactorTime
    threshold: int = 2
    backoff: float = 1.0
    max_backoff: float = 10.0
    failures: int = 0
    _retry_at: float | None = None
    _delay: float = 0.0
    _trial: bool = False

    @property
    def is_open(self) -> bool:
        return self._retry_at is not None

    def allow(self) -> bool:
        """Whether a call may be made now (closed, or the one trial call)."""
        if self._retry_at is None:
            return True
        if self._trial or self.clock.seconds() < self._retry_at:
            return False
        self._trial = True
        return True

    def succeeded(self) -> None:
        self.failures = 0
        self._retry_at = None
        self._delay = 0.0
        self._trial = False

    def failed(self) -> None:
        """An outage (not an answer, even an error answer: that is L{succeeded})."""
        self.failures += 1
        self._trial = False
        if self.failures >= self.threshold:
            self._delay = min(self.max_backoff, self._delay * 2 if self._delay else self.backoff)
            self._retry_at = self.clock.seconds() + self._delay


@implementer(IIdentityVerifier)
@define
class KubeIdentityVerifier:
    """
    @param audiences: the audiences the TokenReview asks for (empty: the API
        server's own); a token minted for another audience is refused.
    @param ttl: seconds a positive answer is reused.
    @param negative_ttl: seconds an invalid token or a denial is reused.
    @param proxy_subresource: also require C{get} on the C{connectors/proxy}
        subresource, or its pod-scoped form (a stricter RBAC rule than
        reading the Connector); cluster mode sets it at run time from
        upstream's C{enable-connector-proxy-permissions} flag.
    @param stale: during an API server outage, seconds after it was obtained
        that an answer is still served (C{--review-stale-seconds}; 0: never).
    @param timeout: seconds one review call may take before it counts as an
        outage (shorter than the client's own timeout: a request waits for it).
    @param stale_after: seconds an outage lasts before L{stale} says so (and
        C{/readyz} answers 503), like a watch that cannot reconnect.
    """

    client: IKubeClient
    clock: IReactorTime
    audiences: tuple[str, ...] = ()
    ttl: float = 10.0
    negative_ttl: float = 5.0
    proxy_subresource: bool = False
    max_in_flight: int = 64
    stale: float = 300.0
    timeout: float = 3.0
    stale_after: float = 60.0
    tokens: ReviewCache = field(init=False)
    access: ReviewCache = field(init=False)
    circuit: Circuit = field(init=False)
    in_flight: int = 0
    #: When the current outage started (C{None}: no outage).
    outage_since: float | None = None
    #: Called (no arguments) when L{stale} changes.
    on_stale_change: list[Callable[[], object]] = field(factory=list)
    _outage_counts: tuple[int, int] = (0, 0)
    _stale_call: Any = None
    #: Per kind of review in error: its last error and the calls failed since the first.
    _review_errors: dict[str, tuple[str, int]] = field(factory=dict)

    def __attrs_post_init__(self) -> None:
        in_outage = lambda: self.outage_since is not None  # noqa: E731
        self.tokens = ReviewCache(self.clock, stale=self.stale, prefer_stale=in_outage)
        self.access = ReviewCache(self.clock, stale=self.stale, prefer_stale=in_outage)
        self.circuit = Circuit(self.clock)

    @property
    def is_stale(self) -> bool:
        """Whether reviews have been failing for C{stale_after} seconds or more."""
        return (self.outage_since is not None
                and self.clock.seconds() - self.outage_since >= self.stale_after)

    def authenticate(self, token: str) -> Deferred[Identity | None]:
        key = token_key(token)
        return self.tokens.get(
            key, lambda: self._token_review(token),
            lambda identity: self.ttl if identity is not None else self.negative_ttl)

    def authorize(self, identity: Identity, namespace: str, name: str) -> Deferred[bool]:
        # The flag is part of the key: when enable-connector-proxy-permissions
        # flips, the next request is reviewed anew instead of served the
        # answer to the other question for up to a TTL.
        proxy = self.proxy_subresource
        key = (identity.username, identity.uid, identity.groups, identity.pod, namespace, name, proxy)
        return self.access.get(
            key, lambda: self._access_review(identity, namespace, name, proxy),
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
            status = await self._call("TokenReview", token,
                                      lambda: self.client.create_token_review(token, self.audiences))
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
        return Identity(username=username, uid=str(user.get("uid") or ""), groups=groups, pod=_pod_of(user))

    async def _access_review(self, identity: Identity, namespace: str, name: str, proxy: bool = False) -> bool:
        """
        C{get} on the Connector; with C{proxy} (upstream's
        C{enable-connector-proxy-permissions}) also on its C{proxy}
        subresource, or, for a token issued to a Pod, on the pod-scoped
        C{proxy/v1/pod/PODNS/PODNAME} one (upstream's per-Pod grant).
        """
        if not await self._allowed(identity, namespace, name, None):
            return False
        if not proxy or await self._allowed(identity, namespace, name, "proxy"):
            return True
        pod = pod_subresource(identity)
        return pod is not None and await self._allowed(identity, namespace, name, pod)

    async def _allowed(self, identity: Identity, namespace: str, name: str, subresource: str | None) -> bool:
        """One SubjectAccessReview: C{get} on Connector C{namespace/name} (or its C{subresource})."""
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
        status = await self._call("SubjectAccessReview", None,
                                  lambda: self.client.create_subject_access_review(spec))
        if status.get("evaluationError") and not status.get("allowed"):
            log.emit(LogLevel.warn, "SubjectAccessReview for {user} on {ns}/{name}: {error}",
                     user=identity.username, ns=namespace, name=name,
                     error=str(status["evaluationError"])[:200])
        return bool(status.get("allowed")) and not status.get("denied")

    async def _call(self, what: str, token: str | None,
                    call: Callable[[], Deferred[dict[str, Any]]]) -> dict[str, Any]:
        """
        One review call, through the circuit and with its own timeout;
        failures become L{ReviewUnavailable} (C{outage} set when the API
        server was not reached or did not answer in time).
        """
        if not self.circuit.allow():
            raise ReviewUnavailable(f"{what} skipped: the API server is unreachable", outage=True)
        d = call()
        timed_out: list[bool] = []

        def expire() -> None:
            timed_out.append(True)
            d.cancel()
        timer = self.clock.callLater(self.timeout, expire)
        try:
            status = await d
        except Exception as e:  # noqa: BLE001 - any failure: the answer cannot be had
            outage = bool(timed_out) or is_outage(e)
            if timed_out:
                detail = f"no answer within {self.timeout:g} s"
            else:
                detail = str(e) if isinstance(e, KubeError) else type(e).__name__
            if token:
                # Should an API server ever echo the request, the token stays out of logs.
                detail = detail.replace(token, "<token>")
            if outage:
                self.circuit.failed()
                self._outage_started(what, detail)
            else:
                # It answered (with an error): reachable, not an outage.
                self.circuit.succeeded()
                self._outage_ended()
                self._review_failed(what, detail)
            raise ReviewUnavailable(f"{what} failed: {detail}", outage=outage) from None
        finally:
            if timer.active():
                timer.cancel()
        self.circuit.succeeded()
        self._outage_ended()
        self._review_answered(what)
        return status

    def _review_failed(self, what: str, detail: str) -> None:
        """
        An error answer to a review: warned when it differs from the last
        one of this kind of review.  Errors are not cached, so one that
        lasts (the proxy's own RBAC refusing its reviews) fails every
        request: a warning each time would bury the log.
        """
        last, failed = self._review_errors.get(what, (None, 0))
        self._review_errors[what] = (detail, failed + 1)
        if detail == last:
            log.debug("{what} failed again: {error}", what=what, error=detail)
            return
        log.emit(LogLevel.warn, "{what} failed: {error}", what=what, error=detail, event="review-error")

    def _review_answered(self, what: str) -> None:
        """A review answered: the end of its errors, if it had any, is said once."""
        error = self._review_errors.pop(what, None)
        if error is not None:
            log.emit(LogLevel.warn, "{what} answers again ({failed} calls failed since the first error)",
                     what=what, failed=error[1], event="review-recovered")

    def _counts(self) -> tuple[int, int]:
        return (self.tokens.stale_hits + self.access.stale_hits,
                self.tokens.refused + self.access.refused)

    def _outage_started(self, what: str, detail: str) -> None:
        if self.outage_since is not None:
            log.debug("{what} failed during the outage: {error}", what=what, error=detail)
            return
        self.outage_since = self.clock.seconds()
        self._outage_counts = self._counts()
        log.emit(LogLevel.warn,
                 "reviews stale: the API server is unreachable ({what}: {error}); serving the last "
                 "token and access answers up to {stale:g} s old, refusing (503) what is not cached",
                 what=what, error=detail, stale=self.stale, event="reviews-stale")
        if self.stale_after > 0:
            self._stale_call = self.clock.callLater(self.stale_after, self._notify)
        else:
            self._notify()

    def _outage_ended(self) -> None:
        if self.outage_since is None:
            return
        seconds = self.clock.seconds() - self.outage_since
        stale_before, refused_before = self._outage_counts
        stale_now, refused_now = self._counts()
        self.outage_since = None
        if self._stale_call is not None and self._stale_call.active():
            self._stale_call.cancel()
        self._stale_call = None
        log.emit(LogLevel.warn,
                 "reviews recovered: the API server answers again after {seconds:.1f} s; "
                 "{stale} answers were served stale, {refused} requests refused",
                 seconds=seconds, stale=stale_now - stale_before, refused=refused_now - refused_before,
                 event="reviews-recovered")
        self._notify()

    def _notify(self) -> None:
        for callback in list(self.on_stale_change):
            callback()

    def stop(self) -> None:
        """Cancel the pending readiness timer (at shutdown)."""
        if self._stale_call is not None and self._stale_call.active():
            self._stale_call.cancel()
        self._stale_call = None
