# -*- test-case-name: tests.test_operator,tests.test_upstream_client -*-
"""
Upstream timeouts: an upstream that accepts a request and never answers,
or that stops in the middle of a body, must not hold a client, a
per-Connector slot and an upstream connection forever (SPEC section 10).

The upstream client (L{connectors_proxy.upstream.client.HTTP11Agent}, one
per TLS identity) keeps them, so every upstream request (REST, git, OCI
blobs, token realms) gets both:

  - B{headers} (C{--upstream-timeout}): the response headers must arrive
    this long after the request was sent, its body included (a 1 GiB push
    takes as long as it takes; the clock starts when its last byte is
    written).  Past it the request is cancelled (its connection closed) and
    fails with L{UpstreamTimeout}, which the relay answers with C{504}.
  - B{idle} (C{--upstream-idle-timeout}): once the body is being read, no
    byte for this long cuts it; the body's reader sees L{UpstreamTimeout}
    as the reason its body ended.  Time during which the proxy itself has
    paused the upstream (a slow client: backpressure) does not count.
"""

from __future__ import annotations

from attrs import frozen

DEFAULT_HEADERS_TIMEOUT = 60.0
DEFAULT_IDLE_TIMEOUT = 60.0

# What the access log's "fault" field says for each.
HEADERS_FAULT = "upstream-timeout"
IDLE_FAULT = "upstream-idle-timeout"


@frozen
class UpstreamTimeouts:
    """
    @ivar headers: seconds from the end of the request to the response
        headers (C{0}: no limit).
    @ivar idle: seconds without a byte of response body (C{0}: no limit).
    """

    headers: float = DEFAULT_HEADERS_TIMEOUT
    idle: float = DEFAULT_IDLE_TIMEOUT


class UpstreamTimeout(Exception):
    """
    The upstream took too long: no response headers (C{phase} C{"headers"})
    or no body byte (C{"body"}) within C{seconds}.
    """

    def __init__(self, phase: str, seconds: float) -> None:
        super().__init__(phase, seconds)
        self.phase = phase
        self.seconds = seconds

    @property
    def fault(self) -> str:
        """The access log's name for it."""
        return HEADERS_FAULT if self.phase == "headers" else IDLE_FAULT

    def __str__(self) -> str:
        if self.phase == "headers":
            return f"no response within {self.seconds:g}s (--upstream-timeout)"
        return f"no data for {self.seconds:g}s in the middle of the response body (--upstream-idle-timeout)"
