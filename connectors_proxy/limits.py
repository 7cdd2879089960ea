# -*- test-case-name: tests.test_limits -*-
"""
Per-Connector concurrency limits, so that one noisy workload cannot starve
the others.

Each Connector has a lane: at most C{max_active} requests to its upstream at
a time, then a FIFO queue of at most C{max_queue} waiting requests, each of
which waits at most C{queue_timeout} seconds.  Past that, the request is
refused at once with C{503} and C{Retry-After}: a client that retries later
is better served than one whose request sits in an unbounded queue while the
proxy's memory and the upstream's connection table fill up.

L{ConcurrencyLimiter} is pure bookkeeping over an injected clock; L{admit}
ties it to a client request (release when the response ends, leave the
queue when the client goes away).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterator
from typing import Any

from attrs import define, field
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from . import errors

# Seconds a refused client is told to wait before retrying.
RETRY_AFTER = 1

# Generous enough for a CI farm pulling through one replica (a layer download
# holds its slot for its whole transfer), small enough that one Connector
# cannot take every file descriptor and upstream connection.
DEFAULT_MAX_ACTIVE = 256
DEFAULT_MAX_QUEUE = 512
DEFAULT_QUEUE_TIMEOUT = 30.0


class LimitExceeded(Exception):
    """A request that cannot be admitted: the lane's queue is full, or its wait timed out."""

    def __init__(self, key: Hashable, active: int, waiting: int, timed_out: bool) -> None:
        super().__init__(key, active, waiting, timed_out)
        self.key = key
        self.active = active
        self.waiting = waiting
        self.timed_out = timed_out


@define(eq=False)
class _Waiter:
    deferred: Deferred[Permit]
    timer: IDelayedCall | None = None


@define(eq=False)
class Lane:
    """One Connector's state: requests in progress, waiters, and running totals."""

    active: int = 0
    waiting: deque[_Waiter] = field(factory=deque)
    admitted: int = 0
    queued: int = 0
    rejected: int = 0
    timed_out: int = 0


@define(eq=False)
class Permit:
    """The right to one upstream request; L{release} gives it back (idempotent)."""

    _limiter: ConcurrencyLimiter
    _lane: Lane
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._limiter._release(self._lane)


@define
class ConcurrencyLimiter:
    """
    @ivar max_active: requests in progress per key; C{0} means no limit
        (requests are still counted, for the metrics).
    @ivar max_queue: requests waiting per key before new ones are refused.
    @ivar queue_timeout: seconds a request waits in the queue at most.
    """

    clock: IReactorTime
    max_active: int = DEFAULT_MAX_ACTIVE
    max_queue: int = DEFAULT_MAX_QUEUE
    queue_timeout: float = DEFAULT_QUEUE_TIMEOUT
    _lanes: dict[Hashable, Lane] = field(factory=dict)

    def lane(self, key: Hashable) -> Lane:
        lane = self._lanes.get(key)
        if lane is None:
            # Keys are Connectors that exist (callers route first), so this
            # grows with the configuration, not with what clients send.
            lane = self._lanes[key] = Lane()
        return lane

    def lanes(self) -> Iterator[tuple[Hashable, Lane]]:
        return iter(list(self._lanes.items()))

    def try_acquire(self, key: Hashable) -> Permit | None:
        """A L{Permit} at once when the lane has room (no Deferred), else C{None}."""
        lane = self.lane(key)
        if self.max_active <= 0 or (lane.active < self.max_active and not lane.waiting):
            lane.active += 1
            lane.admitted += 1
            return Permit(self, lane)
        return None

    def acquire(self, key: Hashable) -> Deferred[Permit]:
        """
        A L{Permit} for C{key}: at once when the lane has room, later (in
        arrival order) when it has a queue slot, else a L{LimitExceeded}
        failure.  Cancelling the returned L{Deferred} leaves the queue.
        """
        permit = self.try_acquire(key)
        if permit is not None:
            return succeed(permit)
        lane = self.lane(key)
        if len(lane.waiting) >= self.max_queue:
            lane.rejected += 1
            return fail(LimitExceeded(key, lane.active, len(lane.waiting), timed_out=False))

        def cancel(d: Deferred[Permit]) -> None:
            self._leave(lane, waiter)

        waiter = _Waiter(Deferred(canceller=cancel))
        waiter.timer = self.clock.callLater(self.queue_timeout, self._expire, key, lane, waiter)
        lane.waiting.append(waiter)
        lane.queued += 1
        return waiter.deferred

    def _leave(self, lane: Lane, waiter: _Waiter) -> None:
        try:
            lane.waiting.remove(waiter)
        except ValueError:
            pass
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()
        waiter.timer = None

    def _expire(self, key: Hashable, lane: Lane, waiter: _Waiter) -> None:
        waiter.timer = None
        self._leave(lane, waiter)
        lane.timed_out += 1
        waiter.deferred.errback(LimitExceeded(key, lane.active, len(lane.waiting), timed_out=True))

    def _release(self, lane: Lane) -> None:
        lane.active -= 1
        # A waiter's callback may release at once (re-entering here): the
        # slot is taken before it runs, so the count stays right.
        while lane.waiting and (self.max_active <= 0 or lane.active < self.max_active):
            waiter = lane.waiting.popleft()
            if waiter.timer is not None and waiter.timer.active():
                waiter.timer.cancel()
            waiter.timer = None
            lane.active += 1
            lane.admitted += 1
            waiter.deferred.callback(Permit(self, lane))


async def admit(limiter: ConcurrencyLimiter, request: Any, key: Hashable, name: str) -> None:
    """
    Wait for C{request}'s turn on C{key}'s lane; the slot is given back when
    the response ends (or the client goes away).  Raises a 503 L{ProxyError}
    (with C{Retry-After} set on C{request}) when the lane is full, and a 499
    one when the client leaves while queued.

    @param name: the Connector as shown in the error message.
    """
    d = limiter.acquire(key)
    if not d.called:
        # Leave the queue if the client goes away while waiting.
        request.notifyFinish().addErrback(lambda _: d.cancel())
    try:
        permit = await d
    except LimitExceeded as e:
        request.setHeader(b"Retry-After", str(RETRY_AFTER).encode())
        why = "waited too long in its queue" if e.timed_out else f"its queue is full ({e.waiting} waiting)"
        raise errors.ProxyError(
            503, "TOOMANYREQUESTS",
            f"Connector {name} is busy: {e.active} requests in progress and {why}; retry in {RETRY_AFTER}s",
        ) from None
    except CancelledError:
        raise errors.ProxyError(499, "CLIENT_CLOSED", "client went away") from None
    request.notifyFinish().addBoth(lambda _: permit.release())
