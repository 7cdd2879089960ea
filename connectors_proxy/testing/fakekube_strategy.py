# -*- test-case-name: tests.test_fakekube_contract -*-
"""
What the fake API server does to an object before it stores it, per
resource type: defaulting, pruning, validation and the rules of update
(status subresource, generation, immutable fields).  This is the part of a
real kube-apiserver (its registry "strategies" and CRD structural schemas)
that a client sees reflected in the objects it reads back, so a reconciler
tested against the fake learns, for instance, that a Service comes back
with C{sessionAffinity: None} it never wrote.

Pure functions over JSON values; the only state is the address allocator
handed in.
"""

from __future__ import annotations

import base64
import binascii
import copy
import functools
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from attrs import define, field
from jsonschema import Draft4Validator
from jsonschema.exceptions import ValidationError

from connectors_proxy.testing.fakekube_model import (
    JSON,
    Cause,
    ResourceType,
    bad_request,
    format_micro_time,
    immutable,
    invalid_value,
    parse_time,
    required,
)

_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_CONFIG_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_QUALIFIED = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")

SUBDOMAIN_MSG = ("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or "
                 "'.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used "
                 "for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')")
LABEL_1123_MSG = ("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and "
                  "must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex "
                  "used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')")
LABEL_1035_MSG = ("a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an "
                  "alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or "
                  "'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')")


def is_subdomain(value: str) -> bool:
    return len(value) <= 253 and bool(_SUBDOMAIN.match(value))


def is_label_1123(value: str) -> bool:
    return len(value) <= 63 and bool(_LABEL_1123.match(value))


def is_label_1035(value: str) -> bool:
    return len(value) <= 63 and bool(_LABEL_1035.match(value))


#: ObjectMeta's fields; anything else under C{metadata} is dropped on
#: decoding, as the typed ObjectMeta of the real server does.
_META_FIELDS = frozenset({
    "name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation",
    "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "labels", "annotations",
    "ownerReferences", "finalizers", "managedFields",
})
#: ObjectMeta's fields in the order the real server writes them.
_META_ORDER = ("name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation",
               "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "labels", "annotations",
               "ownerReferences", "finalizers", "managedFields")
#: Fields the server owns; PUT and PATCH cannot change them.
SYSTEM_META = ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "generation")


def clean_meta(obj: JSON) -> None:
    """Drop unknown and empty (C{omitempty}) metadata fields, as a round trip through ObjectMeta does."""
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        return
    for key in list(meta):
        value = meta[key]
        if key not in _META_FIELDS or value is None or value == {} or value == [] or value == "":
            del meta[key]


def ordered(builtin: bool, obj: JSON) -> JSON:
    """
    C{obj} with its keys in the order the real server writes them: typed
    objects in struct order (kind, apiVersion, metadata, ...), custom
    resources sorted (Go marshals an unstructured map's keys in order).
    """
    meta = obj.get("metadata") or {}
    meta = {k: meta[k] for k in _META_ORDER if k in meta}
    if builtin:
        head = {"kind": obj.get("kind"), "apiVersion": obj.get("apiVersion"), "metadata": meta}
        return head | {k: v for k, v in obj.items() if k not in head}
    return {k: (meta if k == "metadata" else obj[k]) for k in sorted(obj)}


