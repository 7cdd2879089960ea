"""
requests/s on the proxy's other request paths, source trees side by side
(not a test: CI never runs it).

One origin nginx (checking the injected credentials, as in bench/rego.py) and
one real token-auth docker-registry (tests/support/registry.py: the
distribution registry trusting a token server that runs in this process)
serve, through each tree's C{twistd -n connectors-proxy}:

  plain          a REST class without hooks: Bearer client token, Basic injected
  rego           glab's form (bench/rego.py): the client token in PRIVATE-TOKEN,
                 found by the class's authExtractor; the PAT injected as
                 Private-Token by a generator (both answered from the cache
                 once seen)
  rego-uncached  the same policies reading the clock: two evaluations in the
                 Rego evaluator processes per request (--uncached)
  oci-manifest   C{GET /v2/bench/app/manifests/v1} (host mode, Host
                 c-registry.bench.svc.cluster.local, Basic ANY:TOKEN, an
                 C{Accept} for OCI and Docker manifests); the proxy gets and
                 caches the registry's token and relays the manifest

and, for orientation, C{registry-direct}: the same manifest GET straight at
the registry with a token from the token server.

Each is loaded with C{wrk -t2 -c50} in turn, trees interleaved within each
round.  The table gives req/s, p50, p99 and CPU time per request of the proxy
(with its Rego evaluator processes), then each tree against the first.

    python bench/paths.py                                       # this tree, 10 s x 3 rounds
    python bench/paths.py --proxy-src /tmp/before --extra-proxy after=. --seconds 3 --rounds 1

Needs nginx, wrk, curl, docker-registry, skopeo and umoci (the image is a
small one, built once under /tmp/connectors-proxy-bench/cache).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from typing import Any

from harness import Harness, cached_image, connector_manifests
from rego import ORIGIN, headers_for
from rego import manifests as rego_manifests
from run import (
    NAMESPACE,
    ROOT,
    Proc,
    basic_credentials,
    children,
    need,
    new_run_dir,
    origin_nginx,
    run_main,
    source_trees,
    start_proxies,
    stop_all,
    wrk_cpu,
)

REGISTRY_CONNECTOR = "registry"
REGISTRY_HOST = f"c-{REGISTRY_CONNECTOR}.{NAMESPACE}.svc.cluster.local"
REPO, TAG = "bench/app", "v1"
ACCEPT = ("Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, "
          "application/vnd.docker.distribution.manifest.v2+json")


def check(port: int, path: str, headers: list[str], what: str) -> bytes:
    argv = ["curl", "-sS", "--max-time", "30", "-w", "\n%{http_code}"]
    for h in headers:
        argv += ["-H", h]
    out = subprocess.run([*argv, f"http://127.0.0.1:{port}{path}"], capture_output=True, timeout=60).stdout
    body, _, code = out.rpartition(b"\n")
    if code != b"200":
        raise RuntimeError(f"{what}: GET {path} gave {code.decode()}: {body[:500]!r}")
    return body


def registry_token(registry: Any, user: str, password: str) -> str:
    """A pull token for C{REPO} from the registry's token server."""
    tokens = registry.token_server
    url = f"{tokens.realm}?service={tokens.service}&scope=repository:{REPO}:pull"
    request = urllib.request.Request(url, headers={
        "Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()})
    with urllib.request.urlopen(request, timeout=30) as r:
        return str(json.load(r)["token"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--uncached", action="store_true", help="also the rego-uncached class")
    parser.add_argument("--paths", default="", help="comma-separated: plain,rego,rego-uncached,oci-manifest,"
                                                      "registry-direct (default: all but rego-uncached)")
    parser.add_argument("--proxy-src", default=ROOT, help="source tree (default: this checkout)")
    parser.add_argument("--extra-proxy", action="append", default=[], metavar="NAME=DIR",
                        help="also run the tree DIR as NAME, side by side")
    parser.add_argument("--workdir", default=os.path.join("/tmp", "connectors-proxy-bench"))
    args = parser.parse_args(argv)
    for program in ("nginx", "wrk", "curl", "docker-registry", "skopeo", "umoci"):
        need(program)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    paths = [p for p in (args.paths.split(",") if args.paths else
                         ["plain", "rego", *(["rego-uncached"] if args.uncached else []), "oci-manifest",
                          "registry-direct"]) if p]

    run_dir, www = new_run_dir(args.workdir, "paths")
    username, password, authorization = basic_credentials()
    pat, token = "glpat-" + secrets.token_hex(10), secrets.token_hex(24)
    trees = source_trees(args.proxy_src, args.extra_proxy)

    print(f"connectors-proxy paths bench {time.strftime('%Y-%m-%d %H:%M:%S %z')}: wrk -t2 -c50 {args.seconds:g} s x "
          f"{args.rounds} round(s); {os.cpu_count()} cpus, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    harness = Harness(os.path.join(run_dir, "fixtures"))
    procs: list[Proc] = []
    try:
        from tests.support.registry import skopeo, start_token_registry, write_authfile

        # Without its access log and info lines the registry spends less of
        # the shared CPU on each manifest GET (distribution reads its
        # configuration's overrides from the environment).
        os.environ.update(REGISTRY_LOG_ACCESSLOG_DISABLED="true", REGISTRY_LOG_LEVEL="warn")
        registry = harness.call(start_token_registry, harness, expires_in=3600)
        (reg_user, reg_password), = registry.users.items()
        image = cached_image(harness, "small", (4096, 1000))
        authfile = write_authfile(os.path.join(run_dir, "registry-auth.json"),
                                  {registry.host: (reg_user, reg_password)})
        pushed = subprocess.run(skopeo("copy", "--dest-tls-verify=false", image.reference,
                                       f"docker://{registry.host}/{REPO}:{TAG}", authfile=authfile),
                                capture_output=True, text=True, timeout=300)
        if pushed.returncode != 0:
            raise RuntimeError(f"pushing the image failed: {pushed.stderr}")

        origin, origin_port = origin_nginx(run_dir, ORIGIN, www=www, authorization=authorization, pat=pat)
        origin.start()
        procs.append(origin)
        origin.wait_port(origin_port)

        objects = (rego_manifests(origin_port, username, password, pat) + "---\n"
                   + connector_manifests(NAMESPACE, "oci", REGISTRY_CONNECTOR, registry.address, reg_user,
                                         reg_password))
        proxies = start_proxies(trees, run_dir, objects, token, procs)

        client_basic = "Authorization: Basic " + base64.b64encode(f"pipeline:{token}".encode()).decode()
        direct_headers = [f"Authorization: Bearer {registry_token(registry, reg_user, reg_password)}", ACCEPT]

        def request_of(path_name: str) -> tuple[str, list[str]]:
            if path_name in ("plain", "rego", "rego-uncached"):
                return "/small.bin", headers_for(path_name, token)
            if path_name == "oci-manifest":
                return f"/v2/{REPO}/manifests/{TAG}", [f"Host: {REGISTRY_HOST}", client_basic, ACCEPT]
            raise ValueError(path_name)

        # Every path answers 200 through every tree (the manifest itself for
        # OCI) before any load; then a warm-up of each (connections, tokens,
        # evaluator processes, caches).
        manifest = None
        for name, _, port in proxies:
            for p in paths:
                if p == "registry-direct":
                    continue
                path, headers = request_of(p)
                body = check(port, path, headers, f"{name} {p}")
                if p == "oci-manifest":
                    manifest = manifest or body
                    if body != manifest:
                        raise RuntimeError(f"{name}: a different manifest")
        if "registry-direct" in paths:
            check(registry.port, f"/v2/{REPO}/manifests/{TAG}", direct_headers, "registry-direct")

        runs: list[tuple[str, str, int, str, list[str], Proc | None]] = []
        for p in paths:
            if p == "registry-direct":
                runs.append(("registry-direct", p, registry.port, f"/v2/{REPO}/manifests/{TAG}", direct_headers,
                             None))
                continue
            for name, proc, port in proxies:
                path, headers = request_of(p)
                runs.append((name, p, port, path, headers, proc))
        for _, _, port, path, headers, target in runs:
            wrk_cpu(port, path, headers, 2, [target.pid] if target else [])
        results: dict[tuple[str, str], list[dict[str, Any]]] = {}
        print(f"\n== wrk -t2 -c50 -d{args.seconds:g}s, {args.rounds} round(s)", flush=True)
        for round_ in range(args.rounds):
            for name, p, port, path, headers, target in runs:
                # The proxy and its Rego evaluator processes.
                pids = [target.pid, *children(target.pid)] if target else [registry.server.process.pid]
                r = wrk_cpu(port, path, headers, args.seconds, pids)
                bad = f"  NON-2xx {r['non2xx']} ERRORS {r['errors']}" if r["non2xx"] or r["errors"] else ""
                results.setdefault((p, name), []).append(r)
                print(f"  round {round_ + 1} {p:<16}{name:<18}{r['rps']:8.0f} req/s  p50 {r['p50']:6.2f} ms"
                      f"  p99 {r['p99']:7.2f} ms  cpu {r['cpu_us']:5.0f} us/req"
                      f"  others {r['others_cpus']:.2f} cpus{bad}", flush=True)

        print("\n== summary: medians over rounds (CPU: the proxy with its Rego evaluator processes;"
              " registry-direct: the registry's)")
        print(f"  {'path':<16}{'tree':<18}{'req/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'cpu us/req':>11}")
        med = {k: {f: statistics.median(r[f] for r in v) for f in ("rps", "p50", "p99", "cpu_us")}
               for k, v in results.items()}
        for (p, name), m in med.items():
            print(f"  {p:<16}{name:<18}{m['rps']:8.0f}{m['p50']:8.2f}{m['p99']:8.2f}{m['cpu_us']:11.0f}")
        if len(proxies) > 1:
            print("\n== side by side (each tree against the first; req/s: median of per-round ratios)")
            first = proxies[0][0]
            for p in paths:
                for name, _, _ in proxies[1:]:
                    if (p, name) not in results:
                        continue
                    ratios = [a["rps"] / b["rps"] for a, b in zip(results[(p, name)], results[(p, first)],
                                                                   strict=False)]
                    cpu = med[(p, first)]["cpu_us"] / med[(p, name)]["cpu_us"]
                    print(f"  {p:<16}{name} / {first} req/s {statistics.median(ratios):.2f}x"
                          f" (rounds: {', '.join(f'{x:.2f}' for x in ratios)}), CPU per request {cpu:.2f}x cheaper")
        plain = [(name, med.get(("plain", name))) for name, _, _ in proxies]
        for p in ("rego", "rego-uncached", "oci-manifest"):
            for name, base in plain:
                other = med.get((p, name))
                if other and base:
                    print(f"  {name}: {p} / plain req/s {other['rps'] / base['rps']:.2f}x,"
                          f" CPU {other['cpu_us'] - base['cpu_us']:+.0f} us/req")
        print(f"\nload average now: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; logs in {run_dir}")
        return 0
    finally:
        stop_all(procs)
        harness.close()


if __name__ == "__main__":
    run_main(main)
