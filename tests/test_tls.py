"""
Tests for L{connectors_proxy.tls.upstream}: CA bundles out of Secrets, the upstream
policy against real loopback TLS servers through a real
C{twisted.web.client.Agent}, and the one-line explanations of failures.
"""

from __future__ import annotations

import os
import secrets
import time
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL, crypto
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.ssl import Certificate, CertificateOptions, TLSVersion
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ResponseNeverReceived, readBody
from twisted.web.iweb import IPolicyForHTTPS
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface.verify import verifyObject

from connectors_proxy.tls.mint import CertificateAuthority, Leaf
from connectors_proxy.tls.upstream import (
    UpstreamCertificateError,
    UpstreamHostMismatch,
    describe_tls_failure,
    load_ca_bundle,
    load_client_certificate,
    tls_error,
    upstream_policy,
)


def ca(name: str = "Test CA") -> CertificateAuthority:
    return CertificateAuthority.generate(f"{name} {secrets.token_hex(4)}", time.time())


def key_pem() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())


class LoadCABundleTests(SynchronousTestCase):
    def test_picks_ca_keys_in_order(self) -> None:
        """ca.crt comes first, then *.crt and *.pem by name; other keys are ignored."""
        a, b, c = ca("a"), ca("b"), ca("c")
        bundle = load_ca_bundle({
            "z.pem": c.cert_pem(), "ca.crt": a.cert_pem(), "b.crt": b.cert_pem(),
            "tls.key": b"not a cert", "README": b"hello",
        })
        certs = x509.load_pem_x509_certificates(bundle)
        self.assertEqual([x.subject for x in certs],
                         [a.certificate.subject, b.certificate.subject, c.certificate.subject])

    def test_several_in_one_key(self) -> None:
        a, b = ca("a"), ca("b")
        bundle = load_ca_bundle({"ca.crt": a.cert_pem() + b"\n" + b.cert_pem()})
        self.assertEqual(len(x509.load_pem_x509_certificates(bundle)), 2)

    def test_private_key_never_joins(self) -> None:
        """A .pem holding a certificate and a key gives the certificate only."""
        a = ca()
        bundle = load_ca_bundle({"bundle.pem": a.cert_pem() + a.key_pem()})
        self.assertNotIn(b"PRIVATE KEY", bundle)
        self.assertEqual(bundle, a.cert_pem())

    def test_invalid_key_named(self) -> None:
        e = self.assertRaises(ValueError, load_ca_bundle,
                              {"ca.crt": ca().cert_pem(), "extra.pem": b"garbage"})
        self.assertIn("'extra.pem'", str(e))

    def test_corrupt_certificate_named(self) -> None:
        pem = ca().cert_pem().replace(b"\n", b"\nAAAA", 2)
        e = self.assertRaises(ValueError, load_ca_bundle, {"ca.crt": pem})
        self.assertIn("'ca.crt'", str(e))

    def test_no_ca_keys(self) -> None:
        e = self.assertRaises(ValueError, load_ca_bundle, {"token": b"x"})
        self.assertIn("ca.crt", str(e))


class ClientCertificateTests(SynchronousTestCase):
    def test_valid(self) -> None:
        leaf = ca().mint(["client"], time.time(), client=True)
        data = {"tls.crt": leaf.cert_pem(), "tls.key": leaf.key_pem()}
        self.assertEqual(load_client_certificate(data), (leaf.cert_pem(), leaf.key_pem()))

    def test_missing_key(self) -> None:
        leaf = ca().mint(["client"], time.time(), client=True)
        e = self.assertRaises(ValueError, load_client_certificate, {"tls.crt": leaf.cert_pem()})
        self.assertIn("'tls.key'", str(e))

    def test_mismatched_key(self) -> None:
        leaf = ca().mint(["client"], time.time(), client=True)
        e = self.assertRaises(ValueError, load_client_certificate,
                              {"tls.crt": leaf.cert_pem(), "tls.key": key_pem()})
        self.assertIn("does not belong", str(e))
        # The key material itself never shows in the message.
        self.assertNotIn("PRIVATE", str(e))


