"""
The Git server fixture itself (tests/support/gitserver.py), used directly
with the real git client and the canary credentials: if these fail, the
proxy's Git tests cannot be trusted.
"""

from __future__ import annotations

import base64
import json
import os

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from tests.support.gitserver import (
    LFS_JSON,
    GitServer,
    fresh_home,
    git_env,
    has_secret,
    lfs_pointer,
    parse_access_line,
    start_git_server,
)
from tests.support.procs import check, run


class HelpersTests(TestCase):
    def test_parse_access_line(self) -> None:
        entry = parse_access_line(
            "u\tGET\t/a.git/info/refs?service=git-upload-pack\t200\tBasic eA==\tversion=2\t-\t-\t-\t123\t-\th\n")
        self.assertEqual(entry.status, 200)
        self.assertEqual(entry.http_git_protocol, "version=2")
        self.assertEqual(entry.http_content_encoding, "")
        self.assertEqual(entry.request_length, 123)

    def test_has_secret_finds_basic_encodings(self) -> None:
        secret = "canary-0123456789abcdef"
        for user in ("", "a", "ab", "abc"):
            value = base64.b64encode(f"{user}:{secret}".encode())
            self.assertTrue(has_secret([b"Authorization: Basic " + value + b"\r\n"], secret), user)
        self.assertTrue(has_secret(["plain " + secret], secret))
        self.assertFalse(has_secret([b"nothing here", "canary-0123"], secret))


class GitServerTests(TestCase):
    timeout = 120

    def _clone(self, server: GitServer, repo: str, url: str, *extra: str
               ) -> Deferred[tuple[str, dict[str, str], object]]:
        home = fresh_home(self)
        env = git_env(home)
        dest = os.path.join(home, "clone")
        d = run(["git", "clone", *extra, url, dest], env=env)
        return d.addCallback(lambda result: (dest, env, result))

    async def _server_with_repo(self) -> GitServer:
        server = await start_git_server(self)
        await server.create_repo("team/app")
        return server

    def test_clone_and_push_with_credentials(self) -> Deferred[None]:
        async def go() -> None:
            server = await self._server_with_repo()
            dest, env, result = await self._clone(server, "team/app", server.url_with_credentials("team/app"))
            check(result)  # type: ignore[arg-type]
            with open(os.path.join(dest, "README.md"), "rb") as f:
                self.assertEqual(f.read(), b"# fixture\n")
            with open(os.path.join(dest, "new.txt"), "w") as f:
                f.write("hello\n")
            check(await run(["git", "-C", dest, "add", "new.txt"], env=env))
            check(await run(["git", "-C", dest, "commit", "-qm", "new"], env=env))
            check(await run(["git", "-C", dest, "push", "origin", "main"], env=env))
            local = check(await run(["git", "-C", dest, "rev-parse", "HEAD"], env=env)).stdout.decode().strip()
            self.assertEqual(await server.rev_parse("team/app", "main"), local)

            entries = server.requests()
            self.assertEqual({e.remote_user for e in entries if e.status == 200}, {server.username})
            self.assertIn("version=2", {e.http_git_protocol for e in entries})
            self.assertIn("/team/app.git/git-receive-pack", {e.request_uri for e in entries})
        return Deferred.fromCoroutine(go())

    def test_wrong_password_is_refused(self) -> Deferred[None]:
        async def go() -> None:
            server = await self._server_with_repo()
            url = f"http://{server.username}:wrong@127.0.0.1:{server.port}/team/app.git"
            _, _, result = await self._clone(server, "team/app", url)
            self.assertNotEqual(result.returncode, 0)  # type: ignore[attr-defined]
            self.assertEqual({e.status for e in server.requests()}, {401})
        return Deferred.fromCoroutine(go())

    def test_hook_rejects_protected_branch(self) -> Deferred[None]:
        async def go() -> None:
            server = await self._server_with_repo()
            dest, env, result = await self._clone(server, "team/app", server.url_with_credentials("team/app"))
            check(result)  # type: ignore[arg-type]
            pushed = await run(["git", "-C", dest, "push", "origin", "main:protected"], env=env)
            self.assertNotEqual(pushed.returncode, 0)
            stderr = pushed.stderr.decode()
            self.assertIn(f"remote: {server.hook_marker}: pushes to protected are not allowed", stderr)
            self.assertIn("pre-receive hook declined", stderr)
        return Deferred.fromCoroutine(go())

    def test_upstream_change_is_fetched(self) -> Deferred[None]:
        async def go() -> None:
            server = await self._server_with_repo()
            dest, env, result = await self._clone(server, "team/app", server.url_with_credentials("team/app"),
                                                  "--depth", "1")
            check(result)  # type: ignore[arg-type]
            before = len(server.requests())
            commit = await server.commit_upstream("team/app", {"b.txt": b"b\n"}, "second")
            self.assertEqual(len(server.requests()), before, "server-side commits must not show in the log")
            check(await run(["git", "-C", dest, "fetch", "origin"], env=env))
            fetched = check(await run(["git", "-C", dest, "rev-parse", "origin/main"], env=env))
            self.assertEqual(fetched.stdout.decode().strip(), commit)
        return Deferred.fromCoroutine(go())

    def test_lfs_batch_and_transfer(self) -> Deferred[None]:
        async def go() -> None:
            server = await start_git_server(self, lfs=True)
            assert server.lfs is not None
            data = os.urandom(1000)
            oid, size = lfs_pointer(data)
            pool = HTTPConnectionPool(reactor, persistent=False)
            headers: dict[str | bytes, str | bytes] = {
                "authorization": server.authorization, "content-type": LFS_JSON, "accept": LFS_JSON}
            batch = {"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": size}]}
            response = await treq.post(server.url("team/app") + "/info/lfs/objects/batch",
                                       json.dumps(batch).encode(), headers=headers, pool=pool)
            self.assertEqual(response.code, 200)
            answer = json.loads(await response.content())
            upload = answer["objects"][0]["actions"]["upload"]
            self.assertEqual(upload["href"], f"{server.url('team/app')}/info/lfs/objects/{oid}")
            self.assertEqual(upload["header"]["Authorization"], "RemoteAuth " + server.lfs.upstream_token)

            # The upstream-only header is not enough on its own: nginx wants Basic.
            refused = await treq.put(upload["href"], data, headers=upload["header"], pool=pool)
            await refused.content()
            self.assertEqual(refused.code, 401)
            stored = await treq.put(upload["href"], data, headers=dict(headers), pool=pool)
            await stored.content()
            self.assertEqual(stored.code, 200)
            self.assertEqual(server.lfs.objects[oid], data)
            got = await treq.get(upload["href"], headers=dict(headers), pool=pool)
            self.assertEqual(await got.content(), data)
            self.assertFalse(has_secret([json.dumps(answer)], server.password))
        return Deferred.fromCoroutine(go())
