"""
Git LFS batch answers never hand out the Connector's credentials (issue 10,
finding 1), and C{X-Forwarded-Host} only ever names the Connector host the
proxy routed by.

A GitLab-like LFS server builds its action C{href}s from its external URL
(or from C{X-Forwarded-Host}) and copies the request's C{Authorization}
into every action: when that URL is not C{spec.address}, such actions are
relayed through the proxy.  Real sockets, the real proxy and relay, the real
git-lfs client; a random canary password in the Secret that nothing the
client gets, nor the proxy's log, may contain.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import time
from typing import Any, cast

from attrs import define, field
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from connectors_proxy import clientconfig
from connectors_proxy.model.credentials import BasicCredentials, BearerCredentials
from connectors_proxy.protocols.git import (
    RELAY_MAX_SECONDS,
    GitResource,
    LFSRelays,
    action_lifetime,
    classify,
    relayed_headers,
    rewrite_lfs_batch,
    secret_markers,
)
from connectors_proxy.server.headers import rewrite_location
from connectors_proxy.server.routing import route
from tests.support.gitserver import LFS_JSON, LFSResource, has_secret, lfs_pointer
from tests.support.procs import require
from tests.support.proxy import RunningProxy, basic_secret, connector, connector_class, sa, start_proxy
from tests.support.wire import fetch, split_response
from tests.test_git_integration import NS, REPO, GitSetup, _read, setup

NAME = "repo"
CANARY_USER = "bot"


def basic_value(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# ---------------------------------------------------------------- pure parts

UPSTREAM = "http://gitlab.git.svc:8080/scm"
EXTERNAL = "https://gitlab.example.com"
CLIENT_BASE = "http://127.0.0.1:8080"
PREFIX = "/namespaces/dev/connectors/repo"
PASSWORD = "canary-" + "5" * 20
AUTH = basic_value(CANARY_USER, PASSWORD)


def to_client(href: str) -> str:
    return rewrite_location(href.encode(), UPSTREAM.encode(), CLIENT_BASE.encode(), PREFIX.encode()).decode()


def gitlab_answer(base: str, header: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    """A batch answer as GitLab gives it: every action carries the request's Authorization."""
    header = {"Authorization": AUTH} if header is None else header
    oid = "a" * 64
    return {"transfer": "basic", "objects": [{"oid": oid, "size": 3, "authenticated": True, "actions": {
        "upload": {"href": f"{base}/team/app.git/gitlab-lfs/objects/{oid}/3", "header": dict(header), **extra},
        "verify": {"href": f"{base}/team/app.git/gitlab-lfs/objects/verify", "header": dict(header), **extra},
    }}]}


@define
class Recorder:
    """A C{relay} callback that records what it was given."""

    calls: list[tuple[str, Any, float, frozenset[bytes] | None]] = field(factory=list)

    def __call__(self, href: str, header: Any, lifetime: float, methods: frozenset[bytes] | None) -> str:
        self.calls.append((href, header, lifetime, methods))
        return f"{CLIENT_BASE}{PREFIX}/relay/{len(self.calls)}"


MARKERS = secret_markers(BasicCredentials(CANARY_USER, PASSWORD))


def leaks(doc: Any) -> bool:
    return has_secret([json.dumps(doc)], PASSWORD) or AUTH in json.dumps(doc)


