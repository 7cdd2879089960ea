"""
TLS handshake benchmark for the C{cptls:} listener (not a test: CI never runs it).

Starts this file in C{--serve} mode as a separate process (the real
C{serverFromString("cptls:...")} endpoint with a CA, answering nothing after
the handshake), then drives full handshakes (no resumption: tickets and the
session cache are off) from this process with the stdlib C{ssl} client:

  default    SNI localhost: the configured default certificate
  cache-hit  SNI c-a.bench.svc: a minted certificate, from the cache
  cold       SNI c-N.bench.svc, a new N every time: a mint per handshake

and measures, in-process, the server-side cost of picking a context (hit
vs mint) and the memory each cached certificate (leaf, key, SSL context)
holds.  Client and server share the machine's cores, so the end-to-end
figures are a floor.

    python bench/tls_handshakes.py              # 5 s per mode
    python bench/tls_handshakes.py --seconds 2 --cached 2000
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import tracemalloc
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from connectors_proxy.tls.mint import CertificateAuthority  # noqa: E402


def write_pki(folder: str) -> dict[str, str]:
    ca = CertificateAuthority.generate("bench CA", time.time())
    default = ca.mint(["localhost", "127.0.0.1"], time.time())
    files = {"ca.crt": ca.cert_pem(), "ca.key": ca.key_pem(),
             "tls.crt": default.cert_pem(), "tls.key": default.key_pem()}
    paths = {}
    for name, data in files.items():
        paths[name] = os.path.join(folder, name)
        with open(paths[name], "wb") as f:
            f.write(data)
    return paths


def endpoint(paths: dict[str, str], port: int, max_cached: int) -> str:
    return (f"cptls:{port}:interface=127.0.0.1:certKey={paths['tls.crt']}:"
            f"privateKey={paths['tls.key']}:caCert={paths['ca.crt']}:caKey={paths['ca.key']}:"
            f"maxCached={max_cached}")


def serve(description: str) -> None:
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.protocol import Factory, Protocol

    factory = Factory.forProtocol(Protocol)
    factory.noisy = False
    serverFromString(reactor, description).listen(factory)
    reactor.run()  # type: ignore[attr-defined]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def handshakes(port: int, ca_file: str, names: Any, seconds: float) -> tuple[int, float]:
    """Full handshakes for C{seconds}; C{names()} gives the SNI name of each."""
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    count, failures = 0, 0
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()
    while time.perf_counter() < deadline:
        name = names()
        try:
            with socket.create_connection(("127.0.0.1", port)) as raw, \
                    context.wrap_socket(raw, server_hostname=name) as tls:
                tls.getpeercert()
            count += 1
        except (OSError, ssl.SSLError):
            failures += 1
    if failures:
        print(f"  ({failures} handshakes failed)")
    return count, time.perf_counter() - started


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def in_process(paths: dict[str, str], cached: int) -> None:
    """Server-side cost of a context choice, and memory per cached certificate."""
    from twisted.internet.task import Clock

    from connectors_proxy.tls.serve import ServerTLS, TLSFiles

    clock = Clock()
    clock.advance(time.time())
    tls = ServerTLS(TLSFiles(paths["tls.crt"], paths["tls.key"], paths["ca.crt"], paths["ca.key"]),
                    clock, max_cached=cached + 10)
    tls.context_for("c-warm.bench.svc")
    n = 2000
    t = time.perf_counter()
    for _ in range(n):
        tls.context_for("c-warm.bench.svc")
    hit = (time.perf_counter() - t) / n
    gc.collect()
    before = rss()
    tracemalloc.start()
    t = time.perf_counter()
    for i in range(cached):
        tls.context_for(f"c-m{i}.bench.svc")
    mint = (time.perf_counter() - t) / cached
    python_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    gc.collect()
    grown = rss() - before
    print(f"server side, choosing the context: cache hit {hit * 1e6:.1f} us, "
          f"mint (EC P-256 key, sign, SSL context) {mint * 1e3:.2f} ms")
    print(f"memory per cached certificate ({cached} cached): {grown / cached / 1024:.1f} KiB RSS "
          f"(of which Python objects {python_bytes / cached / 1024:.1f} KiB); "
          f"default maxCached=1024 -> ~{grown / cached * 1024 / 2**20:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--cached", type=int, default=2000)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return

    with tempfile.TemporaryDirectory() as folder:
        paths = write_pki(folder)
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", endpoint(paths, port, 100_000)],
            env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)
        try:
            for _ in range(200):
                try:
                    socket.create_connection(("127.0.0.1", port)).close()
                    break
                except OSError:
                    time.sleep(0.05)
            print(f"cptls handshakes, TLS {ssl.OPENSSL_VERSION}, client and server on one "
                  f"machine ({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}), "
                  f"{args.seconds:g} s each, full handshakes:")
            counter = iter(range(10**9))
            modes = {
                "default certificate (SNI localhost)": lambda: "localhost",
                "minted, cache hit (SNI c-a.bench.svc)": lambda: "c-a.bench.svc",
                "minted, cold (new SNI name each time)": lambda: f"c-n{next(counter)}.bench.svc",
            }
            handshakes(port, paths["ca.crt"], lambda: "c-a.bench.svc", 0.5)  # warm up
            for label, names in modes.items():
                count, elapsed = handshakes(port, paths["ca.crt"], names, args.seconds)
                print(f"  {label:40s} {count / elapsed:8.0f} handshakes/s")
        finally:
            server.terminate()
            server.wait(10)
        in_process(paths, args.cached)


if __name__ == "__main__":
    main()