def validate_meta(rtype: ResourceType, obj: JSON, name_check: Callable[[str], bool],
                  name_msg: str) -> list[Cause]:
    """ObjectMeta rules shared by every type: name, labels, annotations, ownerReferences."""
    meta = obj.get("metadata") or {}
    causes: list[Cause] = []
    name = meta.get("name", "")
    if not isinstance(name, str) or not name:
        causes.append(Cause("metadata.name", "Required value: name or generateName is required",
                            "FieldValueRequired"))
    elif not name_check(name):
        causes.append(invalid_value("metadata.name", name, name_msg))
    for key, value in (meta.get("labels") or {}).items():
        if not isinstance(key, str) or not _QUALIFIED.match(key):
            causes.append(invalid_value("metadata.labels", key, "name part must consist of alphanumeric "
                                        "characters, '-', '_' or '.'"))
        elif not isinstance(value, str) or not _LABEL_VALUE.match(value):
            causes.append(invalid_value("metadata.labels", value, "a valid label must be an empty string "
                                        "or consist of alphanumeric characters, '-', '_' or '.', and must "
                                        "start and end with an alphanumeric character"))
    for key, value in (meta.get("annotations") or {}).items():
        if not isinstance(key, str) or not _QUALIFIED.match(key):
            causes.append(invalid_value("metadata.annotations", key, "name part must consist of "
                                        "alphanumeric characters, '-', '_' or '.'"))
        elif not isinstance(value, str):
            causes.append(invalid_value(f"metadata.annotations[{key}]", value, "must be a string"))
    if len(json.dumps(meta.get("annotations") or {})) > 256 * 1024:
        causes.append(Cause("metadata.annotations", "Too long: must have at most 262144 bytes",
                            "FieldValueTooLong"))
    controllers = 0
    for i, ref in enumerate(meta.get("ownerReferences") or []):
        path = f"metadata.ownerReferences[{i}]"
        if not isinstance(ref, dict):
            causes.append(invalid_value(path, ref, "must be an object"))
            continue
        for key in ("apiVersion", "kind", "name", "uid"):
            if not ref.get(key):
                causes.append(invalid_value(f"metadata.ownerReferences.{key}", "",
                                            f"{key} must not be empty"))
        controllers += bool(ref.get("controller"))
    if controllers > 1:
        causes.append(invalid_value("metadata.ownerReferences", "...",
                                    "Only one reference can have Controller set to true"))
    for i, finalizer in enumerate(meta.get("finalizers") or []):
        if not isinstance(finalizer, str) or not _QUALIFIED.match(finalizer):
            causes.append(invalid_value(f"metadata.finalizers[{i}]", finalizer,
                                        "name part must consist of alphanumeric characters"))
    return causes


@define
class Allocator:
    """Cluster IPs and node ports handed out to Services, never twice."""

    _next_ip: int = 10
    _next_node_port: int = 30000

    def cluster_ip(self) -> str:
        n = self._next_ip
        self._next_ip += 1
        return f"10.96.{n // 256}.{n % 256}"

    def node_port(self) -> int:
        port = self._next_node_port
        self._next_node_port += 1
        return port


@define
class Strategy:
    """
    The generic rules; a subclass per type adds its own.  C{normalize}
    applies the server's defaults and pruning (it may raise a 400 for a body
    that does not decode), C{validate} lists the 422 causes.
    """

    rtype: ResourceType
    #: Whether metadata.generation exists and counts spec changes (CRs).
    has_generation: bool = False
    #: A PUT without metadata.resourceVersion is refused (CRs) instead of applied.
    allow_unconditional_update: bool = True
    #: DELETE answers with the object instead of a Status.
    delete_returns_object: bool = False
    #: Top-level fields the typed object has; others are dropped.
    top_fields: frozenset[str] | None = None

    @property
    def status_subresource(self) -> bool:
        return "status" in self.rtype.subresources

    def name_check(self) -> tuple[Callable[[str], bool], str]:
        return is_subdomain, SUBDOMAIN_MSG

    def normalize(self, obj: JSON, old: JSON | None) -> None:
        if self.top_fields is not None:
            for key in list(obj):
                if key not in self.top_fields and key not in ("apiVersion", "kind", "metadata"):
                    del obj[key]

    def prepare_create(self, obj: JSON) -> None:
        """Drop what a create may not set (status, for types with a status subresource)."""
        if self.status_subresource:
            obj.pop("status", None)

    def validate(self, obj: JSON, old: JSON | None) -> list[Cause]:
        check, msg = self.name_check()
        return validate_meta(self.rtype, obj, check, msg)

    def spec_changed(self, new: JSON, old: JSON) -> bool:
        """Whether anything but metadata and status differs (what bumps metadata.generation)."""
        def content(obj: JSON) -> JSON:
            return {k: v for k, v in obj.items() if k not in ("metadata", "status")}
        return content(new) != content(old)


def _decode_bytes_map(rtype: ResourceType, obj: JSON, key: str) -> dict[str, bytes]:
    data = obj.get(key) or {}
    if not isinstance(data, dict):
        raise bad_request(f'{rtype.kind} in version "{rtype.version}" cannot be handled as a {rtype.kind}: '
                          f"json: cannot unmarshal into Go struct field {rtype.kind}.{key}")
    decoded = {}
    for name, value in data.items():
        try:
            if not isinstance(value, str):
                raise ValueError
            decoded[name] = base64.b64decode(value.encode("ascii"), validate=True)
        except (ValueError, binascii.Error):
            raise bad_request(f'{rtype.kind} in version "{rtype.version}" cannot be handled as a '
                              f"{rtype.kind}: illegal base64 data at input byte 0") from None
    return decoded


