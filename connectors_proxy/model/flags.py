# -*- test-case-name: tests.test_upstream_compat,tests.test_custom_ca -*-
"""
Upstream's feature flags: the ConfigMap C{connectors-config} in the install
namespace (set there by C{ConnectorsConfig.spec.components.core.spec.featureFlags}),
string booleans that all default to C{"false"}.

Two change what this proxy does: C{enable-connector-proxy-permissions}
(an extra SubjectAccessReview on C{connectors/proxy}) and
C{enable-custom-ca-certs} (the tool CA pool, L{connectors_proxy.tls.capool},
and the C{CACertReady} condition); the others are read, kept and documented
(docs/upstream-compat.md, "Permissions and feature flags").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from attrs import field, frozen

#: The ConfigMap's name, in the install namespace.
CONFIG_MAP = "connectors-config"

PROXY_PERMISSIONS = "enable-connector-proxy-permissions"
CONNECTORS_APPROVAL = "enable-connectors-approval"
APIS_PERMISSIONS = "enable-connector-apis-permissions"
APIS_WRITE_PASSTHROUGH = "enable-connector-apis-write-passthrough"
MULTI_CONNECTOR = "enable-multi-connector"
CUSTOM_CA_CERTS = "enable-custom-ca-certs"
POD_IMAGE_PULL = "enable-pod-image-pull-via-connector"

#: Every flag upstream documents.
KNOWN = (PROXY_PERMISSIONS, CONNECTORS_APPROVAL, APIS_PERMISSIONS, APIS_WRITE_PASSTHROUGH,
         MULTI_CONNECTOR, CUSTOM_CA_CERTS, POD_IMAGE_PULL)

# Go's strconv.ParseBool, which upstream's Go code reads the values with.
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})


@frozen
class FeatureFlags:
    """The flags that are C{"true"} (anything else, or absent, is false)."""

    enabled: frozenset[str] = field(factory=frozenset)

    def __getitem__(self, name: str) -> bool:
        return name in self.enabled

    @property
    def proxy_permissions(self) -> bool:
        return PROXY_PERMISSIONS in self.enabled

    @property
    def custom_ca_certs(self) -> bool:
        return CUSTOM_CA_CERTS in self.enabled


#: No ConfigMap: every flag at its default.
DEFAULTS = FeatureFlags()


def parse_flags(config_map: Mapping[str, Any] | None) -> FeatureFlags:
    """
    The flags a C{connectors-config} ConfigMap sets (C{None}: none).
    Values that are not strings count as unset, as they would upstream.
    """
    data = (config_map or {}).get("data") or {}
    if not isinstance(data, Mapping):
        return DEFAULTS
    return FeatureFlags(frozenset(name for name, value in data.items()
                                  if isinstance(value, str) and value.strip() in _TRUE))
