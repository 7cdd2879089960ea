"""
Request latency while cluster mode lists everything again (issue 18): the
daemon (C{--kubeconfig}, C{--reconcile none}) serves N Connectors and N
Secrets (default 5,000 each) from the fake API server; a probe sends
requests back to back through it; the fake then forgets its history and
cuts every watch, so all four watches get C{410 Gone} and list again, and
the worst request latency around the relist is printed.  A benchmark, not
a test.

    python bench/relist_latency.py [--connectors 5000]

Three processes besides this one: the fake API server, the daemon, and
the upstream (C{python -m http.server}), so only the probe runs here.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from reload_latency import Probe, free_port  # noqa: E402

# The fake API server, with SIGUSR1 meaning "compact and cut every watch".
FAKE = """
import signal, sys
from twisted.internet import reactor
from connectors_proxy.testing.fakekube import FakeKube
from connectors_proxy.testing.fakekube_http import FakeKubeServer
from connectors_proxy.testing.fakekube_strategy import read_manifests
from pathlib import Path
port, token, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
fake = FakeKube(clock=reactor, admin_token=token, bookmark_interval=60.0)
for doc in read_manifests([Path(path)]):
    fake.apply(doc)
FakeKubeServer.listen(fake, reactor, port=port)
def relist():
    # Move the global resourceVersion past the watchers' own, then forget
    # the history: every watch resumed from there gets 410 Gone.
    fake.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bump"}})
    fake.compact()
    fake.cut_watches()
    print("compacted and cut", flush=True)
signal.signal(signal.SIGUSR1, lambda *a: reactor.callFromThread(relist))
print("ready", flush=True)
reactor.run(installSignalHandlers=False)
"""

_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def objects(n: int, upstream: str) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": f"team-{i}"}}
                                  for i in range(10)]
    docs += [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "builder", "namespace": "team-0"}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": "use", "namespace": "team-0"},
         "rules": [{"apiGroups": ["connectors.alauda.io"], "resources": ["connectors"], "verbs": ["get"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "use", "namespace": "team-0"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "use"},
         "subjects": [{"kind": "ServiceAccount", "name": "builder", "namespace": "team-0"}]},
        {"apiVersion": "connectors.alauda.io/v1alpha1", "kind": "ConnectorClass",
         "metadata": {"name": "rest", "annotations": {"proxy.connectors.alauda.io/protocol": "http"}},
         "spec": {"auth": {"types": [{"name": "basicAuth", "secretType": "kubernetes.io/basic-auth"}]}}},
    ]
    for i in range(n):
        ns = f"team-{i % 10}"
        docs.append({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/basic-auth",
                     "metadata": {"name": f"c{i}-secret", "namespace": ns},
                     "stringData": {"username": f"robot-{i}", "password": f"pw-{i}"}})
        docs.append({"apiVersion": "connectors.alauda.io/v1alpha1", "kind": "Connector",
                     "metadata": {"name": f"c{i}", "namespace": ns},
                     "spec": {"connectorClassName": "rest", "address": upstream,
                              "auth": {"name": "basicAuth", "secretRef": {"name": f"c{i}-secret"}}}})
    return docs


def wait_port(port: int, proc: subprocess.Popen[bytes], log: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(open(log).read()[-3000:]) from None
            time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connectors", type=int, default=5000)
    args = parser.parse_args()
    n = args.connectors
    folder = tempfile.mkdtemp(prefix="relist-bench-")
    env = dict(os.environ, PYTHONPATH=ROOT)
    procs: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str], name: str, **kw: Any) -> tuple[subprocess.Popen[bytes], str]:
        log = os.path.join(folder, name + ".log")
        proc = subprocess.Popen(argv, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, **kw)
        procs.append(proc)
        return proc, log

    try:
        www = os.path.join(folder, "www")
        os.makedirs(www)
        with open(os.path.join(www, "x"), "w") as f:
            f.write("ok")
        up_port = free_port()
        upstream, up_log = start([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(up_port)],
                                 "upstream", cwd=www)
        wait_port(up_port, upstream, up_log)

        path = os.path.join(folder, "objects.yaml")
        with open(path, "w") as f:
            yaml.dump_all(objects(n, f"http://127.0.0.1:{up_port}"), f, Dumper=_DUMPER)
        fake_port, admin = free_port(), "bench-admin-token"
        fake, fake_log = start([sys.executable, "-c", FAKE, str(fake_port), admin, path], "fakekube")
        wait_port(fake_port, fake, fake_log)
        conn = http.client.HTTPConnection("127.0.0.1", fake_port, timeout=30)
        conn.request("POST", "/api/v1/namespaces/team-0/serviceaccounts/builder/token",
                     body=json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                                      "spec": {}}),
                     headers={"Authorization": f"Bearer {admin}", "Content-Type": "application/json"})
        token = json.loads(conn.getresponse().read())["status"]["token"]

        kubeconfig = os.path.join(folder, "kubeconfig")
        with open(kubeconfig, "w") as f:
            yaml.safe_dump({"apiVersion": "v1", "kind": "Config", "current-context": "c",
                            "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{fake_port}"}}],
                            "users": [{"name": "u", "user": {"token": admin}}],
                            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}, f)
        port, admin_port = free_port(), free_port()
        proxy, proxy_log = start(
            [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.exit(run())",
             "-n", "--pidfile=", "connectors-proxy", "--listen", f"tcp:{port}:interface=127.0.0.1",
             "--admin", f"tcp:{admin_port}:interface=127.0.0.1", "--kubeconfig", kubeconfig,
             "--reconcile", "none"], "proxy")
        wait_port(admin_port, proxy, proxy_log)
        deadline = time.monotonic() + 120
        while True:
            c = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=5)
            c.request("GET", "/readyz")
            if c.getresponse().status == 200:
                break
            if time.monotonic() > deadline:
                raise SystemExit(open(proxy_log).read()[-3000:])
            time.sleep(0.2)

        probe = Probe(port, "/namespaces/team-0/connectors/c0/x", token=token)
        probe.start()
        time.sleep(4)
        before = probe.window(time.monotonic() - 2, time.monotonic())
        print(f"{n} Connectors + {n} Secrets in cluster mode")
        print(f"  idle: {len(before)} requests in 2 s, worst {max(s[1] for s in before) * 1000:.1f} ms")

        def relists() -> int:
            with open(proxy_log, "rb") as f:
                return len(re.findall(rb"listing again", f.read()))

        count = relists()
        start_at = time.monotonic()
        os.kill(fake.pid, signal.SIGUSR1)
        deadline = start_at + 60
        while relists() < count + 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        done = time.monotonic()
        time.sleep(3)
        window = probe.window(start_at, time.monotonic())
        latencies = sorted(s[1] for s in window)
        errors = sum(1 for s in window if s[2] != 200)
        p99 = latencies[int(len(latencies) * 0.99) - 1]
        print(f"  relist of all four kinds: {relists() - count} lists begun within {done - start_at:.2f} s; "
              f"{len(window)} requests, worst {latencies[-1] * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
              f"{errors} not 200")
        probe.stop = True
        probe.join()
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
