# -*- test-case-name: tests.test_compat -*-
"""
Every private Twisted name connectors-proxy relies on, in one place.

Twisted offers no public way to do these things (replace the connection
factory of an L{HTTPConnectionPool}, hook the return of its connections, bound the chunk sizes
and header counts of L{HTTPChannel}, answer its malformed requests, swap
the TLS context of a listening endpoint, ...).  Each use is a small
function, alias or base class here with a public name, and
C{tests.test_compat} pins each one, so a Twisted release that changes one
fails that test loudly instead of breaking the proxy quietly.  Nothing
outside this module reads or writes a private Twisted name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import tcp
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.web import client, http
from twisted.web.http_headers import Headers

# -- the Kubernetes API client (kube/client.py) ---------------------------------

# The factory HTTPConnectionPool builds its connections with; subclassed to
# build our own client protocol.
HTTP11ClientFactory = client._HTTP11ClientFactory  # type: ignore[attr-defined]


def set_pool_factory(pool: client.HTTPConnectionPool, factory: type) -> None:
    """Make C{pool} build its connections with C{factory} (an L{HTTP11ClientFactory} subclass)."""
    pool._factory = factory  # type: ignore[assignment]


class HTTPConnectionPoolCompat(client.HTTPConnectionPool):
    """
    An L{HTTPConnectionPool} with a public hook for a connection that is
    done with its request (Twisted's private C{_putConnection}).
    """

    def _putConnection(self, key: Any, connection: Any) -> None:
        self.keep_connection(key, connection)

    def keep_connection(self, key: Any, connection: Any) -> None:
        """
        C{connection} (for C{key}) finished its request and is reusable:
        by default it is kept as idle for the next request to C{key}.
        """
        client.HTTPConnectionPool._putConnection(self, key, connection)


# -- the server channel (server/channel.py) -----------------------------------


class _BoundedChunkedDecoder(http._ChunkedTransferDecoder):  # type: ignore[misc]
    """
    Twisted's chunked decoder, refusing a chunk size over C{limit} before
    any byte of such a chunk is delivered: raising its
    C{_MalformedChunkedDataError} from its C{_dataReceived_CHUNK_LENGTH}
    step makes L{http.HTTPChannel} answer 400 (through
    L{HTTPChannelCompat.bad_request}).
    """

    length: int

    def __init__(self, dataCallback: Callable[[bytes], None], finishCallback: Callable[[bytes], None],
                 limit: int) -> None:
        super().__init__(dataCallback, finishCallback)
        self.limit = limit

    def _dataReceived_CHUNK_LENGTH(self) -> bool:
        read: bool = super()._dataReceived_CHUNK_LENGTH()
        if read and self.length > self.limit:
            raise http._MalformedChunkedDataError(f"Chunk size is over {self.limit}.")  # type: ignore[attr-defined]
        return read


class HTTPChannelCompat(http.HTTPChannel):
    """
    L{http.HTTPChannel} with public names for the parser state a stricter
    channel needs: Twisted keeps all of it in private attributes.
    """

    @property
    def head_bytes(self) -> int:
        """
        Bytes of the current request's head received so far (line endings
        not counted): 0 until its request line has been read.
        """
        return self._receivedHeaderSize

    @property
    def head_count(self) -> int:
        """How many of the current request's headers have been parsed so far."""
        return self._receivedHeaderCount

    @property
    def request_line(self) -> tuple[bytes, bytes, bytes]:
        """
        The current request's method, target and version, as its request
        line gave them; set from the request line until the request's body
        is complete.
        """
        return self._command, self._path, self._version  # type: ignore[attr-defined]

    @property
    def request_version(self) -> bytes:
        """The current request's version (C{b"HTTP/1.1"}), as its request line gave it."""
        return self._version  # type: ignore[attr-defined,no-any-return]

    def bound_chunk_sizes(self, limit: int) -> None:
        """
        If the current request's body is chunked (call this once its
        C{Transfer-Encoding} header is parsed), refuse it with
        L{bad_request} as soon as a chunk size over C{limit} is read,
        before any byte of that chunk is delivered.
        """
        plain = self._transferDecoder
        if isinstance(plain, http._ChunkedTransferDecoder) and not isinstance(plain, _BoundedChunkedDecoder):
            self._transferDecoder = _BoundedChunkedDecoder(plain.dataCallback, plain.finishCallback, limit)

    def bad_request(self) -> None:
        """
        Twisted found the request malformed (request line, header syntax,
        framing, a chunk): answer and disconnect.  By default, Twisted's
        own answer (a bare 400, then close).
        """
        http.HTTPChannel._respondToBadRequestAndDisconnect(self)

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Where every bad-request path of HTTPChannel ends.
        self.bad_request()


# -- header values (server/headers.py, upstream/client.py) --------------------


def raw_headers(headers: Headers) -> dict[bytes, list[bytes]]:
    """
    The dict C{headers} keeps its values in, keyed by canonical name (as
    C{getAllRawHeaders} gives them), to read and fill in place: copying
    headers that are already valid (another L{Headers}' values, fields the
    upstream parser has checked) without re-encoding every name and
    re-sanitizing every value.  Keys written must be canonical names
    (L{connectors_proxy.server.headers.canonical_name}).
    """
    return headers._rawHeaders


# -- sending without queueing (upstream/client.py) -----------------------------


def send_now(transport: Any, data: bytes) -> None:
    """
    Write C{data} to C{transport}.  On a plain TCP connection with nothing
    queued, send it at once: Twisted would queue it, register the
    connection for writing (an C{epoll_ctl}), send it on the next reactor
    turn and unregister (another), about 10 us a request for a request
    head.  What the socket does not take, or any error, goes through the
    transport's own C{write}, which keeps the order and reports the error.
    """
    if (isinstance(transport, tcp.Connection) and transport.connected and not transport.disconnecting
            and not transport._writeDisconnected and not transport._tempDataBuffer
            and transport.offset >= len(transport.dataBuffer)):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int):
            if sent < len(data):
                transport.write(data[sent:])
            return
    transport.write(data)


def request_gone(request: http.Request) -> bool:
    """Whether the client of C{request} has gone (its connection lost)."""
    return bool(request._disconnected)


# -- the listener TLS context (ops/drain.py) ----------------------------------


def tls_context_factory(endpoint: SSL4ServerEndpoint) -> Any:
    """The context factory C{endpoint} hands to C{listenSSL} when it listens."""
    return endpoint._sslContextFactory


def set_tls_context_factory(endpoint: SSL4ServerEndpoint, factory: Any) -> None:
    """Make C{endpoint} listen with C{factory} (it must not be listening yet)."""
    endpoint._sslContextFactory = factory
