"""
What an operator meets when something goes wrong (issue 17): a hung
upstream, a mistyped manifest, a port in use, an unreachable API server,
and docs whose commands must keep working.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import io
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import treq
import yaml
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from connectors_proxy.model.objects import ObjectRef
from connectors_proxy.model.state import Store
from connectors_proxy.ops.drain import Reloader, SourceHealth
from connectors_proxy.server.limits import ConcurrencyLimiter
from connectors_proxy.sources import manifests
from connectors_proxy.sources.lint import lint_text
from connectors_proxy.tap import load_manifests
from connectors_proxy.upstream.timeouts import UpstreamTimeouts

from .support.procs import free_port, run, start_server
from .support.proxy import (
    ROOT,
    ProxyProcess,
    basic_secret,
    connector,
    connector_class,
    json_lines,
    sa,
    start_proxy,
    start_proxy_process,
    write_file,
    write_setup,
)
from .support.waiting import eventually


class _Hung(Protocol):
    """
    An upstream that accepts and reads requests; with C{headers} it sends
    the response headers and the first bytes of a body, then stalls; without,
    it never answers at all.
    """

    def connectionMade(self) -> None:
        self.factory.connections.append(self)  # type: ignore[attr-defined]
        self.buffer = b""
        self.answered = False

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if self.factory.headers and not self.answered and b"\r\n\r\n" in self.buffer:  # type: ignore[attr-defined]
            self.answered = True
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"  # type: ignore[union-attr]
                                 b"Content-Length: 1000000\r\n\r\n" + b"x" * 1000)

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        self.factory.closed += 1  # type: ignore[attr-defined]


def hung_upstream(test: TestCase, headers: bool) -> tuple[int, Any]:
    """Listen on loopback with L{_Hung}; the port and the factory (its C{connections}, C{closed})."""
    factory = Factory.forProtocol(_Hung)
    factory.headers = headers  # type: ignore[attr-defined]
    factory.connections = []  # type: ignore[attr-defined]
    factory.closed = 0  # type: ignore[attr-defined]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    test.addCleanup(port.stopListening)

    def close_all() -> None:
        for protocol in factory.connections:  # type: ignore[attr-defined]
            protocol.transport.abortConnection()

    test.addCleanup(close_all)
    return port.getHost().port, factory


async def hung_proxy_process(test: TestCase, *options: str) -> tuple[ProxyProcess, str, Any]:
    """
    The daemon (with C{options}, logging JSON), its Connector C{team/hung} a
    L{hung_upstream} that never answers; the process, a client token, the upstream.
    """
    port, upstream = hung_upstream(test, headers=False)
    token = "tok-" + secrets.token_hex(8)
    args = write_setup(test, [
        connector_class("rest"),
        basic_secret("team", "creds", "u", "p"),
        connector("team", "hung", "rest", f"http://127.0.0.1:{port}", secret="creds"),
    ], {token: sa("team")})
    proxy = await start_proxy_process(test, [*args, *options, "--log-format", "json"])
    return proxy, token, upstream


def access_lines(log: str) -> list[dict[str, Any]]:
    """The access lines of a JSON log."""
    return [line for line in json_lines(log) if line.get("event") == "access"]


class HungUpstream(TestCase):
    """
    Item 1: an upstream that accepts and never answers gets C{504} after
    the upstream timeout; one that stalls mid-body is cut after the idle
    timeout; either way the Connector's slot is given back and the access
    line names the upstream's fault, not the client's (499).
    """

    timeout = 60

    async def _proxy(self, upstream_port: int) -> Any:
        self.token = "tok-" + secrets.token_hex(8)
        self.canary = "pw-" + secrets.token_hex(12)
        proxy = await start_proxy(self, [
            connector_class("rest"),
            basic_secret("team", "creds", "u", self.canary),
            connector("team", "hung", "rest", f"http://127.0.0.1:{upstream_port}", secret="creds"),
        ], {self.token: sa("team")})
        # Short timeouts (set before the first request builds its agent),
        # and one slot, so a slot that is never given back shows.
        proxy.root.agents.agents.timeouts = UpstreamTimeouts(headers=0.5, idle=0.5)
        proxy.root.limiter = ConcurrencyLimiter(reactor, max_active=1, max_queue=0, queue_timeout=1.0)
        self.lane = proxy.root.limiter.lane(ObjectRef("team", "hung"))
        return proxy

    def get(self, proxy: Any, rest: str = "/x") -> Deferred[Any]:
        return treq.get(proxy.path_url("team", "hung", rest),
                        headers={"Authorization": f"Bearer {self.token}"}, persistent=False)

    def test_no_answer_is_504_and_frees_the_slot(self) -> Deferred[None]:
        async def run_() -> None:
            port, upstream = hung_upstream(self, headers=False)
            proxy = await self._proxy(port)
            started = time.monotonic()
            response = await self.get(proxy)
            elapsed = time.monotonic() - started
            body = (await response.content()).decode()
            self.assertEqual(response.code, 504, body)
            self.assertLess(elapsed, 5.0)
            self.assertGreaterEqual(elapsed, 0.5)
            self.assertIn(f"http://127.0.0.1:{port}", body)
            self.assertIn("--upstream-timeout", body)
            # The slot is free (one slot: a second request is admitted and
            # reaches the upstream), and the hung connection was closed.
            await eventually(lambda: self.lane.active == 0, what="slot released")
            await eventually(lambda: upstream.closed == 1, what="upstream connection closed")
            second = await self.get(proxy)
            self.assertEqual(second.code, 504)
            self.assertEqual(len(upstream.connections), 2)
            await eventually(lambda: len(proxy.logs.access()) == 2)
            access = proxy.logs.access()
            self.assertEqual([(e["status"], e["fault"]) for e in access], [(504, "upstream-timeout")] * 2)
            self.assertIn("fault=upstream-timeout", proxy.logs.text())
            self.assertNotIn(self.canary, proxy.logs.text() + body)

        return Deferred.fromCoroutine(run_())

    def test_stalled_body_is_cut_and_frees_the_slot(self) -> Deferred[None]:
        async def run_() -> None:
            port, upstream = hung_upstream(self, headers=True)
            proxy = await self._proxy(port)
            response = await self.get(proxy)
            self.assertEqual(response.code, 200)
            started = time.monotonic()
            failure = None
            try:
                await response.content()
            except Exception as e:
                failure = e
            # The client sees a broken body (not a complete short one), soon.
            self.assertIsNotNone(failure)
            self.assertLess(time.monotonic() - started, 5.0)
            await eventually(lambda: self.lane.active == 0, what="slot released")
            await eventually(lambda: upstream.closed == 1, what="upstream connection closed")
            await eventually(lambda: len(proxy.logs.access()) == 1)
            [access] = proxy.logs.access()
            self.assertEqual((access["status"], access["fault"], access["bytes_out"]),
                             (200, "upstream-idle-timeout", 1000))

        return Deferred.fromCoroutine(run_())

    def test_slow_but_steady_body_is_not_cut(self) -> Deferred[None]:
        """A body whose bytes keep coming, slower than the idle timeout in total, is relayed whole."""
        async def run_() -> None:
            port, upstream = hung_upstream(self, headers=True)
            proxy = await self._proxy(port)
            response = await self.get(proxy)
            self.assertEqual(response.code, 200)
            protocol = upstream.connections[0]
            body = treq.content(response)
            remaining = 1000000 - 1000
            # 1.5 s in all, a piece every 0.2 s: three idle timeouts long.
            for _ in range(7):
                await deferLater(reactor, 0.2, lambda: None)
                protocol.transport.write(b"y" * 1000)
                remaining -= 1000
            protocol.transport.write(b"z" * remaining)
            self.assertEqual(len(await body), 1000000)

        return Deferred.fromCoroutine(run_())


class HungUpstreamProcess(TestCase):
    """Item 1, as an operator runs it: C{--upstream-timeout} on the real daemon."""

    timeout = 60

    def test_option(self) -> Deferred[None]:
        async def run_() -> None:
            proxy, token, _ = await hung_proxy_process(self, "--upstream-timeout", "1")
            started = time.monotonic()
            result = await run(["curl", "-sS", "-u", f"x:{token}", "-w", "\n%{http_code}",
                                f"{proxy.url}/namespaces/team/connectors/hung/x"], timeout=30)
            elapsed = time.monotonic() - started
            out = result.stdout.decode()
            self.assertTrue(out.endswith("\n504"), out)
            self.assertIn("no response within 1s", out)
            self.assertLess(elapsed, 6.0)
            await eventually(lambda: access_lines(proxy.log()), what="the access line")
            [access] = access_lines(proxy.log())
            self.assertEqual((access["status"], access["fault"]), (504, "upstream-timeout"))

        return Deferred.fromCoroutine(run_())



TWISTD = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.exit(run())"]
ENV = {"PYTHONPATH": ROOT}


def twistd(*args: str, timeout: float = 30) -> Deferred[subprocess.CompletedProcess[bytes]]:
    """C{twistd -n --pidfile= connectors-proxy ARGS}, run to its end."""
    return run([*TWISTD, "-n", "--pidfile=", "connectors-proxy", *args], env=ENV, timeout=timeout)


TYPO_KIND = """\
apiVersion: connectors.alauda.io/v1alpha1
kind: ConnectorClass
metadata: {name: rest}
---
apiVersion: v1
kind: Namespace
metadata: {name: team}
---
apiVersion: connectors.alauda.io/v1alpha1
kind: Conector
metadata: {name: api, namespace: team}
spec: {connectorClassName: rest, address: "https://api.example.com"}
"""

TYPO_FIELD = """\
apiVersion: connectors.alauda.io/v1alpha1
kind: Connector
metadata: {name: api, namespace: team}
spec:
  connectorClassName: rest
  address: https://api.example.com
  auth: {name: basicAuth, secretref: {name: creds}}
