# -*- test-case-name: tests.test_protocol_registry -*-
"""
The protocols the proxy serves, in one table: the ConnectorClass parser,
the daemon's wiring, the metrics and the CRD tests all read it.

Adding a protocol is a module under L{connectors_proxy.protocols} with a
L{ProtocolResource<connectors_proxy.protocols.ProtocolResource>} subclass,
plus one L{Protocol} entry here.  The resource is named by a string, as
twistd plugins name their modules: the model does not import the request
path, and a protocol's code is imported only by whatever serves it.
"""

from __future__ import annotations

from collections.abc import Iterable

from attrs import frozen

# Ours, optional: forces a class's protocol whatever its name says.
PROTOCOL_ANNOTATION = "proxy.connectors.alauda.io/protocol"


@frozen
class Protocol:
    """
    One protocol.

    @ivar name: the value of L{PROTOCOL_ANNOTATION} that selects it.
    @ivar resource: dotted name of its resource class; the class is
        built with the reactor as its one argument.
    @ivar class_names: upstream ConnectorClass names served with this
        protocol when they carry no annotation of ours.
    @ivar secret_types: auth Secret types that mark a class as this
        protocol when its name does not.
    """

    name: str
    resource: str
    class_names: frozenset[str] = frozenset()
    secret_types: frozenset[str] = frozenset()


# Order matters for inference: the first protocol that claims a class wins;
# the last is the default for classes nobody claims.
PROTOCOLS: tuple[Protocol, ...] = (
    Protocol("oci", "connectors_proxy.protocols.oci.resource.OciResource",
             class_names=frozenset({"oci", "harbor"}),
             secret_types=frozenset({"cpaas.io/distribution-registry-token"})),
    Protocol("git", "connectors_proxy.protocols.git.GitResource",
             class_names=frozenset({"git", "github", "gitlab"})),
    Protocol("http", "connectors_proxy.protocols.rest.RestResource"),
)
NAMES: tuple[str, ...] = tuple(p.name for p in PROTOCOLS)
DEFAULT = PROTOCOLS[-1].name


def infer(class_name: str, secret_types: Iterable[str | None]) -> str:
    """
    The protocol of a ConnectorClass that carries no annotation of ours:
    the upstream classes are recognised by name (C{oci}, C{harbor} ->
    C{oci}; C{git}, C{github}, C{gitlab} -> C{git}) or by an auth Secret
    type (C{cpaas.io/distribution-registry-token} -> C{oci}); any other
    class is plain HTTP.
    """
    types = {t for t in secret_types if t}
    for protocol in PROTOCOLS:
        if class_name in protocol.class_names or types & protocol.secret_types:
            return protocol.name
    return DEFAULT
