# -*- test-case-name: tests.test_fakekube_contract -*-
"""
The vocabulary of the fake Kubernetes API server: the resource types it
serves, its errors (rendered as real C{Status} bodies), label and field
selectors, and the three patch formats.  Pure functions over plain JSON
values; no reactor, no HTTP.
"""

from __future__ import annotations

import copy
import datetime
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from attrs import frozen

JSON = dict[str, Any]


@frozen
class ResourceType:
    """One REST resource, as discovery would describe it."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    subresources: frozenset[str] = frozenset()
    #: Only C{create} (TokenReview, SubjectAccessReview): nothing is stored.
    virtual: bool = False
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def list_kind(self) -> str:
        return self.kind + "List"

    @property
    def qualified(self) -> str:
        """C{connectors.connectors.alauda.io}, C{secrets}: how errors name the resource."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def qualified_kind(self) -> str:
        """C{Connector.connectors.alauda.io}, C{Secret}: how C{Invalid} errors name the kind."""
        return f"{self.kind}.{self.group}" if self.group else self.kind

    @property
    def builtin(self) -> bool:
        """Typed (compiled-in) resources; custom resources are unstructured."""
        return self.group != "connectors.alauda.io"

    def path(self, namespace: str | None = None, name: str | None = None) -> str:
        """The URL path of the collection, or of one object in it."""
        base = "/api/v1" if not self.group else f"/apis/{self.group}/{self.version}"
        if self.namespaced and namespace is not None:
            base += f"/namespaces/{namespace}"
        base += "/" + self.plural
        return base + ("/" + name if name is not None else "")


