"""
C{CONNECT} in memory (issue 14): the proxy's real site, root resource,
interception TLS and relay, a client that speaks TLS through
L{ssl.MemoryBIO}, and upstreams that are resources, all on a L{Clock}.

- the C{CONNECT}'s own access line counts the tunnel's bytes each way,
  for an intercepted tunnel as for a plain one;
- a Connector's proxy Service host (C{c-NAME.NS.svc:443},
  C{c-NAME.NS.svc.cluster.local:443}) as a C{CONNECT} target is that
  Connector's, intercepted, whatever the C{Proxy-Authorization} lists.
"""

from __future__ import annotations

import os
import secrets
import ssl
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from connectors_proxy.model.objects import ObjectRef
from connectors_proxy.router import Listed, Unlisted, forward_decision
from connectors_proxy.server.connect import ESTABLISHED
from connectors_proxy.tls.intercept import InterceptTLS
from connectors_proxy.tls.mint import CertificateAuthority
from tests.support.memory import Client, MemoryProxy, Scripted, basic_auth, memory_proxy, request_bytes
from tests.support.proxy import basic, basic_secret, connector, connector_class, sa, snapshot_of

NS = "ns1"


class ServiceHostDecisionTests(SynchronousTestCase):
    """L{forward_decision} for a C{CONNECT} whose host is a Connector's proxy Service name."""

    def setUp(self) -> None:
        self.snapshot = snapshot_of(connector_class("rest"),
                                    connector(NS, "api", "rest", "https://api.example.com/base"))
        self.api = ObjectRef(NS, "api")

    def decide(self, origin: str, listed: tuple[ObjectRef, ...] = (), unlisted: str = "deny",
               cluster_domain: str | None = "cluster.local") -> Any:
        return forward_decision(origin, None, listed, self.snapshot, unlisted, cluster_domain)

    def test_service_hosts(self) -> None:
        """The proxy Service's host names the Connector, on any port, listed or not."""
        named = Listed(self.api, "https://api.example.com/base", b"")
        for origin in ("https://c-api.ns1.svc:443", "https://c-api.ns1.svc.cluster.local:443",
                       "https://C-API.NS1.SVC:443", "https://c-api.ns1.svc.Cluster.Local:8443"):
            self.assertEqual(self.decide(origin), named, origin)
            self.assertEqual(self.decide(origin, (ObjectRef(NS, "other"),)), named, origin)
        self.assertEqual(self.decide("https://c-api.ns1.svc.corp.internal:443", cluster_domain="corp.internal"),
                         named)

    def test_unknown_connector(self) -> None:
        """A Service name of no Connector is still that name's (the router answers 404), never a tunnel."""
        self.assertEqual(self.decide("https://c-ghost.ns1.svc:443", unlisted="allow"),
                         Listed(ObjectRef(NS, "ghost"), "", b""))

    def test_not_service_hosts(self) -> None:
        # c-NAME.NS, routed by host in a reverse-proxy request, is as likely a public name here.
        for origin in ("https://c-api.ns1.svc.other.domain:443", "https://api.ns1.svc:443", "https://c-api:443",
                       "https://[::1]:443", "https://c-api.ns1.svc.cluster.local.evil.com:443",
                       "https://c-api.ns1:443", "https://c-span.org:443", "https://x.c-api.ns1.svc:443"):
            self.assertEqual(self.decide(origin, unlisted="allow"), Unlisted(), origin)
        # Without a cluster domain (absolute-form requests, routed by host before): only addresses match.
        self.assertEqual(self.decide("https://c-api.ns1.svc:443", unlisted="allow", cluster_domain=None), Unlisted())


