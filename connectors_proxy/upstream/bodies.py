# -*- test-case-name: tests.test_rego,tests.test_kube_client -*-
"""
A request body already in memory, as an L{IBodyProducer} for
L{twisted.web.client.Agent}: the Kubernetes client's JSON, a body a Rego
hook has read whole.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer


@implementer(IBodyProducer)
class BytesProducer:
    """
    Sends C{data} whole when started, as often as it is started (a retried
    request sends it again).  Unlike L{twisted.web.client.FileBodyProducer}
    it needs no cooperator, so no global reactor.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        if self.data:
            consumer.write(self.data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass
