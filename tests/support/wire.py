"""
Raw bytes on a real socket, bypassing every HTTP client's own checks: what a
hostile or confused client would send (L{exchange}, L{fetch}), every byte of
the answer kept (for leak checks) and taken apart (L{split_response}); and
L{NginxBehindProxy}, a proxy whose Connector C{default/basic} is a real nginx.
"""

from __future__ import annotations

import secrets
import socket
import time

from twisted.internet import threads
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import TestCase

from .nginx import start_nginx
from .proxy import basic_secret, connector, connector_class, sa, start_proxy


def _receive(s: socket.socket, chunks: list[bytes]) -> None:
    """Append what C{s} receives to C{chunks}, until the peer closes."""
    while chunk := s.recv(65536):
        chunks.append(chunk)


def exchange(port: int, data: bytes, timeout: float = 5.0, shutdown: bool = False) -> tuple[bytes, float]:
    """Send C{data}, read until the server closes (or C{timeout}); the answer and how long it took."""
    started = time.monotonic()
    chunks: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if shutdown:
            s.shutdown(socket.SHUT_WR)
        try:
            _receive(s, chunks)
        except (TimeoutError, ConnectionResetError):
            pass
    return b"".join(chunks), time.monotonic() - started


def fetch(port: int, request: bytes, timeout: float = 10.0) -> bytes:
    """Send one raw request with Connection: close; everything the proxy answers (a timeout fails)."""
    chunks: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        _receive(s, chunks)
    return b"".join(chunks)


def split_response(raw: bytes) -> tuple[int, dict[bytes, list[bytes]], bytes]:
    """Status, headers (lower-case names) and body (chunked framing removed) of a raw answer."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    if headers.get(b"transfer-encoding") == [b"chunked"]:
        out, rest = [], body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            out.append(rest[:size])
            rest = rest[size + 2:]
        body = b"".join(out)
    return int(lines[0].split()[1]), headers, body


class NginxBehindProxy(TestCase):
    """
    Each test gets C{self.nginx}, C{self.proxy} serving it as Connector
    C{default/basic} (Basic credentials from a Secret), and C{self.token},
    a ServiceAccount token of namespace C{default}.
    """

    timeout = 120

    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.nginx = yield start_nginx(self)
        self.token = secrets.token_hex(16)
        n = self.nginx
        self.proxy = yield start_proxy(self, [
            connector_class("http"),
            connector("default", "basic", "http", n.url + "/basic", secret="s"),
            basic_secret("default", "s", n.username, n.password),
        ], {self.token: sa("default")})

    def ask(self, data: bytes, **kw: object) -> Deferred[tuple[bytes, float]]:
        """L{exchange} C{data} with the proxy, off the reactor thread."""
        return threads.deferToThread(exchange, self.proxy.port, data, **kw)
