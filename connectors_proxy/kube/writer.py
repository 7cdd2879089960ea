# -*- test-case-name: tests.test_kube_writer -*-
"""
Applies L{connectors_proxy.kube.reconcile.decide} to the cluster: creates,
replaces or deletes proxy Services and writes Connector status through the
status subresource.

Work is a queue of Connector keys, like a controller-runtime workqueue: a
key is never worked on twice at once, a key marked again while in flight is
done once more afterwards, failures are retried per key with exponential
backoff, at most C{max_in_flight} keys are in flight and writes pass a
token bucket.  Nothing is written unless this replica leads (or leader
election is off) and every watch has synced, so a replica that has not seen
the whole cluster never "repairs" what it has not read yet.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger, LogLevel
from zope.interface import Interface

from connectors_proxy.kube.client import CONNECTORS, JSON, SERVICES, IKubeClient, KubeError
from connectors_proxy.kube.reconcile import ServiceAction, World, decide, format_time, service_name
from connectors_proxy.kube.reflector import Key, resource_version_of
from connectors_proxy.model.objects import Connector, InvalidObject, parse_connector

log = Logger()


class IInventory(Interface):
    """What the writer reads: the watched objects, as the reflectors keep them."""

    def connector(key: Key) -> tuple[JSON, Connector | InvalidObject] | None:
        """The Connector as the API server has it, and parsed; C{None} if absent."""

    def service(key: Key) -> JSON | None:
        """A managed Service C{(namespace, name)}, if the watch has it."""

    def world() -> World:
        """Classes and Secrets, parsed, and the settings decisions depend on."""

    def connector_keys() -> Iterable[Key]:
        """Every Connector the watch has."""


@define
class TokenBucket:
    """At most C{rate} acquisitions a second on average, C{burst} at once."""

    clock: IReactorTime
    rate: float
    burst: float
    _tokens: float | None = None
    _last: float = 0.0
    _waiters: deque[Deferred[None]] = field(factory=deque)
    _call: IDelayedCall | None = None

    def _refill(self) -> None:
        now = self.clock.seconds()
        if self._tokens is None:
            self._tokens = self.burst
        else:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now

    def acquire(self) -> Deferred[None]:
        self._refill()
        assert self._tokens is not None
        if not self._waiters and self._tokens >= 1:
            self._tokens -= 1
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        self._schedule()
        return d

    def _schedule(self) -> None:
        if self._call is not None or not self._waiters:
            return
        assert self._tokens is not None
        # At least a millisecond: float rounding must not make a zero-delay
        # loop of calls that never quite earn a token.
        wait = max(0.001, (1 - self._tokens) / self.rate)
        self._call = self.clock.callLater(wait, self._serve)

    def _serve(self) -> None:
        self._call = None
        self._refill()
        assert self._tokens is not None
        while self._waiters and self._tokens >= 1 - 1e-9:
            self._tokens = max(0.0, self._tokens - 1)
            self._waiters.popleft().callback(None)
        self._schedule()

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


@define
class Counters:
    """What the writer did, for tests, logs and the benchmark."""

    reconciles: int = 0
    creates: int = 0
    replaces: int = 0
    deletes: int = 0
    status_writes: int = 0
    conflicts: int = 0
    failures: int = 0

    @property
    def writes(self) -> int:
        return self.creates + self.replaces + self.deletes + self.status_writes


class _Conflicts(Exception):
    pass


class _NotLeader(Exception):
    pass


@define
class Writer:
    """
    @ivar is_leader: whether this replica may write now.
    @ivar may_write: whether the inventory is complete (all watches synced).
    """

    client: IKubeClient
    clock: IReactorTime
    inventory: IInventory
    is_leader: Callable[[], bool] = lambda: True
    may_write: Callable[[], bool] = lambda: True
    max_in_flight: int = 8
    qps: float = 100.0
    burst: float = 200.0
    conflict_retries: int = 4
    retry_base: float = 0.5
    retry_cap: float = 60.0
    counters: Counters = field(factory=Counters)

    _queue: dict[Key, None] = field(factory=dict)
    _in_flight: set[Key] = field(factory=set)
    _again: set[Key] = field(factory=set)
    _failures: dict[Key, int] = field(factory=dict)
    _retries: dict[Key, IDelayedCall] = field(factory=dict)
    # Objects we wrote (or re-read after a conflict) that the watch has not
    # delivered yet: (resourceVersion the cache had then, object or None).
    _fresh_connectors: dict[Key, tuple[str | None, JSON | None]] = field(factory=dict)
    _fresh_services: dict[Key, tuple[str | None, JSON | None]] = field(factory=dict)
    _bucket: TokenBucket | None = None
    _idle_waiters: list[Deferred[None]] = field(factory=list)
    _stopped: bool = False
    _pumping: bool = False
    _pump_again: bool = False

    def __attrs_post_init__(self) -> None:
        self._bucket = TokenBucket(self.clock, self.qps, self.burst)

    # -- the queue ------------------------------------------------------------

    def enqueue(self, key: Key) -> None:
        """Reconcile Connector C{key} soon (again, if it is in flight)."""
        self._add(key)
        self.pump()

    def enqueue_all(self) -> None:
        """Reconcile every Connector (queued first, then worked: each once)."""
        for key in list(self.inventory.connector_keys()):
            self._add(key)
        self.pump()

    def _add(self, key: Key) -> None:
        if key in self._in_flight:
            self._again.add(key)
            return
        retry = self._retries.pop(key, None)
        if retry is not None and retry.active():
            retry.cancel()
        self._queue[key] = None

    def pump(self) -> None:
        """Start queued work, if this replica may write."""
        if self._stopped:
            return
        if self._pumping:
            # Called back from a reconcile that finished synchronously (it
            # had nothing to write): the loop below picks the work up, so
            # thousands of no-op reconciles do not nest.
            self._pump_again = True
            return
        self._pumping = True
        try:
            while True:
                self._pump_again = False
                while self._queue and len(self._in_flight) < self.max_in_flight:
                    if not (self.is_leader() and self.may_write()):
                        break
                    key = next(iter(self._queue))
                    del self._queue[key]
                    self._in_flight.add(key)
                    d = Deferred.fromCoroutine(self._work(key))
                    d.addBoth(self._done, key)
                if not self._pump_again:
                    break
        finally:
            self._pumping = False
        self._check_idle()

    @property
    def pending(self) -> int:
        return len(self._queue) + len(self._in_flight)

    def idle(self) -> Deferred[None]:
        """Fires when nothing is queued or in flight (retries may be scheduled)."""
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        self._check_idle()
        return d

    def _check_idle(self) -> None:
        if not self._queue and not self._in_flight:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)

    def stop(self) -> None:
        self._stopped = True
        for call in self._retries.values():
            if call.active():
                call.cancel()
        self._retries.clear()
        if self._bucket is not None:
            self._bucket.stop()

    def _done(self, result: object, key: Key) -> None:
        self._in_flight.discard(key)
        if key in self._again:
            self._again.discard(key)
            self._add(key)
        self.pump()

    async def _work(self, key: Key) -> None:
        self.counters.reconciles += 1
        try:
            await self._reconcile(key)
        except _NotLeader:
            return
        except Exception as e:  # noqa: BLE001 - any failure: retry this key later
            self.counters.failures += 1
            failures = self._failures.get(key, 0) + 1
            self._failures[key] = failures
            delay = min(self.retry_base * 2 ** (failures - 1), self.retry_cap)
            log.emit(LogLevel.warn, "Connector {ns}/{name}: {error}; retrying in {delay:.1f}s",
                     ns=key[0], name=key[1], error=_describe(e), delay=delay)
            old = self._retries.pop(key, None)
            if old is not None and old.active():
                old.cancel()
            if not self._stopped:
                self._retries[key] = self.clock.callLater(delay, self._retry, key)
            return
        self._failures.pop(key, None)

    def _retry(self, key: Key) -> None:
        self._retries.pop(key, None)
        self.enqueue(key)

    # -- one Connector --------------------------------------------------------

    def _connector(self, key: Key) -> tuple[JSON, Connector | InvalidObject] | None:
        cached = self.inventory.connector(key)
        fresh = self._fresh_connectors.get(key)
        if fresh is not None:
            cached_rv = resource_version_of(cached[0]) if cached is not None else None
            if cached_rv == fresh[0]:
                raw = fresh[1]
                if raw is None:
                    return None
                try:
                    return raw, parse_connector(raw)
                except InvalidObject as e:
                    return raw, e
            del self._fresh_connectors[key]
        return cached

    def _service(self, key: Key) -> JSON | None:
        cached = self.inventory.service(key)
        fresh = self._fresh_services.get(key)
        if fresh is not None:
            cached_rv = resource_version_of(cached) if cached is not None else None
            if cached_rv == fresh[0]:
                return fresh[1]
            del self._fresh_services[key]
        return cached

    def _remember_service(self, key: Key, obj: JSON | None) -> None:
        cached = self.inventory.service(key)
        self._fresh_services[key] = (resource_version_of(cached) if cached else None, obj)

    def _remember_connector(self, key: Key, obj: JSON | None) -> None:
        cached = self.inventory.connector(key)
        self._fresh_connectors[key] = (resource_version_of(cached[0]) if cached else None, obj)

    async def _reconcile(self, key: Key) -> None:
        for _ in range(self.conflict_retries + 1):
            entry = self._connector(key)
            if entry is None:
                return
            raw, parsed = entry
            svc_key = (key[0], service_name(key[1]))
            decision = decide(raw, parsed, self.inventory.world(), self._service(svc_key),
                              format_time(self.clock.seconds()))
            try:
                if decision.service is not None:
                    await self._apply_service(svc_key, decision.service)
                if decision.status is not None:
                    await self._write_status(key, raw, decision.status)
                return
            except KubeError as e:
                if not (e.conflict or e.not_found):
                    raise
                self.counters.conflicts += 1
                log.debug("Connector {ns}/{name}: {error}; reading it again",
                          ns=key[0], name=key[1], error=str(e))
        raise _Conflicts(f"still conflicting after {self.conflict_retries + 1} attempts")

    async def _write_allowed(self) -> None:
        assert self._bucket is not None
        await self._bucket.acquire()
        if self._stopped or not self.is_leader():
            raise _NotLeader()

    async def _apply_service(self, key: Key, action: ServiceAction) -> None:
        ns, name = key
        await self._write_allowed()
        try:
            if action.verb == "create":
                created = await self.client.create(SERVICES, ns, action.body)
                self.counters.creates += 1
                self._remember_service(key, created)
                log.info("created Service {ns}/{name}", ns=ns, name=name)
            elif action.verb == "replace":
                replaced = await self.client.replace(SERVICES, ns, name, action.body)
                self.counters.replaces += 1
                self._remember_service(key, replaced)
                log.info("put back Service {ns}/{name}", ns=ns, name=name)
            else:
                uid = action.body["metadata"].get("uid")
                try:
                    await self.client.delete(SERVICES, ns, name,
                                             preconditions={"uid": uid} if uid else None)
                except KubeError as e:
                    if not (e.not_found or e.conflict):
                        raise
                self.counters.deletes += 1
                self._remember_service(key, None)
                log.info("deleted Service {ns}/{name}: its class has no proxy", ns=ns, name=name)
        except KubeError as e:
            if e.conflict or e.not_found:
                await self._reread_service(key)
            raise

    async def _get_or_none(self, resource: Any, key: Key) -> JSON | None:
        """The live object, or C{None} when it is gone."""
        try:
            obj: JSON = await self.client.get(resource, key[0], key[1])
        except KubeError as e:
            if not e.not_found:
                raise
            return None
        return obj

    async def _reread_service(self, key: Key) -> None:
        self._remember_service(key, await self._get_or_none(SERVICES, key))

    async def _write_status(self, key: Key, raw: JSON, status: JSON) -> None:
        await self._write_allowed()
        body = {**raw, "status": status}
        try:
            written = await self.client.replace_status(CONNECTORS, key[0], key[1], body)
        except KubeError as e:
            if e.conflict or e.not_found:
                self._remember_connector(key, await self._get_or_none(CONNECTORS, key))
            raise
        self.counters.status_writes += 1
        self._remember_connector(key, written)


def _describe(e: BaseException) -> str:
    return str(e) if isinstance(e, KubeError | _Conflicts) else f"{type(e).__name__}: {e}"


__all__ = ["Counters", "IInventory", "TokenBucket", "Writer"]
