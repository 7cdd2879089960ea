"""
TLS through the real proxy: clients reach it over the C{cptls:} listener
(curl, git with C{http.sslCAInfo}, skopeo with C{--cert-dir}), and it
reaches C{https://} upstreams with a Connector's CA bundle and client
certificate.  Canary credentials never reach the client.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from connectors_proxy.tls.mint import CertificateAuthority
from tests.support.gitserver import fresh_home, git_env, has_secret, start_git_server
from tests.support.procs import check, free_port, require, run
from tests.support.proxy import (
    RunningProxy,
    basic_secret,
    connector,
    connector_class,
    sa,
    secret,
    start_proxy,
    start_proxy_process,
    write_setup,
)
from tests.support.registry import build_image, skopeo, start_basic_registry
from tests.test_tls import server_options
from tests.test_tls_serve import Pki

NS = "ns1"


async def start_tls_proxy(test: TestCase, objects: list[dict[str, Any]],
                          tokens: dict[str, str], **endpoint_options: str) -> tuple[RunningProxy, Pki]:
    """
    The proxy (as L{tests.support.proxy.start_proxy} builds it) served on a
    C{cptls:} listener whose CA mints the Connector certificates.
    """
    pki = Pki(test.mktemp(), time.time())
    proxy = await start_proxy(test, objects, tokens, endpoint=pki.endpoint(**endpoint_options))
    return proxy, pki


class Upstream(Resource):
    """An HTTPS upstream that records what it was sent."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, Any]] = []

    def render_GET(self, request: Request) -> bytes:
        transport: Any = request.channel.transport
        cert = getattr(transport, "getPeerCertificate", lambda: None)()
        self.seen.append({
            "authorization": request.getHeader(b"authorization"),
            "proto": request.getHeader(b"x-forwarded-proto"),
            "client": cert.get_subject().CN if cert is not None else None,
        })
        return b"hello from upstream"


