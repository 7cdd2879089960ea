from __future__ import annotations

import base64
import json

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from connectors_proxy.auth.identity import (
    InvalidTokenFile,
    StaticTokens,
    namespace_rule,
    parse_token_file,
    presented_token,
)
from connectors_proxy.auth.interfaces import Identity, IIdentityVerifier
from connectors_proxy.model.credentials import (
    BasicCredentials,
    BearerCredentials,
    CredentialsUnavailable,
    from_secret,
    resolve,
)
from connectors_proxy.model.objects import AuthType, Connector, ConnectorClass, ObjectRef, Secret
from connectors_proxy.model.state import Snapshot


def _secret(type_: str, **data: bytes) -> Secret:
    return Secret("ns", "s", type_, data)


class FromSecret(SynchronousTestCase):
    def test_types(self) -> None:
        self.assertEqual(from_secret(_secret("kubernetes.io/basic-auth", username=b"u", password=b"p"), "https://x"),
                         BasicCredentials("u", "p"))
        self.assertEqual(from_secret(_secret("cpaas.io/distribution-registry-token", username=b"u", password=b"p"),
                                     "https://x"), BasicCredentials("u", "p"))
        self.assertEqual(from_secret(_secret("connectors.cpaas.io/bearer-token", token=b"t"), "https://x"),
                         BearerCredentials("t"))
        self.assertEqual(from_secret(_secret("connectors.cpaas.io/gitlab-pat-auth", token=b"t"), "https://x"),
                         BearerCredentials("t"))

    def test_headers(self) -> None:
        self.assertEqual(BasicCredentials("u", "p:q").authorization(), b"Basic " + base64.b64encode(b"u:p:q"))
        self.assertEqual(BearerCredentials("t").authorization(), b"Bearer t")

    def test_repr_hides_secrets(self) -> None:
        self.assertNotIn("sekrit", repr(BasicCredentials("u", "sekrit")))
        self.assertNotIn("sekrit", repr(BearerCredentials("sekrit")))
        self.assertNotIn("sekrit", repr(_secret("Opaque", token=b"sekrit")))

    def test_dockerconfig(self) -> None:
        config = {"auths": {
            "other.example.com": {"auth": base64.b64encode(b"x:y").decode()},
            "https://harbor.example.com/v1/": {"auth": base64.b64encode(b"robot:pw").decode()},
            "reg.example.com:5000": {"username": "u2", "password": "p2"},
            "id.example.com": {"identitytoken": "refresh-me"},
        }}
        secret = _secret("kubernetes.io/dockerconfigjson", **{".dockerconfigjson": json.dumps(config).encode()})
        self.assertEqual(from_secret(secret, "https://harbor.example.com"), BasicCredentials("robot", "pw"))
        self.assertEqual(from_secret(secret, "http://reg.example.com:5000"), BasicCredentials("u2", "p2"))
        self.assertEqual(from_secret(secret, "https://id.example.com"), BearerCredentials("refresh-me", identity=True))
        self.assertRaises(CredentialsUnavailable, from_secret, secret, "https://nowhere.example.com")

    def test_missing_key_named(self) -> None:
        e = self.assertRaises(CredentialsUnavailable, from_secret,
                              _secret("kubernetes.io/basic-auth", username=b"u"), "https://x")
        self.assertIn("'password'", e.message)


class ParsedOncePerVersion(SynchronousTestCase):
    def test_same_secret_object_read_once(self) -> None:
        secret = _secret("kubernetes.io/basic-auth", username=b"u", password=b"p")
        first = from_secret(secret, "https://x")
        self.assertIs(from_secret(secret, "https://x"), first)
        # A new version of the Secret (a reload) is read again.
        changed = _secret("kubernetes.io/basic-auth", username=b"u", password=b"new")
        self.assertEqual(from_secret(changed, "https://x"), BasicCredentials("u", "new"))
        # A dockerconfig Secret's answer depends on the address too.
        config = {"auths": {"a.example": {"username": "ua", "password": "pa"},
                            "b.example": {"username": "ub", "password": "pb"}}}
        docker = _secret("kubernetes.io/dockerconfigjson", **{".dockerconfigjson": json.dumps(config).encode()})
        self.assertEqual(from_secret(docker, "https://a.example"), BasicCredentials("ua", "pa"))
        self.assertEqual(from_secret(docker, "https://b.example"), BasicCredentials("ub", "pb"))

    def test_errors_not_kept(self) -> None:
        broken = _secret("kubernetes.io/basic-auth", username=b"u")
        for _ in range(2):
            self.assertRaises(CredentialsUnavailable, from_secret, broken, "https://x")


