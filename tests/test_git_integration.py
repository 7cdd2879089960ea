"""
Git through connectors-proxy with the real components: git-http-backend
behind nginx with Basic auth (random canary credentials), the stock git
client (and git-lfs) configured only with a .gitconfig like the one the
Connectors CSI driver mounts: the client's own token and a URL rewrite.

Every test checks that the canary password never reaches anything the
client sees (its output and a full GIT_TRACE_CURL of the HTTP exchange) or
the proxy's logs, and that the client's token never reaches the Git server.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
import time
from typing import Any, cast

import treq
from attrs import define, field
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from connectors_proxy import clientconfig
from connectors_proxy.protocols.git import GitResource
from tests.support.gitserver import (
    LFS_JSON,
    GitServer,
    fresh_home,
    git_env,
    has_secret,
    lfs_pointer,
    start_git_server,
)
from tests.support.procs import check, free_port, require, run
from tests.support.proxy import (
    ROOT,
    RunningProxy,
    basic_secret,
    connector,
    connector_class,
    sa,
    start_proxy,
)

NS = "dev"
NAME = "repo"
REPO = "team/app"
CONNECTOR_HOST = f"c-{NAME}.{NS}.svc.cluster.local"
MiB = 1024 * 1024


def serve_git(proxy: RunningProxy) -> None:
    """The daemon's wiring (tap.protocol_resources) serves git with L{GitResource}."""
    protocols = cast(dict[str, Any], proxy.root.protocols)
    assert isinstance(protocols.get("git"), GitResource), protocols


@define
class GitSetup:
    """A Git server, a proxy with a git Connector for it, and a client token."""

    test: TestCase
    server: GitServer
    proxy: RunningProxy
    token: str = field(repr=False)
    seen: list[bytes] = field(factory=list)
    secrets: list[str] = field(factory=list)

    @property
    def address(self) -> str:
        """The Connector's spec.address: what users clone from."""
        return self.server.base_url

    def upstream_url(self, repo: str = REPO) -> str:
        return self.server.url(repo)

    def home(self, mode: str = "path", token: str | None = None, connector_name: str = NAME,
             csi_style: bool = False) -> tuple[str, dict[str, str]]:
        """
        A fresh HOME whose .gitconfig sends the Git server's URLs through the
        proxy, in one of the modes: C{path} (/namespaces/NS/connectors/NAME),
        C{host} (Host: c-NAME.NS.svc.cluster.local, resolved to loopback by
        curl) or C{http-proxy} (absolute-form requests through http.proxy).
        C{token=""} writes no token at all.
        """
        home = fresh_home(self.test)
        token = self.token if token is None else token
        http_proxy = None
        extra = ""
        if mode == "path":
            proxy_address = self.proxy.path_url(NS, connector_name, "")
        elif mode == "host":
            host = f"c-{connector_name}.{NS}.svc.cluster.local"
            proxy_address = f"http://{host}:{self.proxy.port}"
            extra = f"[http]\n\tcurloptResolve = {host}:{self.proxy.port}:127.0.0.1\n"
        else:
            proxy_address = f"http://c-{connector_name}.{NS}.svc.cluster.local"
            http_proxy = self.proxy.url
        if not token:
            text = f'[url "{proxy_address}/"]\n\tinsteadOf = {self.address}/\n'
        elif csi_style:
            # Exactly what the issue describes the CSI driver mounting:
            # an unscoped extraHeader and the URL rewrite.
            text = (f"[http]\n\textraHeader = Authorization: {clientconfig.basic_authorization(token)}\n"
                    f'[url "{proxy_address}/"]\n\tinsteadOf = {self.address}/\n')
        else:
            text = clientconfig.gitconfig(self.address, proxy_address, token, http_proxy=http_proxy)
        with open(os.path.join(home, ".gitconfig"), "a") as f:
            f.write(text + extra)
        env = git_env(home)
        env["GIT_TRACE_CURL"] = os.path.join(home, "curl-trace")
        return home, env

    async def clone(self, mode: str = "path", csi_style: bool = False, **env_extra: str
                    ) -> tuple[str, dict[str, str]]:
        """
        Clone the repository through the proxy (see L{home} for C{mode} and
        C{csi_style}) with C{env_extra} in git's environment.  Returns the
        clone's directory and that environment, for more git commands.
        """
        home, env = self.home(mode, csi_style=csi_style)
        env.update(env_extra)
        dest = os.path.join(home, "clone")
        await self.git(env, "clone", self.upstream_url(), dest)
        return dest, env

    async def git(self, env: dict[str, str], *args: str, ok: bool = True,
                  cwd: str | None = None) -> subprocess.CompletedProcess[bytes]:
        """Run git; keep all it printed and traced for the secret checks."""
        result = await run(["git", *args], env=env, cwd=cwd)
        self.seen += [result.stdout, result.stderr]
        trace = env.get("GIT_TRACE_CURL")
        if trace and os.path.exists(trace):
            with open(trace, "rb") as f:
                self.seen.append(f.read())
            os.unlink(trace)
        if ok:
            check(result)
        return result

    def assert_no_secret(self) -> None:
        """Nothing the client saw, nor the proxy's logs, holds an upstream secret."""
        seen: list[bytes | str] = [*self.seen, self.proxy.logs.text()]
        self.test.assertTrue(self.seen, "no client output was collected")
        for secret in [self.server.password, *self.secrets]:
            self.test.assertFalse(has_secret(seen, secret), "an upstream secret reached the client or the logs")
        if self.server.lfs is not None:
            self.test.assertFalse(has_secret(seen, self.server.lfs.upstream_token),
                                  "the LFS server's own token reached the client")
        # And the other way round: the client's token never reaches the Git server.
        for entry in self.server.requests():
            self.test.assertFalse(has_secret([entry.http_authorization], self.token),
                                  f"the client token reached the Git server: {entry.request_uri}")
        if self.server.lfs is not None:
            for call in self.server.lfs.calls:
                self.test.assertFalse(has_secret([call.authorization], self.token))


