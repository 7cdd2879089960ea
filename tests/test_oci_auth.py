"""Tests for L{connectors_proxy.protocols.oci.auth}: challenges, credentials, token realm requests."""

from __future__ import annotations

import base64
from urllib.parse import parse_qs, urlsplit

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from connectors_proxy.model.credentials import BasicCredentials, BearerCredentials
from connectors_proxy.protocols.oci.auth import (
    DEFAULT_EXPIRES_IN,
    Challenge,
    RegistryCredentials,
    TokenResponseError,
    asks_basic,
    bearer_challenge,
    parse_challenges,
    parse_token_response,
    realm_allowed,
    registry_credentials,
    token_request,
)


class ChallengeTests(SynchronousTestCase):
    def test_docker_bearer(self) -> None:
        (c,) = parse_challenges([
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
            'scope="repository:samalba/my-app:pull,push"'
        ])
        self.assertEqual(c.scheme, "bearer")
        self.assertEqual(c.realm, "https://auth.docker.io/token")
        self.assertEqual(c.service, "registry.docker.io")
        self.assertEqual(c.scopes, ("repository:samalba/my-app:pull,push",))

    def test_bytes_and_case(self) -> None:
        (c,) = parse_challenges([b'BEARER Realm="http://r/t", Service=svc'])
        self.assertEqual((c.scheme, c.realm, c.service), ("bearer", "http://r/t", "svc"))

    def test_several_challenges_in_one_value(self) -> None:
        cs = parse_challenges(['Basic realm="reg", Bearer realm="http://t/token",service="s", Negotiate'])
        self.assertEqual([c.scheme for c in cs], ["basic", "bearer", "negotiate"])
        self.assertEqual(cs[0].realm, "reg")
        self.assertEqual(cs[1].service, "s")
        self.assertTrue(asks_basic(cs))
        self.assertEqual(bearer_challenge(cs), cs[1])

    def test_several_values(self) -> None:
        cs = parse_challenges(['Basic realm="a"', 'Bearer realm="b"'])
        self.assertEqual([c.realm for c in cs], ["a", "b"])

    def test_quoted_commas_and_escapes(self) -> None:
        (c,) = parse_challenges([r'Bearer realm="http://t/x?a=1,b=2",scope="repository:a:pull repository:b:pull",'
                                 r'error="insufficient_scope",note="say \"hi\""'])
        self.assertEqual(c.realm, "http://t/x?a=1,b=2")
        self.assertEqual(c.scopes, ("repository:a:pull", "repository:b:pull"))
        self.assertEqual(c.error, "insufficient_scope")
        self.assertEqual(c.params["note"], 'say "hi"')

    def test_token68(self) -> None:
        cs = parse_challenges(["Negotiate abc123==, Basic realm=x"])
        self.assertEqual(cs[0].token68, "abc123==")
        self.assertEqual(cs[1].realm, "x")

    def test_junk_is_survived(self) -> None:
        for junk in ['', ',,,', 'Bearer realm="unterminated', 'Bearer realm=', '"quoted"', '=', 'Bearer ,realm=x']:
            parse_challenges([junk])
        self.assertIsNone(bearer_challenge(parse_challenges(['Bearer service="x"'])))

    @given(st.dictionaries(st.sampled_from(["realm", "service", "scope", "error"]),
                           st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126)), min_size=1))
    def test_quoted_round_trip(self, params: dict[str, str]) -> None:
        header = "Bearer " + ",".join(
            f'{k}="' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for k, v in params.items()
        )
        (c,) = parse_challenges([header])
        self.assertEqual(dict(c.params), params)


