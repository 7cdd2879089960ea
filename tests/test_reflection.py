"""
Reflected credentials (SPEC section 10): what an upstream echoes of the
request never carries the injected credentials to the client.

Unit tests for L{connectors_proxy.upstream.reflection} and end-to-end tests
against upstreams that reflect (real loopback sockets, the real relay): a
REST echo server and an OCI registry stand-in with its own token realm.
Canary credentials are random per test; everything the client receives and
every log line are searched for them in every form.
"""

from __future__ import annotations

import base64
import gzip
import json
import random
import secrets
import zlib
from typing import Any
from urllib.parse import quote

from twisted.internet import reactor, threads
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from connectors_proxy.model.credentials import BasicCredentials, BearerCredentials
from connectors_proxy.server.headers import client_response_headers
from connectors_proxy.upstream import reflection
from connectors_proxy.upstream.reflection import (
    Inflater,
    Masker,
    base64_cores,
    drop_reflected,
    secrets_for,
    textual,
)

from .support.proxy import RunningProxy, basic, basic_secret, connector, connector_class, sa, start_proxy
from .support.wire import fetch, split_response


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def masked_reference(data: bytes, needles: list[bytes]) -> bytes:
    """C{data} with every occurrence of every needle masked, the slow obvious way."""
    out = bytearray(data)
    for needle in needles:
        at = data.find(needle)
        while at != -1:
            out[at:at + len(needle)] = b"*" * len(needle)
            at = data.find(needle, at + 1)
    return bytes(out)


class MaskerTests(SynchronousTestCase):
    needles = [b"s3cret-passw0rd", b"czNjcmV0LXBhc3N3MH", b"passw0rd-and-more"]

    def stream(self, masker: Masker, chunks: list[bytes]) -> tuple[bytes, list[bytes]]:
        outs = [masker.feed(c) for c in chunks] + [masker.flush()]
        return b"".join(outs), outs

    def check_random_splits(self) -> None:
        rng = random.Random(7)
        alphabet = b"s3cretpaswo0rd-czNjmV LXBhM{}\":,\n"
        for _ in range(300):
            parts = []
            for _ in range(rng.randint(0, 12)):
                parts.append(bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 30))))
                parts.append(rng.choice(self.needles)[: rng.choice([None, None, 5, -3])])
            data = b"".join(parts)
            # Tiny chunks, one-byte chunks, and everything at once.
            for sizes in ([1], [2, 3], [rng.randint(1, 40) for _ in range(8)], [len(data) + 1]):
                chunks, at, i = [], 0, 0
                while at < len(data):
                    size = sizes[i % len(sizes)]
                    chunks.append(data[at:at + size])
                    at += size
                    i += 1
                out, _ = self.stream(Masker(self.needles), chunks)
                self.assertEqual(out, masked_reference(data, self.needles), (data, sizes))

    def test_random_splits(self) -> None:
        """Needles anywhere, split anywhere, overlapping: masked as a whole-body search would."""
        self.check_random_splits()

    def test_random_splits_without_memmem(self) -> None:
        """The same where the C library has no memmem (bytes.find alone)."""
        self.patch(reflection, "_memmem", None)
        self.check_random_splits()
        self.test_big_chunks()

    def test_big_chunks(self) -> None:
        """Chunks of the size TCP reads give (where the C memmem is used), needles across their ends."""
        rng = random.Random(8)
        filler = b'{"id": 12, "name": "s3cr czNj passw0rd"},\n' * 4000
        for _ in range(20):
            data = bytearray(filler)
            for _ in range(rng.randint(0, 6)):
                at = rng.randint(0, len(data))
                data[at:at] = rng.choice(self.needles)
            body = bytes(data)
            masker, out, at = Masker(self.needles), [], 0
            while at < len(body):
                size = rng.choice([4097, 5000, 65536, 70001])
                out.append(masker.feed(body[at:at + size]))
                at += size
            self.assertEqual(b"".join(out) + masker.flush(), masked_reference(body, self.needles))

    def test_same_length(self) -> None:
        body = b'{"auth": "s3cret-passw0rd"}'
        out, _ = self.stream(Masker(self.needles), [body[:12], body[12:]])
        self.assertEqual(out, b'{"auth": "***************"}')

    def test_chunk_without_needle_goes_out_as_is(self) -> None:
        """The fast path: no copy, nothing held back."""
        masker = Masker(self.needles)
        chunk = b'{"event": "ready"}\n' * 1000
        self.assertIs(masker.feed(chunk), chunk)
        self.assertEqual(masker.flush(), b"")

    def test_only_needle_starts_are_held_back(self) -> None:
        """A stream of events is not delayed: only a possible needle start waits for more."""
        masker = Masker(self.needles)
        self.assertEqual(masker.feed(b'{"a": "s3cr'), b'{"a": "')
        # The last "s" could start "s3cret-passw0rd".
        self.assertEqual(masker.feed(b"ets"), b"s3cret")
        self.assertEqual(masker.feed(b' and s3cret-passw0'), b"s and ")
        self.assertEqual(masker.feed(b'rd!'), b"***************!")

    def test_no_needles(self) -> None:
        masker = Masker([])
        self.assertEqual(masker.feed(b"abc"), b"abc")
        self.assertEqual(masker.flush(), b"")


class SecretsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.user = "ci-bot"
        self.password = "pw-" + secrets.token_hex(12)
        self.creds = BasicCredentials(self.user, self.password)
        self.pair = f"{self.user}:{self.password}".encode()

    def test_secret_values(self) -> None:
        self.assertEqual(self.creds.secret_values(),
                         (self.password.encode(), self.pair, b"Basic " + b64(self.pair)))
        bearer = BearerCredentials("tk-" + "a" * 20)
        self.assertEqual(bearer.secret_values(), (b"tk-" + b"a" * 20, b"Bearer tk-" + b"a" * 20))

    def test_basic_forms(self) -> None:
        found = secrets_for(self.creds).found_in
        password = self.password.encode()
        for form in (password, self.pair, self.creds.authorization(), b64(password), b64(self.pair),
                     quote(self.creds.authorization(), safe="").encode(),
                     b64(b"x" + password), b64(b"xy" + password), b64(b"Authorization: " + self.creds.authorization()),
                     base64.urlsafe_b64encode(b"?" + password)):
            self.assertTrue(found(b"a=" + form + b"&b"), form)
        self.assertFalse(found(b"ci-bot and pw- and Basic"))

    def test_streamed_is_small_and_covers_the_header(self) -> None:
        streamed = secrets_for(self.creds).streamed
        self.assertLessEqual(len(streamed), 3)
        masker = Masker(streamed)
        body = json.dumps({"Authorization": self.creds.authorization().decode(), "pw": self.password,
                           "b64": b64(self.password.encode()).decode()}).encode()
        out = masker.feed(body) + masker.flush()
        self.assertEqual(len(out), len(body))
        for form in (self.password.encode(), self.creds.authorization(), b64(self.pair),
                     b64(self.password.encode())):
            self.assertNotIn(form, out)

    def test_short_password_alone_is_not_masked(self) -> None:
        """Masking every "pw" of every body would destroy it: only its longer forms are secret."""
        s = secrets_for(BasicCredentials("u", "pw"))
        self.assertFalse(s.found_in(b"pw"))
        self.assertTrue(s.found_in(BasicCredentials("u", "pw").authorization()))

    def test_registry_token(self) -> None:
        token = "regtok-" + secrets.token_hex(20)
        s = secrets_for(self.creds, b"Bearer " + token.encode(), token, None)
        for form in (token.encode(), b64(token.encode()), self.password.encode()):
            self.assertTrue(s.found_in(form))
        self.assertIn(token.encode(), s.streamed)

    def test_anonymous(self) -> None:
        s = secrets_for(None)
        self.assertFalse(s)
        self.assertEqual(s.mask(b"anything"), b"anything")

    def test_base64_cores(self) -> None:
        value = secrets.token_bytes(20)
        for prefix in range(7):
            for suffix in range(4):
                text = b64(b"p" * prefix + value + b"s" * suffix)
                self.assertIn(base64_cores(value)[prefix % 3], text)

    def test_drop_reflected(self) -> None:
        s = secrets_for(self.creds)
        headers = Headers({b"X-Echo": [b"fine", b"got " + self.creds.authorization()],
                           b"Authentication-Info": [b'nextnonce="' + b64(self.pair) + b'"'],
                           b"Location": [b"https://elsewhere/cb?p=" + quote(self.password).encode()],
                           b"X-" + self.password.encode(): [b"1"], b"Content-Type": [b"text/plain"]})
        drop_reflected(headers, s)
        self.assertEqual(sorted(name for name, _ in headers.getAllRawHeaders()), [b"Content-Type", b"X-Echo"])
        self.assertEqual(headers.getRawHeaders(b"x-echo"), [b"fine"])

    def test_client_response_headers(self) -> None:
        upstream = Headers({b"X-Echo": [self.password.encode()], b"X-Ok": [b"1"]})
        self.assertFalse(client_response_headers(upstream, secrets_for(self.creds)).hasHeader(b"x-echo"))
        self.assertTrue(client_response_headers(upstream).hasHeader(b"x-echo"))

    def test_textual(self) -> None:
        for kind in (None, b"", b"text/plain", b"TEXT/HTML; charset=utf-8", b"application/json",
                     b"application/problem+json", b"application/x-ndjson", b"application/xml",
                     b"image/svg+xml", b"application/javascript", b"application/x-www-form-urlencoded",
                     b"application/vnd.oci.image.manifest.v1+json"):
            self.assertTrue(textual(kind), kind)
        for kind in (b"application/octet-stream", b"application/x-git-upload-pack-result",
                     b"application/vnd.oci.image.layer.v1.tar+gzip", b"image/png", b"application/zip"):
            self.assertFalse(textual(kind), kind)


