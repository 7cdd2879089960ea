# -*- test-case-name: tests.test_metrics -*-
"""
The admin listener: C{/healthz} (the process is alive), C{/readyz} (the
objects are loaded and fresh: 503 before the first full load, while the
source is stale, and while draining), C{/metrics} (Prometheus text), and
with C{--proxy-ca-cert} C{/ca.crt} (the CA clients trust for intercepted
C{CONNECT} tunnels; public by nature, as the file clientconfig writes).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.web.resource import Resource
from twisted.web.server import Request


class _Text(Resource):
    isLeaf = True

    def __init__(self, answer: Callable[[], tuple[int, bytes]],
                 content_type: bytes = b"text/plain; charset=utf-8") -> None:
        super().__init__()
        self._answer = answer
        self._content_type = content_type

    def render_GET(self, request: Request) -> bytes:
        code, body = self._answer()
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", self._content_type)
        request.setHeader(b"Cache-Control", b"no-store")
        return body

    render_HEAD = render_GET


def admin_resource(ready: Callable[[], str | None], metrics: Resource | None = None,
                   ca: Callable[[], bytes] | None = None) -> Resource:
    """
    @param ready: C{None} when ready, else the reason it is not (shown in
        the 503 body).
    @param metrics: the C{/metrics} resource, when metrics are served.
    @param ca: the proxy CA's certificate (PEM) as currently loaded, served
        as C{/ca.crt}.
    """
    root = Resource()
    root.putChild(b"healthz", _Text(lambda: (200, b"ok\n")))

    def readyz() -> tuple[int, bytes]:
        reason = ready()
        return (200, b"ready\n") if reason is None else (503, reason.encode("utf-8") + b"\n")

    root.putChild(b"readyz", _Text(readyz))
    if metrics is not None:
        root.putChild(b"metrics", metrics)
    if ca is not None:
        root.putChild(b"ca.crt", _Text(lambda: (200, ca()), b"application/x-pem-file"))
    return root