class RewriteTests(SynchronousTestCase):
    def test_external_url_actions_are_relayed(self) -> None:
        """GitLab behind another name: every action relayed, none keeps the credentials."""
        relay = Recorder()
        doc = rewrite_lfs_batch(gitlab_answer(EXTERNAL, expires_in=7200), to_client, UPSTREAM,
                                relay=relay, markers=MARKERS, now=1000.0)
        self.assertFalse(leaks(doc))
        actions = doc["objects"][0]["actions"]
        self.assertEqual(actions["upload"], {"href": f"{CLIENT_BASE}{PREFIX}/relay/1", "expires_in": 3600})
        self.assertEqual(actions["verify"], {"href": f"{CLIENT_BASE}{PREFIX}/relay/2", "expires_in": 3600})
        # The relay keeps the server's href and headers, for the server only.
        self.assertEqual(relay.calls[0], (f"{EXTERNAL}/team/app.git/gitlab-lfs/objects/{'a' * 64}/3",
                                          {"Authorization": AUTH}, RELAY_MAX_SECONDS, frozenset({b"PUT"})))
        self.assertEqual(relay.calls[1][3], frozenset({b"POST"}))

    def test_secret_in_any_header_value_or_in_the_href(self) -> None:
        """Not only credential-named headers: the secret anywhere in an action makes it relayed."""
        for header, href in [({"X-Custom": PASSWORD}, f"{EXTERNAL}/o"),
                             ({"X-Custom": "Basic " + AUTH.split()[1]}, f"{EXTERNAL}/o"),
                             ({}, f"{EXTERNAL}/o?private_token={PASSWORD}"),
                             ({}, f"https://bot:x@{EXTERNAL[8:]}/o"),
                             ({}, f"{UPSTREAM}/o?private_token={PASSWORD}")]:
            relay = Recorder()
            doc = {"objects": [{"actions": {"download": {"href": href, "header": header}},
                                "error": {"message": f"echo {PASSWORD}"}}]}
            rewrite_lfs_batch(doc, to_client, UPSTREAM, relay=relay, markers=MARKERS)
            self.assertEqual(len(relay.calls), 1, (header, href))
            self.assertEqual(doc["objects"][0]["actions"]["download"]["href"], f"{CLIENT_BASE}{PREFIX}/relay/1")
            self.assertFalse(leaks(doc), doc)

    def test_forwarded_host_origin_is_the_git_server(self) -> None:
        """
        hrefs built on the X-Forwarded-Host the proxy sent name the proxy: they
        are mapped like the server's own (never relayed to the proxy itself,
        which would send it the credentials as a client token).
        """
        alias = "http://c-repo.dev.svc.cluster.local"
        up = "http://gitlab.git.svc:8080"

        def host_mode(href: str) -> str:
            return rewrite_location(href.encode(), up.encode(), alias.encode(), b"").decode()

        relay = Recorder()
        doc = rewrite_lfs_batch(gitlab_answer(alias), host_mode, up, relay=relay, markers=MARKERS, aliases=[alias])
        self.assertEqual(relay.calls, [])
        self.assertEqual(doc["objects"][0]["actions"]["upload"],
                         {"href": f"{alias}/team/app.git/gitlab-lfs/objects/{'a' * 64}/3"})
        self.assertFalse(leaks(doc))

        # Above the address's path prefix: relayed, to the server's own origin.
        relay = Recorder()
        doc = rewrite_lfs_batch(gitlab_answer("http://c-repo.dev.svc.cluster.local"), to_client, UPSTREAM,
                                relay=relay, markers=MARKERS, aliases=[alias])
        self.assertEqual(relay.calls[0][0], f"http://gitlab.git.svc:8080/team/app.git/gitlab-lfs/objects/{'a' * 64}/3")
        self.assertFalse(leaks(doc))

    def test_uncredentialed_actions_are_kept(self) -> None:
        relay = Recorder()
        presigned = {"href": "https://bucket.s3.example.net/o?X-Amz-Signature=abc", "header": {"x-amz-meta": "m"},
                     "expires_at": "2030-01-01T00:00:00Z"}
        doc = {"objects": [{"actions": {"download": dict(presigned)}}]}
        rewrite_lfs_batch(doc, to_client, UPSTREAM, relay=relay, markers=MARKERS)
        self.assertEqual(doc["objects"][0]["actions"]["download"], presigned)
        self.assertEqual(relay.calls, [])

    def test_without_a_relay_credentials_are_still_removed(self) -> None:
        doc = gitlab_answer(EXTERNAL)
        doc["objects"][0]["actions"]["download"] = {"href": f"{EXTERNAL}/o?private_token={PASSWORD}"}
        rewrite_lfs_batch(doc, to_client, UPSTREAM, markers=MARKERS)
        actions = doc["objects"][0]["actions"]
        self.assertNotIn("header", actions["upload"])
        self.assertNotIn("download", actions)
        self.assertFalse(leaks(doc))

    def test_odd_actions(self) -> None:
        """No href: credentials removed all the same; relative hrefs are the Git server's."""
        relay = Recorder()
        doc: Any = {"objects": [{"actions": {
            "download": {"header": {"Authorization": "RemoteAuth x", "Accept": "a"}},
            "upload": {"href": "/other/o", "header": {"Authorization": "RemoteAuth x"}},
            "verify": {"href": "/scm/v", "header": None},
        }}]}
        rewrite_lfs_batch(doc, to_client, UPSTREAM, relay=relay, markers=MARKERS)
        actions = doc["objects"][0]["actions"]
        self.assertEqual(actions["download"], {"header": {"Accept": "a"}})
        self.assertEqual(relay.calls[0][0], "http://gitlab.git.svc:8080/other/o")
        self.assertEqual(actions["verify"], {"href": f"{CLIENT_BASE}{PREFIX}/v"})
        # A document of another shape still never shows the secret.
        masked = rewrite_lfs_batch({"message": f"bad {AUTH}"}, to_client, markers=MARKERS)["message"]
        self.assertEqual(len(masked), len(f"bad {AUTH}"))
        self.assertNotIn(AUTH.split()[1], masked)
        self.assertNotIn(PASSWORD, base64.b64decode(masked.split()[2].replace("*", "A") + "==").decode("latin-1"))

    def test_a_header_that_is_not_a_mapping_counts_as_credentials(self) -> None:
        relay = Recorder()
        doc = {"objects": [{"actions": {"download": {"href": f"{EXTERNAL}/o", "header": [AUTH]}}}]}
        rewrite_lfs_batch(doc, to_client, UPSTREAM, relay=relay, markers=MARKERS)
        self.assertEqual(len(relay.calls), 1)
        self.assertNotIn("header", doc["objects"][0]["actions"]["download"])


