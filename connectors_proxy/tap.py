# -*- test-case-name: tests.test_tap -*-
"""
The twistd wiring: command-line options (SPEC section 3) and the service
tree they describe.

Option errors, unreadable files and invalid manifests are reported as one
line on stderr with a non-zero exit, before anything listens.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from twisted.application.service import IServiceCollection
from twisted.application.strports import service as strport_service
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.python.reflect import namedAny

from connectors_proxy.auth.interfaces import IIdentityVerifier
from connectors_proxy.model.protocols import PROTOCOLS
from connectors_proxy.model.state import Store
from connectors_proxy.ops import drain, logformat, sdnotify
from connectors_proxy.ops.admin import admin_resource
from connectors_proxy.ops.metrics import ProxyMetrics
from connectors_proxy.protocols import ProtocolResource
from connectors_proxy.router import ConnectorsResource
from connectors_proxy.server import limits
from connectors_proxy.server.channel import ProxySite
from connectors_proxy.sources.manifests import ManifestError, ManifestSource
from connectors_proxy.tls.serve import TLSServerEndpoint
from connectors_proxy.tls.upstream import upstream_policy
from connectors_proxy.upstream.agents import Agents, ConnectorAgents
from connectors_proxy.upstream.timeouts import UpstreamTimeouts

log = Logger()

EXAMPLES = os.path.join(os.path.dirname(__file__), "examples")
EXAMPLE_MANIFESTS = os.path.join(EXAMPLES, "manifests")
EXAMPLE_TOKENS = os.path.join(EXAMPLES, "tokens.csv")

# The default listeners.  With the bundled examples, whose tokens are in the
# README for anyone to use, they bind loopback only.
DEFAULT_LISTEN = "tcp:8080"
DEFAULT_ADMIN = "tcp:9090"
DEMO_LISTEN = "tcp:8080:interface=127.0.0.1"
DEMO_ADMIN = "tcp:9090:interface=127.0.0.1"


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "connectors-proxy: secretless access to Git servers, OCI registries and REST APIs. "
        "With no --manifests, --kubeconfig or --in-cluster it runs in standalone mode on the "
        "bundled example manifests."
    )
    optFlags = [
        ["in-cluster", None, "Cluster mode, configured from the Pod's ServiceAccount."],
        ["leader-elect", None, "Cluster mode: only the Lease holder writes Services and status."],
    ]
    optParameters = [
        ["admin", None, None, f"Endpoint of the health and metrics listener (default {DEFAULT_ADMIN}; "
                              f"{DEMO_ADMIN} on the bundled examples)."],
        ["tokens", None, None, "Standalone client tokens: CSV lines token,user,uid,\"group1,group2\"."],
        ["kubeconfig", None, None, "Cluster mode, configured from this kubeconfig file."],
        ["cluster-domain", None, "cluster.local", "The cluster's DNS domain."],
        ["log-format", None, "text", "text or json."],
        ["log-level", None, "info", "debug, info, warn or error."],
        ["review-cache-seconds", None, "10", "Cluster mode: how long token and access reviews are cached."],
        ["review-stale-seconds", None, "300", "Cluster mode: while the API server is unreachable, serve token "
                                              "and access answers up to this old (the revocation delay during an outage)."],
        ["token-audience", None, None, "Cluster mode: audiences TokenReview checks (comma-separated)."],
        ["lease-namespace", None, None, "Cluster mode: namespace of the leader-election Lease."],
        ["idle-timeout", None, "60", "Seconds an idle client connection is kept."],
        ["upstream-timeout", None, "60", "Seconds an upstream may take to send its response headers "
                                         "(after the request body); then 504 (0: no limit)."],
        ["upstream-idle-timeout", None, "60", "Seconds without a byte in the middle of an upstream "
                                              "response body before it is cut (0: no limit)."],
        ["drain-timeout", None, "30", "On SIGTERM, seconds requests in flight may take to finish before exit."],
        ["max-concurrent-per-connector", None, str(limits.DEFAULT_MAX_ACTIVE),
         "Requests in progress to one Connector's upstream at a time (0: no limit)."],
        ["queue-per-connector", None, str(limits.DEFAULT_MAX_QUEUE),
         "Requests waiting for one Connector past its limit; more get 503 with Retry-After."],
        ["queue-timeout", None, str(limits.DEFAULT_QUEUE_TIMEOUT),
         "Seconds a request waits in a Connector's queue before it gets 503."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["manifests"] = []

    def opt_listen(self, endpoint: str) -> None:
        """Endpoint to serve the proxy on (repeatable; default tcp:8080, loopback only on the bundled examples)."""
        self["listen"].append(endpoint)

    def opt_manifests(self, path: str) -> None:
        """YAML file or folder of ConnectorClass/Connector/Secret objects (repeatable): standalone mode."""
        self["manifests"].append(path)

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            fail(f"{e} (see --help)")

    def postOptions(self) -> None:
        # The bundled examples with their public tokens: anyone who can reach
        # the port could use them, so listen where only this machine can.
        # Given endpoints are kept as they are: the operator chose them.
        demo = not (self["manifests"] or self["tokens"] or self["kubeconfig"] or self["in-cluster"])
        self["loopback"] = []  # the defaulted endpoints that bind loopback, for the startup line
        if not self["listen"]:
            self["listen"] = [DEMO_LISTEN if demo else DEFAULT_LISTEN]
            if demo:
                self["loopback"].append(DEMO_LISTEN)
        if self["admin"] is None:
            self["admin"] = DEMO_ADMIN if demo else DEFAULT_ADMIN
            if demo:
                self["loopback"].append(f"admin {DEMO_ADMIN}")
        if self["log-format"] not in ("text", "json"):
            raise usage.UsageError(f"--log-format must be text or json, not {self['log-format']!r}")
        if self["log-level"] not in logformat.LEVELS:
            raise usage.UsageError(f"--log-level must be one of {', '.join(logformat.LEVELS)}")
        for option, endpoint in [("--listen", e) for e in self["listen"]] + [("--admin", self["admin"])]:
            check_endpoint(option, endpoint)
        for name in ("review-cache-seconds", "review-stale-seconds", "idle-timeout", "drain-timeout", "queue-timeout",
                     "upstream-timeout", "upstream-idle-timeout"):
            try:
                self[name] = float(self[name])
            except ValueError:
                raise usage.UsageError(f"--{name} must be a number of seconds") from None
            if self[name] < 0:
                raise usage.UsageError(f"--{name} must not be negative")
        for name in ("max-concurrent-per-connector", "queue-per-connector"):
            try:
                self[name] = int(self[name])
            except ValueError:
                raise usage.UsageError(f"--{name} must be a whole number") from None
            if self[name] < 0:
                raise usage.UsageError(f"--{name} must not be negative")
        cluster = bool(self["kubeconfig"] or self["in-cluster"])
        if cluster and self["manifests"]:
            raise usage.UsageError("--manifests (standalone) and --kubeconfig/--in-cluster (cluster) exclude each other")
        if cluster and self["tokens"]:
            raise usage.UsageError("--tokens is for standalone mode; cluster mode uses TokenReview")
        if self["leader-elect"] and not cluster:
            raise usage.UsageError("--leader-elect needs cluster mode (--kubeconfig or --in-cluster)")
        self["mode"] = "cluster" if cluster else "standalone"
        self["examples"] = not cluster and not self["manifests"]
        if self["examples"]:
            self["manifests"] = [EXAMPLE_MANIFESTS]
            if not self["tokens"]:
                self["tokens"] = EXAMPLE_TOKENS
        if not cluster and self["tokens"] is None:
            raise usage.UsageError("standalone mode needs --tokens FILE (the clients' tokens)")


def check_endpoint(option: str, description: str) -> None:
    """Parse an endpoint string now, so a typo is one line rather than a traceback at start."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString
    try:
        serverFromString(reactor, description)
    except Exception as e:
        raise usage.UsageError(f"{option} {description!r}: {e}") from None


