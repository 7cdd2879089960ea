# -*- test-case-name: tests.test_limits -*-
"""
Per-Connector concurrency limits, so that one noisy workload cannot starve
the others.

Each Connector has a lane: at most C{max_active} requests to its upstream at
a time, then a queue of at most C{max_queue} waiting requests, each of
which waits at most C{queue_timeout} seconds.  Past that, the request is
refused at once with C{503} and C{Retry-After}: a client that retries later
is better served than one whose request sits in an unbounded queue while the
proxy's memory and the upstream's connection table fill up.

Inside a lane, requests are queued per identity (the client's user name), so
that one workload cannot take a shared Connector (one in C{kube-public}, used
by every namespace) from all the others:

  - a freed slot goes to the identities with waiting requests in turn
    (round robin), each identity's own requests in arrival order;
  - an identity that already holds C{ceil(max_active / 2)} slots (at least
    one) gets no more while another identity waits; alone, it may use them
    all (an idle slot helps nobody);
  - when the queue is full, a newcomer takes the place of the newest waiter
    of the identity with the most waiters, if that identity has more than
    the newcomer would ("longest queue drop"): a flood from one identity
    fills the queue only until somebody else comes, and then it is the
    flooding identity, not the newcomer, that gets C{503}.

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

from connectors_proxy.server import errors

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

    def __init__(self, key: Hashable, active: int, waiting: int, timed_out: bool, displaced: bool = False) -> None:
        super().__init__(key, active, waiting, timed_out)
        self.key = key
        self.active = active
        self.waiting = waiting
        self.timed_out = timed_out
        # Queued, then pushed out of a full queue by another identity's request.
        self.displaced = displaced


@define(eq=False)
class _Waiter:
    deferred: Deferred[Permit]
    timer: IDelayedCall | None = None


@define(eq=False)
class Lane:
    """
    One Connector's state: requests in progress, waiters, and running totals.

    @ivar held: requests in progress per identity (only identities holding
        some, so this grows with the clients being served, not with every
        client ever seen).
    @ivar queues: each waiting identity's requests, oldest first.
    @ivar turns: the identities in C{queues}, the next to be served first.
    @ivar n_waiting: the number of waiters over all C{queues}.
    """

    active: int = 0
    held: dict[Hashable, int] = field(factory=dict)
    queues: dict[Hashable, deque[_Waiter]] = field(factory=dict)
    turns: deque[Hashable] = field(factory=deque)
    n_waiting: int = 0
    admitted: int = 0
    queued: int = 0
    rejected: int = 0
    timed_out: int = 0

    @property
    def waiting(self) -> list[_Waiter]:
        """Every waiter, identity by identity (for inspection; use C{n_waiting} to count)."""
        return [waiter for who in self.turns for waiter in self.queues[who]]


@define(eq=False)
class Permit:
    """The right to one upstream request; L{release} gives it back (idempotent)."""

    _limiter: ConcurrencyLimiter
    _lane: Lane
    _who: Hashable = None
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._limiter._release(self._lane, self._who)


@define
class ConcurrencyLimiter:
    """
    @ivar max_active: requests in progress per key; C{0} means no limit
        (requests are still counted, for the metrics).
    @ivar max_queue: requests waiting per key before new ones are refused
        (or, from another identity, push out one of the identity with the
        most waiters: see the module's docstring).
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

    @property
    def share(self) -> int:
        """Slots one identity may hold while another identity waits: half, rounded up, at least one."""
        return max(1, (self.max_active + 1) // 2)

    def try_acquire(self, key: Hashable, who: Hashable = None) -> Permit | None:
        """
        A L{Permit} at once when the lane has room (no Deferred), else C{None}.

        @param who: the client's identity (its user name).
        """
        lane = self.lane(key)
        # Nobody waits, so nobody else needs the slot: no share to check.
        # (A free slot and waiters never coexist: see _dispatch.)
        if self.max_active <= 0 or (lane.active < self.max_active and not lane.n_waiting):
            lane.active += 1
            lane.admitted += 1
            lane.held[who] = lane.held.get(who, 0) + 1
            return Permit(self, lane, who)
        return None

    def acquire(self, key: Hashable, who: Hashable = None) -> Deferred[Permit]:
        """
        A L{Permit} for C{key}: at once when the lane has room, later (in
        turn with the other waiting identities) when it has a queue slot,
        else a L{LimitExceeded} failure.  Cancelling the returned
        L{Deferred} leaves the queue.

        @param who: the client's identity (its user name).
        """
        permit = self.try_acquire(key, who)
        if permit is not None:
            return succeed(permit)
        lane = self.lane(key)
        displaced: tuple[Hashable, _Waiter] | None = None
        if lane.n_waiting >= self.max_queue:
            displaced = self._longest_drop(lane, who)
            if displaced is None:
                lane.rejected += 1
                return fail(LimitExceeded(key, lane.active, lane.n_waiting, timed_out=False))

        def cancel(d: Deferred[Permit]) -> None:
            self._leave(lane, who, waiter)

        waiter = _Waiter(Deferred(canceller=cancel))
        waiter.timer = self.clock.callLater(self.queue_timeout, self._expire, key, lane, who, waiter)
        queue = lane.queues.get(who)
        if queue is None:
            queue = lane.queues[who] = deque()
            lane.turns.append(who)
        queue.append(waiter)
        lane.n_waiting += 1
        lane.queued += 1
        if displaced is not None:
            # Refused last, once the lane is consistent again: its errback
            # runs the refused request's code, which may come back here.
            loser, dropped = displaced
            self._leave(lane, loser, dropped)
            lane.rejected += 1
            dropped.deferred.errback(LimitExceeded(key, lane.active, lane.n_waiting, timed_out=False,
                                                   displaced=True))
        return waiter.deferred

    def _longest_drop(self, lane: Lane, who: Hashable) -> tuple[Hashable, _Waiter] | None:
        """
        The waiter to push out of a full queue for a request of C{who}: the
        newest one of the identity with the most waiters, if it has more
        than C{who} would have with this request; else C{None} (refuse the
        newcomer, which leaves the queue as it is).
        """
        if not lane.turns:  # max_queue is 0: there is nobody to push out
            return None
        # Only when the queue is full, and over at most max_queue identities.
        longest = max(lane.turns, key=lambda w: len(lane.queues[w]))
        if len(lane.queues[longest]) > len(lane.queues.get(who, ())) + 1:
            return longest, lane.queues[longest][-1]
        return None

    def _leave(self, lane: Lane, who: Hashable, waiter: _Waiter) -> None:
        queue = lane.queues.get(who)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            lane.n_waiting -= 1
            if not queue:
                del lane.queues[who]
                lane.turns.remove(who)
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()
        waiter.timer = None
        # No slot is freed here, so no waiter can be admitted: waiters are
        # only ever left behind when every slot is taken (see _dispatch).

    def _expire(self, key: Hashable, lane: Lane, who: Hashable, waiter: _Waiter) -> None:
        waiter.timer = None
        self._leave(lane, who, waiter)
        lane.timed_out += 1
        waiter.deferred.errback(LimitExceeded(key, lane.active, lane.n_waiting, timed_out=True))

    def _release(self, lane: Lane, who: Hashable) -> None:
        lane.active -= 1
        held = lane.held[who] - 1
        if held:
            lane.held[who] = held
        else:
            del lane.held[who]
        self._dispatch(lane)

    def _dispatch(self, lane: Lane) -> None:
        """
        Give free slots to waiters, identity by identity.

        When a slot is free and somebody waits, somebody may take it: two
        identities each at their share hold every slot (C{2 * ceil(n / 2)
        >= n}), and one alone may take them all.  So this loop ends with
        every slot taken or nobody waiting, which is what lets
        L{try_acquire} skip the queue when nobody waits.
        """
        # A waiter's callback may release at once (re-entering here): the
        # slot is taken before it runs, so the counts stay right.
        while lane.n_waiting and (self.max_active <= 0 or lane.active < self.max_active):
            turn = self._next_turn(lane)
            if turn < 0:  # pragma: no cover (see the docstring)
                return
            # Out of line (None is an identity too: callers that give none).
            who = lane.turns[turn]
            del lane.turns[turn]
            queue = lane.queues[who]
            waiter = queue.popleft()
            lane.n_waiting -= 1
            if not queue:
                del lane.queues[who]
            else:
                # Served, so to the back of the line.
                lane.turns.append(who)
            if waiter.timer is not None and waiter.timer.active():
                waiter.timer.cancel()
            waiter.timer = None
            lane.active += 1
            lane.admitted += 1
            lane.held[who] = lane.held.get(who, 0) + 1
            waiter.deferred.callback(Permit(self, lane, who))

    def _next_turn(self, lane: Lane) -> int:
        """
        The place in C{turns} of the first identity in line that may take a
        slot, or C{-1}.  Identities at their share are passed over but keep
        their place, so they are first once under it again.
        """
        if len(lane.turns) == 1:
            return 0
        share = self.share
        for i, who in enumerate(lane.turns):
            if lane.held.get(who, 0) < share:
                return i
        return -1


async def admit(limiter: ConcurrencyLimiter, request: Any, key: Hashable, name: str | None = None,
                who: Hashable = None) -> None:
    """
    Wait for C{request}'s turn on C{key}'s lane; the slot is given back when
    the response ends (or the client goes away).  Raises a 503 L{ProxyError}
    (with C{Retry-After} set on C{request}) when the lane is full, and a 499
    one when the client leaves while queued.

    @param name: the Connector as shown in the error message (default:
        C{str(key)}, made only for a refusal, not for every request).
    @param who: the client's identity, for fair turns between identities.
    """
    d = limiter.acquire(key, who)
    if not d.called:
        # Leave the queue if the client goes away while waiting.
        request.notifyFinish().addErrback(lambda _: d.cancel())
    try:
        permit = await d
    except LimitExceeded as e:
        request.setHeader(b"Retry-After", str(RETRY_AFTER).encode())
        if e.timed_out:
            why = "waited too long in its queue"
        elif e.displaced:
            why = f"its queue is full ({e.waiting} waiting) and this client had the most requests in it"
        else:
            why = f"its queue is full ({e.waiting} waiting)"
        raise errors.ProxyError(
            503, "TOOMANYREQUESTS",
            f"Connector {key if name is None else name} is busy: {e.active} requests in progress and {why}; retry in {RETRY_AFTER}s",
        ) from None
    except CancelledError:
        raise errors.ProxyError(499, "CLIENT_CLOSED", "client went away") from None
    request.notifyFinish().addBoth(lambda _: permit.release())