"""


class Lint(SynchronousTestCase):
    """Item 2, the checks alone."""

    def test_misspelled_kind(self) -> None:
        [problem] = lint_text(TYPO_KIND, "objects.yaml")
        self.assertEqual((problem.source, problem.line, problem.document, problem.mistake),
                         ("objects.yaml", 9, "3", True))
        self.assertEqual(str(problem), "objects.yaml:9: document 3: kind 'Conector' (name 'api') is not one the "
                                       "proxy reads, so it is ignored: did you mean 'Connector'?")

    def test_misspelled_fields(self) -> None:
        text = TYPO_FIELD.replace("  address:", "  adress:") + "---\n" + TYPO_FIELD.replace("metadata:", "metdata:")
        messages = sorted(str(p) for p in lint_text(text, "f.yaml"))
        self.assertEqual(messages, [
            "f.yaml:1: document 1: Connector (name 'api'): unknown field 'spec.adress': did you mean 'address'?",
            "f.yaml:1: document 1: Connector (name 'api'): unknown field 'spec.auth.secretref': "
            "did you mean 'secretRef'?",
            "f.yaml:9: document 2: Connector: unknown field 'metdata': did you mean 'metadata'?",
            "f.yaml:9: document 2: Connector: unknown field 'spec.auth.secretref': did you mean 'secretRef'?",
        ])

    def test_what_is_not_a_mistake(self) -> None:
        text = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: x}
spec: {replicas: 2, selectr: {}}
---
apiVersion: connectors.alauda.io/v1alpha1
kind: ConnectorClass
metadata: {name: git, labels: {a: b}}
spec:
  auth: {types: [{name: basicAuth, secretType: kubernetes.io/basic-auth, optional: true}]}
  configurations: [{name: gitconfig, data: {.gitconfig: x}}]
  livenessProbe: {http: {path: /}}
  somethingNew: {}
---
apiVersion: connectors.alauda.io/v1alpha1
kind: AccessPolicy
metadata: {name: p}
"""
        [note] = lint_text(text, "f.yaml")
        self.assertFalse(note.mistake)
        self.assertIn("AccessPolicy", note.message)

    def test_list_items_and_secret_version(self) -> None:
        text = """\
apiVersion: v1
kind: List
items:
- {apiVersion: v1beta1, kind: Secret, metadata: {name: s}, strinData: {a: b}}
"""
        self.assertEqual(sorted(str(p) for p in lint_text(text, "f.yaml")), [
            "f.yaml:1: document 1 (items[0]): Secret (name 's'): apiVersion 'v1beta1' is not 'v1', so it is ignored",
            "f.yaml:1: document 1 (items[0]): Secret (name 's'): unknown field 'strinData': did you mean 'stringData'?",
        ])

    def test_unparsable_is_left_to_the_loader(self) -> None:
        self.assertEqual(lint_text("kind: [broken\n", "f.yaml"), [])

    def startup(self, files: dict[str, str]) -> tuple[str, list[str], list[str], list[str]]:
        """
        The startup load and lint of C{files} (name -> text) in a folder:
        the folder, what L{lint_text} says of each file, what the startup
        warned, and every text the YAML loader was given.
        """
        folder = self.mktemp()
        os.makedirs(folder)
        for name, text in files.items():
            write_file(self, name, text, folder)
        expected = [str(p) for name in sorted(files) for p in lint_text(files[name], os.path.join(folder, name))]
        decoded: list[str] = []
        init = manifests._LOADER.__init__

        def counting(loader: Any, stream: str) -> None:
            decoded.append(stream)
            init(loader, stream)
        self.patch(manifests._LOADER, "__init__", counting)
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        source = manifests.ManifestSource(Clock(), [folder], Store())
        load_manifests(source, [folder], strict=False)
        warned = [e["problem"] for e in events if e.get("event") == "manifest_problem"]
        return folder, expected, warned, decoded

    def test_startup_decodes_each_document_once(self) -> None:
        """
        The startup lint reads the documents the load decoded: each is
        decoded once (a document repeated in another file is not decoded
        again), and the warnings are what L{lint_text} finds in each file.
        """
        listed = ("apiVersion: v1\nkind: List\nitems:\n"
                  "- {apiVersion: v1, kind: Secret, metadata: {name: creds, namespace: team}, strinData: {a: b}}\n")
        conector = TYPO_KIND[TYPO_KIND.rindex("---\n"):]
        files = {"a.yaml": TYPO_KIND, "b.yaml": TYPO_FIELD + "---\n" + listed, "c.yaml": "# again\n" + conector}
        folder, expected, warned, decoded = self.startup(files)
        self.assertEqual(len(expected), 4)
        self.assertEqual(warned, expected)
        pieces = {piece for text in files.values() for _, piece in manifests.split_documents(text)}
        self.assertEqual(sorted(decoded), sorted(pieces))

    def test_startup_failure_names_a_misspelling(self) -> None:
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        with self.assertRaises(SystemExit):
            self.startup({"a.yaml": TYPO_FIELD.replace("  address:", "  adress:")})
        [line] = stderr.getvalue().splitlines()
        self.assertIn("spec.address: is required (and ", line)
        self.assertIn("unknown field 'spec.adress': did you mean 'address'?", line)


