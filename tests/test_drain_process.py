"""
Graceful shutdown of the real daemon: SIGTERM in the middle of a 500 MiB
download lets it finish, while C{/readyz} answers 503 and new connections
are refused, and the process then exits 0; a download that outlasts
C{--drain-timeout} is cut and the process still exits 0, on time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.static import File

from .support.procs import port_open, require, run
from .support.proxy import ProxyProcess, rest_upstream_setup, start_proxy_process

MiB = 1 << 20


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await sleep(0.02)


class DrainProcessTests(TestCase):
    timeout = 180

    async def _setup(self, size: int, extra: list[str]) -> tuple[ProxyProcess, str, str, str]:
        folder = self.mktemp()
        os.makedirs(folder)
        blob = os.path.join(folder, "blob")
        with open(blob, "wb") as f:
            # Sparse: served from the page cache's zero page, not the disk.
            f.truncate(size)
        root = Resource()
        root.putChild(b"blob", File(blob))
        args, token = rest_upstream_setup(self, root, "files", token_prefix="drain")
        proxy = await start_proxy_process(self, [*args, *extra])
        url = f"{proxy.url}/namespaces/team/connectors/files/blob"
        out = os.path.join(folder, "download")
        return proxy, url, f"Authorization: Bearer {token}", out

    async def _readyz(self, proxy: ProxyProcess) -> int:
        response = await treq.get(f"http://127.0.0.1:{proxy.admin_port}/readyz", persistent=False)
        await response.content()
        return int(response.code)

    def _exited(self, proxy: ProxyProcess) -> bool:
        return proxy.server.process.poll() is not None

    def test_sigterm_mid_download(self) -> Deferred[None]:
        async def run_test() -> None:
            curl = require("curl")
            size = 500 * MiB
            proxy, url, auth, out = await self._setup(size, ["--drain-timeout", "120"])
            self.assertEqual(await self._readyz(proxy), 200)
            # Rate-limited so the download is still running when SIGTERM lands.
            download: Deferred[subprocess.CompletedProcess[bytes]] = run(
                [curl, "-sS", "--limit-rate", "100M", "-H", auth, "-o", out, "-w", "%{http_code} %{size_download}",
                 url])
            await wait_until(lambda: os.path.exists(out) and os.path.getsize(out) > 40 * MiB, 60,
                             "the download to start")

            os.kill(proxy.server.process.pid, signal.SIGTERM)
            await wait_until(lambda: not port_open(proxy.port), 5, "the proxy listener to close")
            self.assertEqual(await self._readyz(proxy), 503)
            self.assertFalse(download.called, "the download ended before the drain could be observed")
            self.assertLess(os.path.getsize(out), size)
            self.assertFalse(self._exited(proxy))
            # New connections are refused while the old one streams on.
            for _ in range(3):
                self.assertFalse(port_open(proxy.port))
                await sleep(0.2)

            result = await download
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertEqual(result.stdout.decode(), f"200 {size}")
            self.assertEqual(os.path.getsize(out), size)
            await wait_until(lambda: self._exited(proxy), 10, "the proxy to exit")
            self.assertEqual(proxy.server.process.returncode, 0, proxy.log()[-3000:])
            log = proxy.log()
            # (The test's own probe may race the signal and count as one more open connection.)
            self.assertRegex(log, r"draining: not accepting new connections; \d open, 1 requests in flight")
            self.assertIn("drained in", log)
            self.assertNotIn("Traceback", log)

        return Deferred.fromCoroutine(run_test())

    def test_drain_timeout_cuts_exits_0_without_traceback(self) -> Deferred[None]:
        async def run_test() -> None:
            log = await self._cut()
            self.assertNotIn("Traceback", log)

        return Deferred.fromCoroutine(run_test())

    async def _cut(self) -> str:
        curl = require("curl")
        proxy, url, auth, out = await self._setup(64 * MiB, ["--drain-timeout", "1"])
        download = run([curl, "-sS", "--limit-rate", "1M", "-H", auth, "-o", out, url])
        await wait_until(lambda: os.path.exists(out) and os.path.getsize(out) > 0, 30, "the download to start")
        sent = time.monotonic()
        os.kill(proxy.server.process.pid, signal.SIGTERM)
        await wait_until(lambda: self._exited(proxy), 10, "the proxy to exit")
        took = time.monotonic() - sent
        self.assertGreaterEqual(took, 0.9)
        self.assertLess(took, 5)
        self.assertEqual(proxy.server.process.returncode, 0, proxy.log()[-3000:])
        result = await download
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("cut 1 connections with requests in flight", proxy.log())
        return proxy.log()
