# -*- test-case-name: tests.test_metrics -*-
"""
Prometheus metrics (docs/operations.md, "Metrics"), served as C{/metrics} on the admin
listener.

Each daemon has its own L{CollectorRegistry} (never the global default), so
tests can run several proxies in one process.

Label values are bounded by the configuration, never by what clients send:
C{namespace}/C{connector} are those of a Connector the request was
authorized for and routed to (anything else, a 401 or a 404 for a made-up
name, is counted under C{"-"}); C{protocol} is a class's protocol; C{code}
is a status code.  No path, no identity, no credential is ever a label.

Per-request cost is one dict lookup (the labelled children are cached by
key) and four increments.  Everything that is state rather than an event
(open connections, in-flight requests, pooled upstream connections, queue
lengths) is read when scraped, costing the request path nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector
from twisted.web.resource import Resource
from twisted.web.server import Request

from connectors_proxy.server.accesslog import AccessRecord

# The *_created series double what every scrape carries and no dashboard
# uses them; this switch is process-wide in prometheus_client.
disable_created_metrics()

PREFIX = "connectors_proxy"
NONE = "-"

# Proxied requests run from a millisecond (a cached manifest HEAD) to
# minutes (a multi-GiB layer), hence the long tail.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 300.0, float("inf"))

REVIEWS = ("token", "access")
RELOAD_SOURCES = ("manifests", "tokens", "watch", "certificates")


def _split(connector: Any) -> tuple[str, str]:
    """C{(namespace, name)} of an L{ObjectRef}-like value or an C{"NS/NAME"} string."""
    namespace = getattr(connector, "namespace", None)
    if namespace is not None:
        return str(namespace), str(connector.name)
    namespace, _, name = str(connector).partition("/")
    return (namespace, name) if name else (NONE, namespace or NONE)


class ProxyMetrics:
    """
    The daemon's metrics.  L{observe} is a C{ConnectorsResource} observer;
    the C{track_*} methods register state read at scrape time (the identity
    review caches' lookups among it); the other public methods are the
    counters collaborators call (token cache, reloads).
    """

    def __init__(self, registry: CollectorRegistry | None = None, process: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        per_connector = ["namespace", "connector", "protocol"]
        self._requests = Counter(f"{PREFIX}_requests", "Requests served, by Connector, protocol and status code.",
                                 [*per_connector, "code"], registry=r)
        self._duration = Histogram(f"{PREFIX}_request_duration_seconds",
                                   "Time from a request's headers to the end of its response.",
                                   per_connector, buckets=DURATION_BUCKETS, registry=r)
        self._bytes_in = Counter(f"{PREFIX}_request_bytes", "Request body bytes received from clients; for a CONNECT "
                                 "tunnel, every byte it carried up (an intercepted tunnel's requests are also "
                                 "counted under their own protocol).",
                                 per_connector, registry=r)
        self._bytes_out = Counter(f"{PREFIX}_response_bytes", "Response body bytes sent to clients; for a CONNECT "
                                  "tunnel, every byte it carried down.",
                                  per_connector, registry=r)
        self._truncated = Counter(f"{PREFIX}_truncated_responses",
                                  "Responses that started but did not end complete, by who cut them "
                                  "(upstream: reset mid-body, client: went away, proxy).",
                                  [*per_connector, "by"], registry=r)
        self._modes = Counter(f"{PREFIX}_requests_by_mode",
                              "Requests served, by how they reached the proxy: reverse (addressed to it), forward "
                              "(absolute form through http_proxy), connect (inside an intercepted CONNECT tunnel), "
                              "tunnel (the CONNECT itself, counted when its tunnel closes).", ["mode"], registry=r)
        self._mode_children: dict[str, Any] = {}
        self._token_requests = Counter(f"{PREFIX}_upstream_token_requests",
                                       "Token requests the proxy made to registry token realms.",
                                       ["namespace", "connector", "result"], registry=r)
        self._token_hits = Counter(f"{PREFIX}_upstream_token_cache_hits",
                                   "Registry tokens served from the proxy's cache.",
                                   ["namespace", "connector"], registry=r)
        self._reloads = Counter(f"{PREFIX}_reloads", "Reloads of objects, tokens and certificates, by result.",
                                ["source", "result"], registry=r)
        self._last_success = Gauge(f"{PREFIX}_last_reload_success_timestamp_seconds",
                                   "When each source last loaded (or checked) successfully.",
                                   ["source"], registry=r)
        self._children: dict[tuple[str, str, str, int], tuple[Any, Any, Any, Any]] = {}
        self.state = StateCollector()
        r.register(self.state)
        if process:
            ProcessCollector(registry=r)

    # Per request.

    def observe(self, request: Any, record: AccessRecord) -> None:
        """Count one finished request (a C{ConnectorsResource} observer)."""
        if record.protocol == NONE:
            # Not routed to an existing Connector (refused first, or unknown):
            # names a client made up must not become label values.
            namespace = connector = protocol = NONE
        else:
            namespace, connector, protocol = record.namespace, record.connector, record.protocol
        key = (namespace, connector, protocol, record.status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self._requests.labels(namespace, connector, protocol, str(record.status)),
                self._duration.labels(namespace, connector, protocol),
                self._bytes_in.labels(namespace, connector, protocol),
                self._bytes_out.labels(namespace, connector, protocol),
            )
        requests, duration, bytes_in, bytes_out = children
        requests.inc()
        mode = self._mode_children.get(record.mode)
        if mode is None:
            mode = self._mode_children[record.mode] = self._modes.labels(record.mode)
        mode.inc()
        duration.observe(record.duration_ms / 1000.0)
        if record.bytes_in:
            bytes_in.inc(record.bytes_in)
        if record.bytes_out:
            bytes_out.inc(record.bytes_out)
        if record.truncated:
            # Rare (a reset or a client leaving mid-body): no child cache.
            self._truncated.labels(namespace, connector, protocol, record.truncated).inc()

    # Called by collaborators.

    def token_request(self, connector: Any, ok: bool = True) -> None:
        """
        The OCI token cache asked a realm for a token (C{ok}: it got one).
        C{connector} is an L{ObjectRef} or C{"NAMESPACE/NAME"}.
        """
        namespace, name = _split(connector)
        self._token_requests.labels(namespace, name, "ok" if ok else "error").inc()

    def token_cache_hit(self, connector: Any) -> None:
        """The OCI token cache answered from its cache (or joined a request in flight)."""
        namespace, name = _split(connector)
        self._token_hits.labels(namespace, name).inc()

    def reload(self, source: str, ok: bool, when: float | None = None) -> None:
        """
        A source (C{manifests}, C{tokens}, C{watch}, C{certificates})
        reloaded; on success its last-success time is set (to now unless
        C{when} is given), unless L{track_source} reads it instead.
        """
        if source not in RELOAD_SOURCES:
            raise ValueError(f"source must be one of {RELOAD_SOURCES}, not {source!r}")
        self._reloads.labels(source, "ok" if ok else "error").inc()
        if ok and source not in self.state.sources:
            self._last_success.labels(source).set(time.time() if when is None else when)

    # State read at scrape time.

    def track_source(self, source: str, last_success: Callable[[], float]) -> None:
        """Read C{source}'s last successful load time (a Unix time) from C{last_success()}."""
        self.state.sources[source] = last_success
        self._last_success.labels(source).set_function(last_success)

    def track_site(self, site: Any) -> None:
        """Count the open connections and in-flight requests of a C{ProxySite}."""
        self.state.sites.append(site)

    def track_agents(self, agents: Any) -> None:
        """Count the idle pooled upstream connections of an L{Agents<connectors_proxy.upstream.agents.Agents>}."""
        self.state.agents.append(agents)

    def track_limiter(self, limiter: Any) -> None:
        """Export a L{limits.ConcurrencyLimiter}'s lanes."""
        self.state.limiters.append(limiter)

    def track_review_cache(self, review: str, cache: Any) -> None:
        """
        Export the C{hits} and C{misses} counts of a review cache
        (C{kube.identity.ReviewCache}); C{review} is C{"token"} or C{"access"}.
        """
        if review not in REVIEWS:
            raise ValueError(f"review must be one of {REVIEWS}, not {review!r}")
        self.state.review_caches.append((review, cache))

    def track_drain(self, drainer: Any) -> None:
        """Export whether the daemon is draining."""
        self.state.drainers.append(drainer)

    def resource(self) -> Resource:
        return MetricsResource(self.registry)

    def exposition(self, accept: str = "") -> bytes:
        encoder, _ = choose_encoder(accept)
        return encoder(self.registry)


def _pool_idle(agents: Any) -> int:
    return int(agents.idle_connections())


class StateCollector:
    """Metrics computed from live state when scraped."""

    def __init__(self) -> None:
        self.sites: list[Any] = []
        self.agents: list[Any] = []
        self.limiters: list[Any] = []
        self.drainers: list[Any] = []
        self.sources: dict[str, Callable[[], float]] = {}
        self.review_caches: list[tuple[str, Any]] = []

    def describe(self) -> Iterable[Metric]:
        return self.collect(empty=True)

    def collect(self, empty: bool = False) -> list[Metric]:
        connector = ["namespace", "connector"]
        connections = GaugeMetricFamily(f"{PREFIX}_open_connections",
                                        "Client connections open on the proxy listeners.")
        opened = CounterMetricFamily(f"{PREFIX}_connections", "Client connections accepted on the proxy listeners.")
        in_flight = GaugeMetricFamily(f"{PREFIX}_in_flight_requests",
                                      "Client requests received and not yet answered.")
        idle = GaugeMetricFamily(f"{PREFIX}_upstream_pool_idle_connections",
                                 "Idle upstream connections kept for reuse.")
        active = GaugeMetricFamily(f"{PREFIX}_upstream_active_requests",
                                   "Requests in progress to each Connector's upstream.", labels=connector)
        queued = GaugeMetricFamily(f"{PREFIX}_upstream_queued_requests",
                                   "Requests waiting for a Connector's concurrency limit.", labels=connector)
        admitted = CounterMetricFamily(f"{PREFIX}_limit_admitted", "Requests let through a Connector's limit.",
                                       labels=connector)
        rejected = CounterMetricFamily(f"{PREFIX}_limit_rejected",
                                       "Requests refused (503) because a Connector's queue was full.",
                                       labels=connector)
        timed_out = CounterMetricFamily(f"{PREFIX}_limit_timeouts",
                                        "Requests refused (503) after waiting too long in a Connector's queue.",
                                        labels=connector)
        draining = GaugeMetricFamily(f"{PREFIX}_draining", "1 while the daemon drains before exiting.")
        reviews = CounterMetricFamily(f"{PREFIX}_review_cache_lookups",
                                      "Identity review cache lookups (token: TokenReview, "
                                      "access: SubjectAccessReview), by hit or miss.", labels=["review", "result"])
        families: list[Metric] = [connections, opened, in_flight, idle, active, queued, admitted, rejected,
                                  timed_out, draining, reviews]
        if empty:
            return families
        # Every label set is present (at 0) from the start, so rates work at
        # once: the counts are the caches' own (kube.identity.ReviewCache).
        for review in REVIEWS:
            for result, attribute in (("hit", "hits"), ("miss", "misses")):
                total = sum(getattr(cache, attribute, 0) for r, cache in self.review_caches if r == review)
                reviews.add_metric([review, result], total)
        if self.sites:
            channels = [c for site in self.sites for c in site.channels]
            connections.add_metric([], len(channels))
            opened.add_metric([], sum(site.opened for site in self.sites))
            in_flight.add_metric([], sum(len(c.requests) for c in channels))
        if self.agents:
            idle.add_metric([], sum(_pool_idle(a) for a in self.agents))
        for limiter in self.limiters:
            for key, lane in _lanes(limiter):
                labels = list(_split(key))
                active.add_metric(labels, lane.active)
                queued.add_metric(labels, lane.n_waiting)
                admitted.add_metric(labels, lane.admitted)
                rejected.add_metric(labels, lane.rejected)
                timed_out.add_metric(labels, lane.timed_out)
        if self.drainers:
            draining.add_metric([], float(any(d.draining for d in self.drainers)))
        return families


def _lanes(limiter: Any) -> Iterator[tuple[Hashable, Any]]:
    return limiter.lanes()  # type: ignore[no-any-return]


class MetricsResource(Resource):
    """C{/metrics}: the registry in the format the scraper asks for (Prometheus text by default)."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        encoder, content_type = choose_encoder((request.getHeader(b"accept") or b"").decode("latin-1"))
        request.setHeader(b"Content-Type", content_type.encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-store")
        return encoder(self.registry)