class ReloadReporting(SynchronousTestCase):
    """Item 2: what SIGHUP and a recovering reload say."""

    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def lines(self) -> list[str]:
        return [formatEvent(e) for e in self.events]

    def test_failed_action_is_not_reloaded(self) -> None:
        reloader = Reloader()
        reloader.add("manifests and tokens", lambda: succeed(False))
        reloader.add("certificates", lambda: True)
        reloader.reload()
        [line] = self.lines()
        self.assertEqual(line, "SIGHUP: reloading manifests and tokens failed (see above), keeping the last good "
                               "state; reloaded: certificates")
        self.assertNotIn("reloaded on SIGHUP", line)

    def test_all_reloaded(self) -> None:
        reloader = Reloader()
        reloader.add("manifests and tokens", lambda: None)
        reloader.reload()
        self.assertEqual(self.lines(), ["reloaded on SIGHUP: manifests and tokens"])

    def test_recovery_is_said_once(self) -> None:
        health = SourceHealth()
        report = health.reporter("manifests")
        report(True)
        self.assertEqual(self.lines(), [])
        report(False)
        self.assertFalse(health.ok("manifests"))
        report(True)
        report(True)
        self.assertTrue(health.ok("manifests"))
        self.assertEqual(self.lines(), ["manifests recovered: the reload after the error above worked"])


