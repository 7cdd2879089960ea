# -*- test-case-name: tests.test_tls -*-
"""
TLS towards upstreams: which certificates the proxy trusts when it talks
to a Connector's C{https://} address, which client certificate it shows,
and how a failed handshake is explained to the user.

The trust is the platform's roots (what C{twisted.internet.ssl.platformTrust}
uses: OpenSSL's default paths, C{SSL_CERT_FILE}/C{SSL_CERT_DIR}) plus the
Connector's own CA bundle (C{spec.caCertSecretRef}).  The host name is
checked with C{service_identity}, IP addresses against subjectAltName IP
entries.  TLS 1.2 is the floor.

A verification failure surfaces from C{twisted.web.client.Agent} wrapped in
C{ResponseNeverReceived} and friends; L{describe_tls_failure} digs it out
and names the fix.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping

from attrs import define, field
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from OpenSSL import SSL, crypto
from service_identity import VerificationError
from service_identity.hazmat import (
    DNS_ID,
    IPAddress_ID,
    ServiceID,
    verify_service_identity,
)
from service_identity.pyopenssl import extract_patterns
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.python.failure import Failure
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from connectors_proxy.tls.mint import load_pair

_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL)

# The keys of a CA Secret that carry certificates (docs/tls.md, "Upstream TLS").
CA_KEYS = "ca.crt, *.crt, *.pem"
_SHA256 = hashes.SHA256()


# -- CA bundles and client certificates out of Secrets ---------------------------------


def certificates(pem: bytes, what: str) -> list[x509.Certificate]:
    """The PEM certificates in C{pem}; L{ValueError} naming C{what} when there are none or one is broken."""
    blocks = _PEM_CERT.findall(pem)
    if not blocks:
        raise ValueError(f"{what} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    certs = []
    for i, block in enumerate(blocks):
        try:
            certs.append(x509.load_pem_x509_certificate(block))
        except ValueError as e:
            raise ValueError(f"{what}: certificate #{i + 1} is not valid PEM ({e})") from None
    return certs


def _is_ca_key(key: str) -> bool:
    return key == "ca.crt" or key.endswith((".crt", ".pem"))


def load_ca_bundle(secret_data: Mapping[str, bytes]) -> bytes:
    """
    The certificates of a CA Secret's C{ca.crt}, C{*.crt} and C{*.pem} keys
    (C{ca.crt} first, then the others by name) as one PEM bundle.

    Only the C{CERTIFICATE} blocks are kept, so a private key that sits in a
    C{.pem} next to a certificate never joins a trust store.  Raise
    L{ValueError} naming the key when a key holds no valid certificate, or
    when the Secret has none of those keys.
    """
    keys = sorted((k for k in secret_data if _is_ca_key(k)), key=lambda k: (k != "ca.crt", k))
    if not keys:
        raise ValueError(f"no CA certificate: the Secret needs a key {CA_KEYS}")
    out = []
    for key in keys:
        for cert in certificates(secret_data[key], f"key {key!r}"):
            out.append(cert.public_bytes(serialization.Encoding.PEM))
    return b"".join(out)


def load_client_certificate(secret_data: Mapping[str, bytes]) -> tuple[bytes, bytes]:
    """
    The C{(tls.crt, tls.key)} of a C{kubernetes.io/tls} Secret, checked:
    L{ValueError} naming the key when one is missing or invalid, or when
    the key does not belong to the certificate.
    """
    for key in ("tls.crt", "tls.key"):
        if not secret_data.get(key):
            raise ValueError(f"key {key!r} is missing (a kubernetes.io/tls Secret needs tls.crt and tls.key)")
    cert_pem, key_pem = secret_data["tls.crt"], secret_data["tls.key"]
    _client_pair(cert_pem, key_pem)
    return cert_pem, key_pem


def _client_pair(cert_pem: bytes, key_pem: bytes) -> tuple[list[x509.Certificate], crypto.PKey]:
    certs, key = load_pair(cert_pem, key_pem, "key 'tls.crt'", "key 'tls.key'")
    return certs, crypto.PKey.from_cryptography_key(key)  # type: ignore[arg-type]


# -- the policy --------------------------------------------------------------------------


class UpstreamCertificateError(Exception):
    """
    OpenSSL could not verify the upstream's certificate chain.

    @ivar host: the host name or IP address the proxy connected to.
    @ivar code: the OpenSSL X509 verify error code.
    @ivar reason: OpenSSL's words for it.
    @ivar depth: where in the chain (0 is the upstream's own certificate).
    @ivar subject: the subject of the certificate at that depth.
    """

    def __init__(self, host: str, code: int, depth: int, subject: str) -> None:
        self.host = host
        self.code = code
        self.reason = VERIFY_ERRORS.get(code, f"X509 verify error {code}")
        self.depth = depth
        self.subject = subject
        super().__init__(f"{host}: {self.reason} (depth {depth}, subject {subject})")


class UpstreamHostMismatch(Exception):
    """The upstream's certificate is valid but names other hosts."""

    def __init__(self, host: str, names: tuple[str, ...]) -> None:
        self.host = host
        self.names = names
        super().__init__(f"certificate for {', '.join(names) or '(no names)'} does not match {host}")


# X509_V_ERR_* codes of OpenSSL 3 (x509_vfy.h) that an upstream can cause; OpenSSL
# has no stable Python binding for X509_verify_cert_error_string.
VERIFY_ERRORS = {
    2: "unable to get issuer certificate",
    4: "unable to decrypt certificate's signature",
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    13: "format error in certificate's notBefore field",
    14: "format error in certificate's notAfter field",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    22: "certificate chain too long",
    23: "certificate revoked",
    24: "invalid CA certificate",
    25: "path length constraint exceeded",
    26: "unsupported certificate purpose",
    27: "certificate not trusted",
    28: "certificate rejected",
    47: "permitted subtree violation",
    48: "excluded subtree violation",
    62: "hostname mismatch",
    64: "IP address mismatch",
    68: "CA certificate key too weak",
    69: "EE certificate key too weak",
    70: "CA signature digest algorithm too weak",
}
_EXPIRY_CODES = {9, 10}


def _subject(cert: crypto.X509) -> str:
    try:
        return cert.to_cryptography().subject.rfc4514_string()
    except ValueError:
        return "?"


@implementer(IOpenSSLClientConnectionCreator)
class _UpstreamConnectionCreator:
    """Makes the OpenSSL connection for one upstream host: SNI, then verification."""

    def __init__(self, context: SSL.Context, host: str) -> None:
        self._context = context
        self.host = host
        self._is_dns = not (isIPAddress(host) or isIPv6Address(host))
        self._service_id: ServiceID = DNS_ID(host) if self._is_dns else IPAddress_ID(host)

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        if self._is_dns:
            # SNI carries names only; an IP literal is never sent (RFC 6066).
            connection.set_tlsext_host_name(self.host.encode("idna"))
        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
                              self._verifier(tlsProtocol))
        return connection

    def _verifier(self, protocol: object) -> Callable[[SSL.Connection, crypto.X509, int, int, int], bool]:
        host, service_id = self.host, self._service_id
        # Dropped once verification is decided, so the OpenSSL connection does
        # not keep the protocol alive in a cycle through this closure.
        holder: list[object] = [protocol]

        def fail(reason: Exception) -> None:
            if holder:
                # failVerification makes this the reason the connection is lost,
                # instead of OpenSSL's bare "certificate verify failed".
                holder.pop().failVerification(  # type: ignore[attr-defined]
                    Failure(reason))  # type: ignore[no-untyped-call]

        def verify(conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
            try:
                if not ok:
                    fail(UpstreamCertificateError(host, errno, depth, _subject(cert)))
                    return False
                if depth != 0:
                    return True
                try:
                    verify_service_identity(extract_patterns(cert), [service_id], [])
                except VerificationError:
                    fail(UpstreamHostMismatch(host, _names(cert)))
                    return False
                holder.clear()
                return True
            except BaseException:  # noqa: BLE001
                # An exception escaping an OpenSSL callback is lost; refuse instead.
                holder.clear()
                return False

        return verify


def _names(cert: crypto.X509) -> tuple[str, ...]:
    c = cert.to_cryptography()
    try:
        san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(str(g.value) for g in san
                      if isinstance(g, (x509.DNSName, x509.IPAddress)))
    except x509.ExtensionNotFound:
        names = ()
    if not names:
        names = tuple(str(a.value) for a in c.subject.get_attributes_for_oid(
            x509.oid.NameOID.COMMON_NAME))
    return names


@implementer(IPolicyForHTTPS)
@define(eq=False)
class UpstreamPolicy:
    """
    An C{IPolicyForHTTPS} for C{twisted.web.client.Agent}: platform roots
    plus C{extra_ca}, TLS 1.2+, and a client certificate when given.

    @ivar key: a digest of the configuration.  Two policies with the same
        key behave the same; connections made under different keys must not
        be pooled together (a client certificate is an identity).
    """

    extra_ca: tuple[x509.Certificate, ...]
    client_chain: tuple[x509.Certificate, ...] = field(repr=False)
    client_key: crypto.PKey | None = field(repr=False)
    key: str
    max_hosts: int = 64
    _context: SSL.Context | None = field(default=None, init=False, repr=False)
    _creators: OrderedDict[tuple[str, int], _UpstreamConnectionCreator] = field(
        factory=OrderedDict, init=False, repr=False)

    def context(self) -> SSL.Context:
        """The OpenSSL context, built on first use and shared by every connection."""
        if self._context is None:
            ctx = SSL.Context(SSL.TLS_METHOD)
            ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
            ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
            ctx.set_default_verify_paths()
            store = ctx.get_cert_store()
            assert store is not None
            for cert in self.extra_ca:
                store.add_cert(crypto.X509.from_cryptography(cert))
            if self.client_key is not None:
                ctx.use_certificate(crypto.X509.from_cryptography(self.client_chain[0]))
                ctx.use_privatekey(self.client_key)
                for extra in self.client_chain[1:]:
                    ctx.add_extra_chain_cert(crypto.X509.from_cryptography(extra))
                ctx.check_privatekey()
            self._context = ctx
        return self._context

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        host = hostname.decode("ascii") if isinstance(hostname, bytes) else hostname
        # Agent passes an IPv6 literal with its brackets stripped already.
        creator = self._creators.get((host, port))
        if creator is None:
            creator = _UpstreamConnectionCreator(self.context(), host)
            self._creators[host, port] = creator
            while len(self._creators) > self.max_hosts:
                self._creators.popitem(last=False)
        return creator


def upstream_policy(extra_ca_pem: bytes | None, client_cert_pem: bytes | None = None,
                    client_key_pem: bytes | None = None) -> UpstreamPolicy:
    """
    The policy for an upstream that trusts the platform roots plus
    C{extra_ca_pem} (one or more PEM certificates) and presents the client
    certificate C{client_cert_pem} (leaf first, then any intermediates) with
    C{client_key_pem} when both are given.

    Raise L{ValueError} when a PEM is invalid or the key does not match the
    certificate; nothing is loaded from the platform until the first
    connection.
    """
    extra = tuple(certificates(extra_ca_pem, "CA bundle")) if extra_ca_pem else ()
    if (client_cert_pem is None) != (client_key_pem is None):
        raise ValueError("a client certificate needs both the certificate and its key")
    chain: tuple[x509.Certificate, ...] = ()
    pkey = None
    digest = hashlib.sha256()
    for cert in extra:
        digest.update(b"ca:" + cert.fingerprint(_SHA256))
    if client_cert_pem is not None and client_key_pem is not None:
        certs, pkey = _client_pair(client_cert_pem, client_key_pem)
        chain = tuple(certs)
        digest.update(b"client:" + b"".join(c.fingerprint(_SHA256) for c in chain))
    return UpstreamPolicy(extra, chain, pkey, digest.hexdigest())


# -- explaining failures -----------------------------------------------------------------


def _leaves(failure: Failure | BaseException) -> list[BaseException]:
    """The innermost exceptions of a (possibly nested) Agent failure."""
    value = failure.value if isinstance(failure, Failure) else failure
    reasons = getattr(value, "reasons", None)
    if isinstance(reasons, list):
        out: list[BaseException] = []
        for reason in reasons:
            out.extend(_leaves(reason))
        return out
    return [value] if value is not None else []


def _ssl_reasons(error: SSL.Error) -> list[str]:
    out = []
    for arg in error.args:
        if isinstance(arg, list):
            for item in arg:
                if isinstance(item, tuple) and item:
                    out.append(str(item[-1]))
        else:
            out.append(str(arg))
    return out


def _describe_one(error: BaseException, host: str) -> str | None:
    if isinstance(error, UpstreamCertificateError):
        if error.code in _EXPIRY_CODES:
            return (f"upstream certificate for {error.host} is not valid now ({error.reason}: "
                    f"{error.subject})")
        return (f"upstream certificate for {error.host} is not trusted ({error.reason}); "
                f"add its CA with spec.caCertSecretRef")
    if isinstance(error, UpstreamHostMismatch):
        names = ", ".join(error.names) or "no names"
        return (f"upstream certificate does not match host {error.host} (it is for {names}); "
                f"fix spec.address or the upstream's certificate")
    if isinstance(error, VerificationError):
        return f"upstream certificate does not match host {host}"
    if isinstance(error, SSL.Error):
        reasons = " ".join(_ssl_reasons(error))
        if "certificate required" in reasons:
            return (f"upstream {host} requires a client certificate; "
                    f"set spec.clientCertSecretRef to a kubernetes.io/tls Secret")
        if "unknown ca" in reasons or "bad certificate" in reasons or "certificate unknown" in reasons \
                or "access denied" in reasons:
            return (f"upstream {host} refused the client certificate ({reasons}); "
                    f"check spec.clientCertSecretRef")
        if "certificate verify failed" in reasons:
            return (f"upstream certificate for {host} is not trusted; "
                    f"add its CA with spec.caCertSecretRef")
        if "wrong version number" in reasons or "packet length too long" in reasons \
                or "record layer failure" in reasons:
            return (f"upstream {host} does not speak TLS on that port; "
                    f"check the scheme of spec.address (http:// or https://)")
        if "unsupported protocol" in reasons or "no protocols available" in reasons \
                or "protocol version" in reasons:
            return f"upstream {host} offers no TLS version the proxy accepts (TLS 1.2 or newer)"
        if "handshake failure" in reasons:
            return (f"upstream {host} ended the TLS handshake ({reasons}); it may require a "
                    f"client certificate (spec.clientCertSecretRef) or ciphers the proxy refuses")
        return f"TLS handshake with upstream {host} failed ({reasons or 'no detail'})"
    return None


def tls_error(failure: Failure | BaseException) -> BaseException | None:
    """The TLS exception inside an Agent failure, or C{None} when it is not about TLS."""
    for error in _leaves(failure):
        if isinstance(error, (UpstreamCertificateError, UpstreamHostMismatch,
                              VerificationError, SSL.Error)):
            return error
    return None


def describe_tls_failure(failure: Failure | BaseException, host: str | None = None) -> str:
    """
    One line for the user explaining why a request to an upstream failed,
    naming the fix when it is a TLS problem (untrusted CA, name mismatch,
    expired certificate, client certificate demanded or refused, plain HTTP
    on a TLS port).  Any other failure gives C{"upstream connection failed:
    ..."} with the exception's own message.  Never includes key material.

    @param host: the upstream host, for errors that do not carry it.
    """
    host = host or "the upstream"
    leaves = _leaves(failure)
    for error in leaves:
        line = _describe_one(error, host)
        if line is not None:
            return line
    if not leaves:
        return "upstream connection failed"
    detail = str(leaves[0]) or type(leaves[0]).__name__
    return f"upstream connection failed: {detail}"
