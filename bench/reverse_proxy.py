"""
The baseline that bench/run.py compares connectors-proxy with: Twisted's own
L{twisted.web.proxy.ReverseProxyResource}, in one process, injecting the
upstream C{Authorization} header as connectors-proxy does.

It buffers request bodies, opens one HTTP/1.0 upstream connection per
request and has no backpressure: that is what it is, and why the bench
measures it.  Not a test; started by bench/run.py:

    BENCH_AUTHORIZATION='Basic ...' python bench/reverse_proxy.py \\
        --port 8081 --upstream 127.0.0.1:8000 --access-log /tmp/rp.log
"""

from __future__ import annotations

import argparse
import os
from typing import Any
from urllib.parse import quote

from twisted.internet import reactor
from twisted.web.proxy import ReverseProxyResource
from twisted.web.server import Site


class InjectingReverseProxyResource(ReverseProxyResource):
    """L{ReverseProxyResource} that replaces the client's Authorization with the upstream's."""

    def __init__(self, host: str, port: int, path: bytes, authorization: bytes) -> None:
        super().__init__(host, port, path, reactor)
        self.authorization = authorization

    def getChild(self, path: bytes, request: Any) -> InjectingReverseProxyResource:
        # The base class builds a plain ReverseProxyResource for children,
        # which would drop the injection.
        return InjectingReverseProxyResource(
            self.host, self.port, self.path + b"/" + quote(path, safe="").encode("utf-8"), self.authorization,
        )

    def render(self, request: Any) -> Any:
        request.requestHeaders.setRawHeaders(b"authorization", [self.authorization])
        return super().render(request)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the origin")
    parser.add_argument("--access-log", default=None, help="access log file (Site's combined log format)")
    args = parser.parse_args()
    host, _, port = args.upstream.rpartition(":")
    # From the environment, so the credential is not on a command line.
    authorization = os.environ["BENCH_AUTHORIZATION"].encode("ascii")
    root = InjectingReverseProxyResource(host, int(port), b"", authorization)
    site = Site(root, logPath=args.access_log)
    site.noisy = False
    reactor.listenTCP(args.port, site, interface="127.0.0.1")  # type: ignore[attr-defined,arg-type]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
