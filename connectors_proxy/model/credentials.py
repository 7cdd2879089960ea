# -*- test-case-name: tests.test_credentials -*-
"""
Where credentials are injected: a Connector's Secret turned into the
credentials the upstream gets.  Pure functions.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Union
from urllib.parse import quote, unquote_plus, urlsplit

from attrs import field, frozen

from connectors_proxy.model.objects import (
    SECRET_BASIC,
    SECRET_BEARER,
    SECRET_DOCKERCONFIG,
    SECRET_REGISTRY,
    Connector,
    ConnectorClass,
    Secret,
)
from connectors_proxy.model.state import Snapshot


@frozen
class BasicCredentials:
    username: str
    password: str = field(repr=False)

    def authorization(self) -> bytes:
        pair = f"{self.username}:{self.password}".encode()
        return b"Basic " + base64.b64encode(pair)

    def secret_values(self) -> tuple[bytes, ...]:
        """
        What an upstream could reflect of these credentials: the password,
        the C{user:password} pair and the injected header value (the forms
        they may be quoted in are L{connectors_proxy.upstream.reflection}'s).
        """
        return (self.password.encode(), f"{self.username}:{self.password}".encode(), self.authorization())


@frozen
class BearerCredentials:
    """
    A token.  C{identity} marks a registry identity token (a docker
    config's C{identitytoken}): an OAuth2 refresh token that registries
    exchange for access tokens, never sent as a password.
    """

    token: str = field(repr=False)
    identity: bool = False

    def authorization(self) -> bytes:
        return b"Bearer " + self.token.encode("utf-8")

    def secret_values(self) -> tuple[bytes, ...]:
        """What an upstream could reflect: the token and the injected header value."""
        return (self.token.encode("utf-8"), self.authorization())


POSITIONS = ("header", "query", "body")


@frozen
class Placement:
    """
    What a class's Rego generator answered for one request
    (C{{"position", "contentType", "auth"}}, UPSTREAM-COMPAT section 4):
    each pair becomes a header, a query parameter or a JSON body field,
    replacing whatever the client sent under that name.

    @ivar pairs: C{(name, value)}; a value is text for a header or query
        parameter, and JSON text (any JSON value) for a body field.
    """

    position: str
    pairs: tuple[tuple[str, str], ...] = field(repr=False)
    content_type: str | None = None


@frozen
class RegoCredentials:
    """
    A Connector's Secret whose injection a class's Rego C{generator}
    decides (L{connectors_proxy.auth.rego}).  Resolved without evaluating
    anything (L{resolve}); the request path evaluates the generator and
    puts the answer in C{placement} before the request goes upstream.
    Until then nothing is injected.

    @ivar data: the Secret's data, decoded (the generator's C{input.data}).
    """

    class_name: str
    auth_name: str
    generator: str = field(repr=False)
    data: tuple[tuple[str, str], ...] = field(repr=False)
    placement: Placement | None = field(default=None, repr=False)

    def _placed(self, position: str) -> tuple[tuple[str, str], ...]:
        placement = self.placement
        return placement.pairs if placement is not None and placement.position == position else ()

    @property
    def header_pairs(self) -> tuple[tuple[bytes, bytes], ...]:
        """The headers to set upstream (names and values checked when placed)."""
        return tuple((k.encode("latin-1"), v.encode("utf-8")) for k, v in self._placed("header"))

    @property
    def query_pairs(self) -> tuple[tuple[str, str], ...]:
        """The query parameters to set upstream."""
        return self._placed("query")

    def secret_values(self) -> tuple[bytes, ...]:
        """
        Every value of the Secret and every value placed: whatever the
        generator made of the Secret (a header, a signature) is as secret
        as the Secret itself.
        """
        values = [v.encode("utf-8") for _, v in self.data if v]
        if self.placement is not None:
            for _, value in self.placement.pairs:
                values.append(value.encode("utf-8"))
                if self.placement.position == "body" and value.startswith('"'):
                    # A body field's JSON text: the string itself too.
                    try:
                        decoded = json.loads(value)
                    except ValueError:
                        continue
                    if isinstance(decoded, str):
                        values.append(decoded.encode("utf-8"))
        return tuple(v for v in dict.fromkeys(values) if v)


def with_query(url: bytes, pairs: tuple[tuple[str, str], ...]) -> bytes:
    """
    C{url} with each of C{pairs} set as a query parameter: the client's
    parameters of those names (however percent-encoded) removed, the
    others kept as they were.
    """
    if not pairs:
        return url
    base, sep, query = url.partition(b"?")
    fragment = b""
    if b"#" in query:
        query, _, fragment = query.partition(b"#")
        fragment = b"#" + fragment
    names = {name for name, _ in pairs}
    kept = [item for item in query.split(b"&") if item and
            unquote_plus(item.split(b"=", 1)[0].decode("latin-1"), encoding="latin-1") not in names]
    kept += [f"{quote(name, safe='')}={quote(value, safe='')}".encode("ascii") for name, value in pairs]
    return base + b"?" + b"&".join(kept) + fragment


Credentials = Union[BasicCredentials, BearerCredentials, RegoCredentials]


class CredentialsUnavailable(Exception):
    """
    The Connector needs a Secret that is missing or unusable.

    @ivar reason: a condition reason (C{SecretNotFound}, C{InvalidSecret}).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _text(secret: Secret, key: str) -> str:
    try:
        return secret.data[key].decode("utf-8")
    except KeyError:
        raise CredentialsUnavailable(
            "InvalidSecret", f"Secret {secret.ref} (type {secret.type}) has no key {key!r}"
        ) from None
    except UnicodeDecodeError:
        raise CredentialsUnavailable("InvalidSecret", f"Secret {secret.ref} key {key!r} is not UTF-8") from None


def _docker_host(key: str) -> str:
    """The registry host of a config.json C{auths} key (C{https://h/v1/}, C{h:5000}, C{h})."""
    if "://" not in key:
        key = "//" + key
    parts = urlsplit(key)
    return (parts.netloc or parts.path).lower()


def from_dockerconfig(secret: Secret, address: str) -> Credentials:
    """The C{auths} entry of a dockerconfigjson Secret whose host matches C{address}."""
    try:
        config = json.loads(secret.data[".dockerconfigjson"])
        auths = config["auths"]
        if not isinstance(auths, dict):
            raise TypeError
    except (KeyError, ValueError, TypeError):
        raise CredentialsUnavailable(
            "InvalidSecret", f"Secret {secret.ref}: .dockerconfigjson has no 'auths' mapping"
        ) from None
    target = urlsplit(address)
    hosts = {target.netloc.lower(), (target.hostname or "").lower()}
    for key, entry in auths.items():
        if _docker_host(key) not in hosts or not isinstance(entry, dict):
            continue
        if entry.get("username") and entry.get("password"):
            return BasicCredentials(str(entry["username"]), str(entry["password"]))
        if entry.get("auth"):
            try:
                user, _, password = base64.b64decode(entry["auth"]).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError, ValueError):
                break
            return BasicCredentials(user, password)
        if entry.get("identitytoken"):
            return BearerCredentials(str(entry["identitytoken"]), identity=True)
    raise CredentialsUnavailable(
        "InvalidSecret", f"Secret {secret.ref}: .dockerconfigjson has no usable entry for {target.netloc}"
    )


