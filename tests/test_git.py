"""
The pure parts of the Git protocol (connectors_proxy/protocols/git.py):
request classification, LFS batch rewriting, error bodies.  No reactor.
"""

from __future__ import annotations

import copy
import gzip
import json
import zlib
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from connectors_proxy.protocols.git import (
    FETCH,
    LFS_MEDIA_TYPE,
    PUSH,
    GitRequest,
    classify,
    decode_body,
    error_response,
    rewrite_lfs_batch,
)
from connectors_proxy.server.errors import ProxyError, forbidden, unauthorized
from connectors_proxy.server.headers import rewrite_location

UPSTREAM = "https://git.example.com/scm"
CLIENT_BASE = "http://127.0.0.1:8080"
PREFIX = "/namespaces/dev/connectors/repo"


def to_client(href: str) -> str:
    return rewrite_location(href.encode(), UPSTREAM.encode(), CLIENT_BASE.encode(), PREFIX.encode()).decode()


class ClassifyTests(SynchronousTestCase):
    def test_discovery(self) -> None:
        self.assertEqual(classify(b"GET", b"/team/app.git/info/refs?service=git-upload-pack"),
                         GitRequest("discovery", "git-upload-pack", FETCH))
        self.assertEqual(classify(b"GET", b"/team/app.git/info/refs?service=git-receive-pack"),
                         GitRequest("discovery", "git-receive-pack", PUSH))
        self.assertEqual(classify(b"GET", b"/app/info/refs?x=1&service=git-receive-pack"),
                         GitRequest("discovery", "git-receive-pack", PUSH))

    def test_unknown_service_has_no_operation(self) -> None:
        self.assertEqual(classify(b"GET", b"/a.git/info/refs?service=git-evil"),
                         GitRequest("discovery", "git-evil", None))

    def test_rpc(self) -> None:
        self.assertEqual(classify(b"POST", b"/team/app.git/git-upload-pack"),
                         GitRequest("rpc", "git-upload-pack", FETCH))
        self.assertEqual(classify(b"POST", b"/team/app.git/git-receive-pack"),
                         GitRequest("rpc", "git-receive-pack", PUSH))
        self.assertEqual(classify(b"POST", b"/a.git/git-upload-archive"),
                         GitRequest("rpc", "git-upload-archive", FETCH))

    def test_dumb(self) -> None:
        for path in (b"/a.git/info/refs", b"/a.git/HEAD", b"/a.git/objects/info/packs",
                     b"/a.git/objects/ab/cdef0123"):
            self.assertEqual(classify(b"GET", path), GitRequest("dumb", operation=FETCH), path)
        self.assertEqual(classify(b"HEAD", b"/a.git/HEAD").kind, "dumb")

    def test_lfs(self) -> None:
        batch = classify(b"POST", b"/team/app.git/info/lfs/objects/batch")
        self.assertEqual(batch, GitRequest("lfs-batch"))
        self.assertTrue(batch.is_lfs)
        for method, path in ((b"PUT", b"/a.git/info/lfs/objects/abc"), (b"GET", b"/a.git/info/lfs/objects/abc"),
                             (b"POST", b"/a.git/info/lfs/locks/verify"), (b"GET", b"/a.git/info/lfs/objects/batch")):
            self.assertEqual(classify(method, path), GitRequest("lfs"), path)

    def test_other(self) -> None:
        self.assertEqual(classify(b"DELETE", b"/a.git/x"), GitRequest("other"))
        self.assertEqual(classify(b"POST", b"/a.git/info/refs-not"), GitRequest("other"))
        self.assertFalse(GitRequest("rpc").is_lfs)


def batch_answer() -> dict[str, Any]:
    secret_header = {"Authorization": "RemoteAuth upstream-secret", "X-Custom": "kept"}
    return {
        "transfer": "basic",
        "objects": [
            {"oid": "a" * 64, "size": 3, "actions": {
                "upload": {"href": UPSTREAM + "/team/app.git/info/lfs/objects/" + "a" * 64,
                           "header": dict(secret_header), "expires_in": 3600},
                "verify": {"href": UPSTREAM + "/team/app.git/info/lfs/verify",
                           "header": {"Authorization": "RemoteAuth upstream-secret"}},
            }},
            {"oid": "b" * 64, "size": 4, "actions": {
                "download": {"href": "https://storage.example.net/bucket/b?X-Amz-Signature=sig",
                             "header": {"x-amz-meta": "m"}},
            }},
            {"oid": "c" * 64, "size": 5, "error": {"code": 404, "message": "not found"}},
            {"oid": "d" * 64, "size": 6, "actions": {
                "download": {"href": UPSTREAM + "/lfs/d", "header": {
                    "Private-Token": "glpat-x", "X-Auth-Token": "y", "Cookie": "s=1", "Accept": "a"}},
            }},
        ],
    }


