"""
The root resource in memory (SPEC sections 4 and 5): the order of the
checks, host, path and forward-proxy routing, the OCI ping, error bodies per
protocol, and what crosses the proxy in each direction.  Every test ends
with a canary scan: the Connector's password (random per test) is in no
byte a client received and in no log event, and no client token reached an
upstream.
"""

from __future__ import annotations

import base64
import json
import secrets

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Request

from .support.memory import (
    Response,
    Scripted,
    basic_auth,
    bearer,
    memory_proxy,
    request_bytes,
)
from .support.proxy import basic_secret, connector, connector_class, sa

REALM = b'Basic realm="connectors-proxy"'
TEXT = b"text/plain; charset=utf-8"
LFS_JSON = b"application/vnd.git-lfs+json"


def text_error(message: str) -> bytes:
    """The body of one of the proxy's own errors, for REST and git clients."""
    return f"connectors-proxy: {message}\n".encode()


class RouterTestCase(SynchronousTestCase):
    """A proxy with a Connector of each protocol, a canary password, and the scan."""

    def setUp(self) -> None:
        self.token = "tok-" + secrets.token_hex(12)
        self.other_token = "tok-" + secrets.token_hex(12)
        self.canary = secrets.token_hex(16)
        self.proxy = memory_proxy(self, [
            connector_class("http"),
            connector_class("anon", optional=True),
            connector_class("git", protocol="git"),
            connector_class("oci", protocol="oci"),
            basic_secret("default", "creds", "robot", self.canary),
            connector("default", "api", "http", "http://api.test/base", secret="creds"),
            connector("default", "open", "anon", "http://open.test"),
            connector("default", "repo", "git", "http://git.test/scm", secret="creds"),
            connector("default", "down", "git", "http://down.test/scm", secret="creds"),
            connector("default", "registry", "oci", "http://registry.test", secret="creds"),
            connector("default", "nosecret", "http", "http://api.test/base", secret="missing"),
            connector("default", "noclass", "ghost", "http://api.test/base"),
        ], {self.token: sa("default"), self.other_token: sa("other")})
        self.api = self.proxy.upstream("http://api.test", Scripted())
        self.open = self.proxy.upstream("http://open.test", Scripted())
        self.git = self.proxy.upstream("http://git.test", Scripted())
        self.registry = self.proxy.upstream("http://registry.test", Scripted())

    def get(self, target: bytes, *headers: tuple[bytes, bytes], host: bytes | None = b"proxy.local:8080",
            method: bytes = b"GET") -> Response:
        return self.proxy.request(request_bytes(method, target, headers, host=host))

    def upstream_requests(self) -> list[Request]:
        return [r for upstream in self.proxy.upstreams.values() for r in upstream.requests]

    def assertNoCanary(self) -> None:
        """The Connector's password in no byte a client got nor in the log; no client token upstream."""
        secret_forms = [self.canary.encode(), base64.b64encode(f"robot:{self.canary}".encode())]
        received = self.proxy.received()
        logs = self.proxy.logs.text().encode()
        for form in secret_forms:
            self.assertNotIn(form, received)
            self.assertNotIn(form, logs)
        for request in self.upstream_requests():
            for _, values in request.requestHeaders.getAllRawHeaders():
                for value in values:
                    for token in (self.token, self.other_token):
                        self.assertNotIn(token.encode(), value)
                        self.assertNotIn(base64.b64encode(f"x:{token}".encode()), value)

    def tearDown(self) -> None:
        self.assertNoCanary()


