# -*- test-case-name: tests.test_daemon,tests.test_kube_config -*-
"""
The twistd wiring: command-line options (README.md, "Command line") and the service
tree they describe.

Option errors, unreadable files and invalid manifests are reported as one
line on stderr with a non-zero exit, before anything listens.
"""

from __future__ import annotations

import errno
import gc
import os
import re
import signal
import sys
from collections.abc import Sequence
from typing import IO, Any, NoReturn

from attrs import evolve
from twisted.application.service import IServiceCollection, Service
from twisted.application.strports import service as strport_service
from twisted.internet.defer import Deferred
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.python.reflect import namedAny

from connectors_proxy.auth.interfaces import IIdentityVerifier
from connectors_proxy.auth.rego import RegoHooks, WorkerPool
from connectors_proxy.model.objects import ObjectRef
from connectors_proxy.model.protocols import PROTOCOLS
from connectors_proxy.model.state import Snapshot, Store
from connectors_proxy.ops import drain, logformat, sdnotify
from connectors_proxy.ops.admin import admin_resource
from connectors_proxy.ops.metrics import ProxyMetrics
from connectors_proxy.protocols import ProtocolResource
from connectors_proxy.router import ConnectorsResource, forward_unlisted_policy
from connectors_proxy.server import limits
from connectors_proxy.server.channel import ProxySite
from connectors_proxy.sources import lint
from connectors_proxy.sources.manifests import ManifestError, ManifestSource
from connectors_proxy.tls.intercept import InterceptTLS
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
        ["strict", None, "Standalone mode: refuse to start on manifests with a misspelled kind or field "
                         "(default: a warning)."],
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
        ["reconcile", None, "all", "Cluster mode: all (keep each Connector's Service and status) or none (write "
                                   "nothing, only serve: beside the upstream connectors-controller-manager)."],
        ["metrics-bind-address", None, None, "The upstream Deployment's flag: the health and metrics listener as "
                                             "[HOST]:PORT (':8443' is --admin tcp:8443; '0' keeps the default)."],
        ["kube-api-qps", None, None, "Cluster mode: Kubernetes writes per second on average (upstream's "
                                     "-kube-api-qps; default 100)."],
        ["kube-api-burst", None, None, "Cluster mode: Kubernetes writes at once (upstream's -kube-api-burst; "
                                       "default twice the qps)."],
        ["idle-timeout", None, "60", "Seconds an idle client connection is kept."],
        ["proxy-ca-cert", None, None, "CA certificate (PEM) that signs the certificates CONNECT interception presents "
                                      "for listed Connectors' hosts; clients trust it (published at the admin "
                                      "listener's /ca.crt). Read again when it changes."],
        ["proxy-ca-key", None, None, "The private key of --proxy-ca-cert (PEM, unencrypted)."],
        ["forward-unlisted", None, "allow", "Forward-proxy targets under no listed Connector: allow (relayed without "
                                            "credentials, as upstream) or deny (403).", forward_unlisted_policy],
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

    def opt_version(self) -> NoReturn:
        """Print connectors-proxy's version and exit."""
        import importlib.metadata
        import platform

        import twisted
        try:
            version = importlib.metadata.version("connectors-proxy")
        except importlib.metadata.PackageNotFoundError:
            version = "(not installed)"
        sys.stdout.write(f"connectors-proxy {version} (Twisted {twisted.__version__}, "
                         f"Python {platform.python_version()})\n")
        sys.stdout.flush()
        raise SystemExit(0)

    def opt_manifests(self, path: str) -> None:
        """YAML file or folder of ConnectorClass/Connector/Secret objects (repeatable): standalone mode."""
        self["manifests"].append(path)

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        if options is None:
            options = sys.argv[1:]
        try:
            super().parseOptions(go_style_flags(options, self.longOpt))
        except usage.UsageError as e:
            fail(f"{e} (see --help)")

    def postOptions(self) -> None:
        metrics = self["metrics-bind-address"]
        # controller-runtime reads "0" as "no metrics listener"; ours also
        # answers the health probes, so it keeps its default instead.
        if metrics is not None and metrics.strip() not in ("0", ""):
            if self["admin"] is not None:
                raise usage.UsageError("--admin and --metrics-bind-address both name the admin listener: give one")
            self["admin"] = admin_endpoint(metrics)
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
        for name in ("kube-api-qps", "kube-api-burst"):
            if self[name] is None:
                continue
            try:
                self[name] = float(self[name])
            except ValueError:
                raise usage.UsageError(f"--{name} must be a number") from None
            if self[name] <= 0:
                raise usage.UsageError(f"--{name} must be positive")
        if (self["proxy-ca-cert"] is None) != (self["proxy-ca-key"] is None):
            raise usage.UsageError("--proxy-ca-cert and --proxy-ca-key go together")
        if self["reconcile"] not in ("all", "none"):
            raise usage.UsageError(f"--reconcile must be all or none, not {self['reconcile']!r}")
        cluster = bool(self["kubeconfig"] or self["in-cluster"])
        if self["reconcile"] == "none" and not cluster:
            raise usage.UsageError("--reconcile none is for cluster mode (--kubeconfig or --in-cluster)")
        if self["reconcile"] == "none" and self["leader-elect"]:
            raise usage.UsageError("--leader-elect elects the replica that writes, and --reconcile none writes "
                                   "nothing: give one")
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