class TLSClient:
    """
    The client end of a tunnel once the C{200} arrived: TLS through memory
    BIOs over a L{Client}, counting what it sends and receives from then on.
    """

    def __init__(self, proxy: MemoryProxy, client: Client, ca_pem: bytes, server_name: str) -> None:
        self.proxy = proxy
        self.client = client
        context = ssl.create_default_context(cadata=ca_pem.decode())
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=server_name)
        head = bytes(client.received)
        assert head == ESTABLISHED, head
        self.offset = len(head)
        self.sent = 0

    @property
    def received(self) -> int:
        return len(self.client.received) - len(ESTABLISHED)

    def pump(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sent += len(data)
            self.client.send(data)
        self.proxy.network.flush()
        new = bytes(self.client.received[self.offset:])
        self.offset += len(new)
        if new:
            self.incoming.write(new)

    def handshake(self) -> None:
        for _ in range(10):
            try:
                self.tls.do_handshake()
                self.pump()
                return
            except ssl.SSLWantReadError:
                self.pump()
        raise AssertionError("the TLS handshake did not complete")

    def exchange(self, request: bytes) -> bytes:
        """Send C{request} (with C{Connection: close}); everything read until the server closed the tunnel."""
        self.tls.write(request)
        self.pump()
        answer = b""
        for _ in range(100):
            try:
                data = self.tls.read(1 << 16)
            except ssl.SSLWantReadError:
                if self.client.closed and self.offset == len(self.client.received):
                    return answer
                self.pump()
                continue
            except ssl.SSLZeroReturnError:
                data = b""
            except ssl.SSLEOFError:
                return answer
            if not data:
                # The server's close_notify: answer it, as clients do (the
                # server closes the connection once both sides have).
                try:
                    self.tls.unwrap()
                except ssl.SSLWantReadError:
                    pass
                self.pump()
                return answer
            answer += data
        raise AssertionError("the response did not end")


class InterceptedInMemoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.password = "canary-" + secrets.token_hex(16)
        self.token = "client-" + secrets.token_hex(16)
        self.proxy = memory_proxy(self, [
            connector_class("rest"),
            basic_secret(NS, "creds", "robot", self.password),
            connector(NS, "api", "rest", "https://api.example.com/base", secret="creds"),
            connector(NS, "other", "rest", "https://other.example.com", secret="creds"),
            connector("elsewhere", "api", "rest", "https://api.example.com/base", secret="creds"),
        ], {self.token: sa(NS)})
        # Minted certificates must be valid for the client, which reads the real time.
        self.proxy.clock.advance(time.time())
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        self.ca = CertificateAuthority.generate("memory CA " + secrets.token_hex(3), time.time())
        paths = {}
        for name, data in (("ca.crt", self.ca.cert_pem()), ("ca.key", self.ca.key_pem())):
            paths[name] = os.path.join(folder, name)
            with open(paths[name], "wb") as f:
                f.write(data)
        self.proxy.root.intercept = InterceptTLS(paths["ca.crt"], paths["ca.key"], self.proxy.clock)
        self.upstream = self.proxy.upstream("https://api.example.com", Scripted())

    def connect(self, target: str, listed: str = f"{NS}/api") -> Client:
        client = self.proxy.connect()
        client.send(request_bytes(b"CONNECT", target.encode(), [
            basic_auth(listed, self.token, header=b"Proxy-Authorization")], host=target.encode()))
        return client

    def get_through(self, target: str, path: bytes, listed: str = f"{NS}/api") -> tuple[TLSClient, bytes]:
        """CONNECT to C{target}, TLS for its host, one C{GET path}; the client and the response."""
        client = self.connect(target, listed)
        tls = TLSClient(self.proxy, client, self.ca.cert_pem(), target.rsplit(":", 1)[0])
        tls.handshake()
        answer = tls.exchange(b"GET " + path + b" HTTP/1.1\r\nHost: " + target.encode() +
                              b"\r\nConnection: close\r\n\r\n")
        self.proxy.network.flush()
        return tls, answer

    def tunnel_lines(self) -> list[dict[str, Any]]:
        return [a for a in self.proxy.logs.access() if a.get("mode") == "tunnel"]

    def test_tunnel_bytes(self) -> None:
        """The CONNECT's access line counts the bytes of its intercepted tunnel each way, exactly."""
        tls, answer = self.get_through("api.example.com:443", b"/base/thing")
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer)
        self.assertTrue(answer.endswith(b"ok /base/thing"), answer)
        self.assertTrue(tls.client.closed)
        [line] = self.tunnel_lines()
        self.assertEqual((line["method"], line["path"], line["status"], line["protocol"], line["connector"]),
                         ("CONNECT", "api.example.com:443", 200, "connect", "api"))
        self.assertEqual((line["bytes_in"], line["bytes_out"]), (tls.sent, tls.received))
        # The TLS records carry more than the request inside: its head, and the handshake.
        [inner] = [a for a in self.proxy.logs.access() if a.get("mode") == "connect"]
        self.assertGreater(line["bytes_in"], 300)
        self.assertGreater(line["bytes_out"], inner["bytes_out"] + 300)

    def test_refused_inside_is_counted(self) -> None:
        """Plain text inside an intercepted tunnel: the 400 it gets is counted too."""
        client = self.connect("api.example.com:443")
        sent = b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n"
        client.send(sent)
        self.proxy.network.flush()
        self.assertTrue(client.closed)
        after = bytes(client.received)[len(ESTABLISHED):]
        self.assertTrue(after.startswith(b"HTTP/1.1 400 "), after)
        [line] = self.tunnel_lines()
        self.assertEqual((line["bytes_in"], line["bytes_out"]), (len(sent), len(after)))

    def test_service_host(self) -> None:
        """C{c-NAME.NS.svc:443} and the cluster-domain form: intercepted as that Connector, credentials injected."""
        for target in ("c-api.ns1.svc:443", "c-api.ns1.svc.cluster.local:443"):
            before = len(self.upstream.requests)
            # Proxy-Authorization lists another Connector: the host names this one.
            tls, answer = self.get_through(target, b"/thing?x=1", listed=f"{NS}/other")
            self.assertTrue(answer.startswith(b"HTTP/1.1 200 OK\r\n"), (target, answer))
            self.assertTrue(answer.endswith(b"ok /base/thing?x=1"), answer)
            self.assertEqual(len(self.upstream.requests), before + 1)
            headers = self.upstream.headers()
            self.assertEqual(headers[b"authorization"], [basic("robot", self.password)])
            self.assertNotIn(b"proxy-authorization", headers)
            self.assertNotIn(self.token.encode(), b"".join(v for vs in headers.values() for v in vs))
        lines = self.proxy.logs.access()
        self.assertEqual([(a["mode"], a["namespace"], a["connector"], a["protocol"], a["status"]) for a in lines],
                         [("connect", NS, "api", "http", 200), ("tunnel", NS, "api", "connect", 200)] * 2)
        self.assertNotIn(self.password, self.proxy.logs.text())
        self.assertNotIn(self.password.encode(), self.proxy.received())

    def test_service_host_refused(self) -> None:
        """Named by its Service host: a Connector that does not exist is 404, one the identity may not use 403."""
        for target, status in (("c-ghost.ns1.svc:443", 404), ("c-api.elsewhere.svc:443", 403)):
            client = self.connect(target)
            self.proxy.network.flush()
            response = client.response()
            self.assertEqual(response.code, status, (target, response))
        self.assertEqual(self.upstream.requests, [])
