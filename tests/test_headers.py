from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from connectors_proxy.server.headers import client_response_headers, rewrite_location, upstream_request_headers


class UpstreamRequestHeaders(SynchronousTestCase):
    def test_drops_hop_by_hop_and_client_credentials(self) -> None:
        client = Headers({
            b"Authorization": [b"Bearer client-token"], b"Proxy-Authorization": [b"Basic x"],
            b"Connection": [b"keep-alive, X-Custom-Hop"], b"X-Custom-Hop": [b"1"], b"Keep-Alive": [b"300"],
            b"Transfer-Encoding": [b"chunked"], b"Content-Length": [b"5"], b"Host": [b"proxy"],
            b"TE": [b"trailers"], b"Upgrade": [b"h2c"], b"Expect": [b"100-continue"],
            b"Accept": [b"a", b"b"], b"Git-Protocol": [b"version=2"],
        })
        out = upstream_request_headers(client, "10.0.0.1", b"proxy:8080", b"http")
        names = {name.lower() for name, _ in out.getAllRawHeaders()}
        for gone in (b"authorization", b"proxy-authorization", b"connection", b"x-custom-hop", b"keep-alive",
                     b"transfer-encoding", b"content-length", b"host", b"te", b"upgrade", b"expect"):
            self.assertNotIn(gone, names)
        self.assertEqual(out.getRawHeaders(b"accept"), [b"a", b"b"])
        self.assertEqual(out.getRawHeaders(b"git-protocol"), [b"version=2"])
        self.assertEqual(out.getRawHeaders(b"x-forwarded-for"), [b"10.0.0.1"])
        self.assertEqual(out.getRawHeaders(b"x-forwarded-proto"), [b"http"])
        self.assertEqual(out.getRawHeaders(b"x-forwarded-host"), [b"proxy:8080"])

    def test_forwarded_for_extended(self) -> None:
        out = upstream_request_headers(Headers({b"X-Forwarded-For": [b"1.1.1.1", b"2.2.2.2"]}), "3.3.3.3", None, b"https")
        self.assertEqual(out.getRawHeaders(b"x-forwarded-for"), [b"1.1.1.1, 2.2.2.2, 3.3.3.3"])
        self.assertIsNone(out.getRawHeaders(b"x-forwarded-host"))


class ClientResponseHeaders(SynchronousTestCase):
    def test_keeps_repeats_drops_framing(self) -> None:
        upstream = Headers({b"Set-Cookie": [b"a=1", b"b=2"], b"Link": [b"<a>", b"<b>"], b"Transfer-Encoding": [b"chunked"],
                            b"Content-Length": [b"3"], b"Connection": [b"close"], b"Server": [b"nginx"],
                            b"Proxy-Authenticate": [b"Basic"], b"ETag": [b'"x"']})
        out = client_response_headers(upstream)
        self.assertEqual(out.getRawHeaders(b"link"), [b"<a>", b"<b>"])
        # An upstream session opened with the Connector's credentials is theirs, not the client's.
        self.assertIsNone(out.getRawHeaders(b"set-cookie"))
        self.assertEqual(out.getRawHeaders(b"etag"), [b'"x"'])
        for gone in (b"transfer-encoding", b"content-length", b"connection", b"server", b"proxy-authenticate"):
            self.assertIsNone(out.getRawHeaders(gone))


class RewriteLocation(SynchronousTestCase):
    up = b"https://git.example.com/gitlab"
    client = b"http://proxy:8080"
    prefix = b"/namespaces/ns/connectors/gl"

    def test_absolute_under_prefix(self) -> None:
        self.assertEqual(rewrite_location(b"https://git.example.com/gitlab/a/b?c=1", self.up, self.client, self.prefix),
                         b"http://proxy:8080/namespaces/ns/connectors/gl/a/b?c=1")
        self.assertEqual(rewrite_location(b"HTTPS://GIT.example.com/gitlab", self.up, self.client, self.prefix),
                         b"http://proxy:8080/namespaces/ns/connectors/gl")

    def test_relative(self) -> None:
        self.assertEqual(rewrite_location(b"/gitlab/x", self.up, self.client, self.prefix),
                         b"/namespaces/ns/connectors/gl/x")

    def test_host_mode(self) -> None:
        self.assertEqual(rewrite_location(b"https://git.example.com/gitlab/x", self.up, b"http://c-gl.ns.svc", b""),
                         b"http://c-gl.ns.svc/x")
        self.assertEqual(rewrite_location(b"/gitlab", self.up, b"http://c-gl.ns.svc", b""), b"/")

    def test_elsewhere_unchanged(self) -> None:
        for loc in (b"https://other.example.com/gitlab/x", b"https://git.example.com/other", b"/other",
                    b"relative/path", b"https://git.example.com/gitlabx"):
            self.assertEqual(rewrite_location(loc, self.up, self.client, self.prefix), loc)

    def test_no_prefix_address(self) -> None:
        self.assertEqual(rewrite_location(b"http://reg:5000/v2/x", b"http://reg:5000", self.client, b""),
                         b"http://proxy:8080/v2/x")
        self.assertEqual(rewrite_location(b"//reg:5000/v2/x", b"http://reg:5000", self.client, b""),
                         b"http://proxy:8080/v2/x")