@define
class SecretStrategy(Strategy):
    top_fields: frozenset[str] | None = frozenset({"data", "stringData", "type", "immutable"})

    def normalize(self, obj: JSON, old: JSON | None) -> None:
        super().normalize(obj, old)
        data = _decode_bytes_map(self.rtype, obj, "data")
        string_data = obj.pop("stringData", None) or {}
        if not isinstance(string_data, dict) or not all(isinstance(v, str) for v in string_data.values()):
            raise bad_request('Secret in version "v1" cannot be handled as a Secret: stringData must be '
                              "a map of strings")
        # The server folds stringData into data (stringData wins) and never stores it.
        for name, value in string_data.items():
            data[name] = value.encode("utf-8")
        if data:
            obj["data"] = {k: base64.b64encode(v).decode("ascii") for k, v in data.items()}
        else:
            obj.pop("data", None)
        obj["type"] = obj.get("type") or "Opaque"

    def validate(self, obj: JSON, old: JSON | None) -> list[Cause]:
        causes = super().validate(obj, old)
        data = _decode_bytes_map(self.rtype, obj, "data")
        for key in data:
            if not _CONFIG_KEY.match(key):
                causes.append(invalid_value(f"data[{key}]", key, "a valid config key must consist of "
                                            "alphanumeric characters, '-', '_' or '.'"))
        if sum(len(v) for v in data.values()) > 1024 * 1024:
            causes.append(Cause("data", "Too long: must have at most 1048576 bytes", "FieldValueTooLong"))
        kind = obj["type"]
        if kind == "kubernetes.io/basic-auth" and "username" not in data and "password" not in data:
            causes += [required("data[username]"), required("data[password]")]
        elif kind == "kubernetes.io/dockerconfigjson":
            if ".dockerconfigjson" not in data:
                causes.append(required("data[.dockerconfigjson]"))
            else:
                try:
                    json.loads(data[".dockerconfigjson"])
                except ValueError:
                    causes.append(invalid_value("data[.dockerconfigjson]", "<secret contents redacted>",
                                                "invalid JSON"))
        elif kind == "kubernetes.io/tls":
            causes += [required(f"data[{k}]") for k in ("tls.crt", "tls.key") if k not in data]
        if old is not None:
            if obj["type"] != old.get("type"):
                causes.append(immutable("type", obj["type"]))
            if old.get("immutable"):
                if not obj.get("immutable"):
                    causes.append(Cause("immutable", "Forbidden: field is immutable when `immutable` is set",
                                        "FieldValueForbidden"))
                elif obj.get("data") != old.get("data"):
                    causes.append(Cause("data", "Forbidden: field is immutable when `immutable` is set",
                                        "FieldValueForbidden"))
        return causes


@define
class ConfigMapStrategy(Strategy):
    top_fields: frozenset[str] | None = frozenset({"data", "binaryData", "immutable"})

    def validate(self, obj: JSON, old: JSON | None) -> list[Cause]:
        causes = super().validate(obj, old)
        for key in list(obj.get("data") or {}) + list(obj.get("binaryData") or {}):
            if not _CONFIG_KEY.match(key):
                causes.append(invalid_value(f"data[{key}]", key, "a valid config key must consist of "
                                            "alphanumeric characters, '-', '_' or '.'"))
        if old is not None and old.get("immutable") and (
                obj.get("data") != old.get("data") or obj.get("binaryData") != old.get("binaryData")):
            causes.append(Cause("data", "Forbidden: field is immutable when `immutable` is set",
                                "FieldValueForbidden"))
        return causes


_SERVICE_TYPES = ("ClusterIP", "ExternalName", "LoadBalancer", "NodePort")
_ALLOCATED = ("clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy")


