from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from connectors_proxy.server.routing import BadTarget, Route, check_rest, host_connector, route, split_target


class HostConnector(SynchronousTestCase):
    def test_forms(self) -> None:
        for host in (b"c-harbor.default.svc.cluster.local", b"c-harbor.default.svc", b"c-harbor.default",
                     b"C-Harbor.Default.SVC.cluster.local.", b"c-harbor.default.svc.cluster.local:8443",
                     b"c-harbor.default:80"):
            self.assertEqual(host_connector(host, "cluster.local"), ("default", "harbor"), host)

    def test_other_cluster_domain(self) -> None:
        self.assertEqual(host_connector(b"c-a.ns.svc.corp.example", "corp.example"), ("ns", "a"))
        self.assertIsNone(host_connector(b"c-a.ns.svc.cluster.local", "corp.example"))

    def test_not_connectors(self) -> None:
        for host in (b"harbor.default.svc", b"c-.default", b"c-a.b.c.svc", b"127.0.0.1:8080", b"c-a",
                     b"[::1]:80", b"c-a_b.ns", b"c-a.ns.svc.cluster.local.evil.com", b""):
            self.assertIsNone(host_connector(host, "cluster.local"), host)


class SplitTarget(SynchronousTestCase):
    def test_origin_form(self) -> None:
        self.assertEqual(split_target(b"/a/b?c=d"), (None, b"/a/b?c=d"))

    def test_absolute_form(self) -> None:
        self.assertEqual(split_target(b"http://h:1/a?b"), (b"http://h:1", b"/a?b"))
        self.assertEqual(split_target(b"http://h"), (b"http://h", b"/"))
        self.assertEqual(split_target(b"HTTP://h?q"), (b"HTTP://h", b"/?q"))

    def test_refused(self) -> None:
        for target in (b"*", b"a/b", b"http://", b"http://user:pw@h/", b"ftp://h/"):
            self.assertRaises(BadTarget, split_target, target)


