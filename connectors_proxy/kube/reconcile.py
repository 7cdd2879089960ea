# -*- test-case-name: tests.test_kube_reconcile,tests.test_custom_ca -*-
"""
What the cluster should look like for one Connector: its proxy Service
C{c-NAME} and its C{status}.  Pure functions over plain values; the writer
(L{connectors_proxy.kube.writer}) does the I/O.

Everything here is built so that C{desired == live} holds exactly when
nothing changed: condition times are carried over while a condition keeps
its status, fields other writers own are kept, and L{decide} answers
C{None} for both the Service and the status of an unchanged Connector.  An
idle cluster therefore costs zero writes.
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urljoin, urlsplit

from attrs import field, frozen

from connectors_proxy.model.objects import (
    API_VERSION,
    RESOLVER_PATH,
    Connector,
    ConnectorClass,
    InvalidObject,
    ObjectRef,
    Secret,
)
from connectors_proxy.tls.capool import secret_ca_bundle

JSON = dict[str, Any]

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "connectors-proxy"
CONNECTOR_LABEL = "connectors.alauda.io/connector"
SERVICE_PREFIX = "c-"

CLASS_READY = "ConnectorClassReady"
SECRET_READY = "SecretReady"
SERVICE_READY = "ProxyServiceReady"
#: Upstream's condition on the Connector's C{spec.caCertSecretRef}, written
#: (severity C{Info}, outside C{Ready}) only with C{enable-custom-ca-certs}.
CA_CERT_READY = "CACertReady"
READY = "Ready"
#: Conditions the upstream connectors-controller-manager writes on a
#: Connector: kept as they are, and counted in C{Ready} when present (unless
#: written with severity C{Info}, as upstream writes C{CACertReady}: Info
#: conditions inform and do not gate readiness).
FOREIGN_READINESS = ("LivenessReady", "AuthReady", CA_CERT_READY)

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def format_time(seconds: float) -> str:
    """RFC 3339 in UTC with second precision, as Kubernetes writes C{metav1.Time}."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def service_name(connector_name: str) -> str:
    return SERVICE_PREFIX + connector_name


def connector_name_of_service(service: Mapping[str, Any]) -> str | None:
    """The Connector a Service is for: its label, else its C{c-} name."""
    meta = service.get("metadata") or {}
    label = (meta.get("labels") or {}).get(CONNECTOR_LABEL)
    if isinstance(label, str) and label:
        return label
    name = meta.get("name") or ""
    return name[len(SERVICE_PREFIX):] if name.startswith(SERVICE_PREFIX) else None


def dns1035_problem(name: str) -> str | None:
    """Why C{name} is not a DNS-1035 label (a Service name), or C{None}."""
    if len(name) > 63:
        return f"{name!r} is {len(name)} characters long; a Service name has at most 63"
    if not _DNS1035.match(name):
        return (f"{name!r} must consist of lower case letters, digits and '-', start with a "
                "letter and end with a letter or digit")
    return None


@frozen
class Condition:
    type: str
    status: str  # "True" | "False" | "Unknown"
    reason: str
    message: str = ""
    #: Upstream's C{severity} (C{"Info"}: informs, does not gate C{Ready});
    #: empty: none written.
    severity: str = ""


@frozen
class World:
    """Everything besides the Connector itself that its decision depends on."""

    classes: Mapping[str, ConnectorClass] = field(factory=dict)
    invalid_classes: Mapping[str, str] = field(factory=dict)
    secrets: Mapping[ObjectRef, Secret] = field(factory=dict, repr=False)
    invalid_secrets: Mapping[ObjectRef, str] = field(factory=dict)
    cluster_domain: str = "cluster.local"
    serve_tls: bool = False
    #: Valid classes whose Rego policies do not compile: what is wrong
    #: (hook and compiler message, never the policy text).
    invalid_policies: Mapping[str, str] = field(factory=dict)
    #: Upstream's C{enable-custom-ca-certs}: write C{CACertReady}.
    custom_ca_certs: bool = False


@frozen
class ServiceAction:
    """
    A write to a proxy Service: C{create} or C{replace} C{body}, or
    C{delete} the Service named in C{body} (only if its uid still is
    C{body.metadata.uid}).
    """

    verb: str
    body: JSON


