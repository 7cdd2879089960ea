# -*- test-case-name: tests.test_manifests,tests.test_k8s_manifests,tests.test_custom_ca -*-
"""
The Kubernetes objects the proxy reads, as frozen values, and the pure
functions that turn a decoded manifest (a ``dict``) into them.

Both modes use these parsers: standalone mode on YAML documents read from
disk, cluster mode on JSON objects from the API server.  A problem is an
L{InvalidObject} naming the object and the field, so the user can fix the
manifest without reading code.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Mapping
from typing import Any, Union
from urllib.parse import urlsplit

from attrs import field, frozen

from connectors_proxy.model import protocols
from connectors_proxy.model.flags import CONFIG_MAP, FeatureFlags, parse_flags
from connectors_proxy.model.protocols import PROTOCOL_ANNOTATION

GROUP = "connectors.alauda.io"
API_VERSION = GROUP + "/v1alpha1"

SECRET_BASIC = "kubernetes.io/basic-auth"
SECRET_BEARER = "connectors.cpaas.io/bearer-token"
SECRET_REGISTRY = "cpaas.io/distribution-registry-token"
SECRET_DOCKERCONFIG = "kubernetes.io/dockerconfigjson"
SECRET_TLS = "kubernetes.io/tls"
# Upstream's class annotation: the form of a Connector's status address.
RESOLVER_ANNOTATION = "connectors.cpaas.io/proxy-resolver"
RESOLVER_HOST = "host"
RESOLVER_PATH = "path"
#: Upstream's label for a Secret of the install namespace whose certificates
#: join every Connector's tool CA pool (with C{enable-custom-ca-certs}).
CA_CERT_LABEL = "connectors.cpaas.io/ca-cert"
NAMESPACED_KINDS = ("Connector", "Secret", "ConfigMap")


class InvalidObject(ValueError):
    """
    A manifest does not describe a valid object.

    @ivar what: the object, e.g. C{"Connector default/harbor"}.
    @ivar field: the dotted path of the offending field.
    @ivar problem: what is wrong with it.
    """

    def __init__(self, what: str, field: str, problem: str) -> None:
        super().__init__(f"{what}: {field}: {problem}")
        self.what = what
        self.field = field
        self.problem = problem


@frozen
class ObjectRef:
    """A namespaced name: where a Secret or Service lives."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@frozen
class AuthType:
    """One entry of a ConnectorClass's C{spec.auth.types}."""

    name: str
    secret_type: str | None
    optional: bool
    # C{generator.rego}: how the Secret's data is injected (None: by the
    # Secret's type, SPEC section 2).
    generator: str | None = None


@frozen
class ProxyDestination:
    """A ConnectorClass's C{spec.proxy.ref}: the Service that fronts this proxy."""

    kind: str
    name: str
    namespace: str


@frozen
class ConnectorClass:
    """
    @ivar proxy: C{spec.proxy.ref}, if given.
    @ivar proxy_uri: C{spec.proxy.uri}, if given: absolute, or relative to
        C{proxy}'s address.
    @ivar resolver: the form of its Connectors' status addresses,
        L{RESOLVER_HOST} (upstream's default) or L{RESOLVER_PATH}.
    """

    name: str
    protocol: str
    auth_types: tuple[AuthType, ...]
    proxy: ProxyDestination | None
    generation: int = 0
    proxy_uri: str | None = None
    resolver: str = RESOLVER_HOST
    # C{spec.proxy.authExtractor.rego}: where a client's token sits
    # (None: Authorization and Proxy-Authorization only).
    extractor: str | None = None

    @property
    def has_generators(self) -> bool:
        """Whether one of the auth types has a Rego C{generator}."""
        return any(t.generator is not None for t in self.auth_types)

    @property
    def has_proxy(self) -> bool:
        """Whether C{spec.proxy} names a proxy at all (a ref, a URI or both)."""
        return self.proxy is not None or self.proxy_uri is not None

    def auth_type(self, name: str | None) -> AuthType | None:
        for auth in self.auth_types:
            if auth.name == name:
                return auth
        return None