class ConfigMistakes(TestCase):
    """Item 2, on the real daemon."""

    timeout = 120

    def test_misspelled_kind_warns_at_startup(self) -> Deferred[None]:
        async def run_() -> None:
            manifests = write_file(self, "objects.yaml", TYPO_KIND)
            tokens = write_file(self, "tokens.csv", 't,system:serviceaccount:team:a,1\n')
            proxy = await start_proxy_process(self, ["--manifests", manifests, "--tokens", tokens])
            log = proxy.log()
            self.assertIn(f"[warn] {manifests}:9: document 3: kind 'Conector' (name 'api') is not one the proxy "
                          "reads, so it is ignored: did you mean 'Connector'?", log)
            self.assertIn(f"[info] loaded 1 classes, 0 connectors, 0 secrets from {manifests}", log)
            self.assertIn(f"[warn] no Connector in {manifests}: every request gets 404", log)

        return Deferred.fromCoroutine(run_())

    def test_strict_refuses(self) -> Deferred[None]:
        async def run_() -> None:
            manifests = write_file(self, "objects.yaml", TYPO_KIND + "---\n" + TYPO_FIELD)
            tokens = write_file(self, "tokens.csv", 't,system:serviceaccount:team:a,1\n')
            result = await twistd("--manifests", manifests, "--tokens", tokens, "--strict")
            self.assertEqual(result.returncode, 2)
            err = result.stderr.decode()
            self.assertNotIn("Traceback", err + result.stdout.decode())
            self.assertEqual(err, f"connectors-proxy: {manifests}:9: document 3: kind 'Conector' (name 'api') is "
                                  "not one the proxy reads, so it is ignored: did you mean 'Connector'? "
                                  "(refused by --strict; 1 more)\n")

        return Deferred.fromCoroutine(run_())

    def test_missing_field_names_its_misspelling(self) -> Deferred[None]:
        async def run_() -> None:
            manifests = write_file(self, "objects.yaml", TYPO_FIELD.replace("  address:", "  adress:"))
            tokens = write_file(self, "tokens.csv", 't,system:serviceaccount:team:a,1\n')
            result = await twistd("--manifests", manifests, "--tokens", tokens)
            self.assertEqual(result.returncode, 2)
            [line] = result.stderr.decode().splitlines()
            self.assertIn("spec.address: is required", line)
            self.assertIn("unknown field 'spec.adress': did you mean 'address'?", line)

        return Deferred.fromCoroutine(run_())

    def test_sighup_after_a_broken_edit_and_recovery(self) -> Deferred[None]:
        async def run_() -> None:
            args = write_setup(self, [connector_class("rest"),
                                      connector("team", "api", "rest", "https://api.example.com")],
                               {"t": sa("team")})
            manifests = args[1]
            with open(manifests) as f:
                good = f.read()
            proxy = await start_proxy_process(self, args)
            with open(manifests, "w") as f:
                f.write("kind: [broken\n")
            os.kill(proxy.server.process.pid, signal.SIGHUP)
            await eventually(lambda: "SIGHUP: reloading manifests and tokens failed" in proxy.log(), what="SIGHUP line")
            self.assertNotIn("reloaded on SIGHUP", proxy.log())
            self.assertIn("invalid YAML", proxy.log())
            with open(manifests, "w") as f:
                f.write(good)
            await eventually(lambda: "manifests recovered" in proxy.log(), what="recovery line")
            os.kill(proxy.server.process.pid, signal.SIGHUP)
            await eventually(lambda: "reloaded on SIGHUP: manifests and tokens" in proxy.log(), what="reloaded")

        return Deferred.fromCoroutine(run_())