def go_style_flags(argv: Sequence[str], long_options: Sequence[str]) -> list[str]:
    """
    C{argv} with Go-style single-dash long options (C{-kube-api-qps=60}, as
    the upstream Deployment passes them) spelt the GNU way
    (C{--kube-api-qps=60}), for any of C{long_options} (as
    L{usage.Options.longOpt} lists them: C{"name="} for a parameter).
    Arguments after C{--} are left alone.
    """
    names = {option.rstrip("=") for option in long_options if len(option.rstrip("=")) > 1}
    out: list[str] = []
    args = list(argv)
    for i, arg in enumerate(args):
        if arg == "--":
            return out + args[i:]
        if arg.startswith("-") and not arg.startswith("--") and arg[1:].split("=", 1)[0] in names:
            arg = "-" + arg
        out.append(arg)
    return out


def admin_endpoint(address: str) -> str:
    """
    The server endpoint for a Go listen address (C{--metrics-bind-address}):
    C{:8443} -> C{tcp:8443}; C{127.0.0.1:8443} -> C{tcp:8443:interface=127.0.0.1};
    C{[::1]:8443} -> C{tcp6:8443:interface=\\:\\:1}.

    @raise usage.UsageError: not C{[HOST]:PORT}.
    """
    host, sep, port = address.strip().rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise usage.UsageError(f"--metrics-bind-address {address!r} must be [HOST]:PORT, e.g. :8443")
    if host.startswith("[") and host.endswith("]"):
        # Endpoint strings separate fields with ':', so an IPv6 address escapes its own.
        escaped = host[1:-1].replace(":", "\\:")
        return f"tcp6:{port}:interface={escaped}"
    if ":" in host or "=" in host or "\\" in host:
        raise usage.UsageError(f"--metrics-bind-address {address!r}: write an IPv6 host in brackets, [::1]:8443")
    return f"tcp:{port}:interface={host}" if host else f"tcp:{port}"


def check_endpoint(option: str, description: str) -> None:
    """Parse an endpoint string now, so a typo is one line rather than a traceback at start."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString
    try:
        serverFromString(reactor, description)
    except Exception as e:
        raise usage.UsageError(f"{option} {description!r}: {endpoint_problem(e)}") from None


_NOT_A_NUMBER = re.compile(r"invalid literal for int\(\) with base \d+: (.*)")


def endpoint_problem(error: Exception) -> str:
    """What is wrong with an endpoint string, from the error Twisted's parser raised."""
    text = str(error) or error.__class__.__name__
    match = _NOT_A_NUMBER.match(text)
    if match:
        return (f"{match.group(1)} is not a port number (write e.g. tcp:8080, "
                "tcp:8080:interface=127.0.0.1 or ssl:8443:privateKey=key.pem:certKey=cert.pem)")
    return text


def log_stream(twistd: Any) -> IO[str] | None:
    """
    Where the log goes, as twistd's own options say (C{twistd} is its
    L{usage.Options}, our options' parent; C{None} when run otherwise):
    C{--logfile FILE} (rotated on C{SIGUSR1}, as twistd does), stdout for
    C{-n} or C{--logfile -}, and C{twistd.log} for a daemon, as twistd
    would.  C{None} (stdout) also for C{--syslog}, which twistd does not
    offer with our observer installed.
    """
    if twistd is None:
        return None
    name = twistd.get("logfile")
    if name == "-" or (not name and twistd.get("nodaemon")) or twistd.get("syslog"):
        return None
    from twisted.python.logfile import LogFile
    try:
        stream = LogFile.fromFullPath(name or "twistd.log")
    except OSError as e:
        fail(f"--logfile {name or 'twistd.log'}: cannot open ({e.strerror})")
    if not signal.getsignal(signal.SIGUSR1):
        def rotate(number: int, frame: Any) -> None:
            from twisted.internet import reactor
            reactor.callFromThread(stream.rotate)  # type: ignore[attr-defined]
        signal.signal(signal.SIGUSR1, rotate)
    return stream  # type: ignore[return-value]