class SecretMarkerTests(SynchronousTestCase):
    def test_basic(self) -> None:
        markers = secret_markers(BasicCredentials("someone", PASSWORD))
        for text in (PASSWORD, basic_value("someone", PASSWORD), basic_value("x", PASSWORD),
                     basic_value("xy", PASSWORD), basic_value("xyz", PASSWORD), f"?p={PASSWORD}"):
            self.assertTrue(any(m in text for m in markers), text)
        self.assertFalse(any(m in basic_value("someone", "other") for m in markers))

    def test_bearer_and_none(self) -> None:
        self.assertIn("glpat-123456789", secret_markers(BearerCredentials("glpat-123456789")))
        self.assertEqual(secret_markers(None), ())


class LifetimeTests(SynchronousTestCase):
    def test_lifetimes(self) -> None:
        now = 1_700_000_000.0
        self.assertEqual(action_lifetime({}, now), 15 * 60)
        self.assertEqual(action_lifetime({"expires_in": 60}, now), 60)
        self.assertEqual(action_lifetime({"expires_in": 86400}, now), 3600)
        self.assertEqual(action_lifetime({"expires_in": -5}, now), 1)
        self.assertEqual(action_lifetime({"expires_in": "soon", "expires_at": "never"}, now), 15 * 60)
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 120))
        self.assertEqual(action_lifetime({"expires_at": at}, now), 120)
        self.assertEqual(action_lifetime({"expires_at": at, "expires_in": 30}, now), 30)
        self.assertEqual(action_lifetime({"expires_at": at}, None), 15 * 60)


