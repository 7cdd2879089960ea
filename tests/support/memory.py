"""
The proxy's request path in memory: the real site, root resource, protocol
resources and relay, a raw-bytes client, and upstreams that are twisted.web
resources, all joined by in-memory connections and driven by a L{Clock}.
No sockets, no threads, no global reactor.

The connections model what the tests are about, TCP flow control: a
transport whose protocol has paused it reads nothing (its peer's bytes wait),
and a transport holding more unread bytes than its C{bufferSize} pauses its
registered streaming producer until its peer has read them, as
L{twisted.internet.abstract.FileDescriptor} does.  C{abortConnection} is
recorded, and the peer then sees L{ConnectionLost} rather than a clean close.

The upstream side is the real L{twisted.web.client.Agent} with a persistent
L{HTTPConnectionPool}, connected in memory to a L{twisted.web.server.Site}
per origin; the daemon's L{connectors_proxy.upstream.agents.Agents} connect in memory
(which has no interface to verify it against: the tests compare the
signatures instead).
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from attrs import define, field, frozen
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import (
    IConsumer,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    ISSLTransport,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site
from zope.interface import directlyProvides, implementer

from connectors_proxy.auth.identity import StaticTokens, parse_token_file
from connectors_proxy.model.state import Snapshot, Store
from connectors_proxy.sources.manifests import parse_documents
from connectors_proxy.tap import proxy_site
from connectors_proxy.tls.upstream import upstream_policy
from connectors_proxy.upstream.agents import Agents

from .proxy import LogCapture, capture_logs, manifests_text, token_file_text

# How much one read takes from a connection, like a socket read.
READ_SIZE = 64 * 1024

PROXY_ADDRESS = IPv4Address("TCP", "10.0.0.1", 8080)
CLIENT_ADDRESS = IPv4Address("TCP", "10.0.0.7", 40000)


@implementer(ITransport, IConsumer, IPushProducer)
class MemoryTransport:
    """
    One end of an in-memory connection.  C{write} queues bytes for the
    peer; L{Pipe.step} delivers them when the peer is reading.

    @ivar reading: C{False} while this end's protocol has paused it.
    @ivar aborted: whether C{abortConnection} was called.
    @ivar producer_paused: whether this transport paused its producer
        because its peer was not reading.
    """

    bufferSize = 64 * 1024

    def __init__(self, protocol: IProtocol, host: Any, peer: Any) -> None:
        self.protocol = protocol
        self._host = host
        self._peer = peer
        self.out = bytearray()
        self.reading = True
        self.disconnecting = False
        self.disconnected = False
        self.aborted = False
        self.producer: Any = None
        self.streaming = False
        self.producer_paused = False
        self.written = 0

    # ITransport

    def write(self, data: bytes) -> None:
        if self.disconnecting:
            return
        self.out += data
        self.written += len(data)
        if self.producer is not None and self.streaming and not self.producer_paused \
                and len(self.out) > self.bufferSize:
            self.producer_paused = True
            self.producer.pauseProducing()

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        self.disconnecting = True

    def loseWriteConnection(self) -> None:
        # The peers here cannot half-close: a FIN ends the connection.
        self.disconnecting = True

    def abortConnection(self) -> None:
        self.aborted = True
        self.disconnecting = True

    def getPeer(self) -> Any:
        return self._peer

    # Of ITCPTransport: Twisted's HTTP channel sets it on every transport
    # that provides it, which a TLS transport over this one does.

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def getTcpNoDelay(self) -> bool:
        return True

    def getHost(self) -> Any:
        return self._host

    # IConsumer

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self.disconnected:
            producer.stopProducing()
            return
        self.producer, self.streaming, self.producer_paused = producer, streaming, False
        if not streaming:
            producer.resumeProducing()

    def unregisterProducer(self) -> None:
        self.producer = None
        self.producer_paused = False

    # IPushProducer: what the protocol reading from this end asks for.

    def pauseProducing(self) -> None:
        self.reading = False

    def resumeProducing(self) -> None:
        self.reading = True

    def stopProducing(self) -> None:
        self.loseConnection()

    # Called by the pipe.

    def _drained(self) -> None:
        if not self.out and self.producer_paused and self.producer is not None:
            self.producer_paused = False
            self.producer.resumeProducing()

    def _lost(self, reason: Failure) -> None:
        self.disconnected = True
        producer, self.producer = self.producer, None
        if producer is not None:
            producer.stopProducing()
        self.protocol.connectionLost(reason)


@define(eq=False)
class Pipe:
    """An in-memory connection: C{client} is the connecting end."""

    client: MemoryTransport
    server: MemoryTransport

    @property
    def closed(self) -> bool:
        return self.client.disconnected and self.server.disconnected

    def step(self) -> bool:
        """Deliver one read each way and any close; whether anything happened."""
        if self.closed:
            return False
        moved = False
        for src, dst in ((self.client, self.server), (self.server, self.client)):
            if src.out and dst.reading and not dst.disconnected:
                data = bytes(src.out[:READ_SIZE])
                del src.out[:READ_SIZE]
                dst.protocol.dataReceived(data)
                src._drained()
                moved = True
        for src, dst in ((self.client, self.server), (self.server, self.client)):
            if src.disconnecting and not src.disconnected and (src.aborted or not src.out):
                src.out.clear()
                src._lost(Failure(ConnectionAborted() if src.aborted else ConnectionDone()))
                dst._lost(Failure(ConnectionLost() if src.aborted else ConnectionDone()))
                return True
        return moved


@define
class MemoryNetwork:
    """Every in-memory connection of a test, pumped together."""

    clock: Clock
    pipes: list[Pipe] = field(factory=list)

    def connect(self, server: IProtocol, client: IProtocol, server_address: Any, client_address: Any,
                secure: bool = False) -> Pipe:
        pipe = Pipe(MemoryTransport(client, client_address, server_address),
                    MemoryTransport(server, server_address, client_address))
        if secure:
            directlyProvides(pipe.client, ISSLTransport)
            directlyProvides(pipe.server, ISSLTransport)
        self.pipes.append(pipe)
        server.makeConnection(pipe.server)
        client.makeConnection(pipe.client)
        return pipe

    def flush(self) -> None:
        """Move bytes until nothing moves (calls due now on the clock run too)."""
        for _ in range(100000):
            self.clock.advance(0)
            moved = False
            for pipe in list(self.pipes):
                moved = pipe.step() or moved
            self.pipes = [p for p in self.pipes if not p.closed]
            if not moved:
                return
        raise AssertionError("the in-memory network never settled")


# -- upstreams ----------------------------------------------------------------------


class _RecordingRequest(Request):
    received_body = b""

    def process(self) -> None:
        # Twisted drops the body file when the request ends: keep a copy.
        assert self.content is not None
        self.content.seek(0)
        self.received_body = self.content.read()
        self.content.seek(0)
        self.channel.site.seen.append(self)  # type: ignore[attr-defined]
        super().process()


class UpstreamSite(Site):
    """A Site that records its requests and logs nothing (the proxy's log is what tests scan)."""

    requestFactory = _RecordingRequest
    noisy = False

    def __init__(self, resource: IResource, clock: Clock) -> None:
        super().__init__(resource, reactor=clock)
        self.seen: list[Request] = []

    def log(self, request: Any) -> None:
        pass


@define(eq=False)
class Upstream:
    """A stand-in server at C{origin}: its requests, and its connections."""

    origin: str
    site: UpstreamSite
    pipes: list[Pipe] = field(factory=list)

    @property
    def requests(self) -> list[Request]:
        return self.site.seen

    def headers(self, index: int = -1) -> dict[bytes, list[bytes]]:
        """The headers of a request it received, by lower-case name."""
        return {name.lower(): list(values)
                for name, values in self.site.seen[index].requestHeaders.getAllRawHeaders()}

    def body(self, index: int = -1) -> bytes:
        """The body of a request it received."""
        return self.site.seen[index].received_body  # type: ignore[attr-defined, no-any-return]


@implementer(IStreamClientEndpoint)
@define
class _Endpoint:
    network: MemoryNetwork
    upstreams: Mapping[str, Upstream]
    scheme: bytes
    host: bytes
    port: int

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        origin = f"{self.scheme.decode()}://{self.host.decode()}:{self.port}"
        upstream = self.upstreams.get(origin)
        server_address = IPv4Address("TCP", self.host.decode(), self.port)
        if upstream is None:
            return fail(ConnectionRefusedError(origin))
        client = factory.buildProtocol(server_address)
        assert client is not None
        server = upstream.site.buildProtocol(PROXY_ADDRESS)
        pipe = self.network.connect(server, client, server_address, IPv4Address("TCP", "10.0.0.1", 50000),
                                    secure=self.scheme == b"https")
        upstream.pipes.append(pipe)
        return succeed(client)


@implementer(IAgentEndpointFactory)
@define
class _Endpoints:
    network: MemoryNetwork
    upstreams: Mapping[str, Upstream]

    def endpointForURI(self, uri: Any) -> _Endpoint:
        return _Endpoint(self.network, self.upstreams, uri.scheme, uri.host, uri.port)


def memory_agents(network: MemoryNetwork, upstreams: Mapping[str, Upstream],
                  asked: list[tuple[bytes | None, bytes | None, bytes | None]] | None = None) -> Agents:
    """
    The daemon's own L{Agents} (pools, client protocol, TLS identities),
    its connections made in memory to the L{Upstream}s.  C{asked} records
    the TLS material each agent was asked for.
    """

    def policy_for(ca: bytes | None, cert: bytes | None, key: bytes | None) -> Any:
        if asked is not None:
            asked.append((ca, cert, key))
        return upstream_policy(ca, cert, key)

    return Agents(network.clock, policy_for,
                  endpoints=lambda reactor, policy, timeout: _Endpoints(network, upstreams))


# -- the client ---------------------------------------------------------------------


@frozen
class Response:
    """
    One response as the client read it off the wire.

    @ivar complete: whether the body's framing ended properly (all of
        C{Content-Length}, the last chunk, or a clean close).
    @ivar interim: the codes of C{1xx} responses that came first.
    """

    code: int
    phrase: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    complete: bool
    interim: tuple[int, ...] = ()

    def header(self, name: bytes) -> list[bytes]:
        """Every value of header C{name}, in order."""
        return [v for k, v in self.headers if k.lower() == name.lower()]

    @property
    def names(self) -> set[bytes]:
        return {k.lower() for k, _ in self.headers}


def _chunked(data: bytes, at: int) -> tuple[bytes, bool, int]:
    body = bytearray()
    while True:
        end = data.find(b"\r\n", at)
        if end < 0:
            return bytes(body), False, len(data)
        size = int(data[at:end].split(b";", 1)[0], 16)
        at = end + 2
        if size == 0:
            # Trailers, then an empty line.
            while True:
                end = data.find(b"\r\n", at)
                if end < 0:
                    return bytes(body), False, len(data)
                line, at = data[at:end], end + 2
                if not line:
                    return bytes(body), True, at
        body += data[at:at + size]
        if len(data) < at + size + 2:
            return bytes(body), False, len(data)
        at += size + 2


def parse_responses(data: bytes, closed_cleanly: bool, head: bool = False) -> list[Response]:
    """The responses in C{data}, the bytes a client received."""
    responses = []
    at = 0
    interim: list[int] = []
    while at < len(data):
        end = data.find(b"\r\n\r\n", at)
        if end < 0:
            raise AssertionError(f"incomplete response head: {data[at:at + 200]!r}")
        lines = data[at:end].split(b"\r\n")
        version, code, phrase = (lines[0].split(b" ", 2) + [b""])[:3]
        assert version == b"HTTP/1.1", lines[0]
        headers = tuple((k, v.strip()) for k, _, v in (line.partition(b":") for line in lines[1:]))
        at = end + 4
        status = int(code)
        if 100 <= status < 200:
            interim.append(status)
            continue
        names = {k.lower(): v for k, v in headers}
        if head or status in (204, 304):
            body, complete = b"", True
        elif names.get(b"transfer-encoding", b"").lower() == b"chunked":
            body, complete, at = _chunked(data, at)
        elif b"content-length" in names:
            length = int(names[b"content-length"])
            body = data[at:at + length]
            complete = len(body) == length
            at += len(body)
        else:
            body, complete, at = data[at:], closed_cleanly, len(data)
        responses.append(Response(status, phrase, headers, body, complete, tuple(interim)))
        interim = []
    return responses


class Client(Protocol):
    """A client that sends raw bytes and keeps every byte it receives."""

    transport: MemoryTransport

    def __init__(self, network: MemoryNetwork) -> None:
        self.network = network
        self.received = bytearray()
        self.lost: Failure | None = None
        # The proxy's end of this connection.
        self.server: MemoryTransport | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.lost = reason

    def send(self, data: bytes) -> None:
        self.transport.write(data)
        self.network.flush()

    @property
    def closed(self) -> bool:
        return self.lost is not None

    @property
    def reset(self) -> bool:
        """Whether the proxy aborted the connection (rather than closing it cleanly)."""
        return self.lost is not None and self.lost.check(ConnectionLost) is not None

    def responses(self, head: bool = False) -> list[Response]:
        clean = self.lost is not None and self.lost.check(ConnectionDone) is not None
        return parse_responses(bytes(self.received), clean, head)

    def response(self, head: bool = False) -> Response:
        """The one response received so far."""
        [response] = self.responses(head)
        return response

    def pause_reading(self) -> None:
        self.transport.pauseProducing()
        self.network.flush()

    def resume_reading(self) -> None:
        self.transport.resumeProducing()
        self.network.flush()

    def close(self) -> None:
        self.transport.loseConnection()
        self.network.flush()


def request_bytes(method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]] = (),
                  body: bytes | None = None, host: bytes | None = b"proxy.local:8080") -> bytes:
    """A request as a client writes it; C{Content-Length} added for C{body}."""
    lines = [method + b" " + target + b" HTTP/1.1"]
    if host is not None:
        lines.append(b"Host: " + host)
    lines += [k + b": " + v for k, v in headers]
    if body is not None:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (C{b""} gives the last chunk)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def bearer(token: str) -> tuple[bytes, bytes]:
    return (b"Authorization", b"Bearer " + token.encode())


