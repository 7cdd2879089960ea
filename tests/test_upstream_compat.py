"""
Existing upstream Connectors served unchanged (issue 12, part A): path-form
addresses on a Connector's host, the forward proxy as upstream runs it
(407 challenge, C{NS/NAME}, C{NS%2FNAME} and comma lists in
C{Proxy-Authorization}, C{spec.addressExtensions} as injection targets,
unlisted targets relayed without credentials or refused, loopback,
link-local and the proxy's own host never reachable), and upstream's
C{enable-connector-proxy-permissions} flag read from the ConfigMap
C{connectors-config} at run time.

In memory first (the real site, root and relay; upstreams as resources;
names resolved by a table), then with real components: C{curl} and C{git}
through a listening proxy, and cluster mode against the fake API server
(and the real one) with the flag flipped while requests flow.

Every test scans what clients received and what the proxy logged for the
Connector's password, and what upstreams received for the client's token.
"""

from __future__ import annotations

import base64
import io
import os
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import treq
import yaml
from attrs import define as attrs_define
from attrs import evolve
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock, deferLater
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import URI, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from connectors_proxy.auth.identity import StaticTokens, presented_token
from connectors_proxy.auth.interfaces import Identity
from connectors_proxy.kube.cluster import ClusterMode
from connectors_proxy.kube.config import load_kubeconfig
from connectors_proxy.kube.identity import KubeIdentityVerifier, pod_subresource
from connectors_proxy.model.flags import DEFAULTS, PROXY_PERMISSIONS, parse_flags
from connectors_proxy.model.objects import InvalidObject, ObjectRef, parse_connector
from connectors_proxy.model.state import Store
from connectors_proxy.router import Listed, Refused, Unlisted, forward_decision, forward_unlisted_policy
from connectors_proxy.server.routing import BadTarget, Route, route
from connectors_proxy.sources.lint import lint_document
from connectors_proxy.sources.manifests import parse_documents
from connectors_proxy.tap import Options, proxy_site
from connectors_proxy.testing.fakekube import start_fake_kube
from connectors_proxy.upstream.forward import ForwardAgents, ForwardGuard, ForwardRefused, refused_address

from .support.kubeapi import API_AUDIENCE, PROXY_NAMESPACE
from .support.memory import MemoryProxy, Response, Scripted, basic_auth, bearer, memory_proxy, request_bytes
from .support.nginx import start_nginx
from .support.procs import require, run
from .support.proxy import (
    ROOT,
    basic_secret,
    connector,
    connector_class,
    manifests_text,
    sa,
    snapshot_of,
    start_proxy,
)
from .test_kube_real import RBAC, RealClusterCase

log = Logger()

CLUSTER_LOCAL = "cluster.local"
REALM = b'Basic realm="connectors-proxy"'


def upstream_class(name: str) -> dict[str, Any]:
    """A ConnectorClass as upstream ships it: no annotation of ours."""
    return {"apiVersion": "connectors.alauda.io/v1alpha1", "kind": "ConnectorClass",
            "metadata": {"name": name},
            "spec": {"auth": {"types": [{"name": "basicAuth", "secretType": "kubernetes.io/basic-auth",
                                         "optional": True}]}}}


def extensions(**values: str) -> list[dict[str, str]]:
    return [{"name": name, "value": value} for name, value in values.items()]


# -- pure ----------------------------------------------------------------------------


class PathFormRoutingTests(SynchronousTestCase):
    """SPEC 5: host form and path form at once; the prefix stripped once."""

    def test_host_and_path(self) -> None:
        r = route(b"/namespaces/ns/connectors/git/team/app.git/info/refs?service=git-upload-pack",
                  b"c-git.ns.svc.cluster.local", CLUSTER_LOCAL)
        self.assertEqual(r, Route("ns", "git", b"/team/app.git/info/refs?service=git-upload-pack",
                                  client_prefix=b"/namespaces/ns/connectors/git"))
        self.assertEqual(r.host, b"c-git.ns.svc.cluster.local")

    def test_stripped_once(self) -> None:
        r = route(b"/namespaces/ns/connectors/a/namespaces/ns/connectors/a/x", b"c-a.ns", CLUSTER_LOCAL)
        self.assertEqual(r.rest, b"/namespaces/ns/connectors/a/x")

    def test_oci_repository(self) -> None:
        """Image C{c-NAME.NS.svc.cluster.local/namespaces/NS/connectors/NAME/test/abc:v1} -> repository C{test/abc}."""
        r = route(b"/v2/namespaces/ns/connectors/reg/test/abc/manifests/v1",
                  b"c-reg.ns.svc.cluster.local:80", CLUSTER_LOCAL)
        self.assertEqual(r, Route("ns", "reg", b"/v2/test/abc/manifests/v1",
                                  client_prefix=b"/v2/namespaces/ns/connectors/reg", oci_path=True))
        self.assertEqual(r.host, b"c-reg.ns.svc.cluster.local:80")

    def test_absolute_form(self) -> None:
        """Through C{http_proxy} with the path-form address: the same."""
        r = route(b"http://c-a.ns.svc.cluster.local/namespaces/ns/connectors/a/x?y", None, CLUSTER_LOCAL)
        self.assertEqual((r.namespace, r.name, r.rest), ("ns", "a", b"/x?y"))

    def test_different_connectors(self) -> None:
        for target, host in [(b"/namespaces/ns/connectors/b/x", b"c-a.ns.svc"),
                             (b"/namespaces/other/connectors/a/x", b"c-a.ns.svc"),
                             (b"/v2/namespaces/ns/connectors/b/r/manifests/v1", b"c-a.ns"),
                             (b"http://c-a.ns.svc/namespaces/ns/connectors/b/x", None)]:
            with self.assertRaises(BadTarget, msg=target) as caught:
                route(target, host, CLUSTER_LOCAL)
            self.assertIn("names Connector", str(caught.exception))

    def test_proxy_own_name(self) -> None:
        """The path form on the proxy Service's own name, whatever the class's resolver."""
        r = route(b"/namespaces/ns/connectors/a/x", b"connectors-proxy-service.connectors-system.svc",
                  CLUSTER_LOCAL)
        self.assertEqual((r.namespace, r.name, r.rest, r.host), ("ns", "a", b"/x", None))

    def test_traversal_after_prefix(self) -> None:
        with self.assertRaises(BadTarget):
            route(b"/namespaces/ns/connectors/a/%2e%2e/x", b"c-a.ns", CLUSTER_LOCAL)


