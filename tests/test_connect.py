"""
C{CONNECT} through the proxy (SPEC sections 4 and 5, UPSTREAM-COMPAT section 5):
HTTPS forward proxying for tools that only know C{https_proxy}.

Real clients (curl, git, skopeo, podman) hold only their own token and
reach real TLS upstreams on loopback (nginx over HTTPS serving files behind
Basic authentication; nginx over HTTPS in front of git-http-backend, and of
a token-auth docker-registry and its token server), through the proxy on a
plain listener, on a C{cptls:} listener (TLS in TLS), and as the daemon:

- to a listed Connector's origin, the tunnel is intercepted: the client
  verifies a certificate for the host it asked for, minted from the proxy
  CA, and its requests inside get the Connector's credentials, routed per
  request by the Connector's address prefix;
- to an origin under no listed Connector, it is a plain byte tunnel
  (C{--forward-unlisted allow}: the upstream's own certificate, and no
  credential arrives) or 403 (C{deny});
- hostile clients: no credentials (407 with a challenge), loopback and
  link-local targets, the proxy itself, an SNI other than the C{CONNECT}
  host, plain text inside a tunnel, a ClientHello sent before the 200, many
  idle tunnels (closed by the idle timeout), a reader that stalls
  mid-download (the proxy's memory stays flat).

Canary credentials never reach a client or a log, and the client token
never reaches an upstream.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import socket
import ssl
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from attrs import define
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from connectors_proxy.auth.identity import StaticTokens, parse_token_file
from connectors_proxy.model.state import Snapshot, Store
from connectors_proxy.server.connect import ConnectContext, inner_target, parse_authority
from connectors_proxy.server.routing import BadTarget
from connectors_proxy.sources.manifests import parse_documents
from connectors_proxy.tap import proxy_site
from connectors_proxy.tls.intercept import InterceptTLS
from connectors_proxy.tls.mint import CertificateAuthority
from connectors_proxy.upstream.forward import ForwardAgents, ForwardGuard
from tests.support.gitserver import fresh_home, git_env, has_secret, start_git_server
from tests.support.hosts import with_private_hosts
from tests.support.nginx import start_nginx_server
from tests.support.procs import Server, check, free_port, require, run, start_server
from tests.support.proxy import (
    ROOT,
    LogCapture,
    basic_secret,
    capture_logs,
    connector,
    connector_class,
    json_lines,
    manifests_text,
    sa,
    secret,
    start_proxy_process,
    token_file_text,
    write_setup,
)
from tests.support.registry import Podman, TokenServer, build_image, skopeo, start_registry_trusting
from tests.support.waiting import eventually

NS = "ns1"

# ------------------------------------------------------------------ pure parts


class ParseAuthorityTests(SynchronousTestCase):
    def test_forms(self) -> None:
        self.assertEqual(parse_authority(b"Example.COM:443"), ("example.com", 443))
        self.assertEqual(parse_authority(b"example.com.:8443"), ("example.com", 8443))
        self.assertEqual(parse_authority(b"10.0.0.1:443"), ("10.0.0.1", 443))
        self.assertEqual(parse_authority(b"[::1]:443"), ("::1", 443))
        self.assertEqual(parse_authority(b"[2001:DB8::1]:443"), ("2001:db8::1", 443))

    def test_refused(self) -> None:
        for target in (b"example.com", b"example.com:", b"example.com:0", b"example.com:65536",
                       b"https://example.com:443", b"/path", b"user@example.com:443", b"exa mple.com:443",
                       b"[::1:443", b"[nothost]:443", b"example.com:443/x", b"a..b:443", b"\xff:443",
                       b"example.com:+443"):
            self.assertRaises(BadTarget, parse_authority, target)


class InnerTargetTests(SynchronousTestCase):
    """Requests inside an intercepted tunnel are routed as absolute-form requests to its origin."""

    connect = ConnectContext("git.example.com", 443, b"Basic x")

    def test_origin_form(self) -> None:
        self.assertEqual(inner_target(self.connect, b"/a/b?c=1", b"git.example.com"),
                         b"https://git.example.com:443/a/b?c=1")
        self.assertEqual(inner_target(self.connect, b"/", b"GIT.example.com:443"), b"https://git.example.com:443/")
        self.assertEqual(inner_target(self.connect, b"/", None), b"https://git.example.com:443/")

    def test_absolute_form_same_origin(self) -> None:
        self.assertEqual(inner_target(self.connect, b"https://git.example.com/x", b"git.example.com"),
                         b"https://git.example.com:443/x")

    def test_elsewhere_refused(self) -> None:
        """A request that names another origin must not get credentials chosen for this one."""
        for uri, host in ((b"https://other.example.com/x", b"git.example.com"),
                          (b"http://git.example.com/x", b"git.example.com"),
                          (b"/x", b"other.example.com"), (b"/x", b"git.example.com:8443"),
                          (b"/x", b"git.example.com:x")):
            self.assertRaises(BadTarget, inner_target, self.connect, uri, host)

    def test_ip(self) -> None:
        connect = ConnectContext("::1", 8443, None)
        self.assertEqual(connect.origin, b"https://[::1]:8443")
        self.assertEqual(inner_target(connect, b"/x", b"[::1]:8443"), b"https://[::1]:8443/x")
        self.assertRaises(BadTarget, inner_target, connect, b"/x", b"[::2]:8443")


class InterceptTLSTests(SynchronousTestCase):
    def test_minted_per_host(self) -> None:
        """One certificate per host, cached, for a DNS name or an IP address, from the files' CA."""
        from cryptography import x509

        folder = self.mktemp()
        os.makedirs(folder)
        ca = CertificateAuthority.generate("unit CA", time.time())
        paths = write_ca(folder, ca)
        from twisted.internet.task import Clock
        clock = Clock()
        clock.advance(time.time())
        intercept = InterceptTLS(paths["ca.crt"], paths["ca.key"], clock)
        self.assertEqual(intercept.ca_pem(), ca.cert_pem())
        first = intercept.context_for("git.example.com")
        self.assertIs(intercept.context_for("git.example.com"), first)
        intercept.context_for("10.1.2.3")
        leaves = intercept.tls.leaves
        assert leaves is not None
        leaf, _ = leaves.get(("10.1.2.3",))
        san = leaf.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual([str(a) for a in san.get_values_for_type(x509.IPAddress)], ["10.1.2.3"])
        self.assertEqual(leaf.certificate.issuer, ca.certificate.subject)
        lifetime = leaf.not_after - leaf.not_before
        self.assertLess(lifetime.total_seconds(), 2 * 86400)
        # A new CA on disk: the next handshake uses it.
        other = CertificateAuthority.generate("rotated CA", time.time())
        write_ca(folder, other)
        self.assertTrue(intercept.reload())
        self.assertEqual(intercept.ca_pem(), other.cert_pem())
        self.assertIsNot(intercept.context_for("git.example.com"), first)


