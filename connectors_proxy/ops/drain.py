# -*- test-case-name: tests.test_drain -*-
"""
Stopping without breaking anyone, and reloading without stopping.

C{SIGTERM} (and C{SIGINT}): C{/readyz} turns 503 at once, the proxy
listeners stop accepting, idle keep-alive connections are closed, and
connections with a request in flight (a 1 GiB layer, a long clone) finish
it and then close; after C{--drain-timeout} seconds whatever is left is cut.
Then the process exits 0.  A second C{SIGTERM} cuts at once.  The admin
listener keeps answering during the drain (kubelet probes, scrapes).

C{SIGHUP}: manifests, tokens and listener certificates (C{ssl:} and
C{cptls:} listeners) are read again; open connections are untouched (a new
certificate is used for new TLS connections).

Twisted's own C{SIGTERM} handler makes C{twistd} exit by re-raising the
signal (status 143 in Kubernetes); ours stops the reactor without that, so
a clean drain exits 0.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

from attrs import define, field
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import SSL4ServerEndpoint, serverFromString
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IDelayedCall, IOpenSSLServerConnectionCreator, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from connectors_proxy import compat

log = Logger()

DEFAULT_TIMEOUT = 30.0
POLL_SECONDS = 0.1


def _ignore(message: str) -> object:
    return None


@define
class Drainer:
    """
    Drains the proxy listeners' connections.

    @ivar sites: C{ProxySite}s; their C{channels} are the open connections.
    @ivar listeners: the services listening for those sites; stopped first.
    @ivar notify: sends a systemd state line (L{connectors_proxy.ops.sdnotify.notify}).
    """

    clock: IReactorTime
    timeout: float = DEFAULT_TIMEOUT
    sites: list[Any] = field(factory=list)
    listeners: list[IService] = field(factory=list)
    notify: Callable[[str], object] = _ignore
    interval: float = POLL_SECONDS
    draining: bool = False
    _aborted: bool = False
    _wake: Deferred[None] | None = None
    _timer: IDelayedCall | None = None
    _waiters: list[Deferred[int]] = field(factory=list)
    _closing: set[Any] = field(factory=set)
    _result: Any = None

    def connections(self) -> list[Any]:
        return [channel for site in self.sites for channel in list(site.channels)]

    def drain(self) -> Deferred[int]:
        """
        Stop accepting, let requests in flight finish (up to C{timeout}),
        close every connection.  Fires with the number of connections cut
        at the deadline (0 when everything finished).  Calling it again
        waits for the same drain.
        """
        d: Deferred[int] = Deferred()
        if self._result is not None:
            self._fire(d, self._result)
            return d
        self._waiters.append(d)
        if not self.draining:
            self.draining = True
            Deferred.fromCoroutine(self._drain()).addBoth(self._finished)
        return d

    def _finished(self, result: Any) -> None:
        self._result = result
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            self._fire(d, result)

    @staticmethod
    def _fire(d: Deferred[int], result: Any) -> None:
        if isinstance(result, Failure):
            d.errback(result)
        else:
            d.callback(result)

    def abort(self) -> None:
        """Cut the remaining connections now instead of at the deadline."""
        self._aborted = True
        self._wakeup()

    async def _drain(self) -> int:
        started = self.clock.seconds()
        self.notify("STOPPING=1\nSTATUS=draining")
        channels = self.connections()
        log.info("draining: not accepting new connections; {connections} open, {requests} requests in flight; "
                 "waiting up to {timeout}s", connections=len(channels),
                 requests=sum(len(c.requests) for c in channels), timeout=self.timeout, event="drain_started")
        for listener in self.listeners:
            if listener.running:
                try:
                    await maybeDeferred(listener.stopService)
                except Exception:
                    log.failure("stopping a listener failed")
        deadline = started + self.timeout
        while True:
            busy, flushing = self._sweep()
            if not busy and not flushing:
                log.info("drained in {seconds:.1f}s", seconds=self.clock.seconds() - started, cut=0,
                         event="drain_finished")
                return 0
            now = self.clock.seconds()
            if self._aborted or now >= deadline:
                for channel in busy:
                    for request in channel.requests:
                        # The access line says the drain cut it, not the client.
                        request.fault = "drain"
                for channel in busy + flushing:
                    if channel.transport is not None:
                        channel.transport.abortConnection()
                log.warn("drain {why}: cut {count} connections with requests in flight, {flushing} still sending "
                         "finished responses", why="aborted" if self._aborted else f"timed out after {self.timeout}s",
                         count=len(busy), flushing=len(flushing), cut=len(busy) + len(flushing),
                         seconds=now - started, event="drain_finished")
                return len(busy) + len(flushing)
            await self._sleep(min(self.interval, deadline - now))

    def _sweep(self) -> tuple[list[Any], list[Any]]:
        """
        Close idle connections, mark busy ones to close after their request.
        Returns the busy ones, and those closing but still open.

        A connection whose response has ended may still hold its last bytes
        in the transport's buffer (a slow reader, a paused producer): it
        stays in C{site.channels} until they are written and the connection
        is lost.  Stopping the reactor before that would cut the end of a
        response the client was promised, so those count until they go.
        """
        busy, flushing = [], []
        for site in self.sites:
            for channel in list(site.channels):
                if channel.requests:
                    busy.append(channel)
                    self._close_after_request(channel)
                    continue
                if channel not in self._closing:
                    self._closing.add(channel)
                    channel.loseConnection()
                if channel in site.channels:
                    flushing.append(channel)
        return busy, flushing

    @staticmethod
    def _close_after_request(channel: Any) -> None:
        if channel.persistent:
            channel.persistent = False
            for request in channel.requests:
                if not request.startedWriting:
                    request.setHeader(b"Connection", b"close")

    def _sleep(self, seconds: float) -> Deferred[None]:
        self._wake = Deferred()
        self._timer = self.clock.callLater(seconds, self._wakeup)
        return self._wake

    def _wakeup(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        wake, self._wake = self._wake, None
        if wake is not None and not wake.called:
            wake.callback(None)


class DrainingService(MultiService):
    """
    A L{MultiService} that, when stopped, first lets its L{Drainer} drain
    (the listeners it names stop first) and only then stops its other
    children, so the admin listener and the object sources serve until the
    last request is done.
    """

    drainer: Drainer | None = None

    def stopService(self) -> Deferred[Any]:
        if self.drainer is None:
            return super().stopService()  # type: ignore[no-any-return]
        return Deferred.fromCoroutine(self._drain_then_stop(self.drainer))

    async def _drain_then_stop(self, drainer: Drainer) -> None:
        try:
            await drainer.drain()
        except Exception:
            log.failure("drain failed")
        Service.stopService(self)
        # The listeners are already stopped; stopping one twice is an error.
        await DeferredList([maybeDeferred(service.stopService) for service in reversed(list(self))
                            if service.running], consumeErrors=True)


@define
class Reloader:
    """
    What C{SIGHUP} runs: named actions, each failure logged, none stopping
    the others.  An action fails by raising or by returning (or firing
    with) C{False}, having said why itself; then the closing line says what
    failed instead of "reloaded".
    """

    notify: Callable[[str], object] = _ignore
    actions: list[tuple[str, Callable[[], object]]] = field(factory=list)

    def add(self, name: str, action: Callable[[], object]) -> None:
        self.actions.append((name, action))

    def reload(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._reload())

    async def _reload(self) -> None:
        self.notify("RELOADING=1\nSTATUS=reloading")
        failed = []
        for name, action in self.actions:
            try:
                result = await maybeDeferred(action)
            except Exception:
                log.failure("reloading {what} failed", what=name)
                failed.append(name)
                continue
            if result is False:
                failed.append(name)
        done = [name for name, _ in self.actions if name not in failed]
        if failed:
            log.warn("SIGHUP: reloading {failed} failed (see above), keeping the last good state; "
                     "reloaded: {what}", failed=", ".join(failed), what=", ".join(done) or "nothing",
                     event="reload", ok=False)
        else:
            log.info("reloaded on SIGHUP: {what}", what=", ".join(done) or "nothing", event="reload", ok=True)
        self.notify("READY=1\nSTATUS=serving")


@define
class SourceHealth:
    """
    Whether the last reload of each named source worked (fed by the
    sources' C{on_reload} callbacks), so that a reload that fixes an earlier
    error says it recovered, and C{SIGHUP} can tell a failed reload.
    """

    failed: dict[str, bool] = field(factory=dict)

    def reporter(self, name: str) -> Callable[[bool], None]:
        """The callback for source C{name}'s reloads."""
        def report(ok: bool) -> None:
            was_failing = self.failed.get(name, False)
            self.failed[name] = not ok
            if ok and was_failing:
                log.info("{what} recovered: the reload after the error above worked", what=name,
                         event="reload_recovered", source=name)
        return report

    def ok(self, *names: str) -> bool:
        """Whether none of C{names} is in a failed state."""
        return not any(self.failed.get(name, False) for name in names)


@define
class Signals(Service):
    """
    Installs the daemon's signal handlers once the reactor runs (after
    Twisted's own, which it replaces for C{SIGTERM} and C{SIGINT}).
    """

    reactor: Any
    drainer: Drainer
    reloader: Reloader
    install: Callable[[int, Any], object] = signal.signal
    stopping: bool = False

    def startService(self) -> None:
        super().startService()
        self.reactor.callWhenRunning(self._install)

    def _install(self) -> None:
        for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self.install(number, self._received)

    def _received(self, number: int, frame: object = None) -> None:
        # A signal handler runs between two bytecodes of whatever the main
        # thread was doing: hand the work to the reactor.
        self.reactor.callFromThread(self.handle, number)

    def handle(self, number: int) -> None:
        if number == signal.SIGHUP:
            self.reloader.reload()
        elif not self.stopping:
            self.stopping = True
            log.info("received {signal}: draining for up to {timeout}s, then exiting",
                     signal=signal.Signals(number).name, timeout=self.drainer.timeout, event="signal")
            try:
                self.reactor.stop()
            except ReactorNotRunning:
                pass
        else:
            log.info("received {signal} again: cutting the remaining connections",
                     signal=signal.Signals(number).name)
            self.drainer.abort()


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableServerTLS:
    """
    The TLS settings of an C{ssl:} listener, replaceable while it listens:
    each new connection uses the current settings, open ones keep theirs.
    """

    def __init__(self, current: Any, load: Callable[[], Any]) -> None:
        self.current = current
        self._load = load

    def serverConnectionForTLS(self, protocol: Any) -> Any:
        return self.current.serverConnectionForTLS(protocol)

    def reload(self) -> bool:
        """Read the certificate and key again; on error keep the old ones (and say why)."""
        try:
            fresh = self._load()
            # Build the context now, so a bad key fails here, not on the next handshake.
            fresh.getContext()
        except Exception as e:
            log.error("listener certificate not reloaded, keeping the old one: {error}", error=str(e) or repr(e))
            return False
        self.current = fresh
        return True


def reloadable_tls(service: Any, description: str, reactor: Any) -> Any:
    """
    What reloads the certificate of a listener's service, if it has one:
    for an C{ssl:} endpoint, a L{ReloadableServerTLS} put in place (before
    it starts listening); for an endpoint that brings its own reloadable
    TLS (C{cptls:}, whose C{tls} has C{reload() -> bool}), that; otherwise
    C{None}.
    """
    endpoint = getattr(service, "endpoint", None)
    own = getattr(endpoint, "tls", None)
    if callable(getattr(own, "reload", None)):
        return own
    if not isinstance(endpoint, SSL4ServerEndpoint):
        return None

    def load() -> Any:
        return compat.tls_context_factory(serverFromString(reactor, description))

    # SSL4ServerEndpoint hands its context factory to listenSSL when it
    # listens; there is no public way to replace it afterwards.
    wrapper = ReloadableServerTLS(compat.tls_context_factory(endpoint), load)
    compat.set_tls_context_factory(endpoint, wrapper)
    return wrapper