@frozen
class Decision:
    """
    @ivar service: the Service write to make first, or C{None}.
    @ivar status: the full C{status} to write once the Service is right, or
        C{None} when the live status already matches.
    """

    service: ServiceAction | None
    status: JSON | None


# -- the Service --------------------------------------------------------------

def owner_reference(connector: Connector) -> JSON:
    return {"apiVersion": API_VERSION, "kind": "Connector", "name": connector.name,
            "uid": connector.uid, "controller": True, "blockOwnerDeletion": True}


def class_proxy_url(cls: ConnectorClass, cluster_domain: str) -> str:
    """
    Where the class's proxy is, as upstream resolves C{spec.proxy}: the
    referenced Service's cluster address, then C{spec.proxy.uri} on top
    (absolute, or relative to that address).
    """
    base = ""
    if cls.proxy is not None:
        base = f"http://{cls.proxy.name}.{cls.proxy.namespace}.svc.{cluster_domain}"
    if cls.proxy_uri:
        return urljoin(base + "/", cls.proxy_uri) if base else cls.proxy_uri
    return base


def desired_service(connector: Connector, cls: ConnectorClass, cluster_domain: str,
                    serve_tls: bool) -> JSON:
    """
    The Service C{c-NAME} for a Connector whose class has C{spec.proxy}: a
    DNS alias of the referenced Service or, for a class that names its
    proxy by C{spec.proxy.uri} alone, of that URI's host.
    """
    assert cls.has_proxy
    if cls.proxy is not None:
        target = f"{cls.proxy.name}.{cls.proxy.namespace}.svc.{cluster_domain}"
    else:
        target = urlsplit(class_proxy_url(cls, cluster_domain)).hostname or ""
    ports = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 80}]
    if serve_tls:
        ports.append({"name": "https", "port": 443, "protocol": "TCP", "targetPort": 443})
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(connector.name),
            "namespace": connector.namespace,
            "labels": {MANAGED_BY_LABEL: MANAGED_BY, CONNECTOR_LABEL: connector.name},
            "ownerReferences": [owner_reference(connector)],
        },
        "spec": {
            "type": "ExternalName",
            "externalName": target,
            "ports": ports,
        },
    }


def _ports(spec: Mapping[str, Any]) -> set[tuple[Any, ...]]:
    out = set()
    for port in spec.get("ports") or []:
        number = port.get("port")
        out.add((port.get("name") or "", number, port.get("protocol") or "TCP",
                 port.get("targetPort", number)))
    return out


def _owner_refs(obj: Mapping[str, Any]) -> list[JSON]:
    return list((obj.get("metadata") or {}).get("ownerReferences") or [])


def service_owned(live: Mapping[str, Any], connector: Connector) -> bool:
    """
    Whether the proxy may rewrite C{live}: it carries our managed-by label
    or an ownerReference to this Connector.  A Service of the same name that
    someone else made is left alone (and reported as a conflict).
    """
    meta = live.get("metadata") or {}
    if (meta.get("labels") or {}).get(MANAGED_BY_LABEL) == MANAGED_BY:
        return True
    return any(ref.get("uid") == connector.uid for ref in _owner_refs(live))


