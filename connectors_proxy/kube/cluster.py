# -*- test-case-name: tests.test_kube_writer,tests.test_kube_e2e,tests.test_custom_ca -*-
"""
Cluster mode for the daemon: one Twisted service that watches the cluster,
feeds the proxy's L{Store}, keeps proxy Services and Connector status
right, and answers client identity questions with the API server.

Watches (all namespaces):
  - Connectors and ConnectorClasses;
  - Secrets, except the two kinds that are large, numerous and never a
    tool credential (Helm release records and legacy service account
    tokens), filtered on the server by field selector.  One cluster-wide
    watch is chosen over watching only referenced Secrets because a Secret
    can be referenced (or created after the Connector that names it) at any
    moment and must be usable within 2 s; per-Secret watches would mean one
    connection per Secret.  RBAC: C{list}, C{watch} on C{secrets}
    cluster-wide.
  - Services labelled C{app.kubernetes.io/managed-by=connectors-proxy}, to
    put back a proxy Service edited or deleted by hand.

The Secrets watch also brings the install namespace's Secrets labelled
C{connectors.cpaas.io/ca-cert: "true"}: with upstream's
C{enable-custom-ca-certs} on, they join every Connector's tool CA pool
(L{connectors_proxy.tls.capool}) and Connectors get C{CACertReady}.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, gatherResults, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel
from zope.interface import implementer

from connectors_proxy.auth.rego import PolicyChecks, WorkerPool, class_policies
from connectors_proxy.kube.client import (
    CONNECTOR_CLASSES,
    CONNECTORS,
    JSON,
    SECRETS,
    SERVICES,
    IKubeClient,
    KubeClient,
)
from connectors_proxy.kube.config import KubeConfig, load_in_cluster, load_kubeconfig
from connectors_proxy.kube.flags import FeatureFlagWatch
from connectors_proxy.kube.identity import KubeIdentityVerifier
from connectors_proxy.kube.leader import LeaderElector
from connectors_proxy.kube.reconcile import MANAGED_BY, MANAGED_BY_LABEL, World, connector_name_of_service
from connectors_proxy.kube.reflector import Key, Reflector, strip_managed_fields
from connectors_proxy.kube.writer import IInventory, Writer
from connectors_proxy.model.flags import DEFAULTS, FeatureFlags
from connectors_proxy.model.objects import (
    Connector,
    ConnectorClass,
    InvalidObject,
    ObjectRef,
    Secret,
    parse_connector,
    parse_connector_class,
    parse_secret,
)
from connectors_proxy.model.state import Snapshot, Store, ca_cert_secrets

log = Logger()

SECRET_FIELD_SELECTOR = "type!=helm.sh/release.v1,type!=kubernetes.io/service-account-token"
SERVICE_LABEL_SELECTOR = f"{MANAGED_BY_LABEL}={MANAGED_BY}"


def _parsed(kind: str, parse: Any) -> Any:
    """A reflector transform that parses, and logs (once per change) what is invalid."""

    def transform(obj: JSON) -> Any:
        try:
            return parse(obj)
        except InvalidObject as e:
            log.emit(LogLevel.warn, "skipping invalid {kind}: {error}", kind=kind, error=str(e))
            return e
    return transform


def _connector_entry(obj: JSON) -> tuple[JSON, Connector | InvalidObject]:
    raw = strip_managed_fields(obj)
    return raw, _parsed("Connector", parse_connector)(raw)


@implementer(IInventory)
class Inventory:
    """
    The four reflectors and what is derived from them: the proxy's
    L{Snapshot}, the reconcile L{World}, and which Connectors an event
    concerns.
    """

    def __init__(self, client: IKubeClient, reactor: Any, store: Store,
                 cluster_domain: str = "cluster.local", serve_tls: bool = False,
                 stale_after: float = 60.0, watch_timeout: int = 300,
                 policy_checks: PolicyChecks | None = None, install_namespace: str | None = None) -> None:
        self.reactor = reactor
        #: Where labelled CA Secrets join the tool CA pool (C{None}: nowhere).
        self.install_namespace = install_namespace
        #: Upstream's feature flags, as L{set_flags} was last told.
        self.flags: FeatureFlags = DEFAULTS
        #: Compiles classes' Rego policies (in evaluator processes) for
        #: their Connectors' status; C{None}: not checked.
        self.policy_checks = policy_checks
        self.store = store
        self.cluster_domain = cluster_domain
        self.serve_tls = serve_tls

        def reflector(resource: Any, transform: Any, **kw: Any) -> Reflector:
            r = Reflector(client, reactor, resource, transform=transform,
                          stale_after=stale_after, watch_timeout=watch_timeout, **kw)
            r.listen_state(self._state_changed)
            return r

        self.connectors = reflector(CONNECTORS, _connector_entry)
        self.classes = reflector(CONNECTOR_CLASSES, _parsed("ConnectorClass", parse_connector_class))
        self.secrets = reflector(SECRETS, _parsed("Secret", parse_secret),
                                 field_selector=SECRET_FIELD_SELECTOR)
        self.services = reflector(SERVICES, strip_managed_fields,
                                  label_selector=SERVICE_LABEL_SELECTOR)
        self.reflectors = (self.connectors, self.classes, self.secrets, self.services)

        self._valid_connectors: dict[ObjectRef, Connector] = {}
        self._valid_classes: dict[str, ConnectorClass] = {}
        self._invalid_classes: dict[str, str] = {}
        self._valid_secrets: dict[ObjectRef, Secret] = {}
        self._invalid_secrets: dict[ObjectRef, str] = {}
        self._invalid_policies: dict[str, str] = {}
        self._by_class: dict[str, set[Key]] = {}
        self._by_secret: dict[ObjectRef, set[Key]] = {}
        self._by_ca_secret: dict[ObjectRef, set[Key]] = {}
        self._ca_secrets: dict[ObjectRef, Secret] = {}
        self._rebuild_call: IDelayedCall | None = None
        self.snapshots = 0
        #: Another reason to answer "not ready" (identity reviews failing for
        #: long); set by L{ClusterMode}, which calls L{update_ready} when it changes.
        self.also_stale: Any = lambda: False
        #: Connector keys an event concerns; set by L{ClusterMode}.
        self.on_dirty: Any = None

        self.connectors.listen(self._connector_event)
        self.classes.listen(self._class_event)
        self.secrets.listen(self._secret_event)
        self.services.listen(self._service_event)

    # -- IInventory -----------------------------------------------------------

    def connector(self, key: Key) -> tuple[JSON, Connector | InvalidObject] | None:
        value: tuple[JSON, Connector | InvalidObject] | None = self.connectors.get(key)
        return value

    def service(self, key: Key) -> JSON | None:
        value: JSON | None = self.services.get(key)
        return value

    def world(self) -> World:
        return World(self._valid_classes, self._invalid_classes, self._valid_secrets,
                     self._invalid_secrets, self.cluster_domain, self.serve_tls,
                     dict(self._invalid_policies), custom_ca_certs=self.flags.custom_ca_certs)

    def connector_keys(self) -> Iterable[Key]:
        return list(self.connectors.items)

    # -- state ----------------------------------------------------------------

    @property
    def synced(self) -> bool:
        return all(r.is_synced for r in self.reflectors)

    @property
    def stale(self) -> bool:
        return any(r.stale for r in self.reflectors)

    def start(self) -> None:
        for r in self.reflectors:
            r.start()

    def stop(self) -> None:
        for r in self.reflectors:
            r.stop()
        if self._rebuild_call is not None and self._rebuild_call.active():
            self._rebuild_call.cancel()
        self._rebuild_call = None

    def _state_changed(self, reflector: Reflector) -> None:
        if self.synced:
            self._schedule_rebuild()
        self._update_ready()

    def _update_ready(self) -> None:
        self.store.ready = (self.synced and not self.stale and self.snapshots > 0
                            and not self.also_stale())

    update_ready = _update_ready

    def _schedule_rebuild(self) -> None:
        # Events arrive in bursts (one TCP read carries many): build one
        # snapshot per burst, on the next reactor turn.
        if self._rebuild_call is None and self.synced:
            self._rebuild_call = self.reactor.callLater(0, self._rebuild)

    def _rebuild(self) -> None:
        self._rebuild_call = None
        self.store.replace(Snapshot(dict(self._valid_classes), dict(self._valid_connectors),
                                    dict(self._valid_secrets), self.flags,
                                    ca_cert_secrets(self._ca_secrets.values(), self.install_namespace)))
        self.snapshots += 1
        self._update_ready()

    def set_flags(self, flags: FeatureFlags) -> None:
        """
        Upstream's feature flags changed: the next snapshot carries them
        and, when C{enable-custom-ca-certs} flipped, every Connector's
        status is checked again (C{CACertReady} comes or stops being written).
        """
        was, self.flags = self.flags, flags
        self._schedule_rebuild()
        if was.custom_ca_certs != flags.custom_ca_certs:
            self._dirty(self.connector_keys())

    def _dirty(self, keys: Iterable[Key]) -> None:
        if self.on_dirty is not None:
            for key in keys:
                self.on_dirty(key)

    # -- events ---------------------------------------------------------------

    def _connector_event(self, event: str, key: Key, old: Any, new: Any) -> None:
        ref = ObjectRef(*key)
        if old is not None and isinstance(old[1], Connector):
            self._unindex(key, old[1])
        self._valid_connectors.pop(ref, None)
        if new is not None and isinstance(new[1], Connector):
            self._valid_connectors[ref] = new[1]
            self._index(key, new[1])
        self._schedule_rebuild()
        if new is not None:
            self._dirty([key])

    def _index(self, key: Key, connector: Connector) -> None:
        self._by_class.setdefault(connector.class_name, set()).add(key)
        if connector.secret_ref is not None:
            self._by_secret.setdefault(connector.secret_ref, set()).add(key)
        if connector.ca_secret_ref is not None:
            self._by_ca_secret.setdefault(connector.ca_secret_ref, set()).add(key)

    def _unindex(self, key: Key, connector: Connector) -> None:
        self._by_class.get(connector.class_name, set()).discard(key)
        for index, ref in ((self._by_secret, connector.secret_ref), (self._by_ca_secret, connector.ca_secret_ref)):
            if ref is not None:
                keys = index.get(ref)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del index[ref]

    def _class_event(self, event: str, key: Key, old: Any, new: Any) -> None:
        name = key[1]
        self._valid_classes.pop(name, None)
        self._invalid_classes.pop(name, None)
        if isinstance(new, ConnectorClass):
            self._valid_classes[name] = new
            self._check_policies(new)
        else:
            self._invalid_policies.pop(name, None)
            if isinstance(new, InvalidObject):
                self._invalid_classes[name] = f"{new.field}: {new.problem}"
        self._schedule_rebuild()
        self._dirty(list(self._by_class.get(name, ())))

    def _check_policies(self, cls: ConnectorClass) -> None:
        """
        Check (asynchronously, in the evaluator's processes) that C{cls}'s
        policies compile; the answer feeds the next reconcile of its
        Connectors.  Until it comes, the last answer for the class stands,
        so a status does not flap while a broken class is edited.
        """
        hooks = class_policies(cls)
        if not hooks or self.policy_checks is None:
            self._invalid_policies.pop(cls.name, None)
            return
        checks = self.policy_checks
        d = gatherResults([checks.check(text) for _, text in hooks])

        def checked(problems: list[str | None]) -> None:
            if self._valid_classes.get(cls.name) != cls:
                return  # the class changed (or went) since: its own check decides
            found = "; ".join(f"its {hook} Rego policy does not compile: {problem}"
                              for (hook, _), problem in zip(hooks, problems, strict=True) if problem) or None
            if found == self._invalid_policies.get(cls.name):
                return
            if found is None:
                self._invalid_policies.pop(cls.name, None)
            else:
                self._invalid_policies[cls.name] = found
                log.error("ConnectorClass {cls}: {problem}", cls=cls.name, problem=found)
            self._dirty(list(self._by_class.get(cls.name, ())))

        d.addCallback(checked)
        d.addErrback(lambda f: log.failure("checking the Rego policies of ConnectorClass {cls}", f, cls=cls.name))

    def _secret_event(self, event: str, key: Key, old: Any, new: Any) -> None:
        ref = ObjectRef(*key)
        self._valid_secrets.pop(ref, None)
        self._invalid_secrets.pop(ref, None)
        self._ca_secrets.pop(ref, None)
        if isinstance(new, Secret):
            self._valid_secrets[ref] = new
            if new.ca_cert and new.namespace == self.install_namespace:
                self._ca_secrets[ref] = new
        elif isinstance(new, InvalidObject):
            self._invalid_secrets[ref] = f"{new.field}: {new.problem}"
        self._schedule_rebuild()
        # Only a change of existence or validity changes a condition.
        if type(old) is not type(new) or (isinstance(new, Secret) and isinstance(old, Secret)
                                          and new.type != old.type):
            self._dirty(list(self._by_secret.get(ref, ())))
        if self.flags.custom_ca_certs:
            # CACertReady depends on the CA Secret's contents too.
            self._dirty(list(self._by_ca_secret.get(ref, ())))

    def _service_event(self, event: str, key: Key, old: Any, new: Any) -> None:
        name = connector_name_of_service(new if new is not None else old)
        if name:
            self._dirty([(key[0], name)])


class ClusterMode(Service):
    """
    The daemon's cluster mode.  Start it before serving; C{verifier} is the
    L{IIdentityVerifier} for the proxy, C{store} is fed from the watches.

    @param reactor: the reactor (time, connections).
    @param config: from L{connectors_proxy.kube.config.load_kubeconfig} or
        L{connectors_proxy.kube.config.load_in_cluster}.
    @param store: the proxy's L{Store}; its C{ready} flag is kept equal to
        "every watch has synced and none is stale".
    @param cluster_domain: for Service targets and status URLs.
    @param leader_elect: only the holder of Lease C{lease_namespace/lease_name}
        writes Services and status (otherwise every replica writes).
    @param serve_tls: the proxy also serves TLS: Services get port 443.
    @param client: an L{IKubeClient} to use instead of a L{KubeClient} (tests).
    @param write: keep Services and status (C{--reconcile all}); when false
        (C{--reconcile none}, beside the upstream controller-manager) nothing
        is written at all: no Service, no status, no Lease (no election: there
        is nothing to elect a writer for).
    @param qps: writes per second on average (C{-kube-api-qps}).
    @param burst: writes at once (C{-kube-api-burst}); default twice C{qps}.
    @param flags_namespace: watch upstream's feature flags (ConfigMap
        C{connectors-config}) in this namespace, the install namespace:
        C{enable-connector-proxy-permissions} then turns the C{connectors/proxy}
        review on and off at run time, C{enable-custom-ca-certs} the tool CA
        pool of this namespace's labelled Secrets and C{CACertReady}, and the
        replica is ready only once the flags have been read.  C{None}: no
        flags (C{proxy_subresource} alone).
    @param policy_checks: checks that classes' Rego policies compile (a
        broken one is reported on its Connectors as C{InvalidPolicy}); by
        default, when writing, one of its own with one evaluator process.
    """

    name = "cluster-mode"

    def __init__(self, reactor: Any, config: KubeConfig, store: Store,
                 cluster_domain: str = "cluster.local", leader_elect: bool = False,
                 serve_tls: bool = False, *, client: IKubeClient | None = None,
                 identity: str | None = None, lease_namespace: str | None = None,
                 lease_name: str = "connectors-proxy", review_ttl: float = 10.0,
                 review_stale: float = 300.0, review_timeout: float = 3.0,
                 audiences: tuple[str, ...] = (), proxy_subresource: bool = False,
                 stale_after: float = 60.0, resync_period: float = 600.0,
                 write: bool = True, max_in_flight: int = 8, qps: float = 100.0,
                 burst: float | None = None, lease_duration: float = 15.0, renew_deadline: float = 10.0,
                 retry_period: float = 2.0, flags_namespace: str | None = None,
                 policy_checks: PolicyChecks | None = None) -> None:
        self.reactor = reactor
        self.config = config
        self.store = store
        self.client: IKubeClient = client if client is not None else KubeClient(reactor, config)
        self.verifier = KubeIdentityVerifier(self.client, reactor, audiences=audiences,
                                             ttl=review_ttl, negative_ttl=min(review_ttl, 5.0),
                                             proxy_subresource=proxy_subresource,
                                             stale=review_stale, timeout=review_timeout,
                                             stale_after=stale_after)
        # Compile checks only matter for the status this replica writes;
        # one evaluator process, started when a class has a policy.
        self._own_checks = policy_checks is None and write
        if self._own_checks:
            policy_checks = PolicyChecks(WorkerPool(reactor, size=1))
        self.policy_checks = policy_checks
        self.inventory = Inventory(self.client, reactor, store, cluster_domain, serve_tls,
                                   stale_after=stale_after, policy_checks=policy_checks,
                                   install_namespace=flags_namespace)
        # Reviews failing as long as a watch may be away make the replica
        # not ready, as a stale watch does (it keeps serving what it can).
        self.inventory.also_stale = lambda: self.verifier.is_stale
        self.verifier.on_stale_change.append(self.inventory.update_ready)
        self.flags: FeatureFlagWatch | None = None
        if flags_namespace is not None:
            flags = self.flags = FeatureFlagWatch(self.client, reactor, flags_namespace)
            flags.on_change.append(
                lambda now: setattr(self.verifier, "proxy_subresource", proxy_subresource or now.proxy_permissions))
            flags.on_change.append(self.inventory.set_flags)
            # Not ready until the flags are known: with the permissions flag
            # on, serving before would skip the connectors/proxy review.
            self.inventory.also_stale = lambda: self.verifier.is_stale or not flags.synced
            flags.reflector.listen_state(lambda reflector: self.inventory.update_ready())
        self.elector: LeaderElector | None = None
        if leader_elect and write:
            self.elector = LeaderElector(
                self.client, reactor,
                namespace=lease_namespace or config.namespace
                or os.environ.get("POD_NAMESPACE") or "default",
                name=lease_name, identity=identity or default_identity(),
                lease_duration=lease_duration, renew_deadline=renew_deadline,
                retry_period=retry_period)
            self.elector.on_change(self._leadership)
        self.writer: Writer | None = None
        if write:
            self.writer = Writer(self.client, reactor, self.inventory,
                                 is_leader=lambda: self.is_leader, may_write=lambda: self.inventory.synced,
                                 max_in_flight=max_in_flight, qps=qps,
                                 burst=burst if burst is not None else 2 * qps)
            self.inventory.on_dirty = self.writer.enqueue
        self._resync = LoopingCall(self._resync_all)
        self._resync.clock = reactor
        self.resync_period = resync_period
        self._synced_once = False
        for r in self.inventory.reflectors:
            r.listen_state(self._reflector_state)

    @property
    def is_leader(self) -> bool:
        return self.elector is None or self.elector.is_leader

    def synced(self) -> Deferred[Any]:
        """Fires once every watch has completed its first list."""
        return DeferredList([r.synced for r in self.inventory.reflectors],
                            fireOnOneErrback=True, consumeErrors=True)

    def startService(self) -> None:
        super().startService()
        self.inventory.start()
        if self.flags is not None:
            self.flags.start()
        if self.elector is not None:
            self.elector.start()
        if self.writer is not None and self.resync_period > 0:
            self._resync.start(self.resync_period, now=False)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.inventory.stop()
        self.verifier.stop()
        if self.flags is not None:
            self.flags.stop()
        if self._resync.running:
            self._resync.stop()
        if self.writer is not None:
            self.writer.stop()
        d: Deferred[Any] = succeed(None)
        if self.elector is not None:
            d = self.elector.stop()
        if isinstance(self.client, KubeClient):
            client = self.client
            d.addCallback(lambda _: client.close())
        if self._own_checks and self.policy_checks is not None:
            checks = self.policy_checks
            d.addCallback(lambda _: checks.stop())
        return d

    def _reflector_state(self, reflector: Reflector) -> None:
        if self.inventory.synced and not self._synced_once:
            self._synced_once = True
            log.info("cluster mode: watches synced ({n} Connectors)",
                     n=len(self.inventory.connectors.items))
            if self.writer is not None:
                self.writer.enqueue_all()

    def _leadership(self, leader: bool) -> None:
        if leader and self.writer is not None:
            # A new leader checks everything: the old one may have died
            # half-way.
            self.writer.enqueue_all()

    def _resync_all(self) -> None:
        if self.writer is not None and self.inventory.synced and self.is_leader:
            self.writer.enqueue_all()


def default_identity() -> str:
    """The Lease holder name: the pod name (C{POD_NAME} or the host name) plus a
    random suffix, so a restarted pod is a new holder."""
    base = os.environ.get("POD_NAME") or socket.gethostname()
    return f"{base}_{uuid.uuid4().hex[:8]}"


def _seconds(options: Mapping[str, Any], name: str, default: float) -> float:
    """C{options[name]} as seconds; C{default} only when it is absent."""
    value = options.get(name)
    return default if value is None else float(value)


def cluster_service(options: Mapping[str, Any], reactor: Any) -> ClusterMode:
    """
    The L{ClusterMode} for the daemon's command line (C{tap.Options}):
    C{--kubeconfig PATH} or C{--in-cluster}, C{--cluster-domain},
    C{--leader-elect}, C{--lease-namespace}, C{--review-cache-seconds},
    C{--review-stale-seconds}, C{--token-audience}, C{--reconcile}, C{--kube-api-qps},
    C{--kube-api-burst}; Services get an C{https} port when a C{--listen} endpoint serves TLS.

    @raise KubeConfigError: the configuration cannot be loaded (the caller
        decides how to report it: the daemon exits with one line).
    """
    if options.get("kubeconfig"):
        config = load_kubeconfig(options["kubeconfig"])
    else:
        config = load_in_cluster()
    audiences = tuple(a.strip() for a in (options.get("token-audience") or "").split(",")
                      if a.strip())
    serve_tls = any(str(e).split(":", 1)[0] in ("ssl", "tls", "cptls") for e in options.get("listen") or ())
    return ClusterMode(
        reactor, config, Store(),
        cluster_domain=options.get("cluster-domain") or "cluster.local",
        leader_elect=bool(options.get("leader-elect")),
        serve_tls=serve_tls,
        lease_namespace=options.get("lease-namespace") or None,
        # 0 is a setting (no cache, no stale answers), not "unset".
        review_ttl=_seconds(options, "review-cache-seconds", 10.0),
        review_stale=_seconds(options, "review-stale-seconds", 300.0),
        audiences=audiences,
        # The install namespace: the pod's own (in-cluster), else the
        # kubeconfig context's, else upstream's default.
        flags_namespace=os.environ.get("POD_NAMESPACE") or config.namespace or "connectors-system",
        write=(options.get("reconcile") or "all") == "all",
        qps=float(options.get("kube-api-qps") or 100.0),
        burst=float(options["kube-api-burst"]) if options.get("kube-api-burst") else None,
    )