def fail(message: str) -> NoReturn:
    """One line on stderr and a non-zero exit: never a traceback."""
    sys.stderr.write(f"connectors-proxy: {message}\n")
    sys.stderr.flush()
    raise SystemExit(2)


def load_manifests(source: ManifestSource, paths: Sequence[str], strict: bool) -> None:
    """
    The first load, before anything listens: an invalid manifest stops the
    daemon with one line; likely mistakes (a misspelled kind or field) are
    warnings, or with C{strict} stop it too; then one line says what was
    loaded, and loudly when that is no Connector at all.
    """
    error: ManifestError | None = None
    # Linted as loaded: each document is decoded once, for both.
    with source.parser.keeping() as documents:
        try:
            source.load_now()
        except ManifestError as e:
            error = e
    problems = lint.lint_documents(documents)
    mistakes = [problem for problem in problems if problem.mistake]
    if error is not None:
        # A misspelled field is often why a required one is missing.
        fail(f"{error}" + (f" (and {mistakes[0]})" if mistakes else ""))
    if strict and mistakes:
        more = f"; {len(mistakes) - 1} more" if len(mistakes) > 1 else ""
        fail(f"{mistakes[0]} (refused by --strict{more})")
    for problem in problems:
        log.warn("{problem}", problem=str(problem), event="manifest_problem")
    snapshot = source.store.snapshot
    where = ", ".join(paths)
    log.info("loaded {classes} classes, {connectors} connectors, {secrets} secrets from {paths}",
             classes=len(snapshot.classes), connectors=len(snapshot.connectors), secrets=len(snapshot.secrets),
             paths=where, event="manifests_loaded")
    if not snapshot.connectors:
        # Still ready (the daemon works; Connectors may come with the next
        # edit), but every request will get 404 until then.
        log.warn("no Connector in {paths}: every request gets 404 until one is added "
                 "(check the paths and each document's kind)", paths=where, event="no_connectors")


# The bundled Connector default/self: its upstream is the admin listener at
# its default address, so that the README's first curl works offline.
EXAMPLE_SELF = ObjectRef("default", "self")
EXAMPLE_SELF_ADDRESS = "http://127.0.0.1:9090"


def loopback_url(endpoint: str) -> str | None:
    """
    C{http://HOST:PORT} at which this machine reaches the C{tcp:} (or
    C{tcp6:}) server endpoint C{endpoint}; C{None} for other kinds
    (C{unix:}, C{systemd:}, TLS) and for port 0.
    """
    parts = [part.replace("\\:", ":") for part in re.split(r"(?<!\\):", endpoint)]
    kind = parts[0].lower()
    if kind not in ("tcp", "tcp6"):
        return None
    positional = [part for part in parts[1:] if "=" not in part]
    keywords = dict(part.split("=", 1) for part in parts[1:] if "=" in part)
    port = keywords.get("port") or (positional[0] if positional else "")
    interface = keywords.get("interface") or (positional[1] if len(positional) > 1 else "")
    if not port.isdigit() or int(port) == 0:
        return None
    if interface in ("", "0.0.0.0", "::"):
        interface = "::1" if kind == "tcp6" or interface == "::" else "127.0.0.1"
    host = f"[{interface}]" if ":" in interface else interface
    return f"http://{host}:{int(port)}"


def follow_admin(store: Store, admin: str) -> None:
    """
    Point the bundled Connector default/self at the admin listener wherever
    C{--admin} put it (not at whatever else listens on 127.0.0.1:9090).
    """
    url = loopback_url(admin)
    if url == EXAMPLE_SELF_ADDRESS:
        return
    if url is None:
        log.warn("the bundled Connector default/self reaches the admin listener over TCP; --admin {admin} is not "
                 "a TCP port of this machine, so requests to it will fail", admin=admin)
        return

    def retarget(snapshot: Snapshot) -> None:
        connector = snapshot.connectors.get(EXAMPLE_SELF)
        if connector is not None and connector.address == EXAMPLE_SELF_ADDRESS:
            store.snapshot = evolve(snapshot, connectors={**snapshot.connectors,
                                                          EXAMPLE_SELF: evolve(connector, address=url)})

    store.listen(retarget)
    retarget(store.snapshot)