class StartupFailures(TestCase):
    """Item 3: what an operator sees when the daemon cannot start."""

    timeout = 120

    def busy_port(self) -> int:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        self.addCleanup(sock.close)
        return int(sock.getsockname()[1])

    def test_port_in_use(self) -> Deferred[None]:
        async def run_() -> None:
            busy = self.busy_port()
            result = await twistd("--listen", f"tcp:{busy}:interface=127.0.0.1",
                                  "--admin", f"tcp:{free_port()}:interface=127.0.0.1")
            self.assertEqual(result.returncode, 2)
            out, err = result.stdout.decode(), result.stderr.decode()
            self.assertNotIn("Traceback", out + err)
            self.assertEqual(err, f"connectors-proxy: cannot listen on --listen tcp:{busy}:interface=127.0.0.1: the "
                                  "address is already in use (another process listens there: stop it or choose "
                                  "another port)\n")
            # The admin port too, named as such.
            result = await twistd("--listen", f"tcp:{free_port()}:interface=127.0.0.1",
                                  "--admin", f"tcp:{busy}:interface=127.0.0.1")
            self.assertEqual(result.returncode, 2)
            self.assertIn(f"cannot listen on --admin tcp:{busy}:interface=127.0.0.1", result.stderr.decode())

        return Deferred.fromCoroutine(run_())

    def test_port_in_use_json(self) -> Deferred[None]:
        async def run_() -> None:
            busy = self.busy_port()
            result = await twistd("--listen", f"tcp:{busy}:interface=127.0.0.1",
                                  "--admin", f"tcp:{free_port()}:interface=127.0.0.1", "--log-format", "json")
            self.assertEqual(result.returncode, 2)
            self.assertEqual(result.stderr, b"")
            lines = json_lines(result.stdout.decode())  # every line is JSON
            [failed] = [line for line in lines if line["level"] in ("error", "critical")]
            self.assertEqual(failed["event"], "startup_failed")
            self.assertIn(f"--listen tcp:{busy}:interface=127.0.0.1", failed["message"])
            self.assertNotIn("traceback", failed)

        return Deferred.fromCoroutine(run_())

    def test_not_a_port(self) -> Deferred[None]:
        async def run_() -> None:
            result = await twistd("--listen", "tcp:notaport")
            self.assertEqual(result.returncode, 2)
            [line] = result.stderr.decode().splitlines()
            self.assertNotIn("invalid literal", line)
            self.assertIn("--listen 'tcp:notaport': 'notaport' is not a port number (write e.g. tcp:8080", line)

        return Deferred.fromCoroutine(run_())

    def test_version(self) -> Deferred[None]:
        async def run_() -> None:
            result = await twistd("--version")
            self.assertEqual(result.returncode, 0)
            version = importlib.metadata.version("connectors-proxy")
            self.assertTrue(result.stdout.decode().startswith(f"connectors-proxy {version} (Twisted "),
                            result.stdout)

        return Deferred.fromCoroutine(run_())

    def test_logfile_is_honoured(self) -> Deferred[None]:
        async def run_() -> None:
            folder = os.path.abspath(self.mktemp())
            os.makedirs(folder)
            logfile = os.path.join(folder, "proxy.log")
            port, admin = free_port(), free_port()
            server = await start_server(self, [
                *TWISTD, "-n", "--pidfile=", "--logfile", logfile, "connectors-proxy", "--log-format", "json",
                "--listen", f"tcp:{port}:interface=127.0.0.1", "--admin", f"tcp:{admin}:interface=127.0.0.1",
            ], port=port, env=ENV, cwd=folder)
            result = await run(["curl", "-sS", f"http://127.0.0.1:{port}/namespaces/default/connectors/self/x"])
            self.assertEqual(result.returncode, 0)
            await eventually(lambda: "access" in open(logfile).read(), what="the access line in the log file")
            server.stop()
            with open(logfile) as f:
                lines = json_lines(f.read())
            self.assertIn("manifests_loaded", [line.get("event") for line in lines])
            self.assertEqual([line["status"] for line in lines if line.get("event") == "access"], [401])
            # Nothing on stdout; and no twistd.pid in the folder it ran in.
            self.assertEqual(server.log(), "")
            self.assertEqual(os.listdir(folder), ["proxy.log"])

        return Deferred.fromCoroutine(run_())


