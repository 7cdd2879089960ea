"""
Request latency while a large manifest set reloads (issue 18): the daemon
(C{twistd -n connectors-proxy --manifests ...}) serves N Connectors and N
Secrets (default 5,000 each, about 2 MB of YAML in one file) while a probe
sends requests back to back; the files are then changed and the worst
request latency around the reload is printed.  A benchmark, not a test.

    python bench/reload_latency.py [--connectors 5000] [--files 1]

Scenarios: one Secret edited in place; every Secret rotated (the whole set
re-parsed); the file written non-atomically in two halves 0.3 s apart (the
reload must wait for it to settle, never serving half the objects).
The upstream runs in this process's reactor; the probe is a keep-alive
C{http.client} connection in a thread, so its figures include nothing but
the proxy (and loopback).
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

TOKEN = "bench-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def documents(n: int, upstream: str, generation: int, edited: int | None = None) -> list[dict[str, Any]]:
    """The class, N Secrets and N Connectors; Secrets carry C{generation} (or only Secret C{edited} does)."""
    docs: list[dict[str, Any]] = [{
        "apiVersion": "connectors.alauda.io/v1alpha1", "kind": "ConnectorClass",
        "metadata": {"name": "rest", "annotations": {"proxy.connectors.alauda.io/protocol": "http"}},
        "spec": {"auth": {"types": [{"name": "basicAuth", "secretType": "kubernetes.io/basic-auth"}]}}}]
    for i in range(n):
        ns = f"team-{i % 10}"
        password = f"pw-{i}-{generation if edited is None or edited == i else 0}"
        docs.append({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/basic-auth",
                     "metadata": {"name": f"c{i}-secret", "namespace": ns,
                                  "labels": {"app.kubernetes.io/part-of": "bench"}},
                     "stringData": {"username": f"robot-{i}", "password": password}})
        docs.append({"apiVersion": "connectors.alauda.io/v1alpha1", "kind": "Connector",
                     "metadata": {"name": f"c{i}", "namespace": ns,
                                  "labels": {"app.kubernetes.io/part-of": "bench"}},
                     "spec": {"connectorClassName": "rest", "address": upstream,
                              "auth": {"name": "basicAuth", "secretRef": {"name": f"c{i}-secret"}}}})
    return docs


def render(docs: list[dict[str, Any]], files: int) -> list[str]:
    """C{docs} as the YAML text of C{files} files."""
    per = -(-len(docs) // files)
    return [yaml.dump_all(docs[f * per:(f + 1) * per], Dumper=_DUMPER, sort_keys=False) for f in range(files)]


_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def write(folder: str, texts: list[str], halves: bool = False) -> None:
    """Write the files; C{halves}: each non-atomically, in two writes 0.3 s apart."""
    for f, text in enumerate(texts):
        path = os.path.join(folder, f"objects-{f}.yaml")
        if halves:
            with open(path, "w") as out:
                out.write(text[: len(text) // 2])
                out.flush()
                time.sleep(0.3)
                out.write(text[len(text) // 2:])
        else:
            tmp = path + ".tmp"
            with open(tmp, "w") as out:
                out.write(text)
            os.replace(tmp, path)


class Probe(threading.Thread):
    """Back-to-back requests on one keep-alive connection; (start time, latency, status) each."""

    def __init__(self, port: int, path: str, token: str = TOKEN) -> None:
        super().__init__(daemon=True)
        self.port, self.path, self.token = port, path, token
        self.samples: list[tuple[float, float, int]] = []
        self.stop = False

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self.stop:
            start = time.monotonic()
            try:
                conn.request("GET", self.path, headers={"Authorization": f"Bearer {self.token}"})
                response = conn.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                status = 0
            self.samples.append((start, time.monotonic() - start, status))
            time.sleep(0.002)

    def window(self, start: float, end: float) -> list[tuple[float, float, int]]:
        return [s for s in self.samples if start <= s[0] <= end]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connectors", type=int, default=5000)
    parser.add_argument("--files", type=int, default=1)
    args = parser.parse_args()

    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    class Ok(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            return b"ok"

    upstream = reactor.listenTCP(0, Site(Ok()), interface="127.0.0.1")
    address = f"http://127.0.0.1:{upstream.getHost().port}"
    threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False}, daemon=True).start()

    folder = tempfile.mkdtemp(prefix="reload-bench-")
    manifests = os.path.join(folder, "manifests")
    os.makedirs(manifests)
    n = args.connectors
    write(manifests, render(documents(n, address, 0), args.files))
    size = sum(os.path.getsize(os.path.join(manifests, f)) for f in os.listdir(manifests))
    tokens = os.path.join(folder, "tokens.csv")
    with open(tokens, "w") as f:
        f.write(f'{TOKEN},system:serviceaccount:team-0:builder,uid-1,"system:serviceaccounts"\n')
    port, admin = free_port(), free_port()
    log_path = os.path.join(folder, "proxy.log")
    log = open(log_path, "wb")
    proxy = subprocess.Popen(
        [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.exit(run())",
         "-n", "--pidfile=", "connectors-proxy", "--listen", f"tcp:{port}:interface=127.0.0.1",
         "--admin", f"tcp:{admin}:interface=127.0.0.1", "--manifests", manifests, "--tokens", tokens],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=ROOT), start_new_session=True)

    def reloads() -> int:
        with open(log_path, "rb") as f:
            return len(re.findall(rb"manifests reloaded", f.read()))

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proxy.poll() is not None:
                    raise SystemExit(open(log_path).read()[-3000:]) from None
                time.sleep(0.1)
        # Rendered before the probe starts: this process serves the upstream,
        # and YAML dumping here would slow it down.
        scenarios = [
            ("one Secret edited", render(documents(n, address, 1, edited=n // 2), args.files), False),
            ("every Secret rotated", render(documents(n, address, 2), args.files), False),
            ("written in two halves 0.3 s apart", render(documents(n, address, 3), args.files), True),
        ]
        # A Connector near the end of the file: a half-written file that was
        # loaded as it stood would drop it (404s).
        probe = Probe(port, f"/namespaces/team-0/connectors/c{(n - 1) // 10 * 10}/x")
        probe.start()
        time.sleep(3)  # the first second warms up connections
        print(f"{n} Connectors + {n} Secrets, {size / 1e6:.1f} MB in {args.files} file(s)")
        before = probe.window(time.monotonic() - 2, time.monotonic())
        print(f"  idle: {len(before)} requests in 2 s, worst {max(s[1] for s in before) * 1000:.1f} ms")
        for name, texts, halves in scenarios:
            count = reloads()
            start = time.monotonic()
            write(manifests, texts, halves)
            deadline = start + 60
            while reloads() == count and time.monotonic() < deadline:
                time.sleep(0.05)
            done = time.monotonic()
            time.sleep(1.5)  # another poll: a second reload would show here
            window = probe.window(start, time.monotonic())
            latencies = sorted(s[1] for s in window)
            errors = sum(1 for s in window if s[2] != 200)
            p99 = latencies[int(len(latencies) * 0.99) - 1] if latencies else 0.0
            print(f"  {name}: reloaded {done - start:.2f} s after the write ({reloads() - count} reload(s)); "
                  f"{len(window)} requests, worst {latencies[-1] * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
                  f"{errors} not 200")
        probe.stop = True
        probe.join()
        with open(log_path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
        problems = [line for line in text.splitlines() if "[error]" in line or "[critical]" in line]
        if problems:
            print("proxy errors:\n" + "\n".join(problems[:10]))
    finally:
        proxy.terminate()
        proxy.wait(10)
        reactor.callFromThread(reactor.stop)


if __name__ == "__main__":
    main()
