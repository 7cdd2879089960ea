# -*- test-case-name: tests.test_fakekube_contract -*-
"""
An in-memory Kubernetes API server for tests: a *verified fake*.  It speaks
the real wire protocol (JSON over HTTP on the real paths, real status codes
and C{Status} error bodies, newline-delimited watch streams), and the
contract suite in C{tests/test_fakekube_contract.py} runs the same checks
against it, against kmock and against a real cluster, so it stays honest.

What it serves: core v1 namespaces, secrets, configmaps, services,
serviceaccounts (+ the C{token} subresource); connectors and
connectorclasses of C{connectors.alauda.io/v1alpha1} (validated and pruned
with the CRD schemas of C{k8s/}); coordination.k8s.io leases; RBAC roles
and bindings; TokenReview and SubjectAccessReview.  One etcd-like global
resourceVersion, a bounded watch history (410 Gone when a watch asks for
what was compacted), bookmarks, 409 conflicts, status subresources,
generation, finalizers and ownerReference garbage collection.

Using it from a trial test::

    from twisted.internet import reactor
    from connectors_proxy.testing.fakekube import start_fake_kube

    fake, server = start_fake_kube(self, reactor)      # stops at cleanup
    server.url                                          # http://127.0.0.1:PORT
    fake.admin_token                                    # a system:masters bearer token
    server.write_kubeconfig(path)                       # for --kubeconfig
    fake.apply({...}, {...})                            # seed objects (no counters)
    fake.add_token("tok", "system:serviceaccount:ns:app", groups=[...])
    fake.allow(user="...", verbs=["get"], api_groups=["connectors.alauda.io"],
               resources=["connectors"], namespace="ns", names=["harbor"])
    fake.counts[("create", "tokenreviews")], fake.writes()
    fake.compact(); fake.send_bookmarks(); fake.cut_watches()
    fake.unavailable = True                              # every request: 503
    server.cut_connections(); await server.refuse(); server.accept()

Run by hand: C{python -m connectors_proxy.testing.fakekube --port 6443}.
"""

from __future__ import annotations

import copy
import secrets
import sys
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attrs import define, field
from twisted.internet.interfaces import IReactorTime

from connectors_proxy.testing.fakekube_auth import (
    AUTHENTICATED,
    MASTERS,
    Attributes,
    Grant,
    Rule,
    Token,
    User,
    authorize,
    mint_token,
    rbac_grants,
    review_token,
    service_account_user,
)
from connectors_proxy.testing.fakekube_model import (
    JSON,
    RESOURCES,
    ApiError,
    Cause,
    JsonPatchError,
    Matcher,
    ResourceType,
    already_exists,
    bad_request,
    conflict,
    expired,
    format_time,
    invalid,
    json_patch,
    merge_patch,
    not_found,
    parse_field_selector,
    parse_label_selector,
    resource_by_name,
    resource_for_kind,
    strategic_merge_patch,
    unsupported_patch,
)
from connectors_proxy.testing.fakekube_strategy import (
    SYSTEM_META,
    Allocator,
    Strategy,
    clean_meta,
    crd_schemas,
    default_manifest_dir,
    ordered,
    read_manifests,
    strategies,
)

if TYPE_CHECKING:
    from connectors_proxy.testing.fakekube_http import FakeKubeServer

DEFAULT_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
ADMIN_USER = "kubernetes-admin"
#: Verbs that change state; C{writes()} counts these (reviews excluded).
WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})
_REVIEWS = frozenset({"tokenreviews", "subjectaccessreviews", "selfsubjectaccessreviews"})
_GENERATE_CHARS = "bcdfghjklmnpqrstvwxz2456789"


@define(eq=False)
class Event:
    """One change, as the watch history keeps it."""

    rv: int
    rtype: ResourceType
    type: str
    obj: JSON
    old: JSON | None


@define(eq=False)
class Watch:
    """
    An open watch.  The HTTP layer gives C{emit} (write one event) and
    C{end} (close the stream: C{True} cleanly, C{False} by cutting the
    connection); the fake calls them.  Events carry the stored objects
    themselves (no copy per watcher): C{emit} serializes, never mutates.
    """

    fake: FakeKube
    rtype: ResourceType
    namespace: str | None
    labels: Matcher
    fields: Callable[[JSON], bool]
    bookmarks: bool
    emit: Callable[[JSON], None]
    end: Callable[[bool], None]
    #: The version the watch started from: a bookmark must report more.
    since: int = 0

    def matches(self, obj: JSON) -> bool:
        meta = obj.get("metadata") or {}
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        return self.labels(meta.get("labels") or {}) and self.fields(obj)

    def offer(self, event: Event) -> None:
        if event.rtype is not self.rtype:
            return
        now = self.matches(event.obj)
        if event.type == "ADDED":
            if now:
                self.emit(wire_event("ADDED", event.obj))
        elif event.type == "DELETED":
            if now:
                self.emit(wire_event("DELETED", event.obj))
        else:
            before = event.old is not None and self.matches(event.old)
            if now and before:
                self.emit(wire_event("MODIFIED", event.obj))
            elif now:
                self.emit(wire_event("ADDED", event.obj))
            elif before and event.old is not None:
                # Left the selection: the previous content, at this event's version.
                gone = copy.deepcopy(event.old)
                gone["metadata"]["resourceVersion"] = str(event.rv)
                self.emit(wire_event("DELETED", gone))

    def bookmark(self, annotations: dict[str, str] | None = None) -> None:
        # Like kube-apiserver's watch cache, a periodic bookmark is sent only
        # when there is progress past the watch's starting version; the end
        # of the initial events is always marked.
        if not annotations and self.fake.resource_version <= self.since:
            return
        meta: JSON = {"resourceVersion": str(self.fake.resource_version)}
        if annotations:
            meta["annotations"] = annotations
        self.emit({"type": "BOOKMARK", "object": {"kind": self.rtype.kind,
                                                  "apiVersion": self.rtype.api_version,
                                                  "metadata": meta}})

    def stop(self) -> None:
        self.fake._watches.discard(self)


