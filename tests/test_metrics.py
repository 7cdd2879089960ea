"""
Prometheus metrics: the counters each finished request moves, the state
read at scrape time, bounded labels, and a scrape of C{/metrics} (parsed
with prometheus-client's own parser) after real traffic through a loopback
proxy.
"""

from __future__ import annotations

import secrets
from typing import Any

import treq
from attrs import define, field
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest

from connectors_proxy.kube.identity import KubeIdentityVerifier
from connectors_proxy.model.objects import ObjectRef
from connectors_proxy.ops.admin import admin_resource
from connectors_proxy.ops.metrics import ProxyMetrics
from connectors_proxy.server.accesslog import AccessRecord
from connectors_proxy.server.limits import ConcurrencyLimiter
from connectors_proxy.tls.upstream import upstream_policy
from connectors_proxy.upstream.agents import Agents

from .support.proxy import basic_secret, connector, connector_class, sa, start_proxy
from .test_kube_memory import MemoryKube


def samples(text: str | bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, by (name, labels)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(parsed: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return parsed.get((name, frozenset(labels.items())), 0.0)


def record(status: int = 200, protocol: str = "http", bytes_in: int = 0, bytes_out: int = 0,
           duration_ms: float = 12.0) -> AccessRecord:
    return AccessRecord(client="127.0.0.1", identity="system:serviceaccount:ns:sa", namespace="ns",
                        connector="c", protocol=protocol, method="GET", path="/x", status=status,
                        bytes_in=bytes_in, bytes_out=bytes_out, duration_ms=duration_ms)


@define
class FakeConnector:
    namespace: str
    name: str


@define
class FakeTarget:
    connector: FakeConnector


@define
class FakeRequest:
    target: FakeTarget | None = None


@define(eq=False)
class FakeChannel:
    requests: list[Any] = field(factory=list)


@define
class FakeSite:
    channels: set[Any] = field(factory=set)
    opened: int = 0


@define
class FakeAgent:
    """An upstream agent (one TLS identity) holding C{idle} idle connections."""

    idle: int

    def idle_connections(self) -> int:
        return self.idle


def fake_agents(agents_idle: list[int]) -> Agents:
    """Real L{Agents} whose agents hold the given numbers of idle connections."""
    agents = Agents(Clock(), upstream_policy)
    agents._agents = {(str(i).encode(), None, None): FakeAgent(n)  # type: ignore[misc]
                      for i, n in enumerate(agents_idle)}
    return agents


@define
class FakeDrainer:
    draining: bool = False


def routed(namespace: str = "ns", name: str = "c") -> FakeRequest:
    return FakeRequest(FakeTarget(FakeConnector(namespace, name)))


class ObserveTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.metrics = ProxyMetrics(process=False)

    def scrape(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        return samples(self.metrics.exposition())

    def test_request_counters_and_histogram(self) -> None:
        for duration in (3.0, 40.0, 2000.0):
            self.metrics.observe(routed(), record(duration_ms=duration, bytes_in=10, bytes_out=100))
        self.metrics.observe(routed(), record(status=404))
        s = self.scrape()
        labels = {"namespace": "ns", "connector": "c", "protocol": "http"}
        self.assertEqual(value(s, "connectors_proxy_requests_total", code="200", **labels), 3)
        self.assertEqual(value(s, "connectors_proxy_requests_total", code="404", **labels), 1)
        self.assertEqual(value(s, "connectors_proxy_request_duration_seconds_count", **labels), 4)
        self.assertAlmostEqual(value(s, "connectors_proxy_request_duration_seconds_sum", **labels), 2.055)
        self.assertEqual(value(s, "connectors_proxy_request_duration_seconds_bucket", le="0.005", **labels), 1)
        self.assertEqual(value(s, "connectors_proxy_request_duration_seconds_bucket", le="0.05", **labels), 3)
        self.assertEqual(value(s, "connectors_proxy_request_duration_seconds_bucket", le="+Inf", **labels), 4)
        self.assertEqual(value(s, "connectors_proxy_request_bytes_total", **labels), 30)
        self.assertEqual(value(s, "connectors_proxy_response_bytes_total", **labels), 300)

    def test_unrouted_requests_have_no_connector_labels(self) -> None:
        """A 401 or a 404 for a made-up Connector must not mint a label set per name a client sends."""
        for i in range(50):
            self.metrics.observe(FakeRequest(), AccessRecord(
                client="c", identity="-", namespace=f"made-up-{i}", connector=f"x{i}", protocol="-",
                method="GET", path=f"/p{i}", status=404, bytes_in=0, bytes_out=5, duration_ms=1.0))
        s = self.scrape()
        self.assertEqual(value(s, "connectors_proxy_requests_total", namespace="-", connector="-",
                               protocol="-", code="404"), 50)
        self.assertFalse([k for k in s if any(v.startswith("made-up") for _, v in k[1])])
        self.assertEqual(len(self.metrics._children), 1)

    def test_labelled_children_are_cached(self) -> None:
        self.metrics.observe(routed(), record())
        children = dict(self.metrics._children)
        for _ in range(100):
            self.metrics.observe(routed(), record())
        self.assertEqual(len(self.metrics._children), 1)
        key, cached = next(iter(self.metrics._children.items()))
        self.assertIs(cached, children[key])

    def test_collaborator_counters(self) -> None:
        self.metrics.token_request(ObjectRef("ns", "harbor"))
        self.metrics.token_request("ns/harbor", ok=False)
        self.metrics.token_cache_hit("ns/harbor")
        self.metrics.token_cache_hit("ns/harbor")
        self.metrics.reload("manifests", True, when=1234.0)
        self.metrics.reload("watch", False)
        s = self.scrape()
        self.assertEqual(value(s, "connectors_proxy_upstream_token_requests_total",
                               namespace="ns", connector="harbor", result="ok"), 1)
        self.assertEqual(value(s, "connectors_proxy_upstream_token_requests_total",
                               namespace="ns", connector="harbor", result="error"), 1)
        self.assertEqual(value(s, "connectors_proxy_upstream_token_cache_hits_total",
                               namespace="ns", connector="harbor"), 2)
        self.assertEqual(value(s, "connectors_proxy_reloads_total", source="manifests", result="ok"), 1)
        self.assertEqual(value(s, "connectors_proxy_reloads_total", source="watch", result="error"), 1)
        self.assertEqual(value(s, "connectors_proxy_last_reload_success_timestamp_seconds",
                               source="manifests"), 1234.0)
        # Present (at 0) before the first lookup, so rates work from the start.
        for review in ("token", "access"):
            for result in ("hit", "miss"):
                self.assertEqual(value(s, "connectors_proxy_review_cache_lookups_total", review=review,
                                       result=result), 0)

    def test_review_caches_read_at_scrape_time(self) -> None:
        """
        The lookups counted are those of the identity verifier's own review
        caches, tracked as the daemon tracks them (C{tap.make_service}):
        the metric has no other source to drift from.
        """
        clock = Clock()
        kube = MemoryKube(clock)
        token = secrets.token_hex(16)
        kube.tokens[token] = {"username": "system:serviceaccount:team:builder", "uid": "u-1"}
        verifier = KubeIdentityVerifier(kube, clock)
        self.metrics.track_review_cache("token", verifier.tokens)
        self.metrics.track_review_cache("access", verifier.access)
        for _ in range(3):
            identity = self.successResultOf(verifier.authenticate(token))
        self.assertIsNotNone(self.successResultOf(verifier.authorize(identity, "team", "harbor")))
        s = self.scrape()
        self.assertEqual(value(s, "connectors_proxy_review_cache_lookups_total", review="token", result="hit"), 2)
        self.assertEqual(value(s, "connectors_proxy_review_cache_lookups_total", review="token", result="miss"), 1)
        self.assertEqual(value(s, "connectors_proxy_review_cache_lookups_total", review="access", result="hit"), 0)
        self.assertEqual(value(s, "connectors_proxy_review_cache_lookups_total", review="access", result="miss"), 1)
        self.assertRaises(ValueError, self.metrics.track_review_cache, "other", verifier.tokens)
        # No second way in, counted beside the caches' own (nothing outside tests called one).
        self.assertFalse(hasattr(self.metrics, "review_cache"))

    def test_label_values_are_checked(self) -> None:
        self.assertRaises(ValueError, self.metrics.reload, "/etc/some/path", True)

    def test_tracked_source_time(self) -> None:
        now = [100.0]
        self.metrics.track_source("manifests", lambda: now[0])
        now[0] = 200.0
        self.metrics.reload("manifests", True)
        self.assertEqual(value(self.scrape(), "connectors_proxy_last_reload_success_timestamp_seconds",
                               source="manifests"), 200.0)

    def test_registries_are_per_daemon(self) -> None:
        other = ProxyMetrics(process=False)
        other.observe(routed(), record())
        self.assertEqual(value(self.scrape(), "connectors_proxy_requests_total", namespace="ns", connector="c",
                               protocol="http", code="200"), 0)
        self.assertNotIn(b"connectors_proxy", generate_latest(REGISTRY))


class StateTests(SynchronousTestCase):
    def test_state_read_at_scrape_time(self) -> None:
        metrics = ProxyMetrics(process=False)
        site = FakeSite({FakeChannel([object()]), FakeChannel(), FakeChannel([object(), object()])}, opened=9)
        agents = fake_agents([3, 1])
        limiter = ConcurrencyLimiter(Clock(), max_active=1, max_queue=5)
        drainer = FakeDrainer()
        metrics.track_site(site)
        metrics.track_agents(agents)
        metrics.track_limiter(limiter)
        metrics.track_drain(drainer)
        ref = ObjectRef("ns", "busy")
        limiter.acquire(ref)
        limiter.acquire(ref).addErrback(lambda f: None)
        limiter.acquire(ref).addErrback(lambda f: None)

        s = samples(metrics.exposition())
        self.assertEqual(value(s, "connectors_proxy_open_connections"), 3)
        self.assertEqual(value(s, "connectors_proxy_connections_total"), 9)
        self.assertEqual(value(s, "connectors_proxy_in_flight_requests"), 3)
        self.assertEqual(value(s, "connectors_proxy_upstream_pool_idle_connections"), 4)
        self.assertEqual(value(s, "connectors_proxy_upstream_active_requests", namespace="ns", connector="busy"), 1)
        self.assertEqual(value(s, "connectors_proxy_upstream_queued_requests", namespace="ns", connector="busy"), 2)
        self.assertEqual(value(s, "connectors_proxy_draining"), 0)

        drainer.draining = True
        site.channels.clear()
        s = samples(metrics.exposition())
        self.assertEqual(value(s, "connectors_proxy_draining"), 1)
        self.assertEqual(value(s, "connectors_proxy_open_connections"), 0)

    def test_metrics_resource(self) -> None:
        metrics = ProxyMetrics()
        metrics.observe(routed(), record())
        root = admin_resource(lambda: None, metrics.resource())
        request = DummyRequest([b"metrics"])
        body = root.getChildWithDefault(b"metrics", request).render(request)
        self.assertTrue(request.responseHeaders.getRawHeaders(b"content-type")[0].startswith(b"text/plain"))
        s = samples(body)
        self.assertEqual(value(s, "connectors_proxy_requests_total", namespace="ns", connector="c",
                               protocol="http", code="200"), 1)
        # The process collector is on by default (memory, CPU, open files).
        self.assertTrue(any(name == "process_resident_memory_bytes" for name, _ in s))


class Upstream(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"x" * 1000

    def render_POST(self, request: Any) -> bytes:
        return b"got %d\n" % len(request.content.read())


class ScrapeAfterTrafficTests(TestCase):
    """Real requests through a loopback proxy, then a real scrape."""

    timeout = 60

    def test_scrape_after_traffic(self) -> Deferred[None]:
        async def run() -> None:
            upstream = reactor.listenTCP(0, Site(Upstream()), interface="127.0.0.1")
            self.addCleanup(upstream.stopListening)
            address = f"http://127.0.0.1:{upstream.getHost().port}"
            token, password = secrets.token_hex(16), secrets.token_hex(16)
            proxy = await start_proxy(self, [
                connector_class("rest"),
                basic_secret("team", "creds", "user", password),
                connector("team", "api", "rest", address, secret="creds"),
            ], {token: sa("team")})
            metrics = ProxyMetrics()
            proxy.root.observers.append(metrics.observe)
            limiter = ConcurrencyLimiter(reactor, max_active=10, max_queue=10)
            proxy.root.limiter = limiter
            metrics.track_limiter(limiter)
            metrics.track_agents(proxy.root.agents.agents)
            admin = reactor.listenTCP(0, Site(admin_resource(lambda: None, metrics.resource())),
                                      interface="127.0.0.1")
            self.addCleanup(admin.stopListening)
            scrape_url = f"http://127.0.0.1:{admin.getHost().port}/metrics"

            async def scrape() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
                response = await treq.get(scrape_url, persistent=False)
                self.assertEqual(response.code, 200)
                text = await response.text()
                for canary in (token, password):
                    self.assertNotIn(canary, text)
                return samples(text)

            before = await scrape()
            auth = {"Authorization": f"Bearer {token}"}
            for _ in range(5):
                r = await treq.get(proxy.path_url("team", "api", f"/items?token={token}"), headers=auth,
                                   persistent=False)
                self.assertEqual((r.code, len(await r.content())), (200, 1000))
            r = await treq.post(proxy.path_url("team", "api", "/upload"), data=b"y" * 4096, headers=auth,
                                persistent=False)
            self.assertEqual(await r.content(), b"got 4096\n")
            r = await treq.get(proxy.path_url("team", "api", "/"), persistent=False)
            self.assertEqual(r.code, 401)
            await r.content()
            r = await treq.get(proxy.path_url("team", "nope", "/"), headers=auth, persistent=False)
            self.assertEqual(r.code, 404)
            await r.content()
            after = await scrape()

            api = {"namespace": "team", "connector": "api", "protocol": "http"}

            def moved(name: str, **labels: str) -> float:
                return value(after, name, **labels) - value(before, name, **labels)

            self.assertEqual(moved("connectors_proxy_requests_total", code="200", **api), 6)
            self.assertEqual(moved("connectors_proxy_requests_total", namespace="-", connector="-",
                                   protocol="-", code="401"), 1)
            self.assertEqual(moved("connectors_proxy_requests_total", namespace="-", connector="-",
                                   protocol="-", code="404"), 1)
            self.assertEqual(moved("connectors_proxy_request_duration_seconds_count", **api), 6)
            self.assertGreater(moved("connectors_proxy_request_duration_seconds_sum", **api), 0)
            buckets = sorted((float(dict(labels)["le"]), v) for (name, labels), v in after.items()
                             if name == "connectors_proxy_request_duration_seconds_bucket"
                             and dict(labels)["connector"] == "api")
            self.assertEqual(buckets[-1], (float("inf"), 6))
            self.assertEqual([v for _, v in buckets], sorted(v for _, v in buckets))
            self.assertEqual(moved("connectors_proxy_request_bytes_total", **api), 4096)
            self.assertEqual(moved("connectors_proxy_response_bytes_total", **api), 5 * 1000 + len(b"got 4096\n"))
            self.assertEqual(value(after, "connectors_proxy_limit_admitted_total",
                                   namespace="team", connector="api"), 6)
            self.assertEqual(value(after, "connectors_proxy_upstream_active_requests",
                                   namespace="team", connector="api"), 0)
            # The upstream connections went back to the pool.
            self.assertGreaterEqual(value(after, "connectors_proxy_upstream_pool_idle_connections"), 1)

        return Deferred.fromCoroutine(run())