class RelayTableTests(SynchronousTestCase):
    owner = ("dev/repo", sa("dev"))

    def test_expiry_and_owner(self) -> None:
        clock = Clock()
        relays = LFSRelays(clock)
        token = relays.add(self.owner, "https://x/o", ((b"Authorization", b"Basic x"),), 60, None)
        self.assertGreaterEqual(len(token), 43)
        entry = relays.get(token, self.owner)
        assert entry is not None
        self.assertEqual(entry.href, "https://x/o")
        self.assertNotIn("Basic x", repr(entry))
        self.assertIsNone(relays.get(token, ("dev/other", sa("dev"))))
        self.assertIsNone(relays.get(token, ("dev/repo", sa("dev", "someone-else"))))
        self.assertIsNone(relays.get("guess", self.owner))
        clock.advance(59)
        self.assertIsNotNone(relays.get(token, self.owner))
        clock.advance(1)
        self.assertIsNone(relays.get(token, self.owner))
        self.assertEqual(len(relays), 0)

    def test_bounded(self) -> None:
        clock = Clock()
        relays = LFSRelays(clock, max_entries=5, max_per_owner=3)
        other = ("dev/repo", sa("dev", "other"))
        kept = relays.add(other, "https://x/o", (), 60)
        flood = [relays.add(self.owner, f"https://x/{i}", (), 60) for i in range(10)]
        # One identity's flood pushes out only its own oldest entries.
        self.assertIsNotNone(relays.get(kept, other))
        self.assertEqual([relays.get(t, self.owner) is not None for t in flood], [False] * 7 + [True] * 3)
        self.assertEqual(len(relays), 4)
        # Expired entries go first when room is needed.
        clock.advance(61)
        relays.add(other, "https://x/new", (), 60)
        self.assertEqual(len(relays), 1)

    def test_bounded_by_bytes(self) -> None:
        # Each entry counts as 200 bytes and its href: 710 here.
        relays = LFSRelays(Clock(), max_bytes=2200)
        tokens = [relays.add(self.owner, "https://x/" + "o" * 500, (), 60) for _ in range(5)]
        self.assertEqual([relays.get(t, self.owner) is not None for t in tokens], [False, False, True, True, True])

    def test_relayed_headers_are_valid_fields(self) -> None:
        self.assertEqual(relayed_headers({"Authorization": "Basic x", "X-N": 3, "Bad Name": "v",
                                          "X-Split": "a\r\nInjected: 1", "Host": "evil", "X-B": True}),
                         ((b"Authorization", b"Basic x"), (b"X-N", b"3")))
        self.assertEqual(relayed_headers(["Authorization: x"]), ())


class RoutingTests(SynchronousTestCase):
    def test_relay_paths_are_classified(self) -> None:
        for method in (b"GET", b"PUT", b"POST", b"HEAD"):
            kind = classify(method, b"/team/app.git/info/lfs/objects/.connectors-proxy?token=x")
            self.assertEqual(kind.kind, "lfs-relay")
            self.assertTrue(kind.is_lfs)
        self.assertEqual(classify(b"POST", b"/team/app.git/info/lfs/objects/batch").kind, "lfs-batch")

    def test_route_says_which_host_it_routed_by(self) -> None:
        self.assertEqual(route(b"/x", b"c-repo.dev.svc.cluster.local:8080", "cluster.local").host,
                         b"c-repo.dev.svc.cluster.local:8080")
        self.assertEqual(route(b"/x", b"c-repo.dev.svc.:evil.example", "cluster.local").host, b"c-repo.dev.svc")
        self.assertIsNone(route(b"/namespaces/dev/connectors/repo/x", b"attacker.example", "cluster.local").host)
        self.assertEqual(route(b"http://c-repo.dev/x", b"attacker.example", "cluster.local").host, b"c-repo.dev")


# ---------------------------------------------------------------- on the wire


@define
class Seen:
    method: bytes
    path: bytes
    host: bytes | None
    authorization: bytes | None
    forwarded_host: bytes | None