def wire_event(kind: str, obj: JSON) -> JSON:
    return {"type": kind, "object": obj}


@define(eq=False)
class FakeKube:
    """
    The state and the semantics of the fake API server.  Every API method
    raises L{ApiError} the way the real server answers; the HTTP layer
    (L{connectors_proxy.testing.fakekube_http}) only maps URLs onto them.

    @ivar clock: for timestamps, bookmarks, watch timeouts, token expiry.
    @ivar admin_token: a bearer token of a C{system:masters} user.
    @ivar bookmark_interval: seconds between BOOKMARK events on watches
        that allow them.
    @ivar watch_timeout: server-side end of a watch that gave no
        C{timeoutSeconds} (the real server picks 30-60 minutes).
    @ivar history_limit: events kept for watches to resume from; older
        ones are compacted away (a watch from there gets 410).
    @ivar manifests: files or folders whose CustomResourceDefinitions give
        the custom resources their schemas (default: the project's C{k8s/}).
    @ivar unavailable: while true, every request is answered 503.
    @ivar counts: requests by C{(verb, resource)}, resource as the URL names
        it (C{"connectors/status"}, C{"serviceaccounts/token"}).
    """

    clock: IReactorTime
    admin_token: str = field(factory=lambda: secrets.token_hex(16))
    bookmark_interval: float = 60.0
    watch_timeout: float = 1800.0
    history_limit: int = 10_000
    api_audiences: tuple[str, ...] = (DEFAULT_AUDIENCE,)
    namespaces: Sequence[str] = ("default", "kube-system", "kube-public", "kube-node-lease")
    manifests: Sequence[Path] | None = None
    unavailable: bool = False
    counts: Counter[tuple[str, str]] = field(factory=Counter, init=False)

    _objects: dict[ResourceType, dict[tuple[str, str], JSON]] = field(init=False)
    _rv: int = field(default=0, init=False)
    _history: deque[Event] = field(factory=deque, init=False)
    _compacted: int = field(default=0, init=False)
    _watches: set[Watch] = field(factory=set, init=False)
    _tokens: dict[str, Token] = field(factory=dict, init=False)
    _grants: list[Grant] = field(factory=list, init=False)
    _pages: dict[str, tuple[int, list[JSON]]] = field(factory=dict, init=False)
    _strategies: dict[ResourceType, Strategy] = field(init=False)

    def __attrs_post_init__(self) -> None:
        self._objects = {rtype: {} for rtype in RESOURCES if not rtype.virtual}
        paths = self.manifests
        if paths is None:
            found = default_manifest_dir()
            paths = [found] if found else []
        schemas = crd_schemas([Path(p) for p in paths])
        self._strategies = strategies(Allocator(), schemas, self._objects)
        self._tokens[self.admin_token] = Token(User(ADMIN_USER, groups=(MASTERS, AUTHENTICATED)))
        # The bootstrap policy every cluster has: any authenticated user may
        # ask what it may do itself (kubectl auth can-i).
        self._grants.append(Grant(
            (Rule(("create",), ("authorization.k8s.io",), ("selfsubjectaccessreviews", "selfsubjectrulesreviews")),),
            groups=frozenset({AUTHENTICATED}),
            why='RBAC: allowed by ClusterRoleBinding "system:basic-user" of ClusterRole "system:basic-user" to '
                'Group "system:authenticated"'))
        for name in self.namespaces:
            self.create_object(resource_by_name("namespaces"), None, {"metadata": {"name": name}})

    # --- test hooks ---------------------------------------------------------

    @property
    def resource_version(self) -> int:
        """The newest resourceVersion (etcd's revision)."""
        return self._rv

    @property
    def open_watches(self) -> int:
        return len(self._watches)

    def add_token(self, token: str, username: str, uid: str = "", groups: Iterable[str] = (),
                  audiences: Iterable[str] | None = None, expires: float | None = None) -> User:
        """
        Accept C{token} (for API calls and in TokenReview) as C{username}.
        C{audiences} C{None}: audience-agnostic, like a static token file
        entry.  C{system:authenticated} is added to the groups, as the real
        server does.
        """
        all_groups = tuple(groups)
        if AUTHENTICATED not in all_groups:
            all_groups += (AUTHENTICATED,)
        user = User(username, uid, all_groups)
        self._tokens[token] = Token(user, None if audiences is None else tuple(audiences), expires)
        return user

    def allow(self, *, user: str | None = None, group: str | None = None, verbs: Iterable[str],
              api_groups: Iterable[str] = ("",), resources: Iterable[str], namespace: str | None = None,
              names: Iterable[str] = ()) -> None:
        """
        Grant an RBAC-style rule (resources may be C{"connectors/status"}, C{"*"})
        to a user or a group, cluster-wide or in one namespace; it counts for
        SubjectAccessReviews and for callers alike.
        """
        rule = Rule(tuple(verbs), tuple(api_groups), tuple(resources), tuple(names))
        self._grants.append(Grant((rule,), frozenset([user] if user else []),
                                  frozenset([group] if group else []), namespace,
                                  f'allowed by the test rule for {user or group}'))

    def compact(self) -> None:
        """Forget all history, as an etcd compaction would: older watches get 410."""
        self._history.clear()
        self._compacted = self._rv
        self._pages.clear()

    def send_bookmarks(self) -> None:
        for watch in list(self._watches):
            if watch.bookmarks:
                watch.bookmark()

    def cut_watches(self, clean: bool = False) -> None:
        """End every open watch: by dropping the connection (default) or cleanly."""
        for watch in list(self._watches):
            watch.stop()
            watch.end(clean)

    def count(self, verb: str | None = None, resource: str | None = None) -> int:
        return sum(n for (v, r), n in self.counts.items()
                   if (verb is None or v == verb) and (resource is None or r == resource))

    def writes(self) -> int:
        """State-changing requests so far (TokenReviews and SubjectAccessReviews not included)."""
        return sum(n for (v, r), n in self.counts.items() if v in WRITE_VERBS and r not in _REVIEWS)

    def reset_counts(self) -> None:
        self.counts.clear()

    def apply(self, *docs: JSON) -> list[JSON]:
        """
        Create or replace objects given as manifests (status included),
        through the same defaulting and validation as the API, without
        counting requests.  Returns the stored objects.
        """
        stored = []
        for doc in docs:
            rtype = resource_for_kind(doc.get("apiVersion", ""), doc.get("kind", ""))
            if rtype is None or rtype.virtual:
                raise ValueError(f"the fake does not serve {doc.get('apiVersion')} {doc.get('kind')}")
            meta = doc.get("metadata") or {}
            ns = (meta.get("namespace") or "default") if rtype.namespaced else None
            current = self._lookup(rtype, ns, meta.get("name", ""))
            body = copy.deepcopy(doc)
            body.setdefault("metadata", {}).pop("resourceVersion", None)
            if current is None:
                obj = self.create_object(rtype, ns, body)
            else:
                body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                obj = self.replace_object(rtype, ns, meta["name"], body)
            if "status" in doc and "status" in rtype.subresources:
                body = copy.deepcopy(obj)
                body["status"] = copy.deepcopy(doc["status"])
                obj = self.replace_object(rtype, ns, meta["name"], body, subresource="status")
            stored.append(copy.deepcopy(obj))
        return stored

    def object(self, resource: str, namespace: str | None, name: str) -> JSON | None:
        """A copy of the stored object (C{resource} is the plural: C{"services"}), or C{None}."""
        found = self._lookup(resource_by_name(resource), namespace, name)
        return copy.deepcopy(found)

    def objects(self, resource: str, namespace: str | None = None) -> list[JSON]:
        rtype = resource_by_name(resource)
        return [copy.deepcopy(o) for (ns, _), o in sorted(self._objects[rtype].items())
                if namespace is None or ns == namespace]

    def remove(self, resource: str, namespace: str | None, name: str) -> None:
        """Delete an object as a user would (finalizers and garbage collection apply)."""
        self.delete_object(resource_by_name(resource), namespace, name)

    # --- identity -----------------------------------------------------------

    def _bound_uid(self, token: Token) -> str | None:
        if token.bound is None:
            return None
        sa = self._lookup(resource_by_name("serviceaccounts"), token.bound[0], token.bound[1])
        return None if sa is None else sa["metadata"]["uid"]

    def authenticate(self, bearer: str) -> User | None:
        """The caller a bearer token proves (for the API server's own audiences)."""
        token = self._tokens.get(bearer)
        if token is None:
            return None
        user, _, _ = review_token(token, (), self.api_audiences, self.clock.seconds(), self._bound_uid(token))
        return user

    def grants(self) -> list[Grant]:
        def stored(plural: str) -> list[JSON]:
            return list(self._objects[resource_by_name(plural)].values())
        return self._grants + rbac_grants(stored("roles"), stored("clusterroles"), stored("rolebindings"),
                                          stored("clusterrolebindings"))

    def authorize(self, attrs: Attributes) -> tuple[bool, str]:
        return authorize(self.grants(), attrs)

    # --- storage ------------------------------------------------------------

    def strategy(self, rtype: ResourceType) -> Strategy:
        return self._strategies[rtype]

    def _lookup(self, rtype: ResourceType, namespace: str | None, name: str) -> JSON | None:
        return self._objects[rtype].get(((namespace or "") if rtype.namespaced else "", name))

    def _get_or_404(self, rtype: ResourceType, namespace: str | None, name: str) -> JSON:
        found = self._lookup(rtype, namespace, name)
        if found is None:
            raise not_found(rtype, name)
        return found

    def _commit(self, rtype: ResourceType, obj: JSON, kind: str, old: JSON | None) -> JSON:
        """Store (or drop, for DELETED) C{obj} at the next resourceVersion and tell the watches."""
        self._rv += 1
        obj = ordered(rtype.builtin, obj)
        meta = obj["metadata"]
        meta["resourceVersion"] = str(self._rv)
        key = (meta.get("namespace", ""), meta["name"])
        if kind == "DELETED":
            self._objects[rtype].pop(key, None)
        else:
            self._objects[rtype][key] = obj
        event = Event(self._rv, rtype, kind, obj, old)
        if len(self._history) >= self.history_limit:
            self._compacted = self._history.popleft().rv
        self._history.append(event)
        for watch in list(self._watches):
            watch.offer(event)
        return obj

    def _decode(self, rtype: ResourceType, body: Any) -> JSON:
        if not isinstance(body, dict):
            raise bad_request(f"the body of the request is not a {rtype.kind} object")
        api_version, kind = body.get("apiVersion"), body.get("kind")
        if kind is not None and kind != rtype.kind:
            raise bad_request(f"the object provided is unrecognized (must be of type {rtype.kind}): "
                              f"kind {kind!r}")
        if api_version is not None and api_version != rtype.api_version:
            raise bad_request(f"the API version in the data ({api_version}) does not match the expected "
                              f"API version ({rtype.api_version})")
        if not rtype.builtin and (kind is None or api_version is None):
            raise bad_request("Object 'Kind' is missing in the request body" if kind is None
                              else "Object 'apiVersion' is missing in the request body")
        obj = copy.deepcopy(body)
        if not isinstance(obj.get("metadata", {}), dict):
            raise bad_request("metadata must be an object")
        obj.setdefault("metadata", {})
        obj["apiVersion"], obj["kind"] = rtype.api_version, rtype.kind
        return obj

    def _require_namespace(self, namespace: str) -> None:
        ns = self._lookup(resource_by_name("namespaces"), None, namespace)
        if ns is None:
            raise not_found(resource_by_name("namespaces"), namespace)
        if ns["metadata"].get("deletionTimestamp"):
            raise ApiError(403, "Forbidden", "unable to create new content in "
                           f"namespace {namespace} because it is being terminated",
                           {"name": namespace, "kind": "namespaces",
                            "causes": [{"reason": "NamespaceTerminating", "message": "namespace "
                                        f"{namespace} is being terminated", "field": "metadata.namespace"}]})

    # --- the API --------------------------------------------------------------

    def get_object(self, rtype: ResourceType, namespace: str | None, name: str) -> JSON:
        return copy.deepcopy(self._get_or_404(rtype, namespace, name))

    def list_objects(self, rtype: ResourceType, namespace: str | None, label_selector: str = "",
             field_selector: str = "", limit: int = 0, continue_token: str = "",
             resource_version: str = "") -> JSON:
        """A C{...List}; core items come without kind/apiVersion, as typed lists do."""
        labels = parse_label_selector(label_selector)
        fields = parse_field_selector(rtype, field_selector)
        self._check_rv_not_too_large(resource_version)
        if continue_token:
            page = self._pages.get(continue_token)
            if page is None:
                raise ApiError(410, "Expired", "The provided continue parameter is too old to display a "
                               "consistent list result. You can start a new list without the continue "
                               "parameter.")
            rv, items = page
        else:
            rv = self._rv
            items = [obj for (ns, _), obj in sorted(self._objects[rtype].items())
                     if (namespace is None or ns == namespace)
                     and labels(obj["metadata"].get("labels") or {}) and fields(obj)]
        meta: JSON = {"resourceVersion": str(rv)}
        if limit and len(items) > limit:
            token = secrets.token_urlsafe(24)
            self._pages[token] = (rv, items[limit:])
            items = items[:limit]
            meta["continue"] = token
            meta["remainingItemCount"] = len(self._pages[token][1])
        if rtype.builtin:
            items = [{k: v for k, v in obj.items() if k not in ("apiVersion", "kind")} for obj in items]
        items = copy.deepcopy(items)
        return {"kind": rtype.list_kind, "apiVersion": rtype.api_version, "metadata": meta, "items": items}

    def _check_rv_not_too_large(self, resource_version: str) -> int | None:
        if resource_version in ("", None):
            return None
        try:
            wanted = int(resource_version)
        except ValueError:
            raise bad_request(f'invalid resource version: "{resource_version}"') from None
        if wanted > self._rv:
            raise ApiError(504, "Timeout", f"Too large resource version: {wanted}, current: {self._rv}",
                           {"causes": [{"reason": "ResourceVersionTooLarge",
                                        "message": "Too large resource version"}], "retryAfterSeconds": 1})
        return wanted

    def create_object(self, rtype: ResourceType, namespace: str | None, body: Any) -> JSON:
        strategy = self._strategies[rtype]
        obj = self._decode(rtype, body)
        meta = obj["metadata"]
        if rtype.namespaced:
            if meta.get("namespace") and meta["namespace"] != namespace:
                raise bad_request("the namespace of the provided object does not match the namespace sent "
                                  "on the request")
            assert namespace is not None
            meta["namespace"] = namespace
            self._require_namespace(namespace)
        else:
            meta.pop("namespace", None)
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + "".join(secrets.choice(_GENERATE_CHARS) for _ in range(5))
        if meta.get("resourceVersion"):
            raise ApiError(500, "InternalError", "Internal error occurred: resourceVersion should not be set "
                           "on objects to be created")
        clean_meta(obj)
        meta = obj.setdefault("metadata", {})
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = format_time(self.clock.seconds())
        for key in ("deletionTimestamp", "deletionGracePeriodSeconds", "generation"):
            meta.pop(key, None)
        if strategy.has_generation:
            meta["generation"] = 1
        strategy.prepare_create(obj)
        strategy.normalize(obj, None)
        self._check(rtype, obj, strategy.validate(obj, None))
        if self._lookup(rtype, namespace, meta["name"]) is not None:
            raise already_exists(rtype, meta["name"])
        stored = self._commit(rtype, obj, "ADDED", None)
        self._collect_if_orphaned(rtype, stored)
        return copy.deepcopy(stored)

    def _check(self, rtype: ResourceType, obj: JSON, causes: list[Cause]) -> None:
        if causes:
            raise invalid(rtype, str(obj.get("metadata", {}).get("name", "")), causes)

    def replace_object(self, rtype: ResourceType, namespace: str | None, name: str, body: Any,
                subresource: str = "") -> JSON:
        """PUT: the whole object (or its status), with optimistic concurrency on resourceVersion."""
        current = self._get_or_404(rtype, namespace, name)
        candidate = self._decode(rtype, body)
        meta = candidate["metadata"]
        if meta.get("name", name) != name:
            raise bad_request(f"the name of the object ({meta['name']}) does not match the name on the URL "
                              f"({name})")
        if rtype.namespaced and meta.get("namespace", namespace) != namespace:
            raise bad_request("the namespace of the provided object does not match the namespace sent on "
                              "the request")
        return copy.deepcopy(self._update(rtype, current, candidate, subresource))

    def patch_object(self, rtype: ResourceType, namespace: str | None, name: str, content_type: str, patch: Any,
              subresource: str = "") -> JSON:
        current = self._get_or_404(rtype, namespace, name)
        media = content_type.split(";")[0].strip().lower()
        accepted = ["application/json-patch+json", "application/merge-patch+json"]
        if rtype.builtin:
            accepted.append("application/strategic-merge-patch+json")
        if media not in accepted:
            raise unsupported_patch(accepted)
        if media == "application/merge-patch+json":
            candidate = merge_patch(current, patch)
        elif media == "application/strategic-merge-patch+json":
            candidate = strategic_merge_patch(current, patch)
        else:
            try:
                candidate = json_patch(current, patch)
            except JsonPatchError as e:
                raise ApiError(422, "Invalid", f"the server rejected our request due to an error in our "
                               f"request: {e}") from None
        if not isinstance(candidate, dict):
            raise bad_request("the patch did not produce an object")
        candidate = self._decode(rtype, candidate)
        return copy.deepcopy(self._update(rtype, current, candidate, subresource))

    def _update(self, rtype: ResourceType, current: JSON, candidate: JSON, subresource: str) -> JSON:
        strategy = self._strategies[rtype]
        cur_meta = current["metadata"]
        name = cur_meta["name"]
        meta = candidate["metadata"]
        rv = meta.get("resourceVersion")
        if rv in (None, ""):
            if not strategy.allow_unconditional_update:
                raise invalid(rtype, name, [Cause("metadata.resourceVersion",
                                                  "Invalid value: 0x0: must be specified for an update")])
        elif str(rv) != cur_meta["resourceVersion"]:
            raise conflict(rtype, name)
        if meta.get("uid") and meta["uid"] != cur_meta["uid"]:
            raise conflict(rtype, name, f"Precondition failed: UID in precondition: {meta['uid']}, UID in "
                           f"object meta: {cur_meta['uid']}")
        if subresource == "status":
            new = copy.deepcopy(current)
            if "status" in candidate:
                new["status"] = candidate["status"]
            else:
                new.pop("status", None)
        else:
            new = candidate
            new_meta = new["metadata"]
            for key in SYSTEM_META:
                if key in cur_meta:
                    new_meta[key] = copy.deepcopy(cur_meta[key])
                else:
                    new_meta.pop(key, None)
            new_meta["name"] = name
            if rtype.namespaced:
                new_meta["namespace"] = cur_meta["namespace"]
            if strategy.status_subresource:
                if "status" in current:
                    new["status"] = copy.deepcopy(current["status"])
                else:
                    new.pop("status", None)
        clean_meta(new)
        new_meta = new.setdefault("metadata", {})
        new_meta["resourceVersion"] = cur_meta["resourceVersion"]
        strategy.normalize(new, current)
        causes = strategy.validate(new, current)
        if cur_meta.get("deletionTimestamp") and \
                set(new_meta.get("finalizers") or []) - set(cur_meta.get("finalizers") or []):
            causes.append(Cause("metadata.finalizers", "Forbidden: no new finalizers can be added if the "
                                "object is being deleted", "FieldValueForbidden"))
        self._check(rtype, new, causes)
        if strategy.has_generation and strategy.spec_changed(new, current):
            new_meta["generation"] = cur_meta.get("generation", 1) + 1
        if new == current:
            # Unchanged: the real server writes nothing and sends no event.
            return current
        if new_meta.get("deletionTimestamp") and not new_meta.get("finalizers"):
            return self._remove_now(rtype, new, current)
        stored = self._commit(rtype, new, "MODIFIED", current)
        self._collect_if_orphaned(rtype, stored)
        return stored

    def delete_object(self, rtype: ResourceType, namespace: str | None, name: str,
               options: JSON | None = None, propagation: str | None = None) -> tuple[JSON, bool]:
        """
        DELETE one object: (the object or its last state, whether it is gone
        now).  Finalizers keep it (with deletionTimestamp set) until they are
        removed; dependents are collected per the propagation policy.
        """
        current = self._get_or_404(rtype, namespace, name)
        options = options or {}
        pre = options.get("preconditions") or {}
        cur_meta = current["metadata"]
        if pre.get("uid") and pre["uid"] != cur_meta["uid"]:
            raise conflict(rtype, name, f"Precondition failed: UID in precondition: {pre['uid']}, UID in "
                           f"object meta: {cur_meta['uid']}")
        if pre.get("resourceVersion") and pre["resourceVersion"] != cur_meta["resourceVersion"]:
            raise conflict(rtype, name, f"Precondition failed: ResourceVersion in precondition: "
                           f"{pre['resourceVersion']}, ResourceVersion in object meta: "
                           f"{cur_meta['resourceVersion']}")
        policy = propagation or options.get("propagationPolicy")
        if policy is None and options.get("orphanDependents"):
            policy = "Orphan"
        if policy not in (None, "Background", "Foreground", "Orphan"):
            raise invalid(rtype, name, [Cause("propagationPolicy", f'Unsupported value: "{policy}": '
                                              'supported values: "Foreground", "Background", "Orphan"',
                                              "FieldValueNotSupported")])
        if rtype.plural == "namespaces":
            return copy.deepcopy(self._delete_namespace(current)), False
        obj, gone = self._delete(rtype, current, policy or "Background")
        return copy.deepcopy(obj), gone

    def _delete(self, rtype: ResourceType, current: JSON, policy: str) -> tuple[JSON, bool]:
        meta = current["metadata"]
        if meta.get("deletionTimestamp"):
            return current, False
        if policy == "Orphan":
            self._orphan_dependents(meta["uid"])
        if policy == "Foreground" and self._dependents(meta["uid"]):
            marked = self._mark_deleting(rtype, current, extra_finalizer="foregroundDeletion")
            for dep_type, dep in self._dependents(meta["uid"]):
                self._delete(dep_type, dep, "Foreground")
            latest = self._get_or_404(rtype, meta.get("namespace"), meta["name"])
            finalizers = [f for f in latest["metadata"].get("finalizers") or [] if f != "foregroundDeletion"]
            unblocked = copy.deepcopy(latest)
            unblocked["metadata"]["finalizers"] = finalizers
            self._update(rtype, latest, unblocked, "")
            # The real server answers before the collector has run: the
            # object as marked, its foregroundDeletion finalizer pending.
            return marked, False
        if meta.get("finalizers"):
            return self._mark_deleting(rtype, current), False
        return self._remove_now(rtype, copy.deepcopy(current), current), True

    def _mark_deleting(self, rtype: ResourceType, current: JSON, extra_finalizer: str = "") -> JSON:
        new = copy.deepcopy(current)
        meta = new["metadata"]
        meta["deletionTimestamp"] = format_time(self.clock.seconds())
        meta["deletionGracePeriodSeconds"] = 0
        if extra_finalizer:
            meta["finalizers"] = list(meta.get("finalizers") or []) + [extra_finalizer]
        if self._strategies[rtype].has_generation:
            meta["generation"] = meta.get("generation", 1) + 1
        return self._commit(rtype, new, "MODIFIED", current)

    def _remove_now(self, rtype: ResourceType, last: JSON, current: JSON) -> JSON:
        gone = self._commit(rtype, last, "DELETED", current)
        uid = gone["metadata"]["uid"]
        for dep_type, dep in self._dependents(uid):
            self._collect_if_orphaned(dep_type, dep)
        ns = gone["metadata"].get("namespace")
        if ns:
            self._finish_namespace(ns)
        return gone

    # --- garbage collection ----------------------------------------------------

    def _dependents(self, uid: str) -> list[tuple[ResourceType, JSON]]:
        return [(rtype, obj) for rtype, table in self._objects.items() for obj in list(table.values())
                if any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])]

    def _owner_exists(self, ref: JSON, namespace: str | None) -> bool:
        rtype = resource_for_kind(ref.get("apiVersion", ""), ref.get("kind", ""))
        if rtype is None or rtype.virtual:
            # A kind this server does not serve: the real collector cannot
            # resolve it either, and leaves the dependent alone.
            return True
        owner = self._lookup(rtype, namespace if rtype.namespaced else None, ref.get("name", ""))
        return owner is not None and owner["metadata"]["uid"] == ref.get("uid")

    def _collect_if_orphaned(self, rtype: ResourceType, obj: JSON) -> None:
        """Delete C{obj} (background) when none of its owners exists any more, as the GC controller would."""
        refs = obj["metadata"].get("ownerReferences") or []
        if not refs or obj["metadata"].get("deletionTimestamp"):
            return
        ns = obj["metadata"].get("namespace")
        if any(self._owner_exists(ref, ns) for ref in refs):
            return
        current = self._lookup(rtype, ns, obj["metadata"]["name"])
        if current is not None:
            self._delete(rtype, current, "Background")

    def _orphan_dependents(self, uid: str) -> None:
        for rtype, dep in self._dependents(uid):
            new = copy.deepcopy(dep)
            refs = [r for r in new["metadata"]["ownerReferences"] if r.get("uid") != uid]
            if refs:
                new["metadata"]["ownerReferences"] = refs
            else:
                del new["metadata"]["ownerReferences"]
            self._commit(rtype, new, "MODIFIED", dep)

    def _delete_namespace(self, current: JSON) -> JSON:
        """Mark Terminating, delete the content, and drop the namespace once it is empty."""
        rtype = resource_by_name("namespaces")
        if current["metadata"].get("deletionTimestamp"):
            return current
        new = copy.deepcopy(current)
        new["metadata"]["deletionTimestamp"] = format_time(self.clock.seconds())
        new["status"] = {"phase": "Terminating"}
        marked = self._commit(rtype, new, "MODIFIED", current)
        name = current["metadata"]["name"]
        for ctype, table in self._objects.items():
            if ctype.namespaced:
                for (ns, _), obj in list(table.items()):
                    if ns == name and (ns, obj["metadata"]["name"]) in table:
                        self._delete(ctype, obj, "Background")
        self._finish_namespace(name)
        return marked

    def _finish_namespace(self, name: str) -> None:
        rtype = resource_by_name("namespaces")
        ns = self._lookup(rtype, None, name)
        if ns is None or not ns["metadata"].get("deletionTimestamp"):
            return
        if any(key[0] == name for ctype, table in self._objects.items() if ctype.namespaced for key in table):
            return
        self._commit(rtype, copy.deepcopy(ns), "DELETED", ns)

    def delete_collection(self, rtype: ResourceType, namespace: str | None, label_selector: str,
                          field_selector: str) -> JSON:
        listed = self.list_objects(rtype, namespace, label_selector, field_selector)
        for item in listed["items"]:
            current = self._lookup(rtype, namespace, item["metadata"]["name"])
            if current is not None:
                self._delete(rtype, current, "Background")
        return listed

    # --- watch ------------------------------------------------------------------

    def watch(self, rtype: ResourceType, namespace: str | None, *, label_selector: str = "",
              field_selector: str = "", resource_version: str = "", bookmarks: bool = False,
              send_initial_events: bool = False, emit: Callable[[JSON], None],
              end: Callable[[bool], None]) -> Watch:
        """
        Open a watch and deliver what it starts with: the current objects as
        ADDED (no resourceVersion, C{"0"}, or C{sendInitialEvents}), or the
        changes after C{resource_version} from history.  Raises 410 (the
        caller sends it as an ERROR event) when that history is compacted.
        """
        watch = Watch(self, rtype, namespace, parse_label_selector(label_selector),
                      parse_field_selector(rtype, field_selector), bookmarks, emit, end)
        since = self._check_rv_not_too_large(resource_version)
        watch.since = self.resource_version if since in (None, 0) else since
        if send_initial_events or since in (None, 0):
            for obj in (o for _, o in sorted(self._objects[rtype].items())):
                if watch.matches(obj):
                    emit(wire_event("ADDED", obj))
            if send_initial_events:
                watch.bookmark({"k8s.io/initial-events-end": "true"})
        else:
            assert since is not None
            if since < self._compacted:
                raise expired(since, self._compacted + 1)
            for event in self._history:
                if event.rv > since:
                    watch.offer(event)
        self._watches.add(watch)
        return watch

    # --- reviews and tokens -------------------------------------------------------

    def token_review(self, body: Any) -> JSON:
        rtype = resource_by_name("tokenreviews")
        review = self._decode(rtype, body)
        spec = review.get("spec") or {}
        token = spec.get("token")
        if not token or not isinstance(token, str):
            raise bad_request("token is required for TokenReview in authentication.k8s.io")
        found = self._tokens.get(token)
        user, audiences, error = review_token(
            found, spec.get("audiences") or (), self.api_audiences, self.clock.seconds(),
            None if found is None else self._bound_uid(found))
        status: JSON
        if user is None:
            # authenticated is omitempty: a refusal has no such field at all.
            status = {"user": {}, "error": error}
        else:
            status = {"authenticated": True, "user": user.info(), "audiences": audiences}
        return {"kind": "TokenReview", "apiVersion": rtype.api_version, "metadata": {"creationTimestamp": None},
                "spec": spec, "status": status}

    def access_review(self, body: Any, caller: User | None = None) -> JSON:
        """
        A SubjectAccessReview; with C{caller}, a SelfSubjectAccessReview
        (C{kubectl auth can-i}) about that caller.
        """
        rtype = resource_by_name("selfsubjectaccessreviews" if caller else "subjectaccessreviews")
        review = self._decode(rtype, body)
        spec = review.get("spec") or {}
        if caller is not None:
            spec = dict(spec, user=caller.name, groups=list(caller.groups))
        causes = []
        if not spec.get("user") and not spec.get("groups"):
            causes.append(Cause("spec.user", 'Invalid value: "": at least one of user or group must be '
                                "specified"))
        resource_attrs, path_attrs = spec.get("resourceAttributes"), spec.get("nonResourceAttributes")
        if bool(resource_attrs) == bool(path_attrs):
            causes.append(Cause("spec.resourceAttributes", 'Invalid value: "null": exactly one of '
                                "nonResourceAttributes or resourceAttributes must be specified"))
        if causes:
            raise invalid(rtype, "", causes)
        user = User(spec.get("user", ""), spec.get("uid", ""), tuple(spec.get("groups") or ()))
        if resource_attrs:
            attrs = Attributes(user, resource_attrs.get("verb", ""), resource_attrs.get("group", ""),
                               resource_attrs.get("resource", ""), resource_attrs.get("subresource", ""),
                               resource_attrs.get("namespace", ""), resource_attrs.get("name", ""))
        else:
            path_attrs = path_attrs or {}
            attrs = Attributes(user, path_attrs.get("verb", ""), path=path_attrs.get("path", "/"))
        allowed, why = self.authorize(attrs)
        status: JSON = {"allowed": allowed}
        if why:
            status["reason"] = why
        if caller is not None:
            spec = {k: v for k, v in spec.items() if k not in ("user", "groups")}
        return {"kind": rtype.kind, "apiVersion": rtype.api_version,
                "metadata": {"creationTimestamp": None}, "spec": spec, "status": status}

    def token_request(self, namespace: str, name: str, body: Any) -> JSON:
        """The C{serviceaccounts/token} subresource: mint a token bound to the ServiceAccount."""
        sa = self._get_or_404(resource_by_name("serviceaccounts"), namespace, name)
        if not isinstance(body, dict) or body.get("kind", "TokenRequest") != "TokenRequest":
            raise bad_request("the body of the request must be a TokenRequest")
        spec = dict(body.get("spec") or {})
        audiences = list(spec.get("audiences") or self.api_audiences)
        seconds = spec.get("expirationSeconds") or 3600
        if not isinstance(seconds, int) or seconds < 600:
            raise ApiError(422, "Invalid", f'TokenRequest.authentication.k8s.io "{name}" is invalid: '
                           f"spec.expirationSeconds: Invalid value: {seconds}: may not specify a duration "
                           "less than 10 minutes", {"name": name, "group": "authentication.k8s.io",
                                                    "kind": "TokenRequest"})
        now = self.clock.seconds()
        uid = sa["metadata"]["uid"]
        user = service_account_user(namespace, name, uid)
        token = mint_token(DEFAULT_AUDIENCE, user, namespace, name, audiences, now, now + seconds)
        self._tokens[token] = Token(user, tuple(audiences), now + seconds, (namespace, name, uid))
        spec.update({"audiences": audiences, "expirationSeconds": seconds,
                     "boundObjectRef": spec.get("boundObjectRef")})
        return {"kind": "TokenRequest", "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"name": name, "namespace": namespace, "creationTimestamp": None},
                "spec": spec, "status": {"token": token, "expirationTimestamp": format_time(now + seconds)}}


