"""
OCI Connectors end to end: real skopeo, podman and curl clients, real
docker-registry upstreams (token auth with the token server of
L{tests.support.registry}, and htpasswd Basic auth), the proxy in this
reactor.  Every client byte passes through a L{TrafficTap}, which must never
see the registry's password, any token the token server issued, or its
challenge.

Host mode on loopback: podman and skopeo connect to the host named in the
image reference, and C{c-harbor.default.svc.cluster.local} does not resolve
here.  Both honour C{HTTP_PROXY} for plain-HTTP registries, and send
absolute-form requests (C{GET http://c-harbor.default.svc.cluster.local/v2/...})
to it; the proxy routes those by host.  So host mode is tested with the
image reference a pipeline uses, C{c-harbor.default.svc.cluster.local/test/abc:v1},
and C{HTTP_PROXY} pointing at the proxy.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from connectors_proxy.clientconfig import docker_config
from connectors_proxy.protocols.oci.resource import OciResource
from connectors_proxy.protocols.oci.tokens import CachedToken

from .support.procs import check, free_port, require, run
from .support.proxy import RunningProxy, basic_secret, connector, connector_class, sa, start_proxy
from .support.registry import (
    Image,
    Podman,
    Registry,
    TrafficTap,
    build_image,
    sha256_file,
    skopeo,
    start_basic_registry,
    start_token_registry,
    write_authfile,
)

HOST = "c-harbor.default.svc.cluster.local"
PATH_PREFIX = "namespaces/default/connectors/harbor"
CURL = ["curl", "-sS", "--max-time", "120"]


def oci_resource(proxy: RunningProxy) -> OciResource:
    """The proxy's OCI protocol resource, as the daemon's wiring installs it."""
    resource = proxy.root.protocols["oci"]
    assert isinstance(resource, OciResource)
    return resource


def registry_requests(registry: Registry) -> list[str]:
    """The request lines of the registry's access log."""
    return [line for line in registry.log().splitlines() if '"GET /' in line or '"HEAD /' in line
            or '"PUT /' in line or '"POST /' in line or '"PATCH /' in line or '"DELETE /' in line]


