"""
CONNECT benchmark (not a test: CI never runs it): what an HTTPS forward-proxy
tunnel costs next to the reverse-proxy path and to no proxy at all.

Starts an HTTPS nginx on loopback (its own CA) holding a sparse file, and
the proxy in a process of its own (this file in C{--serve} mode: the
daemon's site and access log, a proxy CA for interception, its forward
guard letting loopback through to that nginx only), then measures:

  handshakes   CONNECT + TLS handshake with the certificate minted for the
               host (a cache hit after the first), full handshakes, per second
  direct       curl -> nginx over TLS (no proxy)
  reverse      curl -> proxy (plain HTTP, path form) -> nginx over TLS, credentials injected
  intercepted  curl -x (CONNECT, the proxy's TLS) -> proxy -> nginx over TLS, credentials injected
  tunnel       curl -x (CONNECT to an unlisted origin) -> bytes relayed -> nginx's own TLS
  slow         intercepted, the client limited to 20 MB/s: the proxy's memory must stay flat
  idle         the proxy's memory per idle connection: plain (connected, nothing sent) and
               intercepted tunnels (CONNECT answered, TLS handshake done, then nothing)

For each transfer: MB/s (curl's average) and the proxy process's peak RSS
growth, sampled every 100 ms.  Client, proxy and nginx share the machine's
cores: compare ratios from one run.

    python bench/connect_tunnel.py            # 1 GiB x 2 rounds, 5 s of handshakes
    python bench/connect_tunnel.py --quick    # 256 MiB x 1 round, 2 s
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from run import MiB, Proc, RssSampler, free_port, need  # noqa: E402

from connectors_proxy.tls.mint import CertificateAuthority  # noqa: E402

NAMESPACE, CONNECTOR = "bench", "api"

NGINX = """\
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
{user}
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    types {{ application/octet-stream bin; }}
    sendfile on;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {tmp}/server.crt;
        ssl_certificate_key {tmp}/server.key;
        root {tmp}/www;
        location /basic/ {{
            if ($http_authorization != "Basic {basic}") {{ return 401; }}
        }}
    }}
}}
"""


def serve(config_path: str) -> None:
    """The proxy, as the daemon builds it, plus a forward guard exemption for the bench's nginx."""
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    from connectors_proxy.auth.identity import StaticTokens, parse_token_file
    from connectors_proxy.model.state import Snapshot, Store
    from connectors_proxy.ops.logformat import observer
    from connectors_proxy.sources.manifests import parse_documents
    from connectors_proxy.tap import proxy_site
    from connectors_proxy.tls.intercept import InterceptTLS
    from connectors_proxy.upstream.forward import ForwardAgents, ForwardGuard

    with open(config_path) as f:
        config = json.load(f)
    # The daemon's access log (formatting included), to a file.
    globalLogBeginner.beginLoggingTo([observer("text", "info", open(config["log"], "w"), reactor)],
                                     redirectStandardIO=False)
    with open(config["manifests"]) as f:
        store = Store()
        store.replace(Snapshot.of(parse_documents(f.read(), config["manifests"])))
    with open(config["tokens"]) as f:
        tokens = StaticTokens(parse_token_file(f.read()))
    intercept = InterceptTLS(config["ca_cert"], config["ca_key"], reactor)
    site, root, _ = proxy_site(store, tokens, reactor, intercept=intercept)
    root.forward_agents = ForwardAgents(reactor, guard=ForwardGuard(
        exempt=frozenset({("127.0.0.1", config["nginx_port"])})))
    reactor.listenTCP(config["port"], site, interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


def write(path: str, data: bytes | str) -> str:
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return path


def manifests(nginx_port: int, upstream_ca: str, username: str, password: str) -> str:
    docs: list[dict[str, Any]] = [
        {"apiVersion": "connectors.alauda.io/v1alpha1", "kind": "ConnectorClass",
         "metadata": {"name": "rest", "annotations": {"proxy.connectors.alauda.io/protocol": "http"}},
         "spec": {"auth": {"types": [{"name": "basicAuth", "secretType": "kubernetes.io/basic-auth"}]}}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds", "namespace": NAMESPACE},
         "type": "kubernetes.io/basic-auth", "stringData": {"username": username, "password": password}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "upstream-ca", "namespace": NAMESPACE},
         "type": "Opaque", "stringData": {"ca.crt": upstream_ca}},
        {"apiVersion": "connectors.alauda.io/v1alpha1", "kind": "Connector",
         "metadata": {"name": CONNECTOR, "namespace": NAMESPACE},
         "spec": {"connectorClassName": "rest", "address": f"https://localhost:{nginx_port}",
                  "auth": {"name": "basicAuth", "secretRef": {"name": "creds"}},
                  "caCertSecretRef": {"name": "upstream-ca"}}},
    ]
    return "\n---\n".join(json.dumps(d) for d in docs) + "\n"


