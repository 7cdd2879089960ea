# -*- test-case-name: tests.test_kube_leader -*-
"""
Leader election over a C{coordination.k8s.io/v1} Lease, following
client-go's C{leaderelection} package so that mixed fleets agree:

  - the holder renews C{spec.renewTime} every C{retry_period};
  - the others watch the record and may take the Lease once it has not
    changed for C{leaseDurationSeconds} *of their own clock* (no clock
    comparison between machines), or at once when its holder is empty;
  - a leader that cannot renew for C{renew_deadline} stops leading;
  - a leader that stops cleanly releases the Lease (empty holder), so the
    next replica takes over within one C{retry_period}.

A holder that dies is thus replaced within C{leaseDurationSeconds} plus up
to two retry periods of its last renewal.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

from attrs import define, field
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger, LogLevel

from connectors_proxy.kube.client import JSON, LEASES, IKubeClient, KubeError

log = Logger()


def format_micro_time(seconds: float) -> str:
    """C{metav1.MicroTime}: RFC 3339 with microseconds, UTC."""
    whole = int(seconds)
    micros = int(round((seconds - whole) * 1_000_000))
    if micros == 1_000_000:
        whole, micros = whole + 1, 0
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{micros:06d}Z"


@define
class LeaderElector:
    """
    Competes for Lease C{namespace/name} as C{identity}.

    @ivar is_leader: whether this replica holds the Lease right now.
    """

    client: IKubeClient
    clock: IReactorTime
    namespace: str
    name: str
    identity: str
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    random: Callable[[], float] = random.random
    is_leader: bool = False
    _callbacks: list[Callable[[bool], None]] = field(factory=list)
    _observed: tuple[Any, ...] | None = None
    _observed_at: float = 0.0
    _last_renew: float | None = None
    _lease: JSON | None = None
    _running: bool = False
    _loop: Deferred[None] | None = None

    def on_change(self, callback: Callable[[bool], None]) -> None:
        """C{callback(is_leader)} after every change of leadership."""
        self._callbacks.append(callback)

    def start(self) -> None:
        if self._running:
            return
        self._running = True
        self._loop = Deferred.fromCoroutine(self._run())
        self._loop.addErrback(lambda f: f.trap(CancelledError))

    def stop(self, release: bool = True) -> Deferred[None]:
        """
        Stop competing.  A leader gives the Lease up (unless C{release} is
        false, which tests use to play a crashed replica).
        """
        self._running = False
        if self._loop is not None:
            self._loop.cancel()
            self._loop = None
        was_leader = self.is_leader
        self._set_leader(False)
        if release and was_leader and self._lease is not None:
            return Deferred.fromCoroutine(self._release())
        return succeed(None)

    async def _run(self) -> None:
        while self._running:
            ok = await self._try_acquire_or_renew()
            now = self.clock.seconds()
            if ok:
                self._last_renew = now
                self._set_leader(True)
            elif self.is_leader and (
                self._last_renew is None or now - self._last_renew >= self.renew_deadline
                or self._held_by_other()
            ):
                log.emit(LogLevel.warn, "lost the lease {ns}/{name}", ns=self.namespace,
                         name=self.name)
                self._set_leader(False)
            delay = self.retry_period
            if not self.is_leader:
                # client-go's JitterUntil(retryPeriod, 1.2): replicas that
                # started together do not hit the API server together.
                delay *= 1 + 1.2 * self.random()
            await deferLater(self.clock, delay)

    def _held_by_other(self) -> bool:
        holder = ((self._lease or {}).get("spec") or {}).get("holderIdentity") or ""
        return bool(holder) and holder != self.identity

    def _set_leader(self, leader: bool) -> None:
        if leader == self.is_leader:
            return
        self.is_leader = leader
        if leader:
            log.info("{identity} now leads {ns}/{name}", identity=self.identity,
                     ns=self.namespace, name=self.name)
        for callback in list(self._callbacks):
            callback(leader)

    def _record(self, spec: JSON, lease: JSON) -> tuple[Any, ...]:
        return (spec.get("holderIdentity"), spec.get("renewTime"),
                spec.get("leaseTransitions"), (lease.get("metadata") or {}).get("resourceVersion"))

    async def _try_acquire_or_renew(self) -> bool:
        now = self.clock.seconds()
        stamp = format_micro_time(now)
        try:
            try:
                lease = await self.client.get(LEASES, self.namespace, self.name)
            except KubeError as e:
                if not e.not_found:
                    raise
                created = await self.client.create(LEASES, self.namespace, {
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": self._spec(stamp, stamp, 0),
                })
                self._observe(created, now)
                return True
            spec = lease.get("spec") or {}
            self._lease = lease
            record = self._record(spec, lease)
            if record != self._observed:
                self._observed, self._observed_at = record, now
            holder = spec.get("holderIdentity") or ""
            duration = spec.get("leaseDurationSeconds") or self.lease_duration
            if holder and holder != self.identity and self._observed_at + duration > now:
                return False
            if holder == self.identity:
                new_spec = self._spec(spec.get("acquireTime") or stamp, stamp,
                                      spec.get("leaseTransitions") or 0)
            else:
                new_spec = self._spec(stamp, stamp, (spec.get("leaseTransitions") or 0) + 1)
            updated = await self.client.replace(LEASES, self.namespace, self.name,
                                                {**lease, "spec": new_spec})
            self._observe(updated, now)
            return True
        except KubeError as e:
            if not e.conflict:
                log.emit(LogLevel.warn, "lease {ns}/{name}: {error}", ns=self.namespace,
                         name=self.name, error=str(e))
            return False
        except CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the API server is away: try again later
            log.emit(LogLevel.warn, "lease {ns}/{name}: {error}", ns=self.namespace,
                     name=self.name, error=f"{type(e).__name__}: {e}")
            return False

    def _observe(self, lease: JSON, now: float) -> None:
        self._lease = lease
        self._observed = self._record(lease.get("spec") or {}, lease)
        self._observed_at = now

    def _spec(self, acquired: str, renewed: str, transitions: int) -> JSON:
        return {"holderIdentity": self.identity,
                "leaseDurationSeconds": int(self.lease_duration),
                "acquireTime": acquired, "renewTime": renewed,
                "leaseTransitions": transitions}

    async def _release(self) -> None:
        lease = self._lease
        assert lease is not None
        spec = dict(lease.get("spec") or {})
        if spec.get("holderIdentity") != self.identity:
            return
        stamp = format_micro_time(self.clock.seconds())
        # As client-go does: an empty holder and a 1 s duration, so the
        # others take over at their next try.
        spec.update(holderIdentity="", leaseDurationSeconds=1, renewTime=stamp, acquireTime=stamp)
        try:
            await self.client.replace(LEASES, self.namespace, self.name, {**lease, "spec": spec})
        except Exception as e:  # noqa: BLE001 - best effort; the lease expires anyway
            log.emit(LogLevel.warn, "could not release lease {ns}/{name}: {error}",
                     ns=self.namespace, name=self.name, error=f"{type(e).__name__}: {e}")