# ------------------------------------------------------------------ fixtures


def write_ca(folder: str, ca: CertificateAuthority) -> dict[str, str]:
    paths = {"ca.crt": os.path.join(folder, "ca.crt"), "ca.key": os.path.join(folder, "ca.key")}
    for name, data in (("ca.crt", ca.cert_pem()), ("ca.key", ca.key_pem())):
        with open(paths[name] + ".tmp", "wb") as f:
            f.write(data)
        os.replace(paths[name] + ".tmp", paths[name])
    return paths


@define
class Proxy:
    """The proxy in the test's reactor, with an intercepting CA."""

    port: int
    store: Store
    tokens: StaticTokens
    logs: LogCapture
    root: Any
    site: Any
    ca_path: str
    ca: CertificateAuthority

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_objects(self, objects: Iterable[Mapping[str, Any]]) -> None:
        self.store.replace(Snapshot.of(parse_documents(manifests_text(objects), "<test>")))

    def set_tokens(self, tokens: Mapping[str, str]) -> None:
        self.tokens.table = parse_token_file(token_file_text(tokens))

    def access(self) -> list[dict[str, Any]]:
        return self.logs.access()


async def start_connect_proxy(test: TestCase, objects: Iterable[Mapping[str, Any]], tokens: Mapping[str, str],
                              idle_timeout: float = 60.0, forward_unlisted: str = "allow",
                              exempt: Iterable[tuple[str, int]] = (),
                              endpoint: str = "tcp:0:interface=127.0.0.1") -> Proxy:
    """
    The proxy (as the daemon builds it) with a fresh CA for interception,
    on a loopback port.  C{exempt}: loopback addresses its forward-proxy
    guard lets through (the stand-ins for the internet).
    """
    folder = os.path.abspath(test.mktemp())
    os.makedirs(folder)
    ca = CertificateAuthority.generate("connect test CA " + secrets.token_hex(3), time.time())
    paths = write_ca(folder, ca)
    store = Store()
    verifier = StaticTokens({})
    logs = capture_logs(test)
    intercept = InterceptTLS(paths["ca.crt"], paths["ca.key"], reactor)
    site, root, agents = proxy_site(store, verifier, reactor, idle_timeout=idle_timeout,
                                    forward_unlisted=forward_unlisted, intercept=intercept)
    forward = ForwardAgents(reactor, guard=ForwardGuard(exempt=frozenset(exempt)))
    root.forward_agents = forward
    port: Any = await serverFromString(reactor, endpoint).listen(site)
    proxy = Proxy(port.getHost().port, store, verifier, logs, root, site, paths["ca.crt"], ca)
    proxy.set_objects(objects)
    proxy.set_tokens(tokens)

    async def stop() -> None:
        await port.stopListening()
        for channel in list(site.channels):
            channel.transport.abortConnection()
        await agents.close()
        await forward.close()
        await deferLater(reactor, 0, lambda: None)

    test.addCleanup(lambda: Deferred.fromCoroutine(stop()))
    return proxy


_HTTPS_LOG_FIELDS = ("request_method", "request_uri", "status", "http_authorization", "http_host",
                     "http_x_forwarded_proto", "body_bytes_sent", "ssl_server_name")

_HTTPS = """\
    keepalive_requests 100000;
    types {{ application/octet-stream bin; text/plain txt; }}
    ssl_certificate {tmp}/server.crt;
    ssl_certificate_key {tmp}/server.key;
    server {{
        listen 127.0.0.1:{port} ssl;
        root {root};
        location /basic/ {{
            auth_basic "fixture";
            auth_basic_user_file {tmp}/htpasswd;
        }}
        location /open/ {{ }}
    }}
{git}"""

_FRONT = """\
    server {{
        listen 127.0.0.1:{port} ssl;
        location / {{
            proxy_pass http://127.0.0.1:{git_port};
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-Proto https;
            proxy_request_buffering off;
            proxy_buffering off;
        }}
    }}
"""


