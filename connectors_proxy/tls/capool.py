# -*- test-case-name: tests.test_custom_ca -*-
"""
Upstream's custom CA certificates (feature flag C{enable-custom-ca-certs} in
C{connectors-config}).  With the flag on, a Connector's upstream ("tool")
certificate is verified against

  1. the platform's roots (as always, L{connectors_proxy.tls.upstream});
  2. the global pool: every Secret of the install namespace labelled
     C{connectors.cpaas.io/ca-cert: "true"} (L{connectors_proxy.model.state.ca_cert_secrets});
  3. the Connector's own C{spec.caCertSecretRef}.

Secrets are read as upstream reads them (L{secret_ca_bundle}): keys
C{*.crt} and C{*.pem}, and any other key whose value is a PEM certificate.
A labelled Secret that holds none is skipped (and logged): one broken
Secret must not stop every Connector.  Without the flag nothing here is
used: the Connector's own Secret is read by
L{connectors_proxy.tls.upstream.load_ca_bundle}, as before.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from attrs import define, field
from cryptography.hazmat.primitives import serialization
from twisted.logger import Logger

from connectors_proxy.model.objects import CA_CERT_LABEL, Secret
from connectors_proxy.tls.upstream import certificates, load_ca_bundle

log = Logger()

_PEM_MARK = b"-----BEGIN CERTIFICATE-----"
# One certificate of a bundle this module built (normalised PEM).
_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----\n.+?\n-----END CERTIFICATE-----\n", re.DOTALL)


def _named_key(key: str) -> bool:
    return key.endswith((".crt", ".pem"))


def secret_ca_bundle(data: Mapping[str, bytes]) -> bytes:
    """
    The certificates of a CA Secret, read as upstream reads it: the keys
    named C{*.crt} or C{*.pem} (C{ca.crt} first, then by name), then every
    other key whose value holds a PEM certificate (by name), as one
    normalised PEM bundle of C{CERTIFICATE} blocks only.

    @raise ValueError: naming the key when one holds a broken certificate,
        or when no key holds any.
    """
    named = {k: v for k, v in data.items() if _named_key(k)}
    others = sorted(k for k, v in data.items() if not _named_key(k) and _PEM_MARK in v)
    if not named and not others:
        raise ValueError("no CA certificate: no key *.crt or *.pem, and no value is a PEM certificate")
    out = [load_ca_bundle(named)] if named else []
    for key in others:
        out.extend(cert.public_bytes(serialization.Encoding.PEM)
                   for cert in certificates(data[key], f"key {key!r}"))
    return b"".join(out)


def merge_bundles(*bundles: bytes | None) -> bytes | None:
    """
    Bundles made by L{secret_ca_bundle} or
    L{connectors_proxy.tls.upstream.load_ca_bundle} as one, each certificate
    once, in order of first appearance; C{None} when there is none.
    """
    blocks: dict[bytes, None] = {}
    for bundle in bundles:
        if bundle:
            blocks.update(dict.fromkeys(_BLOCK.findall(bundle)))
    return b"".join(blocks) or None


def pool_bundle(secrets: Sequence[Secret]) -> tuple[bytes | None, list[str]]:
    """
    The global pool's certificates (L{merge_bundles} of each Secret's
    L{secret_ca_bundle}), and why each Secret left out was left out.
    """
    bundles: list[bytes] = []
    problems: list[str] = []
    for secret in secrets:
        try:
            bundles.append(secret_ca_bundle(secret.data))
        except ValueError as e:
            problems.append(f"CA Secret {secret.ref} (labelled {CA_CERT_LABEL}) is not used: {e}")
    return merge_bundles(*bundles), problems


@define
class GlobalCAPool:
    """
    The global pool as PEM, read again only when its Secrets change: the
    snapshot's L{Secret} objects are compared by identity (a reload or an
    update makes new ones; an unchanged Secret keeps its object), so a
    request pays a few pointer comparisons, not a PEM parse.
    """

    _secrets: tuple[Secret, ...] = field(default=())
    _pem: bytes | None = None

    def bundle(self, secrets: tuple[Secret, ...]) -> bytes | None:
        """The PEM of C{secrets} (C{None}: no certificate among them)."""
        if len(secrets) == len(self._secrets) and all(a is b for a, b in zip(secrets, self._secrets, strict=True)):
            return self._pem
        pem, problems = pool_bundle(secrets)
        for problem in problems:
            log.warn("{problem}", problem=problem)
        self._secrets, self._pem = secrets, pem
        return pem