class ProxyAuthorizationTests(SynchronousTestCase):
    """SPEC 4: the user part of C{Proxy-Authorization} lists Connectors."""

    def listed(self, user: str) -> tuple[ObjectRef, ...]:
        value = b"Basic " + base64.b64encode(f"{user}:tok".encode())
        presented = presented_token(None, value)
        assert presented is not None
        self.assertEqual(presented.token, "tok")
        return presented.listed

    def test_forms(self) -> None:
        self.assertEqual(self.listed("ns/a"), (ObjectRef("ns", "a"),))
        self.assertEqual(self.listed("ns%2Fa"), (ObjectRef("ns", "a"),))
        self.assertEqual(self.listed("ns%2fa"), (ObjectRef("ns", "a"),))
        self.assertEqual(self.listed("ns/a,ns2/b"), (ObjectRef("ns", "a"), ObjectRef("ns2", "b")))
        self.assertEqual(self.listed("ns%2Fa%2Cns2%2Fb"), (ObjectRef("ns", "a"), ObjectRef("ns2", "b")))
        self.assertEqual(self.listed("ns%2Fa, ns2%2Fb"), (ObjectRef("ns", "a"), ObjectRef("ns2", "b")))
        self.assertEqual(self.listed("nobody"), ())


class AddressExtensionTests(SynchronousTestCase):
    """C{spec.addressExtensions}: parsed and checked as upstream's admission does."""

    def parse(self, exts: Any, address: str = "https://github.com") -> Any:
        doc = connector("ns", "gh", "github", address, addressExtensions=exts)
        return parse_connector(doc)

    def test_parsed(self) -> None:
        c = self.parse(extensions(api="https://api.github.com/", uploads="https://uploads.github.com"))
        self.assertEqual(c.addresses, ("https://github.com", "https://api.github.com", "https://uploads.github.com"))
        self.assertEqual([e.name for e in c.address_extensions], ["api", "uploads"])
        self.assertEqual(parse_connector(connector("ns", "a", "x", "http://a.test")).addresses, ("http://a.test",))

    def test_invalid(self) -> None:
        for exts, field, problem in [
            ("x", "spec.addressExtensions", "must be a list"),
            (["x"], "spec.addressExtensions[0]", "must be a mapping"),
            ([{"value": "https://a"}], "name", "is required"),
            ([{"name": "api"}], "value", "is required"),
            ([{"name": "api", "value": ""}], "spec.addressExtensions[0].value", "must start with http"),
            ([{"name": "api", "value": "ftp://a"}], "spec.addressExtensions[0].value", "must start with http"),
            (extensions(api="https://github.com/"), "spec.addressExtensions[0].value", "is spec.address itself"),
            ([{"name": "api", "value": "https://a"}, {"name": "api", "value": "https://b"}],
             "spec.addressExtensions[1].name", "'api' is listed twice"),
        ]:
            with self.assertRaises(InvalidObject, msg=exts) as caught:
                self.parse(exts)
            self.assertEqual(caught.exception.field, field, exts)
            self.assertIn(problem, caught.exception.problem, exts)


class ForwardDecisionTests(SynchronousTestCase):
    """The one decision the absolute-form path (and, later, CONNECT) uses."""

    def setUp(self) -> None:
        self.snapshot = snapshot_of(
            connector("ns", "gh", "github", "https://github.com",
                      addressExtensions=extensions(api="https://api.github.com", raw="https://github.com/raw")),
            connector("ns", "gl", "gitlab", "http://git.test/gitlab"),
            connector("ns", "root", "gitlab", "http://git.test"),
        )
        self.all = (ObjectRef("ns", "gh"), ObjectRef("ns", "gl"), ObjectRef("ns", "root"))

    def decide(self, origin: str, path: bytes | None, listed: Sequence[ObjectRef] | None = None,
               unlisted: str = "allow") -> Any:
        return forward_decision(origin, path, tuple(self.all if listed is None else listed), self.snapshot, unlisted)

    def test_address_and_extensions(self) -> None:
        gh = ObjectRef("ns", "gh")
        self.assertEqual(self.decide("https://github.com", b"/o/r.git/info/refs"), Listed(gh, "https://github.com", b""))
        self.assertEqual(self.decide("https://api.github.com:443", b"/user"), Listed(gh, "https://api.github.com", b""))
        # The longest prefix wins: the extension under the address's origin.
        self.assertEqual(self.decide("https://github.com", b"/raw/x"), Listed(gh, "https://github.com/raw", b"/raw"))
        self.assertEqual(self.decide("http://git.test", b"/gitlab/api/v4"),
                         Listed(ObjectRef("ns", "gl"), "http://git.test/gitlab", b"/gitlab"))
        self.assertEqual(self.decide("http://git.test", b"/gitlabx/api"),
                         Listed(ObjectRef("ns", "root"), "http://git.test", b""))

    def test_unlisted(self) -> None:
        for origin, path, listed in [
            ("http://github.com", b"/", None),            # another scheme
            ("https://github.com:8443", b"/", None),      # another port
            ("https://api.github.com", b"/", [ObjectRef("ns", "gl")]),   # not listed
            ("http://git.test", b"/gitlabx", [ObjectRef("ns", "gl")]),   # not under the prefix
            ("https://repo1.maven.org", b"/maven2/", [ObjectRef("ns", "ghost")]),  # unknown Connector
        ]:
            self.assertEqual(self.decide(origin, path, listed), Unlisted(), (origin, path))
            refused = self.decide(origin, path, listed, unlisted="deny")
            self.assertIsInstance(refused, Refused)
            self.assertIn(f"{origin} is not the address of a Connector you listed", refused.message)

    def test_connect_seam(self) -> None:
        """Before a CONNECT's requests are read (no path): any listed address on the origin."""
        self.assertEqual(self.decide("http://git.test", None, [ObjectRef("ns", "gl")]),
                         Listed(ObjectRef("ns", "gl"), "http://git.test/gitlab", b"/gitlab"))
        self.assertEqual(self.decide("https://example.com:443", None), Unlisted())

    def test_policy_option(self) -> None:
        self.assertEqual(forward_unlisted_policy("deny"), "deny")
        self.assertRaises(ValueError, forward_unlisted_policy, "maybe")
        options = Options()
        options.parseOptions(["--manifests", "x", "--tokens", "y"])
        self.assertEqual(options["forward-unlisted"], "allow")
        options = Options()
        options.parseOptions(["--manifests", "x", "--tokens", "y", "--forward-unlisted", "deny"])
        self.assertEqual(options["forward-unlisted"], "deny")
        _, root, _ = proxy_site(Store(), StaticTokens({}), Clock(), forward_unlisted=options["forward-unlisted"])
        self.assertEqual(root.forward_unlisted, "deny")
        self.assertEqual(proxy_site(Store(), StaticTokens({}), Clock())[1].forward_unlisted, "allow")
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        with self.assertRaises(SystemExit):
            Options().parseOptions(["--manifests", "x", "--tokens", "y", "--forward-unlisted", "open"])
        self.assertIn("must be allow or deny, not 'open'", stderr.getvalue())


