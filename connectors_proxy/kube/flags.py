# -*- test-case-name: tests.test_upstream_compat -*-
"""
Upstream's feature flags in cluster mode: the ConfigMap C{connectors-config}
in the install namespace, watched (one object, by field selector, so RBAC can
name it: a namespaced Role with C{resourceNames: [connectors-config]}), so a
change applies at once, without a restart.

Until the ConfigMap has been read, and while it does not exist, every flag
has its default (C{"false"}), as upstream's.  If it cannot be read (RBAC),
the reflector logs why and retries with backoff; the flags keep their last
known values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attrs import define, field
from twisted.logger import Logger

from connectors_proxy.kube.client import CONFIG_MAPS, IKubeClient
from connectors_proxy.kube.reflector import Key, Reflector
from connectors_proxy.model.flags import CONFIG_MAP, DEFAULTS, KNOWN, FeatureFlags, parse_flags

log = Logger()


@define
class FeatureFlagWatch:
    """
    The current L{FeatureFlags}, kept equal to the ConfigMap's.

    @ivar flags: the flags now.
    @ivar on_change: called with the new flags whenever they change.
    """

    client: IKubeClient
    clock: Any
    namespace: str
    flags: FeatureFlags = DEFAULTS
    on_change: list[Callable[[FeatureFlags], object]] = field(factory=list)
    reflector: Reflector = field(init=False)

    def __attrs_post_init__(self) -> None:
        self.reflector = Reflector(self.client, self.clock, CONFIG_MAPS, namespace=self.namespace,
                                   field_selector=f"metadata.name={CONFIG_MAP}", transform=parse_flags)
        self.reflector.listen(self._event)

    @property
    def synced(self) -> bool:
        return self.reflector.is_synced

    def start(self) -> None:
        self.reflector.start()

    def stop(self) -> None:
        self.reflector.stop()

    def _event(self, event: str, key: Key, old: Any, new: Any) -> None:
        if key[1] != CONFIG_MAP:
            return
        flags = new if isinstance(new, FeatureFlags) else DEFAULTS
        if flags == self.flags:
            return
        self.flags = flags
        shown = ", ".join(f"{name}={'true' if flags[name] else 'false'}" for name in KNOWN)
        log.info("feature flags from ConfigMap {ns}/{name}: {flags}", ns=self.namespace, name=CONFIG_MAP,
                 flags=shown)
        for callback in list(self.on_change):
            callback(flags)