class PolicyTests(SynchronousTestCase):
    def test_interface(self) -> None:
        policy = upstream_policy(None)
        self.assertTrue(verifyObject(IPolicyForHTTPS, policy))

    def test_creators_cached(self) -> None:
        """One creator per host and port; one OpenSSL context per policy."""
        policy = upstream_policy(ca().cert_pem())
        first = policy.creatorForNetloc(b"a.example", 443)
        self.assertIs(first, policy.creatorForNetloc(b"a.example", 443))
        self.assertIsNot(first, policy.creatorForNetloc(b"b.example", 443))
        self.assertIs(policy.context(), policy.context())

    def test_creators_bounded(self) -> None:
        policy = upstream_policy(None)
        for i in range(policy.max_hosts + 10):
            policy.creatorForNetloc(f"h{i}.example".encode(), 443)
        self.assertEqual(len(policy._creators), policy.max_hosts)

    def test_key_tells_configurations_apart(self) -> None:
        a, b = ca(), ca()
        leaf = a.mint(["client"], time.time(), client=True)
        self.assertEqual(upstream_policy(a.cert_pem()).key, upstream_policy(a.cert_pem()).key)
        self.assertNotEqual(upstream_policy(a.cert_pem()).key, upstream_policy(b.cert_pem()).key)
        self.assertNotEqual(upstream_policy(None).key,
                            upstream_policy(None, leaf.cert_pem(), leaf.key_pem()).key)

    def test_invalid_inputs(self) -> None:
        leaf = ca().mint(["client"], time.time(), client=True)
        self.assertRaises(ValueError, upstream_policy, b"nonsense")
        self.assertRaises(ValueError, upstream_policy, None, leaf.cert_pem(), None)
        self.assertRaises(ValueError, upstream_policy, None, leaf.cert_pem(), key_pem())


class DescribeTests(SynchronousTestCase):
    """The explanations, from failures shaped like the ones Agent produces."""

    def wrap(self, error: BaseException) -> Failure:
        return Failure(ResponseNeverReceived([Failure(error)]))

    def test_untrusted(self) -> None:
        line = describe_tls_failure(self.wrap(
            UpstreamCertificateError("harbor.example.com", 19, 1, "CN=Root")))
        self.assertEqual(
            line, "upstream certificate for harbor.example.com is not trusted "
                  "(self-signed certificate in certificate chain); add its CA with spec.caCertSecretRef")

    def test_expired(self) -> None:
        line = describe_tls_failure(self.wrap(
            UpstreamCertificateError("h.example", 10, 0, "CN=h.example")))
        self.assertIn("certificate has expired", line)

    def test_mismatch(self) -> None:
        line = describe_tls_failure(self.wrap(UpstreamHostMismatch("x.example", ("y.example",))))
        self.assertIn("does not match host x.example (it is for y.example)", line)

    def test_bare_ssl_errors(self) -> None:
        cases = {
            "tlsv13 alert certificate required": "requires a client certificate",
            "tlsv1 alert unknown ca": "refused the client certificate",
            "certificate verify failed": "not trusted",
            "wrong version number": "does not speak TLS",
            "unsupported protocol": "TLS 1.2 or newer",
        }
        for reason, expected in cases.items():
            error = SSL.Error([("SSL routines", "", reason)])
            line = describe_tls_failure(self.wrap(error), host="up.example")
            self.assertIn(expected, line)
            self.assertIn("up.example", line)
            self.assertIs(tls_error(self.wrap(error)), error)

    def test_not_tls(self) -> None:
        failure = self.wrap(ConnectionRefusedError("Connection refused"))
        self.assertIsNone(tls_error(failure))
        self.assertTrue(describe_tls_failure(failure).startswith("upstream connection failed: "))
        self.assertEqual(describe_tls_failure(Failure(ResponseNeverReceived([]))),
                         "upstream connection failed")