class RefusedAddressTests(SynchronousTestCase):
    def test_refused(self) -> None:
        for address in ("127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1", "::127.0.0.1", "169.254.169.254",
                        "fe80::1", "fe80::1%eth0", "0.0.0.0", "0.1.2.3", "::", "224.0.0.1", "::ffff:169.254.1.1"):
            self.assertIsNotNone(refused_address(address), address)

    def test_allowed(self) -> None:
        for address in ("10.0.0.1", "192.168.1.1", "203.0.113.7", "2001:db8::1", "fd00::1", "::ffff:8.8.8.8"):
            self.assertIsNone(refused_address(address), address)

    def test_exempt(self) -> None:
        guard = ForwardGuard(exempt=frozenset({("127.0.0.1", 8081)}))
        guard.check("127.0.0.1", 8081, "localhost")
        self.assertRaises(ForwardRefused, guard.check, "127.0.0.1", 8080, "localhost")


class FlagTests(SynchronousTestCase):
    def test_parse(self) -> None:
        self.assertEqual(parse_flags(None), DEFAULTS)
        self.assertFalse(DEFAULTS.proxy_permissions)
        for value, on in (("true", True), ("True", True), ("1", True), (" true ", True),
                          ("false", False), ("yes", False), ("", False)):
            flags = parse_flags({"data": {PROXY_PERMISSIONS: value}})
            self.assertEqual(flags.proxy_permissions, on, value)
        self.assertFalse(parse_flags({"data": {PROXY_PERMISSIONS: True}}).proxy_permissions)
        self.assertEqual(parse_flags({"data": "junk"}), DEFAULTS)

    def test_standalone_manifest(self) -> None:
        """Standalone: the same ConfigMap among the manifests loads, without a warning."""
        docs = [config_map(**{PROXY_PERMISSIONS: "true"}), connector("ns", "a", "x", "http://a.test")]
        # Both read: the ConfigMap carries the flags (enable-custom-ca-certs applies standalone).
        self.assertEqual(len(parse_documents(manifests_text(docs), "<test>")), 2)
        self.assertEqual([problem for doc in docs for problem in lint_document(doc)], [])


# -- in memory -----------------------------------------------------------------------


# What the in-memory resolver answers: names of the "internet" and of places
# the forward proxy must never reach.
NAMES = {
    "unlisted.test": ["203.0.113.7"],
    "api.test": ["198.51.100.10"],       # a listed Connector's host, outside its prefix
    "localhost": ["127.0.0.1", "::1"],
    "rebound.test": ["203.0.113.7", "127.0.0.1"],
    "metadata.test": ["169.254.169.254"],
    "self.test": ["10.0.0.1"],           # the proxy's own address (its memory listener)
}


def memory_forward(test: SynchronousTestCase, proxy: MemoryProxy, names: Mapping[str, list[str]] = NAMES,
                   guard: ForwardGuard | None = None) -> ForwardAgents:
    """The root's agents for unlisted targets, resolving from C{names} and connecting in memory."""
    endpoints = proxy.agents.endpoints(proxy.clock, None, 0)  # type: ignore[arg-type]

    def connect_to(reactor: Any, policy: Any, timeout: float) -> Any:
        return lambda uri, address: endpoints.endpointForURI(
            URI(uri.scheme, b"", address.encode(), uri.port, b"/", b"", b"", b""))

    forward = ForwardAgents(proxy.clock, guard=guard or ForwardGuard(),
                            resolve=lambda host, port: succeed(list(names.get(host, []))), connect_to=connect_to)
    proxy.root.forward_agents = forward

    def close() -> None:
        forward.close()
        proxy.network.flush()

    test.addCleanup(close)
    return forward