def basic_auth(user: str, password: str, header: bytes = b"Authorization") -> tuple[bytes, bytes]:
    return (header, b"Basic " + base64.b64encode(f"{user}:{password}".encode()))


# -- the proxy ----------------------------------------------------------------------


@define
class MemoryProxy:
    """The proxy's site, built by L{proxy_site}, served in memory."""

    clock: Clock
    network: MemoryNetwork
    store: Store
    tokens: StaticTokens
    site: Any
    root: Any
    agents: Agents
    logs: LogCapture
    upstreams: dict[str, Upstream]
    clients: list[Client] = field(factory=list)

    def set_objects(self, objects: Iterable[Mapping[str, Any]]) -> None:
        """Replace what the proxy knows, as a manifest reload would."""
        self.store.replace(Snapshot.of(parse_documents(manifests_text(objects), "<test>")))

    def set_tokens(self, tokens: Mapping[str, str]) -> None:
        self.tokens.table = parse_token_file(token_file_text(tokens))

    def upstream(self, origin: str, resource: IResource) -> Upstream:
        """Serve C{resource} at C{origin} (C{scheme://host[:port]})."""
        parts = urlsplit(origin)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        key = f"{parts.scheme}://{parts.hostname}:{port}"
        upstream = self.upstreams[key] = Upstream(key, UpstreamSite(resource, self.clock))
        return upstream

    def connect(self, peer: IPv4Address = CLIENT_ADDRESS, secure: bool = False) -> Client:
        """A new client connection to the proxy."""
        client = Client(self.network)
        channel = self.site.buildProtocol(peer)
        client.server = self.network.connect(channel, client, PROXY_ADDRESS, peer, secure).server
        self.network.flush()
        self.clients.append(client)
        return client

    def request(self, data: bytes, head: bool = False) -> Response:
        """Send C{data} on a new connection; the one response to it."""
        client = self.connect()
        client.send(data)
        return client.response(head)

    def received(self) -> bytes:
        """Every byte any client received."""
        return b"".join(bytes(c.received) for c in self.clients)