def fail(message: str) -> NoReturn:
    """One line on stderr and a non-zero exit: never a traceback."""
    sys.stderr.write(f"connectors-proxy: {message}\n")
    sys.stderr.flush()
    raise SystemExit(2)


class ProxyService(drain.DrainingService):
    """
    The daemon's service tree.  When twistd parents it to its application,
    it installs the log observer for C{--log-format}.  When stopped, it
    drains the proxy listeners before stopping the rest.
    """

    def __init__(self, observer: ILogObserver | None) -> None:
        super().__init__()
        self.observer = observer

    def setServiceParent(self, parent: IServiceCollection) -> None:  # type: ignore[override]
        if self.observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.observer)
        super().setServiceParent(parent)


def protocol_resources(reactor: Any) -> dict[str, ProtocolResource]:
    """The resource that serves each ConnectorClass protocol, from the registry (in its order)."""
    return {protocol.name: namedAny(protocol.resource)(reactor) for protocol in PROTOCOLS}


def proxy_site(store: Store, verifier: IIdentityVerifier, reactor: Any, cluster_domain: str = "cluster.local",
               idle_timeout: float = 60.0, limiter: limits.ConcurrencyLimiter | None = None,
               agents: Agents | None = None, upstream_timeouts: UpstreamTimeouts | None = None,
               ) -> tuple[ProxySite, ConnectorsResource, Agents]:
    """
    The proxy's site, as the daemon and the integration tests build it.

    @param agents: the upstream agents (default: real ones on C{reactor};
        the in-memory tests pass agents that reach resources in memory).
    @param upstream_timeouts: for the default agents (C{--upstream-timeout},
        C{--upstream-idle-timeout}).
    """
    if agents is None:
        agents = Agents(reactor, upstream_policy, timeouts=upstream_timeouts or UpstreamTimeouts())
    root = ConnectorsResource(store=store, verifier=verifier, agents=ConnectorAgents(agents),
                              protocols=protocol_resources(reactor), cluster_domain=cluster_domain,
                              limiter=limiter)
    return ProxySite(root, reactor, timeout=idle_timeout), root, agents


