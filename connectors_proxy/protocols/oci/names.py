# -*- test-case-name: tests.test_oci_names -*-
"""
The distribution API's paths and names, as pure functions:

 - which end point a request path is (L{parse_oci_path});
 - which token scopes a request needs (L{scopes_for});
 - path mode's repository names, C{namespaces/NS/connectors/NAME/REPO} for
   the client and C{REPO} upstream, mapped both ways (L{NameMap}), in paths,
   queries (C{from=}, C{last=}), C{Location} and C{Link} headers and the
   JSON bodies that carry names (tags list, catalog, errors).

Paths and queries are handled as the strings the client sent: nothing is
decoded or normalised, except the pieces that are rewritten.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote, unquote, urljoin, urlsplit

from attrs import frozen

from connectors_proxy.server.headers import same_origin

# Repository names, from the distribution specification.
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_REFERENCE_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}|[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")

PING = "ping"
CATALOG = "catalog"
MANIFEST = "manifest"
BLOB = "blob"
UPLOADS = "uploads"      # POST /v2/NAME/blobs/uploads/ : start an upload (or mount)
UPLOAD = "upload"        # /v2/NAME/blobs/uploads/UUID : an upload session
TAGS = "tags"
REFERRERS = "referrers"

# The name is greedy, as in the registry's own router: for a name that itself
# holds "/manifests/" the longest name wins.  Upload sessions come before
# blobs so that "blobs/uploads/ID" is never read as blob "uploads".
_PATH_RE = re.compile(
    r"^/v2/(?P<name>.+)/(?:"
    r"manifests/(?P<manifest>[^/]+)"
    r"|blobs/uploads/(?P<upload>[^/]*)"
    r"|blobs/(?P<blob>[^/]+)"
    r"|tags/(?P<tags>list)"
    r"|referrers/(?P<referrers>[^/]+)"
    r")$"
)


@frozen
class OciPath:
    """
    A distribution API end point.  C{name} is the repository (C{None} for
    the ping and the catalog); C{reference} the tag, digest or upload id.
    """

    kind: str
    name: str | None = None
    reference: str | None = None

    def path(self, name: str | None = None) -> str:
        """The path of this end point, for repository C{name} (default: its own)."""
        name = self.name if name is None else name
        if self.kind == PING:
            return "/v2/"
        if self.kind == CATALOG:
            return "/v2/_catalog"
        suffix = {
            MANIFEST: f"manifests/{self.reference}",
            BLOB: f"blobs/{self.reference}",
            UPLOADS: "blobs/uploads/",
            UPLOAD: f"blobs/uploads/{self.reference}",
            TAGS: "tags/list",
            REFERRERS: f"referrers/{self.reference}",
        }[self.kind]
        return f"/v2/{name}/{suffix}"


def parse_oci_path(path: str) -> OciPath | None:
    """
    The end point that C{path} (without its query) names, or C{None} when it
    is not one of the distribution API or its repository name is invalid.
    """
    if path in ("/v2", "/v2/"):
        return OciPath(PING)
    if path in ("/v2/_catalog", "/v2/_catalog/"):
        return OciPath(CATALOG)
    match = _PATH_RE.match(path)
    if match is None:
        return None
    name = match.group("name")
    if not NAME_RE.fullmatch(name):
        return None
    if match.group("manifest") is not None:
        reference = match.group("manifest")
        return OciPath(MANIFEST, name, reference) if _REFERENCE_RE.fullmatch(reference) else None
    if match.group("upload") is not None:
        upload = match.group("upload")
        return OciPath(UPLOAD, name, upload) if upload else OciPath(UPLOADS, name)
    if match.group("blob") is not None:
        return OciPath(BLOB, name, match.group("blob"))
    if match.group("tags") is not None:
        return OciPath(TAGS, name)
    return OciPath(REFERRERS, name, match.group("referrers"))


# -- scopes ----------------------------------------------------------------------

_READ = (b"GET", b"HEAD")


def repository_scope(name: str, actions: str) -> str:
    return f"repository:{name}:{actions}"


def scopes_for(method: bytes, path: OciPath, query: str = "") -> tuple[str, ...]:
    """
    The token scopes a request needs upstream, with upstream names: C{pull}
    to read, C{pull,push} to write (what Docker and containers/image ask
    for), C{delete} to delete, C{pull} on the source of a cross-repository
    mount, and C{registry:catalog:*} for the catalog.  Asking for all of it
    before the request lets a body that cannot be sent twice go out with a
    token that suffices.
    """
    if path.kind == PING:
        return ()
    if path.kind == CATALOG:
        return ("registry:catalog:*",)
    assert path.name is not None
    if path.kind in (UPLOADS, UPLOAD):
        scopes = [repository_scope(path.name, "pull,push")]
        mount_from = query_value(query, "from") if query_value(query, "mount") else None
        if mount_from and mount_from != path.name and NAME_RE.fullmatch(mount_from):
            scopes.append(repository_scope(mount_from, "pull"))
        return tuple(scopes)
    if method in _READ:
        return (repository_scope(path.name, "pull"),)
    if method == b"DELETE":
        return (repository_scope(path.name, "delete"),)
    return (repository_scope(path.name, "pull,push"),)


def merge_scopes(*groups: Sequence[str]) -> tuple[str, ...]:
    """All scopes of C{groups}, each once, in order of first appearance."""
    seen: dict[str, None] = {}
    for group in groups:
        for scope in group:
            seen.setdefault(scope, None)
    return tuple(seen)


# -- queries ---------------------------------------------------------------------


def query_value(query: str, key: str) -> str | None:
    """The first value of C{key} in C{query} (decoded), or C{None}."""
    for part in query.split("&"):
        k, _, v = part.partition("=")
        if unquote(k) == key:
            return unquote(v.replace("+", " "))
    return None


def _replace_params(query: str, changes: dict[str, str | None]) -> str:
    """
    C{query} with the values of the keys in C{changes} replaced (C{None}
    drops the parameter); every other parameter stays byte for byte.
    """
    out = []
    for part in query.split("&") if query else []:
        key = unquote(part.partition("=")[0])
        if key in changes:
            value = changes[key]
            if value is None:
                continue
            part = f"{part.partition('=')[0]}={quote(value, safe='/:')}"
        out.append(part)
    return "&".join(out)


# -- path mode names -------------------------------------------------------------


@frozen
class NameMap:
    """
    How repository names differ between client and upstream.  In host mode
    C{prefix} is empty and names are the same; in path mode it is
    C{namespaces/NS/connectors/NAME/}.
    """

    prefix: str = ""

    @classmethod
    def for_path_mode(cls, namespace: str, name: str) -> NameMap:
        return cls(f"namespaces/{namespace}/connectors/{name}/")

    def to_upstream(self, name: str) -> str | None:
        """The upstream name of client name C{name}; C{None} if not this Connector's."""
        if not name.startswith(self.prefix):
            return None
        rest = name[len(self.prefix):]
        return rest if rest else None

    def to_client(self, name: str) -> str:
        return self.prefix + name

    def upstream_query(self, path: OciPath, query: str) -> str:
        """
        The query to send upstream: a mount's C{from=} and the catalog's
        C{last=} name repositories and lose the prefix.  A mount from a
        repository of another Connector cannot happen upstream (it is
        another registry, or other credentials): C{mount} and C{from} are
        dropped, and the registry starts a plain upload, as the
        specification allows.
        """
        if not self.prefix or not query:
            return query
        if path.kind == UPLOADS and query_value(query, "from") is not None:
            source = self.to_upstream(query_value(query, "from") or "")
            if source is None:
                return _replace_params(query, {"mount": None, "from": None})
            return _replace_params(query, {"from": source})
        if path.kind == CATALOG and query_value(query, "last"):
            last = self.to_upstream(query_value(query, "last") or "")
            return _replace_params(query, {"last": last if last is not None else ""})
        return query

    def client_query(self, path: OciPath, query: str) -> str:
        """The inverse of L{upstream_query}, for URLs that go back to the client."""
        if not self.prefix or not query:
            return query
        if path.kind == UPLOADS and query_value(query, "from"):
            return _replace_params(query, {"from": self.to_client(query_value(query, "from") or "")})
        if path.kind == CATALOG and query_value(query, "last"):
            return _replace_params(query, {"last": self.to_client(query_value(query, "last") or "")})
        return query

    def client_path(self, path: OciPath) -> str:
        """The path of an upstream end point as the client names it."""
        if path.kind == PING:
            return "/v2/" + self.prefix
        if path.kind == CATALOG:
            return "/v2/" + self.prefix + "_catalog"
        assert path.name is not None
        return path.path(self.to_client(path.name))