class GitLabLike(Resource):
    """
    The LFS side of a GitLab whose external URL is not the Connector's
    address: hrefs on C{external} (or on C{X-Forwarded-Proto://X-Forwarded-Host}
    when sent), the request's C{Authorization} copied into every action.
    Transfers need that C{Authorization}, as on GitLab.
    """

    isLeaf = True

    def __init__(self, authorization: str) -> None:
        super().__init__()
        self.authorization = authorization.encode()
        self.external = ""
        self.objects: dict[str, bytes] = {}
        self.seen: list[Seen] = []

    def render(self, request: Request) -> bytes:  # type: ignore[override]
        self.seen.append(Seen(request.method, request.uri, request.getHeader(b"host"),
                              request.getHeader(b"authorization"), request.getHeader(b"x-forwarded-host")))
        request.setHeader(b"content-type", LFS_JSON.encode())
        if request.getHeader(b"authorization") != self.authorization:
            request.setResponseCode(401)
            return b'{"message": "HTTP Basic: Access denied"}'
        path = request.path.decode()
        content = request.content.read()  # type: ignore[union-attr]
        if path.endswith("/info/lfs/objects/batch"):
            return self._batch(request, path[: -len("/info/lfs/objects/batch")], json.loads(content))
        if path.endswith("/gitlab-lfs/objects/verify"):
            return b"{}"
        oid = path.split("/gitlab-lfs/objects/", 1)[-1].split("/")[0]
        if request.method == b"PUT":
            self.objects[oid] = content
            return b""
        if oid in self.objects:
            request.setHeader(b"content-type", b"application/octet-stream")
            return self.objects[oid]
        request.setResponseCode(404)
        return b'{"message": "not found"}'

    def _batch(self, request: Request, repo: str, doc: dict[str, Any]) -> bytes:
        forwarded = request.getHeader(b"x-forwarded-host")
        proto = (request.getHeader(b"x-forwarded-proto") or b"http").decode()
        base = f"{proto}://{forwarded.decode()}" if forwarded else self.external
        header = {"Authorization": self.authorization.decode()}
        answers = []
        for o in doc["objects"]:
            oid, size = o["oid"], o["size"]
            actions: dict[str, Any]
            if doc["operation"] == "upload":
                actions = {
                    "upload": {"href": f"{base}{repo}/gitlab-lfs/objects/{oid}/{size}", "header": header,
                               "expires_in": 7200},
                    "verify": {"href": f"{base}{repo}/gitlab-lfs/objects/verify", "header": header,
                               "expires_in": 7200},
                }
            else:
                actions = {"download": {"href": f"{base}{repo}/gitlab-lfs/objects/{oid}", "header": header,
                                        "expires_in": 7200}}
            answers.append({"oid": oid, "size": size, "authenticated": True, "actions": actions})
        return json.dumps({"transfer": "basic", "objects": answers}).encode()


@define
class Response:
    raw: bytes
    code: int
    headers: dict[bytes, list[bytes]]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@define
class Wire:
    """A GitLab-like LFS server, a proxy with a git Connector for it at another spelling of its host."""

    test: TestCase
    upstream: GitLabLike
    port: int
    proxy: RunningProxy
    token: str = field(repr=False)
    other_token: str = field(repr=False)
    password: str = field(repr=False)
    seen: list[bytes] = field(factory=list)

    @property
    def git(self) -> GitResource:
        return cast(GitResource, cast(dict[str, Any], self.proxy.root.protocols)["git"])

    async def ask(self, method: str, url: str, body: bytes = b"", token: str | None = None,
                  host: str | None = None, target: str | None = None, **headers: str) -> Response:
        """One request on a raw socket; every byte of the answer is kept for the leak checks."""
        path = url.split("://", 1)[1].split("/", 1)[1]
        lines = [f"{method} {target or '/' + path} HTTP/1.1", f"Host: {host or url.split('/')[2]}",
                 f"Content-Length: {len(body)}", "Connection: close"]
        token = self.token if token is None else token
        if token:
            lines.append(f"Authorization: {clientconfig.basic_authorization(token)}")
        lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
        raw = await threads.deferToThread(fetch, self.proxy.port,
                                          ("\r\n".join(lines) + "\r\n\r\n").encode() + body, 20)
        self.seen.append(raw)
        return Response(raw, *split_response(raw))

    async def batch(self, operation: str, data: bytes, url: str | None = None, **kw: Any) -> Response:
        oid, size = lfs_pointer(data)
        body = json.dumps({"operation": operation, "transfers": ["basic"],
                           "objects": [{"oid": oid, "size": size}]}).encode()
        return await self.ask("POST", url or self.proxy.path_url(NS, NAME, f"/{REPO}.git/info/lfs/objects/batch"),
                              body, Content_Type=LFS_JSON, Accept=LFS_JSON, **kw)

    def assert_no_secret(self) -> None:
        """Nothing the client got, nor the proxy's log, holds the canary (raw, base64, or the Basic value)."""
        basic = basic_value(CANARY_USER, self.password)
        seen: list[bytes | str] = [*self.seen, self.proxy.logs.text()]
        self.test.assertTrue(self.seen)
        self.test.assertFalse(has_secret(seen, self.password), "the Connector's secret reached the client or the log")
        self.test.assertFalse(any(basic.encode() in (s.encode() if isinstance(s, str) else s) for s in seen))


