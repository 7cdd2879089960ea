# -*- test-case-name: tests.test_tls_mint -*-
"""
Certificates the proxy makes itself: a L{CertificateAuthority} (read from a
CA certificate and key, or generated for development and tests) mints
short-lived leaf certificates for the Connector host names that clients ask
for over SNI, and L{LeafCache} keeps them, bounded, until they are due for
renewal.

Everything here is pure computation over C{cryptography} objects, except that
the current time is always passed in: callers own the clock.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections import OrderedDict
from collections.abc import Callable, Sequence

from attrs import field, frozen
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    PrivateKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LEAF_LIFETIME = datetime.timedelta(days=7)
# Backdating covers clients whose clocks run a little behind ours.
BACKDATE = datetime.timedelta(minutes=5)


def _utc(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC)


def _hash_for(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | None:
    # Ed25519/Ed448 sign without a separate digest.
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return None
    return hashes.SHA256()


def _key_pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key(key_pem: bytes, what: str) -> PrivateKeyTypes:
    """
    The private key in C{key_pem}.  Raise L{ValueError} saying that C{what}
    (C{"CA key"}) is not an unencrypted PEM private key when it is not one.
    """
    try:
        return serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{what} is not an unencrypted PEM private key ({e})") from None


def load_pair(cert_pem: bytes, key_pem: bytes, cert_what: str,
              key_what: str) -> tuple[list[x509.Certificate], PrivateKeyTypes]:
    """
    A certificate chain (leaf first) and its private key, checked to belong
    together.  L{ValueError} naming C{cert_what} or C{key_what} otherwise.
    """
    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as e:
        raise ValueError(f"{cert_what} holds no valid PEM certificate ({e})") from None
    key = load_private_key(key_pem, key_what)
    if key.public_key() != certs[0].public_key():
        raise ValueError(f"{key_what} does not belong to the certificate in {cert_what}")
    return certs, key


def _san_entry(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


@frozen
class Leaf:
    """
    A minted certificate and its private key.

    @ivar certificate: the leaf certificate.
    @ivar key: its private key (kept out of C{repr}).
    @ivar chain: the issuing CA certificate(s) to send after the leaf.
    """

    certificate: x509.Certificate
    key: PrivateKeyTypes = field(repr=False)
    chain: tuple[x509.Certificate, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """The subjectAltName entries (DNS names and IP addresses) as text."""
        try:
            san = self.certificate.extensions.get_extension_for_class(
                x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return ()
        return tuple(str(g.value) for g in san)

    @property
    def not_after(self) -> datetime.datetime:
        return self.certificate.not_valid_after_utc

    @property
    def not_before(self) -> datetime.datetime:
        return self.certificate.not_valid_before_utc

    @property
    def renew_at(self) -> datetime.datetime:
        """When two thirds of the lifetime have passed: time to mint again."""
        return self.not_before + (self.not_after - self.not_before) * 2 / 3

    def cert_pem(self) -> bytes:
        """The leaf then its chain, PEM."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM)
                        for c in (self.certificate, *self.chain))

    def key_pem(self) -> bytes:
        return _key_pem(self.key)


@frozen
class CertificateAuthority:
    """A CA certificate and the key that signs leaves with it."""

    certificate: x509.Certificate
    key: CertificateIssuerPrivateKeyTypes = field(repr=False)

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes) -> CertificateAuthority:
        """
        Load a CA from PEM.  Raise L{ValueError} saying what is wrong when
        the certificate is not a CA or the key does not belong to it.
        """
        try:
            certificate = x509.load_pem_x509_certificate(cert_pem)
        except ValueError as e:
            raise ValueError(f"CA certificate is not a PEM certificate ({e})") from None
        key = load_private_key(key_pem, "CA key")
        if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey,
                                ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
            raise ValueError(  # noqa: TRY004 - a user-facing configuration error
                f"CA key type {type(key).__name__} cannot sign certificates")
        if key.public_key() != certificate.public_key():
            raise ValueError("CA key does not match the CA certificate")
        try:
            constraints = certificate.extensions.get_extension_for_class(
                x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise ValueError("CA certificate is not a CA (basicConstraints CA:TRUE is missing)")
        return cls(certificate, key)

    @classmethod
    def generate(cls, common_name: str, now: float,
                 lifetime: datetime.timedelta = datetime.timedelta(days=3650)
                 ) -> CertificateAuthority:
        """A new self-signed CA (EC P-256), for development and tests."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        start = _utc(now) - BACKDATE
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + lifetime)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(certificate, key)

    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return _key_pem(self.key)

    def mint(self, names: Sequence[str], now: float,
             lifetime: datetime.timedelta = LEAF_LIFETIME,
             client: bool = False, common_name: str | None = None,
             organizations: Sequence[str] = ()) -> Leaf:
        """
        A new leaf certificate with a fresh EC P-256 key for C{names} (DNS
        names or IP addresses, all put in subjectAltName; the first is also
        the subject CN), valid from a little before C{now} (seconds since the
        epoch) for C{lifetime}, never past the CA's own expiry.

        @param client: mint a client certificate (extendedKeyUsage
            clientAuth) instead of a server certificate.
        @param organizations: subject O entries (groups, for client certificates).
        """
        if not names and common_name is None:
            raise ValueError("a certificate needs at least one name")
        key = ec.generate_private_key(ec.SECP256R1())
        start = _utc(now) - BACKDATE
        end = min(start + BACKDATE + lifetime, self.certificate.not_valid_after_utc)
        cn = common_name if common_name is not None else names[0]
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(
                [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
                + [x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.certificate.public_key()), critical=False)  # type: ignore[arg-type]
        )
        if names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_san_entry(n) for n in names]), critical=False)
        certificate = builder.sign(self.key, _hash_for(self.key))
        return Leaf(certificate, key, (self.certificate,))


class LeafCache:
    """
    Minted leaves by name set, at most C{max_entries} of them (least
    recently used goes first), each replaced once it is two thirds through
    its life.

    C{build} turns a fresh L{Leaf} into whatever the caller serves (an
    C{SSL.Context}); the cache keeps that result next to the leaf so a cache
    hit costs a dictionary lookup.
    """

    def __init__(self, ca: CertificateAuthority, seconds: Callable[[], float],
                 build: Callable[[Leaf], object], max_entries: int = 1024,
                 lifetime: datetime.timedelta = LEAF_LIFETIME) -> None:
        self.ca = ca
        self._seconds = seconds
        self._build = build
        self.max_entries = max_entries
        self.lifetime = lifetime
        # names -> (leaf, built, renew at in seconds): the float keeps a hit cheap.
        self._entries: OrderedDict[tuple[str, ...], tuple[Leaf, object, float]] = OrderedDict()
        self.minted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, names: tuple[str, ...]) -> tuple[Leaf, object]:
        """The cached leaf for C{names} and its built form; mint when absent or due."""
        now = self._seconds()
        entry = self._entries.get(names)
        if entry is not None and now < entry[2]:
            self._entries.move_to_end(names)
            return entry[0], entry[1]
        leaf = self.ca.mint(names, now, self.lifetime)
        self.minted += 1
        self._entries[names] = (leaf, self._build(leaf), leaf.renew_at.timestamp())
        self._entries.move_to_end(names)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return leaf, self._entries[names][1]

    def clear(self) -> None:
        """Forget every leaf (the CA changed)."""
        self._entries.clear()
