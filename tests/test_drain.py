"""
Graceful drain, signal handling and certificate reload: the logic with a
L{Clock} and fake connections; the reload of a real C{ssl:} listener.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import ssl
from typing import Any

from attrs import define, field
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.application.service import MultiService, Service
from twisted.application.strports import service as strport_service
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ReactorNotRunning
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data

from connectors_proxy.ops.drain import Drainer, DrainingService, Reloader, Signals, reloadable_tls

from .support.procs import free_port


@define(eq=False)
class FakeTransport:
    aborted: bool = False

    def abortConnection(self) -> None:
        self.aborted = True


@define(eq=False)
class FakeRequest:
    startedWriting: bool = False
    headers: dict[bytes, bytes] = field(factory=dict)
    fault: str | None = None

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.headers[name] = value


@define(eq=False)
class FakeChannel:
    site: FakeSite
    requests: list[FakeRequest] = field(factory=list)
    persistent: bool = True
    transport: FakeTransport = field(factory=FakeTransport)
    closed: bool = False
    # Bytes of a finished response still waiting in the transport's buffer.
    buffered: bool = False

    def loseConnection(self) -> None:
        self.closed = True
        if not self.buffered:
            self.site.channels.discard(self)

    def flushed(self) -> None:
        """The client read the rest; a closing connection is lost now."""
        self.buffered = False
        if self.closed:
            self.site.channels.discard(self)

    def finish_request(self) -> None:
        """The response ended; a non-persistent connection closes."""
        self.requests.pop(0)
        if not self.persistent:
            self.loseConnection()


@define(eq=False)
class FakeSite:
    channels: set[FakeChannel] = field(factory=set)

    def connect(self, requests: int = 0, started: bool = False) -> FakeChannel:
        channel = FakeChannel(self, [FakeRequest(startedWriting=started) for _ in range(requests)])
        self.channels.add(channel)
        return channel


class Listener(Service):
    """Like StreamServerEndpointService: stopping it twice is an error."""

    stops = 0

    def stopService(self) -> Any:
        if self.stops:
            raise AssertionError("stopped twice")
        self.stops += 1
        return super().stopService()


def fired(d: Deferred[Any]) -> Any:
    """The result of C{d} if it has fired (left in place), else C{None}."""
    box: list[Any] = []

    def keep(result: Any) -> Any:
        box.append(result)
        return result

    d.addBoth(keep)
    return box[0] if box else None


class DrainerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.site = FakeSite()
        self.listener = Listener()
        self.listener.startService()
        self.notes: list[str] = []
        self.drainer = Drainer(self.clock, 30.0, sites=[self.site], listeners=[self.listener],
                               notify=self.notes.append)

    def test_idle_connections_close_at_once(self) -> None:
        idle = [self.site.connect() for _ in range(3)]
        d = self.drainer.drain()
        self.assertEqual(fired(d), 0)
        self.assertTrue(all(c.closed for c in idle))
        self.assertTrue(self.drainer.draining)
        self.assertFalse(self.listener.running)
        self.assertEqual(self.notes, ["STOPPING=1\nSTATUS=draining"])

    def test_requests_in_flight_finish(self) -> None:
        waiting = self.site.connect(requests=1)
        streaming = self.site.connect(requests=1, started=True)
        idle = self.site.connect()
        d = self.drainer.drain()
        self.assertIsNone(fired(d))
        self.assertTrue(idle.closed)
        self.assertFalse(waiting.closed or streaming.closed)
        self.assertFalse(waiting.persistent or streaming.persistent)
        # A response not yet started tells the client the connection ends.
        self.assertEqual(waiting.requests[0].headers, {b"Connection": b"close"})
        self.assertEqual(streaming.requests[0].headers, {})

        self.clock.advance(10)
        waiting.finish_request()
        self.clock.advance(0.2)
        self.assertIsNone(fired(d))
        self.clock.advance(10)
        streaming.finish_request()
        self.clock.advance(0.2)
        self.assertEqual(fired(d), 0)
        self.assertFalse(streaming.transport.aborted)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_waits_for_the_end_of_a_response_still_in_the_buffer(self) -> None:
        # Found by CI: the response had ended (no request left) but its last
        # 64 KiB sat in the buffer of a slow reader; stopping then cut them.
        slow = self.site.connect(requests=1, started=True)
        slow.buffered = True
        d = self.drainer.drain()
        slow.finish_request()
        self.clock.pump([0.2] * 10)
        self.assertIsNone(fired(d))
        self.assertTrue(slow.closed)
        slow.flushed()
        self.clock.advance(0.2)
        self.assertEqual(fired(d), 0)
        self.assertFalse(slow.transport.aborted)

    def test_timeout_cuts_a_response_still_in_the_buffer(self) -> None:
        slow = self.site.connect()
        slow.buffered = True
        d = self.drainer.drain()
        self.clock.pump([0.2] * 151)
        self.assertEqual(fired(d), 1)
        self.assertTrue(slow.transport.aborted)

    def test_connection_arriving_during_the_drain(self) -> None:
        busy = self.site.connect(requests=1, started=True)
        d = self.drainer.drain()
        late = self.site.connect()
        self.clock.advance(0.2)
        self.assertTrue(late.closed)
        busy.finish_request()
        self.clock.advance(0.2)
        self.assertEqual(fired(d), 0)

    def test_timeout_cuts_what_is_left(self) -> None:
        stuck = self.site.connect(requests=1, started=True)
        d = self.drainer.drain()
        self.clock.pump([0.2] * 149)
        self.assertIsNone(fired(d))
        self.assertFalse(stuck.transport.aborted)
        self.clock.pump([0.2] * 2)
        self.assertEqual(fired(d), 1)
        self.assertTrue(stuck.transport.aborted)
        # Its access line will say the drain cut it (not 499, the client).
        self.assertEqual([r.fault for r in stuck.requests], ["drain"])

    def test_abort_cuts_at_once(self) -> None:
        stuck = self.site.connect(requests=1, started=True)
        d = self.drainer.drain()
        self.drainer.abort()
        self.assertEqual(fired(d), 1)
        self.assertTrue(stuck.transport.aborted)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_drain_twice_waits_for_the_same_drain(self) -> None:
        busy = self.site.connect(requests=1, started=True)
        first, second = self.drainer.drain(), self.drainer.drain()
        busy.finish_request()
        self.clock.advance(0.2)
        self.assertEqual((fired(first), fired(second)), (0, 0))
        self.assertEqual(fired(self.drainer.drain()), 0)
        self.assertEqual(self.listener.stops, 1)


class DrainingServiceTests(SynchronousTestCase):
    def test_drains_before_stopping_the_rest(self) -> None:
        clock = Clock()
        site = FakeSite()
        top = DrainingService()
        listener, admin = Listener(), Listener()
        listener.setServiceParent(top)
        admin.setServiceParent(top)
        top.drainer = Drainer(clock, 5.0, sites=[site], listeners=[listener])
        top.startService()
        busy = site.connect(requests=1, started=True)

        d = top.stopService()
        self.assertFalse(listener.running)
        # The admin listener answers (readyz 503, metrics) during the drain.
        self.assertTrue(admin.running)
        busy.finish_request()
        clock.advance(0.2)
        self.successResultOf(d)
        self.assertFalse(admin.running)
        self.assertFalse(top.running)
        self.assertEqual((listener.stops, admin.stops), (1, 1))

    def test_without_drainer(self) -> None:
        top = DrainingService()
        child = Listener()
        child.setServiceParent(top)
        top.startService()
        top.stopService()
        self.assertFalse(child.running)


@define
class FakeReactor:
    stops: int = 0
    running: bool = True

    def callWhenRunning(self, f: Any, *args: Any) -> None:
        f(*args)

    def callFromThread(self, f: Any, *args: Any) -> None:
        f(*args)

    def stop(self) -> None:
        if not self.running:
            raise ReactorNotRunning()
        self.running = False
        self.stops += 1


class SignalTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.installed: dict[int, Any] = {}
        self.reloads: list[str] = []
        reloader = Reloader()
        reloader.add("manifests", lambda: self.reloads.append("manifests"))
        self.drainer = Drainer(Clock(), 30.0)
        self.signals = Signals(self.reactor, self.drainer, reloader,
                               install=lambda number, handler: self.installed.__setitem__(number, handler))
        self.signals.startService()

    def test_handlers_installed_when_running(self) -> None:
        self.assertEqual(set(self.installed), {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})

    def test_sighup_reloads(self) -> None:
        self.installed[signal.SIGHUP](signal.SIGHUP, None)
        self.assertEqual(self.reloads, ["manifests"])
        self.assertEqual(self.reactor.stops, 0)

    def test_sigterm_stops_then_second_signal_cuts(self) -> None:
        self.installed[signal.SIGTERM](signal.SIGTERM, None)
        self.assertEqual(self.reactor.stops, 1)
        self.assertFalse(self.drainer._aborted)
        self.installed[signal.SIGINT](signal.SIGINT, None)
        self.assertEqual(self.reactor.stops, 1)
        self.assertTrue(self.drainer._aborted)

    def test_reactor_already_stopping(self) -> None:
        self.reactor.running = False
        self.installed[signal.SIGTERM](signal.SIGTERM, None)
        self.assertEqual(self.reactor.stops, 0)


class ReloaderTests(SynchronousTestCase):
    def test_failures_are_logged_and_the_rest_runs(self) -> None:
        notes: list[str] = []
        ran: list[str] = []
        reloader = Reloader(notify=notes.append)

        def broken() -> None:
            raise ValueError("bad manifest")

        reloader.add("broken", broken)
        reloader.add("certificates", lambda: ran.append("certificates"))
        reloader.add("async", lambda: succeed(ran.append("async")))
        self.assertIsNone(fired(reloader.reload()))
        self.assertEqual(ran, ["certificates", "async"])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(notes, ["RELOADING=1\nSTATUS=reloading", "READY=1\nSTATUS=serving"])


def self_signed(common_name: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def _client_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def peer_subject(port: int) -> str:
    """The common name a new TLS connection to C{port} is shown."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with _client_context().wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