@define
class HTTPSUpstream:
    """nginx over HTTPS: C{/basic/} behind canary Basic credentials, C{/open/} anonymous; optionally git."""

    server: Server
    port: int
    tmp: str
    root: str
    username: str
    password: str
    ca: CertificateAuthority
    #: The TLS fronts' ports, one per backend given to L{start_https_upstream}.
    fronts: tuple[int, ...] = ()

    @property
    def ca_pem(self) -> str:
        return self.ca.cert_pem().decode()

    def requests(self, at_least: int = 0) -> list[dict[str, str]]:
        deadline = time.monotonic() + 3
        while True:
            with open(os.path.join(self.tmp, "access.log")) as f:
                entries = [dict(zip(_HTTPS_LOG_FIELDS, ("" if v == "-" else v for v in line.rstrip("\n").split("\t")),
                                    strict=True)) for line in f if line.strip()]
            if len(entries) >= at_least or time.monotonic() > deadline:
                return entries
            time.sleep(0.02)

    def write_file(self, relative: str, data: bytes) -> None:
        path = os.path.join(self.root, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


async def start_https_upstream(test: TestCase, backends: Sequence[int] = (),
                               names: Sequence[str] = ("localhost", "127.0.0.1")) -> HTTPSUpstream:
    """
    nginx over HTTPS with a certificate for C{names} from a CA of its own;
    for each of C{backends}, also a TLS front (in C{fronts} of the result)
    for the plain-HTTP server on that loopback port (git-http-backend, a
    registry, its token server).
    """
    tmp = os.path.abspath(test.mktemp())
    root = os.path.join(tmp, "www")
    os.makedirs(root)
    ca = CertificateAuthority.generate("upstream CA " + secrets.token_hex(3), time.time())
    leaf = ca.mint(list(names), time.time())
    for name, data in (("server.crt", leaf.cert_pem()), ("server.key", leaf.key_pem())):
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(data)
    username, password = "user-" + secrets.token_hex(4), "canary-" + secrets.token_hex(16)
    check(await run([require("htpasswd"), "-bc", os.path.join(tmp, "htpasswd"), username, password]))
    open(os.path.join(tmp, "access.log"), "w").close()
    port = free_port()
    fronts = tuple(free_port() for _ in backends)
    git = "".join(_FRONT.format(port=front, git_port=backend) for front, backend in zip(fronts, backends, strict=True))
    server = await start_nginx_server(test, tmp, port, _HTTPS_LOG_FIELDS,
                                      _HTTPS.format(tmp=tmp, root=root, port=port, git=git))
    upstream = HTTPSUpstream(server, port, tmp, root, username, password, ca, fronts)
    for sub in ("basic", "open"):
        upstream.write_file(f"{sub}/small.txt", b"hello from " + sub.encode() + b"\n")
    return upstream


def upstream_objects(upstream: HTTPSUpstream, *connectors: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        connector_class("rest"),
        basic_secret(NS, "creds", upstream.username, upstream.password),
        secret(NS, "upstream-ca", "Opaque", **{"ca.crt": upstream.ca_pem}),
        *connectors,
    ]


CURL_ENV = {"http_proxy": "", "https_proxy": "", "HTTPS_PROXY": "", "all_proxy": "", "no_proxy": "", "NO_PROXY": "",
            "CURL_CA_BUNDLE": "", "SSL_CERT_FILE": ""}


@define
class CurlResult:
    exit: int
    connect_code: int
    code: int
    body: bytes
    stderr: bytes


async def curl(*args: str) -> CurlResult:
    """curl through the proxy; the CONNECT's status (C{%{http_connect}}) and the response's."""
    result = await run([require("curl"), "-sS", "--max-time", "30", "-w", "\n%{http_connect} %{http_code}", *args],
                       env=CURL_ENV)
    body, _, codes = result.stdout.rpartition(b"\n")
    connect_code, code = (int(c) for c in codes.split())
    return CurlResult(result.returncode, connect_code, code, body, result.stderr)


def proxy_user(token: str, *connectors: str) -> str:
    return ",".join(c.replace("/", "%2F") for c in connectors) + ":" + token


def no_canary(test: TestCase, outputs: Sequence[bytes | str], *canaries: str) -> None:
    for canary in canaries:
        test.assertFalse(has_secret(list(outputs), canary), "a canary credential leaked")


# ------------------------------------------------------------------ raw clients (blocking, in a thread)


def _read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def raw_connect(port: int, target: str, authorization: str | None) -> tuple[socket.socket, bytes]:
    """Send C{CONNECT target} to the proxy; the socket and the response head."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
    if authorization is not None:
        head += f"Proxy-Authorization: {authorization}\r\n"
    sock.sendall(head.encode() + b"\r\n")
    return sock, _read_head(sock)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# ------------------------------------------------------------------ real clients


class InterceptTests(TestCase):
    """curl with C{-x} and C{--proxy-user NS%2FNAME:TOKEN} to an HTTPS upstream that is a listed Connector's."""

    timeout = 120

    async def _curl(self) -> None:
        upstream = await start_https_upstream(self)
        token, other = "client-" + secrets.token_hex(16), "other-" + secrets.token_hex(16)
        host = f"localhost:{upstream.port}"
        proxy = await start_connect_proxy(self, upstream_objects(
            upstream,
            connector(NS, "api", "rest", f"https://{host}/basic", secret="creds",
                      caCertSecretRef={"name": "upstream-ca"}),
            connector(NS, "byip", "rest", f"https://127.0.0.1:{upstream.port}/basic", secret="creds",
                      caCertSecretRef={"name": "upstream-ca"}),
        ), {token: sa(NS), other: sa("elsewhere")}, forward_unlisted="deny")
        ca = ["--cacert", proxy.ca_path]
        via = ["-x", proxy.url, "--proxy-user", proxy_user(token, f"{NS}/api")]
        outputs: list[bytes] = []

        # Intercepted: our certificate for the host, the Connector's credentials upstream.
        r = await curl(*via, *ca, "-v", f"https://{host}/basic/small.txt")
        outputs += [r.body, r.stderr]
        self.assertEqual((r.exit, r.connect_code, r.code), (0, 200, 200), r.stderr)
        self.assertEqual(r.body, b"hello from basic\n")
        self.assertIn(b"< HTTP/1.1 200 Connection established\r\n< \r\n", r.stderr)
        self.assertIn(f"issuer: {proxy.ca.certificate.subject.rfc4514_string()}".encode(), r.stderr)
        self.assertIn(b'subjectAltName: host "localhost" matched', r.stderr)
        self.assertIn(b"ALPN: server accepted http/1.1", r.stderr)
        # Keep-alive inside the tunnel: two requests, one CONNECT.
        r = await curl(*via, *ca, "-v", f"https://{host}/basic/small.txt", f"https://{host}/basic/small.txt")
        outputs += [r.body, r.stderr]
        self.assertEqual((r.exit, r.code), (0, 200), r.stderr)
        self.assertEqual(r.body.count(b"hello from basic\n"), 2)
        self.assertEqual(r.stderr.count(b"> CONNECT localhost"), 1, "one tunnel for both requests")
        entries = upstream.requests(at_least=3)
        self.assertEqual([(e["request_uri"], e["status"]) for e in entries],
                         [("/basic/small.txt", "200")] * 3)
        self.assertTrue(all(e["http_authorization"].startswith("Basic ") for e in entries))
        self.assertEqual(entries[-1]["http_x_forwarded_proto"], "https")

        # The access log: the requests inside (mode connect), then the CONNECT when its tunnel closed.
        access = [a for a in proxy.access()]
        inner = [a for a in access if a.get("mode") == "connect"]
        self.assertEqual([(a["method"], a["path"], a["status"], a["namespace"], a["connector"], a["protocol"])
                          for a in inner], [("GET", "/basic/small.txt", 200, NS, "api", "http")] * 3)
        await eventually(lambda: len([a for a in proxy.access() if a.get("mode") == "tunnel"]) >= 2,
                         what="the CONNECT lines, written when their tunnels close")
        tunnels = [a for a in proxy.access() if a.get("mode") == "tunnel"]
        self.assertEqual([(a["method"], a["path"], a["status"], a["protocol"], a["connector"]) for a in tunnels],
                         [("CONNECT", host, 200, "connect", "api")] * 2)

        # An IP address: the certificate carries it as an IP SAN.
        r = await curl("-x", proxy.url, "--proxy-user", proxy_user(token, f"{NS}/byip"), *ca,
                       f"https://127.0.0.1:{upstream.port}/basic/small.txt")
        outputs += [r.body, r.stderr]
        self.assertEqual((r.exit, r.code, r.body), (0, 200, b"hello from basic\n"), r.stderr)

        # Without the proxy CA, curl refuses the minted certificate.
        r = await curl(*via, f"https://{host}/basic/small.txt")
        outputs += [r.body, r.stderr]
        self.assertEqual(r.exit, 60, r.stderr)
        self.assertIn(b"certificate", r.stderr)

        # Inside the tunnel, a path outside the Connector's address prefix is unlisted: denied here.
        r = await curl(*via, *ca, f"https://{host}/open/small.txt")
        outputs += [r.body, r.stderr]
        self.assertEqual((r.connect_code, r.code), (200, 403), r.stderr)
        self.assertIn(b"is not the address of a Connector you listed", r.body)

        # Identity: none (407 with the challenge), unknown (407), not allowed on the Connector (403).
        r = await curl("-x", proxy.url, "-v", *ca, f"https://{host}/basic/small.txt")
        self.assertEqual(r.connect_code, 407, r.stderr)
        self.assertIn(b'Proxy-Authenticate: Basic realm="connectors-proxy"', r.stderr)
        r = await curl("-x", proxy.url, "--proxy-user", proxy_user("nope", f"{NS}/api"), *ca,
                       f"https://{host}/basic/small.txt")
        self.assertEqual(r.connect_code, 407, r.stderr)
        r = await curl("-x", proxy.url, "--proxy-user", proxy_user(other, f"{NS}/api"), *ca,
                       f"https://{host}/basic/small.txt")
        self.assertEqual(r.connect_code, 403, r.stderr)
        # Listed, but not the Connector of that origin: --forward-unlisted deny.
        r = await curl("-x", proxy.url, "--proxy-user", proxy_user(token, f"{NS}/byip"), *ca,
                       f"https://{host}/basic/small.txt")
        self.assertEqual(r.connect_code, 403, r.stderr)

        self.assertEqual(len(upstream.requests()), 4, "refused tunnels never reached the upstream")
        no_canary(self, [*outputs, proxy.logs.text()], upstream.password)
        for entry in upstream.requests():
            self.assertNotIn(token, entry["http_authorization"])

    def test_curl(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._curl())


class PlainTunnelTests(TestCase):
    """A CONNECT to an origin under no listed Connector: bytes relayed untouched, or 403."""

    timeout = 120

    async def _tunnel(self) -> None:
        upstream = await start_https_upstream(self)
        token = "client-" + secrets.token_hex(16)
        # The Connector is at localhost:PORT; 127.0.0.1:PORT is another origin, reached by a plain tunnel.
        objects = upstream_objects(upstream, connector(NS, "api", "rest", f"https://localhost:{upstream.port}/basic",
                                                       secret="creds", caCertSecretRef={"name": "upstream-ca"}))
        proxy = await start_connect_proxy(self, objects, {token: sa(NS)},
                                          exempt=[("127.0.0.1", upstream.port)])
        upstream_ca = os.path.join(upstream.tmp, "upstream-ca.crt")
        with open(upstream_ca, "w") as f:
            f.write(upstream.ca_pem)
        target = f"https://127.0.0.1:{upstream.port}"
        via = ["-x", proxy.url, "--proxy-user", proxy_user(token, f"{NS}/api")]
        outputs: list[bytes] = []

        # The upstream's own certificate (not intercepted): the upstream CA verifies it, the proxy CA does not.
        r = await curl(*via, "--cacert", upstream_ca, "-v", f"{target}/open/small.txt")
        outputs += [r.body, r.stderr]
        self.assertEqual((r.exit, r.connect_code, r.code, r.body), (0, 200, 200, b"hello from open\n"), r.stderr)
        self.assertIn(f"issuer: {upstream.ca.certificate.subject.rfc4514_string()}".encode(), r.stderr)
        r = await curl(*via, "--cacert", proxy.ca_path, f"{target}/open/small.txt")
        self.assertEqual(r.exit, 60, r.stderr)
        # No credentials: the upstream asks for them, and its log shows none arrived.
        r = await curl(*via, "--cacert", upstream_ca, f"{target}/basic/small.txt")
        outputs += [r.body, r.stderr]
        self.assertEqual(r.code, 401, r.stderr)
        entries = upstream.requests(at_least=2)
        self.assertEqual([(e["request_uri"], e["status"], e["http_authorization"]) for e in entries],
                         [("/open/small.txt", "200", ""), ("/basic/small.txt", "401", "")])
        await eventually(lambda: len([a for a in proxy.access()
                                      if a.get("mode") == "tunnel" and a["status"] == 200]) >= 3,
                         what="the tunnels' lines, written when they close")
        tunnels = [a for a in proxy.access() if a.get("mode") == "tunnel" and a["status"] == 200]
        self.assertEqual(len(tunnels), 3)
        self.assertEqual({(a["connector"], a["protocol"]) for a in tunnels}, {("-", "forward")})
        self.assertTrue(all(a["bytes_in"] > 300 and a["bytes_out"] > 1000 for a in tunnels), tunnels)
        self.assertFalse([a for a in proxy.access() if a.get("mode") == "connect"], "nothing was intercepted")

        # Loopback without an exemption, link-local, the proxy itself: 403 before connecting.
        for where in (f"127.0.0.2:{upstream.port}", "169.254.169.254:443", f"127.0.0.1:{proxy.port}",
                      f"localhost:{proxy.port}", "[::1]:443"):
            r = await curl(*via, f"https://{where}/")
            outputs += [r.body, r.stderr]
            self.assertEqual(r.connect_code, 403, (where, r.stderr))
        # Nothing listens there: 502 naming the target.
        closed = free_port()
        proxy.root.forward_agents.guard = ForwardGuard(exempt=frozenset({("127.0.0.1", closed)}))
        sock, head = await threads.deferToThread(raw_connect, proxy.port, f"127.0.0.1:{closed}",
                                                 basic(f"{NS}/api", token))
        sock.close()
        self.assertTrue(head.startswith(b"HTTP/1.1 502 "), head)
        self.assertIn(f"cannot connect to 127.0.0.1:{closed}".encode(), head)

        # --forward-unlisted deny: no tunnel at all.
        proxy.root.forward_unlisted = "deny"
        r = await curl(*via, "--cacert", upstream_ca, f"{target}/open/small.txt")
        self.assertEqual(r.connect_code, 403, r.stderr)
        self.assertEqual(len(upstream.requests()), 2)
        no_canary(self, [*outputs, proxy.logs.text()], upstream.password)

    def test_tunnel(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._tunnel())


def _tls_client(port: int, target: str, authorization: str, server_name: str, ca_file: str) -> str:
    """CONNECT, then TLS with C{server_name} as SNI: C{"ok"} or the client's error."""
    sock, head = raw_connect(port, target, authorization)
    if not head.startswith(b"HTTP/1.1 200 "):
        sock.close()
        return head.decode("latin-1")
    context = ssl.create_default_context(cafile=ca_file)
    context.check_hostname = False
    try:
        with context.wrap_socket(sock, server_hostname=server_name) as tls:
            tls.sendall(b"GET /basic/small.txt HTTP/1.1\r\nHost: " + target.encode() + b"\r\n\r\n")
            return "ok " + tls.recv(65536).decode("latin-1")
    except (ssl.SSLError, OSError) as e:
        return f"{e.__class__.__name__}: {e}"


def _plain_inside(port: int, target: str, authorization: str) -> bytes:
    sock, head = raw_connect(port, target, authorization)
    with sock:
        if not head.startswith(b"HTTP/1.1 200 "):
            return head
        sock.sendall(b"GET /basic/small.txt HTTP/1.1\r\nHost: " + target.encode() + b"\r\n\r\n")
        data = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return data
            data += chunk


def _pipelined(port: int, target: str, authorization: str | None, ca_file: str) -> tuple[bytes, bytes]:
    """
    CONNECT and the TLS ClientHello in one write, without waiting for the
    200 (as some clients do); then a GET inside.  The proxy's answer to
    the CONNECT, and what came back inside (or after it).
    """
    context = ssl.create_default_context(cafile=ca_file)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=target.rsplit(":", 1)[0])
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
    if authorization is not None:
        head += f"Proxy-Authorization: {authorization}\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(head.encode() + b"\r\n" + outgoing.read())
        answer = _read_head(sock)
        connect, _, rest = answer.partition(b"\r\n\r\n")
        if not connect.startswith(b"HTTP/1.1 200 "):
            while chunk := sock.recv(4096):
                rest += chunk
            return connect, rest
        incoming.write(rest)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                incoming.write(sock.recv(65536))
        tls.write(f"GET /basic/small.txt HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n".encode())
        sock.sendall(outgoing.read())
        inside = b""
        while True:
            try:
                data = tls.read(65536)
                if not data:
                    return connect, inside
                inside += data
            except ssl.SSLWantReadError:
                chunk = sock.recv(65536)
                if not chunk:
                    return connect, inside
                incoming.write(chunk)
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return connect, inside


