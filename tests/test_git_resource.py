"""
The git protocol resource against a scripted upstream (a twisted.web
resource on loopback): the LFS batch corner cases a real server rarely
produces on demand (gzip-encoded answers, answers that are not JSON, a 401).
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import secrets
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from connectors_proxy import clientconfig
from connectors_proxy.protocols.git import LFS_MEDIA_TYPE
from connectors_proxy.upstream import relay
from tests.support.gitserver import has_secret
from tests.support.proxy import RunningProxy, basic_secret, connector, connector_class, sa, start_proxy
from tests.test_git_integration import serve_git

UPSTREAM_TOKEN = "upstream-" + secrets.token_hex(8)


class Scripted(Resource):
    """Answers every request with C{self.answer(request, base)}; records requests."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.base = ""
        self.mode = "gzip"
        self.seen: list[tuple[bytes, bytes, bytes | None]] = []

    def render(self, request: Request) -> bytes:  # type: ignore[override]
        self.seen.append((request.method, request.uri, request.getHeader(b"authorization")))
        if self.mode == "401":
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", b'Basic realm="upstream"')
            request.setHeader(b"lfs-authenticate", b'Basic realm="upstream"')
            return b'{"message": "credentials please"}'
        if self.mode == "html":
            request.setHeader(b"content-type", b"text/html")
            return b"<html>login " + UPSTREAM_TOKEN.encode() + b"</html>"
        doc = {"objects": [{"oid": "a" * 64, "size": 1, "actions": {"download": {
            "href": f"{self.base}/app.git/info/lfs/objects/{'a' * 64}",
            "header": {"Authorization": f"RemoteAuth {UPSTREAM_TOKEN}"}}}}]}
        request.setHeader(b"content-type", LFS_MEDIA_TYPE)
        request.setHeader(b"content-encoding", b"gzip")
        return gzip.compress(json.dumps(doc).encode())


class LFSBatchCornerCaseTests(TestCase):
    async def _setup(self) -> tuple[Scripted, RunningProxy, str]:
        upstream = Scripted()
        site: Any = Site(upstream)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        upstream.base = f"http://127.0.0.1:{port.getHost().port}/scm"  # type: ignore[attr-defined]
        token = secrets.token_hex(12)
        self.password = "canary-" + secrets.token_hex(8)
        proxy = await start_proxy(self, [
            connector_class("git", protocol="git"),
            connector("dev", "repo", "git", upstream.base, secret="creds"),
            connector("dev", "anonymous", "git-anonymous", upstream.base),
            connector_class("git-anonymous", protocol="git", optional=True),
            basic_secret("dev", "creds", "bot", self.password),
        ], {token: sa("dev")})
        serve_git(proxy)
        return upstream, proxy, token

    async def _batch(self, proxy: RunningProxy, token: str, name: str = "repo"
                     ) -> tuple[int, dict[bytes, list[bytes]], bytes]:
        # A bare Agent: treq would undo a Content-Encoding the proxy must not send.
        agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        response = await agent.request(
            b"POST", proxy.path_url("dev", name, "/app.git/info/lfs/objects/batch").encode(),
            Headers({b"authorization": [clientconfig.basic_authorization(token).encode()],
                     b"accept-encoding": [b"gzip"], b"content-type": [LFS_MEDIA_TYPE]}),
            FileBodyProducer(io.BytesIO(
                json.dumps({"operation": "download", "objects": [{"oid": "a" * 64, "size": 1}]}).encode())))
        body = await readBody(response)
        return response.code, dict(response.headers.getAllRawHeaders()), body

    def test_gzip_answer_is_decoded_and_rewritten(self) -> Deferred[None]:
        async def go() -> None:
            upstream, proxy, token = await self._setup()
            code, headers, body = await self._batch(proxy, token)
            self.assertEqual(code, 200)
            self.assertNotIn(b"Content-Encoding", headers)
            action = json.loads(body)["objects"][0]["actions"]["download"]
            self.assertEqual(action, {"href": proxy.path_url("dev", "repo", f"/app.git/info/lfs/objects/{'a' * 64}")})
            # The proxy asked for an encoding it can rewrite, and sent the Connector's credentials.
            self.assertEqual(len(upstream.seen), 1)
            self.assertEqual(upstream.seen[0][1], b"/scm/app.git/info/lfs/objects/batch")
            self.assertEqual(upstream.seen[0][2], b"Basic " + base64.b64encode(f"bot:{self.password}".encode()))
        return Deferred.fromCoroutine(go())

    def test_unreadable_answer_fails_closed(self) -> Deferred[None]:
        async def go() -> None:
            upstream, proxy, token = await self._setup()
            upstream.mode = "html"
            code, headers, body = await self._batch(proxy, token)
            self.assertEqual(code, 502)
            self.assertEqual(headers[b"Content-Type"], [LFS_MEDIA_TYPE])
            message = json.loads(body)["message"]
            self.assertIn("the Git LFS batch response of Connector dev/repo is not JSON", message)
            self.assertNotIn(UPSTREAM_TOKEN.encode(), body)
        return Deferred.fromCoroutine(go())

    def test_upstream_401_names_the_secret(self) -> Deferred[None]:
        async def go() -> None:
            upstream, proxy, token = await self._setup()
            upstream.mode = "401"
            code, headers, body = await self._batch(proxy, token)
            self.assertEqual(code, 502)
            self.assertNotIn(b"Www-Authenticate", headers)
            self.assertNotIn(b"Lfs-Authenticate", headers)
            message = json.loads(body)["message"]
            self.assertIn("refused the credentials in Secret dev/creds", message)
            self.assertFalse(has_secret([body, proxy.logs.text()], self.password))
        return Deferred.fromCoroutine(go())

    def test_upstream_401_for_a_connector_without_secret(self) -> Deferred[None]:
        async def go() -> None:
            upstream, proxy, token = await self._setup()
            upstream.mode = "401"
            code, _, body = await self._batch(proxy, token, name="anonymous")
            self.assertEqual(code, 502)
            self.assertIn("Connector dev/anonymous", json.loads(body)["message"])
            self.assertIn("has no credentials: set spec.auth.secretRef", json.loads(body)["message"])
            self.assertIsNone(upstream.seen[0][2])
        return Deferred.fromCoroutine(go())

    def test_a_bug_is_answered_not_left_hanging(self) -> Deferred[None]:
        async def go() -> None:
            _, proxy, token = await self._setup()

            async def broken(*args: object, **kwargs: object) -> None:
                raise RuntimeError("a bug")

            self.patch(relay, "send", broken)
            code, headers, body = await self._batch(proxy, token)
            self.assertEqual(code, 500)
            self.assertEqual(json.loads(body), {"message": "connectors-proxy: Connector dev/repo: internal error (see the proxy's log)"})
            self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        return Deferred.fromCoroutine(go())
