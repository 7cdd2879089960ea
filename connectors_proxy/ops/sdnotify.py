# -*- test-case-name: tests.test_systemd -*-
"""
systemd readiness notification (C{Type=notify}), without libsystemd: one
datagram of C{KEY=VALUE} lines to the C{AF_UNIX} socket named by
C{$NOTIFY_SOCKET} (C{@name} is in the abstract namespace).

The daemon sends C{READY=1} once its listeners listen and its objects are
loaded, C{RELOADING=1}/C{READY=1} around a C{SIGHUP} reload, and
C{STOPPING=1} when it starts draining.  Without C{$NOTIFY_SOCKET} (not
under systemd) nothing is sent.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from typing import Any

from attrs import define
from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

log = Logger()

CHECK_SECONDS = 0.2


def notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """
    Send C{message} (newline-separated C{KEY=VALUE} lines) to systemd.
    Whether it was sent; never raises (a lost notification must not stop
    the daemon, and systemd's start timeout reports it).
    """
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.warn("NOTIFY_SOCKET {address!r} is not a Unix socket path; not notifying systemd", address=address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # Never wait on systemd from the reactor thread.
            sock.setblocking(False)
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
    except OSError as e:
        log.warn("could not notify systemd ({error}): {message!r}", error=e.strerror or str(e), message=message)
        return False
    return True


@define
class ReadyNotifier(Service):
    """
    Sends C{READY=1} once the reactor runs (the listeners listen by then)
    and C{is_ready()} is true (the first load or sync is done).
    """

    reactor: Any
    is_ready: Callable[[], bool]
    send: Callable[[str], object] = notify
    interval: float = CHECK_SECONDS
    sent: bool = False
    _pending: IDelayedCall | None = None

    def startService(self) -> None:
        super().startService()
        self.reactor.callWhenRunning(self._check)

    def _check(self) -> None:
        self._pending = None
        if not self.running or self.sent:
            return
        if self.is_ready():
            self.sent = True
            self.send(f"READY=1\nSTATUS=serving\nMAINPID={os.getpid()}")
        else:
            self._pending = self.reactor.callLater(self.interval, self._check)

    def stopService(self) -> Any:
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        return super().stopService()
