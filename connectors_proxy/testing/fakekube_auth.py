# -*- test-case-name: tests.test_fakekube_contract -*-
"""
Who a caller of the fake API server is, and what it may do: bearer tokens
(static ones a test adds, and ServiceAccount tokens minted by the
TokenRequest API), RBAC evaluated from the Role/ClusterRole/binding objects
stored in the fake plus rules a test grants directly, and the answers of
TokenReview and SubjectAccessReview that follow from them.  Pure values and
functions; the fake supplies the objects.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from attrs import field, frozen

from connectors_proxy.testing.fakekube_model import JSON

MASTERS = "system:masters"
AUTHENTICATED = "system:authenticated"


@frozen
class User:
    """An authenticated user, as TokenReview's C{status.user} describes it."""

    name: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: Mapping[str, tuple[str, ...]] = field(factory=dict)

    def info(self) -> JSON:
        info: JSON = {"username": self.name}
        if self.uid:
            info["uid"] = self.uid
        if self.groups:
            info["groups"] = list(self.groups)
        if self.extra:
            info["extra"] = {k: list(v) for k, v in self.extra.items()}
        return info


def service_account_user(namespace: str, name: str, uid: str = "") -> User:
    return User(f"system:serviceaccount:{namespace}:{name}", uid,
                ("system:serviceaccounts", f"system:serviceaccounts:{namespace}", AUTHENTICATED))


@frozen
class Token:
    """
    A bearer token the fake accepts.  C{audiences} C{None} means an
    audience-agnostic token (a static token file entry), valid for the API
    server's own audiences only.  C{bound} ties a ServiceAccount token to
    the ServiceAccount's (namespace, name, uid): deleting it revokes the token.
    """

    user: User
    audiences: tuple[str, ...] | None = None
    expires: float | None = None
    bound: tuple[str, str, str] | None = None


@frozen
class Attributes:
    """What a request asks to do (authorizer.Attributes of the real server)."""

    user: User
    verb: str
    group: str = ""
    resource: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""
    path: str = ""

    @property
    def resource_request(self) -> bool:
        return not self.path


@frozen
class Rule:
    """An RBAC PolicyRule."""

    verbs: tuple[str, ...]
    api_groups: tuple[str, ...] = ()
    resources: tuple[str, ...] = ()
    resource_names: tuple[str, ...] = ()
    non_resource_urls: tuple[str, ...] = ()

    def allows(self, attrs: Attributes) -> bool:
        if "*" not in self.verbs and attrs.verb not in self.verbs:
            return False
        if not attrs.resource_request:
            return any(url == "*" or url == attrs.path or (url.endswith("*") and attrs.path.startswith(url[:-1]))
                       for url in self.non_resource_urls)
        if "*" not in self.api_groups and attrs.group not in self.api_groups:
            return False
        combined = attrs.resource + ("/" + attrs.subresource if attrs.subresource else "")
        if not any(r == "*" or r == combined or (attrs.subresource and r == "*/" + attrs.subresource)
                   for r in self.resources):
            return False
        return not self.resource_names or attrs.name in self.resource_names

    @classmethod
    def parse(cls, doc: Any) -> Rule:
        doc = doc if isinstance(doc, dict) else {}
        return cls(tuple(doc.get("verbs") or ()), tuple(doc.get("apiGroups") or ()),
                   tuple(doc.get("resources") or ()), tuple(doc.get("resourceNames") or ()),
                   tuple(doc.get("nonResourceURLs") or ()))


@frozen
class Grant:
    """Rules bound to users and groups, cluster-wide (C{namespace} C{None}) or in one namespace."""

    rules: tuple[Rule, ...]
    users: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()
    namespace: str | None = None
    why: str = ""

    def applies(self, user: User) -> bool:
        return user.name in self.users or bool(self.groups.intersection(user.groups))


def authorize(grants: Iterable[Grant], attrs: Attributes) -> tuple[bool, str]:
    """Whether C{attrs} is allowed, and the reason the real RBAC authorizer would give."""
    if MASTERS in attrs.user.groups:
        return True, ""
    for grant in grants:
        if not grant.applies(attrs.user):
            continue
        if grant.namespace is not None and grant.namespace != attrs.namespace:
            continue
        if any(rule.allows(attrs) for rule in grant.rules):
            return True, grant.why
    return False, ""


