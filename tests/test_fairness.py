"""
Fair turns between identities on a shared Connector, over real sockets: one
ServiceAccount flooding a C{kube-public} Connector does not lock another
namespace out of it.
"""

from __future__ import annotations

from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from connectors_proxy.model.objects import ObjectRef
from connectors_proxy.server.limits import ConcurrencyLimiter

from .support.proxy import basic_secret, connector, connector_class, sa, start_proxy
from .support.waiting import eventually


class Held(Resource):
    """An upstream that holds every request until the test lets them go."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[Any] = []
        self.held = True

    def render_GET(self, request: Any) -> Any:
        if not self.held:
            return b"done\n"
        self.waiting.append(request)
        return NOT_DONE_YET

    def paths(self) -> list[bytes]:
        return sorted(request.path.rsplit(b"/", 1)[-1] for request in self.waiting)

    def release(self, count: int | None = None) -> None:
        """Answer the oldest C{count} held requests (all when C{None})."""
        count = len(self.waiting) if count is None else count
        answered, self.waiting = self.waiting[:count], self.waiting[count:]
        for request in answered:
            if not request._disconnected:
                request.write(b"done\n")
                request.finish()

    def open(self) -> None:
        """Answer everything, from now on at once."""
        self.held = False
        self.release()


class SharedConnectorTests(TestCase):
    timeout = 60

    def test_flooding_identity_does_not_lock_out_another_namespace(self) -> Deferred[None]:
        """
        With 4 slots and a queue of 4, identity A sends 8 slow requests (4
        in progress, 4 queued).  B, another namespace's ServiceAccount, is
        neither refused nor left behind A's queue: it pushes out A's newest
        waiter (A gets that 503), takes the next free slot and gets C{200}.
        """
        async def run() -> None:
            upstream = Held()
            port = reactor.listenTCP(0, Site(upstream), interface="127.0.0.1")
            self.addCleanup(port.stopListening)
            self.addCleanup(upstream.open)
            proxy = await start_proxy(self, [
                connector_class("rest"),
                basic_secret("kube-public", "creds", "u", "p"),
                connector("kube-public", "shared", "rest", f"http://127.0.0.1:{port.getHost().port}",
                          secret="creds"),
            ], {"token-a": sa("team-a"), "token-b": sa("team-b")})
            proxy.root.limiter = ConcurrencyLimiter(reactor, max_active=4, max_queue=4, queue_timeout=30.0)
            lane = proxy.root.limiter.lane(ObjectRef("kube-public", "shared"))

            answered: list[tuple[str, int]] = []

            def get(token: str, name: str) -> Deferred[Any]:
                d = treq.get(proxy.path_url("kube-public", "shared", f"/{name}"),
                             headers={"Authorization": f"Bearer {token}"}, persistent=False)

                def seen(response: Any) -> Any:
                    answered.append((name, response.code))
                    return response
                # Not Deferred.called: treq's Deferreds are "called" while still waiting.
                return d.addCallback(seen)

            flood = [get("token-a", "a") for _ in range(8)]
            await eventually(lambda: len(upstream.waiting) == 4 and len(lane.waiting) == 4)

            other = get("token-b", "b")
            # B is queued (not refused): one of A's queued requests made room.
            await eventually(lambda: len(answered) == 1)
            self.assertEqual(answered, [("a", 503)])
            self.assertEqual(len(lane.waiting), 4)

            # The next free slot is B's, although A's requests came first.
            upstream.release(1)
            await eventually(lambda: b"b" in upstream.paths())
            self.assertEqual(upstream.paths(), [b"a", b"a", b"a", b"b"])

            upstream.open()
            response = await other
            self.assertEqual((response.code, await response.content()), (200, b"done\n"))
            codes = [r.code for r in await gatherResults(flood)]
            self.assertEqual(sorted(codes), [200] * 7 + [503])
            await eventually(lambda: lane.active == 0)

        return Deferred.fromCoroutine(run())