# -- URLs that come back from upstream ------------------------------------------------


@frozen
class Rewritten:
    """
    Where an upstream URL points, for the client: C{local} is the path and
    query to send instead (same origin as the registry, names mapped);
    C{foreign} the absolute URL of another origin (a storage backend), which
    the proxy follows itself for blobs.
    """

    local: str | None = None
    foreign: str | None = None


def rewrite_upstream_url(url: str, request_url: str, address: str, names: NameMap,
                         client_base: str | None = None) -> Rewritten:
    """
    Map C{url} (a C{Location} or a C{Link} target, absolute or relative to
    C{request_url}) to what the client must see.  A URL on the registry
    (the origin of C{address}, under its path prefix) becomes a path on the
    proxy with repository names mapped, made absolute on C{client_base}
    (C{scheme://host[:port]} as the client reached the proxy) when the
    upstream's was absolute; anything else is C{foreign}.
    """
    absolute = urljoin(request_url, url)
    prefix = urlsplit(address).path.rstrip("/")
    parts = urlsplit(absolute)
    if not same_origin(absolute, address) or not (parts.path == prefix or parts.path.startswith(prefix + "/")):
        return Rewritten(foreign=absolute)
    path = parts.path[len(prefix):] or "/"
    query = parts.query
    oci = parse_oci_path(path)
    if oci is not None:
        path = names.client_path(oci)
        query = names.client_query(oci, query)
    local = path + ("?" + query if query else "")
    given = urlsplit(url)
    if client_base is not None and (given.scheme or url.startswith("//")):
        local = client_base.rstrip("/") + local
    return Rewritten(local=local)


