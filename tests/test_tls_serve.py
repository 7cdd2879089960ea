"""
Tests for L{connectors_proxy.tls.serve} and the C{cptls:} endpoint plugin:
name parsing and reloading with a fake clock, then real handshakes on
127.0.0.1 with curl, C{openssl s_client} and a Twisted client.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from typing import Any

from cryptography import x509
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString, wrapClientTLS
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface.verify import verifyObject

from connectors_proxy.tls.mint import CertificateAuthority, Leaf
from connectors_proxy.tls.serve import (
    ServerTLS,
    TLSFiles,
    TLSServerEndpoint,
    client_identity,
    connector_hostnames,
    endpoint_from_string,
    parse_connector_host,
)
from connectors_proxy.tls.upstream import upstream_policy
from tests.support.procs import check, require, run

NOW = 1_750_000_000.0


# -- files laid out like a Kubernetes Secret volume -------------------------------------


def write_volume(root: str, files: dict[str, bytes]) -> None:
    """
    Write C{files} the way the kubelet does: into a fresh timestamped
    directory, then swap the C{..data} symlink atomically; the visible names
    are symlinks through C{..data}.
    """
    os.makedirs(root, exist_ok=True)
    version = os.path.join(root, f"..{time.time_ns()}_{secrets.token_hex(3)}")
    os.mkdir(version)
    for name, data in files.items():
        with open(os.path.join(version, name), "wb") as f:
            f.write(data)
    tmp = os.path.join(root, "..data_tmp")
    os.symlink(os.path.basename(version), tmp)
    os.replace(tmp, os.path.join(root, "..data"))
    for name in files:
        link = os.path.join(root, name)
        if not os.path.islink(link):
            os.symlink(os.path.join("..data", name), link)


class Pki:
    """A CA, a default certificate for localhost, and their files."""

    def __init__(self, root: str, now: float) -> None:
        self.root = os.path.abspath(root)
        self.ca = CertificateAuthority.generate(f"proxy CA {secrets.token_hex(3)}", now)
        self.default = self.ca.mint(["localhost", "127.0.0.1"], now)
        self.write()

    def write(self) -> None:
        write_volume(self.root, {
            "tls.crt": self.default.cert_pem(), "tls.key": self.default.key_pem(),
            "ca.crt": self.ca.cert_pem(), "ca.key": self.ca.key_pem(),
        })

    def files(self, client_ca: str | None = None) -> TLSFiles:
        p = self.path
        return TLSFiles(p("tls.crt"), p("tls.key"), p("ca.crt"), p("ca.key"), client_ca)

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def endpoint(self, port: int | str = 0, **extra: str) -> str:
        options = {"certKey": self.path("tls.crt"), "privateKey": self.path("tls.key"),
                   "caCert": self.path("ca.crt"), "caKey": self.path("ca.key"),
                   "interface": "127.0.0.1", **extra}
        return f"cptls:{port}:" + ":".join(f"{k}={v}" for k, v in options.items())


# -- pure parts ---------------------------------------------------------------------------


class NameTests(SynchronousTestCase):
    def test_forms(self) -> None:
        for host in ("c-a.ns1.svc.cluster.local", "c-a.ns1.svc", "c-a.ns1",
                     "C-A.NS1.SVC.Cluster.Local.", "c-a.ns1.svc."):
            self.assertEqual(parse_connector_host(host, "cluster.local"), ("ns1", "a"), host)
        self.assertEqual(parse_connector_host("c-my-git.team-x.svc.k8s.example", "k8s.example"),
                         ("team-x", "my-git"))

    def test_other_names(self) -> None:
        for host in ("", "localhost", "c-.ns", "a.ns1.svc", "c-a", "c-a.ns1.svc.other.domain",
                     "c-a.ns1.pod", "c-a.ns1.svc.cluster.local.evil", "c-a_b.ns", "c-a.-ns",
                     "c-\u00e9.ns", "c-" + "a" * 64 + ".ns"):
            self.assertIsNone(parse_connector_host(host, "cluster.local"), host)

    def test_hostnames(self) -> None:
        self.assertEqual(connector_hostnames("ns1", "a", "cluster.local"),
                         ("c-a.ns1.svc.cluster.local", "c-a.ns1.svc", "c-a.ns1"))


class EndpointStringTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.pki = Pki(self.mktemp(), time.time())

    def test_plugin(self) -> None:
        """serverFromString finds the plugin and gives an endpoint."""
        endpoint = serverFromString(reactor, self.pki.endpoint(0, clusterDomain="k8s.example"))
        self.assertTrue(verifyObject(IStreamServerEndpoint, endpoint))
        assert isinstance(endpoint, TLSServerEndpoint)
        self.assertEqual(endpoint.tls.cluster_domain, "k8s.example")
        self.assertIsNotNone(endpoint.tls.context_for("c-a.ns.svc.k8s.example"))
        self.assertIsNone(endpoint.tls.context_for("c-a.ns.svc.cluster.local"))

    def test_cluster_domain_left_to_the_daemon(self) -> None:
        """Without clusterDomain=, the daemon may set its --cluster-domain."""
        endpoint = endpoint_from_string(reactor, "0", certKey=self.pki.path("tls.crt"),
                                        privateKey=self.pki.path("tls.key"),
                                        caCert=self.pki.path("ca.crt"), caKey=self.pki.path("ca.key"))
        self.assertIsNone(endpoint.tls.cluster_domain)
        self.assertIsNotNone(endpoint.tls.context_for("c-a.ns.svc.cluster.local"))
        endpoint.tls.cluster_domain = "corp.internal"
        self.assertIsNotNone(endpoint.tls.context_for("c-a.ns.svc.corp.internal"))

    def test_errors(self) -> None:
        cases = {
            "cptls:8443": "certKey (or caCert and caKey) is required",
            f"cptls:8443:certKey={self.pki.path('tls.crt')}:bogus=1": "unknown option 'bogus'",
            "cptls:8443:certKey=/nonexistent/tls.crt": "/nonexistent/tls.crt does not exist",
            f"cptls:x:certKey={self.pki.path('tls.crt')}": "must be numbers",
            f"cptls:8443:certKey={self.pki.path('tls.crt')}:clientAuth=require": "needs clientCA",
            f"cptls:8443:certKey={self.pki.path('tls.crt')}:privateKey={self.pki.path('ca.key')}":
                # Each file named for what it is (the key's, not the certificate's twice).
                f"the private key in {self.pki.path('ca.key')} does not belong to the certificate in "
                f"{self.pki.path('tls.crt')}",
            f"cptls:8443:caCert={self.pki.path('ca.crt')}": "caCert and caKey go together",
        }
        for text, expected in cases.items():
            e = self.assertRaises(ValueError, serverFromString, reactor, text)
            self.assertIn(expected, str(e), text)
            self.assertTrue(str(e).startswith("cptls: "), str(e))

    def test_ca_only(self) -> None:
        """Without certKey, the CA mints the default certificate for hostnames=."""
        p = self.pki.path
        endpoint = endpoint_from_string(reactor, "0", caCert=p("ca.crt"), caKey=p("ca.key"),
                                        hostnames="proxy.example,localhost")
        self.assertEqual(endpoint.tls.material.default.names, ("proxy.example", "localhost"))


class ReloadTests(SynchronousTestCase):
    """Reloading driven by a fake clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(time.time())
        self.pki = Pki(self.mktemp(), self.clock.seconds())
        self.tls = ServerTLS(self.pki.files(), self.clock)
        self.tls.start()
        self.addCleanup(self.tls.stop)

    def test_swap(self) -> None:
        """A ..data swap is in use after the next tick; nothing changes without one."""
        self.clock.advance(1)
        self.assertEqual(self.tls.reloads, 0)
        old = self.tls.default_context
        self.pki.default = self.pki.ca.mint(["localhost", "new.example"], self.clock.seconds())
        self.pki.write()
        self.clock.advance(1)
        self.assertEqual(self.tls.reloads, 1)
        self.assertIsNot(self.tls.default_context, old)
        self.assertEqual(self.tls.material.default.names, ("localhost", "new.example"))

    def test_leaves_kept_when_only_default_changes(self) -> None:
        leaves = self.tls.leaves
        assert leaves is not None
        self.tls.context_for("c-a.ns1.svc")
        self.pki.default = self.pki.ca.mint(["localhost"], self.clock.seconds())
        self.pki.write()
        self.clock.advance(1)
        self.assertIs(self.tls.leaves, leaves)
        self.assertEqual(len(leaves), 1)

    def test_new_ca_drops_leaves(self) -> None:
        self.tls.context_for("c-a.ns1.svc")
        self.pki.ca = CertificateAuthority.generate("next CA", self.clock.seconds())
        self.pki.write()
        self.clock.advance(1)
        assert self.tls.leaves is not None
        self.assertEqual(len(self.tls.leaves), 0)
        self.assertEqual(self.tls.leaves.ca.certificate, self.pki.ca.certificate)

    def test_broken_files_keep_the_old(self) -> None:
        """A key that does not match (half-written update) keeps the old set until fixed."""
        old = self.tls.default_context
        with open(os.path.join(self.pki.root, "..data", "tls.key"), "wb") as f:
            f.write(CertificateAuthority.generate("x", 0).key_pem())
        with capturedLogs() as events:
            self.clock.advance(1)
            self.clock.advance(1)
        self.assertIs(self.tls.default_context, old)
        self.assertEqual(self.tls.reloads, 0)
        warnings = [e for e in events if "not reloaded" in e["log_format"]]
        self.assertEqual(len(warnings), 1, "logged once, not every second")
        self.assertIn("does not belong", warnings[0]["error"])
        self.assertNotIn("PRIVATE", repr(events))
        self.pki.default = self.pki.ca.mint(["localhost", "fixed.example"], self.clock.seconds())
        self.pki.write()
        self.clock.advance(1)
        self.assertEqual(self.tls.reloads, 1)
        self.assertEqual(self.tls.material.default.names, ("localhost", "fixed.example"))

    def test_stop(self) -> None:
        self.tls.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_known(self) -> None:
        """With known(), only existing Connectors get a minted certificate."""
        self.tls.known = lambda ns, name: (ns, name) == ("ns1", "a")
        self.assertIsNotNone(self.tls.context_for("c-a.ns1.svc"))
        self.assertIsNone(self.tls.context_for("c-b.ns1.svc"))
        self.assertIsNone(self.tls.context_for("harbor.example.com"))
        self.assertIsNone(self.tls.context_for(None))