class RestTests(TestCase):
    """REST over TLS on both sides of the proxy."""

    timeout = 120

    def setUp(self) -> None:
        self.curl = require("curl")
        self.upstream_ca = CertificateAuthority.generate("upstream CA", time.time())
        self.client_ca = CertificateAuthority.generate("upstream clients", time.time())
        self.token = "client-" + secrets.token_hex(16)
        self.password = secrets.token_hex(16)
        self.upstream = Upstream()

    def serve_upstream(self, require_client_cert: bool = False) -> str:
        leaf = self.upstream_ca.mint(["localhost"], time.time())
        options = server_options(leaf, self.client_ca if require_client_cert else None)
        port = reactor.listenSSL(0, Site(self.upstream), options,  # type: ignore[attr-defined]
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"https://localhost:{port.getHost().port}"

    def objects(self, address: str, **spec: Any) -> list[dict[str, Any]]:
        client = self.client_ca.mint([], time.time(), client=True, common_name="proxy-client")
        return [
            connector_class("rest"),
            connector(NS, "api", "rest", address, secret="creds", **spec),
            basic_secret(NS, "creds", "robot", self.password),
            secret(NS, "upstream-ca", "Opaque", **{"ca.crt": self.upstream_ca.cert_pem().decode()}),
            secret(NS, "client-cert", "kubernetes.io/tls", **{
                "tls.crt": client.cert_pem().decode(), "tls.key": client.key_pem().decode()}),
        ]

    async def get(self, proxy: RunningProxy, pki: Pki) -> Any:
        host = f"c-api.{NS}.svc.cluster.local"
        result = await run([self.curl, "-sS", "--max-time", "20", "--cacert", pki.path("ca.crt"),
                            "--resolve", f"{host}:{proxy.port}:127.0.0.1",
                            "-H", f"Authorization: Bearer {self.token}",
                            "-w", "\n%{http_code}", f"https://{host}:{proxy.port}/things"])
        check(result)
        body, _, code = result.stdout.rpartition(b"\n")
        for seen in (result.stdout, result.stderr, proxy.logs.text().encode()):
            self.assertFalse(has_secret([seen], self.password), "the upstream password leaked")
        return int(code), body.decode()

    async def _trusted(self) -> None:
        address = self.serve_upstream()
        proxy, pki = await start_tls_proxy(
            self, self.objects(address, caCertSecretRef={"name": "upstream-ca"}),
            {self.token: sa(NS)})
        code, body = await self.get(proxy, pki)
        self.assertEqual((code, body), (200, "hello from upstream"))
        [seen] = self.upstream.seen
        self.assertTrue(seen["authorization"].startswith(b"Basic "))
        self.assertEqual(seen["proto"], b"https")

    def test_trusted_upstream(self) -> Deferred[None]:
        """curl -> cptls (minted cert) -> proxy -> https upstream trusted via caCertSecretRef."""
        return Deferred.fromCoroutine(self._trusted())

    async def _untrusted(self) -> None:
        address = self.serve_upstream()
        proxy, pki = await start_tls_proxy(self, self.objects(address), {self.token: sa(NS)})
        code, body = await self.get(proxy, pki)
        self.assertEqual(code, 502, body)
        self.assertIn("upstream certificate for localhost is not trusted", body)
        self.assertIn("spec.caCertSecretRef", body)
        self.assertEqual(self.upstream.seen, [])

    def test_untrusted_upstream_explained(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._untrusted())

    async def _client_cert(self) -> None:
        address = self.serve_upstream(require_client_cert=True)
        proxy, pki = await start_tls_proxy(
            self, self.objects(address, caCertSecretRef={"name": "upstream-ca"}),
            {self.token: sa(NS)})
        code, body = await self.get(proxy, pki)
        self.assertEqual(code, 502, body)
        self.assertIn("requires a client certificate", body)
        proxy.set_objects(self.objects(address, caCertSecretRef={"name": "upstream-ca"},
                                       clientCertSecretRef={"name": "client-cert"}))
        code, body = await self.get(proxy, pki)
        self.assertEqual((code, body), (200, "hello from upstream"))
        self.assertEqual(self.upstream.seen[-1]["client"], "proxy-client")

    def test_upstream_client_certificate(self) -> Deferred[None]:
        """spec.clientCertSecretRef: the proxy shows the certificate the upstream demands."""
        return Deferred.fromCoroutine(self._client_cert())


class GitOverTLSTests(TestCase):
    timeout = 300

    async def _clone(self) -> None:
        server = await start_git_server(self)
        await server.create_repo("team/app")
        token = "client-" + secrets.token_hex(16)
        proxy, pki = await start_tls_proxy(self, [
            connector_class("git", protocol="git"),
            connector(NS, "repo", "git", server.base_url, secret="git-creds"),
            basic_secret(NS, "git-creds", server.username, server.password),
        ], {token: sa(NS)})
        host = f"c-repo.{NS}.svc.cluster.local"
        home = fresh_home(self)
        env = git_env(home)
        url = f"https://{host}:{proxy.port}/team/app.git"
        # env -u: some machines export GIT_SSL_CAINFO, which beats http.sslCAInfo.
        result = await run([
            "env", "-u", "GIT_SSL_CAINFO", "git", "-c", f"http.sslCAInfo={pki.path('ca.crt')}",
            "-c", f"http.curloptResolve={host}:{proxy.port}:127.0.0.1",
            "-c", f"http.extraHeader=Authorization: Bearer {token}",
            "clone", url, os.path.join(home, "clone")], env=env)
        check(result)
        log = check(await run(["git", "-C", os.path.join(home, "clone"), "log", "--format=%H"],
                              env=env))
        self.assertEqual(log.stdout.decode().strip(), await server.rev_parse("team/app", "main"))
        self.assertFalse(has_secret([result.stdout, result.stderr, proxy.logs.text().encode()],
                                    server.password))

    def test_clone_over_https(self) -> Deferred[None]:
        """git clone https://c-repo.ns1.svc.cluster.local:PORT/... with http.sslCAInfo."""
        return Deferred.fromCoroutine(self._clone())


class SkopeoOverTLSTests(TestCase):
    timeout = 300

    async def _copy(self) -> None:
        registry = await start_basic_registry(self)
        [(user, password)] = registry.users.items()
        image = await build_image("tls-small", (1000, 3000))
        token = "client-" + secrets.token_hex(16)
        proxy, pki = await start_tls_proxy(self, [
            connector_class("oci", protocol="oci"),
            connector(NS, "reg", "oci", registry.address, secret="reg-creds"),
            basic_secret(NS, "reg-creds", user, password),
        ], {token: sa(NS)})
        cert_dir = self.mktemp()
        os.makedirs(cert_dir)
        with open(os.path.join(cert_dir, "ca.crt"), "wb") as f:
            f.write(pki.ca.cert_pem())
        ref = f"docker://localhost:{proxy.port}/namespaces/{NS}/connectors/reg/test/abc:v1"
        creds = f"x:{token}"
        outputs = [check(await run(skopeo("copy", f"--dest-cert-dir={cert_dir}",
                                          f"--dest-creds={creds}", image.reference, ref)))]
        outputs.append(check(await run(skopeo("inspect", "--raw", f"--cert-dir={cert_dir}",
                                              f"--creds={creds}", ref))))
        manifest = json.loads(outputs[-1].stdout)
        self.assertEqual([layer["size"] for layer in manifest["layers"]], list(image.layer_sizes))
        seen = [o.stdout for o in outputs] + [o.stderr for o in outputs]
        self.assertFalse(has_secret([*seen, proxy.logs.text().encode()], password))
        # Without the CA, skopeo refuses the proxy's certificate.
        result = await run(skopeo("inspect", "--raw", f"--creds={creds}", ref))
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(b"certificate", result.stderr)

    def test_copy_and_inspect_over_https(self) -> Deferred[None]:
        """skopeo with --cert-dir holding the proxy CA pushes and reads through cptls."""
        return Deferred.fromCoroutine(self._copy())


class DaemonTests(TestCase):
    """The plugin as the daemon loads it: --listen cptls:..."""

    timeout = 120

    async def _daemon(self) -> None:
        curl = require("curl")
        upstream = Upstream()
        site: Any = Site(upstream)
        up: Any = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(up.stopListening)
        token = "client-" + secrets.token_hex(16)
        password = secrets.token_hex(16)
        args = write_setup(self, [
            connector_class("rest"),
            connector(NS, "api", "rest", f"http://127.0.0.1:{up.getHost().port}", secret="creds"),
            basic_secret(NS, "creds", "robot", password),
        ], {token: sa(NS)})
        pki = Pki(self.mktemp(), time.time())
        tls_port = free_port()
        proxy = await start_proxy_process(self, [*args, "--listen", pki.endpoint(tls_port)])
        host = f"c-api.{NS}.svc"
        deadline = time.monotonic() + 20
        while True:
            result = await run([curl, "-sS", "--max-time", "10", "--cacert", pki.path("ca.crt"),
                                "--resolve", f"{host}:{tls_port}:127.0.0.1",
                                "-H", f"Authorization: Bearer {token}", f"https://{host}:{tls_port}/x"])
            if result.returncode == 0 or time.monotonic() > deadline:
                break
        check(result)
        self.assertEqual(result.stdout, b"hello from upstream")
        self.assertEqual(upstream.seen[-1]["proto"], b"https")
        self.assertNotIn(password, proxy.log())

    def test_listen_cptls(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._daemon())


class ClientCertificateIdentity(TestCase):
    """
    With C{clientCA=}, a verified client certificate is an identity of its
    own (CN the user, O the groups): no token needed, authorization the same.
    """

    timeout = 60

    async def _identity(self) -> None:
        curl = require("curl")
        upstream = Upstream()
        port = reactor.listenTCP(0, Site(upstream), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        clients = CertificateAuthority.generate("workload clients", time.time())
        paths = {"clients-ca.crt": clients.cert_pem()}
        for who, ns in (("mine", NS), ("theirs", "other")):
            leaf = clients.mint([], time.time(), client=True, common_name=sa(ns),
                                organizations=["system:serviceaccounts"])
            paths[f"{who}.crt"], paths[f"{who}.key"] = leaf.cert_pem(), leaf.key_pem()
        for name, data in paths.items():
            with open(os.path.join(folder, name), "wb") as f:
                f.write(data)
        password = secrets.token_hex(16)
        proxy, pki = await start_tls_proxy(self, [
            connector_class("rest"),
            connector(NS, "api", "rest", f"http://127.0.0.1:{port.getHost().port}", secret="creds"),
            basic_secret(NS, "creds", "robot", password),
        ], {}, clientCA=os.path.join(folder, "clients-ca.crt"))
        host = f"c-api.{NS}.svc.cluster.local"

        async def get(*cert: str) -> int:
            result = check(await run([curl, "-sS", "--max-time", "20", "--cacert", pki.path("ca.crt"),
                                      "--resolve", f"{host}:{proxy.port}:127.0.0.1", *cert,
                                      "-o", "/dev/null", "-w", "%{http_code}", f"https://{host}:{proxy.port}/x"]))
            return int(result.stdout)

        mine = ["--cert", os.path.join(folder, "mine.crt"), "--key", os.path.join(folder, "mine.key")]
        theirs = ["--cert", os.path.join(folder, "theirs.crt"), "--key", os.path.join(folder, "theirs.key")]
        self.assertEqual(await get(*mine), 200)
        self.assertEqual(await get(*theirs), 403)
        self.assertEqual(await get(), 401)
        self.assertEqual(len(upstream.seen), 1)
        [access] = [a for a in proxy.logs.access() if a["status"] == 200]
        self.assertEqual(access["identity"], sa(NS))
        self.assertNotIn(password, proxy.logs.text())

    def test_certificate_identity(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._identity())