class Routes(SynchronousTestCase):
    def test_host_mode(self) -> None:
        self.assertEqual(route(b"/v2/x?y", b"c-h.ns.svc", "cluster.local"), Route("ns", "h", b"/v2/x?y"))

    def test_absolute_form_connector_host_wins_over_host_header(self) -> None:
        r = route(b"http://c-h.ns.svc/p", b"c-other.ns.svc", "cluster.local")
        self.assertEqual((r.namespace, r.name, r.rest), ("ns", "h", b"/p"))

    def test_forward_origin(self) -> None:
        r = route(b"https://api.example.com:8443/x", None, "cluster.local")
        self.assertEqual((r.namespace, r.origin, r.rest), (None, b"https://api.example.com:8443", b"/x"))

    def test_path_mode(self) -> None:
        r = route(b"/namespaces/ns/connectors/gitlab/group/repo.git/info/refs?service=git-upload-pack",
                  b"proxy:8080", "cluster.local")
        self.assertEqual(r, Route("ns", "gitlab", b"/group/repo.git/info/refs?service=git-upload-pack",
                                  client_prefix=b"/namespaces/ns/connectors/gitlab"))
        self.assertEqual(route(b"/namespaces/ns/connectors/x", None, "c").rest, b"")
        r = route(b"/namespaces/ns/connectors/x?a=1", None, "c")
        self.assertEqual((r.name, r.rest, r.client_prefix), ("x", b"?a=1", b"/namespaces/ns/connectors/x"))

    def test_oci_path_mode(self) -> None:
        r = route(b"/v2/namespaces/ns/connectors/harbor/test/abc/manifests/v1", b"proxy", "cluster.local")
        self.assertEqual((r.namespace, r.name, r.rest, r.oci_path), ("ns", "harbor", b"/v2/test/abc/manifests/v1", True))
        self.assertEqual(r.client_prefix, b"/v2/namespaces/ns/connectors/harbor")

    def test_nothing_named(self) -> None:
        self.assertEqual(route(b"/v2/", b"proxy", "cluster.local"), Route(None, None, b"/v2/"))

    def test_traversal_refused(self) -> None:
        for target in (b"/namespaces/ns/connectors/a/../b/x", b"/namespaces/ns/connectors/a/%2e%2E/x",
                       b"/namespaces/ns/connectors/a/x/%2E%2E%2Fy", b"/namespaces/ns/connectors/a/%252e%252e/y",
                       b"/namespaces/ns/connectors/a/..%5cy", b"/namespaces/ns/connectors/a/./x",
                       b"/v2/namespaces/ns/connectors/a/../b/manifests/x", b"/namespaces/ns/connectors/a/%00",
                       b"/namespaces/ns/connectors/a/..;/b", b"/namespaces/ns/connectors/a/%2e%2e;x=1/b",
                       b"/namespaces/ns/connectors/a/..%3b/b", b"http://h:abc/x", b"http://h:99999/x",
                       b"http://[::1/x"):
            self.assertRaises(BadTarget, route, target, b"proxy", "cluster.local")

    def test_lookalike_dot_segments_refused(self) -> None:
        """What a lenient server could read as a dot segment is refused, saying why."""
        for rest, problem in (
            (b"/..%20/x", "padded with whitespace"), (b"/..%09/x", "padded with whitespace"),
            (b"/%20../x", "padded with whitespace"), (b"/..%0b;x/y", "padded with whitespace"),
            (b"/.%20/x", "padded with whitespace"), (b"/..%2520/x", "padded with whitespace"),
            (b"/%c0%ae%c0%ae/x", "overlong UTF-8"), (b"/.%c0%ae/x", "overlong UTF-8"),
            (b"/%e0%80%ae%e0%80%ae/x", "overlong UTF-8"), (b"/..%c0%afx", "overlong UTF-8"),
            (b"/%25c0%25ae./x", "overlong UTF-8"), (b"/%f0%80%80%ae/x", "overlong UTF-8"),
            (b"/%u002e%u002e/x", "%u escapes"), (b"/%U002E/x", "%u escapes"), (b"/.%u002e%u002fx", "%u escapes"),
            (b"/%ef%bc%8e%ef%bc%8e/x", "Unicode lookalikes"), (b"/%2e%ef%bc%8e/x", "Unicode lookalikes"),
            (b"/%e2%80%a5/x", "Unicode lookalikes"), (b"/..%ef%bc%8fx", "Unicode lookalikes"),
            (b"/%uff0e%uff0e/x", "Unicode lookalikes"), (b"/%ef%bc%8e%e3%80%80/x", "Unicode lookalikes"),
        ):
            with self.assertRaises(BadTarget, msg=rest) as caught:
                route(b"/namespaces/ns/connectors/a" + rest, b"proxy", "cluster.local")
            self.assertIn(problem, str(caught.exception), rest)
            self.assertRaises(BadTarget, route, b"/v2/namespaces/ns/connectors/a" + rest, b"proxy", "cluster.local")
            self.assertRaises(BadTarget, route, rest, b"c-a.ns", "cluster.local")

    def test_non_ascii_names_that_are_not_dots_pass(self) -> None:
        check_rest(b"/caf%C3%A9/%E9t%E9/%ef%bc%8ea/a%ef%bc%8e/%u0041/..%20a/a%20../%e2%80%a4x")

    def test_encoded_slash_kept_verbatim(self) -> None:
        self.assertEqual(route(b"/namespaces/ns/connectors/a/x%2Fy?q=%2F", None, "c").rest, b"/x%2Fy?q=%2F")

    def test_dots_inside_names_are_fine(self) -> None:
        check_rest(b"/repo.git/objects/..pack/a..b/...")

    @given(st.lists(st.sampled_from(["a", ".", "..", "%2e", "%2E%2e", "%2f", "%5c", "b.c", "%25"]), max_size=6))
    def test_never_climbs(self, parts: list[str]) -> None:
        """Whatever a target is made of, what passes never holds a dot segment once decoded."""
        from urllib.parse import unquote
        rest = "/" + "/".join(parts)
        try:
            check_rest(rest.encode())
        except BadTarget:
            return
        decoded = rest
        for _ in range(4):
            decoded = unquote(decoded)
        self.assertNotIn("..", decoded.replace("\\", "/").split("/"))
        self.assertNotIn(".", decoded.replace("\\", "/").split("/"))