class MemoryTestCase(SynchronousTestCase):
    """A proxy with upstream classes (no annotation) and our own, a canary password, and the scans."""

    def setUp(self) -> None:
        self.token = "tok-" + secrets.token_hex(12)
        self.canary = secrets.token_hex(16)
        self.proxy = memory_proxy(self, [
            connector_class("http"),
            connector_class("anon", optional=True),
            connector_class("oci", protocol="oci"),
            upstream_class("maven"),
            basic_secret("default", "creds", "robot", self.canary),
            connector("default", "api", "http", "http://api.test/base", secret="creds",
                      addressExtensions=extensions(v3="http://ext.test/v3", uploads="http://ext.test:8080")),
            connector("default", "open", "anon", "http://open.test"),
            connector("default", "mvn", "maven", "http://maven.test/repo", secret="creds"),
            connector("default", "registry", "oci", "http://registry.test", secret="creds"),
        ], {self.token: sa("default")})
        self.upstreams = {origin: self.proxy.upstream(origin, Scripted()) for origin in (
            "http://api.test", "http://ext.test", "http://ext.test:8080", "http://open.test", "http://maven.test",
            "http://registry.test")}
        self.internet = self.proxy.upstream("http://203.0.113.7", Scripted(self.cookie))
        self.internet_api = self.proxy.upstream("http://198.51.100.10", Scripted())
        self.loopback = self.proxy.upstream("http://127.0.0.1", Scripted())
        self.itself = self.proxy.upstream("http://10.0.0.1", Scripted())
        self.metadata = self.proxy.upstream("http://169.254.169.254", Scripted())
        memory_forward(self, self.proxy)

    @staticmethod
    def cookie(request: Request) -> bytes:
        request.setHeader(b"Set-Cookie", b"session=s1; Path=/")
        return b"internet " + request.uri

    def get(self, target: bytes, *headers: tuple[bytes, bytes], host: bytes | None = b"proxy.local:8080",
            method: bytes = b"GET") -> Response:
        return self.proxy.request(request_bytes(method, target, headers, host=host))

    def proxy_auth(self, user: str, token: str | None = None) -> tuple[bytes, bytes]:
        return basic_auth(user, self.token if token is None else token, b"Proxy-Authorization")

    def seen(self) -> list[Request]:
        return [r for upstream in self.proxy.upstreams.values() for r in upstream.requests]

    def tearDown(self) -> None:
        secret_forms = [self.canary.encode(), base64.b64encode(f"robot:{self.canary}".encode())]
        received, logs = self.proxy.received(), self.proxy.logs.text().encode()
        for form in secret_forms:
            self.assertNotIn(form, received)
            self.assertNotIn(form, logs)
        for request in self.seen():
            for _, values in request.requestHeaders.getAllRawHeaders():
                for value in values:
                    self.assertNotIn(self.token.encode(), value)
                    self.assertNotIn(base64.b64encode(f"x:{self.token}".encode()), value)
        # Credentials only ever went to a Connector's own addresses.
        for upstream in (self.internet, self.internet_api, self.loopback, self.itself, self.metadata):
            for request in upstream.requests:
                self.assertIsNone(request.getHeader(b"authorization"))
                self.assertIsNone(request.getHeader(b"proxy-authorization"))


class MemoryPathFormTests(MemoryTestCase):
    def test_host_and_path(self) -> None:
        """Upstream's path-resolver address: prefix stripped once, routed by the host it names."""
        response = self.get(b"/namespaces/default/connectors/api/x?y=1", bearer(self.token),
                            host=b"c-api.default.svc.cluster.local")
        self.assertEqual((response.code, response.body), (200, b"ok /base/x?y=1"))
        headers = self.upstreams["http://api.test"].headers()
        self.assertEqual(headers[b"x-forwarded-host"], [b"c-api.default.svc.cluster.local"])
        self.assertEqual(headers[b"authorization"], [b"Basic " + base64.b64encode(f"robot:{self.canary}".encode())])

    def test_oci_repository(self) -> None:
        """Image C{c-registry.default.svc.cluster.local/namespaces/default/connectors/registry/test/abc:v1}."""
        response = self.get(b"/v2/namespaces/default/connectors/registry/test/abc/manifests/v1",
                            basic_auth("docker", self.token), host=b"c-registry.default.svc.cluster.local")
        self.assertEqual(response.code, 200, response.body)
        uris = [r.uri for r in self.upstreams["http://registry.test"].requests]
        self.assertEqual(uris[-1], b"/v2/test/abc/manifests/v1")
        self.assertFalse([u for u in uris if b"namespaces" in u], uris)

    def test_different_connectors(self) -> None:
        for target, host in [(b"/namespaces/default/connectors/open/x", b"c-api.default.svc"),
                             (b"/v2/namespaces/default/connectors/api/r/manifests/v1", b"c-registry.default")]:
            response = self.get(target, bearer(self.token), host=host)
            self.assertEqual(response.code, 400, target)
            self.assertIn(b"but the path names Connector", response.body)
        self.assertEqual(self.seen(), [])

    def test_proxy_own_name_for_host_classes(self) -> None:
        """An unannotated upstream class (host resolver) through the proxy Service's own name."""
        response = self.get(b"/namespaces/default/connectors/mvn/org/x/1.0/x-1.0.pom",
                            basic_auth("default-mvn", self.token),
                            host=b"connectors-proxy-service.connectors-system.svc.cluster.local")
        self.assertEqual((response.code, response.body), (200, b"ok /repo/org/x/1.0/x-1.0.pom"))
        self.assertIn(b"authorization", self.upstreams["http://maven.test"].headers())