class CheckOrderTests(RouterTestCase):
    """400, 401, 401, 403, 404, 503: in that order, and before any upstream is contacted."""

    def assertTextError(self, response: Response, code: int, message: str) -> None:
        self.assertEqual(response.code, code)
        self.assertEqual(response.header(b"content-type"), [TEXT])
        self.assertEqual(response.body, text_error(message))

    def test_bad_target(self) -> None:
        """
        A path that climbs out of the Connector is a 400 naming the problem,
        before the token is even looked at.
        """
        for headers in ((), (bearer(self.token),)):
            response = self.get(b"/namespaces/default/connectors/api/%2e%2e/open/x", *headers)
            self.assertTextError(response, 400, "path contains a '.' or '..' segment (also when percent-encoded)")
        self.assertEqual(self.get(b"*", bearer(self.token)).code, 400)
        self.assertEqual(self.upstream_requests(), [])

    def test_no_token(self) -> None:
        """No token: 401 with the proxy's Basic challenge, whatever the Connector."""
        for target in (b"/namespaces/default/connectors/api/x", b"/namespaces/default/connectors/missing/x",
                       b"/namespaces/other/connectors/api/x"):
            response = self.get(target)
            self.assertTextError(response, 401, (
                "no token: send your ServiceAccount token as 'Authorization: Bearer TOKEN' "
                "or as the password of Basic authentication"))
            self.assertEqual(response.header(b"www-authenticate"), [REALM])
        self.assertEqual(self.upstream_requests(), [])

    def test_bad_token(self) -> None:
        """A token that is not in the token file: 401, also as the Basic password, also with a challenge."""
        wrong = "wrong-" + secrets.token_hex(8)
        for header in (bearer(wrong), basic_auth("anyone", wrong)):
            response = self.get(b"/namespaces/default/connectors/missing/x", header)
            self.assertTextError(response, 401, "the token was not accepted (unknown, expired or revoked)")
            self.assertEqual(response.header(b"www-authenticate"), [REALM])
        self.assertEqual(self.upstream_requests(), [])

    def test_forbidden_before_not_found(self) -> None:
        """
        Another namespace's identity gets 403 both for a Connector that
        exists and one that does not: existence is not revealed to it.
        """
        for name in ("api", "missing"):
            response = self.get(f"/namespaces/default/connectors/{name}/x".encode(), bearer(self.other_token))
            self.assertTextError(response, 403, f"{sa('other')} may not use Connector default/{name}")
        self.assertEqual(self.upstream_requests(), [])

    def test_not_found(self) -> None:
        """An allowed identity asking for a Connector that does not exist, or for no Connector: 404."""
        self.assertTextError(self.get(b"/namespaces/default/connectors/missing/x", bearer(self.token)),
                             404, "Connector default/missing not found")
        self.assertTextError(self.get(b"/nothing", bearer(self.token)), 404, (
            "the request names no Connector: use host c-NAME.NAMESPACE.svc or path "
            "/namespaces/NAMESPACE/connectors/NAME/..."))
        self.assertEqual(self.upstream_requests(), [])

    def test_class_or_secret_missing(self) -> None:
        """A Connector whose class or Secret is missing: 503 naming what is missing."""
        self.assertTextError(self.get(b"/namespaces/default/connectors/noclass/x", bearer(self.token)), 503,
                             "ConnectorClass 'ghost' of Connector default/noclass not found")
        self.assertTextError(self.get(b"/namespaces/default/connectors/nosecret/x", bearer(self.token)), 503,
                             "Secret default/missing of Connector default/nosecret was not found")
        self.assertEqual(self.upstream_requests(), [])

    def test_refused_before_the_body_is_read(self) -> None:
        """
        A refused upload is answered at the end of its headers: no
        C{100 Continue}, C{Connection: close}, then a clean close (the
        client reads the answer rather than a reset), and the access log
        counts no body byte.
        """
        client = self.proxy.connect()
        client.send(request_bytes(b"PUT", b"/namespaces/default/connectors/api/big", [
            bearer("wrong"), (b"Expect", b"100-continue"), (b"Content-Length", b"100000000")]))
        response = client.response()
        self.assertEqual((response.code, response.interim), (401, ()))
        self.assertEqual(response.header(b"connection"), [b"close"])
        self.assertEqual((client.closed, client.reset), (True, False))
        [access] = self.proxy.logs.access()
        self.assertEqual((access["status"], access["bytes_in"]), (401, 0))
        self.assertEqual(self.upstream_requests(), [])


