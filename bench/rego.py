"""
What ConnectorClass Rego hooks cost (not a test: CI never runs it).

One real C{twistd -n connectors-proxy} serves three Connectors on the same
nginx origin, which answers 401 unless it gets the right credentials:

  plain         a class without hooks: Bearer client token, Basic injected
  rego          glab's form: the client token in PRIVATE-TOKEN (the class's
                authExtractor), the Secret injected as Private-Token by a
                generator.  Both answer from the proxy's cache once they
                have seen an input (the same token, the same Secret).
  rego-uncached the same policies, each also reading the clock
                (C{time.now_ns()}), so that neither is ever cached: two
                evaluations in the evaluator processes per request

Each is loaded in turn (interleaved rounds) with C{wrk} twice: one
connection (C{-c1}: the latency a request gains, no queueing) and 50
(C{-c50}: throughput).  The table gives req/s, p50 and p99, and CPU time per
request of the proxy and its Rego evaluator processes together.

    python bench/rego.py                 # 10 s per load, 3 rounds
    python bench/rego.py --seconds 3 --rounds 1

Needs C{nginx} and C{wrk}; logs go to C{/tmp/connectors-proxy-bench/}.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import statistics
import subprocess
import sys
from collections.abc import Sequence

from run import (  # bench/run.py: the same process handling
    NAMESPACE,
    ROOT,
    basic_credentials,
    children,
    need,
    new_run_dir,
    origin_nginx,
    proxy_proc,
    wrk_cpu,
)

ORIGIN = """\
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location /plain/ {{
            alias {www}/;
            if ($http_authorization != "{authorization}") {{ return 401; }}
        }}
        location /rego/ {{
            alias {www}/;
            if ($http_private_token != "{pat}") {{ return 401; }}
        }}
    }}
"""

EXTRACTOR = """package proxy

import rego.v1

default auth := {"token": ""}

auth := {"token": v[0]} if {
  v := input.request.headers["Private-Token"]
  count(v) > 0
}
"""

GENERATOR = """package proxy

import rego.v1

auth := {"position": "header", "auth": {"Private-Token": input.data.token}}
"""

# Reading the clock, neither is ever answered from the cache.
EXTRACTOR_UNCACHED = EXTRACTOR.replace("count(v) > 0", "count(v) > 0\n  time.now_ns() > 0")
GENERATOR_UNCACHED = GENERATOR.replace("input.data.token}}", "input.data.token}} if { time.now_ns() > 0 }")


def indent(text: str, spaces: int) -> str:
    return "\n".join(" " * spaces + line if line else line for line in text.splitlines())


def manifests(origin: int, username: str, password: str, pat: str) -> str:
    def rego_class(name: str, extractor: str, generator: str) -> str:
        return f"""\
apiVersion: connectors.alauda.io/v1alpha1
kind: ConnectorClass
metadata:
  name: {name}
  annotations: {{proxy.connectors.alauda.io/protocol: http}}
spec:
  auth:
    types:
    - name: patAuth
      secretType: connectors.cpaas.io/gitlab-pat-auth
      generator:
        rego: |
{indent(generator, 10)}
  proxy:
    authExtractor:
      rego: |
{indent(extractor, 8)}
---
"""

    def connector(name: str, class_name: str, path: str, auth: str, secret: str) -> str:
        return f"""\
apiVersion: connectors.alauda.io/v1alpha1
kind: Connector
metadata: {{name: {name}, namespace: {NAMESPACE}}}
spec:
  connectorClassName: {class_name}
  address: http://127.0.0.1:{origin}/{path}
  auth: {{name: {auth}, secretRef: {{name: {secret}}}}}
---
"""

    return ("""\
apiVersion: connectors.alauda.io/v1alpha1
kind: ConnectorClass
metadata:
  name: plain
  annotations: {proxy.connectors.alauda.io/protocol: http}
spec:
  auth:
    types:
    - {name: basicAuth, secretType: kubernetes.io/basic-auth}
---
""" + rego_class("rego", EXTRACTOR, GENERATOR) + rego_class("rego-uncached", EXTRACTOR_UNCACHED, GENERATOR_UNCACHED)
            + connector("plain", "plain", "plain", "basicAuth", "basic")
            + connector("rego", "rego", "rego", "patAuth", "pat")
            + connector("rego-uncached", "rego-uncached", "rego", "patAuth", "pat")
            + f"""\
