"""
Tests for L{connectors_proxy.tls.mint}: the CA, minted leaves, the cache.
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from connectors_proxy.tls.mint import CertificateAuthority, Leaf, LeafCache

NOW = 1_750_000_000.0


def rsa_ca() -> CertificateAuthority:
    """A CA the way openssl/cert-manager would make one: RSA, SHA-256."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa root")])
    start = datetime.datetime.fromtimestamp(NOW, datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return CertificateAuthority.from_pem(
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption()))


class CertificateAuthorityTests(SynchronousTestCase):
    def test_mint_names_and_lifetime(self) -> None:
        ca = CertificateAuthority.generate("test", NOW)
        leaf = ca.mint(["c-a.ns1.svc.cluster.local", "c-a.ns1.svc", "c-a.ns1", "127.0.0.1"], NOW)
        self.assertEqual(leaf.names, ("c-a.ns1.svc.cluster.local", "c-a.ns1.svc", "c-a.ns1",
                                      "127.0.0.1"))
        san = leaf.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual([str(ip) for ip in san.get_values_for_type(x509.IPAddress)], ["127.0.0.1"])
        self.assertEqual(leaf.not_after - leaf.not_before, datetime.timedelta(days=7, minutes=5))
        self.assertEqual(leaf.renew_at - leaf.not_before,
                         (leaf.not_after - leaf.not_before) * 2 / 3)
        self.assertEqual(leaf.certificate.issuer, ca.certificate.subject)
        # Really signed by the CA.
        leaf.certificate.verify_directly_issued_by(ca.certificate)
        eku = leaf.certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(eku), [ExtendedKeyUsageOID.SERVER_AUTH])

    def test_never_outlives_ca(self) -> None:
        ca = rsa_ca()
        leaf = ca.mint(["x"], NOW + 29 * 86400)
        self.assertEqual(leaf.not_after, ca.certificate.not_valid_after_utc)

    def test_rsa_ca_signs(self) -> None:
        ca = rsa_ca()
        leaf = ca.mint(["x.example"], NOW)
        public = ca.certificate.public_key()
        assert isinstance(public, rsa.RSAPublicKey)
        assert leaf.certificate.signature_hash_algorithm is not None
        public.verify(leaf.certificate.signature, leaf.certificate.tbs_certificate_bytes,
                      padding.PKCS1v15(), leaf.certificate.signature_hash_algorithm)

    def test_pem_round_trip(self) -> None:
        ca = CertificateAuthority.generate("test", NOW)
        again = CertificateAuthority.from_pem(ca.cert_pem(), ca.key_pem())
        self.assertEqual(again.certificate, ca.certificate)
        leaf = ca.mint(["a"], NOW)
        self.assertEqual(x509.load_pem_x509_certificates(leaf.cert_pem()),
                         [leaf.certificate, ca.certificate])
        self.assertNotIn("key=", repr(leaf))
        self.assertNotIn("key=", repr(ca))

    def test_from_pem_refuses(self) -> None:
        ca, other = CertificateAuthority.generate("a", NOW), CertificateAuthority.generate("b", NOW)
        leaf = ca.mint(["a"], NOW)
        e = self.assertRaises(ValueError, CertificateAuthority.from_pem, ca.cert_pem(), other.key_pem())
        self.assertIn("does not match", str(e))
        e = self.assertRaises(ValueError, CertificateAuthority.from_pem, leaf.cert_pem(), leaf.key_pem())
        self.assertIn("not a CA", str(e))
        e = self.assertRaises(ValueError, CertificateAuthority.from_pem, b"junk", ca.key_pem())
        self.assertIn("not a PEM certificate", str(e))
        e = self.assertRaises(ValueError, CertificateAuthority.from_pem, ca.cert_pem(), b"junk")
        self.assertIn("not an unencrypted PEM private key", str(e))

    def test_client_certificate(self) -> None:
        ca = CertificateAuthority.generate("clients", NOW)
        leaf = ca.mint([], NOW, client=True, common_name="alice")
        eku = leaf.certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(eku), [ExtendedKeyUsageOID.CLIENT_AUTH])
        self.assertEqual(leaf.names, ())
        self.assertIsInstance(leaf.key, ec.EllipticCurvePrivateKey)


class LeafCacheTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.built: list[tuple[str, ...]] = []
        self.cache = LeafCache(CertificateAuthority.generate("t", NOW), self.clock.seconds,
                               self.build, max_entries=3)

    def build(self, leaf: Leaf) -> tuple[str, ...]:
        self.built.append(leaf.names)
        return leaf.names

    def test_hit(self) -> None:
        leaf, built = self.cache.get(("a",))
        again, built_again = self.cache.get(("a",))
        self.assertIs(again, leaf)
        self.assertIs(built_again, built)
        self.assertEqual((self.cache.minted, self.built), (1, [("a",)]))

    def test_renewed_after_two_thirds(self) -> None:
        leaf, _ = self.cache.get(("a",))
        lifetime = (leaf.not_after - leaf.not_before).total_seconds()
        # Backdated by five minutes: renewal is due 2/3 into the life, counted from not_before.
        self.clock.advance(lifetime * 2 / 3 - 300 - 10)
        self.assertIs(self.cache.get(("a",))[0], leaf)
        self.clock.advance(20)
        renewed, _ = self.cache.get(("a",))
        self.assertIsNot(renewed, leaf)
        self.assertEqual(self.cache.minted, 2)
        self.assertGreater(renewed.not_after, leaf.not_after)

    def test_bounded_lru(self) -> None:
        for name in "abc":
            self.cache.get((name,))
        self.cache.get(("a",))  # a is now the most recently used
        self.cache.get(("d",))  # evicts b
        self.assertEqual(len(self.cache), 3)
        minted = self.cache.minted
        self.cache.get(("a",))
        self.assertEqual(self.cache.minted, minted)
        self.cache.get(("b",))
        self.assertEqual(self.cache.minted, minted + 1)

    def test_clear(self) -> None:
        self.cache.get(("a",))
        self.cache.clear()
        self.assertEqual(len(self.cache), 0)