async def wire(test: TestCase) -> Wire:
    password = "canary-" + secrets.token_hex(16)
    upstream = GitLabLike(basic_value(CANARY_USER, password))
    site: Any = Site(upstream)
    listening = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
    test.addCleanup(listening.stopListening)
    port = listening.getHost().port
    # Its external URL: the same server under another spelling of its host.
    upstream.external = f"http://localhost:{port}"
    token, other_token = "client-" + secrets.token_hex(16), "other-" + secrets.token_hex(16)
    proxy = await start_proxy(test, [
        connector_class("git", protocol="git"),
        connector(NS, NAME, "git", f"http://127.0.0.1:{port}", secret="git-creds"),
        connector(NS, "other", "git", f"http://127.0.0.1:{port}", secret="git-creds"),
        basic_secret(NS, "git-creds", CANARY_USER, password),
    ], {token: sa(NS), other_token: sa(NS, "other")})
    return Wire(test, upstream, port, proxy, token, other_token, password)


class WireTests(TestCase):
    timeout = 60

    def test_external_url_actions_are_relayed_through_the_proxy(self) -> None:
        async def go() -> None:
            w = await wire(self)
            data = os.urandom(3000)
            oid, size = lfs_pointer(data)
            answer = await w.batch("upload", data)
            self.assertEqual(answer.code, 200, answer.raw)
            actions = answer.json()["objects"][0]["actions"]
            relay_base = w.proxy.path_url(NS, NAME, f"/{REPO}.git/info/lfs/objects/.connectors-proxy?token=")
            for name in ("upload", "verify"):
                self.assertTrue(actions[name]["href"].startswith(relay_base), actions[name])
                self.assertNotIn("header", actions[name])
                self.assertEqual(actions[name]["expires_in"], 3600)
            self.assertNotEqual(actions["upload"]["href"], actions["verify"]["href"])

            # The transfers: the client's token only; the server gets its own credentials.
            before = len(w.upstream.seen)
            put = await w.ask("PUT", actions["upload"]["href"], data, Content_Type="application/octet-stream")
            self.assertEqual(put.code, 200, put.raw)
            self.assertEqual(w.upstream.objects[oid], data)
            verify = await w.ask("POST", actions["verify"]["href"], json.dumps({"oid": oid, "size": size}).encode(),
                                 Content_Type=LFS_JSON)
            self.assertEqual(verify.code, 200, verify.raw)
            relayed = w.upstream.seen[before:]
            self.assertEqual([(s.method, s.host) for s in relayed],
                             [(b"PUT", f"localhost:{w.port}".encode()), (b"POST", f"localhost:{w.port}".encode())])
            self.assertEqual({s.authorization for s in relayed}, {w.upstream.authorization})
            self.assertEqual(relayed[0].path, f"/{REPO}.git/gitlab-lfs/objects/{oid}/{size}".encode())

            download = (await w.batch("download", data)).json()["objects"][0]["actions"]["download"]
            self.assertTrue(download["href"].startswith(relay_base), download)
            got = await w.ask("GET", download["href"])
            self.assertEqual((got.code, got.body), (200, data))

            # The relay URL is no credential in the access log either.
            token = download["href"].rsplit("=", 1)[1]
            self.assertNotIn(token, w.proxy.logs.text())
            self.assertIn(".connectors-proxy?token=REDACTED", w.proxy.logs.text())
            w.assert_no_secret()
        return Deferred.fromCoroutine(go())

    def test_relay_urls_are_the_clients_own_and_expire(self) -> None:
        async def go() -> None:
            w = await wire(self)
            clock = Clock()
            clock.advance(time.time())
            w.git.relays.clock = clock
            data = os.urandom(100)
            w.upstream.objects[lfs_pointer(data)[0]] = data
            href = (await w.batch("download", data)).json()["objects"][0]["actions"]["download"]["href"]
            before = len(w.upstream.seen)

            refused = await w.ask("GET", href, token="")
            self.assertEqual(refused.code, 401)
            # Another identity allowed on the same Connector: not its URL.
            other = await w.ask("GET", href, token=w.other_token)
            self.assertEqual(other.code, 404)
            self.assertIn("unknown or has expired", other.json()["message"])
            # The same identity through another Connector.
            elsewhere = href.replace(f"/connectors/{NAME}/", "/connectors/other/")
            self.assertEqual((await w.ask("GET", elsewhere)).code, 404)
            # Guessed, and no token at all.
            self.assertEqual((await w.ask("GET", href[:-4] + "AAAA")).code, 404)
            self.assertEqual((await w.ask("GET", href.split("?")[0])).code, 404)
            # A download URL is no upload URL.
            self.assertEqual((await w.ask("PUT", href, b"x")).code, 405)
            self.assertEqual(w.upstream.seen[before:], [])

            self.assertEqual((await w.ask("GET", href)).body, data)
            clock.advance(3600)
            expired = await w.ask("GET", href)
            self.assertEqual(expired.code, 404)
            self.assertEqual(len(w.upstream.seen), before + 1)
            w.assert_no_secret()
        return Deferred.fromCoroutine(go())

    def test_forwarded_host_is_only_the_connector_host_routed_by(self) -> None:
        async def go() -> None:
            w = await wire(self)
            data = os.urandom(100)
            oid, size = lfs_pointer(data)
            rest = f"/{REPO}.git/info/lfs/objects/batch"

            # Path mode with a Host of the client's choosing: not passed on.
            answer = await w.batch("upload", data, host="attacker.example")
            self.assertEqual(answer.code, 200, answer.raw)
            self.assertIsNone(w.upstream.seen[-1].forwarded_host)
            self.assertNotIn(b"attacker.example", w.upstream.seen[-1].host or b"")

            # Host mode: the Connector host name it was routed by.
            host = f"c-{NAME}.{NS}.svc.cluster.local:{w.proxy.port}"
            answer = await w.batch("upload", data, url=f"http://{host}/{REPO}.git/info/lfs/objects/batch")
            self.assertEqual(w.upstream.seen[-1].forwarded_host, host.encode())
            # hrefs the server built on it name the proxy: mapped, no credentials, no relay.
            upload = answer.json()["objects"][0]["actions"]["upload"]
            self.assertEqual(upload, {"href": f"http://{host}/{REPO}.git/gitlab-lfs/objects/{oid}/{size}",
                                      "expires_in": 7200})
            put = await w.ask("PUT", upload["href"], data)
            self.assertEqual(put.code, 200, put.raw)
            self.assertEqual(w.upstream.objects[oid], data)
            self.assertEqual(w.upstream.seen[-1].host, f"127.0.0.1:{w.port}".encode())

            # An absolute-form target names the Connector; its Host header does not count.
            await w.batch("upload", data, host="attacker.example",
                          target=f"http://c-{NAME}.{NS}.svc{rest}")
            self.assertEqual(w.upstream.seen[-1].forwarded_host, f"c-{NAME}.{NS}.svc".encode())
            # A port that is no port is not passed on either.
            await w.batch("upload", data, host=f"c-{NAME}.{NS}.svc:attacker.example", target=rest)
            self.assertEqual(w.upstream.seen[-1].forwarded_host, f"c-{NAME}.{NS}.svc".encode())
            self.assertFalse([s for s in w.upstream.seen if b"attacker" in (s.forwarded_host or b"")])
            w.assert_no_secret()
        return Deferred.fromCoroutine(go())


