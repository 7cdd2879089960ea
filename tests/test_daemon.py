"""
The real daemon, as an operator runs it: C{twistd -n connectors-proxy}.
Command-line errors, the bundled examples, JSON logs, manifest reload, and
memory that stays flat whatever the size of a body.
"""

from __future__ import annotations

import base64
import os
import secrets
import subprocess
import sys
import threading
import time

from twisted.internet import reactor, threads
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from .support.nginx import start_nginx
from .support.procs import check, free_port, run
from .support.proxy import (
    ROOT,
    basic_secret,
    connector,
    connector_class,
    json_lines,
    manifests_text,
    sa,
    start_proxy_process,
    write_file,
    write_setup,
)

TWISTD = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.exit(run())",
          "-n", "--pidfile=", "connectors-proxy"]
ENV = {"PYTHONPATH": ROOT}


def twistd(*args: str, timeout: float = 30):  # type: ignore[no-untyped-def]
    return run([*TWISTD, *args], env=ENV, timeout=timeout)


class CommandLine(TestCase):
    """Bad options and files: one line on stderr, non-zero exit, no traceback."""

    timeout = 120

    def write(self, name: str, text: str) -> str:
        return write_file(self, name, text)

    @inlineCallbacks
    def assertOneLine(self, args, *expected):  # type: ignore[no-untyped-def]
        result = yield twistd(*args)
        self.assertNotEqual(result.returncode, 0, args)
        err = result.stderr.decode()
        self.assertNotIn("Traceback", err + result.stdout.decode())
        lines = [line for line in err.splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, err)
        for fragment in expected:
            self.assertIn(fragment, lines[0])

    @inlineCallbacks
    def test_invalid_manifests(self):  # type: ignore[no-untyped-def]
        tokens = self.write("tokens.csv", "t,system:serviceaccount:default:a,1\n")
        bad_address = self.write("objects.yaml", manifests_text([
            connector("default", "harbor", "oci", "harbor.example.com")]))
        yield self.assertOneLine(["--manifests", bad_address, "--tokens", tokens],
                                 bad_address, "Connector default/harbor", "spec.address", "http://")
        missing_class = self.write("objects.yaml", manifests_text([{
            "apiVersion": "connectors.alauda.io/v1alpha1", "kind": "Connector",
            "metadata": {"name": "x", "namespace": "default"}, "spec": {"address": "https://x"}}]))
        yield self.assertOneLine(["--manifests", missing_class, "--tokens", tokens],
                                 "Connector default/x", "spec.connectorClassName", "required")
        bad_yaml = self.write("objects.yaml", "kind: [unclosed\n")
        yield self.assertOneLine(["--manifests", bad_yaml, "--tokens", tokens], bad_yaml, "invalid YAML")
        bad_secret = self.write("s.yaml", "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\ndata: {password: '%%%'}\n")
        yield self.assertOneLine(["--manifests", bad_secret, "--tokens", tokens],
                                 "Secret default/s", "data.password", "base64")
        yield self.assertOneLine(["--manifests", "/nonexistent/x.yaml", "--tokens", tokens],
                                 "/nonexistent/x.yaml", "no such file")

    @inlineCallbacks
    def test_bad_options(self):  # type: ignore[no-untyped-def]
        yield self.assertOneLine(["--no-such-option"], "no-such-option")
        yield self.assertOneLine(["--log-format", "xml"], "--log-format")
        yield self.assertOneLine(["--in-cluster", "--manifests", "x"], "exclude each other")
        yield self.assertOneLine(["--manifests", ROOT], "--tokens")
        bad_tokens = self.write("tokens.csv", "only-a-token\n")
        yield self.assertOneLine(["--tokens", bad_tokens], bad_tokens + ":1", "token,user")

    @inlineCallbacks
    def test_bad_listen_endpoint(self):  # type: ignore[no-untyped-def]
        result = yield twistd("--listen", "tcp:notaport", "--admin", f"tcp:{free_port()}", timeout=30)
        self.assertNotEqual(result.returncode, 0)
        self.assertNotIn("Traceback", result.stderr.decode() + result.stdout.decode())


