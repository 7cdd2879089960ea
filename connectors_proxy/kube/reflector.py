# -*- test-case-name: tests.test_kube_reflector -*-
"""
A local, always-readable copy of one kind of API object, kept current by
list + watch: the same contract as client-go's reflector.

  - list (paged), then watch from the list's resourceVersion with bookmarks
    on, remembering the last resourceVersion seen (bookmarks move it too);
  - a C{410 Gone} (HTTP status or C{ERROR} event) means our resourceVersion
    was compacted away: list again and tell listeners only what changed;
  - any other error: reconnect after a capped, jittered exponential backoff;
  - while the API server is away the last known objects stay readable, and
    after C{stale_after} seconds of trying the reflector says it is stale.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, Protocol

from attrs import define, field
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger, LogLevel

from connectors_proxy.kube.client import JSON, IKubeClient, IWatch, KubeError, Resource

log = Logger()

Key = tuple[str, str]
"""C{(namespace, name)}; the namespace is C{""} for cluster-scoped objects."""


def key_of(obj: JSON) -> Key:
    meta = obj.get("metadata") or {}
    return (meta.get("namespace") or "", meta.get("name") or "")


def resource_version_of(obj: JSON) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


def strip_managed_fields(obj: JSON) -> JSON:
    """Drop C{metadata.managedFields}: often the largest part, never used here."""
    meta = obj.get("metadata")
    if isinstance(meta, dict) and "managedFields" in meta:
        meta = dict(meta)
        del meta["managedFields"]
        obj = dict(obj, metadata=meta)
    return obj


@define
class Item:
    """What the reflector keeps per object: its resourceVersion and the
    transformed object."""

    resource_version: str
    value: Any


class ReflectorListener(Protocol):
    def __call__(self, event: str, key: Key, old: Any, new: Any) -> None:
        """
        C{event} is C{ADDED}, C{MODIFIED} or C{DELETED}; C{old}/C{new} are
        the transformed values (C{None} where there is none).
        """


@define
class Backoff:
    """
    Capped exponential backoff with jitter (client-go's defaults: 0.8 s,
    doubling, 30 s cap, up to 100% jitter), so that many replicas that lost
    the API server at the same moment do not come back in lockstep.
    """

    initial: float = 0.8
    factor: float = 2.0
    cap: float = 30.0
    jitter: float = 1.0
    random: Callable[[], float] = random.random
    _next: float | None = None

    def delay(self) -> float:
        base = self.initial if self._next is None else self._next
        self._next = min(base * self.factor, self.cap)
        return min(base * (1 + self.jitter * self.random()), self.cap * (1 + self.jitter))

    def reset(self) -> None:
        self._next = None


class _Gone(Exception):
    """Our resourceVersion is too old: list again."""


@define
class Reflector:
    """
    Keeps C{items} equal to the API server's set of C{resource} objects.

    @ivar items: C{Key -> Item}; readable at any time, also while away.
    @ivar synced: fires once, after the first complete list.
    @ivar stale: C{True} while the API server has been unreachable for more
        than C{stale_after} seconds.
    """

    client: IKubeClient
    clock: IReactorTime
    resource: Resource
    namespace: str | None = None
    label_selector: str | None = None
    field_selector: str | None = None
    transform: Callable[[JSON], Any] = strip_managed_fields
    page_size: int = 500
    watch_timeout: int = 300
    stale_after: float = 30.0
    backoff: Backoff = field(factory=Backoff)
    random: Callable[[], float] = random.random

    items: dict[Key, Item] = field(factory=dict)
    resource_version: str | None = None
    synced: Deferred[None] = field(factory=Deferred)
    stale: bool = False
    connected: bool = False
    lists: int = 0
    watches: int = 0
    events: int = 0
    _listeners: list[ReflectorListener] = field(factory=list)
    _state_listeners: list[Callable[[Reflector], None]] = field(factory=list)
    _loop: Deferred[None] | None = None
    _running: bool = False
    _watch: IWatch | None = None
    _away_since: float | None = None
    # Failed attempts since the API server was last reachable, and the last
    # error logged at warn: an outage is logged when it starts, when its
    # error changes and when it ends (with the count), not once per retry.
    _failures: int = 0
    _logged_error: str | None = None
    _stale_call: IDelayedCall | None = None
    _sleep: Deferred[None] | None = None

    @property
    def name(self) -> str:
        return self.resource.plural

    @property
    def is_synced(self) -> bool:
        return self.synced.called

    def listen(self, listener: ReflectorListener) -> None:
        self._listeners.append(listener)

    def listen_state(self, listener: Callable[[Reflector], None]) -> None:
        """Called after C{synced}, C{stale} or C{connected} changed."""
        self._state_listeners.append(listener)

    def get(self, key: Key) -> Any:
        item = self.items.get(key)
        return None if item is None else item.value

    def start(self) -> None:
        if self._running:
            return
        self._running = True
        self._loop = Deferred.fromCoroutine(self._run())
        self._loop.addErrback(lambda f: f.trap(CancelledError))

    def stop(self) -> None:
        self._running = False
        loop, self._loop = self._loop, None
        if loop is not None:
            # Cancels whatever the loop waits for: a request, a watch (its
            # canceller closes the stream) or a backoff sleep.
            loop.cancel()
        if self._watch is not None:
            self._watch.stop()
        if self._sleep is not None:
            self._sleep.cancel()
        if self._stale_call is not None and self._stale_call.active():
            self._stale_call.cancel()
        self._stale_call = None

    async def _pause(self, seconds: float) -> None:
        if not self._running:
            return
        self._sleep = deferLater(self.clock, seconds)
        try:
            await self._sleep
        finally:
            self._sleep = None

    async def _run(self) -> None:
        while self._running:
            try:
                if self.resource_version is None:
                    await self._list()
                await self._watch_once()
            except CancelledError:
                raise
            except _Gone:
                log.info("{resource}: resourceVersion expired, listing again",
                         resource=self.name)
                self.resource_version = None
            except Exception as e:  # noqa: BLE001 - every failure means: back off, retry
                self._set_away()
                delay = self.backoff.delay()
                self._failures += 1
                if self._running:
                    # Once per kind of error (unreachable, or an HTTP status);
                    # each retry of the same kind at debug.
                    kind = _kind(e)
                    level = LogLevel.warn if kind != self._logged_error else LogLevel.debug
                    self._logged_error = kind
                    log.emit(level, "{resource}: {error}; retrying in {delay:.1f}s (attempt {failures}; "
                             "said again only when the error changes or the API server is back)",
                             resource=self.name, error=_describe(e), delay=delay, failures=self._failures)
                await self._pause(delay)

    async def _list(self) -> None:
        fresh: dict[Key, Item] = {}
        continue_: str | None = None
        while True:
            try:
                page = await self.client.list(
                    self.resource, namespace=self.namespace, label_selector=self.label_selector,
                    field_selector=self.field_selector, limit=self.page_size, continue_=continue_)
            except KubeError as e:
                if e.gone and continue_ is not None:
                    # The continue token expired mid-listing: start over.
                    fresh, continue_ = {}, None
                    continue
                raise
            for obj in page.get("items") or []:
                fresh[key_of(obj)] = Item(resource_version_of(obj), self.transform(obj))
            meta = page.get("metadata") or {}
            continue_ = meta.get("continue") or None
            if continue_ is None:
                break
        self.lists += 1
        self._replace(fresh, str(meta.get("resourceVersion") or ""))
        self.backoff.reset()
        self._set_connected()
        if not self.synced.called:
            self.synced.callback(None)
            self._state_changed()

    def _replace(self, fresh: dict[Key, Item], resource_version: str) -> None:
        old = self.items
        self.items = fresh
        self.resource_version = resource_version
        for key, item in fresh.items():
            before = old.get(key)
            if before is None:
                self._emit("ADDED", key, None, item.value)
            elif before.resource_version != item.resource_version:
                self._emit("MODIFIED", key, before.value, item.value)
        for key, before in old.items():
            if key not in fresh:
                self._emit("DELETED", key, before.value, None)

    async def _watch_once(self) -> None:
        timeout = int(self.watch_timeout * (1 + self.random()))
        try:
            watch = await self.client.watch(
                self.resource, self._on_event, namespace=self.namespace,
                resource_version=self.resource_version, label_selector=self.label_selector,
                field_selector=self.field_selector, timeout_seconds=timeout)
        except KubeError as e:
            if e.gone:
                raise _Gone() from None
            raise
        self.watches += 1
        self._set_connected()
        self._watch = watch
        started = self.clock.seconds()
        events_before = self.events
        try:
            await watch.done
        except Exception:
            if self._healthy(started, events_before):
                # A watch that worked for a while and then broke (an API
                # server restart, a load balancer timeout) is retried soon.
                self.backoff.reset()
            raise
        finally:
            self._watch = None
        if self._healthy(started, events_before):
            self.backoff.reset()
        else:
            # Closed at once with nothing in it: do not spin.
            await self._pause(self.backoff.delay())

    def _healthy(self, started: float, events_before: int) -> bool:
        return self.clock.seconds() - started >= 1.0 or self.events != events_before

    def _on_event(self, kind: str, obj: JSON) -> None:
        self.events += 1
        if kind == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise _Gone()
            raise KubeError.from_status(code if isinstance(code, int) else 500, obj)
        rv = resource_version_of(obj)
        if kind == "BOOKMARK":
            if rv:
                self.resource_version = rv
            return
        key = key_of(obj)
        if kind in ("ADDED", "MODIFIED"):
            before = self.items.get(key)
            value = self.transform(obj)
            self.items[key] = Item(rv, value)
            self._emit("ADDED" if before is None else "MODIFIED", key,
                       None if before is None else before.value, value)
        elif kind == "DELETED":
            removed = self.items.pop(key, None)
            if removed is not None:
                self._emit("DELETED", key, removed.value, None)
        else:
            raise KubeError(0, "BadEvent", f"unknown watch event type {kind!r}")
        if rv:
            self.resource_version = rv

    def _emit(self, event: str, key: Key, old: Any, new: Any) -> None:
        for listener in list(self._listeners):
            try:
                listener(event, key, old, new)
            except Exception:  # noqa: BLE001 - one bad listener must not stop the others
                log.failure("{resource}: listener failed", resource=self.name)

    def _set_connected(self) -> None:
        changed = not self.connected or self.stale
        self.connected = True
        away = None if self._away_since is None else self.clock.seconds() - self._away_since
        self._away_since = None
        if self._stale_call is not None and self._stale_call.active():
            self._stale_call.cancel()
        self._stale_call = None
        if self._failures:
            log.info("{resource}: API server reachable again after {failures} failed attempts in {seconds:.1f}s",
                     resource=self.name, failures=self._failures, seconds=away or 0.0)
        self._failures = 0
        self._logged_error = None
        self.stale = False
        if changed:
            self._state_changed()

    def _set_away(self) -> None:
        changed = self.connected
        self.connected = False
        if self._away_since is None:
            self._away_since = self.clock.seconds()
            self._stale_call = self.clock.callLater(self.stale_after, self._become_stale)
        if changed:
            self._state_changed()

    def _become_stale(self) -> None:
        self._stale_call = None
        if not self.connected and self._running:
            log.emit(LogLevel.warn, "{resource}: API server unreachable for {seconds:.0f}s; serving the last "
                     "known objects and reporting not ready", resource=self.name,
                     seconds=self.stale_after)
            self.stale = True
            self._state_changed()

    def _state_changed(self) -> None:
        for listener in list(self._state_listeners):
            listener(self)


def _describe(e: BaseException) -> str:
    if isinstance(e, KubeError):
        return str(e)
    # Agent's ResponseFailed and ResponseNeverReceived wrap the real reason.
    reasons = getattr(e, "reasons", None)
    if reasons:
        e = reasons[0].value
    return f"{type(e).__name__}: {e}"


def _kind(e: BaseException) -> str:
    """What an outage log line is about: an HTTP status, or not reaching the API server at all."""
    if isinstance(e, KubeError):
        return f"HTTP {e.code}"
    return "unreachable"
