"""
The OCI test fixtures work on their own, without the proxy: skopeo copies an
image built offline by umoci straight to a token-auth registry and to a
Basic-auth registry, and the token server counts what it served.  If these
fail, the proxy's OCI tests say nothing.
"""

from __future__ import annotations

import json
import os
import secrets

from twisted.trial.unittest import TestCase

from tests.support.procs import check, run
from tests.support.registry import (
    Podman,
    build_image,
    libtrust_key_id,
    parse_scope,
    sha256_file,
    skopeo,
    start_basic_registry,
    start_token_registry,
    write_authfile,
)


class UnitTests(TestCase):
    def test_parse_scope(self) -> None:
        self.assertEqual(parse_scope("repository:a/b:pull,push"), ("repository", "a/b", ("pull", "push")))
        self.assertEqual(parse_scope("registry:catalog:*"), ("registry", "catalog", ("*",)))
        self.assertEqual(parse_scope("repository:127.0.0.1:5000/a:pull"),
                         ("repository", "127.0.0.1:5000/a", ("pull",)))
        self.assertIsNone(parse_scope("nonsense"))

    def test_key_id_shape(self) -> None:
        from cryptography.hazmat.primitives.asymmetric import rsa
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        kid = libtrust_key_id(key.public_key())
        groups = kid.split(":")
        self.assertEqual(len(groups), 12)
        self.assertTrue(all(len(g) == 4 for g in groups))


class DirectTests(TestCase):
    """skopeo and podman against the registries, no proxy in between."""

    timeout = 300

    async def _push_and_inspect(self, registry, image, authfile: str) -> None:  # type: ignore[no-untyped-def]
        ref = f"docker://{registry.host}/test/abc:v1"
        check(await run(skopeo("copy", "--dest-tls-verify=false", image.reference, ref, authfile=authfile)))
        result = check(await run(skopeo("inspect", "--raw", "--tls-verify=false", ref, authfile=authfile)))
        manifest = json.loads(result.stdout)
        self.assertEqual([layer["digest"] for layer in manifest["layers"]], list(image.layer_digests))
        result = check(await run(skopeo("inspect", "--tls-verify=false", ref, authfile=authfile)))
        self.assertEqual(json.loads(result.stdout)["Digest"], image.manifest_digest)
        # The big layer is stored byte for byte.
        big = max(range(len(image.layer_sizes)), key=lambda i: image.layer_sizes[i])
        digest = image.layer_digests[big]
        stored = os.path.join(registry.storage, "docker/registry/v2/blobs/sha256",
                              digest[7:9], digest[7:], "data")
        self.assertEqual(sha256_file(stored), digest)

    async def _token_registry(self, header_style: str) -> None:
        image = await build_image()
        self.assertGreaterEqual(max(image.layer_sizes), 100 * 1024 * 1024)
        self.assertGreaterEqual(len(image.layer_digests), 3)
        registry = await start_token_registry(self, header_style=header_style)
        (user, password), = registry.users.items()
        authfile = write_authfile(self.mktemp(), {registry.host: (user, password)})
        await self._push_and_inspect(registry, image, authfile)
        tokens = registry.token_server
        assert tokens is not None
        self.assertGreater(tokens.count("repository:test/abc:pull,push"), 0)
        self.assertTrue(all(r.account == user for r in tokens.requests))
        # Without credentials the registry refuses (the token server grants nothing anonymously).
        result = await run(skopeo("inspect", "--tls-verify=false", f"docker://{registry.host}/test/abc:v1"))
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(b"unauthorized", result.stderr.lower())
        # With a wrong password the token server refuses.
        wrong = write_authfile(self.mktemp(), {registry.host: (user, secrets.token_hex(8))})
        result = await run(skopeo("inspect", "--tls-verify=false", f"docker://{registry.host}/test/abc:v1",
                                  authfile=wrong))
        self.assertNotEqual(result.returncode, 0)
        self.assertFalse(tokens.requests[-1].granted)

    async def test_token_registry_x5c(self) -> None:
        await self._token_registry("x5c")

    async def test_token_registry_kid(self) -> None:
        await self._token_registry("kid")

    async def test_basic_registry(self) -> None:
        image = await build_image()
        registry = await start_basic_registry(self)
        (user, password), = registry.users.items()
        authfile = write_authfile(self.mktemp(), {registry.host: (user, password)})
        await self._push_and_inspect(registry, image, authfile)
        result = await run(skopeo("inspect", "--tls-verify=false", f"docker://{registry.host}/test/abc:v1"))
        self.assertNotEqual(result.returncode, 0)

    async def test_redirected_blobs(self) -> None:
        """
        With the redirect middleware the registry sends blob GETs to another
        origin (the storage directory served by L{BlobOrigin}); skopeo follows.
        """
        image = await build_image("small", (1000, 2000))
        registry = await start_token_registry(self, redirect_blobs=True)
        (user, password), = registry.users.items()
        authfile = write_authfile(self.mktemp(), {registry.host: (user, password)})
        ref = f"docker://{registry.host}/test/redirect:v1"
        check(await run(skopeo("copy", "--dest-tls-verify=false", image.reference, ref, authfile=authfile)))
        out = os.path.abspath(self.mktemp())
        check(await run(skopeo("copy", "--src-tls-verify=false", ref, f"oci:{out}:v1", authfile=authfile)))
        assert registry.origin is not None
        fetched = {r.path.rsplit("/", 2)[-2] for r in registry.origin.requests if r.method == "GET"}
        for digest in image.layer_digests:
            self.assertIn(digest[7:], fetched)
            self.assertEqual(sha256_file(os.path.join(out, "blobs", "sha256", digest[7:])), digest)

    async def test_podman_pull_push(self) -> None:
        image = await build_image("small", (1000, 2000))
        registry = await start_token_registry(self)
        (user, password), = registry.users.items()
        authfile = write_authfile(self.mktemp(), {registry.host: (user, password)})
        check(await run(skopeo("copy", "--dest-tls-verify=false", image.reference,
                               f"docker://{registry.host}/test/small:v1", authfile=authfile)))
        podman = Podman.isolated(self)
        check(await run(podman.argv("pull", "--tls-verify=false", f"--authfile={authfile}",
                                    f"{registry.host}/test/small:v1"), env=podman.env))
        check(await run(podman.argv("push", "--tls-verify=false", f"--authfile={authfile}",
                                    f"{registry.host}/test/small:v1",
                                    f"docker://{registry.host}/test/copied:v2"), env=podman.env))
        result = check(await run(skopeo("inspect", "--raw", "--tls-verify=false",
                                        f"docker://{registry.host}/test/copied:v2", authfile=authfile)))
        layers = [layer["digest"] for layer in json.loads(result.stdout)["layers"]]
        # podman recompresses what it stored uncompressed, so compare what the layers hold.
        self.assertEqual(len(layers), len(image.layer_digests))
