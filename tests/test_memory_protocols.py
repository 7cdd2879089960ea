"""
The three protocols in memory (SPEC section 6), each against a stand-in
server: REST (any method, bodies both ways), git smart HTTP and LFS, and
OCI with a token realm.  Each test ends with a scan: the Connector's
password, and any token the realm issued, reached no client and no log.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import secrets
from urllib.parse import parse_qs

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Request

from .support.memory import Response, Scripted, basic_auth, bearer, memory_proxy, request_bytes
from .support.proxy import basic_secret, connector, connector_class, sa

GIT = b"/namespaces/default/connectors/repo"
OCI = b"/v2/namespaces/default/connectors/registry"
OID = "a" * 64
LFS_JSON = b"application/vnd.git-lfs+json"


class ProtocolTestCase(SynchronousTestCase):
    """A proxy with a REST, a git and an OCI Connector sharing one Secret."""

    def setUp(self) -> None:
        self.token = "tok-" + secrets.token_hex(12)
        self.canary = secrets.token_hex(16)
        self.issued: list[str] = []
        self.proxy = memory_proxy(self, [
            connector_class("http"),
            connector_class("git", protocol="git"),
            connector_class("oci", protocol="oci"),
            basic_secret("default", "creds", "robot", self.canary),
            connector("default", "api", "http", "http://api.test", secret="creds"),
            connector("default", "repo", "git", "http://git.test/scm", secret="creds"),
            connector("default", "registry", "oci", "http://registry.test", secret="creds"),
        ], {self.token: sa("default")})

    def send(self, method: bytes, target: bytes, *headers: tuple[bytes, bytes], body: bytes | None = None,
             host: bytes = b"proxy.local:8080") -> Response:
        return self.proxy.request(request_bytes(method, target, [basic_auth("x", self.token), *headers], body, host),
                                  head=method == b"HEAD")

    def tearDown(self) -> None:
        received, logs = self.proxy.received(), self.proxy.logs.text().encode()
        for secret in [self.canary, base64.b64encode(f"robot:{self.canary}".encode()).decode(), *self.issued]:
            self.assertNotIn(secret.encode(), received)
            self.assertNotIn(secret.encode(), logs)
        for upstream in self.proxy.upstreams.values():
            for request in upstream.requests:
                self.assertNotIn(self.token.encode(), b"".join(
                    v for _, values in request.requestHeaders.getAllRawHeaders() for v in values))


def echo(request: Request) -> bytes:
    """The request's method and body (or C{(empty)}), back."""
    request.setHeader(b"X-Method", request.method)
    request.setHeader(b"Content-Type", b"application/octet-stream")
    assert request.content is not None
    return request.content.read() or b"(empty)"


