# -*- test-case-name: tests.test_manifests,tests.test_credentials,tests.test_custom_ca -*-
"""
What the proxy knows about the world: a frozen L{Snapshot} of
ConnectorClasses, Connectors and Secrets, replaced whole by whichever source
feeds it (manifests on disk, or the Kubernetes watcher).

Requests read C{store.snapshot} once and use that value to the end, so a
reload half-way through a request never mixes old and new objects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from attrs import define, field, frozen

from connectors_proxy.model.flags import DEFAULTS, FeatureFlags
from connectors_proxy.model.objects import ConfigMap, Connector, ConnectorClass, KubeObject, ObjectRef, Secret


def ca_cert_secrets(secrets: Iterable[Secret], namespace: str | None) -> tuple[Secret, ...]:
    """
    The Secrets of C{secrets} in the install C{namespace} labelled
    C{connectors.cpaas.io/ca-cert: "true"}, by name: the global part of the
    tool CA pool (C{enable-custom-ca-certs}).  No namespace: none.
    """
    if namespace is None:
        return ()
    return tuple(sorted((s for s in secrets if s.ca_cert and s.namespace == namespace), key=lambda s: s.name))


@frozen
class Snapshot:
    """
    @ivar flags: upstream's feature flags (C{connectors-config}).
    @ivar ca_secrets: L{ca_cert_secrets} of the install namespace.
    """

    classes: Mapping[str, ConnectorClass] = field(factory=dict)
    connectors: Mapping[ObjectRef, Connector] = field(factory=dict)
    secrets: Mapping[ObjectRef, Secret] = field(factory=dict, repr=False)
    flags: FeatureFlags = DEFAULTS
    ca_secrets: tuple[Secret, ...] = field(default=(), repr=False)

    @classmethod
    def of(cls, objects: Iterable[KubeObject]) -> Snapshot:
        """
        The snapshot of manifests.  A C{connectors-config} ConfigMap among
        them sets the flags, and its namespace is the install namespace.
        """
        classes: dict[str, ConnectorClass] = {}
        connectors: dict[ObjectRef, Connector] = {}
        secrets: dict[ObjectRef, Secret] = {}
        config: ConfigMap | None = None
        for obj in objects:
            if isinstance(obj, ConnectorClass):
                classes[obj.name] = obj
            elif isinstance(obj, Connector):
                connectors[obj.ref] = obj
            elif isinstance(obj, ConfigMap):
                config = obj
            else:
                secrets[obj.ref] = obj
        if config is None:
            return cls(classes, connectors, secrets)
        return cls(classes, connectors, secrets, config.flags,
                   ca_cert_secrets(secrets.values(), config.namespace))

    def connector(self, namespace: str, name: str) -> Connector | None:
        return self.connectors.get(ObjectRef(namespace, name))

    def connector_class(self, connector: Connector) -> ConnectorClass | None:
        return self.classes.get(connector.class_name)

    def secret(self, ref: ObjectRef | None) -> Secret | None:
        return None if ref is None else self.secrets.get(ref)


@define
class Store:
    """
    The current L{Snapshot}, and whether it may be served from.

    C{ready} is C{False} until the first complete load, and again while the
    source knows it is stale (the API server unreachable for too long).
    Listeners are told of every new snapshot (the TLS layer and the
    reconciler use this).
    """

    snapshot: Snapshot = field(factory=Snapshot)
    ready: bool = False
    _listeners: list[Callable[[Snapshot], None]] = field(factory=list)

    def replace(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.ready = True
        for listener in list(self._listeners):
            listener(snapshot)

    def listen(self, listener: Callable[[Snapshot], None]) -> None:
        self._listeners.append(listener)