_LINK_RE = re.compile(r"<([^>]*)>")


def rewrite_link(value: str, request_url: str, address: str, names: NameMap) -> str:
    """
    A C{Link} header value (pagination of tags and catalog) with every
    target that points at the registry moved to the proxy.  Targets on
    other origins are left alone: they are not ours to fetch.
    """
    def one(match: re.Match[str]) -> str:
        rewritten = rewrite_upstream_url(match.group(1), request_url, address, names)
        return f"<{rewritten.local}>" if rewritten.local is not None else match.group(0)
    return _LINK_RE.sub(one, value)


# -- JSON bodies that carry names ---------------------------------------------------

# Tag lists and catalogs are read whole to rename them: refuse to buffer
# more than this (a larger one goes to the client unchanged).
MAX_REWRITTEN_BODY = 8 * 1024 * 1024


def rewrite_json_names(kind: str, body: bytes, names: NameMap) -> bytes:
    """
    A tags list (C{name}), catalog (C{repositories}) or error body
    (C{errors[].detail.name}) with upstream names mapped to the client's.
    Anything that does not parse is returned as it came.
    """
    if not names.prefix:
        return body
    try:
        doc: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body
    if not isinstance(doc, dict):
        return body
    changed = False
    if kind == TAGS and isinstance(doc.get("name"), str):
        doc["name"] = names.to_client(doc["name"])
        changed = True
    if kind == CATALOG and isinstance(doc.get("repositories"), list):
        doc["repositories"] = [names.to_client(r) if isinstance(r, str) else r for r in doc["repositories"]]
        changed = True
    if isinstance(doc.get("errors"), list):
        for error in doc["errors"]:
            detail = error.get("detail") if isinstance(error, dict) else None
            if isinstance(detail, dict) and isinstance(detail.get("name"), str):
                detail["name"] = names.to_client(detail["name"])
                changed = True
    return json.dumps(doc, separators=(",", ":")).encode() if changed else body