def memory_proxy(test: SynchronousTestCase, objects: Iterable[Mapping[str, Any]], tokens: Mapping[str, str],
                 cluster_domain: str = "cluster.local") -> MemoryProxy:
    """
    The proxy site as the daemon builds it (L{proxy_site}), over
    C{objects} (manifest dicts) and C{tokens} (C{{token: username}}), with
    its upstream agents connecting in memory.  Everything it logs is
    captured; idle upstream connections are closed at cleanup.
    """
    clock = Clock()
    network = MemoryNetwork(clock)
    store = Store()
    verifier = StaticTokens({})
    logs = capture_logs(test)  # type: ignore[arg-type]
    upstreams: dict[str, Upstream] = {}
    agents = memory_agents(network, upstreams)
    site, root, _ = proxy_site(store, verifier, clock, cluster_domain, agents=agents)
    proxy = MemoryProxy(clock, network, store, verifier, site, root, agents, logs, upstreams)
    proxy.set_objects(objects)
    proxy.set_tokens(tokens)

    def close() -> None:
        agents.close()
        network.flush()

    test.addCleanup(close)
    return proxy



class Scripted(Resource):
    """
    A leaf resource that answers with C{answer(request)} (bytes, or
    C{NOT_DONE_YET} for a response the test finishes itself); by default a
    C{200} whose body is C{b"ok " + uri}.
    """

    isLeaf = True

    def __init__(self, answer: Any = None) -> None:
        super().__init__()
        self.answer = answer or (lambda request: b"ok " + request.uri)

    def render(self, request: Request) -> Any:
        return self.answer(request)