class HostileTests(TestCase):
    """What hostile or broken clients get from CONNECT."""

    timeout = 180

    async def _hostile(self) -> None:
        upstream = await start_https_upstream(self)
        token = "client-" + secrets.token_hex(16)
        target = f"localhost:{upstream.port}"
        proxy = await start_connect_proxy(self, upstream_objects(upstream, connector(
            NS, "api", "rest", f"https://{target}/basic", secret="creds",
            caCertSecretRef={"name": "upstream-ca"})), {token: sa(NS)}, idle_timeout=3,
            exempt=[("127.0.0.1", upstream.port)])
        auth = basic(f"{NS}/api", token)

        # No credentials: 407 with the challenge, and the connection can carry the retry.
        sock, head = await threads.deferToThread(raw_connect, proxy.port, target, None)
        self.assertTrue(head.startswith(b"HTTP/1.1 407 "), head)
        self.assertIn(b'Proxy-Authenticate: Basic realm="connectors-proxy"', head)
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nProxy-Authorization: {auth}\r\n\r\n".encode())
        retry = await threads.deferToThread(_read_head, sock)
        self.assertEqual(retry, b"HTTP/1.1 200 Connection established\r\n\r\n")
        sock.close()

        # The ClientHello sent with the CONNECT, before its 200: kept for the tunnel, never parsed as HTTP.
        connect, inside = await threads.deferToThread(_pipelined, proxy.port, target, auth, proxy.ca_path)
        self.assertEqual(connect, b"HTTP/1.1 200 Connection established")
        self.assertTrue(inside.startswith(b"HTTP/1.1 200 OK\r\n"), inside)
        self.assertTrue(inside.endswith(b"hello from basic\n"), inside)
        # Refused so: the bytes after it are not a next request; the connection closes after the 407.
        connect, after = await threads.deferToThread(_pipelined, proxy.port, target, None, proxy.ca_path)
        self.assertTrue(connect.startswith(b"HTTP/1.1 407 "), connect)
        self.assertTrue(after.endswith(b"CONNECT needs 'Proxy-Authorization: Basic base64(NAMESPACE/CONNECTOR:TOKEN)'\n"),
                        after)

        # A TLS client asking for another name than its CONNECT did: a failed handshake, no certificate.
        refused = proxy.root.intercept.refused_names
        result = await threads.deferToThread(_tls_client, proxy.port, target, auth, "evil.example.com",
                                             proxy.ca_path)
        self.assertTrue(result.startswith("SSLError"), result)
        self.assertIn("alert", result)
        self.assertEqual(proxy.root.intercept.refused_names, refused + 1)
        result = await threads.deferToThread(_tls_client, proxy.port, target, auth, "localhost", proxy.ca_path)
        self.assertTrue(result.startswith("ok HTTP/1.1 200 "), result)

        # Plain text inside an intercepted tunnel: a 400 that says why.
        answer = await threads.deferToThread(_plain_inside, proxy.port, target, auth)
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer)
        self.assertIn(b"expects TLS", answer)

        # Odd CONNECT targets.
        for bad in ("localhost", f"https://{target}", "/x"):
            sock, head = await threads.deferToThread(raw_connect, proxy.port, bad, auth)
            sock.close()
            self.assertTrue(head.startswith(b"HTTP/1.1 400 "), (bad, head))

        # Many idle tunnels (intercepted, and a few plain ones) do not stop others, and the idle timeout
        # closes them.
        many = 200

        def open_idle() -> list[socket.socket]:
            socks = []
            for i in range(many):
                where = f"127.0.0.1:{upstream.port}" if i % 20 == 0 else target
                s, h = raw_connect(proxy.port, where, auth)
                assert h.startswith(b"HTTP/1.1 200 "), h
                socks.append(s)
            return socks

        idle = await threads.deferToThread(open_idle)
        try:
            started = time.monotonic()
            r = await curl("-x", proxy.url, "--proxy-user", proxy_user(token, f"{NS}/api"), "--cacert",
                           proxy.ca_path, f"https://{target}/basic/small.txt")
            self.assertEqual((r.exit, r.code), (0, 200), r.stderr)
            self.assertLess(time.monotonic() - started, 5)

            def closed_by_proxy() -> int:
                count = 0
                for s in idle:
                    s.settimeout(10)
                    try:
                        if s.recv(1) == b"":
                            count += 1
                    except TimeoutError:
                        pass
                    except OSError:
                        count += 1
                return count

            self.assertEqual(await threads.deferToThread(closed_by_proxy), many)
            self.assertLess(time.monotonic() - started, 10, "closed by the idle timeout (3 s)")
        finally:
            for s in idle:
                s.close()
        await eventually(lambda: len(proxy.site.channels) <= 1, what="the idle connections gone from the site")
        no_canary(self, [proxy.logs.text()], upstream.password)

    def test_hostile(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._hostile())