async def setup(test: TestCase, lfs: bool = False, extra_objects: list[dict[str, Any]] | None = None) -> GitSetup:
    server = await start_git_server(test, lfs=lfs)
    await server.create_repo(REPO)
    token = "client-" + secrets.token_hex(16)
    objects = [
        connector_class("git", protocol="git"),
        connector(NS, NAME, "git", server.base_url, secret="git-creds"),
        basic_secret(NS, "git-creds", server.username, server.password),
        *(extra_objects or []),
    ]
    proxy = await start_proxy(test, objects, {token: sa(NS)})
    serve_git(proxy)
    return GitSetup(test, server, proxy, token)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _via_proxy(entries: list[Any]) -> bool:
    return bool(entries) and all(e.http_x_forwarded_for for e in entries)


class CloneFetchTests(TestCase):
    timeout = 300

    def test_clone_full_and_shallow_v0_and_v2(self) -> Deferred[None]:
        """Path mode, written by the clientconfig command, as a standalone user would."""
        async def go() -> None:
            s = await setup(self)
            home = fresh_home(self)
            token_file = os.path.join(home, "token")
            with open(token_file, "w") as f:
                f.write(s.token + "\n")
            check(await run([sys.executable, "-m", "connectors_proxy.clientconfig", "-o",
                             os.path.join(home, ".gitconfig"), "git", "--connector", f"{NS}/{NAME}",
                             "--address", s.address, "--token-file", token_file, "--proxy", s.proxy.url],
                            env={"PYTHONPATH": ROOT}))
            env = git_env(home)
            env["GIT_TRACE_CURL"] = os.path.join(home, "curl-trace")
            for version in ("0", "2"):
                for depth in ((), ("--depth", "1")):
                    before = len(s.server.requests())
                    dest = os.path.join(home, f"v{version}{'-shallow' if depth else ''}")
                    await s.git(env, "-c", f"protocol.version={version}", "clone", *depth,
                                s.upstream_url(), dest)
                    self.assertEqual(_read(os.path.join(dest, "README.md")), b"# fixture\n")
                    self.assertEqual(os.path.exists(os.path.join(dest, ".git", "shallow")), bool(depth))
                    entries = s.server.requests()[before:]
                    self.assertTrue(_via_proxy(entries), entries)
                    self.assertEqual({e.remote_user for e in entries}, {s.server.username})
                    protocols = {e.http_git_protocol for e in entries}
                    self.assertEqual(protocols, {"version=2"} if version == "2" else {""})
            s.assert_no_secret()
        return Deferred.fromCoroutine(go())

    def test_fetch_after_upstream_change_through_http_proxy(self) -> Deferred[None]:
        """Host mode through http.proxy (absolute-form targets); gzip request bodies."""
        async def go() -> None:
            s = await setup(self)
            dest, env = await s.clone("http-proxy")
            # Enough local history, dated after everything upstream so git
            # offers it first, that a negotiation request is over 1 KiB,
            # which git sends gzip-compressed.
            now = int(time.time())
            for i in range(60):
                dated = dict(env, GIT_COMMITTER_DATE=f"{now + 3600 + i} +0000")
                await s.git(dated, "-C", dest, "commit", "-q", "--allow-empty", "-m", f"local {i}")
            commit = await s.server.commit_upstream(REPO, {"news.txt": b"upstream change\n"}, "upstream")
            before = len(s.server.requests())
            await s.git(env, "-C", dest, "fetch", "origin")
            fetched = await s.git(env, "-C", dest, "rev-parse", "origin/main")
            self.assertEqual(fetched.stdout.decode().strip(), commit)
            entries = s.server.requests()[before:]
            self.assertTrue(_via_proxy(entries), entries)
            self.assertIn("gzip", {e.http_content_encoding for e in entries if e.request_method == "POST"})
            s.assert_no_secret()
        return Deferred.fromCoroutine(go())

    def test_clone_host_mode_with_csi_style_config(self) -> Deferred[None]:
        """Host: c-NAME.NS.svc.cluster.local, the .gitconfig exactly as the CSI driver mounts it."""
        async def go() -> None:
            s = await setup(self)
            dest, env = await s.clone("host", csi_style=True)
            self.assertEqual(_read(os.path.join(dest, "README.md")), b"# fixture\n")
            self.assertTrue(_via_proxy(s.server.requests()))
            s.assert_no_secret()
        return Deferred.fromCoroutine(go())

    def test_dumb_http_clone(self) -> Deferred[None]:
        async def go() -> None:
            s = await setup(self)
            await s.server.update_server_info(REPO)
            dest, env = await s.clone("path", GIT_SMART_HTTP="0")
            self.assertEqual(_read(os.path.join(dest, "README.md")), b"# fixture\n")
            uris = {e.request_uri for e in s.server.requests()}
            self.assertIn(f"/{REPO}.git/info/refs", uris)
            self.assertFalse([u for u in uris if "service=" in u], uris)
            s.assert_no_secret()
        return Deferred.fromCoroutine(go())


