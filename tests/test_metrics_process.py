"""
The daemon as an operator runs it (C{twistd -n connectors-proxy
--log-format json}): C{/metrics} on the admin listener, one JSON access-log
object per request with the documented fields, and canary secrets (the
tool's password, the client's token, a token in a query) in neither.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from .support.proxy import basic_secret, connector, connector_class, json_lines, sa, start_proxy_process, write_setup
from .test_metrics import samples, value

ACCESS_FIELDS = {"time", "level", "logger", "message", "event", "client", "identity", "namespace", "connector",
                 "protocol", "method", "path", "status", "bytes_in", "bytes_out", "duration_ms"}


class Echo(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        # Proves the upstream got the Connector's credentials (not echoed).
        return b"ok\n" if request.getHeader(b"authorization") else b"no auth\n"


class DaemonMetricsAndLogsTests(TestCase):
    timeout = 120

    def test_metrics_and_json_logs(self) -> Deferred[None]:
        async def run() -> None:
            upstream = reactor.listenTCP(0, Site(Echo()), interface="127.0.0.1")
            self.addCleanup(upstream.stopListening)
            address = f"http://127.0.0.1:{upstream.getHost().port}"
            token, password, query_secret = (secrets.token_hex(16) for _ in range(3))
            args = write_setup(self, [
                connector_class("rest"),
                basic_secret("team", "creds", "robot", password),
                connector("team", "api", "rest", address, secret="creds"),
            ], {token: sa("team")})
            proxy = await start_proxy_process(self, [*args, "--log-format", "json"])
            auth = {"Authorization": f"Bearer {token}"}
            base = f"{proxy.url}/namespaces/team/connectors/api"

            for i in range(3):
                r = await treq.get(f"{base}/things/{i}?access_token={query_secret}&page=2", headers=auth,
                                   persistent=False)
                self.assertEqual((r.code, await r.content()), (200, b"ok\n"))
            r = await treq.get(f"{base}/x", headers={"Authorization": f"Bearer wrong-{query_secret}"},
                               persistent=False)
            self.assertEqual(r.code, 401)
            await r.content()

            response = await treq.get(f"http://127.0.0.1:{proxy.admin_port}/metrics", persistent=False)
            self.assertEqual(response.code, 200)
            text = await response.text()
            s = samples(text)
            api = {"namespace": "team", "connector": "api", "protocol": "http"}
            self.assertEqual(value(s, "connectors_proxy_requests_total", code="200", **api), 3)
            self.assertEqual(value(s, "connectors_proxy_requests_total", namespace="-", connector="-",
                                   protocol="-", code="401"), 1)
            self.assertEqual(value(s, "connectors_proxy_request_duration_seconds_count", **api), 3)
            self.assertEqual(value(s, "connectors_proxy_response_bytes_total", **api), 9)
            self.assertGreaterEqual(value(s, "connectors_proxy_connections_total"), 4)
            self.assertGreater(value(s, "connectors_proxy_last_reload_success_timestamp_seconds",
                                     source="manifests"), time.time() - 60)
            self.assertGreater(value(s, "process_resident_memory_bytes"), 0)

            # The access lines are written when each response ends: wait for the fourth.
            deadline = time.monotonic() + 10
            while sum('"event":"access"' in line for line in proxy.log().splitlines()) < 4:
                if time.monotonic() > deadline:
                    self.fail(f"no access lines in:\n{proxy.log()}")
                await deferLater(reactor, 0.05, lambda: None)
            log = proxy.log()
            for canary in (token, password, query_secret):
                self.assertNotIn(canary, log)
                self.assertNotIn(canary, text)

            # Every line the daemon printed is one JSON object.
            lines = json_lines(log)
            access = [line for line in lines if line.get("event") == "access"]
            self.assertEqual(len(access), 4)
            first = access[0]
            self.assertEqual(set(first), ACCESS_FIELDS)
            self.assertEqual(first["identity"], sa("team"))
            self.assertEqual((first["namespace"], first["connector"], first["protocol"]), ("team", "api", "http"))
            self.assertEqual((first["method"], first["status"], first["bytes_out"]), ("GET", 200, 3))
            self.assertEqual(first["path"], "/namespaces/team/connectors/api/things/0?access_token=REDACTED&page=2")
            self.assertEqual(first["client"], "127.0.0.1")
            self.assertIsInstance(first["duration_ms"], float)
            self.assertRegex(first["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
            self.assertEqual(access[-1]["status"], 401)
            self.assertEqual(access[-1]["identity"], "-")
            for line in lines:
                self.assertLessEqual({"time", "level", "logger", "message"}, set(line))

        return Deferred.fromCoroutine(run())