class ClusterNoise(TestCase):
    """
    Item 4: cluster mode while the API server is unreachable for a few
    seconds logs the outage once per state change, not per connection or
    per retry.
    """

    timeout = 60

    def test_outage_log_volume(self) -> Deferred[None]:
        async def run_() -> None:
            from connectors_proxy.kube.cluster import ClusterMode
            from connectors_proxy.kube.config import load_kubeconfig
            from connectors_proxy.model.state import Store
            from connectors_proxy.testing.fakekube import start_fake_kube

            from .test_kube_e2e import PROXY_SA, ClusterModeTests, namespace, oci_class
            from .test_kube_e2e import connector as kube_connector
            from .test_kube_e2e import secret as kube_secret

            events: list[dict[str, Any]] = []
            globalLogPublisher.addObserver(events.append)
            self.addCleanup(globalLogPublisher.removeObserver, events.append)
            fake, server = start_fake_kube(self, reactor, bookmark_interval=0.5)
            fake.apply(namespace("team"), namespace("connectors-system"))
            ClusterModeTests.apply_rbac(fake)
            token = secrets.token_hex(16)
            fake.add_token(token, PROXY_SA, groups=["system:serviceaccounts",
                                                    "system:serviceaccounts:connectors-system"])
            fake.apply(oci_class(), kube_secret(), kube_connector())
            path = os.path.abspath(self.mktemp() + ".kubeconfig")
            server.write_kubeconfig(path, token=token, namespace="connectors-system")
            mode = ClusterMode(reactor, load_kubeconfig(path), Store(), stale_after=1.0)
            mode.startService()
            self.addCleanup(mode.stopService)
            await eventually(lambda: mode.store.ready, what="ready")
            await deferLater(reactor, 1.0, lambda: None)
            before = len(events)
            await server.refuse()
            await server.cut_connections()
            await deferLater(reactor, 4.0, lambda: None)
            server.accept()
            await eventually(lambda: mode.store.ready, timeout=40, what="ready again")
            await deferLater(reactor, 1.0, lambda: None)
            # No line per API connection (the fake API server's own lines aside).
            factory_lines = [formatEvent(e) for e in events if "factory" in formatEvent(e)
                             and "fakekube" not in formatEvent(e)]
            self.assertEqual(factory_lines, [])
            ours = [e for e in events[before:] if e.get("log_namespace", "").startswith("connectors_proxy.")
                    and not e["log_namespace"].startswith("connectors_proxy.testing")
                    and e["log_level"] >= LogLevel.info]
            lines = [f"[{e['log_level'].name}] {formatEvent(e)}" for e in ours]
            text = "\n".join(lines)
            self.assertNotIn("Traceback", text)
            self.assertFalse([e for e in ours if e.get("log_failure") is not None], text)
            reflectors = ("connectors", "connectorclasses", "secrets", "services")
            for name in reflectors:
                mine = [line for line in lines if line.split("] ", 1)[1].startswith(name + ":")]
                # Unreachable (warn), stale (warn), back (info, with the count):
                # however many retries the outage took.
                self.assertEqual([line.split("] ", 1)[0] for line in mine], ["[warn", "[warn", "[info"], text)
                self.assertIn("unreachable for 1s", mine[1])
                self.assertRegex(mine[2], r"reachable again after \d+ failed attempts in [\d.]+s")
            retries = sum(1 for e in events[before:] if "retrying in" in formatEvent(e))
            # The retries happened (each logged at debug), more than the lines.
            self.assertGreater(retries, len(reflectors))
            self.assertLessEqual(len(lines), 3 * len(reflectors), text)

        return Deferred.fromCoroutine(run_())


