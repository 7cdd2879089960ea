"""
Cluster mode at scale: N Connectors (default 5,000, each with its Secret)
reconciled from a cold start against the fake API server on loopback, then
a restart on the converged cluster.  A benchmark, not a test: it prints
figures.

    pip install '.[bench]'       # the fake API server needs jsonschema
    python bench/kube_scale.py [--connectors 5000] [--qps 100] [--max-in-flight 8]

The fake API server runs in its own process (so its CPU and memory are not
counted as the proxy's); this process runs L{ClusterMode} as the daemon
does.  Printed: time until every Connector has its Service and a Ready
status, the write count, the time to sync and the writes (should be zero)
for a second cold start on the converged cluster, and this process's RSS.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

try:
    import jsonschema  # noqa: F401 - the fake API server's one dependency beyond the proxy's
except ImportError:
    sys.exit("bench/kube_scale.py: the fake API server needs jsonschema: pip install '.[bench]'")


def rss_mib(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def objects(n: int) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": f"team-{i}"}}
        for i in range(10)
    ]
    docs.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "connectors-system"}})
    docs.append({"apiVersion": "connectors.alauda.io/v1alpha1", "kind": "ConnectorClass",
                 "metadata": {"name": "rest"},
                 "spec": {"auth": {"types": [{"name": "basicAuth",
                                              "secretType": "kubernetes.io/basic-auth"}]},
                          "proxy": {"ref": {"kind": "Service", "name": "connectors-proxy",
                                            "namespace": "connectors-system"}}}})
    pw = base64.b64encode(b"password").decode()
    for i in range(n):
        ns = f"team-{i % 10}"
        docs.append({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/basic-auth",
                     "metadata": {"name": f"c{i}-secret", "namespace": ns},
                     "data": {"username": pw, "password": pw}})
        docs.append({"apiVersion": "connectors.alauda.io/v1alpha1", "kind": "Connector",
                     "metadata": {"name": f"c{i}", "namespace": ns},
                     "spec": {"connectorClassName": "rest",
                              "address": f"https://tool-{i}.example.com",
                              "auth": {"name": "basicAuth",
                                       "secretRef": {"name": f"c{i}-secret"}}}})
    return docs


def start_fake(folder: str, n: int) -> tuple[subprocess.Popen[bytes], str]:
    manifests = os.path.join(folder, "objects.yaml")
    with open(manifests, "w") as f:
        yaml.safe_dump_all(objects(n), f)
    kubeconfig = os.path.join(folder, "kubeconfig")
    log = open(os.path.join(folder, "fakekube.log"), "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "connectors_proxy.testing.fakekube", "--kubeconfig", kubeconfig,
         "--apply", manifests],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")))
    started = time.monotonic()
    pattern = re.compile(rb"listening on (http://127\.0\.0\.1:\d+)")
    while time.monotonic() - started < 600:
        with open(os.path.join(folder, "fakekube.log"), "rb") as f:
            text = f.read()
        match = pattern.search(text)
        if match:
            return proc, kubeconfig
        if proc.poll() is not None:
            raise SystemExit(f"fakekube exited:\n{text.decode(errors='replace')[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("fakekube did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--connectors", type=int, default=5000)
    parser.add_argument("--qps", type=float, default=None,
                        help="writes per second (default: ClusterMode's default)")
    parser.add_argument("--max-in-flight", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args()

    from twisted.internet import reactor
    from twisted.internet.defer import Deferred
    from twisted.internet.task import deferLater

    from connectors_proxy.kube.cluster import ClusterMode
    from connectors_proxy.kube.config import load_kubeconfig
    from connectors_proxy.model.state import Store

    n = args.connectors
    folder = tempfile.mkdtemp(prefix="kube-scale-")
    t = time.monotonic()
    fake, kubeconfig = start_fake(folder, n)
    print(f"fake API server up with {n} Connectors and {n} Secrets in "
          f"{time.monotonic() - t:.1f}s (pid {fake.pid})", flush=True)
    config = load_kubeconfig(kubeconfig)
    tuning: dict[str, Any] = {}
    if args.qps is not None:
        tuning["qps"] = args.qps
    if args.max_in_flight is not None:
        tuning["max_in_flight"] = args.max_in_flight
    results: dict[str, Any] = {}
    rss_before = rss_mib()

    async def run_once(label: str) -> ClusterMode:
        store = Store()
        mode = ClusterMode(reactor, config, store, resync_period=0, **tuning)
        started = time.monotonic()
        mode.startService()
        await mode.synced()
        while not store.ready:
            await deferLater(reactor, 0.01, lambda: None)
        synced = time.monotonic() - started
        writer = mode.writer
        assert writer is not None
        await deferLater(reactor, 0.05, lambda: None)
        await writer.idle()
        done = time.monotonic() - started
        # Settle: our own writes come back over the watches; none may
        # cause another write.
        writes = writer.counters.writes
        await deferLater(reactor, 3.0, lambda: None)
        await writer.idle()
        results[label] = {
            "synced_s": synced, "converged_s": done, "writes": writer.counters.writes,
            "writes_after_settling": writer.counters.writes - writes,
            "creates": writer.counters.creates, "status_writes": writer.counters.status_writes,
            "conflicts": writer.counters.conflicts, "failures": writer.counters.failures,
            "requests": getattr(mode.client, "requests", None),
            "rss_mib": rss_mib(), "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        return mode

    async def check(mode: ClusterMode) -> None:
        from connectors_proxy.kube.client import CONNECTORS, SERVICES
        services = await mode.client.list(SERVICES, label_selector="app.kubernetes.io/managed-by=connectors-proxy")
        connectors = await mode.client.list(CONNECTORS)
        ready = sum(1 for c in connectors["items"]
                    if any(x.get("type") == "Ready" and x.get("status") == "True"
                           for x in (c.get("status") or {}).get("conditions", [])))
        results["check"] = {"services": len(services["items"]), "ready_connectors": ready}

    async def scenario() -> None:
        try:
            first = await run_once("cold start")
            await check(first)
            await first.stopService()
            second = await run_once("restart on converged cluster")
            await second.stopService()
        finally:
            reactor.stop()

    def timeout() -> None:
        print("timed out", flush=True)
        reactor.stop()

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(scenario()))
    killer = reactor.callLater(args.timeout, timeout)
    try:
        reactor.run()
    finally:
        if killer.active():
            killer.cancel()
        fake_rss = rss_mib(fake.pid) if fake.poll() is None else 0.0
        fake.terminate()
        fake.wait(10)
    print(f"proxy RSS before start: {rss_before:.0f} MiB; fake API server RSS: {fake_rss:.0f} MiB")
    for label in ("cold start", "restart on converged cluster"):
        r = results.get(label)
        if r is None:
            print(f"{label}: did not finish")
            continue
        print(f"{label}: synced in {r['synced_s']:.2f}s, converged in {r['converged_s']:.2f}s; "
              f"writes {r['writes']} (Service creates {r['creates']}, status {r['status_writes']}), "
              f"writes after settling {r['writes_after_settling']}, conflicts {r['conflicts']}, "
              f"failures {r['failures']}, API requests {r['requests']}; "
              f"RSS {r['rss_mib']:.0f} MiB (max {r['max_rss_mib']:.0f} MiB)")
    if "check" in results:
        c = results["check"]
        print(f"check: {c['services']}/{n} Services, {c['ready_connectors']}/{n} Connectors Ready")


if __name__ == "__main__":
    main()