apiVersion: v1
kind: Secret
metadata: {{name: basic, namespace: {NAMESPACE}}}
type: kubernetes.io/basic-auth
stringData: {{username: {username}, password: {password}}}
---
apiVersion: v1
kind: Secret
metadata: {{name: pat, namespace: {NAMESPACE}}}
type: connectors.cpaas.io/gitlab-pat-auth
stringData: {{token: {pat}}}
""")


def headers_for(name: str, token: str) -> list[str]:
    host = f"Host: c-{name}.{NAMESPACE}.svc.cluster.local"
    if name == "plain":
        return [host, f"Authorization: Bearer {token}"]
    return [host, f"PRIVATE-TOKEN: {token}"]


def check(port: int, name: str, headers: list[str]) -> None:
    argv = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "30"]
    for h in headers:
        argv += ["-H", h]
    code = subprocess.run([*argv, f"http://127.0.0.1:{port}/small.bin"], capture_output=True, text=True,
                          timeout=60).stdout
    if code != "200":
        raise RuntimeError(f"{name}: expected 200, got {code}")


def load(port: int, headers: list[str], seconds: int, connections: int, pids: list[int]) -> dict[str, float]:
    parsed = wrk_cpu(port, "/small.bin", headers, seconds, pids, threads=1 if connections == 1 else 2,
                     connections=connections)
    if parsed["non2xx"] or parsed["errors"]:
        raise RuntimeError(f"wrk saw failures: non-2xx {parsed['non2xx']}, socket errors {parsed['errors']}")
    return parsed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", default=os.path.join("/tmp", "connectors-proxy-bench"))
    args = parser.parse_args(argv)
    for program in ("nginx", "wrk", "curl"):
        need(program)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    run_dir, www = new_run_dir(args.workdir, "rego")
    username, password, authorization = basic_credentials()
    pat, token = "glpat-" + secrets.token_hex(10), secrets.token_hex(24)

    nginx, origin = origin_nginx(run_dir, ORIGIN, www=www, authorization=authorization, pat=pat)
    proxy, port = proxy_proc("connectors-proxy", ROOT, run_dir, manifests(origin, username, password, pat), token,
                             "proxy.log")
    names = ["plain", "rego", "rego-uncached"]
    results: dict[tuple[str, int], list[dict[str, float]]] = {(n, c): [] for n in names for c in (1, 50)}
    try:
        nginx.start()
        nginx.wait_port(origin)
        proxy.start()
        proxy.wait_port(port)
        for name in names:
            check(port, name, headers_for(name, token))
            # Warm-up: connections, the evaluator processes, caches.
            load(port, headers_for(name, token), 2, 50, [proxy.pid])
        pids = [proxy.pid, *children(proxy.pid)]
        print(f"proxy pid {proxy.pid}, Rego evaluator processes {children(proxy.pid)}", flush=True)
        for round_ in range(args.rounds):
            order = names[round_ % len(names):] + names[:round_ % len(names)]
            for connections in (1, 50):
                for name in order:
                    r = load(port, headers_for(name, token), args.seconds, connections, pids)
                    results[(name, connections)].append(r)
                    print(f"round {round_ + 1} -c{connections:<3} {name:14} {r['rps']:9.0f} req/s "
                          f"p50 {r['p50']:6.3f} ms p99 {r['p99']:6.3f} ms {r['cpu_us']:7.1f} CPU us/req", flush=True)
        print(f"\n{args.rounds} rounds of {args.seconds} s, medians")
        print(f"{'target':16} {'conns':>5} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/req':>10}")
        med = {k: {f: statistics.median(r[f] for r in v) for f in ("rps", "p50", "p99", "cpu_us")}
               for k, v in results.items()}
        for (name, connections), m in med.items():
            print(f"{name:16} {connections:5} {m['rps']:9.0f} {m['p50']:8.3f} {m['p99']:8.3f} {m['cpu_us']:10.1f}")
        for name in names[1:]:
            for connections in (1, 50):
                a, b = med[(name, connections)], med[("plain", connections)]
                print(f"{name} vs plain, -c{connections}: req/s x{a['rps'] / b['rps']:.3f}, "
                      f"p50 {a['p50'] - b['p50']:+.3f} ms, CPU {a['cpu_us'] - b['cpu_us']:+.1f} us/req")
    finally:
        proxy.stop()
        nginx.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
