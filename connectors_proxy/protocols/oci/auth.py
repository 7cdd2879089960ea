# -*- test-case-name: tests.test_oci_auth -*-
"""
How the proxy authenticates to a registry, as pure functions:

 - reading C{WWW-Authenticate} challenges (RFC 7235, as registries send them);
 - what the Connector's credentials (from its Secret) are worth to a registry;
 - building the request to a token realm and reading its answer.

Nothing here does I/O; L{connectors_proxy.protocols.oci.resource} drives it.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlsplit

from attrs import field, frozen

from connectors_proxy.model.credentials import BasicCredentials, Credentials, RegoCredentials

# -- challenges ---------------------------------------------------------------


@frozen
class Challenge:
    """One challenge of a C{WWW-Authenticate} header; C{scheme} is lower-case."""

    scheme: str
    params: Mapping[str, str] = field(factory=dict)
    token68: str | None = None

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")

    @property
    def service(self) -> str | None:
        return self.params.get("service")

    @property
    def scopes(self) -> tuple[str, ...]:
        """The scopes a C{Bearer} challenge asks for (space-separated in one parameter)."""
        return tuple(s for s in self.params.get("scope", "").split(" ") if s)

    @property
    def error(self) -> str | None:
        return self.params.get("error")


_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_TOKEN68 = _TCHAR | frozenset("/=")


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t":
            self.pos += 1

    def skip_commas(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t,":
            self.pos += 1

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def token(self, chars: frozenset[str] = _TCHAR) -> str:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in chars:
            self.pos += 1
        return self.text[start:self.pos]

    def quoted(self) -> str | None:
        """A quoted-string at the current position (after its opening quote)."""
        out = []
        while self.pos < len(self.text):
            c = self.text[self.pos]
            self.pos += 1
            if c == "\\" and self.pos < len(self.text):
                out.append(self.text[self.pos])
                self.pos += 1
            elif c == '"':
                return "".join(out)
            else:
                out.append(c)
        return None  # unterminated

    def at_param(self) -> bool:
        """Whether C{token BWS "="} (an auth-param, not a new scheme) starts here."""
        save = self.pos
        name = self.token()
        self.skip_space()
        is_param = bool(name) and self.peek() == "=" and not self.text.startswith("==", self.pos)
        self.pos = save
        return is_param


def parse_challenges(values: Iterable[str | bytes]) -> list[Challenge]:
    """
    Parse every challenge in the C{WWW-Authenticate} header values given.
    Challenges and parameters are comma-separated alike, so a new challenge
    starts at a token that is not followed by C{=}.  Unparseable rests are
    dropped rather than failing: a registry's odd header must not break pulls.
    """
    challenges: list[Challenge] = []
    for value in values:
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        scan = _Scanner(text)
        while True:
            scan.skip_commas()
            scheme = scan.token()
            if not scheme:
                break
            params: dict[str, str] = {}
            token68 = None
            scan.skip_space()
            if not scan.at_param() and scan.peek() not in (",", ""):
                candidate_start = scan.pos
                candidate = scan.token(_TOKEN68)
                scan.skip_space()
                if candidate and scan.peek() in (",", ""):
                    token68 = candidate
                else:
                    scan.pos = candidate_start
            while token68 is None:
                save = scan.pos
                scan.skip_commas()
                if not scan.at_param():
                    scan.pos = save
                    break
                name = scan.token().lower()
                scan.skip_space()
                scan.pos += 1  # "="
                scan.skip_space()
                if scan.peek() == '"':
                    scan.pos += 1
                    quoted = scan.quoted()
                    if quoted is None:
                        break
                    params.setdefault(name, quoted)
                else:
                    params.setdefault(name, scan.token(_TOKEN68))
                scan.skip_space()
                if scan.peek() not in (",", ""):
                    # Junk after a parameter: give up on this header value.
                    scan.pos = len(text)
                    break
            challenges.append(Challenge(scheme.lower(), params, token68))
    return challenges


def bearer_challenge(challenges: Sequence[Challenge]) -> Challenge | None:
    """The first C{Bearer} challenge that names a realm, if any."""
    for challenge in challenges:
        if challenge.scheme == "bearer" and challenge.realm:
            return challenge
    return None


def asks_basic(challenges: Sequence[Challenge]) -> bool:
    return any(c.scheme == "basic" for c in challenges)


# -- credentials ---------------------------------------------------------------


@frozen
class RegistryCredentials:
    """
    What the Connector's credentials are worth to a registry (kept out of
    C{repr}): C{username} and C{password} for Basic, at the token realm or
    at the registry; C{identity_token}, an OAuth2 refresh token for the
    realm; C{bearer}, a token the registry may take as it is when it asks
    for C{Bearer} without naming a realm.
    """

    username: str = field(default="", repr=False)
    password: str | None = field(default=None, repr=False)
    identity_token: str | None = field(default=None, repr=False)
    bearer: str | None = field(default=None, repr=False)

    def basic(self) -> bytes | None:
        """An C{Authorization: Basic} value, when a password is known."""
        if self.password is None:
            return None
        raw = f"{self.username}:{self.password}".encode()
        return b"Basic " + base64.b64encode(raw)


# A bearer-token Secret has no user name; registries that take a token as a
# password (Harbor robots, GitLab, GHCR) ignore the name but refuse an empty one.
DEFAULT_TOKEN_USERNAME = "connectors-proxy"


def registry_credentials(credentials: Credentials | None) -> RegistryCredentials | None:
    """
    The registry credentials of a Connector's resolved credentials
    (L{connectors_proxy.model.credentials.resolve}; docs/oci.md, "Upstream authentication"): Basic ones
    as they are; a bearer token as the password at the token realm (with
    L{DEFAULT_TOKEN_USERNAME}), or as a bearer token for a registry that
    asks for one directly; a docker config's identity token as the OAuth2
    refresh token at the realm.  C{None} (anonymous) stays C{None}.
    """
    if credentials is None or isinstance(credentials, RegoCredentials):
        # Rego generators do not apply to OCI classes (resolve never gives these to them).
        return None
    if isinstance(credentials, BasicCredentials):
        return RegistryCredentials(credentials.username, credentials.password)
    if credentials.identity:
        return RegistryCredentials(DEFAULT_TOKEN_USERNAME, identity_token=credentials.token)
    return RegistryCredentials(DEFAULT_TOKEN_USERNAME, password=credentials.token, bearer=credentials.token)


# -- token realm -----------------------------------------------------------------


@frozen
class TokenRequest:
    """The request to send to a token realm: C{method}, C{url}, headers, body."""

    method: bytes
    url: bytes
    headers: Mapping[bytes, bytes] = field(repr=False)
    body: bytes | None = field(default=None, repr=False)


def realm_allowed(address: str, realm: str) -> bool:
    """
    Whether credentials may be sent to C{realm}.  Token realms live on other
    hosts (auth.docker.io), so any host is allowed, but never a plain-HTTP
    realm behind an HTTPS registry: that would downgrade the credentials.
    """
    try:
        parts = urlsplit(realm)
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    return not (parts.scheme == "http" and urlsplit(address).scheme == "https")


def token_request(challenge: Challenge, scopes: Sequence[str],
                  credentials: RegistryCredentials | None,
                  client_id: str = "connectors-proxy") -> TokenRequest:
    """
    The request that gets a token for C{scopes} from the realm of a Bearer
    C{challenge}: C{GET realm?service=..&scope=..} with Basic credentials (the
    Docker token protocol), or the OAuth2 C{refresh_token} POST for an
    identity token.  Anonymous when C{credentials} is C{None}.
    """
    realm = challenge.realm
    if not realm:
        raise ValueError("a Bearer challenge without a realm")
    headers = {b"accept": b"application/json"}
    if credentials is not None and credentials.identity_token is not None:
        form = [("grant_type", "refresh_token"), ("client_id", client_id),
                ("refresh_token", credentials.identity_token)]
        if challenge.service:
            form.append(("service", challenge.service))
        if scopes:
            form.append(("scope", " ".join(scopes)))
        headers[b"content-type"] = b"application/x-www-form-urlencoded"
        body = "&".join(f"{k}={quote(v, safe='')}" for k, v in form).encode()
        return TokenRequest(b"POST", realm.encode(), headers, body)
    query = []
    if challenge.service:
        query.append("service=" + quote(challenge.service, safe=""))
    query += ["scope=" + quote(scope, safe="") for scope in scopes]
    url = realm
    if query:
        url += ("&" if "?" in realm else "?") + "&".join(query)
    if credentials is not None:
        basic = credentials.basic()
        if basic is not None:
            headers[b"authorization"] = basic
    return TokenRequest(b"GET", url.encode(), headers)


@frozen
class IssuedToken:
    """A registry token and how long it lives (seconds, from when it was read)."""

    value: str = field(repr=False)
    expires_in: float


# The token specification: "if expires_in is not given, assume 60 seconds".
# A shorter lifetime that the realm does state is believed (Docker rounds it
# up to 60 s; a cache that outlives its tokens only earns 401s).
DEFAULT_EXPIRES_IN = 60.0


class TokenResponseError(ValueError):
    """The realm's answer is not a token (message never quotes the body)."""


def parse_token_response(body: bytes) -> IssuedToken:
    """Read C{{"token"|"access_token", "expires_in"}} from a realm's answer."""
    try:
        doc: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise TokenResponseError("the token realm answered with something that is not JSON") from None
    if not isinstance(doc, Mapping):
        raise TokenResponseError("the token realm answered with JSON that is not an object")
    token = doc.get("token") or doc.get("access_token")
    if not isinstance(token, str) or not token:
        raise TokenResponseError("the token realm's answer has no token")
    expires_in = doc.get("expires_in")
    if not isinstance(expires_in, (int, float)) or isinstance(expires_in, bool) or expires_in <= 0:
        expires_in = DEFAULT_EXPIRES_IN
    return IssuedToken(token, float(expires_in))
