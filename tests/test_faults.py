"""
Faults, with real processes (issue 18): an API server that goes away
(connections refused through a relay that is cut, or a SIGSTOPped server
that accepts and never answers), a large manifest reload, a client that
leaves a paused upload, an upstream that resets mid-body, a refused
upstream connection.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import time
from typing import Any

import treq
import yaml
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.protocols import portforward
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from .support.procs import free_port, start_server
from .support.proxy import ROOT, basic_secret, connector, connector_class, start_proxy_process

TEAM = "team"


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


class Ok(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"ok\n"


class _RelayServer(portforward.ProxyServer):
    def connectionMade(self) -> None:
        self.factory.relay.open.add(self)  # type: ignore[attr-defined]
        super().connectionMade()

    def connectionLost(self, reason: Any) -> None:
        self.factory.relay.open.discard(self)  # type: ignore[attr-defined]
        super().connectionLost(reason)


class Relay:
    """
    A TCP relay to C{port} on loopback that a test can cut (every
    connection reset, new ones refused) and put back, as a network
    partition between the proxy and its API server looks.
    """

    def __init__(self, port: int) -> None:
        self.target = port
        self.port = free_port()
        self.open: set[_RelayServer] = set()
        self.factory = portforward.ProxyFactory("127.0.0.1", port)
        self.factory.protocol = _RelayServer
        self.factory.relay = self  # type: ignore[attr-defined]
        self.listener: Any = None

    def start(self) -> None:
        self.listener = reactor.listenTCP(self.port, self.factory, interface="127.0.0.1")

    async def cut(self) -> None:
        await self.listener.stopListening()
        self.listener = None
        for server in list(self.open):
            server.transport.abortConnection()
            if server.peer is not None:
                server.peer.transport.abortConnection()

    async def stop(self) -> None:
        if self.listener is not None:
            await self.cut()


async def start_fake_kube_process(test: TestCase, objects: list[dict[str, Any]]) -> tuple[Any, int, str]:
    """The fake API server as its own process (so it can be stopped with SIGSTOP)."""
    folder = test.mktemp()
    os.makedirs(folder)
    path = os.path.join(folder, "objects.yaml")
    with open(path, "w") as f:
        yaml.safe_dump_all(objects, f)
    port, admin = free_port(), secrets.token_hex(16)
    server = await start_server(test, [sys.executable, "-m", "connectors_proxy.testing.fakekube",
                                       "--port", str(port), "--token", admin, "--apply", path],
                                port=port, env={"PYTHONPATH": ROOT}, name="fakekube")

    def cont() -> None:
        # A stopped process would not act on the cleanup's SIGTERM.
        if server.process.poll() is None:
            os.kill(server.process.pid, signal.SIGCONT)
    test.addCleanup(cont)
    return server, port, admin


def kubeconfig(test: TestCase, port: int, token: str) -> str:
    path = test.mktemp() + ".kubeconfig"
    config = {"apiVersion": "v1", "kind": "Config", "current-context": "c",
              "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
              "users": [{"name": "u", "user": {"token": token}}],
              "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u",
                                                     "namespace": "connectors-system"}}]}
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return path


def cluster_objects(upstream: str) -> list[dict[str, Any]]:
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": TEAM}},
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "connectors-system"}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "builder", "namespace": TEAM}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": "use-connectors", "namespace": TEAM},
         "rules": [{"apiGroups": ["connectors.alauda.io"], "resources": ["connectors"], "verbs": ["get"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "builder", "namespace": TEAM},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "use-connectors"},
         "subjects": [{"kind": "ServiceAccount", "name": "builder", "namespace": TEAM}]},
        connector_class("rest"),
        basic_secret(TEAM, "creds", "robot", "pw"),
        connector(TEAM, "api", "rest", upstream, secret="creds"),
    ]


class ApiServerOutageTests(TestCase):
    """
    Cluster mode through an API server outage: the proxy process serves
    from the last review answers within C{--review-stale-seconds}, refuses
    (503, at once) after it, never waits long on a hung API server, and
    logs the outage once each way without tracebacks.
    """

    timeout = 240

    def test_cut_and_sigstop(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._cut_and_sigstop())

    async def _cut_and_sigstop(self) -> None:
        upstream = reactor.listenTCP(0, Site(Ok()), interface="127.0.0.1")
        self.addCleanup(upstream.stopListening)
        fake, fake_port, admin = await start_fake_kube_process(
            self, cluster_objects(f"http://127.0.0.1:{upstream.getHost().port}"))
        relay = Relay(fake_port)
        relay.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(relay.stop()))
        r = await treq.post(f"http://127.0.0.1:{fake_port}/api/v1/namespaces/{TEAM}/serviceaccounts/builder/token",
                            json={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}},
                            headers={"Authorization": f"Bearer {admin}"}, persistent=False)
        self.assertEqual(r.code, 201, await r.text())
        token = json.loads(await r.content())["status"]["token"]
        stale = 20.0
        proxy = await start_proxy_process(self, [
            "--kubeconfig", kubeconfig(self, relay.port, admin), "--review-cache-seconds", "2",
            "--review-stale-seconds", str(stale)])
        url = f"{proxy.url}/namespaces/{TEAM}/connectors/api/x"

        async def get() -> tuple[float, int, float]:
            start = time.monotonic()
            try:
                response = await treq.get(url, headers={"Authorization": f"Bearer {token}"},
                                          persistent=False, timeout=30)
                await response.content()
                code = response.code
            except Exception:  # noqa: BLE001 - counted as a failure, not a status
                code = 0
            return start, code, time.monotonic() - start

        async def run(seconds: float) -> list[tuple[float, int, float]]:
            results = []
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                results.append(await get())
                await sleep(0.25)
            return results

        deadline = time.monotonic() + 20
        while (await get())[1] != 200:
            self.assertLess(time.monotonic(), deadline, proxy.log()[-3000:])
            await sleep(0.2)
        await run(1)

        # 1. A hung API server (SIGSTOP) for 12 s: every request served, none waits for it long.
        os.kill(fake.process.pid, signal.SIGSTOP)
        stopped = await run(12)
        os.kill(fake.process.pid, signal.SIGCONT)
        codes = [code for _, code, _ in stopped]
        self.assertEqual(set(codes), {200}, codes)
        slowest = max(seconds for _, _, seconds in stopped)
        self.assertLess(slowest, 4.0)  # the review timeout (3 s), once, then stale answers at once
        print(f"\nSIGSTOP 12 s: {len(codes)} requests, {codes.count(200)} x 200, slowest {slowest:.2f} s")
        deadline = time.monotonic() + 30
        while "reviews recovered" not in proxy.log():
            self.assertLess(time.monotonic(), deadline, proxy.log()[-3000:])
            await get()
            await sleep(0.25)

        # 2. The relay cut for 30 s: served from the last answers up to `stale` s after they
        # were obtained, refused (503, at once) after that.
        await run(3)  # fresh answers
        cut_at = time.monotonic()
        await relay.cut()
        outage = await run(30)
        relay.start()
        after = [(start - cut_at, code, seconds) for start, code, seconds in outage]
        within = [code for t, code, _ in after if t < stale - 2.5]  # answers are at most 2 s old at the cut
        beyond = [code for t, code, _ in after if t > stale + 0.5]
        self.assertEqual(set(within), {200}, after)
        self.assertEqual(set(beyond), {503}, after)
        self.assertLess(max(seconds for _, _, seconds in after), 1.0)
        print(f"relay cut 30 s (--review-stale-seconds {stale:g}): {len(after)} requests, "
              f"{[c for _, c, _ in after].count(200)} x 200 (all within the bound), "
              f"{[c for _, c, _ in after].count(503)} x 503 (all past it), "
              f"slowest {max(s for _, _, s in after):.3f} s")
        deadline = time.monotonic() + 30
        while (await get())[1] != 200:
            self.assertLess(time.monotonic(), deadline, proxy.log()[-3000:])
            await sleep(0.25)

        log = proxy.log()
        self.assertEqual(log.count("reviews stale"), 2, log[-5000:])
        self.assertEqual(log.count("reviews recovered"), 2, log[-5000:])
        self.assertNotIn("Traceback", log, "no traceback per refused request")
        self.assertNotIn("review failed", log, "no line per refused request")