@define
class ServiceStrategy(Strategy):
    """
    The Service rules a reconciler meets: defaults it never wrote
    (C{type}, C{sessionAffinity}, C{protocol}, C{targetPort}, cluster IPs,
    C{internalTrafficPolicy}), allocated values kept across a PUT that
    omits them, DNS-1035 names, ExternalName checks, an immutable
    C{clusterIP}.
    """

    allocator: Allocator = field(factory=Allocator)
    delete_returns_object: bool = True
    top_fields: frozenset[str] | None = frozenset({"spec", "status"})

    def name_check(self) -> tuple[Callable[[str], bool], str]:
        return is_label_1035, LABEL_1035_MSG

    def prepare_create(self, obj: JSON) -> None:
        obj["status"] = {"loadBalancer": {}}

    def normalize(self, obj: JSON, old: JSON | None) -> None:
        super().normalize(obj, old)
        spec = obj.get("spec")
        if not isinstance(spec, dict):
            spec = obj["spec"] = {}
        kind = spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        for port in spec.get("ports") or []:
            if isinstance(port, dict):
                port.setdefault("protocol", "TCP")
                if "targetPort" not in port and "port" in port:
                    port["targetPort"] = port["port"]
        if kind == "ExternalName":
            return
        old_spec = (old or {}).get("spec") or {}
        if old_spec and old_spec.get("type", "ClusterIP") != "ExternalName":
            # A PUT that omits the allocated values keeps them, as the real
            # registry's patchAllocatedValues does.
            for key in _ALLOCATED:
                if not spec.get(key) and old_spec.get(key):
                    spec[key] = copy.deepcopy(old_spec[key])
        if not spec.get("clusterIP"):
            spec["clusterIP"] = self.allocator.cluster_ip()
        spec.setdefault("clusterIPs", [spec["clusterIP"]])
        spec.setdefault("ipFamilies", ["IPv4"])
        spec.setdefault("ipFamilyPolicy", "SingleStack")
        spec.setdefault("internalTrafficPolicy", "Cluster")
        if kind in ("NodePort", "LoadBalancer"):
            spec.setdefault("externalTrafficPolicy", "Cluster")
            old_ports = {p.get("port"): p.get("nodePort") for p in old_spec.get("ports") or []
                         if isinstance(p, dict)}
            for port in spec.get("ports") or []:
                if isinstance(port, dict) and not port.get("nodePort"):
                    port["nodePort"] = old_ports.get(port.get("port")) or self.allocator.node_port()
        if kind == "LoadBalancer":
            spec.setdefault("allocateLoadBalancerNodePorts", True)

    def validate(self, obj: JSON, old: JSON | None) -> list[Cause]:
        causes = super().validate(obj, old)
        spec = obj["spec"]
        kind = spec.get("type")
        if kind not in _SERVICE_TYPES:
            causes.append(Cause("spec.type", f'Unsupported value: "{kind}": supported values: '
                                + ", ".join(f'"{t}"' for t in _SERVICE_TYPES), "FieldValueNotSupported"))
        ports = spec.get("ports") or []
        if kind == "ExternalName":
            external = spec.get("externalName")
            if not external:
                causes.append(required("spec.externalName"))
            elif not isinstance(external, str) or not is_subdomain(external.rstrip(".")):
                causes.append(invalid_value("spec.externalName", external, SUBDOMAIN_MSG))
            if spec.get("clusterIP"):
                causes.append(invalid_value("spec.clusterIPs", spec["clusterIP"],
                                            "must be empty for ExternalName services"))
        elif not ports and spec.get("clusterIP") != "None":
            causes.append(required("spec.ports"))
        names: set[str] = set()
        for i, port in enumerate(ports):
            path = f"spec.ports[{i}]"
            if not isinstance(port, dict):
                causes.append(invalid_value(path, port, "must be an object"))
                continue
            number = port.get("port")
            if not isinstance(number, int) or not 1 <= number <= 65535:
                causes.append(invalid_value(path + ".port", number, "must be between 1 and 65535, inclusive"))
            name = port.get("name", "")
            if len(ports) > 1 and not name:
                causes.append(required(path + ".name"))
            elif name and not is_label_1123(name):
                causes.append(invalid_value(path + ".name", name, LABEL_1123_MSG))
            if name and name in names:
                causes.append(Cause(path + ".name", f'Duplicate value: "{name}"', "FieldValueDuplicate"))
            names.add(name)
            if port.get("protocol") not in ("TCP", "UDP", "SCTP"):
                causes.append(Cause(path + ".protocol", f'Unsupported value: "{port.get("protocol")}": '
                                    'supported values: "SCTP", "TCP", "UDP"', "FieldValueNotSupported"))
        old_spec = (old or {}).get("spec") or {}
        if old is not None and kind != "ExternalName" and old_spec.get("type") != "ExternalName" \
                and spec.get("clusterIP") != old_spec.get("clusterIP"):
            causes.append(immutable("spec.clusterIPs[0]", spec.get("clusterIP")))
        return causes