class MemoryForwardTests(MemoryTestCase):
    def test_extension_gets_credentials(self) -> None:
        """Every C{spec.addressExtensions} value is an injection target, its path prefix followed."""
        response = self.get(b"http://ext.test/v3/users?page=2", self.proxy_auth("default/api"), host=b"ext.test")
        self.assertEqual((response.code, response.body), (200, b"ok /v3/users?page=2"))
        response = self.get(b"http://ext.test:8080/upload", self.proxy_auth("default/api"), host=b"ext.test:8080")
        self.assertEqual((response.code, response.body), (200, b"ok /upload"))
        expected = [b"Basic " + base64.b64encode(f"robot:{self.canary}".encode())]
        self.assertEqual(self.upstreams["http://ext.test"].headers()[b"authorization"], expected)
        self.assertEqual(self.upstreams["http://ext.test:8080"].headers()[b"authorization"], expected)
        self.assertNotIn(b"proxy-authorization", self.upstreams["http://ext.test"].headers())

    def test_percent_encoded_and_comma_lists(self) -> None:
        for user in ("default%2Fapi", "default%2fapi", "default/open,default/api", "default%2Fopen%2Cdefault%2Fapi"):
            response = self.get(b"http://api.test/base/x", self.proxy_auth(user))
            self.assertEqual((response.code, response.body), (200, b"ok /base/x"), user)
        self.assertEqual(len(self.upstreams["http://api.test"].requests), 4)
        self.assertTrue(all(r.getHeader(b"authorization") for r in self.upstreams["http://api.test"].requests))

    def test_407_challenge(self) -> None:
        """
        No C{Proxy-Authorization} (a token in C{Authorization} does not
        count: that header is for the target), a malformed one, or an
        invalid token: 407 with C{Proxy-Authenticate}, nothing forwarded.
        """
        for headers in ([], [bearer(self.token)], [(b"Proxy-Authorization", b"Bearer " + self.token.encode())],
                        [self.proxy_auth("default/api", "wrong-token")]):
            for target in (b"http://api.test/base/x", b"http://unlisted.test/x"):
                response = self.get(target, *headers)
                self.assertEqual(response.code, 407, (target, headers))
                self.assertEqual(response.header(b"proxy-authenticate"), [REALM])
                self.assertEqual(response.header(b"www-authenticate"), [])
        self.assertEqual(self.seen(), [])

    def test_connector_host_in_absolute_form_needs_no_proxy_authorization(self) -> None:
        """C{http_proxy} with a Connector's host form: C{Authorization} (as gitconfig's extraHeader) still works."""
        response = self.get(b"http://c-api.default.svc.cluster.local/x", bearer(self.token))
        self.assertEqual((response.code, response.body), (200, b"ok /base/x"))
        response = self.get(b"http://c-api.default.svc.cluster.local/x")
        self.assertEqual(response.code, 401)

    def test_unlisted_allowed(self) -> None:
        """Relayed as sent, without credentials (the client's own Authorization dropped); cookies come back."""
        response = self.get(b"http://unlisted.test/maven2/x.pom?q=%2F", self.proxy_auth("default/api"),
                            bearer(self.token), (b"Cookie", b"c=1"), (b"X-Custom", b"kept"), host=b"unlisted.test")
        self.assertEqual((response.code, response.body), (200, b"internet /maven2/x.pom?q=%2F"))
        self.assertEqual(response.header(b"set-cookie"), [b"session=s1; Path=/"])
        headers = self.internet.headers()
        self.assertEqual(headers[b"host"], [b"unlisted.test"])
        self.assertEqual(headers[b"x-custom"], [b"kept"])
        self.assertEqual(headers[b"cookie"], [b"c=1"])
        self.assertNotIn(b"x-forwarded-host", headers)
        [record] = [e for e in self.proxy.logs.access()]
        self.assertEqual(record.get("protocol"), "forward")

    def test_listed_origin_outside_prefix(self) -> None:
        """A listed Connector's host, outside its address's path: not its credentials."""
        response = self.get(b"http://api.test/other/x", self.proxy_auth("default/api"))
        self.assertEqual((response.code, response.body), (200, b"ok /other/x"))
        self.assertEqual(len(self.internet_api.requests), 1)
        self.assertEqual(self.upstreams["http://api.test"].requests, [])

    def test_unlisted_denied(self) -> None:
        self.proxy.root.forward_unlisted = "deny"
        response = self.get(b"http://unlisted.test/x", self.proxy_auth("default/api"))
        self.assertEqual(response.code, 403)
        self.assertEqual(response.body, b"connectors-proxy: http://unlisted.test is not the address of a Connector "
                                        b"you listed; this proxy only forwards to Connectors\n")
        response = self.get(b"http://ext.test/v3/x", self.proxy_auth("default/api"))
        self.assertEqual(response.code, 200)
        self.assertEqual(self.internet.requests, [])

    def test_never_loopback_link_local_or_itself(self) -> None:
        """By address or by a name that resolves there: 403, no connection made (or, to itself, nothing sent)."""
        for target, why in [
            (b"http://127.0.0.1/admin", b"a loopback address"),
            (b"http://127.0.0.1:9090/metrics", b"a loopback address"),
            (b"http://localhost/", b"a loopback address"),
            (b"http://[::1]:8080/", b"a loopback address"),
            (b"http://[::ffff:127.0.0.1]/", b"a loopback address"),
            (b"http://rebound.test/", b"a loopback address"),
            (b"http://169.254.169.254/latest/meta-data/", b"a link-local address"),
            (b"http://metadata.test/latest/meta-data/", b"a link-local address"),
            (b"http://[fe80::1]/", b"a link-local address"),
            (b"http://0.0.0.0:8080/", b"an address of this host"),
            (b"http://self.test/", b"this proxy's own host"),
        ]:
            response = self.get(target, self.proxy_auth("default/api"))
            self.assertEqual(response.code, 403, target)
            self.assertIn(why, response.body, target)
        for upstream in (self.loopback, self.itself, self.metadata, self.internet):
            self.assertEqual(upstream.requests, [])

    def test_unresolvable(self) -> None:
        response = self.get(b"http://nowhere.test/", self.proxy_auth("default/api"))
        self.assertEqual(response.code, 502)
        self.assertIn(b"cannot resolve the host of http://nowhere.test/", response.body)


# -- the permissions flag, with a recording API server ------------------------------------


class Reviews:
    """
    The review half of an L{IKubeClient}: TokenReviews answered from a
    table, SubjectAccessReviews from a set of grants, and recorded.
    """

    def __init__(self) -> None:
        self.users: dict[str, dict[str, Any]] = {}
        self.grants: set[tuple[str, str, str, str | None]] = set()
        self.asked: list[str | None] = []

    def create_token_review(self, token: str, audiences: tuple[str, ...] = ()) -> Deferred[dict[str, Any]]:
        user = self.users.get(token)
        return succeed({"authenticated": user is not None, "user": user or {}})

    def create_subject_access_review(self, spec: dict[str, Any]) -> Deferred[dict[str, Any]]:
        attrs = spec["resourceAttributes"]
        self.asked.append(attrs.get("subresource"))
        key = (spec["user"], attrs["namespace"], attrs["name"], attrs.get("subresource"))
        return succeed({"allowed": key in self.grants})