def start_fake_kube(test: Any, reactor: Any, tls: bool = False,
                    **options: Any) -> tuple[FakeKube, FakeKubeServer]:
    """
    A L{FakeKube} served on a loopback port for one trial test, stopped
    (connections cut, port closed) at the test's cleanup.  Returns
    C{(fake, server)}; C{options} go to L{FakeKube} (C{clock} defaults to
    C{reactor}: pass a L{twisted.internet.task.Clock} to drive bookmarks,
    watch timeouts and token expiry by hand while the sockets stay real).
    """
    from connectors_proxy.testing.fakekube_http import FakeKubeServer

    options.setdefault("clock", reactor)
    fake = FakeKube(**options)
    server = FakeKubeServer.listen(fake, reactor, tls=tls)
    test.addCleanup(server.stop)
    return fake, server


def main(argv: Sequence[str] | None = None) -> None:
    """C{python -m connectors_proxy.testing.fakekube}: serve a fake API server until interrupted."""
    import argparse

    from twisted.internet import reactor

    from connectors_proxy.testing.fakekube_http import FakeKubeServer

    parser = argparse.ArgumentParser(prog="python -m connectors_proxy.testing.fakekube",
                                     description="In-memory Kubernetes API server for manual testing.")
    parser.add_argument("--port", type=int, default=0, help="loopback port (default: any free one)")
    parser.add_argument("--token", default=None, help="the admin bearer token (default: random, printed)")
    parser.add_argument("--tls", action="store_true", help="serve HTTPS with a fresh self-signed certificate")
    parser.add_argument("--kubeconfig", default=None, help="write a kubeconfig for this server to PATH")
    parser.add_argument("--apply", action="append", default=[], metavar="PATH",
                        help="create the objects of a YAML file or folder (repeatable)")
    parser.add_argument("--bookmark-interval", type=float, default=60.0)
    args = parser.parse_args(argv)
    options: dict[str, Any] = {"bookmark_interval": args.bookmark_interval}
    if args.token:
        options["admin_token"] = args.token
    fake = FakeKube(clock=reactor, **options)  # type: ignore[arg-type]
    for doc in read_manifests([Path(p) for p in args.apply]):
        if isinstance(doc, dict) and resource_for_kind(doc.get("apiVersion", ""), doc.get("kind", "")):
            fake.apply(doc)
    server = FakeKubeServer.listen(fake, reactor, port=args.port, tls=args.tls)
    if args.kubeconfig:
        server.write_kubeconfig(args.kubeconfig)
    print(f"fakekube listening on {server.url} (token {fake.admin_token})", flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main(sys.argv[1:])
