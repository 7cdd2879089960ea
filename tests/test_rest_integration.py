"""
REST connectors end to end: real curl and treq clients, a real nginx
upstream, the proxy in this reactor.  Canary credentials are random per
test and must never reach a client or a log line; client tokens must never
reach the upstream.
"""

from __future__ import annotations

import hashlib
import os
import secrets

import treq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from .support.nginx import start_nginx
from .support.procs import check, require, run
from .support.proxy import (
    basic_secret,
    bearer_secret,
    connector,
    connector_class,
    sa,
    start_proxy,
)

CURL = ["curl", "-sS", "--max-time", "60"]


class RestThroughProxy(TestCase):
    timeout = 180

    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        require("curl")
        self.big = os.urandom(3 * 1024 * 1024 + 11)
        self.nginx = yield start_nginx(self, {"big.bin": self.big})
        n = self.nginx
        self.token = "tok-" + secrets.token_hex(16)
        self.other_token = "tok-" + secrets.token_hex(16)
        objects = [
            connector_class("http"),
            connector_class("anon", optional=True),
            connector("default", "basic", "http", n.url + "/basic", secret="basic-secret"),
            basic_secret("default", "basic-secret", n.username, n.password),
            connector("default", "bearer", "http", n.url + "/bearer", secret="bearer-secret", auth="bearerTokenAuth"),
            bearer_secret("default", "bearer-secret", n.bearer),
            connector("default", "open", "anon", n.url + "/open"),
            connector("other", "elsewhere", "http", n.url + "/basic", secret="basic-secret"),
            basic_secret("other", "basic-secret", n.username, n.password),
        ]
        self.objects = objects
        self.proxy = yield start_proxy(self, objects, {self.token: sa("default"), self.other_token: sa("other")})
        self.seen: list[bytes] = []

    def curl(self, *args: str, token: str | None = None):  # type: ignore[no-untyped-def]
        argv = [*CURL, "-i"]
        if token is not None:
            argv += ["-u", f"ignored:{token}"]
        d = run([*argv, *args])

        def keep(result):  # type: ignore[no-untyped-def]
            self.seen.extend([result.stdout, result.stderr])
            return result

        return d.addCallback(keep)

    def assertNoSecrets(self) -> None:
        """No canary credential anywhere the client or the logs can see."""
        n = self.nginx
        logs = self.proxy.logs.text()
        for secret in (n.password, n.bearer, n.basic_header.split()[1]):
            self.assertNotIn(secret, logs)
            for seen in self.seen:
                self.assertNotIn(secret.encode(), seen)
        for entry in n.requests():
            self.assertNotIn(self.token, entry.authorization)
            self.assertNotIn(self.other_token, entry.authorization)

    def tearDown(self) -> None:
        self.assertNoSecrets()

    @inlineCallbacks
    def test_basic_path_mode(self):  # type: ignore[no-untyped-def]
        result = check((yield self.curl(self.proxy.path_url("default", "basic", "/small.txt"), token=self.token)))
        self.assertIn(b"HTTP/1.1 200", result.stdout)
        self.assertTrue(result.stdout.endswith(b"hello from basic\n"))
        [entry] = self.nginx.requests(at_least=1)
        self.assertEqual(entry.uri, "/basic/small.txt")
        self.assertEqual(entry.authorization, self.nginx.basic_header)
        self.assertEqual(entry.forwarded_for, "127.0.0.1")
        self.assertEqual(entry.forwarded_proto, "http")
        [access] = self.proxy.logs.access()
        self.assertEqual((access["identity"], access["namespace"], access["connector"], access["status"]),
                         (sa("default"), "default", "basic", 200))

    @inlineCallbacks
    def test_bearer_upstream_with_bearer_client(self):  # type: ignore[no-untyped-def]
        result = check((yield run([*CURL, "-H", f"Authorization: Bearer {self.token}",
                                   self.proxy.path_url("default", "bearer", "/echo")])))
        self.assertEqual(result.stdout, b"ok bearer")
        self.assertEqual(self.nginx.last_request().authorization, f"Bearer {self.nginx.bearer}")

    @inlineCallbacks
    def test_anonymous_upstream(self):  # type: ignore[no-untyped-def]
        result = check((yield self.curl(self.proxy.path_url("default", "open", "/small.txt"), token=self.token)))
        self.assertTrue(result.stdout.endswith(b"hello from open\n"))
        self.assertEqual(self.nginx.last_request().authorization, "")

    @inlineCallbacks
    def test_host_mode(self):  # type: ignore[no-untyped-def]
        for host in ("c-basic.default.svc.cluster.local", "c-basic.default.svc", "C-BASIC.default:8080"):
            result = check((yield self.curl("-H", f"Host: {host}", self.proxy.url + "/small.txt", token=self.token)))
            self.assertTrue(result.stdout.endswith(b"hello from basic\n"), host)
        self.assertEqual(self.nginx.last_request().forwarded_host, "C-BASIC.default:8080")

    @inlineCallbacks
    def test_forward_proxy_forms(self):  # type: ignore[no-untyped-def]
        # http_proxy to a Connector host name.
        result = check((yield run([*CURL, "-x", self.proxy.url, "-U", f"default/basic:{self.token}",
                                   "http://c-basic.default.svc.cluster.local/small.txt"])))
        self.assertEqual(result.stdout, b"hello from basic\n")
        # http_proxy to the tool's real address, the Connector listed in the user name.
        result = check((yield run([*CURL, "-x", self.proxy.url, "-U", f"default/open,default/basic:{self.token}",
                                   self.nginx.url + "/basic/small.txt"])))
        self.assertEqual(result.stdout, b"hello from basic\n")
        self.assertEqual(self.nginx.last_request().authorization, self.nginx.basic_header)

    @inlineCallbacks
    def test_not_an_open_proxy(self):  # type: ignore[no-untyped-def]
        # --forward-unlisted deny: targets no listed Connector covers are
        # refused (the default, allow, relays them without credentials; see
        # tests.test_upstream_compat).
        self.proxy.root.forward_unlisted = "deny"
        before = len(self.nginx.requests())
        for target in ("http://example.invalid/", self.nginx.url + "/bearer/echo"):
            result = yield run([*CURL, "-i", "-x", self.proxy.url, "-U", f"default/basic:{self.token}", target])
            self.assertIn(b"HTTP/1.1 403", result.stdout, target)
            self.assertIn(b"not the address of a Connector you listed", result.stdout)
        self.assertEqual(len(self.nginx.requests()), before)

    @inlineCallbacks
    def test_refusals_never_reach_upstream(self):  # type: ignore[no-untyped-def]
        url = self.proxy.path_url("default", "basic", "/small.txt")
        cases = [
            ((url,), None, b"401", b"no token"),
            ((url,), "wrong-" + secrets.token_hex(8), b"401", b"not accepted"),
            ((url,), self.other_token, b"403", sa("other").encode() + b" may not use Connector default/basic"),
            ((self.proxy.path_url("default", "missing", "/x"),), self.token, b"404", b"Connector default/missing not found"),
            ((self.proxy.url + "/nothing",), self.token, b"404", b"names no Connector"),
        ]
        for args, token, code, message in cases:
            result = yield self.curl(*args, token=token)
            self.assertIn(b"HTTP/1.1 " + code, result.stdout, args)
            self.assertIn(message, result.stdout)
            if code == b"401":
                self.assertIn(b'WWW-Authenticate: Basic realm="connectors-proxy"', result.stdout)
        self.assertEqual(self.nginx.requests(), [])

    @inlineCallbacks
    def test_unauthenticated_upload_is_not_read(self):  # type: ignore[no-untyped-def]
        path = os.path.join(self.mktemp())
        with open(path, "wb") as f:
            f.write(os.urandom(64 * 1024 * 1024))
        for extra in ([], ["-H", "Expect: 100-continue"], ["-H", "Expect:"]):
            result = yield self.curl(*extra, "-T", path, self.proxy.path_url("default", "basic", "/up.bin"),
                                     token="bad-" + secrets.token_hex(4))
            self.assertIn(b"HTTP/1.1 401", result.stdout, extra)
        accesses = self.proxy.logs.access()
        self.assertEqual([a["status"] for a in accesses], [401, 401, 401])
        for access in accesses:
            # At most what was in flight when the answer went out.
            self.assertLess(access["bytes_in"], 4 * 1024 * 1024)
        self.assertEqual(self.nginx.requests(), [])

    @inlineCallbacks
    def test_big_download_and_upload(self):  # type: ignore[no-untyped-def]
        result = check((yield run([*CURL, "-u", f"x:{self.token}",
                                   self.proxy.path_url("default", "basic", "/big.bin")])))
        self.assertEqual(hashlib.sha256(result.stdout).digest(), hashlib.sha256(self.big).digest())
        upload = os.path.abspath(self.mktemp())
        data = os.urandom(20 * 1024 * 1024 + 5)
        with open(upload, "wb") as f:
            f.write(data)
        for extra in ([], ["-H", "Transfer-Encoding: chunked"]):
            name = f"up/{len(extra)}.bin"
            result = check((yield self.curl(*extra, "-T", upload, self.proxy.path_url("default", "basic", "/" + name),
                                            token=self.token)))
            self.assertRegex(result.stdout, rb"HTTP/1.1 20[14]")
            with open(os.path.join(self.nginx.root, "basic", name), "rb") as f:
                self.assertEqual(hashlib.sha256(f.read()).digest(), hashlib.sha256(data).digest())

    @inlineCallbacks
    def test_treq_client(self):  # type: ignore[no-untyped-def]
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = yield treq.get(self.proxy.path_url("default", "basic", "/big.bin"),
                                  headers={"Authorization": f"Bearer {self.token}"}, pool=pool)
        self.assertEqual(response.code, 200)
        body = yield response.content()
        self.assertEqual(body, self.big)
        response = yield treq.put(self.proxy.path_url("default", "open", "/treq.bin"), data=b"x" * 100_000,
                                  headers={"Authorization": f"Bearer {self.token}"}, pool=pool)
        self.assertIn(response.code, (201, 204))
        yield response.content()

    @inlineCallbacks
    def test_redirects_point_back_at_the_proxy(self):  # type: ignore[no-untyped-def]
        result = yield self.curl(self.proxy.path_url("default", "basic", "/redirect-abs"), token=self.token)
        self.assertIn(f"Location: {self.proxy.path_url('default', 'basic', '/small.txt')}\r\n".encode(),
                      result.stdout)
        result = yield self.curl(self.proxy.path_url("default", "basic", "/redirect-rel"), token=self.token)
        self.assertIn(b"Location: /namespaces/default/connectors/basic/small.txt\r\n", result.stdout)
        result = yield self.curl("-H", "Host: c-basic.default.svc", self.proxy.url + "/redirect-abs", token=self.token)
        self.assertIn(b"Location: http://c-basic.default.svc/small.txt\r\n", result.stdout)
        # Following it works end to end.
        result = check((yield self.curl("-L", self.proxy.path_url("default", "basic", "/redirect-abs"),
                                        token=self.token)))
        self.assertTrue(result.stdout.endswith(b"hello from basic\n"))

    @inlineCallbacks
    def test_repeated_headers_cookies_and_head(self):  # type: ignore[no-untyped-def]
        result = check((yield self.curl(self.proxy.path_url("default", "open", "/cookie"), token=self.token)))
        # An upstream session is a credential of the Connector's: never the client's.
        self.assertNotIn(b"Set-Cookie", result.stdout)
        self.assertIn(b"X-Multi: one\r\n", result.stdout)
        self.assertIn(b"X-Multi: two\r\n", result.stdout)
        result = check((yield self.curl("-I", self.proxy.path_url("default", "basic", "/big.bin"), token=self.token)))
        self.assertIn(f"Content-Length: {len(self.big)}\r\n".encode(), result.stdout)

    @inlineCallbacks
    def test_paths_cannot_escape(self):  # type: ignore[no-untyped-def]
        for rest in ("/../open/small.txt", "/%2e%2e/open/small.txt", "/a/%2E%2e%2fopen", "/%252e%252e/x",
                     "/..%5copen"):
            result = yield self.curl("--path-as-is", self.proxy.path_url("default", "basic", rest), token=self.token)
            self.assertIn(b"HTTP/1.1 400", result.stdout, rest)
            self.assertIn(b"'..' segment", result.stdout)
        # An encoded slash is passed on verbatim, not decoded.
        yield self.curl("--path-as-is", self.proxy.path_url("default", "basic", "/a%2Fb?x=%2F"), token=self.token)
        self.assertEqual(self.nginx.last_request().uri, "/basic/a%2Fb?x=%2F")
        self.assertEqual(len(self.nginx.requests(at_least=1)), 1)

    @inlineCallbacks
    def test_rotated_secret_used_by_next_request(self):  # type: ignore[no-untyped-def]
        url = self.proxy.path_url("default", "basic", "/echo")
        check((yield self.curl(url, token=self.token)))
        new_password = secrets.token_hex(16)
        rotated = [o for o in self.objects if o["metadata"]["name"] != "basic-secret" or
                   o["metadata"]["namespace"] != "default"]
        rotated.append(basic_secret("default", "basic-secret", self.nginx.username, new_password))
        self.proxy.set_objects(rotated)
        yield self.curl(url, token=self.token)
        import base64
        expected = "Basic " + base64.b64encode(f"{self.nginx.username}:{new_password}".encode()).decode()
        self.assertEqual(self.nginx.last_request().authorization, expected)
        self.assertNotIn(new_password, self.proxy.logs.text())

    @inlineCallbacks
    def test_upstream_down_is_a_clear_502(self):  # type: ignore[no-untyped-def]
        self.nginx.server.stop()
        result = yield self.curl(self.proxy.path_url("default", "basic", "/small.txt"), token=self.token)
        self.assertIn(b"HTTP/1.1 502", result.stdout)
        self.assertIn(b"cannot connect to " + self.nginx.url.encode() + b"/basic", result.stdout)
        # The proxy keeps serving.
        result = yield self.curl(self.proxy.path_url("default", "missing", "/x"), token=self.token)
        self.assertIn(b"HTTP/1.1 404", result.stdout)