def connect_handshakes(port: int, target: str, authorization: str, ca_file: str, seconds: float) -> float:
    """CONNECT + full TLS handshake + close, back to back; per second."""
    context = ssl.create_default_context(cafile=ca_file)
    host = target.rsplit(":", 1)[0]
    request = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: {authorization}\r\n\r\n".encode()
    count = 0
    started = time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.sendall(request)
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                chunk = raw.recv(4096)
                if not chunk:
                    raise RuntimeError("the proxy closed the connection")
                head += chunk
            if not head.startswith(b"HTTP/1.1 200 "):
                raise RuntimeError(head.decode("latin-1"))
            with context.wrap_socket(raw, server_hostname=host) as tls:
                tls.getpeercert()
        count += 1
    return count / (time.perf_counter() - started)


def open_idle(port: int, count: int, tunnel: tuple[str, str, str] | None) -> list[socket.socket]:
    """C{count} idle connections to the proxy; with C{tunnel} (target, authorization, CA file), intercepted tunnels."""
    held: list[socket.socket] = []
    context = ssl.create_default_context(cafile=tunnel[2]) if tunnel else None
    for _ in range(count):
        raw = socket.create_connection(("127.0.0.1", port))
        if tunnel is None or context is None:
            held.append(raw)
            continue
        target, authorization, _ = tunnel
        raw.sendall(f"CONNECT {target} HTTP/1.1\r\nProxy-Authorization: {authorization}\r\n\r\n".encode())
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += raw.recv(4096)
        held.append(context.wrap_socket(raw, server_hostname=target.rsplit(":", 1)[0]))
    return held