class InflaterTests(SynchronousTestCase):
    body = json.dumps({"data": list(range(2000))}).encode()

    def decode(self, encoding: bytes, data: bytes, size: int = 100) -> bytes:
        inflater = Inflater(encoding)
        out = [p for i in range(0, len(data), size) for p in inflater.feed(data[i:i + size])]
        return b"".join(out) + inflater.flush()

    def test_codings(self) -> None:
        self.assertEqual(self.decode(b"gzip", gzip.compress(self.body)), self.body)
        self.assertEqual(self.decode(b"deflate", zlib.compress(self.body)), self.body)
        raw = zlib.compressobj(wbits=-15)
        self.assertEqual(self.decode(b"deflate", raw.compress(self.body) + raw.flush()), self.body)

    def test_corrupt(self) -> None:
        self.assertRaises(zlib.error, self.decode, b"gzip", b"not gzip at all")

    def test_pieces_are_bounded(self) -> None:
        bomb = gzip.compress(b"\0" * (8 * Inflater.PIECE))
        pieces = Inflater(b"gzip").feed(bomb)
        self.assertLessEqual(max(map(len, pieces)), Inflater.PIECE)
        self.assertEqual(sum(map(len, pieces)), 8 * Inflater.PIECE)


# -- end to end ------------------------------------------------------------------


class Canaries:
    """The forms of a test's secrets that must never be seen by the client or in a log line."""

    def __init__(self, *values: bytes) -> None:
        forms: set[bytes] = set()
        for value in values:
            forms.update({value, b64(value), quote(value, safe="").encode()})
        self.forms = sorted(forms)

    def check(self, test: TestCase, seen: list[bytes], logs: str) -> None:
        for form in self.forms:
            for data in seen:
                test.assertNotIn(form, data)
            test.assertNotIn(form.decode("latin-1"), logs)