# ---------------------------------------------------------------- the real git-lfs


def copy_authorization(lfs: LFSResource, external: str) -> None:
    """
    Make the fixture's LFS server behave like GitLab behind another name:
    hrefs on C{external} (or on C{X-Forwarded-Host}), and the request's
    C{Authorization} (the Connector's Secret) copied into every action.
    """
    lfs.public_url = external
    batch = lfs._batch

    def copying(request: Request, repo: str) -> bytes:
        doc = json.loads(batch(request, repo))
        forwarded = request.getHeader(b"x-forwarded-host")
        proto = (request.getHeader(b"x-forwarded-proto") or b"http").decode()
        for entry in doc["objects"]:
            for action in entry.get("actions", {}).values():
                action["header"] = {"Authorization": request.getHeader(b"authorization").decode()}  # type: ignore[union-attr]
                if forwarded:
                    action["href"] = action["href"].replace(external, f"{proto}://{forwarded.decode()}", 1)
        return json.dumps(doc).encode()

    lfs._batch = copying  # type: ignore[method-assign]


class GitLFSClientTests(TestCase):
    timeout = 300

    def test_git_lfs_push_and_clone_against_an_external_url(self) -> None:
        async def go() -> None:
            require("git-lfs")
            s: GitSetup = await setup(self, lfs=True)
            lfs = s.server.lfs
            assert lfs is not None
            external = f"http://localhost:{s.server.port}"
            copy_authorization(lfs, external)

            home, env = s.home("path")
            # git-lfs prints its HTTP exchange (batch answers included) for the leak checks.
            env.update(GIT_CURL_VERBOSE="1", GIT_TRACE="1")
            await s.git(env, "lfs", "install", "--skip-repo")
            dest = os.path.join(home, "clone")
            await s.git(env, "clone", s.upstream_url(), dest)
            await s.git(env, "-C", dest, "lfs", "track", "*.bin")
            blob = os.urandom(256 * 1024 + 3)
            with open(os.path.join(dest, "asset.bin"), "wb") as f:
                f.write(blob)
            await s.git(env, "-C", dest, "add", "-A")
            await s.git(env, "-C", dest, "commit", "-q", "-m", "lfs asset")
            await s.git(env, "-C", dest, "push", "origin", "main")
            oid = hashlib.sha256(blob).hexdigest()
            self.assertEqual(lfs.objects.get(oid), blob)

            for mode in ("path", "http-proxy"):
                other, env2 = s.home(mode)
                env2.update(GIT_CURL_VERBOSE="1", GIT_TRACE="1")
                await s.git(env2, "lfs", "install", "--skip-repo")
                copy = os.path.join(other, "copy")
                await s.git(env2, "clone", s.upstream_url(), copy)
                self.assertEqual(_read(os.path.join(copy, "asset.bin")), blob, mode)

            lfs_entries = [e for e in s.server.requests() if "/info/lfs/" in e.request_uri]
            # Everything went through the proxy: the client never had what it
            # takes to reach the server itself.
            self.assertTrue(lfs_entries)
            self.assertTrue(all(e.http_x_forwarded_for for e in lfs_entries), lfs_entries)
            # Path mode: the transfers were relayed to the external URL.
            transfers = {(e.request_method, e.http_host) for e in lfs_entries if "/objects/batch" not in e.request_uri}
            self.assertIn(("PUT", f"localhost:{s.server.port}"), transfers)
            self.assertIn(("GET", f"localhost:{s.server.port}"), transfers)
            self.assertEqual({c.authorization for c in lfs.calls}, {s.server.authorization})
            s.assert_no_secret()
        return Deferred.fromCoroutine(go())