def curl(args: list[str], url: str, timeout: float) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    result = subprocess.run([need("curl"), "-sS", "-o", "/dev/null", "-w", "%{http_code} %{speed_download}",
                             *args, url], capture_output=True, timeout=timeout, env=env)
    code, _, speed = result.stdout.decode().partition(" ")
    if result.returncode != 0 or code not in ("200", "206"):
        raise RuntimeError(f"curl {url}: exit {result.returncode}, {code}: {result.stderr.decode()[-500:]}")
    return {"mb_s": float(speed) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    size = (256 if args.quick else 1024) * MiB
    rounds = 1 if args.quick else 2
    seconds = 2.0 if args.quick else 5.0
    slow = 64 * MiB if args.quick else 200 * MiB
    with tempfile.TemporaryDirectory(prefix="connect-bench-") as tmp:
        for sub in ("www/basic", "www/open"):
            os.makedirs(os.path.join(tmp, sub))
        for sub in ("basic", "open"):
            with open(os.path.join(tmp, "www", sub, "big.bin"), "wb") as f:
                f.truncate(size)
        upstream_ca = CertificateAuthority.generate("bench upstream CA", time.time())
        leaf = upstream_ca.mint(["localhost", "127.0.0.1"], time.time())
        write(os.path.join(tmp, "server.crt"), leaf.cert_pem())
        write(os.path.join(tmp, "server.key"), leaf.key_pem())
        upstream_ca_path = write(os.path.join(tmp, "upstream-ca.crt"), upstream_ca.cert_pem())
        proxy_ca = CertificateAuthority.generate("bench proxy CA", time.time())
        proxy_ca_path = write(os.path.join(tmp, "proxy-ca.crt"), proxy_ca.cert_pem())
        write(os.path.join(tmp, "proxy-ca.key"), proxy_ca.key_pem())
        username, password = "bench", base64.b16encode(os.urandom(12)).decode().lower()
        basic = base64.b64encode(f"{username}:{password}".encode()).decode()
        token = "bench-" + base64.b16encode(os.urandom(12)).decode().lower()
        nginx_port, proxy_port = free_port(), free_port()
        write(os.path.join(tmp, "nginx.conf"), NGINX.format(
            tmp=tmp, port=nginx_port, basic=basic, user="user root;" if os.getuid() == 0 else ""))
        config = {"port": proxy_port, "nginx_port": nginx_port, "log": os.path.join(tmp, "access.log"),
                  "manifests": write(os.path.join(tmp, "objects.yaml"),
                                     manifests(nginx_port, upstream_ca.cert_pem().decode(), username, password)),
                  "tokens": write(os.path.join(tmp, "tokens.csv"),
                                  f'{token},system:serviceaccount:{NAMESPACE}:bench,1,"system:serviceaccounts"\n'),
                  "ca_cert": proxy_ca_path, "ca_key": os.path.join(tmp, "proxy-ca.key")}
        config_path = write(os.path.join(tmp, "config.json"), json.dumps(config))
        procs = [
            Proc("nginx", [need("nginx"), "-c", os.path.join(tmp, "nginx.conf"), "-p", tmp, "-e",
                           os.path.join(tmp, "error.log")], os.path.join(tmp, "nginx.log")),
            Proc("proxy", [sys.executable, __file__, "--serve", config_path], os.path.join(tmp, "proxy.log"),
                 env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT),
        ]
        try:
            procs[0].start()
            procs[0].wait_port(nginx_port)
            procs[1].start()
            procs[1].wait_port(proxy_port)
            proxy_pid = procs[1].pid
            proxy_user = f"{NAMESPACE}%2F{CONNECTOR}:{token}"
            authorization = "Basic " + base64.b64encode(f"{NAMESPACE}/{CONNECTOR}:{token}".encode()).decode()
            via = ["-x", f"http://127.0.0.1:{proxy_port}", "--proxy-user", proxy_user]
            transfers = {
                "direct": (["--cacert", upstream_ca_path, "-H", f"Authorization: Basic {basic}"],
                           f"https://localhost:{nginx_port}/basic/big.bin"),
                "reverse": (["-H", f"Authorization: Bearer {token}"],
                            f"http://127.0.0.1:{proxy_port}/namespaces/{NAMESPACE}/connectors/{CONNECTOR}"
                            f"/basic/big.bin"),
                "intercepted": ([*via, "--cacert", proxy_ca_path], f"https://localhost:{nginx_port}/basic/big.bin"),
                "tunnel": ([*via, "--cacert", upstream_ca_path], f"https://127.0.0.1:{nginx_port}/open/big.bin"),
            }
            print(f"CONNECT bench: {size // MiB} MiB x {rounds}, {os.cpu_count()} cores, "
                  f"load average {os.getloadavg()[0]:.1f}, {ssl.OPENSSL_VERSION}")
            connect_handshakes(proxy_port, f"localhost:{nginx_port}", authorization, proxy_ca_path, 0.5)
            rate = connect_handshakes(proxy_port, f"localhost:{nginx_port}", authorization, proxy_ca_path, seconds)
            print(f"  CONNECT + full TLS handshake, cached minted certificate: {rate:8.0f} /s")
            results: dict[str, list[tuple[float, float]]] = {name: [] for name in transfers}
            for _ in range(rounds):
                for name, (extra, url) in transfers.items():
                    sampler = RssSampler(lambda: [proxy_pid])
                    res = curl(extra, url, timeout=600)
                    results[name].append((res["mb_s"], sampler.stop()))
            for name, values in results.items():
                best = max(v[0] for v in values)
                grown = max(v[1] for v in values)
                print(f"  {name:12s} {best:8.0f} MB/s   proxy RSS growth {grown:6.1f} MiB")
            sampler = RssSampler(lambda: [proxy_pid])
            extra, url = transfers["intercepted"]
            curl([*extra, "--limit-rate", "20M", "-r", f"0-{slow - 1}"], url, timeout=600)
            print(f"  {'slow 20 MB/s':12s} {slow // MiB:5d} MiB    proxy RSS growth {sampler.stop():6.1f} MiB")
            count = 1000
            for label, tunnel in (("idle plain connections", None),
                                  ("idle intercepted tunnels", (f"localhost:{nginx_port}", authorization,
                                                                proxy_ca_path))):
                sampler = RssSampler(lambda: [proxy_pid])
                held = open_idle(proxy_port, count, tunnel)
                time.sleep(0.5)
                grown = sampler.stop()
                for sock in held:
                    sock.close()
                print(f"  {count} {label:28s} {grown * 1024 / count:6.1f} KiB each")
                time.sleep(1)
        finally:
            for proc in reversed(procs):
                proc.stop()


if __name__ == "__main__":
    main()