class PushTests(TestCase):
    timeout = 300

    def test_push_with_20_mib_binary(self) -> Deferred[None]:
        async def go() -> None:
            s = await setup(self)
            dest, env = await s.clone("path", GIT_TRACE_CURL_NO_DATA="1")
            blob = os.urandom(20 * MiB)
            with open(os.path.join(dest, "big.bin"), "wb") as f:
                f.write(blob)
            with open(os.path.join(dest, "notes.txt"), "w") as f:
                f.write("a small file too\n")
            await s.git(env, "-C", dest, "add", "-A")
            await s.git(env, "-C", dest, "commit", "-q", "-m", "binary")
            before = len(s.server.requests())
            await s.git(env, "-C", dest, "push", "origin", "main")
            local = (await s.git(env, "-C", dest, "rev-parse", "HEAD")).stdout.decode().strip()
            self.assertEqual(await s.server.rev_parse(REPO, "main"), local)

            # git probes with a tiny request, then streams the pack chunked.
            pushes = [e for e in s.server.requests()[before:] if e.request_uri.endswith("/git-receive-pack")]
            pack = max(pushes, key=lambda e: e.request_length)
            self.assertGreater(pack.request_length, 20 * MiB)
            self.assertEqual(pack.http_transfer_encoding, "chunked")
            self.assertTrue(_via_proxy(pushes))

            # What the server stored, read back directly (not through the proxy).
            direct = os.path.join(fresh_home(self), "direct")
            check(await run(["git", "clone", "-q", s.server.url_with_credentials(REPO), direct],
                            env=git_env(fresh_home(self))))
            self.assertEqual(hashlib.sha256(_read(os.path.join(direct, "big.bin"))).hexdigest(),
                             hashlib.sha256(blob).hexdigest())
            s.assert_no_secret()
        return Deferred.fromCoroutine(go())

    def test_push_rejected_by_server_hook(self) -> Deferred[None]:
        async def go() -> None:
            s = await setup(self)
            dest, env = await s.clone("path")
            pushed = await s.git(env, "-C", dest, "push", "origin", "main:protected", ok=False)
            self.assertNotEqual(pushed.returncode, 0)
            stderr = pushed.stderr.decode()
            self.assertIn(f"remote: {s.server.hook_marker}: pushes to protected are not allowed "
                          "by the server hook", stderr)
            self.assertIn("[remote rejected] main -> protected (pre-receive hook declined)", stderr)
            s.assert_no_secret()
        return Deferred.fromCoroutine(go())

    def test_push_of_200_mib_keeps_memory_flat(self) -> Deferred[None]:
        """
        The proxy runs in this process: its resident memory, sampled every
        50 ms during a 200 MiB push, must not rise by more than 64 MiB.
        """
        async def go() -> None:
            s = await setup(self)
            dest, env = await s.clone("path", GIT_TRACE_CURL_NO_DATA="1")
            # Random data does not compress: spare the client's CPU (CI has two cores).
            await s.git(env, "-C", dest, "config", "core.compression", "0")
            with open(os.path.join(dest, "huge.bin"), "wb") as f:
                for _ in range(200):
                    f.write(os.urandom(MiB))
            await s.git(env, "-C", dest, "add", "-A")
            await s.git(env, "-C", dest, "commit", "-q", "-m", "huge")
            before = len(s.server.requests())
            baseline = rss_bytes()
            peak = [baseline]
            sampler = LoopingCall(lambda: peak.__setitem__(0, max(peak[0], rss_bytes())))
            sampler.clock = reactor
            sampler.start(0.05)
            started = time.monotonic()
            try:
                await s.git(env, "-C", dest, "push", "origin", "main")
            finally:
                sampler.stop()
            seconds = time.monotonic() - started
            pushes = [e for e in s.server.requests()[before:] if e.request_uri.endswith("/git-receive-pack")]
            self.assertGreater(max(e.request_length for e in pushes), 200 * MiB)
            growth = peak[0] - baseline
            print(f"\n200 MiB push through the proxy: {seconds:.1f} s, "
                  f"proxy process RSS growth {growth / MiB:.1f} MiB")
            self.assertLess(growth, 64 * MiB, f"RSS rose by {growth / MiB:.1f} MiB during a 200 MiB push")
            s.assert_no_secret()
        return Deferred.fromCoroutine(go())