class GitTests(TestCase):
    """C{git clone} and C{push} of the server's own https:// URL with only C{https_proxy} and the proxy CA."""

    timeout = 300

    async def _git(self) -> None:
        server = await start_git_server(self)
        first = await server.create_repo("team/app")
        upstream = await start_https_upstream(self, backends=[server.port])
        token = "client-" + secrets.token_hex(16)
        origin = f"https://localhost:{upstream.fronts[0]}"
        proxy = await start_connect_proxy(self, [
            connector_class("git", protocol="git"),
            basic_secret(NS, "git-creds", server.username, server.password),
            secret(NS, "upstream-ca", "Opaque", **{"ca.crt": upstream.ca_pem}),
            connector(NS, "repo", "git", origin, secret="git-creds", caCertSecretRef={"name": "upstream-ca"}),
        ], {token: sa(NS)})
        home = fresh_home(self)
        env = {**git_env(home), **CURL_ENV,
               "https_proxy": f"http://{proxy_user(token, f'{NS}/repo')}@127.0.0.1:{proxy.port}"}
        clone = os.path.join(home, "clone")
        # env -u: some machines export GIT_SSL_CAINFO, which beats http.sslCAInfo.
        git = ["env", "-u", "GIT_SSL_CAINFO", "git", "-c", f"http.sslCAInfo={proxy.ca_path}"]
        outputs = [check(await run([*git, "clone", f"{origin}/team/app.git", clone], env=env))]
        log = check(await run(["git", "-C", clone, "log", "--format=%H"], env=env))
        self.assertEqual(log.stdout.decode().strip(), first)
        with open(os.path.join(clone, "pushed.txt"), "wb") as f:
            f.write(os.urandom(200_000).hex().encode())
        check(await run(["git", "-C", clone, "add", "pushed.txt"], env=env))
        check(await run(["git", "-C", clone, "commit", "-q", "-m", "through CONNECT"], env=env))
        outputs.append(check(await run([*git, "-C", clone, "push", "origin", "main"], env=env)))
        pushed = check(await run(["git", "-C", clone, "rev-parse", "HEAD"], env=env)).stdout.decode().strip()
        self.assertEqual(await server.rev_parse("team/app", "main"), pushed)
        # Without the proxy CA, git refuses the minted certificate.
        failed = await run(["env", "-u", "GIT_SSL_CAINFO", "git", "ls-remote", f"{origin}/team/app.git"], env=env)
        self.assertNotEqual(failed.returncode, 0)
        self.assertIn(b"certificate", failed.stderr)

        requests = server.requests()
        self.assertIn("git-receive-pack", {r.request_uri.split("?")[0].rsplit("/", 1)[-1] for r in requests})
        self.assertTrue(all(r.remote_user == server.username for r in requests), requests)
        for r in requests:
            self.assertNotIn(token, r.http_authorization)
        modes = {(a.get("mode"), a["protocol"]) for a in proxy.access()}
        self.assertIn(("connect", "git"), modes)
        no_canary(self, [*(o.stdout for o in outputs), *(o.stderr for o in outputs), proxy.logs.text()],
                  server.password)

    def test_clone_and_push(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._git())