class ProxyPermissionTests(SynchronousTestCase):
    """UPSTREAM-COMPAT checklist 11: flag off, only C{get connectors}; on, also C{connectors/proxy} or its pod form."""

    user = sa("team", "builder")

    def setUp(self) -> None:
        self.api = Reviews()
        self.api.users["plain"] = {"username": self.user, "uid": "u1", "groups": ["system:serviceaccounts"]}
        self.api.users["pod"] = dict(self.api.users["plain"], extra={
            "authentication.kubernetes.io/pod-name": ["build-1"], "authentication.kubernetes.io/pod-uid": ["p1"]})
        self.api.grants.add((self.user, "team", "harbor", None))
        self.verifier = KubeIdentityVerifier(self.api, Clock())  # type: ignore[arg-type]

    def verdict(self, token: str) -> bool:
        identity = self.successResultOf(self.verifier.authenticate(token))
        assert identity is not None
        return self.successResultOf(self.verifier.authorize(identity, "team", "harbor"))

    def test_token_names_pod(self) -> None:
        identity = self.successResultOf(self.verifier.authenticate("pod"))
        assert identity is not None
        self.assertEqual(identity, Identity(self.user, "u1", ("system:serviceaccounts",), pod="build-1"))
        self.assertEqual(pod_subresource(identity), "proxy/v1/pod/team/build-1")
        self.assertIsNone(self.successResultOf(self.verifier.authenticate("plain")).pod)  # type: ignore[union-attr]
        self.assertIsNone(pod_subresource(Identity("alice", pod="x")))

    def test_flag_off(self) -> None:
        self.assertTrue(self.verdict("plain"))
        self.assertEqual(self.api.asked, [None])

    def test_flag_on(self) -> None:
        self.verifier.proxy_subresource = True
        self.assertFalse(self.verdict("plain"))
        self.assertEqual(self.api.asked, [None, "proxy"])
        self.api.asked.clear()
        self.assertFalse(self.verdict("pod"))
        self.assertEqual(self.api.asked, [None, "proxy", "proxy/v1/pod/team/build-1"])

    def test_pod_grant(self) -> None:
        self.verifier.proxy_subresource = True
        self.api.grants.add((self.user, "team", "harbor", "proxy/v1/pod/team/build-1"))
        self.assertTrue(self.verdict("pod"))
        self.assertFalse(self.verdict("plain"))

    def test_plain_grant(self) -> None:
        self.verifier.proxy_subresource = True
        self.api.grants.add((self.user, "team", "harbor", "proxy"))
        self.assertTrue(self.verdict("plain"))
        self.assertTrue(self.verdict("pod"))

    def test_flip_is_not_cached(self) -> None:
        """A cached answer to the other question is never served: the flag is part of the cache key."""
        self.assertTrue(self.verdict("plain"))
        self.verifier.proxy_subresource = True
        self.assertFalse(self.verdict("plain"))
        self.verifier.proxy_subresource = False
        self.assertTrue(self.verdict("plain"))
        # ...and the answers are still cached per flag value.
        self.assertEqual(self.api.asked, [None, None, "proxy"])

    def test_get_still_required(self) -> None:
        self.verifier.proxy_subresource = True
        self.api.grants = {(self.user, "team", "harbor", "proxy")}
        self.assertFalse(self.verdict("plain"))
        self.assertEqual(self.api.asked, [None])


# -- real sockets --------------------------------------------------------------------------


