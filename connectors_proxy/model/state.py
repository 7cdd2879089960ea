# -*- test-case-name: tests.test_manifests,tests.test_credentials -*-
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

from connectors_proxy.model.objects import Connector, ConnectorClass, KubeObject, ObjectRef, Secret


@frozen
class Snapshot:
    classes: Mapping[str, ConnectorClass] = field(factory=dict)
    connectors: Mapping[ObjectRef, Connector] = field(factory=dict)
    secrets: Mapping[ObjectRef, Secret] = field(factory=dict, repr=False)

    @classmethod
    def of(cls, objects: Iterable[KubeObject]) -> Snapshot:
        classes: dict[str, ConnectorClass] = {}
        connectors: dict[ObjectRef, Connector] = {}
        secrets: dict[ObjectRef, Secret] = {}
        for obj in objects:
            if isinstance(obj, ConnectorClass):
                classes[obj.name] = obj
            elif isinstance(obj, Connector):
                connectors[obj.ref] = obj
            else:
                secrets[obj.ref] = obj
        return cls(classes, connectors, secrets)

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