@frozen
class AddressExtension:
    """
    One entry of a Connector's C{spec.addressExtensions}: another URL under
    which the tool answers (GitHub's API host beside its Git host).  Forward-
    proxy requests under it get the Connector's credentials, like those under
    C{spec.address}.
    """

    name: str
    value: str


@frozen
class Connector:
    namespace: str
    name: str
    class_name: str
    address: str
    auth_name: str | None
    secret_ref: ObjectRef | None
    ca_secret_ref: ObjectRef | None
    client_cert_secret_ref: ObjectRef | None = None
    uid: str = ""
    generation: int = 0
    address_extensions: tuple[AddressExtension, ...] = ()

    @property
    def ref(self) -> ObjectRef:
        return ObjectRef(self.namespace, self.name)

    @property
    def addresses(self) -> tuple[str, ...]:
        """Where the Connector's credentials go: C{spec.address}, then each extension's value."""
        return (self.address, *(e.value for e in self.address_extensions))


@frozen
class Secret:
    """
    A core v1 Secret.  C{data} holds the decoded bytes and is kept out of
    C{repr} so that a value logged by accident shows no credential.
    """

    namespace: str
    name: str
    type: str
    data: Mapping[str, bytes] = field(repr=False)
    #: Labelled C{connectors.cpaas.io/ca-cert: "true"} (L{CA_CERT_LABEL}).
    ca_cert: bool = False

    @property
    def ref(self) -> ObjectRef:
        return ObjectRef(self.namespace, self.name)


@frozen
class ConfigMap:
    """
    The one ConfigMap the proxy reads: upstream's feature flags,
    C{connectors-config}, as standalone mode finds it among the manifests
    (cluster mode watches it instead, L{connectors_proxy.kube.flags}).  No
    C{ref}: there is one per manifest set, whatever its namespace, which is
    the install namespace.
    """

    namespace: str
    name: str
    flags: FeatureFlags


KubeObject = Union[ConnectorClass, Connector, Secret, ConfigMap]


def describe(doc: Mapping[str, Any]) -> str:
    """A short name for a manifest, for error messages: C{Kind ns/name}."""
    kind = doc.get("kind") if isinstance(doc, Mapping) else None
    meta = doc.get("metadata") if isinstance(doc, Mapping) else None
    meta = meta if isinstance(meta, Mapping) else {}
    name = meta.get("name") or "<unnamed>"
    ns = meta.get("namespace") or ("default" if kind in NAMESPACED_KINDS else None)
    return f"{kind or '<no kind>'} {ns + '/' if isinstance(ns, str) else ''}{name}"


