"""
Tests for L{connectors_proxy.model.protocols}: the one table of protocols,
and the protocol of upstream ConnectorClasses that carry no annotation of ours.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.python.reflect import namedAny
from twisted.trial.unittest import SynchronousTestCase

from connectors_proxy.model import protocols
from connectors_proxy.model.objects import InvalidObject, parse_connector_class
from connectors_proxy.protocols import ProtocolResource

# The upstream classes (UPSTREAM-COMPAT section 2) and the protocol each is served with.
UPSTREAM = {
    "git": "git", "github": "git", "gitlab": "git",
    "oci": "oci", "harbor": "oci",
    "maven": "http", "npm": "http", "pypi": "http", "k8s": "http",
    "sonarqube": "http", "nexus": "http", "jfrog": "http",
}


def upstream_class(name: str, secret_type: str | None = None, **annotations: str) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "apiVersion": "connectors.alauda.io/v1alpha1", "kind": "ConnectorClass",
        "metadata": {"name": name},
        "spec": {"auth": {"types": [{"name": "basicAuth", "secretType": secret_type or "kubernetes.io/basic-auth",
                                     "optional": True}]}},
    }
    if annotations:
        doc["metadata"]["annotations"] = annotations
    return doc


class InferenceTests(SynchronousTestCase):
    def test_upstream_classes(self) -> None:
        """The twelve upstream classes, unannotated, get their protocol from their name."""
        for name, expected in UPSTREAM.items():
            self.assertEqual(parse_connector_class(upstream_class(name)).protocol, expected, name)

    def test_registry_token_secret_type_means_oci(self) -> None:
        parsed = parse_connector_class(upstream_class("my-registry", "cpaas.io/distribution-registry-token"))
        self.assertEqual(parsed.protocol, "oci")

    def test_annotation_overrides(self) -> None:
        annotated = upstream_class("harbor", **{protocols.PROTOCOL_ANNOTATION: "http"})
        self.assertEqual(parse_connector_class(annotated).protocol, "http")

    def test_unknown_annotation_names_the_field(self) -> None:
        bad = upstream_class("x", **{protocols.PROTOCOL_ANNOTATION: "ftp"})
        error = self.assertRaises(InvalidObject, parse_connector_class, bad)
        self.assertIn(protocols.PROTOCOL_ANNOTATION, str(error))
        self.assertIn("'ftp' is not one of oci, git, http", str(error))


class RegistryTests(SynchronousTestCase):
    def test_every_protocol_has_a_resource(self) -> None:
        """Each entry names a L{ProtocolResource} built from the reactor alone."""
        reactor = MemoryReactorClock()
        for protocol in protocols.PROTOCOLS:
            resource = namedAny(protocol.resource)(reactor)
            self.assertIsInstance(resource, ProtocolResource, protocol.name)

    def test_names_unique(self) -> None:
        self.assertEqual(len(set(protocols.NAMES)), len(protocols.PROTOCOLS))