class RestTests(ProtocolTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.api = self.proxy.upstream("http://api.test", Scripted(echo))

    def test_any_method(self) -> None:
        """Every method, standard or not, reaches the upstream as sent."""
        for method in (b"GET", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS", b"PROPFIND"):
            response = self.send(method, b"/namespaces/default/connectors/api/thing", body=b"body of " + method)
            self.assertEqual((response.code, response.header(b"x-method"), response.body),
                             (200, [method], b"body of " + method))
        self.assertEqual([r.method for r in self.api.requests],
                         [b"GET", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS", b"PROPFIND"])

    def test_head_keeps_the_length(self) -> None:
        """A C{HEAD} answer keeps the length of the body a C{GET} would get, and has none."""
        client = self.proxy.connect()
        client.send(request_bytes(b"HEAD", b"/thing", [bearer(self.token)], host=b"c-api.default"))
        self.assertEqual(bytes(client.received).split(b"\r\n\r\n", 1)[1], b"")
        response = client.response(head=True)
        self.assertEqual((response.code, response.header(b"content-length")), (200, [b"7"]))

    def test_body_both_ways(self) -> None:
        """A body larger than one read goes up and comes back byte for byte."""
        data = os.urandom(300 * 1024 + 7)
        response = self.send(b"POST", b"/namespaces/default/connectors/api/echo", body=data)
        self.assertEqual(response.header(b"content-length"), [b"%d" % len(data)])
        self.assertEqual(hashlib.sha256(response.body).digest(), hashlib.sha256(data).digest())
        self.assertEqual(self.api.body(), data)
        self.assertEqual(self.api.headers()[b"authorization"],
                         [b"Basic " + base64.b64encode(f"robot:{self.canary}".encode())])


class GitServer(Scripted):
    """Smart HTTP and LFS, as a Git server under C{/scm} answers them."""

    advertisement = b"001e# service=git-upload-pack\n0000" + b"003f" + b"1" * 40 + b" HEAD\x00side-band-64k\n0000"
    pack = b"0008NAK\n" + b"PACK\x00\x00\x00\x02" + bytes(range(256))

    def __init__(self) -> None:
        super().__init__(self.answer_for)

    def answer_for(self, request: Request) -> bytes:
        path = request.path
        if path == b"/scm/private.git/info/refs":
            request.setResponseCode(401)
            request.setHeader(b"WWW-Authenticate", b'Basic realm="git"')
            return b"login first"
        if path == b"/scm/app.git/info/refs":
            request.setHeader(b"Content-Type", b"application/x-git-upload-pack-advertisement")
            return self.advertisement
        if path == b"/scm/app.git/git-upload-pack":
            request.setHeader(b"Content-Type", b"application/x-git-upload-pack-result")
            return self.pack
        if path == b"/scm/app.git/info/lfs/objects/batch":
            request.setHeader(b"Content-Type", LFS_JSON)
            return json.dumps({"transfer": "basic", "objects": [{"oid": OID, "size": 3, "actions": {
                "download": {"href": f"http://git.test/scm/app.git/info/lfs/objects/{OID}",
                             "header": {"Authorization": "RemoteAuth server-secret", "X-Keep": "1"}},
                "verify": {"href": f"https://storage.test/bucket/{OID}?sig=1",
                           "header": {"X-Storage": "signed"}},
            }}]}).encode()
        request.setResponseCode(404)
        return b"no such path"


class GitTests(ProtocolTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.git = self.proxy.upstream("http://git.test", GitServer())

    def test_discovery(self) -> None:
        """C{info/refs}: the advertisement untouched, C{Git-Protocol} passed on."""
        response = self.send(b"GET", GIT + b"/app.git/info/refs?service=git-upload-pack",
                             (b"Git-Protocol", b"version=2"))
        self.assertEqual((response.code, response.body), (200, GitServer.advertisement))
        self.assertEqual(response.header(b"content-type"), [b"application/x-git-upload-pack-advertisement"])
        self.assertEqual(self.git.requests[0].uri, b"/scm/app.git/info/refs?service=git-upload-pack")
        self.assertEqual(self.git.headers()[b"git-protocol"], [b"version=2"])

    def test_upload_pack_gzip_body_untouched(self) -> None:
        """A gzip request body goes to the server as sent, encoding header included; the pack comes back intact."""
        body = gzip.compress(b"0032want " + b"1" * 40 + b"\n00000009done\n")
        response = self.send(b"POST", GIT + b"/app.git/git-upload-pack",
                             (b"Content-Type", b"application/x-git-upload-pack-request"),
                             (b"Content-Encoding", b"gzip"), body=body)
        self.assertEqual((response.code, response.body), (200, GitServer.pack))
        self.assertEqual(self.git.body(), body)
        self.assertEqual(self.git.headers()[b"content-encoding"], [b"gzip"])

    def test_refused_credentials_as_text(self) -> None:
        """
        The server refusing the Connector's credentials is a 502 in
        C{text/plain} naming the Secret; its challenge is not passed on.
        """
        response = self.send(b"GET", GIT + b"/private.git/info/refs?service=git-upload-pack")
        self.assertEqual(response.code, 502)
        self.assertEqual(response.header(b"content-type"), [b"text/plain; charset=utf-8"])
        self.assertEqual(response.header(b"www-authenticate"), [])
        self.assertEqual(response.body, (
            b"connectors-proxy: the Git server of Connector default/repo (http://git.test/scm) refused the "
            b"credentials in Secret default/creds (wrong, expired, or without access to this repository): "
            b"update that Secret so the server accepts it\n"))

    def test_lfs_batch_rewritten(self) -> None:
        """
        Actions on the Git server point back at the proxy, without the
        server's credentials; actions elsewhere are left as they came.
        """
        response = self.send(b"POST", GIT + b"/app.git/info/lfs/objects/batch", (b"Content-Type", LFS_JSON),
                             (b"Accept-Encoding", b"gzip"),
                             body=json.dumps({"operation": "download", "objects": [{"oid": OID, "size": 3}]}).encode())
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(response.body)["objects"][0]["actions"], {
            "download": {"href": f"http://proxy.local:8080/namespaces/default/connectors/repo/app.git/info/lfs/objects/{OID}",
                         "header": {"X-Keep": "1"}},
            "verify": {"href": f"https://storage.test/bucket/{OID}?sig=1", "header": {"X-Storage": "signed"}},
        })
        self.assertNotIn(b"server-secret", response.body)
        self.assertEqual(self.git.headers()[b"accept-encoding"], [b"identity"])


class Registry(Scripted):
    """A registry that wants a Bearer token from C{http://auth.test/token}."""

    def __init__(self, issued: list[str]) -> None:
        super().__init__(self.answer_for)
        self.issued = issued

    def answer_for(self, request: Request) -> bytes:
        request.setHeader(b"Docker-Distribution-API-Version", b"registry/2.0")
        request.setHeader(b"Content-Type", b"application/json")
        authorization = request.getHeader(b"authorization") or b""
        if authorization.removeprefix(b"Bearer ").decode() not in self.issued:
            request.setResponseCode(401)
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="http://auth.test/token",service="registry.test"')
            return b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}'
        path = request.path
        if path == b"/v2/team/app/manifests/v1":
            request.setHeader(b"Content-Type", b"application/vnd.oci.image.manifest.v1+json")
            request.setHeader(b"Docker-Content-Digest", b"sha256:" + b"b" * 64)
            return b'{"schemaVersion":2}'
        if path == b"/v2/team/app/blobs/uploads/":
            request.setResponseCode(202)
            location = b"/v2/team/app/blobs/uploads/uuid-1?_state=s1"
            if request.getHeader(b"x-absolute"):
                location = b"http://registry.test" + location
            request.setHeader(b"Location", location)
            request.setHeader(b"Docker-Upload-UUID", b"uuid-1")
            return b""
        if path == b"/v2/team/app/tags/list":
            request.setHeader(b"Link", b'</v2/team/app/tags/list?last=b&n=2>; rel="next"')
            return b'{"name":"team/app","tags":["a","b"]}'
        request.setResponseCode(404)
        return json.dumps({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown",
                                       "detail": {"name": "team/app", "tag": "missing"}}]}).encode()


class OciTests(ProtocolTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.refuse = False
        self.registry = self.proxy.upstream("http://registry.test", Registry(self.issued))
        self.realm = self.proxy.upstream("http://auth.test", Scripted(self.token_answer))

    def token_answer(self, request: Request) -> bytes:
        expected = b"Basic " + base64.b64encode(f"robot:{self.canary}".encode())
        if self.refuse or request.getHeader(b"authorization") != expected:
            request.setResponseCode(401)
            return b'{"details":"bad credentials"}'
        value = "issued-" + secrets.token_hex(16)
        self.issued.append(value)
        return json.dumps({"token": value, "expires_in": 300}).encode()

    def realm_queries(self) -> list[dict[bytes, list[bytes]]]:
        return [parse_qs(r.uri.split(b"?", 1)[1]) for r in self.realm.requests]

    def test_pull_with_a_token_from_the_realm(self) -> None:
        """
        The proxy answers the registry's challenge at the realm with the
        Connector's credentials and sends the token; the client sees
        neither challenge nor token.
        """
        response = self.send(b"GET", OCI + b"/team/app/manifests/v1")
        self.assertEqual((response.code, response.body), (200, b'{"schemaVersion":2}'))
        self.assertEqual(response.header(b"docker-content-digest"), [b"sha256:" + b"b" * 64])
        self.assertEqual(self.realm_queries(), [{b"service": [b"registry.test"],
                                                 b"scope": [b"repository:team/app:pull"]}])
        [token] = self.issued
        self.assertEqual([(r.method, r.uri, r.getHeader(b"authorization")) for r in self.registry.requests], [
            (b"GET", b"/v2/", None),
            (b"GET", b"/v2/team/app/manifests/v1", b"Bearer " + token.encode()),
        ])
        self.assertNotIn(b"auth.test", self.proxy.received())
        self.assertEqual(response.header(b"www-authenticate"), [])

    def test_token_cached_until_it_expires(self) -> None:
        """One realm request per scope while the token lives; a new one after."""
        for _ in range(3):
            self.assertEqual(self.send(b"GET", b"/v2/team/app/manifests/v1", host=b"c-registry.default.svc").code, 200)
        self.assertEqual(len(self.realm.requests), 1)
        # 300 seconds, less the margin of min(10 %, 10 s).
        self.proxy.clock.advance(290)
        self.assertEqual(self.send(b"GET", OCI + b"/team/app/manifests/v1").code, 200)
        self.assertEqual(len(self.realm.requests), 2)

    def test_upload_location_mapped(self) -> None:
        """An upload's C{Location} names the proxy, relative or absolute as the registry wrote it."""
        response = self.send(b"POST", OCI + b"/team/app/blobs/uploads/", body=b"")
        self.assertEqual((response.code, response.header(b"location")), (
            202, [b"/v2/namespaces/default/connectors/registry/team/app/blobs/uploads/uuid-1?_state=s1"]))
        self.assertEqual(self.realm_queries()[0][b"scope"], [b"repository:team/app:pull,push"])
        response = self.send(b"POST", b"/v2/team/app/blobs/uploads/", (b"X-Absolute", b"1"), body=b"",
                             host=b"c-registry.default.svc")
        self.assertEqual(response.header(b"location"),
                         [b"http://c-registry.default.svc/v2/team/app/blobs/uploads/uuid-1?_state=s1"])

    def test_tags_link_and_names(self) -> None:
        """In path mode the tag list's name and its C{Link} pagination carry the client's names."""
        response = self.send(b"GET", OCI + b"/team/app/tags/list?n=2")
        self.assertEqual(json.loads(response.body), {"name": "namespaces/default/connectors/registry/team/app",
                                                     "tags": ["a", "b"]})
        self.assertEqual(response.header(b"link"), [
            b'</v2/namespaces/default/connectors/registry/team/app/tags/list?last=b&n=2>; rel="next"'])

    def test_registry_error_as_oci_json(self) -> None:
        """A registry 404 comes through as the OCI error body, its names in the client's form."""
        response = self.send(b"GET", OCI + b"/team/app/manifests/missing")
        self.assertEqual(response.code, 404)
        self.assertEqual(response.header(b"content-type"), [b"application/json"])
        self.assertEqual(json.loads(response.body), {"errors": [{
            "code": "MANIFEST_UNKNOWN", "message": "manifest unknown",
            "detail": {"name": "namespaces/default/connectors/registry/team/app", "tag": "missing"}}]})

    def test_realm_refuses_the_credentials(self) -> None:
        """A realm that refuses the Connector's credentials: 403 DENIED naming the Secret, not 401."""
        self.refuse = True
        response = self.send(b"GET", OCI + b"/team/app/manifests/v1")
        self.assertEqual(response.code, 403)
        self.assertEqual(json.loads(response.body), {"errors": [{"code": "DENIED", "message": (
            "the registry of Connector default/registry (http://registry.test) refused the credentials in "
            "Secret default/creds for repository:team/app:pull")}]})
        self.assertEqual(response.header(b"www-authenticate"), [])