def _get(doc: Mapping[str, Any], path: str, what: str, kind: type | tuple[type, ...],
         required: bool = False) -> Any:
    node: Any = doc
    for part in path.split("."):
        if not isinstance(node, Mapping):
            node = None
            break
        node = node.get(part)
    if node is None:
        if required:
            raise InvalidObject(what, path, "is required")
        return None
    if not isinstance(node, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise InvalidObject(what, path, f"must be a {_KIND_NAMES.get(names, names)}")
    return node


_KIND_NAMES = {"str": "string", "dict": "mapping", "list": "list", "int": "integer",
               "bool": "boolean", "Mapping": "mapping"}


def _dns_name(value: str, what: str, path: str) -> str:
    if not value or len(value) > 253 or not all(
        c.isalnum() and c.lower() == c or c in "-." for c in value
    ):
        raise InvalidObject(what, path, f"{value!r} is not a valid lower-case DNS name")
    return value


def _ref(doc: Mapping[str, Any], path: str, what: str, default_ns: str) -> ObjectRef | None:
    ref = _get(doc, path, what, Mapping)
    if ref is None:
        return None
    name = _get(ref, "name", what + f" ({path})", str, required=True)
    ns = _get(ref, "namespace", what + f" ({path})", str) or default_ns
    return ObjectRef(ns, _dns_name(name, what, path + ".name"))


# The userinfo of a URL (after the scheme, up to the last "@" of the authority).
_USERINFO = re.compile(r"^([^:/?#]*:?//)[^/?#]*@")


def validate_address(address: str, what: str = "address", path: str = "spec.address") -> str:
    """
    Check that C{address} is an absolute C{http} or C{https} URL with a host
    and neither query nor fragment, and return it without a trailing slash.
    """
    # The messages quote the address into statuses and logs: never its
    # userinfo or query, where a password or a token would be.
    shown = repr(_USERINFO.sub(r"\1***@", address.partition("#")[0].partition("?")[0]))
    try:
        parts = urlsplit(address)
        port = parts.port
    except ValueError as e:
        raise InvalidObject(what, path, f"{shown} is not a URL ({e})") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidObject(what, path, f"{shown} must start with http:// or https://")
    if not parts.hostname:
        raise InvalidObject(what, path, f"{shown} has no host")
    if parts.query or parts.fragment:
        raise InvalidObject(what, path, f"{shown} must not carry a query or a fragment")
    if parts.username or parts.password:
        raise InvalidObject(what, path, "must not carry credentials; put them in a Secret")
    del port
    return address.rstrip("/")


def _meta(doc: Mapping[str, Any], what: str, namespaced: bool) -> tuple[str, str, str, int]:
    name = _get(doc, "metadata.name", what, str, required=True)
    _dns_name(name, what, "metadata.name")
    ns = ""
    if namespaced:
        ns = _get(doc, "metadata.namespace", what, str) or "default"
        _dns_name(ns, what, "metadata.namespace")
    uid = _get(doc, "metadata.uid", what, str) or ""
    generation = _get(doc, "metadata.generation", what, int) or 0
    return name, ns, uid, generation


def parse_connector_class(doc: Mapping[str, Any]) -> ConnectorClass:
    what = describe(doc)
    name, _, _, generation = _meta(doc, what, namespaced=False)
    annotations = _get(doc, "metadata.annotations", what, Mapping) or {}
    types = []
    for i, entry in enumerate(_get(doc, "spec.auth.types", what, list) or []):
        path = f"spec.auth.types[{i}]"
        if not isinstance(entry, Mapping):
            raise InvalidObject(what, path, "must be a mapping")
        types.append(AuthType(
            name=_get(entry, "name", what + f" ({path})", str, required=True),
            secret_type=_get(entry, "secretType", what + f" ({path})", str),
            optional=bool(_get(entry, "optional", what + f" ({path})", bool)),
            generator=_get(entry, "generator.rego", what + f" ({path})", str) or None,
        ))
    protocol = annotations.get(PROTOCOL_ANNOTATION)
    if protocol is None:
        protocol = protocols.infer(name, (t.secret_type for t in types))
    elif protocol not in protocols.NAMES:
        raise InvalidObject(
            what, f"metadata.annotations[{PROTOCOL_ANNOTATION}]",
            f"{protocol!r} is not one of {', '.join(protocols.NAMES)}",
        )
    proxy = None
    ref = _get(doc, "spec.proxy.ref", what, Mapping)
    if ref is not None:
        proxy = ProxyDestination(
            kind=_get(ref, "kind", what, str) or "Service",
            name=_get(ref, "name", what + " (spec.proxy.ref)", str, required=True),
            namespace=_get(ref, "namespace", what, str) or "default",
        )
    uri = _get(doc, "spec.proxy.uri", what, str) or None
    # Upstream knows host and path; anything else is its default, host.
    resolver = RESOLVER_PATH if str(annotations.get(RESOLVER_ANNOTATION, "")).strip().lower() == RESOLVER_PATH \
        else RESOLVER_HOST
    extractor = _get(doc, "spec.proxy.authExtractor.rego", what, str) or None
    return ConnectorClass(name, protocol, tuple(types), proxy, generation, proxy_uri=uri, resolver=resolver,
                          extractor=extractor)


def _address_extensions(doc: Mapping[str, Any], what: str, address: str) -> tuple[AddressExtension, ...]:
    """
    C{spec.addressExtensions}: C{[{name, value}]}, names unique, each value
    an http(s) URL other than C{spec.address} (upstream's admission rules;
    whether the class declares each name is the class's business).
    """
    extensions: list[AddressExtension] = []
    for i, entry in enumerate(_get(doc, "spec.addressExtensions", what, list) or []):
        path = f"spec.addressExtensions[{i}]"
        if not isinstance(entry, Mapping):
            raise InvalidObject(what, path, "must be a mapping")
        name = _get(entry, "name", what + f" ({path})", str, required=True)
        value = _get(entry, "value", what + f" ({path})", str, required=True)
        if any(e.name == name for e in extensions):
            raise InvalidObject(what, path + ".name", f"{name!r} is listed twice")
        value = validate_address(value, what, path + ".value")
        if value == address:
            raise InvalidObject(what, path + ".value", "is spec.address itself")
        extensions.append(AddressExtension(name, value))
    return tuple(extensions)


def parse_connector(doc: Mapping[str, Any]) -> Connector:
    what = describe(doc)
    name, ns, uid, generation = _meta(doc, what, namespaced=True)
    address = validate_address(_get(doc, "spec.address", what, str, required=True), what)
    return Connector(
        namespace=ns,
        name=name,
        class_name=_get(doc, "spec.connectorClassName", what, str, required=True),
        address=address,
        address_extensions=_address_extensions(doc, what, address),
        auth_name=_get(doc, "spec.auth.name", what, str),
        secret_ref=_ref(doc, "spec.auth.secretRef", what, ns),
        ca_secret_ref=_ref(doc, "spec.caCertSecretRef", what, ns),
        client_cert_secret_ref=_ref(doc, "spec.clientCertSecretRef", what, ns),
        uid=uid,
        generation=generation,
    )


def parse_secret(doc: Mapping[str, Any]) -> Secret:
    what = describe(doc)
    name, ns, _, _ = _meta(doc, what, namespaced=True)
    data: dict[str, bytes] = {}
    for key, value in (_get(doc, "data", what, Mapping) or {}).items():
        if not isinstance(value, str):
            raise InvalidObject(what, f"data.{key}", "must be a base64 string")
        try:
            data[key] = base64.b64decode(value.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise InvalidObject(what, f"data.{key}", "is not valid base64") from None
    for key, value in (_get(doc, "stringData", what, Mapping) or {}).items():
        if not isinstance(value, str):
            raise InvalidObject(what, f"stringData.{key}", "must be a string")
        data[key] = value.encode("utf-8")
    labels = (doc.get("metadata") or {}).get("labels")
    # Label values are compared as label selectors do: exactly.
    ca_cert = isinstance(labels, Mapping) and labels.get(CA_CERT_LABEL) == "true"
    return Secret(ns, name, _get(doc, "type", what, str) or "Opaque", data, ca_cert=ca_cert)


def parse_config_map(doc: Mapping[str, Any]) -> ConfigMap | None:
    """
    C{connectors-config} (L{ConfigMap}); any other ConfigMap is none of the
    proxy's business (C{None}).
    """
    meta = doc.get("metadata")
    if not isinstance(meta, Mapping) or meta.get("name") != CONFIG_MAP:
        return None
    name, ns, _, _ = _meta(doc, describe(doc), namespaced=True)
    return ConfigMap(ns, name, parse_flags(doc))


_PARSERS: dict[tuple[str, str], Callable[[Mapping[str, Any]], KubeObject | None]] = {
    ("ConnectorClass", API_VERSION): parse_connector_class,
    ("Connector", API_VERSION): parse_connector,
    ("Secret", "v1"): parse_secret,
    ("ConfigMap", "v1"): parse_config_map,
}


def parse_object(doc: Any) -> KubeObject | None:
    """
    Parse one manifest.  Objects of kinds the proxy does not read (a
    Namespace, a Deployment in the same file) give C{None}.
    """
    if not isinstance(doc, Mapping):
        raise InvalidObject("<document>", "(top level)", "must be a mapping")
    kind = doc.get("kind")
    version = doc.get("apiVersion")
    if not isinstance(kind, str):
        raise InvalidObject(describe(doc), "kind", "is required")
    parser = _PARSERS.get((kind, version)) if isinstance(version, str) else None
    if parser is None:
        if kind in ("ConnectorClass", "Connector") and version != API_VERSION:
            raise InvalidObject(describe(doc), "apiVersion", f"must be {API_VERSION}")
        return None
    return parser(doc)