class ClientGoesAway(TestCase):
    timeout = 120

    @inlineCallbacks
    def test_disconnect_cancels_upstream(self):  # type: ignore[no-untyped-def]
        nginx = yield start_nginx(self)
        with open(os.path.join(nginx.root, "open", "huge.bin"), "wb") as f:
            f.truncate(512 * 1024 * 1024)
        token = secrets.token_hex(8)
        proxy = yield start_proxy(self, [connector_class("anon", optional=True),
                                         connector("default", "open", "anon", nginx.url + "/open")],
                                  {token: sa("default")})
        # A slow client that gives up after a second.
        result = yield run([*CURL, "-o", "/dev/null", "--limit-rate", "1M", "--max-time", "1",
                            "-u", f"x:{token}", proxy.path_url("default", "open", "/huge.bin")])
        self.assertEqual(result.returncode, 28)  # curl's "operation timed out"
        # nginx logs the request when its connection ends: the proxy closed
        # it long before the 512 MiB were sent.  (Wait with the reactor
        # running: the in-process proxy is what has to act.)
        for _ in range(100):
            if nginx.requests():
                break
            yield deferLater(reactor, 0.05, lambda: None)
        [entry] = nginx.requests()
        self.assertLess(entry.body_bytes_sent, 64 * 1024 * 1024)
        [access] = proxy.logs.access()
        self.assertLess(access["bytes_out"], 64 * 1024 * 1024)