class RoutingTests(RouterTestCase):
    """Host, path and forward-proxy routing, and what reaches the upstream."""

    def test_host_forms(self) -> None:
        """
        Every host form reaches the Connector, the path kept verbatim after
        its address; C{X-Forwarded-Host} is the host the request was routed by.
        """
        hosts = [b"c-api.default.svc.cluster.local", b"c-api.default.svc", b"c-api.default",
                 b"C-API.default.svc:8080", b"c-api.default.svc.cluster.local."]
        for host in hosts:
            response = self.get(b"/a%2Fb/c?x=%2F&y", bearer(self.token), host=host)
            self.assertEqual((response.code, response.body), (200, b"ok /base/a%2Fb/c?x=%2F&y"), host)
        self.assertEqual([r.uri for r in self.api.requests], [b"/base/a%2Fb/c?x=%2F&y"] * len(hosts))
        self.assertEqual([self.api.headers(i).get(b"x-forwarded-host") for i in range(len(hosts))], [
            [b"c-api.default.svc.cluster.local"], [b"c-api.default.svc"], [b"c-api.default"],
            [b"C-API.default.svc:8080"], [b"c-api.default.svc.cluster.local"]])

    def test_path_form(self) -> None:
        """
        The path prefix is stripped once; the client's own C{Host} and
        C{X-Forwarded-Host} are not passed on, C{X-Forwarded-For/-Proto} are set.
        """
        response = self.get(b"/namespaces/default/connectors/api/namespaces/default/connectors/api?q=1",
                            bearer(self.token), (b"X-Forwarded-Host", b"evil.test"), (b"X-Forwarded-For", b"1.2.3.4"))
        self.assertEqual(response.body, b"ok /base/namespaces/default/connectors/api?q=1")
        headers = self.api.headers()
        self.assertEqual(headers[b"host"], [b"api.test"])
        self.assertNotIn(b"x-forwarded-host", headers)
        self.assertEqual(headers[b"x-forwarded-for"], [b"1.2.3.4, 10.0.0.7"])
        self.assertEqual(headers[b"x-forwarded-proto"], [b"http"])

    def test_credentials_swapped(self) -> None:
        """
        The client's C{Authorization} and C{Proxy-Authorization} never reach
        the upstream; the Connector's credentials do, and nothing for an
        anonymous Connector.
        """
        self.get(b"/namespaces/default/connectors/api/x", bearer(self.token),
                 basic_auth("default/api", self.token, b"Proxy-Authorization"))
        headers = self.api.headers()
        self.assertEqual(headers[b"authorization"],
                         [b"Basic " + base64.b64encode(f"robot:{self.canary}".encode())])
        self.assertNotIn(b"proxy-authorization", headers)
        self.get(b"/namespaces/default/connectors/open/x", basic_auth("someone", self.token))
        headers = self.open.headers()
        self.assertNotIn(b"authorization", headers)
        self.assertNotIn(b"proxy-authorization", headers)

    def test_forward_proxy_to_a_listed_address(self) -> None:
        """
        An absolute-form target under a listed Connector's address gets
        that Connector's credentials; the rest of the path follows its prefix.
        """
        response = self.get(b"http://api.test/base/x?y=1",
                            basic_auth("default/open,default/api", self.token, b"Proxy-Authorization"), host=b"api.test")
        self.assertEqual((response.code, response.body), (200, b"ok /base/x?y=1"))
        headers = self.api.headers()
        self.assertEqual(headers[b"authorization"], [b"Basic " + base64.b64encode(f"robot:{self.canary}".encode())])
        self.assertNotIn(b"proxy-authorization", headers)

    def test_forward_proxy_to_a_connector_host(self) -> None:
        """An absolute-form target naming a Connector host routes by that host."""
        response = self.get(b"http://c-api.default.svc.cluster.local/x",
                            basic_auth("default/api", self.token, b"Proxy-Authorization"), host=b"ignored.test")
        self.assertEqual((response.code, response.body), (200, b"ok /base/x"))

    def test_forward_proxy_elsewhere_refused(self) -> None:
        """
        With C{--forward-unlisted deny}, outside every listed Connector's
        address (another path, another origin): 403, nothing forwarded.
        (The default, C{allow}, relays them without credentials: see
        L{tests.test_upstream_compat}.)
        """
        self.proxy.root.forward_unlisted = "deny"
        for target in (b"http://api.test/other/x", b"http://api.test:8080/base/x", b"http://open.test/x"):
            response = self.get(target, basic_auth("default/api", self.token, b"Proxy-Authorization"))
            self.assertEqual(response.code, 403, target)
            origin = target.split(b"/")[2].decode()
            self.assertEqual(response.body, text_error(
                f"http://{origin} is not the address of a Connector you listed; this proxy only forwards to Connectors"))
        self.assertEqual(self.upstream_requests(), [])

    def test_forward_proxy_percent_encoded_user(self) -> None:
        """SPEC 4: the user part of C{Proxy-Authorization} may arrive percent-encoded (C{NS%2FNAME})."""
        response = self.get(b"http://api.test/base/x",
                            basic_auth("default%2Fapi", self.token, b"Proxy-Authorization"))
        self.assertEqual((response.code, response.body), (200, b"ok /base/x"))

    def test_forward_proxy_without_credentials_is_407(self) -> None:
        """SPEC 4: a forward-proxy request without C{Proxy-Authorization} gets a 407 challenge."""
        response = self.get(b"http://api.test/base/x")
        self.assertEqual(response.code, 407)
        self.assertEqual(response.header(b"proxy-authenticate"), [REALM])
        self.assertEqual(self.upstream_requests(), [])

    def test_target_user_info_not_logged(self) -> None:
        """
        A target carrying user info (a client's password for it) is refused,
        and its access line shows the target without that password.
        """
        password = secrets.token_hex(8)
        for target in (f"http://me:{password}@api.test/base/x".encode(), f"me:{password}@api.test:443".encode()):
            method = b"GET" if target.startswith(b"http") else b"CONNECT"
            response = self.get(target, basic_auth("default/api", self.token, b"Proxy-Authorization"),
                                method=method)
            self.assertEqual(response.code, 400, target)
        logs = self.proxy.logs.text()
        self.assertIn("REDACTED@api.test", logs)
        self.assertNotIn(password, logs)
        self.assertEqual(self.upstream_requests(), [])

    def test_host_and_path_naming_different_connectors(self) -> None:
        """SPEC 5: a host and a path that name different Connectors is a 400."""
        response = self.get(b"/namespaces/default/connectors/open/x", bearer(self.token), host=b"c-api.default.svc")
        self.assertEqual(response.code, 400)
        self.assertEqual(self.upstream_requests(), [])