@define
class NamespaceStrategy(Strategy):
    top_fields: frozenset[str] | None = frozenset({"spec", "status"})
    delete_returns_object: bool = True

    def name_check(self) -> tuple[Callable[[str], bool], str]:
        return is_label_1123, LABEL_1123_MSG

    def prepare_create(self, obj: JSON) -> None:
        obj["status"] = {"phase": "Active"}

    def normalize(self, obj: JSON, old: JSON | None) -> None:
        super().normalize(obj, old)
        meta = obj.setdefault("metadata", {})
        labels = meta.setdefault("labels", {})
        labels["kubernetes.io/metadata.name"] = meta.get("name", "")
        spec = obj.setdefault("spec", {})
        if not isinstance(spec, dict):
            raise bad_request("Namespace spec must be an object")
        spec.setdefault("finalizers", ["kubernetes"])


@define
class LeaseStrategy(Strategy):
    top_fields: frozenset[str] | None = frozenset({"spec"})

    def normalize(self, obj: JSON, old: JSON | None) -> None:
        super().normalize(obj, old)
        spec = obj.get("spec")
        if spec is None:
            obj["spec"] = {}
            return
        if not isinstance(spec, dict):
            raise bad_request('Lease in version "v1" cannot be handled as a Lease: spec must be an object')
        # MicroTime fields come back with exactly six fractional digits.
        for key in ("acquireTime", "renewTime"):
            value = spec.get(key)
            if value is None:
                spec.pop(key, None)
                continue
            when = parse_time(value) if isinstance(value, str) else None
            if when is None:
                raise bad_request(f'Lease in version "v1" cannot be handled as a Lease: parsing time '
                                  f'"{value}" as "2006-01-02T15:04:05.000000Z07:00": cannot parse')
            spec[key] = format_micro_time(when)

    def validate(self, obj: JSON, old: JSON | None) -> list[Cause]:
        causes = super().validate(obj, old)
        spec = obj.get("spec") or {}
        duration = spec.get("leaseDurationSeconds")
        if duration is not None and (not isinstance(duration, int) or duration <= 0):
            causes.append(invalid_value("spec.leaseDurationSeconds", duration, "must be greater than 0"))
        transitions = spec.get("leaseTransitions")
        if transitions is not None and (not isinstance(transitions, int) or transitions < 0):
            causes.append(invalid_value("spec.leaseTransitions", transitions,
                                        "must be greater than or equal to 0"))
        holder = spec.get("holderIdentity")
        if holder is not None and not isinstance(holder, str):
            causes.append(invalid_value("spec.holderIdentity", holder, "must be a string"))
        return causes


@define
class RoleStrategy(Strategy):
    top_fields: frozenset[str] | None = frozenset({"rules", "aggregationRule"})

    def validate(self, obj: JSON, old: JSON | None) -> list[Cause]:
        causes = super().validate(obj, old)
        for i, rule in enumerate(obj.get("rules") or []):
            if not isinstance(rule, dict) or not rule.get("verbs"):
                causes.append(required(f"rules[{i}].verbs"))
            elif not rule.get("resources") and not rule.get("nonResourceURLs"):
                causes.append(required(f"rules[{i}].resources"))
        return causes


@define
class BindingStrategy(Strategy):
    top_fields: frozenset[str] | None = frozenset({"subjects", "roleRef"})

    def validate(self, obj: JSON, old: JSON | None) -> list[Cause]:
        causes = super().validate(obj, old)
        ref = obj.get("roleRef")
        if not isinstance(ref, dict):
            causes.append(required("roleRef"))
        else:
            for key in ("kind", "name"):
                if not ref.get(key):
                    causes.append(required(f"roleRef.{key}"))
            if ref.get("kind") not in ("Role", "ClusterRole"):
                causes.append(Cause("roleRef.kind", f'Unsupported value: "{ref.get("kind")}": supported '
                                    'values: "Role", "ClusterRole"', "FieldValueNotSupported"))
        if old is not None and obj.get("roleRef") != old.get("roleRef"):
            causes.append(invalid_value("roleRef", "...", "cannot change roleRef"))
        for i, subject in enumerate(obj.get("subjects") or []):
            if not isinstance(subject, dict) or not subject.get("name"):
                causes.append(required(f"subjects[{i}].name"))
            elif subject.get("kind") == "ServiceAccount" and not subject.get("namespace") \
                    and not self.rtype.namespaced:
                causes.append(required(f"subjects[{i}].namespace"))
        return causes