class Recorder(Resource):
    """A tool that answers every request with its path and records the headers it got."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[dict[bytes, list[bytes]]] = []

    def render(self, request: Request) -> bytes:
        self.requests.append({k.lower(): list(v) for k, v in request.requestHeaders.getAllRawHeaders()})
        return b"tool " + request.uri


async def listen(test: TestCase, resource: Resource) -> int:
    from twisted.internet.endpoints import TCP4ServerEndpoint
    site = Site(resource)
    site.noisy = False
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
    test.addCleanup(port.stopListening)
    return int(port.getHost().port)


async def curl(*args: str) -> tuple[int, bytes, bytes]:
    """Run curl (no proxy from this machine's environment); C{(code, body, stderr)}."""
    env = {"PATH": os.environ.get("PATH", ""), "http_proxy": "", "https_proxy": "", "no_proxy": "", "HOME": "/"}
    result = await run([require("curl"), "-sS", "-w", "\n%{http_code}", *args], env=env)
    body, _, code = result.stdout.rpartition(b"\n")
    return int(code or 0), body, result.stderr


class CurlForwardTests(TestCase):
    """Real C{curl -x}, as Maven, Sonar and the CSI driver's C{http.proxy} file use the proxy."""

    timeout = 60

    def test_curl(self) -> Deferred[None]:
        async def go() -> None:
            nginx = await start_nginx(self)
            token = "client-" + secrets.token_hex(16)
            proxy = await start_proxy(self, [
                connector_class("http"),
                basic_secret("dev", "creds", nginx.username, nginx.password),
                connector("dev", "api", "http", "http://api.invalid", secret="creds",
                          addressExtensions=extensions(files=f"http://localhost:{nginx.port}/basic")),
            ], {token: sa("dev")})
            # The "internet" here is nginx on loopback: let the guard through to it, and only to it.
            forward = ForwardAgents(reactor, guard=ForwardGuard(exempt=frozenset({("127.0.0.1", nginx.port)})))
            proxy.root.forward_agents = forward
            self.addCleanup(forward.close)
            outputs: list[bytes] = []

            # Listed: an addressExtensions URL; the user part percent-encoded on the wire (as Java sends it).
            code, body, err = await curl("-x", proxy.url, "--proxy-user", f"dev%252Fapi:{token}",
                                         f"http://localhost:{nginx.port}/basic/small.txt")
            outputs += [body, err]
            self.assertEqual((code, body), (200, b"hello from basic\n"), err)
            self.assertEqual(nginx.last_request().authorization, nginx.basic_header)

            # The proxy URL form of the CSI driver's http.proxy file, and a client that asks for the challenge first.
            code, body, err = await curl("-v", "--proxy-anyauth", "-x", f"http://dev%2Fapi:{token}@127.0.0.1:{proxy.port}",
                                         f"http://localhost:{nginx.port}/basic/small.txt")
            outputs += [body, err]
            self.assertEqual(code, 200, err)
            self.assertIn(b"< HTTP/1.1 407", err)
            self.assertIn(b'< Proxy-Authenticate: Basic realm="connectors-proxy"', err)

            # Unlisted: relayed without credentials, the client's own Authorization dropped.
            code, body, err = await curl("-x", proxy.url, "--proxy-user", f"dev/api:{token}",
                                         "-H", f"Authorization: Bearer {token}",
                                         f"http://127.0.0.1:{nginx.port}/open/small.txt")
            outputs += [body, err]
            self.assertEqual((code, body), (200, b"hello from open\n"), err)
            entry = nginx.last_request()
            self.assertEqual((entry.uri, entry.authorization), ("/open/small.txt", ""))
            code, body, err = await curl("-x", proxy.url, "--proxy-user", f"dev/api:{token}",
                                         f"http://127.0.0.1:{nginx.port}/basic/small.txt")
            outputs += [body, err]
            self.assertEqual(code, 401)

            # No credentials: the challenge, never an open proxy.
            code, body, err = await curl("-i", "-x", proxy.url, f"http://127.0.0.1:{nginx.port}/open/small.txt")
            outputs += [body, err]
            self.assertEqual(code, 407)
            self.assertIn(b'Proxy-Authenticate: Basic realm="connectors-proxy"', body)

            # Loopback by name and the proxy's own listener: refused before connecting.
            requests_before = len(nginx.requests())
            for target in (f"http://localhost:{proxy.port}/namespaces/dev/connectors/api/",
                           f"http://127.0.0.1:{proxy.port}/", f"http://127.0.0.2:{nginx.port}/open/small.txt"):
                code, body, err = await curl("-x", proxy.url, "--proxy-user", f"dev/api:{token}", target)
                outputs += [body, err]
                self.assertEqual(code, 403, (target, body))
                self.assertIn(b"a loopback address: the forward proxy does not go there", body)
            self.assertEqual(len(nginx.requests()), requests_before)

            for output in [*outputs, proxy.logs.text().encode()]:
                self.assertNotIn(nginx.password.encode(), output)
                self.assertNotIn(base64.b64encode(f"{nginx.username}:{nginx.password}".encode()), output)
            for entry in nginx.requests():
                self.assertNotIn(token, entry.authorization)
        return Deferred.fromCoroutine(go())


class GitForwardTests(TestCase):
    """C{git clone} of the Git server's own URL, with only C{http_proxy} set as the CSI driver's C{.env} does."""

    timeout = 120

    def test_clone_via_http_proxy(self) -> Deferred[None]:
        async def go() -> None:
            from .support.gitserver import fresh_home, git_env
            from .test_git_integration import NAME, NS, setup

            s = await setup(self)
            home = fresh_home(self)
            env = git_env(home)
            # No .gitconfig token, no URL rewrite: the proxy is the forward
            # proxy, the user part percent-encoded as in the http.proxy file.
            env["http_proxy"] = f"http://{NS}%2F{NAME}:{s.token}@127.0.0.1:{s.proxy.port}"
            env["GIT_TRACE_CURL"] = os.path.join(home, "curl-trace")
            dest = os.path.join(home, "clone")
            await s.git(env, "clone", s.upstream_url(), dest)
            with open(os.path.join(dest, "README.md"), "rb") as f:
                self.assertEqual(f.read(), b"# fixture\n")
            entries = s.server.requests()
            self.assertTrue(entries and all(e.http_x_forwarded_for for e in entries), entries)
            self.assertEqual({e.remote_user for e in entries}, {s.server.username})
            # git asks for the challenge first (http.proxyAuthMethod anyauth).
            codes = [e.get("status") for e in s.proxy.logs.access()]
            self.assertIn(407, codes)
            s.assert_no_secret()
        return Deferred.fromCoroutine(go())


# -- the flag at run time, in cluster mode ---------------------------------------------


FLAG_DEADLINE = 2.0
PROXY_SA = "system:serviceaccount:connectors-system:connectors-proxy"


def config_map(**data: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "connectors-config", "namespace": "connectors-system"}, "data": data}


