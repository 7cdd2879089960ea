"""
systemd integration: readiness notification over C{$NOTIFY_SOCKET}, and the
daemon started by C{systemd-socket-activate} (Debian's systemd package)
serving on the listening sockets it inherits (C{systemd:} endpoints), with
C{READY=1}, C{RELOADING=1} on C{SIGHUP} and C{STOPPING=1} on C{SIGTERM}.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from typing import Any

import treq
from attrs import define, field
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.static import Data

from connectors_proxy.ops.sdnotify import ReadyNotifier, notify

from .support.procs import free_port, require, start_server
from .support.proxy import ROOT, rest_upstream_setup


def datagram_socket(test: SynchronousTestCase, abstract: bool = False) -> tuple[socket.socket, str]:
    """A bound AF_UNIX datagram socket, and the C{NOTIFY_SOCKET} value that names it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    test.addCleanup(sock.close)
    sock.settimeout(10)
    if abstract:
        name = f"connectors-proxy-test-{os.getpid()}-{id(sock)}"
        sock.bind("\0" + name)
        return sock, "@" + name
    # AF_UNIX paths are short (108 bytes): not under the trial temp folder.
    folder = tempfile.mkdtemp(prefix="cp-notify-", dir="/tmp")
    test.addCleanup(shutil.rmtree, folder, True)
    path = os.path.join(folder, "notify")
    sock.bind(path)
    return sock, path


class NotifyTests(SynchronousTestCase):
    def test_path_socket(self) -> None:
        sock, address = datagram_socket(self)
        self.assertTrue(notify("READY=1\nSTATUS=serving", {"NOTIFY_SOCKET": address}))
        self.assertEqual(sock.recv(4096), b"READY=1\nSTATUS=serving")

    def test_abstract_socket(self) -> None:
        sock, address = datagram_socket(self, abstract=True)
        self.assertTrue(notify("STOPPING=1", {"NOTIFY_SOCKET": address}))
        self.assertEqual(sock.recv(4096), b"STOPPING=1")

    def test_not_under_systemd(self) -> None:
        self.assertFalse(notify("READY=1", {}))

    def test_failures_do_not_raise(self) -> None:
        self.assertFalse(notify("READY=1", {"NOTIFY_SOCKET": "/nonexistent/notify"}))
        self.assertFalse(notify("READY=1", {"NOTIFY_SOCKET": "vsock:2:1234"}))


@define
class RunningClock(Clock):
    """A L{Clock} that is already running (for C{callWhenRunning})."""

    def __attrs_post_init__(self) -> None:
        Clock.__init__(self)

    def callWhenRunning(self, f: Any, *args: Any) -> None:
        f(*args)


@define
class Sent:
    messages: list[str] = field(factory=list)

    def __call__(self, message: str) -> bool:
        self.messages.append(message)
        return True


class ReadyNotifierTests(SynchronousTestCase):
    def test_waits_for_the_first_load(self) -> None:
        clock, sent, ready = RunningClock(), Sent(), [False]
        notifier = ReadyNotifier(clock, lambda: ready[0], send=sent)
        notifier.startService()
        clock.advance(1)
        self.assertEqual(sent.messages, [])
        ready[0] = True
        clock.advance(0.2)
        self.assertEqual(len(sent.messages), 1)
        self.assertTrue(sent.messages[0].startswith("READY=1\n"))
        self.assertIn(f"MAINPID={os.getpid()}", sent.messages[0])
        clock.advance(10)
        self.assertEqual(len(sent.messages), 1)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_stop_cancels_the_wait(self) -> None:
        clock, sent = RunningClock(), Sent()
        notifier = ReadyNotifier(clock, lambda: False, send=sent)
        notifier.startService()
        notifier.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])


class SocketActivationTests(TestCase):
    timeout = 90

    def test_serves_through_inherited_sockets(self) -> Deferred[None]:
        async def run() -> None:
            activate = require("systemd-socket-activate")
            root = Resource()
            root.putChild(b"hello", Data(b"hello from upstream\n", "text/plain"))
            args, token = rest_upstream_setup(self, root, "api", token_prefix="sd")
            notifications, address = datagram_socket(self)
            port, admin = free_port(), free_port()
            argv = [
                activate, "-l", f"127.0.0.1:{port}", "-l", f"127.0.0.1:{admin}", "--fdname=proxy:admin",
                # systemd-socket-activate gives its child a minimal environment.
                "-E", f"PYTHONPATH={ROOT}", "-E", f"NOTIFY_SOCKET={address}",
                sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.exit(run())",
                "-n", "--pidfile=", "connectors-proxy",
                "--listen", "systemd:domain=INET:name=proxy", "--admin", "systemd:domain=INET:name=admin", *args,
            ]
            # The port accepts at once (systemd-socket-activate holds it); the
            # first connection starts the daemon, which then serves it.
            server = await start_server(self, argv, port=port, name="connectors-proxy")

            response = await treq.get(f"http://127.0.0.1:{port}/namespaces/team/connectors/api/hello",
                                      headers={"Authorization": f"Bearer {token}"}, persistent=False)
            self.assertEqual((response.code, await response.content()), (200, b"hello from upstream\n"))
            ready = await treq.get(f"http://127.0.0.1:{admin}/readyz", persistent=False)
            self.assertEqual((ready.code, await ready.content()), (200, b"ready\n"))

            message = await threads.deferToThread(notifications.recv, 4096)
            self.assertEqual(message.decode().split("\n"),
                             ["READY=1", "STATUS=serving", f"MAINPID={server.process.pid}"])

            # SIGHUP reloads without dropping an open keep-alive connection.
            kept = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            self.addCleanup(kept.close)

            def get() -> int:
                kept.request("GET", "/namespaces/team/connectors/api/hello",
                             headers={"Authorization": f"Bearer {token}"})
                answer = kept.getresponse()
                answer.read()
                return answer.status

            self.assertEqual(await threads.deferToThread(get), 200)
            os.kill(server.process.pid, signal.SIGHUP)
            self.assertEqual(await threads.deferToThread(notifications.recv, 4096),
                             b"RELOADING=1\nSTATUS=reloading")
            self.assertEqual(await threads.deferToThread(notifications.recv, 4096), b"READY=1\nSTATUS=serving")
            self.assertEqual(await threads.deferToThread(get), 200)
            self.assertIsNone(server.process.poll())

            os.kill(server.process.pid, signal.SIGTERM)
            self.assertEqual(await threads.deferToThread(notifications.recv, 4096), b"STOPPING=1\nSTATUS=draining")
            deadline = time.monotonic() + 10
            while server.process.poll() is None:
                if time.monotonic() > deadline:
                    self.fail("the daemon did not exit after SIGTERM")
                await deferLater(reactor, 0.05, lambda: None)
            self.assertEqual(server.process.returncode, 0, server.log()[-3000:])
            log = server.log()
            self.assertIn("reloaded on SIGHUP", log)
            self.assertNotIn("Traceback", log)

        return Deferred.fromCoroutine(run())