class Echo(Resource):
    """
    A REST upstream that reflects the request: its headers in a JSON body
    (Content-Length, or chunked in tiny delayed pieces), the decoded Basic
    credentials, the Authorization in response headers, a foreign
    Location's query, a 401 body, the status phrase; plus a binary body
    holding the same bytes, a Connection-nominated header, compressed bodies.
    """

    isLeaf = True

    def render(self, request: Request) -> Any:
        path = request.path.decode()
        auth = request.getHeader(b"authorization") or b""
        user, _, password = base64.b64decode(auth.split(b" ")[-1]).partition(b":")
        headers = {k.decode(): [v.decode() for v in vs] for k, vs in request.requestHeaders.getAllRawHeaders()}
        reflected = json.dumps({"headers": headers, "user": user.decode(), "password": password.decode(),
                                "b64password": b64(password).decode(),
                                "b64pair": b64(user + b":" + password).decode()}).encode()
        # What PHP's json_encode makes of it: "/" escaped.
        php = reflected.replace(b"/", b"\\/")
        if path == "/headers":
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"content-length", b"%d" % len(reflected))
            return reflected
        if path == "/php":
            request.setHeader(b"content-type", b"application/json")
            return php
        if path.startswith("/chunked/"):
            size = int(path.rsplit("/", 1)[1])
            request.setHeader(b"content-type", b"application/json; charset=utf-8")
            pieces = [reflected[i:i + size] for i in range(0, len(reflected), size)]
            for i, piece in enumerate(pieces):
                reactor.callLater(0.0005 * i, request.write, piece)
            reactor.callLater(0.0005 * len(pieces), request.finish)
            return NOT_DONE_YET
        if path == "/auth-headers":
            request.setHeader(b"authentication-info", b'nextnonce="' + auth + b'"')
            request.setHeader(b"www-authenticate", b'Basic realm="' + password + b'"')
            request.setHeader(b"x-echo", auth)
            request.setHeader(b"x-kept", b"fine")
            request.setHeader(b"content-type", b"text/plain")
            return b"ok\n"
        if path == "/redirect":
            request.setResponseCode(302)
            request.setHeader(b"location", b"https://elsewhere.example/cb?auth=" + quote(auth).encode())
            return b""
        if path == "/redirect-raw":
            request.setResponseCode(302)
            request.setHeader(b"location", b"/login?p=" + password)
            return b""
        if path == "/unauthorized":
            request.setResponseCode(401)
            request.setHeader(b"content-type", b"application/octet-stream")
            return b"denied: " + auth + b" (" + password + b")\n"
        if path == "/phrase":
            request.setResponseCode(200, b"OK " + password)
            request.setHeader(b"content-type", b"text/plain")
            return b"ok\n"
        if path == "/binary":
            request.setHeader(b"content-type", b"application/octet-stream")
            return self.binary(auth, password)
        if path == "/hop":
            request.setHeader(b"connection", b"X-Secret-Thing")
            request.setHeader(b"x-secret-thing", b"v")
            request.setHeader(b"x-other", b"kept")
            return b"ok\n"
        if path == "/gzip":
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"content-encoding", b"gzip")
            return gzip.compress(reflected)
        if path == "/brotli":
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"content-encoding", b"br")
            return b"\x0b\x02\x80" + reflected
        request.setResponseCode(404)
        return b"no such path\n"

    @staticmethod
    def binary(auth: bytes, password: bytes) -> bytes:
        return bytes(range(256)) + auth + b"\0" + password + b"\0" + b64(password) + bytes(range(255, -1, -1))


def serve(test: TestCase, resource: Resource) -> int:
    """Serve C{resource} on a loopback port while C{test} runs; the port."""
    site = Site(resource)
    site.noisy = False
    port: Any = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined,arg-type]
    test.addCleanup(port.stopListening)
    return int(port.getHost().port)