def make_service(options: Options, reactor: Any = None, signals: bool = False) -> ProxyService:
    """
    @param signals: install the daemon's SIGTERM/SIGINT (drain) and SIGHUP
        (reload) handlers once the reactor runs (twistd does; tests do not).
    """
    if reactor is None:
        from twisted.internet import reactor as _reactor
        reactor = _reactor
    observer = logformat.observer(options["log-format"], options["log-level"], clock=reactor)
    top = ProxyService(observer)
    # Batched access lines reach the stream before the process ends.
    reactor.addSystemEventTrigger("after", "shutdown", observer.flush)
    metrics = ProxyMetrics()
    reloader = drain.Reloader(notify=sdnotify.notify)
    store: Store
    verifier: IIdentityVerifier
    if options["mode"] == "standalone":
        source = ManifestSource(reactor=reactor, paths=options["manifests"], store=Store(),
                                tokens_path=options["tokens"])
        # Loaded before anything listens, so a broken manifest stops the
        # daemon with one line.
        try:
            source.load_now()
        except ManifestError as e:
            fail(str(e))
        source.setServiceParent(top)
        assert source.tokens is not None  # load_now read the token file
        store, verifier = source.store, source.tokens
        source.on_reload.append(lambda ok: metrics.reload("manifests", ok))
        source.on_tokens_reload.append(lambda ok: metrics.reload("tokens", ok))
        metrics.track_source("manifests", lambda: source.last_success)
        reloader.add("manifests and tokens", source.poll)
        if options["examples"]:
            loopback = ""
            if options.get("loopback"):
                loopback = (f"; their tokens are public, so it listens on loopback only"
                            f" ({', '.join(options['loopback'])}): give --manifests and --tokens to serve others")
            log.warn("no --manifests given: serving the bundled examples from {path}{loopback}",
                     path=EXAMPLE_MANIFESTS, loopback=loopback)
    else:
        from connectors_proxy.kube.cluster import cluster_service
        from connectors_proxy.kube.config import KubeConfigError
        try:
            cluster = cluster_service(options, reactor)
        except KubeConfigError as e:
            fail(str(e))
        cluster.setServiceParent(top)
        store, verifier = cluster.store, cluster.verifier
        for review, attribute in (("token", "tokens"), ("access", "access")):
            cache = getattr(verifier, attribute, None)
            if cache is not None:
                metrics.track_review_cache(review, cache)

    limiter = limits.ConcurrencyLimiter(reactor, options["max-concurrent-per-connector"],
                                        options["queue-per-connector"], options["queue-timeout"])
    site, root, agents = proxy_site(store, verifier, reactor, options["cluster-domain"], options["idle-timeout"],
                                    limiter, upstream_timeouts=UpstreamTimeouts(options["upstream-timeout"],
                                                                                options["upstream-idle-timeout"]))
    drainer = drain.Drainer(reactor, options["drain-timeout"], sites=[site], notify=sdnotify.notify)
    top.drainer = drainer
    for endpoint in options["listen"]:
        listener = strport_service(endpoint, site, reactor=reactor)
        listener.setServiceParent(top)
        drainer.listeners.append(listener)
        tls = drain.reloadable_tls(listener, endpoint, reactor)
        if tls is not None:
            reloader.add("certificates", lambda tls=tls: metrics.reload("certificates", tls.reload()))  # type: ignore[misc]
        if isinstance(listener.endpoint, TLSServerEndpoint):
            served = listener.endpoint.tls
            if served.cluster_domain is None:
                served.cluster_domain = options["cluster-domain"]
            # Mint only for Connectors that exist: random SNI names must not
            # make the proxy mint certificates on the reactor thread.
            served.known = lambda ns, name: store.snapshot.connector(ns, name) is not None
            # Its reload is the one reloadable_tls returned above: added once.
    root.observers.append(metrics.observe)
    for resource in root.protocols.values():
        resource.report_to(metrics)
    metrics.track_site(site)
    metrics.track_agents(agents)
    metrics.track_limiter(limiter)
    metrics.track_drain(drainer)

    def ready() -> str | None:
        if drainer.draining:
            return "not ready: draining before exit"
        return None if store.ready else "not ready: objects not loaded yet, or the source is stale"

    admin = ProxySite(admin_resource(ready, metrics.resource()), reactor)
    strport_service(options["admin"], admin, reactor=reactor).setServiceParent(top)
    sdnotify.ReadyNotifier(reactor, lambda: store.ready).setServiceParent(top)
    if signals:
        drain.Signals(reactor, drainer, reloader).setServiceParent(top)
    reactor.addSystemEventTrigger("before", "shutdown", agents.close)
    return top


def makeService(options: Options) -> ProxyService:
    service = make_service(options, signals=True)
    # What is loaded by now (modules, the first objects) lives as long as the
    # process: keep it out of the cycle collector's full passes, which hold
    # the GIL (and so every request) for tens of milliseconds when a reload
    # adds thousands of objects.
    gc.collect()
    gc.freeze()
    return service