_CR = "connectors.alauda.io"
RESOURCES: tuple[ResourceType, ...] = (
    ResourceType("", "v1", "namespaces", "Namespace", False, frozenset({"status"}), short_names=("ns",)),
    ResourceType("", "v1", "secrets", "Secret", True),
    ResourceType("", "v1", "configmaps", "ConfigMap", True, short_names=("cm",)),
    ResourceType("", "v1", "services", "Service", True, frozenset({"status"}), short_names=("svc",)),
    ResourceType("", "v1", "serviceaccounts", "ServiceAccount", True, frozenset({"token"}),
                 short_names=("sa",)),
    ResourceType(_CR, "v1alpha1", "connectors", "Connector", True, frozenset({"status"}),
                 categories=("alauda",)),
    ResourceType(_CR, "v1alpha1", "connectorclasses", "ConnectorClass", False, frozenset({"status"}),
                 categories=("alauda",)),
    ResourceType("coordination.k8s.io", "v1", "leases", "Lease", True),
    ResourceType("authentication.k8s.io", "v1", "tokenreviews", "TokenReview", False, virtual=True),
    ResourceType("authorization.k8s.io", "v1", "subjectaccessreviews", "SubjectAccessReview", False,
                 virtual=True),
    ResourceType("authorization.k8s.io", "v1", "selfsubjectaccessreviews", "SelfSubjectAccessReview", False,
                 virtual=True),
    ResourceType("rbac.authorization.k8s.io", "v1", "roles", "Role", True),
    ResourceType("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True),
    ResourceType("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False),
    ResourceType("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", False),
)


def resource_type(group: str, version: str, plural: str) -> ResourceType | None:
    for rtype in RESOURCES:
        if (rtype.group, rtype.version, rtype.plural) == (group, version, plural):
            return rtype
    return None


def resource_by_name(name: str) -> ResourceType:
    """C{"secrets"}, C{"connectors"}, C{"leases"}: the one type of that plural name."""
    for rtype in RESOURCES:
        if rtype.plural == name:
            return rtype
    raise KeyError(name)


def resource_for_kind(api_version: str, kind: str) -> ResourceType | None:
    for rtype in RESOURCES:
        if rtype.api_version == api_version and rtype.kind == kind:
            return rtype
    return None


# --- errors -----------------------------------------------------------------

class ApiError(Exception):
    """
    A request the API server refuses, with the C{Status} body a real
    kube-apiserver would send.
    """

    def __init__(self, code: int, reason: str, message: str, details: JSON | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> JSON:
        body: JSON = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": self.message, "reason": self.reason}
        if self.details is not None:
            body["details"] = self.details
        body["code"] = self.code
        return body


def _details(rtype: ResourceType, name: str | None, kind: str | None = None) -> JSON:
    details: JSON = {}
    if name:
        details["name"] = name
    if rtype.group:
        details["group"] = rtype.group
    details["kind"] = kind or rtype.plural
    return details


def not_found(rtype: ResourceType, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{rtype.qualified} "{name}" not found', _details(rtype, name))


def already_exists(rtype: ResourceType, name: str) -> ApiError:
    return ApiError(409, "AlreadyExists", f'{rtype.qualified} "{name}" already exists',
                    _details(rtype, name))


def conflict(rtype: ResourceType, name: str, why: str = "the object has been modified; please apply "
             "your changes to the latest version and try again") -> ApiError:
    return ApiError(409, "Conflict", f'Operation cannot be fulfilled on {rtype.qualified} "{name}": {why}',
                    _details(rtype, name))


@frozen
class Cause:
    """One field problem of an C{Invalid} (422) error."""

    field: str
    message: str
    reason: str = "FieldValueInvalid"

    def text(self) -> str:
        return f"{self.field}: {self.message}"


def required(field: str) -> Cause:
    return Cause(field, "Required value", "FieldValueRequired")


def invalid_value(field: str, value: Any, why: str) -> Cause:
    shown = f'"{value}"' if isinstance(value, str) else repr(value)
    return Cause(field, f"Invalid value: {shown}: {why}")


def immutable(field: str, value: Any) -> Cause:
    return invalid_value(field, value, "field is immutable")


def invalid(rtype: ResourceType, name: str, causes: Sequence[Cause]) -> ApiError:
    texts = [c.text() for c in causes]
    joined = texts[0] if len(texts) == 1 else "[" + ", ".join(texts) + "]"
    details = _details(rtype, name, kind=rtype.kind)
    details["causes"] = [{"reason": c.reason, "message": c.message, "field": c.field} for c in causes]
    return ApiError(422, "Invalid", f'{rtype.qualified_kind} "{name}" is invalid: {joined}', details)


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def expired(requested: int, oldest: int) -> ApiError:
    return ApiError(410, "Expired", f"too old resource version: {requested} ({oldest})")


def forbidden(resource: str, group: str, verb: str, user: str,
              namespace: str | None, name: str | None) -> ApiError:
    """
    The 403 of the RBAC authorizer; C{resource} may carry a subresource
    (C{connectors/status}), as the real message does.
    """
    where = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
    plural = resource.split("/")[0]
    what = f"{plural}.{group}" if group else plural
    subject = f'{what} "{name}"' if name else what
    message = (f'{subject} is forbidden: User "{user}" cannot {verb} resource "{resource}" '
               f'in API group "{group}" {where}')
    details: JSON = {}
    if name:
        details["name"] = name
    if group:
        details["group"] = group
    details["kind"] = plural
    return ApiError(403, "Forbidden", message, details)


UNAUTHORIZED = ApiError(401, "Unauthorized", "Unauthorized")
PAGE_NOT_FOUND = ApiError(404, "NotFound", "the server could not find the requested resource", {})
METHOD_NOT_ALLOWED = ApiError(405, "MethodNotAllowed",
                              "the server does not allow this method on the requested resource", {})
UNAVAILABLE = ApiError(503, "ServiceUnavailable", "the server is currently unable to handle the request", {})


def unsupported_patch(accepted: Sequence[str]) -> ApiError:
    return ApiError(415, "UnsupportedMediaType",
                    "the body of the request was in an unknown format - accepted media types include: "
                    + ", ".join(accepted))


# --- time -------------------------------------------------------------------

def format_time(seconds: float) -> str:
    """metav1.Time: RFC 3339, whole seconds, UTC."""
    when = datetime.datetime.fromtimestamp(int(seconds), datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def format_micro_time(seconds: float) -> str:
    """metav1.MicroTime: RFC 3339 with exactly six fractional digits, UTC."""
    when = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> float | None:
    """Seconds since the epoch for an RFC 3339 timestamp, or C{None}."""
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    return when.timestamp()


# --- selectors --------------------------------------------------------------

Matcher = Callable[[Mapping[str, str]], bool]

_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


def _split_top(text: str) -> list[str]:
    """Split on commas outside parentheses: C{a in (x,y),b} -> two requirements."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


_SET_REQ = re.compile(r"^(\S+)\s+(in|notin)\s*\(([^()]*)\)$")
_OP_REQ = re.compile(r"^([^!=<>\s]+)\s*(==|=|!=|<|>)\s*(\S*)$")


def parse_label_selector(text: str) -> Matcher:
    """
    A predicate over a label map for a label selector string, with the
    grammar of kube-apiserver (C{=}, C{==}, C{!=}, C{in}, C{notin}, C{key},
    C{!key}, C{<}, C{>}); a malformed selector is a 400 like the real server's.
    """
    if not text.strip():
        return lambda labels: True
    tests: list[Matcher] = []
    for req in _split_top(text):
        tests.append(_label_requirement(req, text))

    def matches(labels: Mapping[str, str]) -> bool:
        return all(test(labels) for test in tests)
    return matches


def _check_key(key: str, selector: str) -> str:
    if not _LABEL_KEY.match(key):
        raise bad_request(f"unable to parse requirement: invalid label key \"{key}\" in selector {selector!r}")
    return key


def _label_requirement(req: str, selector: str) -> Matcher:
    if not req:
        raise bad_request(f"unable to parse requirement: empty requirement in {selector!r}")
    set_match = _SET_REQ.match(req)
    if set_match:
        key = _check_key(set_match.group(1), selector)
        values = {v.strip() for v in set_match.group(3).split(",")}
        if set_match.group(2) == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    op_match = _OP_REQ.match(req)
    if op_match:
        key = _check_key(op_match.group(1), selector)
        op, value = op_match.group(2), op_match.group(3)
        if not _LABEL_VALUE.match(value):
            raise bad_request(f"unable to parse requirement: invalid label value: \"{value}\"")
        if op in ("=", "=="):
            return lambda labels: labels.get(key) == value
        if op == "!=":
            return lambda labels: labels.get(key) != value
        try:
            bound = int(value)
        except ValueError:
            raise bad_request(f"unable to parse requirement: for 'Gt', 'Lt' operators, the value "
                              f"must be an integer: {value!r}") from None

        def compare(labels: Mapping[str, str]) -> bool:
            have = labels.get(key)
            if have is None or not have.lstrip("-").isdigit():
                return False
            return int(have) > bound if op == ">" else int(have) < bound
        return compare
    if req.startswith("!"):
        key = _check_key(req[1:].strip(), selector)
        return lambda labels: key not in labels
    key = _check_key(req, selector)
    return lambda labels: key in labels


def field_values(rtype: ResourceType, obj: Mapping[str, Any]) -> dict[str, str]:
    """The fields a field selector may name for C{rtype}, as the real server offers them."""
    meta = obj.get("metadata") or {}
    fields = {"metadata.name": meta.get("name", "")}
    if rtype.namespaced:
        fields["metadata.namespace"] = meta.get("namespace", "")
    if rtype.plural == "secrets":
        fields["type"] = obj.get("type", "")
    if rtype.plural == "namespaces":
        fields["status.phase"] = (obj.get("status") or {}).get("phase", "")
    if rtype.plural == "services":
        fields["spec.clusterIP"] = (obj.get("spec") or {}).get("clusterIP", "")
        fields["spec.type"] = (obj.get("spec") or {}).get("type", "")
    return fields


def parse_field_selector(rtype: ResourceType, text: str) -> Callable[[Mapping[str, Any]], bool]:
    """A predicate over an object for a field selector (C{=}, C{==}, C{!=} only)."""
    if not text.strip():
        return lambda obj: True
    sample = field_values(rtype, {"metadata": {}})
    tests: list[Callable[[Mapping[str, str]], bool]] = []
    for req in (p.strip() for p in text.split(",")):
        match = re.match(r"^([^!=]+?)\s*(==|=|!=)\s*(.*)$", req)
        if not match:
            raise bad_request(f"invalid selector: '{text}'; can't understand '{req}'")
        field, op, value = match.groups()
        if field not in sample:
            if rtype.builtin:
                raise bad_request(f'field label not supported: {field}')
            raise bad_request(f'"{field}" is not a known field selector: only "metadata.name", '
                              f'"metadata.namespace"')
        tests.append(_field_test(field, value, negate=op == "!="))

    def matches(obj: Mapping[str, Any]) -> bool:
        fields = field_values(rtype, obj)
        return all(test(fields) for test in tests)
    return matches


def _field_test(field: str, value: str, negate: bool) -> Callable[[Mapping[str, str]], bool]:
    def test(fields: Mapping[str, str]) -> bool:
        return (fields[field] == value) != negate
    return test


# --- patches ----------------------------------------------------------------

def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: C{null} deletes, objects merge, the rest replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


#: Lists that a strategic merge patch merges by key instead of replacing
#: (the C{patchMergeKey} tags of the core types this fake serves).
_MERGE_KEYS = {"ports": "port", "ownerReferences": "uid", "conditions": "type", "containers": "name",
               "env": "name", "volumes": "name", "volumeMounts": "mountPath", "imagePullSecrets": "name"}
#: Lists of scalars that strategic merge treats as sets.
_SET_LISTS = frozenset({"finalizers"})


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """
    A strategic merge patch, as far as the core types here need it: maps
    merge, lists with a known merge key merge item by item (C{$patch:
    delete} removes one), C{finalizers} merge as a set, other lists replace.
    The C{$setElementOrder} and C{$retainKeys} directives are accepted and
    ignored.
    """
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$setElementOrder/") or key in ("$retainKeys", "$patch"):
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            name = key.split("/", 1)[1]
            result[name] = [v for v in result.get(name) or [] if v not in value]
            continue
        if value is None:
            result.pop(key, None)
        elif isinstance(value, list) and key in _MERGE_KEYS and isinstance(result.get(key), list):
            result[key] = _merge_keyed_list(result[key], value, _MERGE_KEYS[key])
        elif isinstance(value, list) and key in _SET_LISTS and isinstance(result.get(key), list):
            result[key] = list(result[key]) + [v for v in value if v not in result[key]]
        elif isinstance(value, dict):
            result[key] = strategic_merge_patch(result.get(key), value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def _merge_keyed_list(current: list[Any], patch: list[Any], key: str) -> list[Any]:
    merged = list(current)
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            return copy.deepcopy(patch)
        index = next((i for i, have in enumerate(merged)
                      if isinstance(have, dict) and have.get(key) == item[key]), None)
        if item.get("$patch") == "delete":
            if index is not None:
                del merged[index]
        elif index is None:
            merged.append(copy.deepcopy(item))
        else:
            merged[index] = strategic_merge_patch(merged[index], item)
    return merged


class JsonPatchError(ValueError):
    pass


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise JsonPatchError(f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, parts: list[str], path: str) -> Any:
    for part in parts:
        if isinstance(doc, dict) and part in doc:
            doc = doc[part]
        elif isinstance(doc, list) and part.isdigit() and int(part) < len(doc):
            doc = doc[int(part)]
        else:
            raise JsonPatchError(f"doc is missing path: {path!r}")
    return doc


def json_patch(doc: Any, operations: Any) -> Any:
    """RFC 6902 JSON patch (add, remove, replace, move, copy, test)."""
    if not isinstance(operations, list):
        raise JsonPatchError("a JSON patch must be a list of operations")
    doc = copy.deepcopy(doc)
    for op in operations:
        if not isinstance(op, dict) or not isinstance(op.get("op"), str) or not isinstance(op.get("path"), str):
            raise JsonPatchError(f"invalid operation {op!r}")
        kind, path = op["op"], op["path"]
        if kind == "test":
            if _walk(doc, _pointer(path), path) != op.get("value"):
                raise JsonPatchError(f"testing value {path} failed")
            continue
        if kind in ("move", "copy"):
            source = op.get("from")
            if not isinstance(source, str):
                raise JsonPatchError(f"{kind} needs 'from'")
            value = copy.deepcopy(_walk(doc, _pointer(source), source))
            if kind == "move":
                doc = _remove(doc, _pointer(source), source)
            doc = _add(doc, _pointer(path), path, value)
        elif kind == "add":
            doc = _add(doc, _pointer(path), path, copy.deepcopy(op.get("value")))
        elif kind == "remove":
            doc = _remove(doc, _pointer(path), path)
        elif kind == "replace":
            doc = _remove(doc, _pointer(path), path)
            doc = _add(doc, _pointer(path), path, copy.deepcopy(op.get("value")))
        else:
            raise JsonPatchError(f"unknown operation {kind!r}")
    return doc


def _add(doc: Any, parts: list[str], path: str, value: Any) -> Any:
    if not parts:
        return value
    parent = _walk(doc, parts[:-1], path)
    last = parts[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        if last == "-":
            parent.append(value)
        elif last.isdigit() and int(last) <= len(parent):
            parent.insert(int(last), value)
        else:
            raise JsonPatchError(f"index out of range: {path!r}")
    else:
        raise JsonPatchError(f"doc is missing path: {path!r}")
    return doc


def _remove(doc: Any, parts: list[str], path: str) -> Any:
    if not parts:
        return None
    parent = _walk(doc, parts[:-1], path)
    last = parts[-1]
    if isinstance(parent, dict) and last in parent:
        del parent[last]
    elif isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
        del parent[int(last)]
    else:
        raise JsonPatchError(f"doc is missing path: {path!r}")
    return doc