# Credentials per (Secret object, address): a Secret object is one version
# of it (a change makes a new one), so its credentials are read once, not
# on every request.  Bounded, since Secrets come and go.
_PARSED: dict[tuple[int, str], tuple[Secret, Credentials]] = {}
_MAX_PARSED = 4096


def from_secret(secret: Secret, address: str) -> Credentials:
    """Credentials of one Secret, by its type (README.md, "How a client reaches a Connector")."""
    key = (id(secret), address)
    known = _PARSED.get(key)
    if known is not None and known[0] is secret:
        return known[1]
    credentials = _from_secret(secret, address)
    if len(_PARSED) >= _MAX_PARSED:
        _PARSED.clear()
    _PARSED[key] = (secret, credentials)
    return credentials


def _from_secret(secret: Secret, address: str) -> Credentials:
    if secret.type in (SECRET_BASIC, SECRET_REGISTRY):
        return BasicCredentials(_text(secret, "username"), _text(secret, "password"))
    if secret.type == SECRET_BEARER:
        return BearerCredentials(_text(secret, "token"))
    if secret.type == SECRET_DOCKERCONFIG:
        return from_dockerconfig(secret, address)
    # Opaque and other types (e.g. a PAT Secret): the keys say what it is.
    if "token" in secret.data:
        return BearerCredentials(_text(secret, "token"))
    if "username" in secret.data and "password" in secret.data:
        return BasicCredentials(_text(secret, "username"), _text(secret, "password"))
    raise CredentialsUnavailable(
        "InvalidSecret",
        f"Secret {secret.ref} of type {secret.type} has neither 'token' nor 'username'/'password'",
    )


def resolve(connector: Connector, connector_class: ConnectorClass | None,
            snapshot: Snapshot) -> Credentials | None:
    """
    The credentials to inject for C{connector}, C{None} for an anonymous
    upstream; L{CredentialsUnavailable} when a required Secret is missing.
    """
    if connector.secret_ref is None:
        return None
    secret = snapshot.secret(connector.secret_ref)
    if secret is None:
        auth = connector_class.auth_type(connector.auth_name) if connector_class else None
        if auth is not None and auth.optional:
            return None
        raise CredentialsUnavailable(
            "SecretNotFound",
            f"Secret {connector.secret_ref} of Connector {connector.ref} was not found",
        )
    if connector_class is not None and connector_class.has_generators and connector_class.protocol != "oci":
        # A registry's credentials go through its token dance: generators
        # are for the REST and Git protocols.
        auth = connector_class.auth_type(connector.auth_name)
        if auth is not None and auth.generator is not None:
            return RegoCredentials(connector_class.name, auth.name, auth.generator, decoded_data(secret))
    return from_secret(secret, connector.address)


def decoded_data(secret: Secret) -> tuple[tuple[str, str], ...]:
    """A Secret's data as text, sorted by key (a generator's C{input.data})."""
    return tuple(sorted((k, v.decode("utf-8", "replace")) for k, v in secret.data.items()))
