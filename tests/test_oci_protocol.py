"""Unit tests for the pure parts of L{connectors_proxy.protocols.oci.resource}."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from connectors_proxy.protocols.oci.auth import parse_challenges
from connectors_proxy.protocols.oci.resource import NONE, Scheme, scheme_of


class SchemeTests(SynchronousTestCase):
    def test_bearer_with_realm(self) -> None:
        scheme = scheme_of(parse_challenges(['Bearer realm="http://t/token",service="s"']))
        self.assertEqual(scheme.kind, "bearer")
        assert scheme.challenge is not None
        self.assertEqual(scheme.challenge.realm, "http://t/token")

    def test_bearer_preferred_over_basic(self) -> None:
        self.assertEqual(scheme_of(parse_challenges(['Basic realm="r", Bearer realm="http://t"'])).kind, "bearer")

    def test_basic(self) -> None:
        self.assertEqual(scheme_of(parse_challenges(['Basic realm="registry"'])), Scheme("basic"))

    def test_bearer_without_realm(self) -> None:
        self.assertEqual(scheme_of(parse_challenges(["Bearer"])), Scheme("bearer-direct"))

    def test_nothing(self) -> None:
        self.assertEqual(scheme_of([]), NONE)
        self.assertEqual(scheme_of(parse_challenges(["Negotiate"])), NONE)
