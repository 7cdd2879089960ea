"""
Starting connectors-proxy in tests.

L{start_proxy} runs it in the test's own reactor (fast, and the test can
change its objects and tokens directly); L{start_proxy_process} runs the real
C{twistd -n connectors-proxy} command (for the command line, logs as an
operator sees them, and memory).  Both collect everything the proxy logs so a
test can assert that no canary secret ever shows up there.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import yaml
from attrs import define, field
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from connectors_proxy.auth.identity import StaticTokens, parse_token_file
from connectors_proxy.model.state import Snapshot, Store
from connectors_proxy.ops.logformat import json_line, text_line
from connectors_proxy.sources.manifests import parse_documents
from connectors_proxy.tap import proxy_site

from .procs import Server, free_port, start_server

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


def sa(namespace: str, name: str = "builder") -> str:
    """The user name of a ServiceAccount."""
    return f"system:serviceaccount:{namespace}:{name}"


def token_file_text(tokens: Mapping[str, str]) -> str:
    """A static token file for C{{token: username}}."""
    return "".join(f'{token},{user},uid-{i},"system:serviceaccounts"\n'
                   for i, (token, user) in enumerate(tokens.items()))


def manifests_text(objects: Iterable[Mapping[str, Any]]) -> str:
    return yaml.safe_dump_all(list(objects), sort_keys=False)


def snapshot_of(*objects: Mapping[str, Any]) -> Snapshot:
    """What the proxy knows from C{objects}, parsed as a manifest file would be."""
    return Snapshot.of(parse_documents(manifests_text(objects), "<test>"))


def connector_class(name: str, protocol: str = "http", optional: bool = False) -> dict[str, Any]:
    return {
        "apiVersion": "connectors.alauda.io/v1alpha1", "kind": "ConnectorClass",
        "metadata": {"name": name, "annotations": {"proxy.connectors.alauda.io/protocol": protocol}},
        "spec": {"auth": {"types": [
            {"name": "basicAuth", "secretType": "kubernetes.io/basic-auth", "optional": optional},
            {"name": "bearerTokenAuth", "secretType": "connectors.cpaas.io/bearer-token", "optional": optional},
        ]}},
    }


def connector(namespace: str, name: str, class_name: str, address: str,
              secret: str | None = None, auth: str = "basicAuth", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"connectorClassName": class_name, "address": address, **spec}
    if secret is not None:
        body["auth"] = {"name": auth, "secretRef": {"name": secret}}
    return {"apiVersion": "connectors.alauda.io/v1alpha1", "kind": "Connector",
            "metadata": {"name": name, "namespace": namespace}, "spec": body}


def secret(namespace: str, name: str, type: str, **data: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace},
            "type": type, "stringData": dict(data)}


def basic_secret(namespace: str, name: str, username: str, password: str) -> dict[str, Any]:
    return secret(namespace, name, "kubernetes.io/basic-auth", username=username, password=password)


def bearer_secret(namespace: str, name: str, token: str) -> dict[str, Any]:
    return secret(namespace, name, "connectors.cpaas.io/bearer-token", token=token)


@define
class LogCapture:
    """Every log event while a test runs, as the text and JSON formats print them."""

    events: list[dict[str, Any]] = field(factory=list)

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def text(self) -> str:
        return "\n".join(text_line(e) + "\n" + json_line(e) for e in self.events)

    def access(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("access")]


def capture_logs(test: TestCase) -> LogCapture:
    capture = LogCapture()
    globalLogPublisher.addObserver(capture)
    test.addCleanup(globalLogPublisher.removeObserver, capture)
    return capture


@define
class RunningProxy:
    port: int
    store: Store
    tokens: StaticTokens
    logs: LogCapture
    root: Any

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def path_url(self, namespace: str, name: str, rest: str = "/") -> str:
        return f"{self.url}/namespaces/{namespace}/connectors/{name}{rest}"

    def set_objects(self, objects: Iterable[Mapping[str, Any]]) -> None:
        """Replace what the proxy knows, as a manifest reload would."""
        self.store.replace(snapshot_of(*objects))

    def set_tokens(self, tokens: Mapping[str, str]) -> None:
        self.tokens.table = parse_token_file(token_file_text(tokens))


def start_proxy(test: TestCase, objects: Iterable[Mapping[str, Any]], tokens: Mapping[str, str],
                cluster_domain: str = "cluster.local", endpoint: str | None = None) -> Deferred[RunningProxy]:
    """
    Serve a proxy in this reactor, with C{objects} (manifest dicts) and
    C{tokens} (C{{token: username}}), on a loopback port or on C{endpoint}
    (a server endpoint string, e.g. C{cptls:0:...}).  Stopped at cleanup.
    """
    return Deferred.fromCoroutine(_start_proxy(test, objects, tokens, cluster_domain, endpoint))


async def _start_proxy(test: TestCase, objects: Iterable[Mapping[str, Any]], tokens: Mapping[str, str],
                       cluster_domain: str, endpoint: str | None) -> RunningProxy:
    store = Store()
    verifier = StaticTokens({})
    logs = capture_logs(test)
    site, root, agents = proxy_site(store, verifier, reactor, cluster_domain)
    port: Any = await serverFromString(reactor, endpoint or "tcp:0:interface=127.0.0.1").listen(site)
    running = RunningProxy(port.getHost().port, store, verifier, logs, root)
    running.set_objects(objects)
    running.set_tokens(tokens)
    _stop_at_cleanup(test, port, site, agents)
    return running


def serve_site(test: TestCase, store: Store, verifier: Any) -> str:
    """
    Serve a proxy for C{store} and C{verifier} (cluster mode's, say) in this
    reactor on a free loopback port; its URL.  Stopped at cleanup.
    """
    site, _, agents = proxy_site(store, verifier, reactor)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    _stop_at_cleanup(test, port, site, agents)
    return f"http://127.0.0.1:{port.getHost().port}"


def _stop_at_cleanup(test: TestCase, port: Any, site: Any, agents: Any) -> None:
    """At C{test}'s cleanup: stop listening, end every connection, close C{agents}' pool."""

    async def stop() -> None:
        await port.stopListening()
        # Connections a client left open (or that are draining) end with the test.
        for channel in list(site.channels):
            channel.transport.abortConnection()
        await agents.close()
        await deferLater(reactor, 0, lambda: None)

    test.addCleanup(lambda: Deferred.fromCoroutine(stop()))


@define
class ProxyProcess:
    server: Server
    port: int
    admin_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.server.log()


async def _start_process(test: TestCase, args: Sequence[str], env: Mapping[str, str] | None) -> ProxyProcess:
    port, admin = free_port(), free_port()
    argv = [
        sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.exit(run())",
        "-n", "--pidfile=", "connectors-proxy",
        "--listen", f"tcp:{port}:interface=127.0.0.1", "--admin", f"tcp:{admin}:interface=127.0.0.1", *args,
    ]
    environment = {"PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    server = await start_server(test, argv, port=port, env=environment, name="connectors-proxy")
    return ProxyProcess(server, port, admin)


def start_proxy_process(test: TestCase, args: Sequence[str],
                        env: Mapping[str, str] | None = None) -> Deferred[ProxyProcess]:
    """
    Run C{twistd -n connectors-proxy ARGS} (listening on free loopback
    ports) as a separate process; stopped at cleanup.
    """
    return Deferred.fromCoroutine(_start_process(test, args, env))


async def until_ready(test: TestCase, admin_port: int, log: Callable[[], str], pool: Any = None,
                      timeout: float = 30) -> None:
    """
    Poll a proxy process's C{/readyz} (on C{admin_port}) until it answers
    200; after C{timeout} seconds, fail C{test} with the end of C{log()}.
    """
    import treq

    deadline = time.monotonic() + timeout
    while True:
        response = await treq.get(f"http://127.0.0.1:{admin_port}/readyz", pool=pool, persistent=False)
        await response.content()
        if response.code == 200:
            return
        test.assertLess(time.monotonic(), deadline, log()[-3000:])
        await deferLater(reactor, 0.1, lambda: None)


def write_file(test: TestCase, name: str, text: str, folder: str | None = None) -> str:
    """Write C{text} to a file C{name} in C{folder} (by default a new one of C{test}'s); its path."""
    if folder is None:
        folder = test.mktemp()
        os.makedirs(folder)
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def write_setup(test: TestCase, objects: Iterable[Mapping[str, Any]], tokens: Mapping[str, str]) -> list[str]:
    """Write manifests and a token file (side by side) for a proxy process; the arguments to pass it."""
    manifests = write_file(test, "objects.yaml", manifests_text(objects))
    token_path = write_file(test, "tokens.csv", token_file_text(tokens), os.path.dirname(manifests))
    return ["--manifests", manifests, "--tokens", token_path]


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def rest_upstream_setup(test: TestCase, resource: Any, name: str, namespace: str = "team",
                        token_prefix: str = "tok") -> tuple[list[str], str]:
    """
    Serve C{resource} on a loopback port as the upstream of a REST Connector
    C{namespace/name} (Basic credentials), and write the manifests and a
    token file for a proxy process.  Returns the proxy's arguments and the
    client token.
    """
    from twisted.web.server import Site

    upstream = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
    test.addCleanup(upstream.stopListening)
    token = f"{token_prefix}-{os.urandom(8).hex()}"
    args = write_setup(test, [
        connector_class("rest"),
        basic_secret(namespace, "creds", "u", "p"),
        connector(namespace, name, "rest", f"http://127.0.0.1:{upstream.getHost().port}", secret="creds"),
    ], {token: sa(namespace)})
    return args, token