class BundledExamples(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_runs_with_no_arguments(self):  # type: ignore[no-untyped-def]
        proxy = yield start_proxy_process(self, [])
        url = proxy.url + "/namespaces/default/connectors/self/healthz"
        result = yield run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", url])
        self.assertEqual(result.stdout, b"401")
        result = yield run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-u", "x:example-token-other", url])
        self.assertEqual(result.stdout, b"403")
        result = yield run(["curl", "-sS", f"http://127.0.0.1:{proxy.admin_port}/readyz"])
        self.assertEqual(result.stdout, b"ready\n")


class DemoBinding(TestCase):
    """
    The bundled examples' tokens are public: with them, the default
    listeners bind loopback only, and the startup line says so.
    """

    def options(self, *args: str) -> dict[str, object]:
        from connectors_proxy.tap import Options
        options = Options()
        options.parseOptions(list(args))
        return options

    def startup_lines(self, options: dict[str, object]) -> list[str]:
        from twisted.internet.testing import MemoryReactorClock
        from twisted.logger import formatEvent, globalLogPublisher

        from connectors_proxy.tap import make_service
        events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        make_service(options, MemoryReactorClock())  # type: ignore[arg-type]
        return [line for line in map(formatEvent, events) if "bundled examples" in line]

    def test_examples_listen_on_loopback(self) -> None:
        options = self.options()
        self.assertEqual(options["listen"], ["tcp:8080:interface=127.0.0.1"])
        self.assertEqual(options["admin"], "tcp:9090:interface=127.0.0.1")
        [line] = self.startup_lines(options)
        self.assertIn("loopback only (tcp:8080:interface=127.0.0.1, admin tcp:9090:interface=127.0.0.1)", line)
        self.assertIn("public", line)

    def test_explicit_endpoints_are_kept(self) -> None:
        options = self.options("--listen", "tcp:8080")
        self.assertEqual(options["listen"], ["tcp:8080"])
        # Only the defaulted one binds loopback, and the line names only it.
        self.assertEqual(options["admin"], "tcp:9090:interface=127.0.0.1")
        [line] = self.startup_lines(options)
        self.assertIn("loopback only (admin tcp:9090:interface=127.0.0.1)", line)
        options = self.options("--listen", "tcp:8080", "--admin", "tcp:9090")
        self.assertEqual((options["listen"], options["admin"]), (["tcp:8080"], "tcp:9090"))
        [line] = self.startup_lines(options)
        self.assertNotIn("loopback", line)

    def test_own_tokens_keep_the_usual_defaults(self) -> None:
        folder = self.mktemp()
        os.makedirs(folder)
        tokens = os.path.join(folder, "tokens.csv")
        with open(tokens, "w") as f:
            f.write("t,system:serviceaccount:default:a,1\n")
        options = self.options("--tokens", tokens)
        self.assertEqual((options["listen"], options["admin"]), (["tcp:8080"], "tcp:9090"))


class Operating(TestCase):
    timeout = 300

    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.nginx = yield start_nginx(self)
        self.token = "tok-" + secrets.token_hex(12)
        n = self.nginx
        self.objects = [
            connector_class("http"), connector_class("anon", optional=True),
            connector("default", "basic", "http", n.url + "/basic", secret="s"),
            basic_secret("default", "s", n.username, n.password),
            connector("default", "open", "anon", n.url + "/open"),
        ]

    @inlineCallbacks
    def test_json_logs_and_redaction(self):  # type: ignore[no-untyped-def]
        args = write_setup(self, self.objects, {self.token: sa("default")})
        proxy = yield start_proxy_process(self, [*args, "--log-format", "json"])
        check((yield run(["curl", "-sS", "-u", f"x:{self.token}",
                          proxy.url + "/namespaces/default/connectors/basic/small.txt?token=abc123&x=1&Password=p4ss"])))
        yield run(["curl", "-sS", proxy.url + "/namespaces/default/connectors/basic/small.txt"])
        yield deferLater(reactor, 0.3, lambda: None)
        proxy.server.stop()
        text = proxy.log()
        lines = json_lines(text)  # every line is one JSON object
        access = [line for line in lines if line.get("event") == "access"]
        self.assertEqual([a["status"] for a in access], [200, 401])
        first = access[0]
        for name in ("time", "level", "client", "identity", "namespace", "connector", "protocol", "method",
                     "path", "status", "bytes_in", "bytes_out", "duration_ms"):
            self.assertIn(name, first)
        self.assertEqual((first["identity"], first["namespace"], first["connector"]), (sa("default"), "default", "basic"))
        self.assertEqual(first["path"], "/namespaces/default/connectors/basic/small.txt?token=REDACTED&x=1&Password=REDACTED")
        for secret in (self.nginx.password, self.token, "abc123", "p4ss"):
            self.assertNotIn(secret, text)

    @inlineCallbacks
    def test_rotation_and_broken_edit(self):  # type: ignore[no-untyped-def]
        args = write_setup(self, self.objects, {self.token: sa("default")})
        manifests = args[1]
        proxy = yield start_proxy_process(self, args)
        url = proxy.url + "/namespaces/default/connectors/basic/small.txt"
        curl = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-u", f"x:{self.token}", url]
        self.assertEqual((yield run(curl)).stdout, b"200")

        new_password = secrets.token_hex(16)
        rotated = self.objects[:3] + [basic_secret("default", "s", self.nginx.username, new_password)] + self.objects[4:]
        self.nginx.set_password(new_password)
        with open(manifests, "w") as f:
            f.write(manifests_text(rotated))
        expected = "Basic " + base64.b64encode(f"{self.nginx.username}:{new_password}".encode()).decode()
        deadline = time.monotonic() + 2.0
        seen = ""
        while time.monotonic() < deadline:
            yield run(curl)
            seen = self.nginx.last_request().authorization
            if seen == expected:
                break
        self.assertEqual(seen, expected, "the rotated Secret was not used within 2 seconds")

        with open(manifests, "w") as f:
            f.write("kind: [broken\n")
        yield deferLater(reactor, 1.5, lambda: None)
        self.assertEqual((yield run(curl)).stdout, b"200")  # last good state kept
        self.assertEqual(self.nginx.last_request().authorization, expected)
        log = proxy.log()
        self.assertIn("reload failed, keeping the last good state", log)
        self.assertIn("invalid YAML", log)
        self.assertNotIn(new_password, log)
        self.assertNotIn(self.nginx.password, log)


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class _Sampler:
    """Peak RSS of a process, sampled every 50 ms from a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.base = _rss_kib(pid)
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.peak = max(self.peak, _rss_kib(self.pid))
            except OSError:
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return (self.peak - self.base) // 1024


class Memory(TestCase):
    """A 1 GiB download and a 1 GiB upload each raise the proxy's RSS by less than 64 MiB."""

    timeout = 600
    SIZE = 1024 ** 3
    LIMIT_MIB = 64

    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.nginx = yield start_nginx(self)
        path = os.path.join(self.nginx.root, "open", "huge.bin")
        with open(path, "wb") as f:
            f.truncate(self.SIZE)  # sparse: nginx reads zeros fast, the disk stays empty
        self.token = secrets.token_hex(12)
        args = write_setup(self, [connector_class("anon", optional=True),
                                  connector("default", "open", "anon", self.nginx.url + "/open")],
                           {self.token: sa("default")})
        self.proxy = yield start_proxy_process(self, args)
        self.url = self.proxy.url + "/namespaces/default/connectors/open/"
        # Warm up: first request imports and allocates what every request needs.
        check((yield run(["curl", "-sS", "-o", "/dev/null", "-u", f"x:{self.token}", self.url + "small.txt"])))

    def measure(self, argv):  # type: ignore[no-untyped-def]
        def go():  # type: ignore[no-untyped-def]
            sampler = _Sampler(self.proxy.server.process.pid)
            result = subprocess.run(argv, capture_output=True, timeout=500)
            return result, sampler.stop()
        return threads.deferToThread(go)

    @inlineCallbacks
    def test_download(self):  # type: ignore[no-untyped-def]
        result, growth = yield self.measure(["curl", "-sS", "-o", "/dev/null", "-w", "%{size_download}",
                                             "-u", f"x:{self.token}", self.url + "huge.bin"])
        check(result)
        self.assertEqual(int(result.stdout), self.SIZE)
        self.assertLess(growth, self.LIMIT_MIB, f"RSS grew by {growth} MiB")

    @inlineCallbacks
    def test_slow_client_download(self):  # type: ignore[no-untyped-def]
        # 256 MiB at 64 MB/s: the upstream is far faster, so without
        # backpressure the difference would pile up in the proxy.
        result, growth = yield self.measure(["curl", "-sS", "-o", "/dev/null", "-w", "%{size_download}",
                                             "--limit-rate", "64M", "-r", f"0-{256 * 1024 * 1024 - 1}",
                                             "-u", f"x:{self.token}", self.url + "huge.bin"])
        check(result)
        self.assertEqual(int(result.stdout), 256 * 1024 * 1024)
        self.assertLess(growth, self.LIMIT_MIB, f"RSS grew by {growth} MiB behind a slow client")

    @inlineCallbacks
    def test_upload(self):  # type: ignore[no-untyped-def]
        source = os.path.join(self.nginx.root, "open", "huge.bin")
        result, growth = yield self.measure(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_upload}",
                                             "-u", f"x:{self.token}", "-T", source, self.url + "up/huge-copy.bin"])
        check(result)
        code, size = result.stdout.split()
        self.assertIn(code, (b"201", b"204"))
        self.assertEqual(int(size), self.SIZE)
        self.assertEqual(os.path.getsize(os.path.join(self.nginx.root, "open", "up", "huge-copy.bin")), self.SIZE)
        self.assertLess(growth, self.LIMIT_MIB, f"RSS grew by {growth} MiB")

    def tearDown(self) -> None:
        copy = os.path.join(self.nginx.root, "open", "up", "huge-copy.bin")
        if os.path.exists(copy):
            os.unlink(copy)