class OciThroughProxy(TestCase):
    timeout = 600

    async def setUp(self) -> None:  # type: ignore[override]
        require("curl")
        self.registry = await start_token_registry(self)
        (self.user, self.password), = self.registry.users.items()
        self.token = "tok-" + secrets.token_hex(16)
        self.other_token = "tok-" + secrets.token_hex(16)
        self.objects: list[dict[str, Any]] = [
            connector_class("oci", "oci"),
            connector_class("oci-anon", "oci", optional=True),
            connector("default", "harbor", "oci", self.registry.address, secret="harbor-secret"),
            basic_secret("default", "harbor-secret", self.user, self.password),
        ]
        self.proxy = await start_proxy(self, self.objects, {
            self.token: sa("default"), self.other_token: sa("other"),
        })
        self.oci = oci_resource(self.proxy)
        self.tap = TrafficTap.start(self, self.proxy.port)
        self.tap_host = f"127.0.0.1:{self.tap.port}"
        self.seen: list[bytes] = []
        self.extra_secrets: list[str] = []
        self.registries = [self.registry]
        # The client's config.json holds only its own token, for both ways of
        # naming the Connector, as `python -m connectors_proxy.clientconfig docker` writes it.
        self.authfile = os.path.abspath(self.mktemp())
        with open(self.authfile, "w") as f:
            f.write(docker_config([self.tap_host, HOST], self.token))

    def tearDown(self) -> None:
        self.assertNoSecrets()

    # -- helpers ----------------------------------------------------------------

    def add_objects(self, *objects: dict[str, Any]) -> None:
        self.objects.extend(objects)
        self.proxy.set_objects(self.objects)

    def host_env(self) -> dict[str, str]:
        return {"HTTP_PROXY": self.tap.url, "http_proxy": self.tap.url, "NO_PROXY": "", "no_proxy": ""}

    def path_ref(self, repo: str, tag: str = "v1", connector: str = "harbor") -> str:
        return f"docker://{self.tap_host}/namespaces/default/connectors/{connector}/{repo}:{tag}"

    def host_ref(self, repo: str, tag: str = "v1") -> str:
        return f"docker://{HOST}/{repo}:{tag}"

    async def client(self, argv: Sequence[str], env: dict[str, str] | None = None,
                     ok: bool = True) -> subprocess.CompletedProcess[bytes]:
        result = await run(argv, env=env)
        self.seen += [result.stdout, result.stderr]
        return check(result) if ok else result

    async def curl(self, *args: str, token: str | None = None, host: str | None = None,
                   ok: bool = True) -> subprocess.CompletedProcess[bytes]:
        argv = [*CURL, "-i"]
        if token is not None:
            argv += ["-u", f"pipeline:{token}"]
        if host is not None:
            argv += ["-H", f"Host: {host}"]
        return await self.client([*argv, *args], ok=ok)

    def path_url(self, rest: str) -> str:
        return f"{self.tap.url}/v2/{PATH_PREFIX}/{rest}"

    async def push_direct(self, image: Image, repo: str, tag: str = "v1") -> None:
        """Put an image into the registry without the proxy (setting the scene)."""
        authfile = write_authfile(os.path.abspath(self.mktemp()), {self.registry.host: (self.user, self.password)})
        check(await run(skopeo("copy", "--dest-tls-verify=false", image.reference,
                               f"docker://{self.registry.host}/{repo}:{tag}", authfile=authfile)))

    def assertNoSecrets(self) -> None:
        """No registry credential or token anywhere a client or the logs can see."""
        needles = [self.password, base64.b64encode(f"{self.user}:{self.password}".encode()).decode(),
                   *self.extra_secrets]
        for registry in self.registries:
            if registry.token_server is not None:
                needles += registry.token_server.tokens
        encoded = [n.encode() for n in needles]
        self.assertEqual(self.tap.find([*encoded, b"Bearer realm", b"/token?"]), [])
        logs = self.proxy.logs.text()
        for needle in needles:
            self.assertNotIn(needle, logs)
        for output in self.seen:
            for needle in encoded:
                self.assertNotIn(needle, output)

    def assertOciError(self, result: subprocess.CompletedProcess[bytes], status: int, code: str) -> None:
        head, _, body = result.stdout.partition(b"\r\n\r\n")
        while head.startswith(b"HTTP/1.1 100"):
            head, _, body = body.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(f"HTTP/1.1 {status}".encode()), head)
        self.assertIn(code, [e["code"] for e in json.loads(body)["errors"]])

    def token_scopes(self) -> list[tuple[str, ...]]:
        assert self.registry.token_server is not None
        return [r.scopes for r in self.registry.token_server.requests]

    # -- the tests ----------------------------------------------------------------

    async def test_path_mode_skopeo_multi_layer(self) -> None:
        """
        skopeo copy / inspect / delete in path mode, with a multi-layer image
        holding a layer over 100 MiB; digests compared end to end.
        """
        image = await build_image()
        self.assertGreaterEqual(max(image.layer_sizes), 100 * 1024 * 1024)
        ref = self.path_ref("test/abc")
        await self.client(skopeo("copy", "--dest-tls-verify=false", image.reference, ref, authfile=self.authfile))
        raw = await self.client(skopeo("inspect", "--raw", "--tls-verify=false", ref, authfile=self.authfile))
        manifest = json.loads(raw.stdout)
        self.assertEqual("sha256:" + hashlib.sha256(raw.stdout).hexdigest(), image.manifest_digest)
        self.assertEqual([layer["digest"] for layer in manifest["layers"]], list(image.layer_digests))
        info = json.loads((await self.client(skopeo("inspect", "--tls-verify=false", ref,
                                                    authfile=self.authfile))).stdout)
        self.assertEqual(info["Digest"], image.manifest_digest)
        self.assertEqual(info["Name"], f"{self.tap_host}/{PATH_PREFIX}/test/abc")
        # Pull it back and compare every blob.
        out = os.path.abspath(self.mktemp())
        await self.client(skopeo("copy", "--src-tls-verify=false", ref, f"oci:{out}:v1", authfile=self.authfile))
        for digest in (image.config_digest, *image.layer_digests):
            self.assertEqual(sha256_file(os.path.join(out, "blobs", "sha256", digest[7:])), digest)
        # Stored upstream under the upstream name.
        self.assertTrue(os.path.isdir(os.path.join(self.registry.storage,
                                                   "docker/registry/v2/repositories/test/abc")))
        # The proxy asked for the scopes it needed, with the Connector's account.
        assert self.registry.token_server is not None
        self.assertEqual({r.account for r in self.registry.token_server.requests}, {self.user})
        scopes = set(self.token_scopes())
        self.assertIn(("repository:test/abc:pull,push",), scopes)
        self.assertIn(("repository:test/abc:pull",), scopes)
        # Each scope was asked for once: the token was cached in between.
        self.assertEqual(len(self.token_scopes()), len(scopes))
        print(f"\ntoken requests for push, inspect x2, pull of {len(image.layer_digests)} layers: "
              f"{len(self.token_scopes())} {sorted(self.token_scopes())}")
        # Delete, then it is gone.
        await self.client(skopeo("delete", "--tls-verify=false", ref, authfile=self.authfile))
        self.assertIn(("repository:test/abc:delete",), set(self.token_scopes()))
        result = await self.client(skopeo("inspect", "--tls-verify=false", ref, authfile=self.authfile), ok=False)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(b"manifest unknown", result.stderr)

    async def test_host_mode_skopeo_and_podman(self) -> None:
        """The image reference pipelines use: c-harbor.default.svc.cluster.local/test/abc:v1."""
        image = await build_image("small", (3000, 5000))
        env = self.host_env()
        await self.client(skopeo("copy", "--dest-tls-verify=false", image.reference, self.host_ref("test/abc"),
                                 authfile=self.authfile), env=env)
        podman = Podman.isolated(self)
        penv = {**podman.env, **env}
        await self.client(podman.argv("pull", "--tls-verify=false", f"--authfile={self.authfile}",
                                      f"{HOST}/test/abc:v1"), env=penv)
        await self.client(podman.argv("push", "--tls-verify=false", f"--authfile={self.authfile}",
                                      f"{HOST}/test/abc:v1", self.host_ref("test/pushed", "v2")), env=penv)
        raw = await self.client(skopeo("inspect", "--raw", "--tls-verify=false", self.host_ref("test/pushed", "v2"),
                                       authfile=self.authfile), env=env)
        pushed = json.loads(raw.stdout)
        # podman stores layers uncompressed and compresses again on push; the
        # image config (which names every layer's uncompressed digest) is the same.
        self.assertEqual(pushed["config"]["digest"], image.config_digest)
        self.assertEqual(len(pushed["layers"]), len(image.layer_digests))
        # Every request reached the proxy in host mode (absolute-form, by host).
        paths = [a["path"] for a in self.proxy.logs.access()]
        self.assertTrue(paths and all(p.startswith(f"http://{HOST}/v2/") for p in paths), paths)
        self.assertMounted(f"http://{HOST}/v2/test/pushed/blobs/uploads/?", "test/pushed", "test/abc")

    async def test_path_mode_podman(self) -> None:
        image = await build_image("small", (3000, 5000))
        await self.push_direct(image, "test/abc")
        podman = Podman.isolated(self)
        pulled = f"{self.tap_host}/{PATH_PREFIX}/test/abc:v1"
        await self.client(podman.argv("pull", "--tls-verify=false", f"--authfile={self.authfile}", pulled),
                          env=podman.env)
        await self.client(podman.argv("push", "--tls-verify=false", f"--authfile={self.authfile}", pulled,
                                      self.path_ref("test/again", "v3")), env=podman.env)
        raw = await self.client(skopeo("inspect", "--raw", "--tls-verify=false",
                                       f"docker://{self.registry.host}/test/again:v3",
                                       authfile=write_authfile(os.path.abspath(self.mktemp()), {
                                           self.registry.host: (self.user, self.password)})))
        self.assertEqual(json.loads(raw.stdout)["config"]["digest"], image.config_digest)
        # podman knew where the layers came from and mounted them (from= in path mode, mapped).
        self.assertMounted(f"/v2/{PATH_PREFIX}/test/again/blobs/uploads/?", "test/again", "test/abc")

    def assertMounted(self, path: str, target: str, source: str) -> None:
        mounts = [a for a in self.proxy.logs.access() if a["method"] == "POST" and path in a["path"]
                  and "mount=" in a["path"]]
        self.assertTrue(mounts, [a["path"] for a in self.proxy.logs.access()])
        self.assertEqual({a["status"] for a in mounts}, {201})
        self.assertIn((f"repository:{target}:pull,push", f"repository:{source}:pull"), self.token_scopes())

    async def test_basic_auth_registry(self) -> None:
        """A registry that asks for Basic gets the Connector's credentials as Basic."""
        basic = await start_basic_registry(self)
        self.registries.append(basic)
        (user, password), = basic.users.items()
        self.extra_secrets += [password, base64.b64encode(f"{user}:{password}".encode()).decode()]
        self.add_objects(connector("default", "basicreg", "oci", basic.address, secret="basicreg-secret"),
                         basic_secret("default", "basicreg-secret", user, password))
        image = await build_image("small", (3000, 5000))
        ref = self.path_ref("lib/app", connector="basicreg")
        await self.client(skopeo("copy", "--dest-tls-verify=false", image.reference, ref, authfile=self.authfile))
        info = json.loads((await self.client(skopeo("inspect", "--tls-verify=false", ref,
                                                    authfile=self.authfile))).stdout)
        self.assertEqual(info["Digest"], image.manifest_digest)
        # Wrong credentials in the Secret: the client gets DENIED, not a password prompt.
        self.add_objects(basic_secret("default", "basicreg-secret", user, "wrong-" + secrets.token_hex(4)))
        result = await self.curl("-I", f"{self.tap.url}/v2/namespaces/default/connectors/basicreg/lib/app/manifests/v1",
                                 token=self.token, ok=False)
        self.assertIn(b"HTTP/1.1 403", result.stdout)

    async def test_concurrent_pulls_share_one_token(self) -> None:
        """10 concurrent pulls of one repository: one token request for its scope."""
        image = await build_image("small", (3000, 5000))
        await self.push_direct(image, "test/abc")
        tokens = self.registry.token_server
        assert tokens is not None
        tokens.requests.clear()
        # A slow realm, so the pulls really overlap while the token is fetched.
        tokens.delay = 0.5
        # Each client runs in a reactor thread (procs.run), and the proxy's
        # name resolution needs one too: room for ten clients and the proxy.
        reactor.suggestThreadPoolSize(24)
        self.addCleanup(reactor.suggestThreadPoolSize, 10)
        outs = [os.path.abspath(self.mktemp()) for _ in range(10)]
        await gatherResults([
            Deferred.fromCoroutine(self.client(skopeo(
                "copy", "--src-tls-verify=false", self.path_ref("test/abc"), f"oci:{out}:v1", authfile=self.authfile)))
            for out in outs
        ])
        for out in outs:
            for digest in image.layer_digests:
                self.assertEqual(sha256_file(os.path.join(out, "blobs", "sha256", digest[7:])), digest)
        self.assertEqual(tokens.count("repository:test/abc:pull"), 1, self.token_scopes())
        self.assertEqual(tokens.count(), 1, self.token_scopes())
        self.assertEqual(self.oci.tokens.fetches, 1)

    async def test_expired_and_refused_tokens_are_refreshed(self) -> None:
        image = await build_image("small", (3000, 5000))
        await self.push_direct(image, "test/abc")
        tokens = self.registry.token_server
        assert tokens is not None
        tokens.requests.clear()
        tokens.expires_in = 2
        manifest = self.path_url("test/abc/manifests/v1")
        accept = "Accept: application/vnd.oci.image.manifest.v1+json"
        await self.curl("-H", accept, manifest, token=self.token)
        await self.curl("-H", accept, manifest, token=self.token)
        self.assertEqual(tokens.count("repository:test/abc:pull"), 1)
        # After it expired (2 s, used until 10% before), a new one.
        await deferLater(reactor, 2.1, lambda: None)
        await self.curl("-H", accept, manifest, token=self.token)
        self.assertEqual(tokens.count("repository:test/abc:pull"), 2)
        # A cached token that the registry refuses (revoked): refreshed once, retried.
        tokens.expires_in = 300
        [key] = [k for k in self.oci.tokens._tokens if k.scope == "repository:test/abc:pull"]
        self.oci.tokens._tokens[key] = CachedToken("revoked-" + secrets.token_hex(8), reactor.seconds() + 300)
        result = await self.curl("-H", accept, manifest, token=self.token)
        self.assertIn(b"HTTP/1.1 200", result.stdout)
        self.assertEqual(tokens.count("repository:test/abc:pull"), 3)

    async def test_upload_kinds_with_curl(self) -> None:
        """Monolithic and chunked uploads, status, HEAD, GET, DELETE of a blob, in path mode."""
        data = os.urandom(3 * 1024 * 1024 + 7)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blob_file = os.path.abspath(self.mktemp())
        with open(blob_file, "wb") as f:
            f.write(data)
        # Monolithic: POST, then one PUT with the digest and the whole body.
        result = await self.curl("-X", "POST", self.path_url("mono/blobs/uploads/"), token=self.token)
        self.assertIn(b"HTTP/1.1 202", result.stdout)
        location = _header(result.stdout, b"location")
        sep = "&" if "?" in location else "?"
        result = await self.curl("-X", "PUT", "-H", "Content-Type: application/octet-stream",
                                 "--data-binary", f"@{blob_file}", f"{location}{sep}digest={digest}", token=self.token)
        self.assertIn(b"HTTP/1.1 201", result.stdout)
        self.assertIn(f"Location: {self.tap.url}/v2/{PATH_PREFIX}/mono/blobs/{digest}".encode(), result.stdout)
        # Chunked: POST, two PATCHes with Content-Range, PUT with the digest.
        result = await self.curl("-X", "POST", self.path_url("chunked/blobs/uploads/"), token=self.token)
        self.assertIn(b"HTTP/1.1 202", result.stdout)
        location = _header(result.stdout, b"location")
        self.assertTrue(location.startswith(f"{self.tap.url}/v2/{PATH_PREFIX}/chunked/blobs/uploads/"), location)
        half = len(data) // 2
        for start, end in ((0, half), (half, len(data))):
            part = os.path.abspath(self.mktemp())
            with open(part, "wb") as f:
                f.write(data[start:end])
            result = await self.curl("-X", "PATCH", "-H", "Content-Type: application/octet-stream",
                                     "-H", f"Content-Range: {start}-{end - 1}", "--data-binary", f"@{part}",
                                     location, token=self.token)
            self.assertIn(b"HTTP/1.1 202", result.stdout)
            location = _header(result.stdout, b"location")
            self.assertTrue(location.startswith(f"{self.tap.url}/v2/{PATH_PREFIX}/chunked/"), location)
        # Upload status.
        result = await self.curl(location, token=self.token)
        self.assertIn(b"HTTP/1.1 204", result.stdout)
        self.assertEqual(_header(result.stdout, b"range"), f"0-{len(data) - 1}")
        sep = "&" if "?" in location else "?"
        result = await self.curl("-X", "PUT", f"{location}{sep}digest={digest}", token=self.token)
        self.assertIn(b"HTTP/1.1 201", result.stdout)
        # Read back: HEAD has the size, GET the bytes.
        for repo in ("mono", "chunked"):
            result = await self.curl("-I", self.path_url(f"{repo}/blobs/{digest}"), token=self.token)
            self.assertEqual(_header(result.stdout, b"content-length"), str(len(data)))
            self.assertEqual(_header(result.stdout, b"docker-content-digest"), digest)
            out = os.path.abspath(self.mktemp())
            await self.curl("-o", out, self.path_url(f"{repo}/blobs/{digest}"), token=self.token)
            with open(out, "rb") as f:
                self.assertTrue(f.read().endswith(data))
        # An upload session can be cancelled.
        result = await self.curl("-X", "POST", self.path_url("cancelled/blobs/uploads/"), token=self.token)
        cancelled = _header(result.stdout, b"location")
        result = await self.curl("-X", "DELETE", cancelled, token=self.token)
        self.assertIn(b"HTTP/1.1 204", result.stdout)
        result = await self.curl(cancelled, token=self.token, ok=False)
        self.assertOciError(result, 404, "BLOB_UPLOAD_UNKNOWN")
        result = await self.curl("-X", "DELETE", self.path_url(f"mono/blobs/{digest}"), token=self.token)
        self.assertIn(b"HTTP/1.1 202", result.stdout)
        result = await self.curl("-I", self.path_url(f"mono/blobs/{digest}"), token=self.token, ok=False)
        self.assertIn(b"HTTP/1.1 404", result.stdout)

    async def test_a_body_goes_out_with_a_sufficient_token(self) -> None:
        """
        The first request of a fresh proxy is a manifest PUT: its body cannot
        be sent twice, so the proxy learns the scheme and gets a push token
        before sending it, and the registry never answers it 401.
        """
        image = await build_image("small", (3000, 5000))
        await self.push_direct(image, "test/abc")
        tokens = self.registry.token_server
        assert tokens is not None
        tokens.requests.clear()
        manifest = image.blob_path(image.manifest_digest)
        result = await self.curl("-X", "PUT", "-H", "Content-Type: application/vnd.oci.image.manifest.v1+json",
                                 "--data-binary", f"@{manifest}", self.path_url("test/abc/manifests/v9"),
                                 token=self.token)
        self.assertIn(b"HTTP/1.1 201", result.stdout)
        self.assertEqual(_header(result.stdout, b"docker-content-digest"), image.manifest_digest)
        self.assertEqual(self.token_scopes(), [("repository:test/abc:pull,push",)])
        puts = [line for line in registry_requests(self.registry) if "manifests/v9" in line]
        self.assertEqual(len(puts), 1, puts)
        self.assertIn('" 201 ', puts[0])

    async def test_cross_repository_mount(self) -> None:
        image = await build_image("small", (3000, 5000))
        await self.push_direct(image, "test/abc")
        tokens = self.registry.token_server
        assert tokens is not None
        tokens.requests.clear()
        layer = image.layer_digests[0]
        source = f"{PATH_PREFIX}/test/abc"
        result = await self.curl("-X", "POST", self.path_url(f"test/mounted/blobs/uploads/?mount={layer}&from={source}"),
                                 token=self.token)
        self.assertIn(b"HTTP/1.1 201", result.stdout)
        self.assertEqual(_header(result.stdout, b"location"),
                         f"{self.tap.url}/v2/{PATH_PREFIX}/test/mounted/blobs/{layer}")
        # One token for both scopes: push on the target, pull on the source.
        self.assertEqual(self.token_scopes(), [("repository:test/mounted:pull,push", "repository:test/abc:pull")])
        result = await self.curl("-I", self.path_url(f"test/mounted/blobs/{layer}"), token=self.token)
        self.assertIn(b"HTTP/1.1 200", result.stdout)
        # A mount from another Connector's repository cannot happen upstream: a plain upload starts.
        result = await self.curl(
            "-X", "POST",
            self.path_url(f"test/other/blobs/uploads/?mount={layer}&from=namespaces/default/connectors/elsewhere/x"),
            token=self.token)
        self.assertIn(b"HTTP/1.1 202", result.stdout)
        self.assertIn(f"/v2/{PATH_PREFIX}/test/other/blobs/uploads/".encode(), result.stdout)

    async def test_tags_and_catalog_pagination(self) -> None:
        image = await build_image("small", (3000, 5000))
        for tag in ("t1", "t2", "t3"):
            await self.push_direct(image, "test/abc", tag)
        await self.push_direct(image, "test/zzz", "t1")
        # Tags, path mode: the name is the client's.  (distribution 2.8 does
        # not paginate tag lists; the catalog below shows Link rewriting.)
        result = await self.curl(self.path_url("test/abc/tags/list"), token=self.token)
        tags = json.loads(result.stdout.partition(b"\r\n\r\n")[2])
        self.assertEqual(tags["name"], f"{PATH_PREFIX}/test/abc")
        self.assertEqual(sorted(tags["tags"]), ["t1", "t2", "t3"])
        listed = await self.client(skopeo("list-tags", "--tls-verify=false", self.path_ref("test/abc").rsplit(":", 1)[0],
                                          authfile=self.authfile))
        self.assertEqual(sorted(json.loads(listed.stdout)["Tags"]), ["t1", "t2", "t3"])
        self.assertEqual(json.loads(listed.stdout)["Repository"], f"{self.tap_host}/{PATH_PREFIX}/test/abc")
        # Catalog, host mode.
        result = await self.curl(self.tap.url + "/v2/_catalog?n=1", token=self.token, host=HOST)
        self.assertEqual(json.loads(result.stdout.partition(b"\r\n\r\n")[2]), {"repositories": ["test/abc"]})
        link = _header(result.stdout, b"link")
        self.assertTrue(link.startswith("</v2/_catalog?"), link)
        result = await self.curl(self.tap.url + link[1:link.index(">")], token=self.token, host=HOST)
        self.assertEqual(json.loads(result.stdout.partition(b"\r\n\r\n")[2]), {"repositories": ["test/zzz"]})
        # Catalog, path mode: names and the next page's "last" carry the prefix.
        result = await self.curl(self.path_url("_catalog?n=1"), token=self.token)
        self.assertEqual(json.loads(result.stdout.partition(b"\r\n\r\n")[2]),
                         {"repositories": [f"{PATH_PREFIX}/test/abc"]})
        link = _header(result.stdout, b"link")
        self.assertTrue(link.startswith(f"</v2/{PATH_PREFIX}/_catalog?"), link)
        self.assertIn(f"last={PATH_PREFIX}/test/abc", link)
        result = await self.curl(self.tap.url + link[1:link.index(">")], token=self.token)
        self.assertEqual(json.loads(result.stdout.partition(b"\r\n\r\n")[2]),
                         {"repositories": [f"{PATH_PREFIX}/test/zzz"]})
        self.assertIn(("registry:catalog:*",), self.token_scopes())

    async def test_referrers_are_relayed(self) -> None:
        """
        The referrers end point goes upstream with a pull token.  distribution
        2.8 predates it and answers 404, which the client gets as it is.
        """
        digest = "sha256:" + "0" * 64
        result = await self.curl(self.path_url(f"test/abc/referrers/{digest}"), token=self.token, ok=False)
        self.assertIn(b"HTTP/1.1 404", result.stdout)
        self.assertIn(("repository:test/abc:pull",), self.token_scopes())
        self.assertTrue(any(f"/v2/test/abc/referrers/{digest}" in line for line in registry_requests(self.registry)))

    async def test_redirected_blobs_are_followed_without_credentials(self) -> None:
        redirecting = await start_token_registry(self, users={self.user: self.password}, redirect_blobs=True)
        self.registries.append(redirecting)
        self.add_objects(connector("default", "cdn", "oci", redirecting.address, secret="harbor-secret"))
        image = await build_image("small", (3000, 5000))
        ref = self.path_ref("test/abc", connector="cdn")
        await self.client(skopeo("copy", "--dest-tls-verify=false", image.reference, ref, authfile=self.authfile))
        out = os.path.abspath(self.mktemp())
        await self.client(skopeo("copy", "--src-tls-verify=false", ref, f"oci:{out}:v1", authfile=self.authfile))
        for digest in image.layer_digests:
            self.assertEqual(sha256_file(os.path.join(out, "blobs", "sha256", digest[7:])), digest)
        origin = redirecting.origin
        assert origin is not None
        fetched = [r for r in origin.requests if r.method == "GET"]
        self.assertGreaterEqual(len(fetched), len(image.layer_digests))
        self.assertEqual([r.authorization for r in origin.requests], [None] * len(origin.requests))
        # The client never heard of the other origin.
        self.assertEqual(self.tap.find([f"127.0.0.1:{origin.port}".encode()]), [])

    async def test_refusals_never_reach_the_registry(self) -> None:
        before = len(registry_requests(self.registry))
        manifest = self.path_url("test/abc/manifests/v1")
        result = await self.curl(manifest, ok=False)
        self.assertOciError(result, 401, "UNAUTHORIZED")
        self.assertIn(b'WWW-Authenticate: Basic realm="connectors-proxy"', result.stdout)
        result = await self.curl(manifest, token="tok-unknown-" + secrets.token_hex(4), ok=False)
        self.assertOciError(result, 401, "UNAUTHORIZED")
        result = await self.curl(manifest, token=self.other_token, ok=False)
        self.assertOciError(result, 403, "DENIED")
        result = await self.curl(f"{self.tap.url}/v2/namespaces/default/connectors/missing/a/manifests/v1",
                                 token=self.token, ok=False)
        self.assertOciError(result, 404, "NAME_UNKNOWN")
        # An upload without a token is refused before its body is read.
        big = os.path.abspath(self.mktemp())
        with open(big, "wb") as f:
            f.write(os.urandom(8 * 1024 * 1024))
        result = await self.curl("-X", "PATCH", "--data-binary", f"@{big}",
                                 self.path_url("test/abc/blobs/uploads/x"), ok=False)
        self.assertIn(b"HTTP/1.1 401", result.stdout)
        # skopeo without credentials is refused too, and says so.
        result = await self.client(skopeo("inspect", "--tls-verify=false", self.path_ref("test/abc")), ok=False)
        self.assertIn(b"unauthorized", result.stderr.lower())
        self.assertEqual(len(registry_requests(self.registry)), before)
        self.assertEqual(self.token_scopes(), [])
        # The ping is answered by the proxy, once the client is known.
        result = await self.curl(self.tap.url + "/v2/", token=self.token)
        self.assertIn(b"HTTP/1.1 200", result.stdout)
        self.assertIn(b"Docker-Distribution-Api-Version: registry/2.0", result.stdout)
        result = await self.curl(self.tap.url + "/v2/", token=self.token, host=HOST)
        self.assertIn(b"HTTP/1.1 200", result.stdout)
        self.assertEqual(len(registry_requests(self.registry)), before)

    async def test_upstream_errors_are_oci_errors(self) -> None:
        result = await self.curl(self.path_url("nothing/here/manifests/v1"), token=self.token, ok=False)
        self.assertOciError(result, 404, "MANIFEST_UNKNOWN")
        result = await self.curl(self.path_url("nothing/here/tags/list"), token=self.token, ok=False)
        self.assertOciError(result, 404, "NAME_UNKNOWN")
        body = json.loads(result.stdout.partition(b"\r\n\r\n")[2])
        self.assertEqual(body["errors"][0]["detail"]["name"], f"{PATH_PREFIX}/nothing/here")
        result = await self.curl(f"{self.tap.url}/v2/Bad_Name/manifests/v1", token=self.token, host=HOST, ok=False)
        self.assertOciError(result, 404, "NAME_INVALID")
        # A Connector whose Secret the token service refuses: DENIED, naming the Secret, no password.
        self.add_objects(connector("default", "wrong", "oci", self.registry.address, secret="wrong-secret"),
                         basic_secret("default", "wrong-secret", self.user, "not-" + self.password))
        self.extra_secrets.append("not-" + self.password)
        result = await self.curl(f"{self.tap.url}/v2/namespaces/default/connectors/wrong/test/abc/manifests/v1",
                                 token=self.token, ok=False)
        self.assertOciError(result, 403, "DENIED")
        self.assertIn(b"default/wrong-secret", result.stdout)
        # A registry that is down: 502, naming the Connector.
        self.add_objects(connector("default", "down", "oci", f"http://127.0.0.1:{free_port()}", secret="harbor-secret"))
        result = await self.curl(f"{self.tap.url}/v2/namespaces/default/connectors/down/test/abc/manifests/v1",
                                 token=self.token, ok=False)
        self.assertOciError(result, 502, "UPSTREAM_ERROR")
        self.assertIn(b"Connector default/down", result.stdout)
        # An anonymous Connector on a registry that wants credentials: DENIED, saying so.
        self.add_objects(connector("default", "anon", "oci-anon", self.registry.address))
        result = await self.curl(f"{self.tap.url}/v2/namespaces/default/connectors/anon/test/abc/manifests/v1",
                                 token=self.token, ok=False)
        self.assertOciError(result, 403, "DENIED")
        self.assertIn(b"has none", result.stdout)

    async def test_anonymous_connector(self) -> None:
        public = await start_token_registry(self, anonymous_actions=("pull",))
        self.registries.append(public)
        image = await build_image("small", (3000, 5000))
        (user, password), = public.users.items()
        self.extra_secrets.append(password)
        authfile = write_authfile(os.path.abspath(self.mktemp()), {public.host: (user, password)})
        check(await run(skopeo("copy", "--dest-tls-verify=false", image.reference,
                               f"docker://{public.host}/lib/pub:v1", authfile=authfile)))
        self.add_objects(connector("default", "public", "oci-anon", public.address))
        out = os.path.abspath(self.mktemp())
        await self.client(skopeo("copy", "--src-tls-verify=false", self.path_ref("lib/pub", connector="public"),
                                 f"oci:{out}:v1", authfile=self.authfile))
        assert public.token_server is not None
        anonymous = [r for r in public.token_server.requests if r.scopes == ("repository:lib/pub:pull",)]
        self.assertEqual([r.account for r in anonymous], [None])


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