@define
class CustomResourceStrategy(Strategy):
    """
    A custom resource with a structural schema from its CRD: unknown fields
    pruned (unless C{x-kubernetes-preserve-unknown-fields}), nulls of
    non-nullable fields dropped, defaults applied, then validated.
    """

    schema: JSON | None = None
    has_generation: bool = True
    allow_unconditional_update: bool = False

    def normalize(self, obj: JSON, old: JSON | None) -> None:
        if self.schema is None:
            return
        for key in list(obj):
            if key in ("apiVersion", "kind", "metadata"):
                continue
            props = self.schema.get("properties") or {}
            if key not in props:
                if not self.schema.get("x-kubernetes-preserve-unknown-fields"):
                    del obj[key]
                continue
            if obj[key] is None and not props[key].get("nullable"):
                del obj[key]
                continue
            obj[key] = prune(obj[key], props[key])
        for key, sub in (self.schema.get("properties") or {}).items():
            if key not in ("apiVersion", "kind", "metadata") and key not in obj and "default" in sub:
                obj[key] = prune(copy.deepcopy(sub["default"]), sub)

    def validate(self, obj: JSON, old: JSON | None) -> list[Cause]:
        causes = super().validate(obj, old)
        if self.schema is None:
            return causes
        body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
        schema = dict(self.schema)
        props = {k: v for k, v in (schema.get("properties") or {}).items()
                 if k not in ("apiVersion", "kind", "metadata")}
        schema["properties"] = props
        validator = Draft4Validator(to_jsonschema(schema))
        for error in sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path)):
            causes.extend(_causes(error))
        return causes


def prune(value: Any, schema: Mapping[str, Any]) -> Any:
    """
    Drop the fields C{schema} does not declare, the way a structural
    schema prunes a custom resource; apply C{default}s of missing fields.
    """
    if isinstance(value, dict):
        if schema.get("x-kubernetes-int-or-string"):
            return value
        props = schema.get("properties")
        additional = schema.get("additionalProperties")
        preserve = schema.get("x-kubernetes-preserve-unknown-fields")
        result = {}
        for key, item in value.items():
            if props and key in props:
                sub = props[key]
            elif isinstance(additional, dict):
                sub = additional
            elif preserve or additional is True:
                result[key] = item
                continue
            else:
                continue
            if item is None and not sub.get("nullable"):
                continue
            result[key] = prune(item, sub)
        for key, sub in (props or {}).items():
            if key not in result and "default" in sub:
                result[key] = prune(copy.deepcopy(sub["default"]), sub)
        return result
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [prune(item, schema["items"]) for item in value]
    return value


def to_jsonschema(schema: Any) -> Any:
    """An OpenAPI v3 CRD schema as JSON Schema draft 4: C{nullable} becomes a C{null} type."""
    if isinstance(schema, list):
        return [to_jsonschema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: to_jsonschema(v) for k, v in schema.items()
           if not k.startswith("x-kubernetes-") and k not in ("nullable", "format", "example")}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in schema:
        out["properties"] = {k: to_jsonschema(v) for k, v in schema["properties"].items()}
    return out


def _path(error: ValidationError) -> str:
    text = ""
    for part in error.absolute_path:
        text += f"[{part}]" if isinstance(part, int) else ("." if text else "") + str(part)
    return text