def _subjects(binding: JSON) -> tuple[frozenset[str], frozenset[str], list[str]]:
    users, groups, names = set(), set(), []
    default_ns = (binding.get("metadata") or {}).get("namespace", "")
    for subject in binding.get("subjects") or []:
        kind, name = subject.get("kind"), subject.get("name", "")
        if kind == "User":
            users.add(name)
            names.append(f'User "{name}"')
        elif kind == "Group":
            groups.add(name)
            names.append(f'Group "{name}"')
        elif kind == "ServiceAccount":
            ns = subject.get("namespace") or default_ns
            users.add(f"system:serviceaccount:{ns}:{name}")
            names.append(f'ServiceAccount "{name}/{ns}"')
    return frozenset(users), frozenset(groups), names


def rbac_grants(roles: Iterable[JSON], cluster_roles: Iterable[JSON], bindings: Iterable[JSON],
                cluster_bindings: Iterable[JSON]) -> list[Grant]:
    """The grants that stored RBAC objects make (a binding to a missing role grants nothing)."""
    role_rules = {((r["metadata"].get("namespace")), r["metadata"]["name"]):
                  tuple(Rule.parse(x) for x in r.get("rules") or []) for r in roles}
    cluster_rules = {r["metadata"]["name"]: tuple(Rule.parse(x) for x in r.get("rules") or [])
                     for r in cluster_roles}
    grants = []
    for binding in cluster_bindings:
        ref = binding.get("roleRef") or {}
        rules = cluster_rules.get(ref.get("name", "")) if ref.get("kind") == "ClusterRole" else None
        if rules:
            users, groups, names = _subjects(binding)
            why = (f'RBAC: allowed by ClusterRoleBinding "{binding["metadata"]["name"]}" of ClusterRole '
                   f'"{ref["name"]}" to {", ".join(names)}')
            grants.append(Grant(rules, users, groups, None, why))
    for binding in bindings:
        ref = binding.get("roleRef") or {}
        ns = binding["metadata"].get("namespace", "")
        if ref.get("kind") == "ClusterRole":
            rules = cluster_rules.get(ref.get("name", ""))
        else:
            rules = role_rules.get((ns, ref.get("name", "")))
        if rules:
            users, groups, names = _subjects(binding)
            why = (f'RBAC: allowed by RoleBinding "{binding["metadata"]["name"]}/{ns}" of '
                   f'{ref.get("kind")} "{ref.get("name")}" to {", ".join(names)}')
            grants.append(Grant(rules, users, groups, ns, why))
    return grants


# --- TokenRequest, TokenReview ---------------------------------------------

def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def mint_token(issuer: str, user: User, namespace: str, name: str, audiences: Sequence[str],
               now: float, expires: float) -> str:
    """
    A token shaped like a projected ServiceAccount JWT (header.claims.sig),
    so a client that reads its claims (C{exp}) can; the signature is random,
    nothing verifies it but this fake's token table.
    """
    header = {"alg": "RS256", "kid": "fakekube"}
    claims = {"aud": list(audiences), "exp": int(expires), "iat": int(now), "nbf": int(now),
              "iss": issuer, "jti": secrets.token_hex(16), "sub": user.name,
              "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": name, "uid": user.uid}}}
    return ".".join((_b64(json.dumps(header).encode()), _b64(json.dumps(claims).encode()),
                     _b64(secrets.token_bytes(64))))


def review_token(token: Token | None, requested: Sequence[str], api_audiences: Sequence[str],
                 now: float, bound_uid: str | None) -> tuple[User | None, list[str], str]:
    """
    The outcome of a TokenReview: (user or None, audiences, error text).
    C{bound_uid} is the current uid of the ServiceAccount a bound token
    names (C{None} when it is gone).
    """
    if token is None:
        return None, [], "[invalid bearer token, token lookup failed]"
    if token.expires is not None and now >= token.expires:
        return None, [], "[invalid bearer token, service account token has expired]"
    if token.bound is not None and bound_uid != token.bound[2]:
        return None, [], "[invalid bearer token, service account token has been invalidated]"
    wanted = list(requested) or list(api_audiences)
    have = list(api_audiences) if token.audiences is None else list(token.audiences)
    common = [a for a in wanted if a in have]
    if not common:
        return None, [], (f'[invalid bearer token, token audiences "{have}" is invalid for the target '
                          f'audiences "{wanted}"]')
    return token.user, common, ""