class RestReflection(TestCase):
    timeout = 60

    async def setUp(self) -> None:  # type: ignore[override]
        upstream = serve(self, Echo())
        self.user = "ci-" + secrets.token_hex(3)
        self.password = secrets.token_hex(16)
        self.token = secrets.token_hex(16)
        self.proxy: RunningProxy = await start_proxy(self, [
            connector_class("http"),
            connector("default", "echo", "http", f"http://127.0.0.1:{upstream}", secret="s"),
            basic_secret("default", "s", self.user, self.password),
        ], {self.token: sa("default")})
        self.creds = BasicCredentials(self.user, self.password)
        self.canaries = Canaries(self.password.encode(), f"{self.user}:{self.password}".encode(),
                                 self.creds.authorization())
        self.seen: list[bytes] = []

    def tearDown(self) -> None:
        self.canaries.check(self, self.seen, self.proxy.logs.text())

    async def get(self, path: str, *headers: bytes) -> tuple[int, dict[bytes, list[bytes]], bytes]:
        request = (b"GET /namespaces/default/connectors/echo" + path.encode() + b" HTTP/1.1\r\nHost: proxy\r\n"
                   b"Authorization: " + basic("x", self.token) + b"\r\nConnection: close\r\n"
                   + b"".join(h + b"\r\n" for h in headers) + b"\r\n")
        raw = await threads.deferToThread(fetch, self.proxy.port, request)
        status, response_headers, body = split_response(raw)
        # What the client saw, raw (status line, headers, framing) and with chunked framing removed.
        self.seen += [raw, body]
        self.status_line = raw.split(b"\r\n", 1)[0]
        return status, response_headers, body

    def assertMasked(self, body: bytes) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(body)
        self.assertTrue(doc["headers"]["Authorization"][0].startswith("Basic ***"), doc)
        self.assertEqual(doc["password"], "*" * len(self.password))
        self.assertEqual(doc["user"], self.user)
        self.assertEqual(doc["headers"]["X-Forwarded-For"], ["127.0.0.1"])
        return doc

    async def test_json_with_content_length(self) -> None:
        status, headers, body = await self.get("/headers")
        self.assertEqual(status, 200)
        self.assertEqual(headers[b"content-length"], [b"%d" % len(body)])
        self.assertMasked(body)

    async def test_json_chunked_in_tiny_pieces(self) -> None:
        """A secret split over many reads of the upstream's body is masked all the same."""
        for size in (1, 3, 7, 40):
            status, headers, body = await self.get(f"/chunked/{size}")
            self.assertEqual(status, 200)
            self.assertNotIn(b"content-length", headers)
            self.assertMasked(body)

    async def test_reflecting_headers_dropped(self) -> None:
        status, headers, body = await self.get("/auth-headers")
        self.assertEqual((status, body), (200, b"ok\n"))
        for name in (b"authentication-info", b"www-authenticate", b"x-echo"):
            self.assertNotIn(name, headers)
        self.assertEqual(headers[b"x-kept"], [b"fine"])

    async def test_foreign_location_with_credentials_dropped(self) -> None:
        for path in ("/redirect", "/redirect-raw"):
            status, headers, _ = await self.get(path)
            self.assertEqual(status, 302)
            self.assertNotIn(b"location", headers)

    async def test_php_escaped_json_masked(self) -> None:
        """JSON that spells "/" as "\\/" (PHP): the base64 of the credentials is masked all the same."""
        status, _, body = await self.get("/php")
        self.assertEqual(status, 200)
        self.assertMasked(body)

    async def test_error_body_masked(self) -> None:
        """An error body is masked whatever its type (this one says octet-stream), every form of the secret."""
        status, headers, body = await self.get("/unauthorized")
        self.assertEqual(status, 401)
        self.assertEqual(headers[b"content-length"], [b"%d" % len(body)])
        self.assertTrue(body.startswith(b"denied: Basic "), body)
        self.assertTrue(body.endswith(b" (" + b"*" * len(self.password) + b")\n"), body)

    async def test_status_phrase_masked(self) -> None:
        status, _, _ = await self.get("/phrase")
        self.assertEqual(status, 200)
        self.assertEqual(self.status_line, b"HTTP/1.1 200 OK " + b"*" * len(self.password))

    async def test_binary_body_intact(self) -> None:
        status, headers, body = await self.get("/binary")
        self.assertEqual(status, 200)
        self.assertEqual(body, Echo.binary(self.creds.authorization(), self.password.encode()))
        # The secret is in this body (the upstream put it in a binary one, left intact as
        # SPEC section 10 says): only the status line and headers are checked for it.
        del self.seen[-2:]
        self.seen.append(repr(sorted(headers.items())).encode() + self.status_line)

    async def test_connection_nominated_header_not_forwarded(self) -> None:
        status, headers, body = await self.get("/hop")
        self.assertEqual((status, body), (200, b"ok\n"))
        self.assertNotIn(b"x-secret-thing", headers)
        self.assertEqual(headers[b"x-other"], [b"kept"])

    async def test_compressed_json_decoded_and_masked(self) -> None:
        status, headers, body = await self.get("/gzip", b"Accept-Encoding: gzip")
        self.assertEqual(status, 200)
        self.assertNotIn(b"content-encoding", headers)
        self.assertMasked(body)

    async def test_undecodable_coding_refused(self) -> None:
        status, _, body = await self.get("/brotli", b"Accept-Encoding: br")
        self.assertEqual(status, 502)
        self.assertIn(b"Content-Encoding br", body)