# -- real handshakes ------------------------------------------------------------------------


class DaemonReloadTests(SynchronousTestCase):
    """The daemon's SIGHUP list names a C{cptls:} listener's certificates once."""

    def test_cptls_reloaded_once(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        from connectors_proxy.ops.drain import Signals
        from connectors_proxy.tap import Options, make_service
        pki = Pki(self.mktemp(), time.time())
        options = Options()
        options.parseOptions(["--listen", pki.endpoint(0), "--admin", "tcp:0:interface=127.0.0.1"])
        top = make_service(options, MemoryReactorClock(), signals=True)
        [signals] = [s for s in top if isinstance(s, Signals)]
        names = [name for name, _ in signals.reloader.actions]
        self.assertEqual(names.count("certificates"), 1, names)


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        identity = client_identity(request.channel.transport)
        if identity is None:
            return b"ok anonymous"
        return f"ok {identity.username} {','.join(identity.groups)}".encode()


class OneConnection(Protocol):
    """A keep-alive HTTP/1.1 client on one TLS connection: request, wait, repeat."""

    def __init__(self) -> None:
        self.buffer = b""
        self.waiting: Deferred[bytes] | None = None
        self.lost: Deferred[None] = Deferred()

    def get(self) -> Deferred[bytes]:
        self.waiting = Deferred()
        self.transport.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")  # type: ignore[union-attr]
        return self.waiting

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        head, sep, body = self.buffer.partition(b"\r\n\r\n")
        m = re.search(rb"content-length: *(\d+)", head, re.I)
        if sep and m and len(body) >= int(m.group(1)) and self.waiting is not None:
            waiting, self.waiting, self.buffer = self.waiting, None, b""
            waiting.callback(head + sep + body)

    def peer(self) -> x509.Certificate:
        return self.transport.getPeerCertificate().to_cryptography()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        self.lost.callback(None)


def san(pem_output: bytes) -> tuple[str, ...]:
    """The subjectAltName of the first certificate in C{openssl s_client -showcerts} output."""
    first = re.search(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem_output,
                      re.DOTALL)
    assert first is not None, pem_output
    return Leaf(x509.load_pem_x509_certificate(first.group(0)), None).names  # type: ignore[arg-type]


class HandshakeTests(TestCase):
    """The cptls: endpoint on 127.0.0.1, with real clients."""

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        self.openssl = require("openssl")
        self.curl = require("curl")
        self.pki = Pki(self.mktemp(), time.time())
        self.ca_file = self.pki.path("ca.crt")
        return Deferred.fromCoroutine(self.listen(self.pki.endpoint()))

    async def listen(self, description: str) -> None:
        endpoint = serverFromString(reactor, description)
        port: IListeningPort = await endpoint.listen(Site(Hello()))
        self.addCleanup(port.stopListening)
        self.endpoint = endpoint
        self.port = port.getHost().port  # type: ignore[attr-defined]

    def s_client(self, *args: str) -> Deferred[Any]:
        return run([self.openssl, "s_client", "-connect", f"127.0.0.1:{self.port}", "-showcerts",
                    *args], input=b"", timeout=30)

    def curl_get(self, host: str, *args: str) -> Deferred[Any]:
        return run([self.curl, "-sS", "--fail", "--max-time", "20", "--cacert", self.ca_file,
                    "--resolve", f"{host}:{self.port}:127.0.0.1", *args,
                    f"https://{host}:{self.port}/"], timeout=30)

    async def _sni(self) -> None:
        for host in ("c-a.ns1.svc.cluster.local", "c-b.ns2.svc"):
            result = check(await self.curl_get(host))
            self.assertEqual(result.stdout, b"ok anonymous")
        a = check(await self.s_client("-servername", "c-a.ns1.svc.cluster.local"))
        self.assertEqual(san(a.stdout), connector_hostnames("ns1", "a", "cluster.local"))
        b = check(await self.s_client("-servername", "c-b.ns2.svc", "-alpn", "h2,http/1.1"))
        self.assertEqual(san(b.stdout), connector_hostnames("ns2", "b", "cluster.local"))
        self.assertIn(b"ALPN protocol: http/1.1", b.stdout)
        self.assertIn(b"Verify return code: 0 (ok)",
                      check(await self.s_client("-servername", "c-b.ns2.svc", "-CAfile",
                                                self.ca_file, "-verify_hostname",
                                                "c-b.ns2.svc")).stdout)
        # No SNI, or a name that is no Connector's: the default certificate.
        for args in (["-noservername"], ["-servername", "harbor.example.com"]):
            other = check(await self.s_client(*args))
            self.assertEqual(san(other.stdout), ("localhost", "127.0.0.1"))

    def test_sni(self) -> Deferred[None]:
        """Each Connector name gets a certificate minted for its three names; curl trusts it."""
        return Deferred.fromCoroutine(self._sni())

    async def _old_tls(self) -> None:
        # SECLEVEL=0 lets the client itself offer TLS 1.0/1.1, so the refusal is the server's.
        for version in ("-tls1", "-tls1_1"):
            result = await self.s_client(version, "-cipher", "DEFAULT:@SECLEVEL=0",
                                         "-servername", "c-a.ns1.svc")
            self.assertNotEqual(result.returncode, 0, result.stdout)
            self.assertNotIn(b"BEGIN CERTIFICATE", result.stdout)
            self.assertIn(b"alert protocol version", result.stderr)
        result = await self.s_client("-tls1_2", "-cipher", "AES128-SHA")
        self.assertNotEqual(result.returncode, 0, "a non-forward-secret suite was accepted")
        check(await self.s_client("-tls1_2", "-servername", "c-a.ns1.svc"))
        result = await self.curl_get("c-a.ns1.svc", "--tlsv1.0", "--tls-max", "1.0",
                                     "--ciphers", "DEFAULT:@SECLEVEL=0")
        self.assertNotEqual(result.returncode, 0, result.stdout)

    def test_old_tls_refused(self) -> Deferred[None]:
        """TLS 1.0 and 1.1 clients, and TLS 1.2 without ECDHE, are refused."""
        return Deferred.fromCoroutine(self._old_tls())

    async def _hot_swap(self) -> None:
        policy = upstream_policy(self.pki.ca.cert_pem())
        creator = policy.creatorForNetloc(b"localhost", self.port)

        async def connect() -> OneConnection:
            endpoint = wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", self.port))
            proto: Any = await endpoint.connect(Factory.forProtocol(OneConnection))
            self.addCleanup(lambda: (proto.transport.loseConnection(), proto.lost)[1])  # type: ignore[union-attr]
            return proto

        # A connection opened before the swap...
        early = await connect()
        self.assertIn(b"200 OK", await early.get())
        old_serial = early.peer().serial_number

        # ...a stream of requests, each on a new connection, during the swap.
        agent = Agent(reactor, policy, pool=HTTPConnectionPool(reactor, persistent=False))
        failures: list[Failure] = []
        codes: list[int] = []
        done = False

        async def stream() -> None:
            while not done:
                try:
                    response = await agent.request(b"GET", f"https://localhost:{self.port}/".encode())
                    await readBody(response)
                    codes.append(response.code)
                except Exception:
                    failures.append(Failure())
        streaming = Deferred.fromCoroutine(stream())

        await deferLater(reactor, 0.3, lambda: None)
        self.pki.default = self.pki.ca.mint(["localhost"], time.time())
        self.pki.write()
        swapped = time.monotonic()
        while True:
            probe = await connect()
            await probe.get()
            if probe.peer().serial_number == self.pki.default.certificate.serial_number:
                break
            self.assertLess(time.monotonic() - swapped, 2.0, "the new certificate was not served")
            await deferLater(reactor, 0.05, lambda: None)
        elapsed = time.monotonic() - swapped
        await deferLater(reactor, 0.3, lambda: None)
        done = True
        await streaming

        self.assertEqual(failures, [])
        self.assertGreater(len(codes), 5)
        self.assertEqual(set(codes), {200})
        self.assertLess(elapsed, 2.0)
        # The early connection still works, with the certificate it started with.
        self.assertIn(b"200 OK", await early.get())
        self.assertEqual(early.peer().serial_number, old_serial)

    def test_hot_swap(self) -> Deferred[None]:
        """A certificate swapped on disk is served within 2 s; no request fails meanwhile."""
        return Deferred.fromCoroutine(self._hot_swap())


class ClientCertificateTests(TestCase):
    """clientCA=: the proxy asks for client certificates and reads identities from them."""

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        self.curl = require("curl")
        self.pki = Pki(self.mktemp(), time.time())
        self.clients = CertificateAuthority.generate("clients", time.time())
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.client_ca = self.write("clients-ca.crt", self.clients.cert_pem())
        return Deferred.fromCoroutine(self.listen())

    def write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    async def listen(self, **extra: str) -> None:
        endpoint = serverFromString(reactor, self.pki.endpoint(clientCA=self.client_ca, **extra))
        port: IListeningPort = await endpoint.listen(Site(Hello()))
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port  # type: ignore[attr-defined]

    def curl_get(self, *args: str) -> Deferred[Any]:
        host = "c-a.ns1.svc"
        return run([self.curl, "-sS", "--max-time", "20", "--cacert", self.pki.path("ca.crt"),
                    "--resolve", f"{host}:{self.port}:127.0.0.1", *args,
                    f"https://{host}:{self.port}/"], timeout=30)

    def client_cert(self, ca: CertificateAuthority, name: str, *groups: str) -> list[str]:
        leaf = ca.mint([], time.time(), client=True, common_name=name, organizations=groups)
        cert = self.write(f"{name}.crt", leaf.cert_pem())
        key = self.write(f"{name}.key", leaf.key_pem())
        return ["--cert", cert, "--key", key]

    async def _mtls(self) -> None:
        result = check(await self.curl_get(*self.client_cert(self.clients, "alice", "dev", "ops")))
        self.assertEqual(result.stdout, b"ok alice dev,ops")
        self.assertEqual(check(await self.curl_get()).stdout, b"ok anonymous")
        stranger = CertificateAuthority.generate("stranger", time.time())
        result = await self.curl_get(*self.client_cert(stranger, "mallory"))
        self.assertNotEqual(result.returncode, 0, result.stdout)
        self.assertNotIn(b"ok", result.stdout)

    def test_optional(self) -> Deferred[None]:
        """A verified certificate names the client; none is anonymous; a stranger's is refused."""
        return Deferred.fromCoroutine(self._mtls())

    async def _required(self) -> None:
        await self.listen(clientAuth="require")
        result = await self.curl_get()
        self.assertNotEqual(result.returncode, 0, result.stdout)
        result = check(await self.curl_get(*self.client_cert(self.clients, "bob")))
        self.assertEqual(result.stdout, b"ok bob ")

    def test_required(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._required())