def rss_bytes() -> int:
    """This process's resident set size now (not its peak)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RefusalTests(TestCase):
    """Clients the proxy refuses: a clear message, and the Git server sees nothing."""

    timeout = 120

    async def _refused(self, s: GitSetup, env: dict[str, str]) -> str:
        before = len(s.server.requests())
        result = await s.git(env, "clone", s.upstream_url(), os.path.join(env["HOME"], "clone"), ok=False)
        self.assertNotEqual(result.returncode, 0)
        self.assertEqual(s.server.requests()[before:], [], "the Git server saw a request")
        return result.stderr.decode()

    def test_no_token_wrong_token_wrong_namespace_unknown_connector(self) -> Deferred[None]:
        async def go() -> None:
            s = await setup(self)
            other_token = "other-" + secrets.token_hex(16)
            s.proxy.set_tokens({s.token: sa(NS), other_token: sa("other")})

            # No token: the proxy answers 401 with a Basic challenge, so git
            # asks for credentials (a credential helper, or the terminal).
            _, env = s.home("path", token="")
            stderr = await self._refused(s, env)
            self.assertIn("could not read Username", stderr)

            # A wrong token.  git does not know about the extraHeader, so on
            # 401 it asks for credentials too (see docs/git.md).
            _, env = s.home("path", token="wrong-" + secrets.token_hex(8))
            stderr = await self._refused(s, env)
            self.assertIn("could not read Username", stderr)

            # The same wrong token typed as a password (as a credential helper
            # would give it): git prints the proxy's message.
            _, env = s.home("path", token="")
            url = s.proxy.path_url(NS, NAME, f"/{REPO}.git").replace("http://", "http://x:wrongtoken@")
            before = len(s.server.requests())
            result = await s.git(env, "clone", url, os.path.join(env["HOME"], "c2"), ok=False)
            self.assertEqual(s.server.requests()[before:], [])
            self.assertIn("remote: connectors-proxy: the token was not accepted", result.stderr.decode())
            self.assertIn("Authentication failed", result.stderr.decode())

            # A valid token of another namespace.
            _, env = s.home("path", token=other_token)
            stderr = await self._refused(s, env)
            self.assertIn(f"remote: connectors-proxy: {sa('other')} may not use Connector {NS}/{NAME}", stderr)
            self.assertIn("The requested URL returned error: 403", stderr)

            # A Connector that does not exist.
            _, env = s.home("path", connector_name="nope")
            stderr = await self._refused(s, env)
            self.assertIn(f"remote: connectors-proxy: Connector {NS}/nope not found", stderr)
            s.assert_no_secret()
        return Deferred.fromCoroutine(go())

    def test_upstream_down_and_upstream_refusing_the_secret(self) -> Deferred[None]:
        async def go() -> None:
            wrong_password = "wrong-" + secrets.token_hex(12)
            closed = f"http://127.0.0.1:{free_port()}"
            s = await setup(self, extra_objects=[
                connector(NS, "down", "git", closed, secret="git-creds"),
            ])
            s.secrets.append(wrong_password)
            s.proxy.set_objects([
                connector_class("git", protocol="git"),
                connector(NS, NAME, "git", s.server.base_url, secret="git-creds"),
                basic_secret(NS, "git-creds", s.server.username, s.server.password),
                connector(NS, "down", "git", closed, secret="git-creds"),
                connector(NS, "badcreds", "git", s.server.base_url, secret="bad-creds"),
                basic_secret(NS, "bad-creds", s.server.username, wrong_password),
            ])

            _, env = s.home("path", connector_name="down")
            result = await s.git(env, "clone", s.upstream_url(), os.path.join(env["HOME"], "c"), ok=False)
            stderr = result.stderr.decode()
            self.assertIn(f"remote: connectors-proxy: Connector {NS}/down: cannot connect to {closed}", stderr)
            self.assertIn("The requested URL returned error: 502", stderr)

            _, env = s.home("path", connector_name="badcreds")
            before = len(s.server.requests())
            result = await s.git(env, "clone", s.upstream_url(), os.path.join(env["HOME"], "c"), ok=False)
            stderr = result.stderr.decode()
            self.assertIn(f"remote: connectors-proxy: the Git server of Connector {NS}/badcreds "
                          f"({s.server.base_url}) refused the credentials in Secret {NS}/bad-creds", stderr)
            self.assertIn("The requested URL returned error: 502", stderr)
            self.assertNotIn("could not read Username", stderr)
            self.assertEqual({e.status for e in s.server.requests()[before:]}, {401})
            s.assert_no_secret()
        return Deferred.fromCoroutine(go())


class LFSTests(TestCase):
    timeout = 300

    def test_batch_hrefs_point_at_the_proxy_and_transfers_need_only_the_client_token(self) -> Deferred[None]:
        async def go() -> None:
            s = await setup(self, lfs=True)
            lfs = s.server.lfs
            assert lfs is not None
            pool = HTTPConnectionPool(reactor, persistent=False)
            client: dict[str | bytes, str | bytes] = {"authorization": clientconfig.basic_authorization(s.token)}
            base = s.proxy.path_url(NS, NAME, f"/{REPO}.git/info/lfs")
            data = os.urandom(5000)
            oid, size = lfs_pointer(data)

            async def batch(operation: str) -> dict[str, Any]:
                body = json.dumps({"operation": operation, "transfers": ["basic"],
                                   "objects": [{"oid": oid, "size": size}]}).encode()
                response = await treq.post(base + "/objects/batch", body, pool=pool,
                                           headers={**client, "accept": LFS_JSON, "content-type": LFS_JSON})
                raw = await response.content()
                s.seen.append(raw)
                self.assertEqual(response.code, 200, raw)
                return cast(dict[str, Any], json.loads(raw))

            answer = await batch("upload")
            actions = answer["objects"][0]["actions"]
            self.assertEqual(actions["upload"]["href"], f"{base}/objects/{oid}")
            self.assertEqual(actions["verify"]["href"], f"{base}/verify")
            self.assertNotIn("header", actions["upload"])
            self.assertNotIn("header", actions["verify"])

            put = await treq.put(actions["upload"]["href"], data, headers=client, pool=pool)
            s.seen.append(await put.content())
            self.assertEqual(put.code, 200)
            self.assertEqual(lfs.objects[oid], data)
            verify = await treq.post(actions["verify"]["href"], json.dumps({"oid": oid, "size": size}).encode(),
                                     headers={**client, "content-type": LFS_JSON}, pool=pool)
            s.seen.append(await verify.content())
            self.assertEqual(verify.code, 200)

            download = (await batch("download"))["objects"][0]["actions"]["download"]
            self.assertEqual(download["href"], f"{base}/objects/{oid}")
            got = await treq.get(download["href"], headers=client, pool=pool)
            self.assertEqual(await got.content(), data)

            # The LFS server saw the Connector's credentials on every call.
            self.assertEqual({c.authorization for c in lfs.calls}, {s.server.authorization})
            self.assertEqual([c.method for c in lfs.calls], ["POST", "PUT", "POST", "POST", "GET"])

            # Without the client token, the proxy refuses before the upstream.
            calls = len(lfs.calls)
            refused = await treq.put(actions["upload"]["href"], data, pool=pool)
            s.seen.append(await refused.content())
            self.assertEqual(refused.code, 401)
            self.assertEqual(len(lfs.calls), calls)
            s.assert_no_secret()
        return Deferred.fromCoroutine(go())

    def test_git_lfs_push_and_clone(self) -> Deferred[None]:
        """The real git-lfs client, path mode and host mode through http.proxy."""
        async def go() -> None:
            require("git-lfs")
            s = await setup(self, lfs=True)
            lfs = s.server.lfs
            assert lfs is not None
            home, env = s.home("path")
            await s.git(env, "lfs", "install", "--skip-repo")
            dest = os.path.join(home, "clone")
            await s.git(env, "clone", s.upstream_url(), dest)
            await s.git(env, "-C", dest, "lfs", "track", "*.bin")
            blob = os.urandom(MiB + 17)
            with open(os.path.join(dest, "asset.bin"), "wb") as f:
                f.write(blob)
            await s.git(env, "-C", dest, "add", "-A")
            await s.git(env, "-C", dest, "commit", "-q", "-m", "lfs asset")
            await s.git(env, "-C", dest, "push", "origin", "main")
            oid, _ = lfs_pointer(blob)
            self.assertEqual(lfs.objects.get(oid), blob)

            for mode in ("path", "http-proxy"):
                other, env2 = s.home(mode)
                await s.git(env2, "lfs", "install", "--skip-repo")
                copy = os.path.join(other, "copy")
                await s.git(env2, "clone", s.upstream_url(), copy)
                self.assertEqual(_read(os.path.join(copy, "asset.bin")), blob, mode)

            self.assertIn(("GET", 200), {(c.method, c.status) for c in lfs.calls})
            self.assertEqual({c.authorization for c in lfs.calls}, {s.server.authorization})
            s.assert_no_secret()
        return Deferred.fromCoroutine(go())