class OciPingTests(RouterTestCase):
    """C{/v2/} is answered by the proxy: authentication only, no upstream."""

    def test_ping_path_mode(self) -> None:
        """On the proxy's own host the ping names no Connector: a valid token is all it takes."""
        for target in (b"/v2/", b"/v2"):
            response = self.get(target, basic_auth("docker", self.token))
            self.assertEqual((response.code, response.body), (200, b"{}"))
            self.assertEqual(response.header(b"docker-distribution-api-version"), [b"registry/2.0"])
            self.assertEqual(response.header(b"content-type"), [b"application/json"])
        self.assertEqual(self.upstream_requests(), [])

    def test_ping_host_mode(self) -> None:
        """On a Connector's host, after the usual checks, still without asking the registry."""
        response = self.get(b"/v2/", bearer(self.token), host=b"c-registry.default.svc")
        self.assertEqual((response.code, response.body), (200, b"{}"))
        self.assertEqual(self.upstream_requests(), [])

    def test_ping_challenge(self) -> None:
        """Without a token: the OCI error body and the Basic challenge registry clients answer."""
        response = self.get(b"/v2/")
        self.assertEqual(response.code, 401)
        self.assertEqual(response.header(b"www-authenticate"), [REALM])
        self.assertEqual(response.header(b"content-type"), [b"application/json"])
        self.assertEqual(json.loads(response.body), {"errors": [{"code": "UNAUTHORIZED", "message": (
            "no token: send your ServiceAccount token as 'Authorization: Bearer TOKEN' "
            "or as the password of Basic authentication")}]})