class CertificateReloadTests(TestCase):
    timeout = 30

    def write(self, folder: str, cert: bytes, key: bytes) -> None:
        with open(os.path.join(folder, "tls.crt"), "wb") as f:
            f.write(cert)
        with open(os.path.join(folder, "tls.key"), "wb") as f:
            f.write(key)

    def test_reload_keeps_connections_and_serves_the_new_certificate(self) -> Deferred[None]:
        async def run() -> None:
            folder = self.mktemp()
            os.makedirs(folder)
            self.write(folder, *self_signed("first"))
            port = free_port()
            description = (f"ssl:{port}:interface=127.0.0.1:privateKey={folder}/tls.key:"
                           f"certKey={folder}/tls.crt")
            root = Resource()
            root.putChild(b"", Data(b"hello\n", "text/plain"))
            parent = MultiService()
            listener = strport_service(description, Site(root), reactor=reactor)
            listener.setServiceParent(parent)
            tls = reloadable_tls(listener, description, reactor)
            assert tls is not None
            parent.startService()
            self.addCleanup(parent.stopService)
            self.assertEqual(await threads.deferToThread(peer_subject, port), "first")

            # A connection opened before the reload keeps working after it.
            raw = socket.create_connection(("127.0.0.1", port), timeout=5)
            early = await threads.deferToThread(_client_context().wrap_socket, raw)
            self.addCleanup(early.close)

            self.write(folder, *self_signed("second"))
            self.assertTrue(tls.reload())
            self.assertEqual(await threads.deferToThread(peer_subject, port), "second")

            def get() -> bytes:
                early.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := early.recv(65536):
                    data += chunk
                return data

            answer = await threads.deferToThread(get)
            self.assertTrue(answer.startswith(b"HTTP/1.1 200"))
            self.assertTrue(answer.endswith(b"hello\n"))

            # A broken key keeps the old certificate, and says so.
            with open(os.path.join(folder, "tls.key"), "wb") as f:
                f.write(b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
            self.assertFalse(tls.reload())
            self.assertEqual(await threads.deferToThread(peer_subject, port), "second")

        return Deferred.fromCoroutine(run())

    def test_plain_endpoints_are_left_alone(self) -> None:
        listener = strport_service("tcp:0:interface=127.0.0.1", Site(Resource()), reactor=reactor)
        self.assertIsNone(reloadable_tls(listener, "tcp:0", reactor))

    def test_endpoints_with_their_own_reload(self) -> None:
        class OwnTLS:
            def reload(self) -> bool:
                return True

        @define
        class Endpoint:
            tls: OwnTLS = field(factory=OwnTLS)

        @define
        class FakeService:
            endpoint: Endpoint = field(factory=Endpoint)

        service = FakeService()
        self.assertIs(reloadable_tls(service, "cptls:0", reactor), service.endpoint.tls)