class LargeLayer(TestCase):
    """
    A 1 GiB layer pushed (chunked PATCH) and pulled through the proxy, which
    runs in this process: its peak RSS may grow by less than 64 MiB.
    """

    timeout = 900
    SIZE = 1024 * 1024 * 1024

    async def test_one_gib_layer_streams(self) -> None:
        require("curl")
        registry = await start_token_registry(self)
        (user, password), = registry.users.items()
        token = "tok-" + secrets.token_hex(16)
        proxy = await start_proxy(self, [
            connector_class("oci", "oci"),
            connector("default", "harbor", "oci", registry.address, secret="harbor-secret"),
            basic_secret("default", "harbor-secret", user, password),
        ], {token: sa("default")})
        oci_resource(proxy)
        # A GiB stored upstream is not worth keeping after the test.
        self.addCleanup(shutil.rmtree, registry.storage, True)
        blob = os.path.abspath(self.mktemp())
        digest = hashlib.sha256()
        block = os.urandom(1024 * 1024)
        with open(blob, "wb") as f:
            for i in range(self.SIZE // len(block)):
                # Every MiB differs, so no layer of the stack can shortcut it.
                chunk = i.to_bytes(8, "big") + block[8:]
                digest.update(chunk)
                f.write(chunk)
        blob_digest = "sha256:" + digest.hexdigest()
        base = f"{proxy.url}/v2/{PATH_PREFIX}/big/layer"
        auth = ["-u", f"pipeline:{token}"]
        # Peak RSS from here on: reset the high-water mark.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kib("VmRSS")
        result = check(await run([*CURL, "-i", *auth, "-X", "POST", base + "/blobs/uploads/"]))
        location = _header(result.stdout, b"location")
        result = check(await run([*CURL, "-i", *auth, "-X", "PATCH", "-H", "Content-Type: application/octet-stream",
                                  "-T", blob, location], timeout=600))
        self.assertIn(b"HTTP/1.1 202", result.stdout)
        location = _header(result.stdout, b"location")
        sep = "&" if "?" in location else "?"
        result = check(await run([*CURL, "-i", *auth, "-X", "PUT", f"{location}{sep}digest={blob_digest}"]))
        self.assertIn(b"HTTP/1.1 201", result.stdout)
        os.unlink(blob)
        out = os.path.abspath(self.mktemp())
        check(await run([*CURL, *auth, "-o", out, f"{base}/blobs/{blob_digest}"], timeout=600))
        peak = _status_kib("VmHWM")
        self.assertEqual(os.path.getsize(out), self.SIZE)
        self.assertEqual(sha256_file(out), blob_digest)
        os.unlink(out)
        growth_mib = (peak - before) / 1024
        print(f"\n1 GiB push+pull: RSS before {before / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB, "
              f"growth {growth_mib:.1f} MiB")
        self.assertLess(growth_mib, 64)


def _header(response: bytes, name: bytes) -> str:
    """The last value of header C{name} in a curl -i output."""
    value = None
    for line in response.split(b"\r\n"):
        key, sep, rest = line.partition(b":")
        if sep and key.strip().lower() == name:
            value = rest.strip().decode()
    if value is None:
        raise AssertionError(f"no {name!r} header in {response[:2000]!r}")
    return value