class WhoAreYou(Resource):
    """Answers 200 with the subject of the client certificate, if any."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        transport: Any = request.channel.transport
        cert = transport.getPeerCertificate()
        if cert is None:
            return b"anonymous"
        return cert.to_cryptography().subject.rfc4514_string().encode()


class PlainHTTP(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]


def server_options(leaf: Leaf, client_ca: CertificateAuthority | None = None,
                   **kw: Any) -> CertificateOptions:
    if client_ca is not None:
        kw["trustRoot"] = Certificate.loadPEM(client_ca.cert_pem())
    return CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(leaf.key),  # type: ignore[arg-type]
        certificate=crypto.X509.from_cryptography(leaf.certificate),
        extraCertChain=[crypto.X509.from_cryptography(c) for c in leaf.chain],
        **kw)


class AgentTests(TestCase):
    """A real Agent against a real TLS server on 127.0.0.1."""

    def serve(self, options: CertificateOptions) -> int:
        port = reactor.listenSSL(0, Site(WhoAreYou()), options,  # type: ignore[attr-defined]
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    async def get(self, policy: IPolicyForHTTPS, url: str) -> tuple[int, bytes]:
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = await Agent(reactor, policy, pool=pool).request(b"GET", url.encode())
        return response.code, await readBody(response)

    async def failure(self, policy: IPolicyForHTTPS, url: str) -> Failure:
        try:
            await self.get(policy, url)
        except Exception:
            return Failure()
        raise AssertionError(f"{url} answered although it should not have")

    def run_(self, coro: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(coro)

    def test_trusted_by_extra_ca(self) -> Deferred[None]:
        authority = ca()
        port = self.serve(server_options(authority.mint(["localhost"], time.time())))

        async def go() -> None:
            code, body = await self.get(upstream_policy(authority.cert_pem()),
                                        f"https://localhost:{port}/")
            self.assertEqual((code, body), (200, b"anonymous"))
        return self.run_(go())

    def test_ip_address_san(self) -> Deferred[None]:
        authority = ca()
        port = self.serve(server_options(authority.mint(["127.0.0.1"], time.time())))

        async def go() -> None:
            code, _ = await self.get(upstream_policy(authority.cert_pem()),
                                     f"https://127.0.0.1:{port}/")
            self.assertEqual(code, 200)
        return self.run_(go())

    def test_untrusted(self) -> Deferred[None]:
        """The server sends its root too: OpenSSL calls that a self-signed chain."""
        authority = ca()
        port = self.serve(server_options(authority.mint(["localhost"], time.time())))

        async def go() -> None:
            f = await self.failure(upstream_policy(ca().cert_pem()), f"https://localhost:{port}/")
            self.assertEqual(
                describe_tls_failure(f),
                "upstream certificate for localhost is not trusted (self-signed certificate "
                "in certificate chain); add its CA with spec.caCertSecretRef")
        return self.run_(go())

    def test_untrusted_leaf_only(self) -> Deferred[None]:
        authority = ca()
        leaf = authority.mint(["localhost"], time.time())
        port = self.serve(server_options(Leaf(leaf.certificate, leaf.key)))

        async def go() -> None:
            f = await self.failure(upstream_policy(None), f"https://localhost:{port}/")
            self.assertIn("is not trusted (unable to get local issuer certificate)",
                          describe_tls_failure(f))
        return self.run_(go())

    def test_wrong_host(self) -> Deferred[None]:
        authority = ca()
        port = self.serve(server_options(authority.mint(["harbor.example.com"], time.time())))

        async def go() -> None:
            policy = upstream_policy(authority.cert_pem())
            f = await self.failure(policy, f"https://localhost:{port}/")
            self.assertEqual(
                describe_tls_failure(f),
                "upstream certificate does not match host localhost (it is for "
                "harbor.example.com); fix spec.address or the upstream's certificate")
            f = await self.failure(policy, f"https://127.0.0.1:{port}/")
            self.assertIn("does not match host 127.0.0.1", describe_tls_failure(f))
        return self.run_(go())

    def test_expired(self) -> Deferred[None]:
        import datetime
        authority = ca()
        leaf = authority.mint(["localhost"], time.time() - 30 * 86400,
                              lifetime=datetime.timedelta(days=1))
        port = self.serve(server_options(leaf))

        async def go() -> None:
            f = await self.failure(upstream_policy(authority.cert_pem()),
                                   f"https://localhost:{port}/")
            self.assertIn("is not valid now (certificate has expired", describe_tls_failure(f))
        return self.run_(go())

    def test_platform_roots(self) -> Deferred[None]:
        """With no extra CA, the platform's roots (here: SSL_CERT_FILE) decide."""
        authority = ca()
        port = self.serve(server_options(authority.mint(["localhost"], time.time())))
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(authority.cert_pem())
        old = os.environ.get("SSL_CERT_FILE")
        os.environ["SSL_CERT_FILE"] = path

        def restore() -> None:
            if old is None:
                del os.environ["SSL_CERT_FILE"]
            else:
                os.environ["SSL_CERT_FILE"] = old
        self.addCleanup(restore)

        async def go() -> None:
            code, _ = await self.get(upstream_policy(None), f"https://localhost:{port}/")
            self.assertEqual(code, 200)
        return self.run_(go())

    def test_client_certificate(self) -> Deferred[None]:
        """A server demanding a client certificate: refused without, served with."""
        authority, client_ca = ca(), ca("clients")
        port = self.serve(server_options(authority.mint(["localhost"], time.time()), client_ca))
        client = client_ca.mint(["tools-bot"], time.time(), client=True)

        async def go() -> None:
            url = f"https://localhost:{port}/"
            f = await self.failure(upstream_policy(authority.cert_pem()), url)
            self.assertIn("upstream localhost requires a client certificate; set "
                          "spec.clientCertSecretRef", describe_tls_failure(f, "localhost"))
            code, body = await self.get(
                upstream_policy(authority.cert_pem(), client.cert_pem(), client.key_pem()), url)
            self.assertEqual((code, body), (200, b"CN=tools-bot"))
            stranger = ca("stranger").mint(["tools-bot"], time.time(), client=True)
            f = await self.failure(
                upstream_policy(authority.cert_pem(), stranger.cert_pem(), stranger.key_pem()), url)
            self.assertIn("refused the client certificate", describe_tls_failure(f, "localhost"))
        return self.run_(go())

    def test_plain_http_port(self) -> Deferred[None]:
        """An upstream answering in plain HTTP (as nginx does on a port without ssl)."""
        factory: Any = ServerFactory.forProtocol(PlainHTTP)
        port: Any = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)

        async def go() -> None:
            f = await self.failure(upstream_policy(None), f"https://localhost:{port.getHost().port}/")
            self.assertIn("does not speak TLS", describe_tls_failure(f, "localhost"))
        return self.run_(go())

    def test_old_tls_only(self) -> Deferred[None]:
        """An upstream stuck at TLS 1.1 is refused, and the message says why."""
        authority = ca()
        options = server_options(authority.mint(["localhost"], time.time()),
                                 insecurelyLowerMinimumTo=TLSVersion.TLSv1_0,
                                 lowerMaximumSecurityTo=TLSVersion.TLSv1_1)
        options._cipherString = "DEFAULT:@SECLEVEL=0"  # let OpenSSL 3 offer TLS 1.1 at all
        port = self.serve(options)

        async def go() -> None:
            f = await self.failure(upstream_policy(authority.cert_pem()),
                                   f"https://localhost:{port}/")
            self.assertIn("TLS 1.2 or newer", describe_tls_failure(f, "localhost"))
        return self.run_(go())
