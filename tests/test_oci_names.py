"""Tests for L{connectors_proxy.protocols.oci.names}: end points, scopes, path-mode names."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from connectors_proxy.protocols.oci.names import (
    BLOB,
    CATALOG,
    MANIFEST,
    NAME_RE,
    PING,
    REFERRERS,
    TAGS,
    UPLOAD,
    UPLOADS,
    NameMap,
    OciPath,
    merge_scopes,
    parse_oci_path,
    query_value,
    rewrite_json_names,
    rewrite_link,
    rewrite_upstream_url,
    scopes_for,
)

DIGEST = "sha256:" + "a" * 64
PATH_MODE = NameMap.for_path_mode("default", "harbor")


class ParseTests(SynchronousTestCase):
    def test_end_points(self) -> None:
        cases = {
            "/v2/": OciPath(PING),
            "/v2": OciPath(PING),
            "/v2/_catalog": OciPath(CATALOG),
            "/v2/test/abc/manifests/v1": OciPath(MANIFEST, "test/abc", "v1"),
            f"/v2/test/abc/manifests/{DIGEST}": OciPath(MANIFEST, "test/abc", DIGEST),
            f"/v2/a/blobs/{DIGEST}": OciPath(BLOB, "a", DIGEST),
            "/v2/a/b/c/blobs/uploads/": OciPath(UPLOADS, "a/b/c"),
            "/v2/a/blobs/uploads/0f1e-uuid": OciPath(UPLOAD, "a", "0f1e-uuid"),
            "/v2/a/tags/list": OciPath(TAGS, "a"),
            f"/v2/a/referrers/{DIGEST}": OciPath(REFERRERS, "a", DIGEST),
            # Names that look like end points are still names.
            "/v2/blobs/blobs/uploads/": OciPath(UPLOADS, "blobs"),
            "/v2/uploads/manifests/manifests/v1": OciPath(MANIFEST, "uploads/manifests", "v1"),
            "/v2/namespaces/default/connectors/harbor/test/abc/manifests/v1":
                OciPath(MANIFEST, "namespaces/default/connectors/harbor/test/abc", "v1"),
        }
        for path, expected in cases.items():
            self.assertEqual(parse_oci_path(path), expected, path)
            if expected.kind != PING:
                self.assertEqual(expected.path(), path.rstrip("/") if expected.kind == CATALOG else path)

    def test_not_end_points(self) -> None:
        for path in ["/", "/v1/", "/v2/a", "/v2/A/manifests/v1", "/v2/a//b/manifests/v1",
                     "/v2/a/manifests/", "/v2/a/manifests/bad tag", "/v2/../manifests/v1",
                     "/v2/a/%2e%2e/manifests/v1", "/v2/a/tags/other", "/v2/a_/manifests/v1",
                     "/v2/a/manifests/v1/extra"]:
            self.assertIsNone(parse_oci_path(path), path)


class ScopeTests(SynchronousTestCase):
    def test_scopes(self) -> None:
        m = OciPath(MANIFEST, "a/b", "v1")
        self.assertEqual(scopes_for(b"GET", m), ("repository:a/b:pull",))
        self.assertEqual(scopes_for(b"HEAD", OciPath(BLOB, "a", DIGEST)), ("repository:a:pull",))
        self.assertEqual(scopes_for(b"PUT", m), ("repository:a/b:pull,push",))
        self.assertEqual(scopes_for(b"DELETE", m), ("repository:a/b:delete",))
        self.assertEqual(scopes_for(b"POST", OciPath(UPLOADS, "a")), ("repository:a:pull,push",))
        self.assertEqual(scopes_for(b"PATCH", OciPath(UPLOAD, "a", "u")), ("repository:a:pull,push",))
        self.assertEqual(scopes_for(b"GET", OciPath(UPLOAD, "a", "u")), ("repository:a:pull,push",))
        self.assertEqual(scopes_for(b"GET", OciPath(TAGS, "a")), ("repository:a:pull",))
        self.assertEqual(scopes_for(b"GET", OciPath(REFERRERS, "a", DIGEST)), ("repository:a:pull",))
        self.assertEqual(scopes_for(b"GET", OciPath(CATALOG)), ("registry:catalog:*",))
        self.assertEqual(scopes_for(b"GET", OciPath(PING)), ())

    def test_mount_asks_for_the_source(self) -> None:
        self.assertEqual(
            scopes_for(b"POST", OciPath(UPLOADS, "a"), f"mount={DIGEST}&from=b/c"),
            ("repository:a:pull,push", "repository:b/c:pull"),
        )
        # "from" without "mount" is no mount; a bad name is no scope.
        self.assertEqual(scopes_for(b"POST", OciPath(UPLOADS, "a"), "from=b"), ("repository:a:pull,push",))
        self.assertEqual(scopes_for(b"POST", OciPath(UPLOADS, "a"), f"mount={DIGEST}&from=B:x"),
                         ("repository:a:pull,push",))

    def test_merge(self) -> None:
        self.assertEqual(merge_scopes(("a", "b"), ("b", "c")), ("a", "b", "c"))


class NameMapTests(SynchronousTestCase):
    def test_host_mode_is_identity(self) -> None:
        names = NameMap()
        self.assertEqual(names.to_upstream("a/b"), "a/b")
        self.assertEqual(names.to_client("a/b"), "a/b")
        self.assertEqual(names.upstream_query(OciPath(UPLOADS, "a"), "mount=x&from=y"), "mount=x&from=y")

    def test_path_mode(self) -> None:
        self.assertEqual(PATH_MODE.to_upstream("namespaces/default/connectors/harbor/test/abc"), "test/abc")
        self.assertIsNone(PATH_MODE.to_upstream("namespaces/default/connectors/other/test/abc"))
        self.assertIsNone(PATH_MODE.to_upstream("namespaces/default/connectors/harbor/"))
        self.assertIsNone(PATH_MODE.to_upstream("test/abc"))
        self.assertEqual(PATH_MODE.to_client("test/abc"), "namespaces/default/connectors/harbor/test/abc")

    def test_client_paths(self) -> None:
        self.assertEqual(PATH_MODE.client_path(OciPath(CATALOG)), "/v2/namespaces/default/connectors/harbor/_catalog")
        self.assertEqual(PATH_MODE.client_path(OciPath(PING)), "/v2/namespaces/default/connectors/harbor/")
        self.assertEqual(NameMap().client_path(OciPath(CATALOG)), "/v2/_catalog")
        self.assertEqual(PATH_MODE.client_path(OciPath(TAGS, "a")), "/v2/namespaces/default/connectors/harbor/a/tags/list")

    @given(st.from_regex(NAME_RE, fullmatch=True))
    def test_round_trip(self, name: str) -> None:
        self.assertEqual(PATH_MODE.to_upstream(PATH_MODE.to_client(name)), name)

    def test_mount_from_same_connector(self) -> None:
        query = f"mount={DIGEST}&from=namespaces/default/connectors/harbor/src/img&x=%2F"
        up = PATH_MODE.upstream_query(OciPath(UPLOADS, "x"), query)
        self.assertEqual(up, f"mount={DIGEST}&from=src/img&x=%2F")
        self.assertEqual(query_value(up, "from"), "src/img")
        self.assertEqual(PATH_MODE.client_query(OciPath(UPLOADS, "x"), up), query)

    def test_mount_from_encoded_name(self) -> None:
        query = f"mount={DIGEST}&from=namespaces%2Fdefault%2Fconnectors%2Fharbor%2Fsrc"
        self.assertEqual(PATH_MODE.upstream_query(OciPath(UPLOADS, "x"), query), f"mount={DIGEST}&from=src")

    def test_mount_from_other_connector_becomes_upload(self) -> None:
        query = f"mount={DIGEST}&from=namespaces/default/connectors/other/src"
        self.assertEqual(PATH_MODE.upstream_query(OciPath(UPLOADS, "x"), query), "")
        self.assertEqual(PATH_MODE.upstream_query(OciPath(UPLOADS, "x"), query + "&digest=d"), "digest=d")

    def test_catalog_last(self) -> None:
        up = PATH_MODE.upstream_query(OciPath(CATALOG), "n=2&last=namespaces/default/connectors/harbor/b")
        self.assertEqual(up, "n=2&last=b")
        self.assertEqual(PATH_MODE.client_query(OciPath(CATALOG), up),
                         "n=2&last=namespaces/default/connectors/harbor/b")

    def test_other_queries_verbatim(self) -> None:
        for q in ["n=10&last=v2", "digest=sha256%3Aabc", "a=%2F%2e%2e&&b", "_state=abc%3D%3D"]:
            self.assertEqual(PATH_MODE.upstream_query(OciPath(TAGS, "x"), q), q)
            self.assertEqual(PATH_MODE.upstream_query(OciPath(UPLOAD, "x", "u"), q), q)


class RewriteTests(SynchronousTestCase):
    address = "http://registry.example:5000"
    request = "http://registry.example:5000/v2/test/abc/blobs/uploads/"

    def test_relative_upload_location(self) -> None:
        r = rewrite_upstream_url("/v2/test/abc/blobs/uploads/u-1?_state=xyz%3D", self.request, self.address,
                                 PATH_MODE)
        self.assertEqual(r.local, "/v2/namespaces/default/connectors/harbor/test/abc/blobs/uploads/u-1?_state=xyz%3D")
        self.assertIsNone(r.foreign)

    def test_absolute_location_same_origin(self) -> None:
        r = rewrite_upstream_url("http://registry.example:5000/v2/test/abc/blobs/uploads/u-1", self.request,
                                 self.address, NameMap())
        self.assertEqual(r.local, "/v2/test/abc/blobs/uploads/u-1")
        r = rewrite_upstream_url("http://registry.example:5000/v2/test/abc/blobs/uploads/u-1", self.request,
                                 self.address, PATH_MODE, "http://127.0.0.1:8080")
        self.assertEqual(r.local, "http://127.0.0.1:8080/v2/namespaces/default/connectors/harbor/test/abc/blobs/uploads/u-1")
        # A relative one stays relative.
        r = rewrite_upstream_url("/v2/a/blobs/uploads/u", self.request, self.address, NameMap(), "http://p")
        self.assertEqual(r.local, "/v2/a/blobs/uploads/u")

    def test_default_ports_are_same_origin(self) -> None:
        r = rewrite_upstream_url("https://reg.example:443/v2/a/tags/list", "https://reg.example/v2/a/tags/list",
                                 "https://reg.example", NameMap())
        self.assertEqual(r.local, "/v2/a/tags/list")

    def test_foreign_location(self) -> None:
        for url in ["http://storage.example/blob?sig=1", "https://registry.example:5000/v2/x",
                    "http://registry.example:5001/v2/x", "//cdn.example/x"]:
            r = rewrite_upstream_url(url, self.request, self.address, NameMap())
            self.assertIsNone(r.local, url)
            self.assertTrue(r.foreign and r.foreign.startswith("http"), url)

    def test_address_with_path_prefix(self) -> None:
        address = "https://proxy.example/registry"
        r = rewrite_upstream_url("/registry/v2/a/blobs/uploads/u", "https://proxy.example/registry/v2/a/blobs/uploads/",
                                 address, PATH_MODE)
        self.assertEqual(r.local, "/v2/namespaces/default/connectors/harbor/a/blobs/uploads/u")
        # Same origin but outside the prefix: not ours to hand out.
        r = rewrite_upstream_url("/elsewhere/v2/a", "https://proxy.example/registry/v2/", address, PATH_MODE)
        self.assertEqual(r.foreign, "https://proxy.example/elsewhere/v2/a")

    def test_manifest_location(self) -> None:
        r = rewrite_upstream_url(f"/v2/test/abc/manifests/{DIGEST}", self.request, self.address, PATH_MODE)
        self.assertEqual(r.local, f"/v2/namespaces/default/connectors/harbor/test/abc/manifests/{DIGEST}")

    def test_link(self) -> None:
        self.assertEqual(
            rewrite_link('</v2/test/abc/tags/list?n=2&last=b>; rel="next"', self.request, self.address, PATH_MODE),
            '</v2/namespaces/default/connectors/harbor/test/abc/tags/list?n=2&last=b>; rel="next"')
        self.assertEqual(
            rewrite_link('<http://registry.example:5000/v2/_catalog?last=x%2Fy&n=1>; rel="next"',
                         self.request, self.address, PATH_MODE),
            '</v2/namespaces/default/connectors/harbor/_catalog?last=namespaces/default/connectors/harbor/x/y&n=1>;'
            ' rel="next"')
        self.assertEqual(
            rewrite_link('</v2/_catalog?last=x&n=1>; rel="next"', self.request, self.address, NameMap()),
            '</v2/_catalog?last=x&n=1>; rel="next"')
        foreign = '<https://other.example/v2/_catalog?last=x>; rel="next"'
        self.assertEqual(rewrite_link(foreign, self.request, self.address, PATH_MODE), foreign)


class BodyTests(SynchronousTestCase):
    def test_tags(self) -> None:
        out = json.loads(rewrite_json_names(TAGS, b'{"name":"test/abc","tags":["v1"]}', PATH_MODE))
        self.assertEqual(out, {"name": "namespaces/default/connectors/harbor/test/abc", "tags": ["v1"]})

    def test_catalog(self) -> None:
        out = json.loads(rewrite_json_names(CATALOG, b'{"repositories":["a","b/c"]}', PATH_MODE))
        self.assertEqual(out["repositories"], ["namespaces/default/connectors/harbor/a",
                                               "namespaces/default/connectors/harbor/b/c"])

    def test_error_detail(self) -> None:
        body = b'{"errors":[{"code":"NAME_UNKNOWN","message":"m","detail":{"name":"a"}}]}'
        out = json.loads(rewrite_json_names(MANIFEST, body, PATH_MODE))
        self.assertEqual(out["errors"][0]["detail"]["name"], "namespaces/default/connectors/harbor/a")

    def test_untouched(self) -> None:
        for body in [b"not json", b"[1]", b'{"other": 1}', b"\xff"]:
            self.assertEqual(rewrite_json_names(TAGS, body, PATH_MODE), body)
        self.assertEqual(rewrite_json_names(TAGS, b'{"name":"a"}', NameMap()), b'{"name":"a"}')

