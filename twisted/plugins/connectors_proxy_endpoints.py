# -*- test-case-name: tests.test_tls_serve -*-
"""
The C{cptls:} server endpoint (TLS with per-Connector certificates, hot
reloaded files) for C{--listen} and any other C{serverFromString} user.

Twisted imports every module here to list plugins, so this one imports
nothing but the interfaces; the TLS code loads when a C{cptls:} string is
parsed.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IPlugin, IStreamServerEndpointStringParser)
class _ConnectorsProxyTLSParser:
    prefix = "cptls"

    def parseStreamServer(self, reactor: Any, *args: Any, **kwargs: Any) -> Any:
        from connectors_proxy.tls.serve import endpoint_from_string

        return endpoint_from_string(reactor, *args, **kwargs)


cptls = _ConnectorsProxyTLSParser()