class DaemonTests(TestCase):
    """C{twistd -n connectors-proxy --proxy-ca-cert ... --proxy-ca-key ...}: the CA served, used, rotated."""

    timeout = 180

    async def _daemon(self) -> None:
        upstream = await start_https_upstream(self)
        token = "client-" + secrets.token_hex(16)
        target = f"localhost:{upstream.port}"
        args = write_setup(self, upstream_objects(upstream, connector(
            NS, "api", "rest", f"https://{target}/basic", secret="creds",
            caCertSecretRef={"name": "upstream-ca"})), {token: sa(NS)})
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        ca = CertificateAuthority.generate("daemon CA", time.time())
        paths = write_ca(folder, ca)
        proxy = await start_proxy_process(self, [*args, "--log-format", "json", "--proxy-ca-cert", paths["ca.crt"],
                                                 "--proxy-ca-key", paths["ca.key"]])
        published = os.path.join(folder, "published.crt")

        async def fetch_ca() -> bytes:
            check(await run([require("curl"), "-sS", "--fail", "-o", published,
                             f"http://127.0.0.1:{proxy.admin_port}/ca.crt"], env=CURL_ENV))
            with open(published, "rb") as f:
                return f.read()

        self.assertEqual(await fetch_ca(), ca.cert_pem())
        via = ["-x", proxy.url, "--proxy-user", proxy_user(token, f"{NS}/api"), "--cacert", published]
        r = await curl(*via, f"https://{target}/basic/small.txt")
        self.assertEqual((r.exit, r.code, r.body), (0, 200, b"hello from basic\n"), r.stderr)

        # A rotated CA (a Secret volume update) is published and used without a restart.
        rotated = CertificateAuthority.generate("rotated daemon CA", time.time())
        write_ca(folder, rotated)
        deadline = time.monotonic() + 10
        while await fetch_ca() != rotated.cert_pem():
            self.assertLess(time.monotonic(), deadline, "the rotated CA was not published")
            await deferLater(reactor, 0.2, lambda: None)
        r = await curl(*via, f"https://{target}/basic/small.txt")
        self.assertEqual((r.exit, r.code), (0, 200), r.stderr)

        # clientconfig fetches the published CA into the client files; their https_proxy and ca.crt work.
        token_file = os.path.join(folder, "token")
        with open(token_file, "w") as f:
            f.write(token + "\n")
        files = os.path.join(folder, "files")
        check(await run([sys.executable, "-m", "connectors_proxy.clientconfig", "files", "--connector", f"{NS}/api",
                         "--manifests", args[1], "--token-file", token_file, "--proxy", proxy.url,
                         "--ca-file", f"http://127.0.0.1:{proxy.admin_port}/ca.crt", "--dir", files],
                        env={"PYTHONPATH": ROOT}))
        with open(os.path.join(files, "ca.crt"), "rb") as f:
            self.assertEqual(f.read(), rotated.cert_pem())
        with open(os.path.join(files, ".env")) as f:
            env = dict(line.split("=", 1) for line in f.read().splitlines())
        self.assertEqual(env["https_proxy"], f"http://{proxy_user(token, f'{NS}/api')}@127.0.0.1:{proxy.port}")
        r = await curl("-x", env["https_proxy"], "--cacert", os.path.join(files, "ca.crt"),
                       f"https://{target}/basic/small.txt")
        self.assertEqual((r.exit, r.code, r.body), (0, 200, b"hello from basic\n"), r.stderr)

        def modes() -> set[Any]:
            return {line.get("mode") for line in json_lines(proxy.log()) if line.get("event") == "access"}

        # A tunnel's own access line comes once both of its sides have closed.
        await eventually(lambda: modes() >= {"connect", "tunnel"}, what="access lines of both modes")
        self.assertEqual(modes(), {"connect", "tunnel"})
        metrics = await run([require("curl"), "-sS", f"http://127.0.0.1:{proxy.admin_port}/metrics"], env=CURL_ENV)
        self.assertIn(b'connectors_proxy_requests_by_mode_total{mode="connect"} 3.0', metrics.stdout)
        no_canary(self, [proxy.log(), r.stderr, metrics.stdout], upstream.password)

    def test_daemon(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._daemon())

    async def _options(self) -> None:
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        paths = write_ca(folder, CertificateAuthority.generate("x", time.time()))
        args = write_setup(self, [], {})
        twistd = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.exit(run())",
                  "-n", "--pidfile=", "connectors-proxy", *args, "--listen", f"tcp:{free_port()}:interface=127.0.0.1",
                  "--admin", f"tcp:{free_port()}:interface=127.0.0.1"]
        env = {"PYTHONPATH": ROOT}
        not_ca = os.path.join(folder, "leaf.crt")
        leaf = CertificateAuthority.generate("y", time.time()).mint(["localhost"], time.time())
        with open(not_ca, "wb") as f:
            f.write(leaf.cert_pem())
        for extra, expected in (
            (["--proxy-ca-cert", paths["ca.crt"]], b"--proxy-ca-cert and --proxy-ca-key go together"),
            (["--proxy-ca-cert", paths["ca.crt"], "--proxy-ca-key", "/nonexistent/ca.key"],
             b"--proxy-ca-key /nonexistent/ca.key: cannot read it"),
            (["--proxy-ca-cert", paths["ca.crt"], "--proxy-ca-key", paths["ca.crt"]],
             b"is not an unencrypted PEM private key"),
            (["--proxy-ca-cert", not_ca, "--proxy-ca-key", paths["ca.key"]],
             b"does not match the CA certificate"),
        ):
            result = await run([*twistd, *extra], env=env, timeout=60)
            self.assertNotEqual(result.returncode, 0)
            self.assertIn(expected, result.stderr + result.stdout)
            self.assertNotIn(b"Traceback", result.stderr + result.stdout)

    def test_options(self) -> Deferred[None]:
        """Bad CA options and files: one line, a non-zero exit, no traceback."""
        return Deferred.fromCoroutine(self._options())


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@define
class SlowReader:
    """A client that reads the start of a big download through a tunnel, stops, then reads the rest."""

    port: int
    target: str
    authorization: str
    path: str
    ca_file: str
    stalled: Any = None
    resume: Any = None

    def __attrs_post_init__(self) -> None:
        import threading
        self.stalled, self.resume = threading.Event(), threading.Event()

    def run(self) -> int:
        sock, head = raw_connect(self.port, self.target, self.authorization)
        assert head.startswith(b"HTTP/1.1 200 "), head
        context = ssl.create_default_context(cafile=self.ca_file)
        host = self.target.rsplit(":", 1)[0]
        with context.wrap_socket(sock, server_hostname=host) as tls:
            tls.settimeout(60)
            tls.sendall(f"GET {self.path} HTTP/1.1\r\nHost: {self.target}\r\nConnection: close\r\n\r\n".encode())
            received = 0
            while True:
                chunk = tls.recv(1 << 16)
                if not chunk:
                    return received
                received += len(chunk)
                if received > 1 << 20 and not self.stalled.is_set():
                    self.stalled.set()
                    self.resume.wait(30)


class SlowReaderTests(TestCase):
    """A client that stops reading inside a tunnel pauses its upstream: the proxy's memory stays flat."""

    timeout = 180
    size = 256 << 20

    async def _stall(self, intercepted: bool) -> None:
        upstream = await start_https_upstream(self)
        with open(os.path.join(upstream.root, "open", "big.bin"), "wb") as f:
            f.truncate(self.size)
        token = "client-" + secrets.token_hex(16)
        proxy = await start_connect_proxy(self, upstream_objects(upstream, connector(
            NS, "api", "rest", f"https://localhost:{upstream.port}", secret="creds",
            caCertSecretRef={"name": "upstream-ca"})), {token: sa(NS)},
            exempt=[("127.0.0.1", upstream.port)])
        upstream_ca = os.path.join(upstream.tmp, "upstream-ca.crt")
        with open(upstream_ca, "w") as f:
            f.write(upstream.ca_pem)
        target = f"localhost:{upstream.port}" if intercepted else f"127.0.0.1:{upstream.port}"
        reader = SlowReader(proxy.port, target, basic(f"{NS}/api", token), "/open/big.bin",
                            proxy.ca_path if intercepted else upstream_ca)
        done = threads.deferToThread(reader.run)
        while not reader.stalled.is_set():
            await deferLater(reactor, 0.05, lambda: None)
        before = rss()
        await deferLater(reactor, 3, lambda: None)
        grown = rss() - before
        reader.resume.set()
        received = await done
        self.assertGreater(received, self.size)
        self.assertLess(grown, 64 << 20, f"the proxy buffered {grown >> 20} MiB for a stalled reader")
        # The tunnel's own access line is written when both of its sides have
        # closed, which may be a moment after the client saw the end.
        wanted = "connect" if intercepted else "tunnel"
        await eventually(lambda: wanted in {a.get("mode") for a in proxy.access()},
                         what=f"an access line with mode={wanted}")

    def test_intercepted(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stall(True))

    def test_plain_tunnel(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stall(False))


class TLSListenerTests(TestCase):
    """CONNECT to a proxy reached over TLS itself (a C{cptls:} listener; curl's C{-x https://...}): TLS in TLS."""

    timeout = 120

    async def _nested(self) -> None:
        from tests.test_tls_serve import Pki

        upstream = await start_https_upstream(self)
        token = "client-" + secrets.token_hex(16)
        pki = Pki(self.mktemp(), time.time())
        proxy = await start_connect_proxy(self, upstream_objects(upstream, connector(
            NS, "api", "rest", f"https://localhost:{upstream.port}/basic", secret="creds",
            caCertSecretRef={"name": "upstream-ca"})), {token: sa(NS)}, endpoint=pki.endpoint(),
            exempt=[("127.0.0.1", upstream.port)])
        upstream_ca = os.path.join(upstream.tmp, "upstream-ca.crt")
        with open(upstream_ca, "w") as f:
            f.write(upstream.ca_pem)
        via = ["-x", f"https://localhost:{proxy.port}", "--proxy-cacert", pki.path("ca.crt"),
               "--proxy-user", proxy_user(token, f"{NS}/api")]
        r = await curl(*via, "--cacert", proxy.ca_path, f"https://localhost:{upstream.port}/basic/small.txt")
        self.assertEqual((r.exit, r.connect_code, r.code, r.body), (0, 200, 200, b"hello from basic\n"), r.stderr)
        r = await curl(*via, "--cacert", upstream_ca, f"https://127.0.0.1:{upstream.port}/open/small.txt")
        self.assertEqual((r.exit, r.connect_code, r.code, r.body), (0, 200, 200, b"hello from open\n"), r.stderr)
        self.assertEqual([e["http_authorization"] != "" for e in upstream.requests(at_least=2)], [True, False])

    def test_nested(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._nested())