class RewriteLFSBatchTests(SynchronousTestCase):
    def test_upstream_hrefs_point_at_the_proxy(self) -> None:
        doc = rewrite_lfs_batch(batch_answer(), to_client)
        upload = doc["objects"][0]["actions"]["upload"]
        self.assertEqual(upload["href"], CLIENT_BASE + PREFIX + "/team/app.git/info/lfs/objects/" + "a" * 64)
        self.assertEqual(doc["objects"][0]["actions"]["verify"]["href"],
                         CLIENT_BASE + PREFIX + "/team/app.git/info/lfs/verify")
        self.assertEqual(upload["expires_in"], 3600)

    def test_upstream_credentials_are_removed(self) -> None:
        doc = rewrite_lfs_batch(batch_answer(), to_client)
        self.assertEqual(doc["objects"][0]["actions"]["upload"]["header"], {"X-Custom": "kept"})
        self.assertNotIn("header", doc["objects"][0]["actions"]["verify"])
        self.assertEqual(doc["objects"][3]["actions"]["download"]["header"], {"Accept": "a"})
        self.assertNotIn("upstream-secret", json.dumps(doc))

    def test_other_origins_and_errors_are_untouched(self) -> None:
        original = batch_answer()
        doc = rewrite_lfs_batch(copy.deepcopy(original), to_client)
        self.assertEqual(doc["objects"][1], original["objects"][1])
        self.assertEqual(doc["objects"][2], original["objects"][2])

    def test_href_above_the_prefix_loses_credentials(self) -> None:
        """
        An href on the Git server's host outside the address's prefix cannot
        be mapped back, but the credentials the server put there are still
        the Connector's: they are removed.
        """
        href = "https://git.example.com/other/app.git/info/lfs/objects/x"
        doc: dict[str, Any] = {"objects": [{"actions": {"download": {
            "href": href, "header": {"Authorization": "a", "Accept": "b"}}}}]}
        rewrite_lfs_batch(doc, to_client, UPSTREAM)
        self.assertEqual(doc["objects"][0]["actions"]["download"], {"href": href, "header": {"Accept": "b"}})

    def test_unexpected_shapes(self) -> None:
        shapes: list[Any] = [[], "x", {"objects": "no"}, {"objects": [1, {"actions": []}, {"actions": {"a": 1}},
                                                             {"actions": {"a": {"href": 3}}}]}]
        for doc in shapes:
            self.assertEqual(rewrite_lfs_batch(copy.deepcopy(doc), to_client), doc)


class DecodeBodyTests(SynchronousTestCase):
    def test_identity(self) -> None:
        self.assertEqual(decode_body(b"{}", None, 10), b"{}")
        self.assertEqual(decode_body(b"{}", b"identity", 10), b"{}")

    def test_gzip_and_deflate(self) -> None:
        self.assertEqual(decode_body(gzip.compress(b'{"a":1}'), b"gzip", 100), b'{"a":1}')
        self.assertEqual(decode_body(zlib.compress(b'{"a":1}'), b"deflate", 100), b'{"a":1}')

    def test_limits_and_garbage(self) -> None:
        self.assertRaises(ValueError, decode_body, gzip.compress(b"x" * 1000), b"gzip", 100)
        self.assertRaises(ValueError, decode_body, b"not gzip", b"gzip", 100)
        self.assertRaises(ValueError, decode_body, b"x", b"br", 100)


class ErrorResponseTests(SynchronousTestCase):
    def test_git_errors_are_text(self) -> None:
        headers, body = error_response(forbidden("system:serviceaccount:x:y may not use Connector dev/repo"), lfs=False)
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/plain; charset=utf-8"])
        self.assertEqual(body, b"connectors-proxy: system:serviceaccount:x:y may not use Connector dev/repo\n")

    def test_lfs_errors_are_lfs_json(self) -> None:
        headers, body = error_response(ProxyError(502, "UPSTREAM_ERROR", "Connector dev/repo: down"), lfs=True)
        self.assertEqual(headers.getRawHeaders(b"content-type"), [LFS_MEDIA_TYPE])
        self.assertEqual(json.loads(body), {"message": "connectors-proxy: Connector dev/repo: down"})
        self.assertIsNone(headers.getRawHeaders(b"www-authenticate"))

    def test_lfs_401_challenges(self) -> None:
        headers, _ = error_response(unauthorized("no token"), lfs=True)
        self.assertEqual(headers.getRawHeaders(b"lfs-authenticate"), [b'Basic realm="connectors-proxy"'])
