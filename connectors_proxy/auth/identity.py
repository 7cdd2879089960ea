# -*- test-case-name: tests.test_credentials,tests.test_memory_router -*-
"""
Client identity: where the client's token sits in a request (pure), and the
standalone mode's L{IIdentityVerifier} over a static token file.

Cluster mode's verifier (TokenReview, SubjectAccessReview) lives in
L{connectors_proxy.kube.identity}.
"""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import io
from collections.abc import Mapping
from urllib.parse import unquote

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from connectors_proxy.auth.interfaces import Identity, IIdentityVerifier
from connectors_proxy.model.objects import ObjectRef

PUBLIC_NAMESPACE = "kube-public"


@frozen
class Presented:
    """
    What a client presented: its token, and for the forward-proxy form the
    Connectors it listed in the Proxy-Authorization user name.
    """

    token: str = field(repr=False)
    listed: tuple[ObjectRef, ...] = ()


def _basic(value: bytes) -> tuple[str, str] | None:
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    user, sep, secret = decoded.partition(":")
    return (user, secret) if sep else None


def _listed(user: str) -> tuple[ObjectRef, ...]:
    """
    The Connectors a C{Proxy-Authorization} user part lists: C{NS/NAME},
    comma-separated.  Clients that take the user from a proxy URL (Java's
    C{proxyUser}, Sonar) send it still percent-encoded (C{NS%2FNAME}), so
    it is decoded first; C{%} appears in no namespace or name.
    """
    refs = []
    for item in unquote(user).split(","):
        ns, sep, name = item.strip().partition("/")
        if sep and ns and name:
            refs.append(ObjectRef(ns, name))
    return tuple(refs)


def presented_token(authorization: bytes | None, proxy_authorization: bytes | None) -> Presented | None:
    """
    The token a request carries (README.md, "How a client reaches a Connector"), or C{None}:
    C{Proxy-Authorization: Basic base64(NS/NAME[,...]:TOKEN)},
    C{Authorization: Bearer TOKEN}, C{Authorization: Basic base64(ANY:TOKEN)}.
    """
    if proxy_authorization:
        scheme, _, value = proxy_authorization.strip().partition(b" ")
        if scheme.lower() == b"basic":
            pair = _basic(value)
            if pair and pair[1]:
                return Presented(pair[1], _listed(pair[0]))
    if authorization:
        scheme, _, value = authorization.strip().partition(b" ")
        scheme = scheme.lower()
        if scheme == b"bearer" and value.strip():
            try:
                return Presented(value.strip().decode("ascii"))
            except UnicodeDecodeError:
                return None
        if scheme == b"basic":
            pair = _basic(value)
            if pair and pair[1]:
                return Presented(pair[1])
    return None


def namespace_rule(identity: Identity, namespace: str) -> bool:
    """
    Standalone authorization: a ServiceAccount may use Connectors in its own
    namespace and in C{kube-public}.
    """
    sa = identity.service_account
    return sa is not None and namespace in (sa[0], PUBLIC_NAMESPACE)


class InvalidTokenFile(ValueError):
    pass


def token_digest(token: str) -> bytes:
    """How tokens are kept (standalone table, review cache keys): hashed, so no repr or dump shows one."""
    return hashlib.sha256(token.encode("utf-8")).digest()


def parse_token_file(text: str, source: str = "tokens") -> Mapping[bytes, Identity]:
    """
    Parse kube-apiserver's static token file format: CSV lines
    C{token,user,uid,"group1,group2"}; blank lines and C{#} comments ignored.
    """
    table: dict[bytes, Identity] = {}
    for lineno, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise InvalidTokenFile(f"{source}:{lineno}: expected token,user[,uid[,\"groups\"]]")
        groups = tuple(g.strip() for g in row[3].split(",") if g.strip()) if len(row) > 3 else ()
        table[token_digest(row[0].strip())] = Identity(row[1].strip(), row[2].strip() if len(row) > 2 else "", groups)
    return table


@implementer(IIdentityVerifier)
@define
class StaticTokens:
    """
    Standalone mode's verifier: a token file and the namespace rule.
    C{table} is replaced whole when the file is reloaded.
    """

    table: Mapping[bytes, Identity] = field(repr=False)

    def authenticate(self, token: str) -> Deferred[Identity | None]:
        # Keys are SHA-256 digests, so a dict lookup leaks nothing useful
        # about the token through timing.
        return succeed(self.table.get(token_digest(token)))

    def authorize(self, identity: Identity, namespace: str, name: str) -> Deferred[bool]:
        return succeed(namespace_rule(identity, namespace))