class OCITests(TestCase):
    """
    skopeo and podman (Go clients) through C{HTTPS_PROXY} to a token-auth
    registry over HTTPS: the proxy intercepts, answers the registry's token
    challenge itself and never shows the client a registry credential.

    Go never proxies loopback targets, so the registry is addressed as
    C{registry.test}, a name only the proxy resolves: it runs as the real
    daemon under C{unshare --mount} with a private C{/etc/hosts} bound over
    the machine's (which stays untouched).
    """

    timeout = 300

    async def _start(self) -> tuple[TokenServer, str, Any, str, str, Any]:
        # A registry trusting a token server, both behind nginx's TLS: the
        # proxy sends the Connector's credentials to an https:// realm only.
        user, password = "user-" + secrets.token_hex(4), "canary-" + secrets.token_hex(16)
        tokens = TokenServer(users={user: password})
        tokens.listen(self)
        registry_port = free_port()
        upstream = await start_https_upstream(self, backends=[registry_port, tokens.port], names=("registry.test",))
        origin = f"registry.test:{upstream.fronts[0]}"
        await start_registry_trusting(self, tokens, f"https://registry.test:{upstream.fronts[1]}/token",
                                      registry_port)
        token = "client-" + secrets.token_hex(16)
        args = write_setup(self, [
            connector_class("oci", protocol="oci"),
            basic_secret(NS, "reg-creds", user, password),
            secret(NS, "upstream-ca", "Opaque", **{"ca.crt": upstream.ca_pem}),
            connector(NS, "reg", "oci", f"https://{origin}", secret="reg-creds",
                      caCertSecretRef={"name": "upstream-ca"}),
        ], {token: sa(NS)})
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        ca = write_ca(folder, CertificateAuthority.generate("oci CA", time.time()))
        port, admin = free_port(), free_port()
        argv = with_private_hosts(self, {"registry.test": "127.0.0.1"}, [
                sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.exit(run())",
                "-n", "--pidfile=", "connectors-proxy", *args, "--listen", f"tcp:{port}:interface=127.0.0.1",
                "--admin", f"tcp:{admin}:interface=127.0.0.1", "--proxy-ca-cert", ca["ca.crt"],
                "--proxy-ca-key", ca["ca.key"]])
        server = await start_server(self, argv, port=port, env={"PYTHONPATH": ROOT}, name="connectors-proxy")
        cert_dir = os.path.join(folder, "certs")
        os.makedirs(cert_dir)
        with open(os.path.join(cert_dir, "ca.crt"), "w") as f, open(ca["ca.crt"]) as source:
            f.write(source.read())
        env = {**CURL_ENV, "HTTPS_PROXY": f"http://{proxy_user(token, f'{NS}/reg')}@127.0.0.1:{port}"}
        return tokens, password, server, origin, cert_dir, env

    async def _skopeo_podman(self) -> None:
        token_server, password, server, origin, cert_dir, env = await self._start()
        image = await build_image("connect-small", (1000, 300_000))
        ref = f"docker://{origin}/test/abc:v1"
        outputs = [check(await run(skopeo("copy", f"--dest-cert-dir={cert_dir}", image.reference, ref), env=env))]
        outputs.append(check(await run(skopeo("inspect", "--raw", f"--cert-dir={cert_dir}", ref), env=env)))
        manifest = json.loads(outputs[-1].stdout)
        self.assertEqual([layer["size"] for layer in manifest["layers"]], list(image.layer_sizes))
        outputs.append(check(await run(skopeo("inspect", "--raw", "--tls-verify=false", ref), env=env)))
        # Without the proxy CA, the Go client refuses the minted certificate.
        refused = await run(skopeo("inspect", "--raw", ref), env=env)
        self.assertNotEqual(refused.returncode, 0)
        self.assertIn(b"certificate", refused.stderr)
        podman = Podman.isolated(self)
        with open(podman.env["REGISTRY_AUTH_FILE"], "w") as f:
            f.write("{}")  # no login at all: the proxy has the registry's credentials
        outputs.append(check(await run(podman.argv("pull", "--tls-verify=false", f"{origin}/test/abc:v1"),
                                       env={**env, **podman.env})))
        # Pushes: podman with the proxy CA trusted, podman and skopeo with --tls-verify=false.  The clients
        # hold no registry login at all: what arrives was pushed inside intercepted tunnels (the proxy's
        # access lines, mode=connect) with the Connector's credentials (its user at the token realm).
        [user] = token_server.users

        def intercepted(method: str, repository: str) -> int:
            return len(re.findall(rf'{NS}/reg "{method} /v2/{repository}/manifests/v1" 20\d .* mode=connect',
                                  server.log()))

        before = intercepted("GET", "test/abc")
        outputs.append(check(await run(skopeo("inspect", "--raw", "--tls-verify=false", ref), env=env)))
        await eventually(lambda: intercepted("GET", "test/abc") > before, what="skopeo's request, intercepted")
        for repository, command in (
            ("test/pushed", podman.argv("push", f"--cert-dir={cert_dir}", f"{origin}/test/abc:v1",
                                        f"docker://{origin}/test/pushed:v1")),
            ("test/pushed-insecure", podman.argv("push", "--tls-verify=false", f"{origin}/test/abc:v1",
                                                 f"docker://{origin}/test/pushed-insecure:v1")),
            ("test/copied-insecure", skopeo("copy", "--dest-tls-verify=false", image.reference,
                                            f"docker://{origin}/test/copied-insecure:v1")),
        ):
            asked = len(token_server.requests)
            outputs.append(check(await run(command, env={**env, **podman.env})))
            pushes = [r for r in token_server.requests[asked:]
                      if any(s.startswith(f"repository:{repository}:") and "push" in s for s in r.scopes)]
            self.assertTrue(pushes, f"{repository}: the proxy asked the realm for a push token")
            self.assertEqual({r.account for r in pushes}, {user})
            await eventually(lambda repository=repository: intercepted("PUT", repository) == 1,  # type: ignore[misc]
                             what=f"the manifest PUT of {repository}, intercepted")
            pushed = json.loads(check(await run(skopeo("inspect", "--raw", f"--cert-dir={cert_dir}",
                                                       f"docker://{origin}/{repository}:v1"), env=env)).stdout)
            self.assertEqual(len(pushed["layers"]), len(image.layer_sizes), repository)
        # The proxy took the registry's tokens; none, and no password, reached a client or the log.
        tokens = token_server.tokens
        self.assertTrue(tokens, "the proxy answered the registry's token challenge")
        self.assertTrue(all(r.account for r in token_server.requests), "always with the Connector's user")
        seen = [o.stdout for o in outputs] + [o.stderr for o in outputs] + [refused.stderr, server.log()]
        for output in seen:
            for issued in tokens:
                self.assertNotIn(issued.encode() if isinstance(output, bytes) else issued, output)
        no_canary(self, seen, password)
        self.assertIn("mode=connect", server.log())

    def test_skopeo_and_podman(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._skopeo_podman())