class Registry(Resource):
    """
    An OCI registry stand-in: a Bearer challenge, a token realm that wants
    the Connector's Basic credentials, and manifests that reflect the
    registry token in a header, a foreign Location and an error detail.
    """

    isLeaf = True

    def __init__(self, user: str, password: str) -> None:
        super().__init__()
        self.basic = basic(user, password)
        self.password = password.encode()
        self.token = "regtok." + secrets.token_urlsafe(48)
        self.port = 0

    def render(self, request: Request) -> Any:
        path = request.path.decode()
        auth = request.getHeader(b"authorization") or b""
        if path == "/token":
            if auth != self.basic:
                request.setResponseCode(401)
                return b"{}"
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"token": self.token, "expires_in": 300}).encode()
        if auth != b"Bearer " + self.token.encode():
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate",
                              f'Bearer realm="http://127.0.0.1:{self.port}/token",service="stand-in"'.encode())
            return b'{"errors":[{"code":"UNAUTHORIZED","message":"token required"}]}'
        request.setHeader(b"docker-distribution-api-version", b"registry/2.0")
        if path.endswith("/manifests/header"):
            request.setHeader(b"content-type", b"application/vnd.oci.image.manifest.v1+json")
            request.setHeader(b"x-registry-debug", auth)
            request.setHeader(b"x-token", self.token.encode())
            request.setHeader(b"x-kept", b"fine")
            return b'{"schemaVersion":2}'
        if path.endswith("/manifests/moved"):
            request.setResponseCode(307)
            request.setHeader(b"location", b"http://storage.example/m?token=" + self.token.encode())
            return b""
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown",
                                       "detail": {"authorization": auth.decode(), "token": self.token,
                                                  "password": self.password.decode()}}]}).encode()


class OciReflection(TestCase):
    timeout = 60

    async def setUp(self) -> None:  # type: ignore[override]
        self.user = "robot-" + secrets.token_hex(3)
        self.password = secrets.token_hex(16)
        self.registry = Registry(self.user, self.password)
        self.registry.port = serve(self, self.registry)
        self.token = secrets.token_hex(16)
        self.proxy: RunningProxy = await start_proxy(self, [
            connector_class("oci", "oci"),
            connector("default", "reg", "oci", f"http://127.0.0.1:{self.registry.port}", secret="s"),
            basic_secret("default", "s", self.user, self.password),
        ], {self.token: sa("default")})
        token = self.registry.token.encode()
        self.canaries = Canaries(self.password.encode(), f"{self.user}:{self.password}".encode(),
                                 BasicCredentials(self.user, self.password).authorization(),
                                 token, b"Bearer " + token)
        self.seen: list[bytes] = []

    def tearDown(self) -> None:
        self.canaries.check(self, self.seen, self.proxy.logs.text())

    async def get(self, path: str, host: bool = False) -> tuple[int, dict[bytes, list[bytes]], bytes]:
        if host:
            target, host_header = b"/v2/" + path.encode(), b"c-reg.default.svc.cluster.local"
        else:
            target, host_header = b"/v2/namespaces/default/connectors/reg/" + path.encode(), b"proxy"
        request = (b"GET " + target + b" HTTP/1.1\r\nHost: " + host_header + b"\r\nAuthorization: "
                   + basic("x", self.token) + b"\r\nConnection: close\r\n\r\n")
        raw = await threads.deferToThread(fetch, self.proxy.port, request)
        status, headers, body = split_response(raw)
        self.seen += [raw, body]
        return status, headers, body

    async def test_token_in_a_header_dropped(self) -> None:
        status, headers, body = await self.get("library/app/manifests/header")
        self.assertEqual((status, body), (200, b'{"schemaVersion":2}'))
        self.assertNotIn(b"x-registry-debug", headers)
        self.assertNotIn(b"x-token", headers)
        self.assertEqual(headers[b"x-kept"], [b"fine"])

    async def test_token_in_a_foreign_location_dropped(self) -> None:
        status, headers, _ = await self.get("library/app/manifests/moved")
        self.assertEqual(status, 307)
        self.assertNotIn(b"location", headers)

    async def test_token_in_an_error_detail_masked(self) -> None:
        """Path mode (the body is rewritten, then masked) and host mode (streamed, masked)."""
        for host in (False, True):
            status, headers, body = await self.get("library/app/manifests/missing", host=host)
            self.assertEqual(status, 404)
            [error] = json.loads(body)["errors"]
            self.assertEqual(error["code"], "MANIFEST_UNKNOWN")
            self.assertEqual(error["detail"]["token"], "*" * len(self.registry.token))
            self.assertEqual(error["detail"]["password"], "*" * len(self.password))
            self.assertTrue(error["detail"]["authorization"].startswith("Bearer ***"))

    async def test_registry_token_was_used(self) -> None:
        """The stand-in really makes the proxy fetch and send a token (else the tests above prove little)."""
        await self.get("library/app/manifests/header")
        await deferLater(reactor, 0, lambda: None)
        resource = self.proxy.root.protocols["oci"]
        self.assertEqual(resource.tokens.fetches, 1)