def _causes(error: ValidationError) -> list[Cause]:
    path = _path(error)
    instance = error.instance
    if error.validator == "required":
        present = instance if isinstance(instance, dict) else {}
        return [required(f"{path}.{key}" if path else key)
                for key in error.validator_value if key not in present]
    if error.validator == "type":
        kinds = error.validator_value
        kind = kinds if isinstance(kinds, str) else kinds[0]
        got = type(instance).__name__
        got = {"str": "string", "int": "integer", "dict": "object", "list": "array", "bool": "boolean",
               "float": "number", "NoneType": "null"}.get(got, got)
        return [invalid_value(path, got, f"{path} in body must be of type {kind}: \"{got}\"")]
    if error.validator == "enum":
        allowed = ", ".join(json.dumps(v) for v in error.validator_value)
        return [Cause(path, f"Unsupported value: {json.dumps(instance)}: supported values: {allowed}",
                      "FieldValueNotSupported")]
    return [invalid_value(path, instance if isinstance(instance, (str, int)) else "...",
                          f"{path} in body {error.message}")]


# --- CRDs -------------------------------------------------------------------

def default_manifest_dir() -> Path | None:
    """
    The project's C{k8s/} folder: next to the package in a source tree, or
    in the working directory (tests run from the checkout while the package
    may be installed elsewhere, as under tox).
    """
    for here in (Path(__file__).resolve().parents[2] / "k8s", Path.cwd() / "k8s"):
        if (here / "crd-connectors.yaml").is_file():
            return here
    return None


def load_crd_schemas(docs: Iterable[Any]) -> dict[tuple[str, str, str], JSON]:
    """C{(group, version, plural)} -> openAPIV3Schema for each served version of each CRD in C{docs}."""
    schemas = {}
    for doc in docs:
        if not isinstance(doc, dict) or doc.get("kind") != "CustomResourceDefinition":
            continue
        spec = doc.get("spec") or {}
        for version in spec.get("versions") or []:
            schema = (version.get("schema") or {}).get("openAPIV3Schema")
            if version.get("served") and schema:
                schemas[(spec["group"], version["name"], spec["names"]["plural"])] = schema
    return schemas


def _yaml_files(paths: Sequence[Path]) -> list[Path]:
    return [file for path in paths for file in (sorted(path.glob("*.yaml")) if path.is_dir() else [path])]


def read_manifests(paths: Sequence[Path]) -> list[Any]:
    """Every YAML document of every C{*.yaml} under C{paths} (files or folders)."""
    docs: list[Any] = []
    for file in _yaml_files(paths):
        with open(file, encoding="utf-8") as f:
            docs.extend(d for d in yaml.load_all(f, Loader=_LOADER) if d is not None)
    return docs


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def crd_schemas(paths: Sequence[Path]) -> dict[tuple[str, str, str], JSON]:
    """
    L{load_crd_schemas} of the manifests under C{paths}, parsed once per
    version of the files (every fake a test suite starts reads the same CRDs).
    The result is shared: read it, never change it.
    """
    files = _yaml_files(paths)
    return _cached_schemas(tuple((str(f), f.stat().st_mtime_ns) for f in files))


@functools.lru_cache(maxsize=8)
def _cached_schemas(files: tuple[tuple[str, int], ...]) -> dict[tuple[str, str, str], JSON]:
    return load_crd_schemas(read_manifests([Path(name) for name, _ in files]))


def strategies(allocator: Allocator, crd_schemas: Mapping[tuple[str, str, str], JSON],
               rtypes: Iterable[ResourceType]) -> dict[ResourceType, Strategy]:
    table: dict[str, Callable[[ResourceType], Strategy]] = {
        "secrets": lambda r: SecretStrategy(r),
        "configmaps": lambda r: ConfigMapStrategy(r),
        "services": lambda r: ServiceStrategy(r, allocator=allocator),
        "namespaces": lambda r: NamespaceStrategy(r),
        "leases": lambda r: LeaseStrategy(r),
        "serviceaccounts": lambda r: Strategy(r, top_fields=frozenset(
            {"secrets", "imagePullSecrets", "automountServiceAccountToken"})),
        "roles": lambda r: RoleStrategy(r),
        "clusterroles": lambda r: RoleStrategy(r),
        "rolebindings": lambda r: BindingStrategy(r),
        "clusterrolebindings": lambda r: BindingStrategy(r),
    }
    result: dict[ResourceType, Strategy] = {}
    for rtype in rtypes:
        if not rtype.builtin:
            result[rtype] = CustomResourceStrategy(
                rtype, schema=crd_schemas.get((rtype.group, rtype.version, rtype.plural)))
        else:
            result[rtype] = table.get(rtype.plural, Strategy)(rtype)
    return result