class Resolve(SynchronousTestCase):
    def connector(self, secret: ObjectRef | None) -> Connector:
        return Connector("ns", "c", "cls", "https://x", "basicAuth", secret, None)

    def test_anonymous(self) -> None:
        self.assertIsNone(resolve(self.connector(None), None, Snapshot()))

    def test_missing_required_secret(self) -> None:
        cls = ConnectorClass("cls", "http", (AuthType("basicAuth", None, False),), None)
        e = self.assertRaises(CredentialsUnavailable, resolve, self.connector(ObjectRef("ns", "gone")), cls, Snapshot())
        self.assertEqual(e.reason, "SecretNotFound")

    def test_missing_optional_secret(self) -> None:
        cls = ConnectorClass("cls", "http", (AuthType("basicAuth", None, True),), None)
        self.assertIsNone(resolve(self.connector(ObjectRef("ns", "gone")), cls, Snapshot()))


class PresentedToken(SynchronousTestCase):
    def b64(self, s: str) -> bytes:
        return base64.b64encode(s.encode())

    def test_forms(self) -> None:
        self.assertEqual(presented_token(b"Bearer tok", None).token, "tok")  # type: ignore[union-attr]
        self.assertEqual(presented_token(b"basic " + self.b64("any:tok"), None).token, "tok")  # type: ignore[union-attr]
        self.assertEqual(presented_token(b"Basic " + self.b64(":tok"), None).token, "tok")  # type: ignore[union-attr]
        p = presented_token(None, b"Basic " + self.b64("ns/a, ns2/b:tok"))
        assert p is not None
        self.assertEqual((p.token, p.listed), ("tok", (ObjectRef("ns", "a"), ObjectRef("ns2", "b"))))

    def test_absent_or_malformed(self) -> None:
        for auth in (None, b"", b"Bearer ", b"Basic !!!", b"Basic " + self.b64("nocolon"), b"Basic " + self.b64("u:"),
                     b"Digest x", b"Bearer \xff"):
            self.assertIsNone(presented_token(auth, None), auth)

    def test_repr_hides_token(self) -> None:
        self.assertNotIn("sekrit", repr(presented_token(b"Bearer sekrit", None)))


class StaticTokenFile(SynchronousTestCase):
    def test_parse(self) -> None:
        table = parse_token_file('# comment\n\nt1,system:serviceaccount:ns:sa,u1,"g1,g2"\nt2,alice\n')
        tokens = StaticTokens(table)
        verifyObject(IIdentityVerifier, tokens)
        self.assertEqual(self.successResultOf(tokens.authenticate("t1")),
                         Identity("system:serviceaccount:ns:sa", "u1", ("g1", "g2")))
        self.assertEqual(self.successResultOf(tokens.authenticate("t2")), Identity("alice"))
        self.assertIsNone(self.successResultOf(tokens.authenticate("t3")))
        self.assertNotIn("t1", repr(tokens))

    def test_invalid(self) -> None:
        e = self.assertRaises(InvalidTokenFile, parse_token_file, "ok,user\nbroken\n", "f.csv")
        self.assertIn("f.csv:2", str(e))

    def test_namespace_rule(self) -> None:
        sa = Identity("system:serviceaccount:team:builder")
        self.assertTrue(namespace_rule(sa, "team"))
        self.assertTrue(namespace_rule(sa, "kube-public"))
        self.assertFalse(namespace_rule(sa, "other"))
        self.assertFalse(namespace_rule(Identity("alice"), "team"))
        d: Deferred[bool] = StaticTokens({}).authorize(sa, "other", "x")
        self.assertFalse(self.successResultOf(d))