class ErrorBodyTests(RouterTestCase):
    """Each protocol's clients get errors in the form they print."""

    def test_rest_and_git_text(self) -> None:
        """REST and git clients get C{text/plain}."""
        for target in (b"/namespaces/default/connectors/api/x",
                       b"/namespaces/default/connectors/repo/app.git/info/refs?service=git-upload-pack"):
            response = self.get(target, bearer(self.other_token))
            self.assertEqual(response.header(b"content-type"), [TEXT])
            self.assertEqual(response.body, text_error(f"{sa('other')} may not use Connector default/"
                                                       + target.split(b"/")[4].decode()))

    def test_lfs_json(self) -> None:
        """An error on a Git LFS path, once routed, is LFS JSON naming the Connector."""
        response = self.get(b"/namespaces/default/connectors/down/app.git/info/lfs/objects/batch", bearer(self.token),
                            (b"Content-Type", LFS_JSON), method=b"POST")
        self.assertEqual(response.code, 502)
        self.assertEqual(response.header(b"content-type"), [LFS_JSON])
        self.assertEqual(json.loads(response.body), {"message": (
            "connectors-proxy: Connector default/down: cannot connect to http://down.test/scm (ConnectionRefusedError)")})

    def test_lfs_json_from_the_router(self) -> None:
        """The router's own refusals on a Git LFS path are LFS JSON too, so git-lfs prints them."""
        response = self.get(b"/namespaces/default/connectors/repo/app.git/info/lfs/objects/batch",
                            (b"Content-Type", LFS_JSON), method=b"POST")
        self.assertEqual(response.code, 401)
        self.assertEqual(response.header(b"content-type"), [LFS_JSON])
        self.assertEqual(response.header(b"lfs-authenticate"), [REALM])


    def test_oci_json(self) -> None:
        """Registry clients get C{{"errors": [...]}} for the router's refusals too."""
        response = self.get(b"/v2/namespaces/default/connectors/missing/team/app/manifests/latest",
                            bearer(self.token))
        self.assertEqual(response.code, 404)
        self.assertEqual(response.header(b"content-type"), [b"application/json"])
        self.assertEqual(json.loads(response.body),
                         {"errors": [{"code": "NAME_UNKNOWN", "message": "Connector default/missing not found"}]})
        response = self.get(b"/v2/team/app/manifests/latest", bearer(self.other_token),
                            host=b"c-registry.default.svc")
        self.assertEqual(json.loads(response.body), {"errors": [{"code": "DENIED", "message": (
            f"{sa('other')} may not use Connector default/registry")}]})


class CanaryTests(SynchronousTestCase):
    """
    SPEC 10: what the upstream sends back never carries the injected
    credentials to the client.
    """

    def test_echoed_credentials_masked(self) -> None:
        """
        An upstream that echoes the C{Authorization} it got, in a header and
        in a text body: the header is dropped, the body masked.
        """
        canary = secrets.token_hex(16)
        proxy = memory_proxy(self, [
            connector_class("http"), basic_secret("default", "creds", "robot", canary),
            connector("default", "api", "http", "http://api.test", secret="creds"),
        ], {"t": sa("default")})

        def echo(request: Request) -> bytes:
            value = request.getHeader(b"authorization") or b""
            request.setHeader(b"X-Echo", value)
            request.setHeader(b"Content-Type", b"text/plain")
            return b"you sent " + value + b" and " + canary.encode()

        proxy.upstream("http://api.test", Scripted(echo))
        response = proxy.request(request_bytes(b"GET", b"/namespaces/default/connectors/api/x", [bearer("t")]))
        self.assertEqual(response.code, 200)
        self.assertNotIn(b"x-echo", response.names)
        self.assertNotIn(canary.encode(), proxy.received())
        self.assertNotIn(base64.b64encode(f"robot:{canary}".encode()), proxy.received())