async def until(check: Any, deadline: float, what: str) -> float:
    """Poll the async C{check} until true; the seconds it took."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > deadline:
            raise AssertionError(f"not within {deadline} s: {what}")
        await deferLater(reactor, 0.02, lambda: None)
    return time.monotonic() - started


@attrs_define
class FlagScenario:
    """
    What the flag test does to a cluster, fake or real: the proxy's view of it
    (C{mode}) and the changes a cluster admin makes.
    """

    test: TestCase
    mode: ClusterMode
    plain: str
    in_pod: str
    flag: Callable[[str | None], Awaitable[object]]
    grant_pod: Callable[[], Awaitable[object]]
    namespace: str = "team"

    async def run(self) -> tuple[float, float]:
        """The verdicts before, during and after the flag; the seconds each flip took to apply."""
        test, mode = self.test, self.mode
        await mode.synced()
        await until(lambda: succeed(mode.store.ready), 10, "ready (watches and flags read)")
        site, root, agents = proxy_site(mode.store, mode.verifier, reactor)
        from twisted.internet.endpoints import TCP4ServerEndpoint
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        test.addCleanup(port.stopListening)
        test.addCleanup(agents.close)
        pool = HTTPConnectionPool(reactor, persistent=False)
        url = f"http://127.0.0.1:{port.getHost().port}/namespaces/{self.namespace}/connectors/harbor/x"

        async def code(token: str) -> int:
            headers: dict[bytes | str, bytes | str] = {"Authorization": f"Bearer {token}"}
            response = await treq.get(url, headers=headers, pool=pool)
            await treq.content(response)
            return int(response.code)

        def verdict(token: str, expected: int) -> Callable[[], Deferred[bool]]:
            return lambda: Deferred.fromCoroutine(_is(code(token), expected))

        test.assertEqual(await code(self.plain), 200)
        test.assertEqual(await code(self.in_pod), 200)
        # On: get connectors alone no longer does.
        await self.flag("true")
        took_on = await until(verdict(self.plain, 403), FLAG_DEADLINE, "flag on -> 403")
        test.assertEqual(await code(self.in_pod), 403)
        # The pod-scoped grant lets the pod's token through, not the other.
        await self.grant_pod()
        await until(verdict(self.in_pod, 200), 10, "pod-scoped grant")
        test.assertEqual(await code(self.plain), 403)
        # Off again (the ConfigMap deleted): back to get connectors alone.
        await self.flag(None)
        took_off = await until(verdict(self.plain, 200), FLAG_DEADLINE, "flag off -> 200")
        log.info("permissions flag applied {on:.3f} s (on) and {off:.3f} s (off) after the change",
                 on=took_on, off=took_off)
        return took_on, took_off


class FlagAtRunTimeTests(TestCase):
    """Checklist 12: changing C{connectors-config} changes the verdict within 2 s, with no restart."""

    timeout = 60

    def test_fake_api_server(self) -> Deferred[None]:
        async def go() -> None:
            fake, server = start_fake_kube(self, reactor, bookmark_interval=0.5)
            ns = lambda name: {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}  # noqa: E731
            fake.apply(ns("team"), ns("connectors-system"))
            with open(os.path.join(ROOT, "k8s", "rbac.yaml")) as f:
                fake.apply(*[d for d in yaml.safe_load_all(f) if d and d["kind"] != "ServiceAccount"])
            proxy_token = secrets.token_hex(16)
            fake.add_token(proxy_token, PROXY_SA, groups=["system:serviceaccounts",
                                                          "system:serviceaccounts:connectors-system"])
            user = sa("team", "builder")
            groups = ["system:serviceaccounts", "system:serviceaccounts:team"]
            plain, in_pod = "plain-" + secrets.token_hex(8), "pod-" + secrets.token_hex(8)
            fake.add_token(plain, user, uid="u1", groups=groups)
            fake.add_token(in_pod, user, uid="u1", groups=groups)
            # A bound token names its Pod in user.extra, as the real TokenReview does.
            stored = fake._tokens[in_pod]
            fake._tokens[in_pod] = evolve(stored, user=evolve(stored.user, extra={
                "authentication.kubernetes.io/pod-name": ("build-1",)}))
            fake.allow(user=user, verbs=["get"], api_groups=["connectors.alauda.io"], resources=["connectors"],
                       namespace="team", names=["harbor"])
            tool = Recorder()
            tool_port = await listen(self, tool)
            fake.apply(
                {"apiVersion": "connectors.alauda.io/v1alpha1", "kind": "ConnectorClass", "metadata": {"name": "rest"},
                 "spec": {"auth": {"types": [{"name": "basicAuth", "secretType": "kubernetes.io/basic-auth"}]}}},
                {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/basic-auth",
                 "metadata": {"name": "creds", "namespace": "team"},
                 "stringData": {"username": "robot", "password": secrets.token_hex(8)}},
                connector("team", "harbor", "rest", f"http://127.0.0.1:{tool_port}", secret="creds"),
            )
            path = server.write_kubeconfig(self.mktemp() + ".kubeconfig", token=proxy_token,
                                           namespace="connectors-system")
            mode = ClusterMode(reactor, load_kubeconfig(path), Store(), flags_namespace="connectors-system",
                               write=False)
            mode.startService()
            self.addCleanup(mode.stopService)

            async def flag(value: str | None) -> None:
                if value is None:
                    fake.remove("configmaps", "connectors-system", "connectors-config")
                else:
                    fake.apply(config_map(**{PROXY_PERMISSIONS: value}))

            async def grant_pod() -> None:
                fake.allow(user=user, verbs=["*"], api_groups=["connectors.alauda.io"],
                           resources=["connectors/proxy/v1/pod/team/build-1"], namespace="team", names=["harbor"])

            took = await FlagScenario(self, mode, plain, in_pod, flag, grant_pod).run()
            self.assertLess(max(took), FLAG_DEADLINE)
            for request in tool.requests:
                self.assertNotIn(plain.encode(), b"".join(v for values in request.values() for v in values))
        return Deferred.fromCoroutine(go())


class FlagAtRunTimeRealTests(RealClusterCase):
    """The same against the real kube-apiserver: real bound tokens (TokenRequest for a Pod), real RBAC."""

    def test_real_api_server(self) -> Deferred[None]:
        async def go() -> None:
            tool_port = await listen(self, Recorder())
            await self.seed("harbor", address=f"http://127.0.0.1:{tool_port}")
            await self.service_account("builder", {"connectors": ["harbor"]})
            pod = await self.admin("POST", f"/api/v1/namespaces/{self.ns}/pods", {
                "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "build-1"},
                "spec": {"serviceAccountName": "builder", "containers": [{"name": "c", "image": "busybox"}]}})
            plain = await self.csi_token("builder")
            reply = await self.kube.call("POST", f"/api/v1/namespaces/{self.ns}/serviceaccounts/builder/token", {
                "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"audiences": [API_AUDIENCE], "expirationSeconds": 1800,
                         "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": "build-1",
                                            "uid": pod["metadata"]["uid"]}}})
            self.assertEqual(reply.code, 201, reply.body)
            in_pod = reply.body["status"]["token"]
            cm_path = f"/api/v1/namespaces/{PROXY_NAMESPACE}/configmaps"
            self.addCleanup(lambda: Deferred.fromCoroutine(
                self.kube.call("DELETE", f"{cm_path}/connectors-config")))
            mode = self.start_mode(flags_namespace=PROXY_NAMESPACE, write=False)

            async def flag(value: str | None) -> None:
                if value is None:
                    await self.admin("DELETE", f"{cm_path}/connectors-config")
                else:
                    cm = config_map(**{PROXY_PERMISSIONS: value})
                    await self.admin("POST", cm_path, cm)

            async def grant_pod() -> None:
                name = "builder-pod"
                await self.admin("POST", f"{RBAC}/namespaces/{self.ns}/roles", {
                    "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": name},
                    "rules": [{"apiGroups": ["connectors.alauda.io"],
                               "resources": [f"connectors/proxy/v1/pod/{self.ns}/build-1"],
                               "resourceNames": ["harbor"], "verbs": ["*"]}]})
                await self.admin("POST", f"{RBAC}/namespaces/{self.ns}/rolebindings", {
                    "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": name},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                    "subjects": [{"kind": "ServiceAccount", "name": "builder", "namespace": self.ns}]})

            took = await FlagScenario(self, mode, plain, in_pod, flag, grant_pod, self.ns).run()
            self.assertLess(max(took), FLAG_DEADLINE)
        return Deferred.fromCoroutine(go())


async def _is(value: Any, expected: Any) -> bool:
    return bool(await value == expected)