def service_matches(live: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    """
    Whether C{live} already has everything C{desired} asks for.  Fields the
    API server defaults (C{sessionAffinity}, C{targetPort}) and labels or
    owners that others added do not count as differences.
    """
    lspec, dspec = live.get("spec") or {}, desired["spec"]
    if lspec.get("type") != dspec["type"] or lspec.get("externalName") != dspec["externalName"]:
        return False
    if lspec.get("clusterIP") not in (None, "") or lspec.get("clusterIPs"):
        return False
    if _ports(lspec) != _ports(dspec):
        return False
    labels = (live.get("metadata") or {}).get("labels") or {}
    if any(labels.get(k) != v for k, v in desired["metadata"]["labels"].items()):
        return False
    ours = desired["metadata"]["ownerReferences"][0]
    refs = _owner_refs(live)
    if not any(all(ref.get(k) == v for k, v in ours.items()) for ref in refs):
        return False
    return not any(ref.get("controller") and ref.get("uid") != ours["uid"] for ref in refs)


def merged_service(live: Mapping[str, Any], desired: Mapping[str, Any]) -> JSON:
    """
    C{live} put back into the desired shape, for a replace: our labels and
    owner on top of whatever else is there; the spec is ours whole (a hand
    edit to C{ClusterIP} must drop the cluster IP, or the API server refuses
    the type change).
    """
    out = copy.deepcopy(dict(live))
    meta = out.setdefault("metadata", {})
    meta["labels"] = {**(meta.get("labels") or {}), **desired["metadata"]["labels"]}
    ours = desired["metadata"]["ownerReferences"][0]
    meta["ownerReferences"] = [
        ref for ref in _owner_refs(live)
        if not ref.get("controller") and ref.get("uid") != ours["uid"]
    ] + [ours]
    out["spec"] = copy.deepcopy(desired["spec"])
    out.pop("status", None)
    out["apiVersion"], out["kind"] = "v1", "Service"
    return out


# -- the status ---------------------------------------------------------------

def class_condition(connector: Connector, world: World) -> Condition:
    name = connector.class_name
    if name in world.invalid_classes:
        return Condition(CLASS_READY, "False", "InvalidConnectorClass",
                         f"ConnectorClass {name} is invalid: {world.invalid_classes[name]}")
    if name not in world.classes:
        return Condition(CLASS_READY, "False", "ConnectorClassNotFound",
                         f"ConnectorClass {name} not found")
    if name in world.invalid_policies:
        return Condition(CLASS_READY, "False", "InvalidPolicy",
                         f"ConnectorClass {name}: {world.invalid_policies[name]}")
    return Condition(CLASS_READY, "True", "ConnectorClassFound", f"ConnectorClass {name} found")


def secret_condition(connector: Connector, world: World) -> Condition:
    cls = world.classes.get(connector.class_name)
    auth = cls.auth_type(connector.auth_name) if cls is not None else None
    if cls is not None and connector.auth_name is not None and auth is None:
        known = ", ".join(a.name for a in cls.auth_types) or "none"
        return Condition(SECRET_READY, "False", "AuthTypeNotFound",
                         f"auth type {connector.auth_name} is not offered by ConnectorClass "
                         f"{cls.name} (offered: {known})")
    ref = connector.secret_ref
    if ref is None:
        if auth is not None and not auth.optional:
            return Condition(SECRET_READY, "False", "SecretNotFound",
                             f"auth type {auth.name} needs spec.auth.secretRef")
        return Condition(SECRET_READY, "True", "SecretOptional", "no Secret is needed")
    if ref in world.invalid_secrets:
        return Condition(SECRET_READY, "False", "InvalidSecret",
                         f"Secret {ref} is invalid: {world.invalid_secrets[ref]}")
    secret = world.secrets.get(ref)
    if secret is None:
        return Condition(SECRET_READY, "False", "SecretNotFound", f"Secret {ref} not found")
    if auth is not None and auth.secret_type and secret.type != auth.secret_type:
        return Condition(SECRET_READY, "False", "SecretTypeMismatch",
                         f"Secret {ref} has type {secret.type}; auth type {auth.name} needs "
                         f"{auth.secret_type}")
    return Condition(SECRET_READY, "True", "SecretFound", f"Secret {ref} found")


def ca_cert_condition(connector: Connector, world: World) -> Condition:
    """
    C{CACertReady}, as upstream's controller writes it with
    C{enable-custom-ca-certs}: C{True/Valid} when the Connector's
    C{spec.caCertSecretRef} holds certificates (read as the proxy reads them,
    L{connectors_proxy.tls.capool.secret_ca_bundle}), C{True/NoCACert} when
    it names none, C{False/SecretNotFound} or C{False/InvalidPEM} otherwise.
    Severity C{Info}: it never gates C{Ready}.
    """
    ref = connector.ca_secret_ref
    if ref is None:
        return Condition(CA_CERT_READY, "True", "NoCACert",
                         "no spec.caCertSecretRef: the system roots and the global CA Secrets are trusted",
                         severity="Info")
    if ref in world.invalid_secrets:
        return Condition(CA_CERT_READY, "False", "InvalidPEM",
                         f"CA Secret {ref} is invalid: {world.invalid_secrets[ref]}", severity="Info")
    secret = world.secrets.get(ref)
    if secret is None:
        return Condition(CA_CERT_READY, "False", "SecretNotFound", f"CA Secret {ref} not found", severity="Info")
    try:
        count = secret_ca_bundle(secret.data).count(b"-----BEGIN CERTIFICATE-----")
    except ValueError as e:
        return Condition(CA_CERT_READY, "False", "InvalidPEM", f"CA Secret {ref}: {e}", severity="Info")
    return Condition(CA_CERT_READY, "True", "Valid",
                     f"CA Secret {ref} holds {count} certificate{'s' if count != 1 else ''}", severity="Info")


# What became of the Service, as L{service_condition} reports it.
SERVICE_OK = "ok"
SERVICE_NO_CLASS = "no-class"
SERVICE_NON_PROXY = "non-proxy"
SERVICE_BAD_NAME = "bad-name"
SERVICE_CONFLICT = "conflict"


def service_condition(connector: Connector, world: World, state: str) -> Condition:
    svc = service_name(connector.name)
    where = f"{connector.namespace}/{svc}"
    if state == SERVICE_NO_CLASS:
        return Condition(SERVICE_READY, "Unknown", "ConnectorClassNotReady",
                         f"ConnectorClass {connector.class_name} is not available")
    if state == SERVICE_NON_PROXY:
        return Condition(SERVICE_READY, "True", "NonProxy",
                         f"ConnectorClass {connector.class_name} has no spec.proxy; "
                         "no proxy Service is needed")
    if state == SERVICE_BAD_NAME:
        return Condition(SERVICE_READY, "False", "InvalidServiceName",
                         f"cannot create Service {svc}: {dns1035_problem(svc)}")
    if state == SERVICE_CONFLICT:
        return Condition(SERVICE_READY, "False", "ServiceConflict",
                         f"Service {where} exists and is not managed by {MANAGED_BY}")
    cls = world.classes[connector.class_name]
    target = (f"{cls.proxy.name}.{cls.proxy.namespace}" if cls.proxy is not None
              else class_proxy_url(cls, world.cluster_domain))
    return Condition(SERVICE_READY, "True", "ServiceReady", f"Service {where} points at {target}")


def ready_condition(conditions: list[Condition]) -> Condition:
    """C{Ready}: C{True} when all are; otherwise the first that is not."""
    for status in ("False", "Unknown"):
        for cond in conditions:
            if cond.status == status:
                return Condition(READY, status, cond.reason, cond.message)
    return Condition(READY, "True", "Ready", "")


def foreign_conditions(live_status: Mapping[str, Any] | None) -> list[Condition]:
    """
    The conditions of L{FOREIGN_READINESS} another controller wrote in
    C{live_status}, in that order, as they stand: what C{Ready} also waits for.
    """
    found: dict[str, Condition] = {}
    for old in (live_status or {}).get("conditions") or []:
        if not isinstance(old, Mapping):
            continue
        kind = old.get("type")
        if kind in FOREIGN_READINESS and kind not in found and old.get("severity") != "Info":
            status = str(old.get("status")) if old.get("status") in ("True", "False") else "Unknown"
            found[kind] = Condition(kind, status, str(old.get("reason") or ""), str(old.get("message") or ""))
    return [found[k] for k in FOREIGN_READINESS if k in found]


def proxy_url(connector: Connector, cluster_domain: str, cls: ConnectorClass | None = None) -> str:
    """
    The Connector's C{status.proxy.httpAddress.url}, as upstream writes it:
    C{http://c-NAME.NS.svc.DOMAIN}, with the scheme, port and path of the
    class's proxy URL when C{spec.proxy.uri} gives them, and
    C{/namespaces/NS/connectors/NAME} appended for classes annotated
    C{connectors.cpaas.io/proxy-resolver: path}.
    """
    scheme, port, path = "http", "", ""
    if cls is not None and cls.proxy_uri:
        parts = urlsplit(class_proxy_url(cls, cluster_domain))
        scheme = parts.scheme or scheme
        port = f":{parts.port}" if parts.port else ""
        path = parts.path.rstrip("/")
    url = f"{scheme}://{service_name(connector.name)}.{connector.namespace}.svc.{cluster_domain}{port}{path}"
    if cls is not None and cls.resolver == RESOLVER_PATH:
        url += f"/namespaces/{connector.namespace}/connectors/{connector.name}"
    return url


def desired_status(live_status: Mapping[str, Any] | None, generation: int,
                   conditions: list[Condition], url: str | None, now: str) -> JSON:
    """
    The status to write: C{live_status} with our fields set.  Conditions of
    other types and other status fields are kept; a condition whose status
    did not change keeps its C{lastTransitionTime}.
    """
    live = dict(live_status or {})
    out = copy.deepcopy(live)
    out["observedGeneration"] = generation
    new = {c.type: c for c in conditions}
    merged: list[JSON] = []
    seen = set()
    for old in live.get("conditions") or []:
        if not isinstance(old, Mapping):
            continue
        kind = old.get("type")
        if kind in new and kind not in seen:
            seen.add(kind)
            merged.append(_condition(new[kind], old, now))
        elif kind not in new:
            merged.append(copy.deepcopy(dict(old)))
    for cond in conditions:
        if cond.type not in seen:
            merged.append(_condition(cond, None, now))
    out["conditions"] = merged
    proxy = dict(out.get("proxy") or {})
    if url is not None:
        proxy["httpAddress"] = {**(proxy.get("httpAddress") or {}), "url": url}
    else:
        proxy.pop("httpAddress", None)
    if proxy:
        out["proxy"] = proxy
    else:
        out.pop("proxy", None)
    return out


def _condition(cond: Condition, old: Mapping[str, Any] | None, now: str) -> JSON:
    since = now
    if old is not None and old.get("status") == cond.status and old.get("lastTransitionTime"):
        since = old["lastTransitionTime"]
    out = {"type": cond.type, "status": cond.status, "reason": cond.reason,
           "message": cond.message, "lastTransitionTime": since}
    if cond.severity:
        out["severity"] = cond.severity
    return out


def status_matches(live_status: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> bool:
    return dict(live_status or {}) == dict(desired)


# -- one Connector ------------------------------------------------------------

def decide(raw: Mapping[str, Any], connector: Connector | InvalidObject, world: World,
           live_service: Mapping[str, Any] | None, now: str) -> Decision:
    """
    The writes that bring one Connector's Service and status in line.

    @param raw: the Connector as the API server has it (for C{status},
        C{metadata.generation}).
    @param connector: C{raw} parsed, or why it could not be.
    @param live_service: the Service C{c-NAME} in the Connector's namespace,
        if it exists.
    @param now: the time for conditions that change (L{format_time}).
    """
    live_status = raw.get("status") if isinstance(raw.get("status"), Mapping) else None
    generation = (raw.get("metadata") or {}).get("generation") or 0
    if isinstance(connector, InvalidObject):
        conds = [Condition(READY, "False", "InvalidConnector",
                           f"{connector.field}: {connector.problem}")]
        if connector.field == "spec.connectorClassName":
            # Upstream's schema lets a Connector omit its class; upstream's
            # controller reports that as a class it cannot find.
            missing = Condition(CLASS_READY, "False", "ConnectorClassNotFound", "spec.connectorClassName is not set")
            conds = [missing, Condition(READY, "False", missing.reason, missing.message)]
        status = desired_status(live_status, generation, conds, None, now)
        return Decision(None, None if status_matches(live_status, status) else status)

    action: ServiceAction | None = None
    cls = world.classes.get(connector.class_name)
    svc = service_name(connector.name)
    if cls is None:
        state = SERVICE_NO_CLASS
    elif not cls.has_proxy:
        state = SERVICE_NON_PROXY
        if live_service is not None and service_owned(live_service, connector):
            action = ServiceAction("delete", _delete_body(live_service))
    elif dns1035_problem(svc) is not None:
        state = SERVICE_BAD_NAME
    else:
        desired = desired_service(connector, cls, world.cluster_domain, world.serve_tls)
        state = SERVICE_OK
        if live_service is None:
            action = ServiceAction("create", desired)
        elif not service_owned(live_service, connector):
            state = SERVICE_CONFLICT
        elif not service_matches(live_service, desired):
            action = ServiceAction("replace", merged_service(live_service, desired))

    conds = [class_condition(connector, world), secret_condition(connector, world),
             service_condition(connector, world, state)]
    ready = ready_condition(conds + foreign_conditions(live_status))
    if world.custom_ca_certs:
        # Info: after Ready is decided, which it never gates.
        conds.append(ca_cert_condition(connector, world))
    conds.append(ready)
    url = proxy_url(connector, world.cluster_domain, cls) if state == SERVICE_OK else None
    status = desired_status(live_status, generation, conds, url, now)
    return Decision(action, None if status_matches(live_status, status) else status)


def _delete_body(live: Mapping[str, Any]) -> JSON:
    meta = live.get("metadata") or {}
    return {"metadata": {"name": meta.get("name"), "namespace": meta.get("namespace"),
                         "uid": meta.get("uid")}}