class DocsAgree(SynchronousTestCase):
    """Item 5: the docs, the units and the manifests say the same thing."""

    def read(self, *path: str) -> str:
        with open(os.path.join(ROOT, *path)) as f:
            return f.read()

    def test_socket_units_are_ipv4_where_adopted_as_inet(self) -> None:
        for name in ("docs/operations.md", "docs/kubernetes.md", "deploy/connectors-proxy.socket"):
            text = self.read(name)
            # A bare port is a dual-stack IPv6 socket: domain=INET garbles its addresses.
            self.assertNotRegex(text, r"(?m)^ListenStream=\d+\s*$", name)
        self.assertIn("ListenStream=0.0.0.0:8080", self.read("docs/operations.md"))

    def test_drain_timings_match_the_deployment(self) -> None:
        deployment = next(d for d in yaml.safe_load_all(self.read("k8s/deployment.yaml"))
                          if d and d["kind"] == "Deployment")
        pod = deployment["spec"]["template"]["spec"]
        grace = pod["terminationGracePeriodSeconds"]
        [container] = pod["containers"]
        pause = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
        operations = self.read("docs/operations.md")
        excerpt = operations[operations.index("```yaml\nspec:\n  template:"):]
        excerpt = excerpt[len("```yaml\n"):excerpt.index("```", 8)]
        spec = yaml.safe_load(excerpt)["spec"]["template"]["spec"]
        self.assertEqual(spec["terminationGracePeriodSeconds"], grace)
        self.assertEqual(spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"], ["sleep", str(pause)])
        kubernetes = self.read("docs/kubernetes.md")
        self.assertIn(f"`preStop` sleeps {pause} s", kubernetes)
        self.assertIn(f"`terminationGracePeriodSeconds: {grace}`", kubernetes)
        # The pause and the default drain fit in the grace period.
        self.assertGreater(grace, pause + 30)

    def test_units_point_at_no_missing_documentation(self) -> None:
        for name in ("connectors-proxy.service", "connectors-proxy.socket"):
            self.assertNotIn("Documentation=file:", self.read("deploy", name))

    def test_readme_first_command_writes_no_pid_file(self) -> None:
        readme = self.read("README.md")
        first = readme[readme.index("```sh\n") + 6:].splitlines()[0]
        self.assertIn("twistd -n --pidfile= connectors-proxy", first)

    def test_bench_dependencies_are_an_extra(self) -> None:
        config = configparser.ConfigParser()
        config.read(os.path.join(ROOT, "setup.cfg"))
        extras = {name: value.split() for name, value in config["options.extras_require"].items()}
        self.assertIn("jsonschema", extras["bench"])
        self.assertIn("[bench]", self.read("bench", "kube_scale.py"))

    def test_skips_are_explained(self) -> None:
        readme = self.read("README.md")
        self.assertIn("skipped with that reason", readme)
        self.assertIn(".ci/build-kube", readme)


class Examples(TestCase):
    """Item 5: the bundled Connector default/self follows --admin."""

    timeout = 60

    def test_self_follows_admin(self) -> Deferred[None]:
        async def run_() -> None:
            # start_proxy_process moves --admin to a free port, not 9090.
            proxy = await start_proxy_process(self, [])
            self.assertNotEqual(proxy.admin_port, 9090)
            result = await run(["curl", "-sS", "-u", "x:example-token-default",
                                f"{proxy.url}/namespaces/default/connectors/self/healthz"])
            self.assertEqual(result.stdout, b"ok\n")

        return Deferred.fromCoroutine(run_())

    def test_loopback_url(self) -> None:
        from connectors_proxy.tap import loopback_url
        self.assertEqual(loopback_url("tcp:9191:interface=127.0.0.1"), "http://127.0.0.1:9191")
        self.assertEqual(loopback_url("tcp:port=9191"), "http://127.0.0.1:9191")
        self.assertEqual(loopback_url("tcp6:9191"), "http://[::1]:9191")
        self.assertEqual(loopback_url(r"tcp:9191:interface=\:\:1"), "http://[::1]:9191")
        for other in ("unix:/run/admin.sock", "systemd:domain=INET:index=1", "tcp:0"):
            self.assertIsNone(loopback_url(other))


class PlainPortTLS(TestCase):
    """Item 5: a TLS client on the plain port hears that it is plain HTTP."""

    timeout = 60

    def test_clients_say_so(self) -> Deferred[None]:
        async def run_() -> None:
            proxy = await start_proxy(self, [], {})
            hostport = proxy.url.split("//", 1)[1]
            started = time.monotonic()
            result = await run(["skopeo", "inspect", "--retry-times", "0",
                                f"docker://{hostport}/namespaces/default/connectors/x/app:1"], timeout=30)
            self.assertNotEqual(result.returncode, 0)
            self.assertIn(b"server gave HTTP response to HTTPS client", result.stderr)
            result = await run(["curl", "-sS", "https://" + hostport + "/"], timeout=30)
            self.assertEqual(result.returncode, 35)
            self.assertIn(b"wrong version number", result.stderr)
            self.assertLess(time.monotonic() - started, 20)

        return Deferred.fromCoroutine(run_())


class DrainFault(TestCase):
    """Item 5: a request cut by the drain is logged as the drain's doing, not as 499."""

    timeout = 60

    def test_drain_cut_is_logged_as_drain(self) -> Deferred[None]:
        async def run_() -> None:
            proxy, token, upstream = await hung_proxy_process(self, "--drain-timeout", "0.5")
            pending = run(["curl", "-sS", "-u", f"x:{token}", f"{proxy.url}/namespaces/team/connectors/hung/x"],
                          timeout=30)
            await eventually(lambda: len(upstream.connections) == 1, what="the request upstream")
            os.kill(proxy.server.process.pid, signal.SIGTERM)
            result = await pending
            self.assertNotEqual(result.returncode, 0)  # cut
            await eventually(lambda: proxy.server.process.poll() is not None, what="exit")
            [access] = access_lines(proxy.log())
            self.assertEqual((access["status"], access["fault"]), (503, "drain"))

        return Deferred.fromCoroutine(run_())
