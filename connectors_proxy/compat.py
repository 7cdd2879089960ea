# -*- test-case-name: tests.test_compat -*-
"""
Every private Twisted name connectors-proxy relies on, in one place.

Twisted offers no public way to do these things (replace the connection
factory of an L{HTTPConnectionPool}, count its idle connections, read the
C{Connection} header its client parser keeps aside, ...).  Each use is a
small function or alias here, and C{tests.test_compat} pins each one, so a
Twisted release that changes one fails that test loudly instead of
breaking the proxy quietly.
"""

from __future__ import annotations

from typing import Any

from twisted.web import client

# -- the upstream client (upstream/agents.py) ---------------------------------

# What Agent.usingEndpointFactory needs to turn a URI into an endpoint with a
# TLS policy and a connect timeout: Agent's own, reused so TLS and timeouts
# behave exactly as Agent's.
StandardEndpointFactory = client._StandardEndpointFactory  # type: ignore[attr-defined]

# The factory HTTPConnectionPool builds its connections with; subclassed to
# build our own client protocol.
HTTP11ClientFactory = client._HTTP11ClientFactory  # type: ignore[attr-defined]


def set_pool_factory(pool: client.HTTPConnectionPool, factory: type) -> None:
    """Make C{pool} build its connections with C{factory} (an L{HTTP11ClientFactory} subclass)."""
    pool._factory = factory


def idle_connections(pool: client.HTTPConnectionPool) -> int:
    """How many idle connections C{pool} keeps for reuse."""
    return sum(len(idle) for idle in pool._connections.values())


def quiescent_callback(factory: Any) -> Any:
    """The callback an L{HTTP11ClientFactory} gives its protocol, to hand the connection back to the pool."""
    return factory._quiescentCallback


def response_parser(protocol: client.HTTP11ClientProtocol) -> Any:
    """
    The L{HTTPClientParser} of the request C{protocol} is sending (or
    C{None}): its C{connHeaders} hold the response's C{Connection} header,
    which Twisted keeps out of C{response.headers}.
    """
    return protocol._parser