def reload_certificates(tls: Any, metrics: ProxyMetrics) -> bool:
    """Read a listener's certificate again (C{SIGHUP}); whether that worked (the failure is logged)."""
    ok = bool(tls.reload())
    metrics.reload("certificates", ok)
    return ok


class ProxyService(drain.DrainingService):
    """
    The daemon's service tree.  When twistd parents it to its application,
    it installs the log observer for C{--log-format}.  When stopped, it
    drains the proxy listeners before stopping the rest.
    """

    def __init__(self, observer: ILogObserver | None, json_logs: bool = False) -> None:
        super().__init__()
        self.observer = observer
        self.json_logs = json_logs
        # The listening services, and how the command line named each
        # (C{--listen tcp:8080}), for the one line a failure to listen gets.
        self.endpoints: dict[Any, str] = {}

    def setServiceParent(self, parent: IServiceCollection) -> None:  # type: ignore[override]
        if self.observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.observer)
        super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        # twistd listens here (before it drops privileges).  A port in use
        # is an operator's everyday mistake: one line naming the endpoint
        # and the cause, exit 2, instead of twistd's traceback.
        Service.privilegedStartService(self)
        for service in self:
            try:
                service.privilegedStartService()
            except Exception as e:
                what = self.endpoints.get(service)
                if what is None:
                    raise
                self.startup_failed(f"cannot listen on {what}: {listen_error(e)}")

    def startup_failed(self, message: str) -> NoReturn:
        """Stop before serving: one line on stderr, or with JSON logs one JSON line on the log stream; exit 2."""
        if self.json_logs and self.observer is not None:
            log.critical("connectors-proxy: {error}", error=message, event="startup_failed")
            flush = getattr(self.observer, "flush", None)
            if flush is not None:
                flush()
            raise SystemExit(2)
        # twistd has pointed sys.stderr at the log by now: the real one.
        stderr = sys.__stderr__ or sys.stderr
        stderr.write(f"connectors-proxy: {message}\n")
        stderr.flush()
        raise SystemExit(2)


def listen_error(error: Exception) -> str:
    """Why listening failed, in words an operator can act on."""
    reason = getattr(error, "socketError", None)
    if isinstance(reason, OSError):
        if reason.errno == errno.EADDRINUSE:
            return "the address is already in use (another process listens there: stop it or choose another port)"
        if reason.errno == errno.EACCES:
            return "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
        if reason.errno == errno.EADDRNOTAVAIL:
            return "the interface address is not one of this machine's"
        return (reason.strerror or str(reason)).lower() if reason.strerror else str(reason)
    return str(error) or error.__class__.__name__


def protocol_resources(reactor: Any) -> dict[str, ProtocolResource]:
    """The resource that serves each ConnectorClass protocol, from the registry (in its order)."""
    return {protocol.name: namedAny(protocol.resource)(reactor) for protocol in PROTOCOLS}


def proxy_site(store: Store, verifier: IIdentityVerifier, reactor: Any, cluster_domain: str = "cluster.local",
               idle_timeout: float = 60.0, limiter: limits.ConcurrencyLimiter | None = None,
               agents: Agents | None = None, upstream_timeouts: UpstreamTimeouts | None = None,
               forward_unlisted: str = "allow", intercept: InterceptTLS | None = None,
               ) -> tuple[ProxySite, ConnectorsResource, Agents]:
    """
    The proxy's site, as the daemon and the integration tests build it.

    @param intercept: the CA that intercepts C{CONNECT} to listed Connectors
        (C{--proxy-ca-cert}, C{--proxy-ca-key}); C{None}: such a C{CONNECT} gets 503.

    @param agents: the upstream agents (default: real ones on C{reactor};
        the in-memory tests pass agents that reach resources in memory).
    @param upstream_timeouts: for the default agents (C{--upstream-timeout},
        C{--upstream-idle-timeout}).
    """
    if agents is None:
        agents = Agents(reactor, upstream_policy, timeouts=upstream_timeouts or UpstreamTimeouts())
    root = ConnectorsResource(store=store, verifier=verifier, agents=ConnectorAgents(agents),
                              protocols=protocol_resources(reactor), cluster_domain=cluster_domain,
                              limiter=limiter, forward_unlisted=forward_unlisted, intercept=intercept,
                              rego=RegoHooks(WorkerPool(reactor)))
    return ProxySite(root, reactor, timeout=idle_timeout), root, agents


def make_service(options: Options, reactor: Any = None, signals: bool = False) -> ProxyService:
    """
    @param signals: install the daemon's SIGTERM/SIGINT (drain) and SIGHUP
        (reload) handlers once the reactor runs (twistd does; tests do not).
    """
    if reactor is None:
        from twisted.internet import reactor as _reactor
        reactor = _reactor
    observer = logformat.observer(options["log-format"], options["log-level"],
                                  stream=log_stream(getattr(options, "parent", None)), clock=reactor)
    top = ProxyService(observer, json_logs=options["log-format"] == "json")
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
        load_manifests(source, options["manifests"], options["strict"])
        source.setServiceParent(top)
        assert source.tokens is not None  # load_now read the token file
        store, verifier = source.store, source.tokens
        source.on_reload.append(lambda ok: metrics.reload("manifests", ok))
        source.on_tokens_reload.append(lambda ok: metrics.reload("tokens", ok))
        health = drain.SourceHealth()
        source.on_reload.append(health.reporter("manifests"))
        source.on_tokens_reload.append(health.reporter("token file"))
        metrics.track_source("manifests", lambda: source.last_success)

        async def reload_sources() -> bool:
            await source.poll()
            # A broken file says why in the log (once); SIGHUP must not add "reloaded".
            return health.ok("manifests", "token file")

        reloader.add("manifests and tokens", lambda: Deferred.fromCoroutine(reload_sources()))
        if options["examples"]:
            follow_admin(source.store, options["admin"])
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
    intercept = None
    if options.get("proxy-ca-cert"):
        for option in ("proxy-ca-cert", "proxy-ca-key"):
            if not os.access(options[option], os.R_OK):
                fail(f"--{option} {options[option]}: cannot read it")
        try:
            intercept = InterceptTLS(options["proxy-ca-cert"], options["proxy-ca-key"], reactor)
        except ValueError as e:
            fail(f"--proxy-ca-cert/--proxy-ca-key: {e}")
        # The files are read again every second (a rotated Secret), and on SIGHUP.
        reactor.callWhenRunning(intercept.start)
        reactor.addSystemEventTrigger("before", "shutdown", intercept.stop)
        reloader.add("certificates", lambda: reload_certificates(intercept, metrics))
    site, root, agents = proxy_site(store, verifier, reactor, options["cluster-domain"], options["idle-timeout"],
                                    limiter, upstream_timeouts=UpstreamTimeouts(options["upstream-timeout"],
                                                                                options["upstream-idle-timeout"]),
                                    forward_unlisted=options["forward-unlisted"], intercept=intercept)
    drainer = drain.Drainer(reactor, options["drain-timeout"], sites=[site], notify=sdnotify.notify)
    top.drainer = drainer
    for endpoint in options["listen"]:
        listener = strport_service(endpoint, site, reactor=reactor)
        top.endpoints[listener] = f"--listen {endpoint}"
        listener.setServiceParent(top)
        drainer.listeners.append(listener)
        tls = drain.reloadable_tls(listener, endpoint, reactor)
        if tls is not None:
            reloader.add("certificates", lambda tls=tls: reload_certificates(tls, metrics))  # type: ignore[misc]
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

    admin = ProxySite(admin_resource(ready, metrics.resource(), ca=intercept.ca_pem if intercept else None),
                      reactor)
    admin_listener = strport_service(options["admin"], admin, reactor=reactor)
    top.endpoints[admin_listener] = f"--admin {options['admin']}"
    admin_listener.setServiceParent(top)
    sdnotify.ReadyNotifier(reactor, lambda: store.ready).setServiceParent(top)
    if signals:
        drain.Signals(reactor, drainer, reloader).setServiceParent(top)
    reactor.addSystemEventTrigger("before", "shutdown", agents.close)
    # Rego evaluator processes (started only if a class has hooks).
    reactor.addSystemEventTrigger("before", "shutdown", root.rego.stop)
    if root.forward_agents is not None:
        reactor.addSystemEventTrigger("before", "shutdown", root.forward_agents.close)
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