class CredentialTests(SynchronousTestCase):
    def test_basic(self) -> None:
        creds = registry_credentials(BasicCredentials("u", "p"))
        self.assertEqual(creds, RegistryCredentials("u", "p"))
        assert creds is not None
        self.assertEqual(creds.basic(), b"Basic " + base64.b64encode(b"u:p"))

    def test_bearer_token_is_a_password_or_a_bearer(self) -> None:
        creds = registry_credentials(BearerCredentials("t0k"))
        assert creds is not None
        self.assertEqual((creds.password, creds.bearer), ("t0k", "t0k"))
        self.assertTrue(creds.username)

    def test_identity_token_is_a_refresh_token(self) -> None:
        creds = registry_credentials(BearerCredentials("refresh-me", identity=True))
        assert creds is not None
        self.assertEqual((creds.identity_token, creds.password, creds.bearer), ("refresh-me", None, None))

    def test_anonymous(self) -> None:
        self.assertIsNone(registry_credentials(None))

    def test_repr_hides_secrets(self) -> None:
        creds = RegistryCredentials("canary-user", "canary-pass", "canary-id", "canary-reg")
        self.assertNotIn("canary", repr(creds))


class TokenRequestTests(SynchronousTestCase):
    challenge = Challenge("bearer", {"realm": "https://auth.example/token", "service": "reg"})

    def test_get_with_basic(self) -> None:
        req = token_request(self.challenge, ["repository:a/b:pull,push", "repository:c:pull"],
                            RegistryCredentials("u", "p"))
        self.assertEqual(req.method, b"GET")
        parts = urlsplit(req.url.decode())
        self.assertEqual(parts.path, "/token")
        self.assertEqual(parse_qs(parts.query), {
            "service": ["reg"], "scope": ["repository:a/b:pull,push", "repository:c:pull"]})
        self.assertEqual(req.headers[b"authorization"], b"Basic " + base64.b64encode(b"u:p"))

    def test_anonymous(self) -> None:
        req = token_request(self.challenge, ["repository:a:pull"], None)
        self.assertNotIn(b"authorization", req.headers)

    def test_realm_with_query(self) -> None:
        c = Challenge("bearer", {"realm": "https://auth.example/token?x=1"})
        req = token_request(c, ["repository:a:pull"], None)
        self.assertEqual(req.url, b"https://auth.example/token?x=1&scope=repository%3Aa%3Apull")

    def test_identity_token_posts_refresh_token(self) -> None:
        req = token_request(self.challenge, ["repository:a:pull"], RegistryCredentials("u", identity_token="rt"))
        self.assertEqual(req.method, b"POST")
        assert req.body is not None
        form = parse_qs(req.body.decode())
        self.assertEqual(form["grant_type"], ["refresh_token"])
        self.assertEqual(form["refresh_token"], ["rt"])
        self.assertEqual(form["scope"], ["repository:a:pull"])
        self.assertNotIn(b"authorization", req.headers)

    def test_realm_allowed(self) -> None:
        self.assertTrue(realm_allowed("https://reg.example", "https://auth.other/token"))
        self.assertTrue(realm_allowed("http://127.0.0.1:5000", "http://127.0.0.1:6000/token"))
        self.assertFalse(realm_allowed("https://reg.example", "http://auth.other/token"))
        self.assertFalse(realm_allowed("https://reg.example", "file:///etc/passwd"))
        self.assertFalse(realm_allowed("https://reg.example", "/relative"))

    def test_parse_response(self) -> None:
        t = parse_token_response(b'{"token": "a", "access_token": "b", "expires_in": 300}')
        self.assertEqual((t.value, t.expires_in), ("a", 300.0))
        t = parse_token_response(b'{"access_token": "b"}')
        self.assertEqual((t.value, t.expires_in), ("b", DEFAULT_EXPIRES_IN))
        t = parse_token_response(b'{"token": "a", "expires_in": 5}')
        self.assertEqual(t.expires_in, 5.0)
        self.assertNotIn("a", repr(t).replace("IssuedToken", "").replace("expires_in", ""))
        for bad in [b"", b"[]", b'{"token": ""}', b'{"token": 5}', b"\xff"]:
            e = self.assertRaises(TokenResponseError, parse_token_response, bad)
            self.assertNotIn(bad.decode("latin-1") or "<empty>", str(e))
