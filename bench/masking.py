"""
What masking reflected credentials costs (not a test: CI never runs it).

A 1 GiB JSON body (records of ids, words and numbers; no credential in it)
is downloaded with curl through the real C{twistd -n connectors-proxy}
(Basic credentials injected, so masking is on for textual bodies), from an
nginx origin that serves the same file twice: as C{application/json}
(masked: every chunk is searched for the secrets) and as
C{application/octet-stream} (binary: relayed as it is).  With
C{--baseline DIR}, a second proxy runs from another source tree (e.g. a copy
of the tree before masking existed), and its JSON download is the
"before" figure.  Rounds are interleaved so background load hits every
case alike; the table shows the best and the median MB/s of each, and the
proxy's CPU time per byte (user + system, median: what background load on
the machine distorts least).

    python bench/masking.py                         # 1 GiB x 3 rounds, this tree
    python bench/masking.py --baseline /tmp/before  # and a tree without masking
    python bench/masking.py --mib 256 --rounds 1    # quicker

Needs C{nginx} and C{curl}; files and logs go to
C{/tmp/connectors-proxy-bench/}.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

from run import (  # bench/run.py: the same process handling and proxy set-up
    CONNECTOR_HOST,
    ROOT,
    MiB,
    cpu_seconds,
    free_port,
    need,
    nginx_proc,
    proxy_manifests,
    proxy_proc,
)

ORIGIN = """\
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {www};
        if ($http_authorization != "{authorization}") {{ return 401; }}
        location / {{ types {{ application/json json; application/octet-stream bin; }} }}
    }}
"""

WRITE_OUT = "%{http_code} %{size_download} %{speed_download}"


def make_json(path: str, size: int) -> None:
    """C{size} bytes of a JSON array of records (kept between runs); no secret in it."""
    if os.path.exists(path) and os.path.getsize(path) == size:
        return
    rng = random.Random(1)
    words = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november "
             "oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()
    records = [json.dumps({"id": i, "uid": f"{rng.getrandbits(128):032x}",
                           "name": " ".join(rng.choice(words) for _ in range(4)),
                           "size": rng.randint(0, 10**9), "ready": rng.random() < 0.5,
                           "url": f"https://example.com/api/v1/items/{i}"}).encode() for i in range(4096)]
    block = b",".join(records)
    with open(path + ".part", "wb") as f:
        f.write(b"[")
        left = size - 2
        while left > 0:
            piece = (block + b",")[:left]
            f.write(piece)
            left -= len(piece)
        f.write(b"]")
    os.replace(path + ".part", path)


def check_masked(port: int, www: str, token: str, authorization: str, password: str) -> None:
    """Masking is on in the tree measured: a JSON body quoting the credentials comes back masked."""
    body = json.dumps({"headers": {"Authorization": authorization}, "password": password}).encode()
    with open(os.path.join(www, "canary.json"), "wb") as f:
        f.write(body)
    argv = ["curl", "-sS", "--max-time", "30", "-H", f"Host: {CONNECTOR_HOST}",
            "-H", f"Authorization: Bearer {token}", f"http://127.0.0.1:{port}/canary.json"]
    got = subprocess.run(argv, capture_output=True, timeout=60).stdout
    if len(got) != len(body) or password.encode() in got or authorization.encode() in got:
        raise RuntimeError(f"the proxy did not mask the canary: {got!r}")


def needles(src: str, username: str, password: str) -> str:
    """How many needles the tree measured searches each chunk for, with these credentials."""
    # The credentials through the environment, not on a command line.
    code = ("import os; from connectors_proxy.model.credentials import BasicCredentials as B; "
            "from connectors_proxy.upstream.reflection import secrets_for, _memmem; "
            "s = secrets_for(B(os.environ['BENCH_USER'], os.environ['BENCH_PASSWORD'])).streamed; "
            "print(len(s), 'of', [len(n) for n in s], 'bytes,', 'C memmem' if _memmem else 'bytes.find')")
    env = dict(os.environ, PYTHONPATH=src, BENCH_USER=username, BENCH_PASSWORD=password)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=src, env=env,
                            timeout=60)
    return result.stdout.strip() or result.stderr.strip()[-200:]


def download(port: int, path: str, token: str, size: int) -> float:
    """MB/s of one download (checked: status 200, every byte)."""
    argv = ["curl", "-sS", "-o", "/dev/null", "-w", WRITE_OUT, "--max-time", "600",
            "-H", f"Host: {CONNECTOR_HOST}", "-H", f"Authorization: Bearer {token}",
            f"http://127.0.0.1:{port}{path}"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=700)
    code, got, speed = result.stdout.split()
    if result.returncode != 0 or code != "200" or int(got) != size:
        raise RuntimeError(f"download of {path} failed: {result.returncode} {result.stdout} {result.stderr}")
    return float(speed) / 1e6


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=1024, help="body size (default 1024)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--proxy-src", default=ROOT, help="the tree measured (default: this checkout)")
    parser.add_argument("--baseline", default=None, metavar="DIR",
                        help="also run connectors-proxy from DIR (a tree without masking)")
    parser.add_argument("--workdir", default=os.path.join("/tmp", "connectors-proxy-bench"))
    args = parser.parse_args(argv)
    for program in ("nginx", "curl"):
        need(program)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)

    size = args.mib * MiB
    www = os.path.join(args.workdir, "www-masking")
    run_dir = os.path.join(args.workdir, "masking-" + time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(www, exist_ok=True)
    os.makedirs(run_dir, exist_ok=True)
    json_path = os.path.join(www, f"big-{args.mib}M.json")
    print(f"preparing {json_path} ...", flush=True)
    make_json(json_path, size)
    bin_path = json_path[:-len(".json")] + ".bin"
    if not os.path.exists(bin_path):
        os.link(json_path, bin_path)

    username, password = "bench-" + secrets.token_hex(4), secrets.token_hex(16)
    authorization = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
    token = secrets.token_hex(24)
    origin_port = free_port()
    prefix = os.path.join(run_dir, "origin")
    procs = [nginx_proc("origin", prefix, 1, ORIGIN.format(port=origin_port, www=www, authorization=authorization),
                        os.path.join(prefix, "tmp"))]
    trees = [("this tree", args.proxy_src)] + ([("baseline", args.baseline)] if args.baseline else [])
    ports: dict[str, int] = {}
    try:
        procs[0].start()
        procs[0].wait_port(origin_port)
        for name, src in trees:
            proc, port = proxy_proc(name.replace(" ", "-"), src, os.path.join(run_dir, name.replace(" ", "-")),
                                    proxy_manifests(origin_port, username, password), token, "proxy.log")
            procs.append(proc)
            proc.start()
            proc.wait_port(port)
            ports[name] = port
        check_masked(ports["this tree"], www, token, authorization, password)
        print(f"secrets searched in each streamed chunk: {needles(args.proxy_src, username, password)}", flush=True)
        cases = [("this tree", "json"), ("this tree", "bin")] + ([("baseline", "json")] if args.baseline else [])
        results: dict[tuple[str, str], list[float]] = {case: [] for case in cases}
        cpu: dict[tuple[str, str], list[float]] = {case: [] for case in cases}
        pids = {name: proc.pid for (name, _), proc in zip(trees, procs[1:], strict=True)}
        name_json, name_bin = os.path.basename(json_path), os.path.basename(bin_path)
        for case in cases:  # warm-up: the first requests open connections and fill caches
            download(ports[case[0]], "/" + (name_json if case[1] == "json" else name_bin), token, size)
        for round_ in range(args.rounds):
            # Each round in another order: what runs first or last has no advantage.
            for case in cases[round_ % len(cases):] + cases[:round_ % len(cases)]:
                path = "/" + (name_json if case[1] == "json" else name_bin)
                before = cpu_seconds(pids[case[0]])
                mbps = download(ports[case[0]], path, token, size)
                ns_per_byte = (cpu_seconds(pids[case[0]]) - before) * 1e9 / size
                results[case].append(mbps)
                cpu[case].append(ns_per_byte)
                print(f"round {round_ + 1}: {case[0]:10} {case[1]:5} {mbps:8.1f} MB/s {ns_per_byte:6.3f} CPU ns/B",
                      flush=True)
        print(f"\n{args.mib} MiB, {args.rounds} rounds (MB/s)")
        print(f"{'case':32} {'best':>8} {'median':>8} {'CPU ns/B':>9}")
        labels = {"json": "application/json (masked)", "bin": "application/octet-stream"}
        for case, values in results.items():
            label = labels[case[1]] if case[0] == "this tree" else "application/json (baseline tree)"
            print(f"{case[0] + ', ' + label:32.32} {max(values):8.1f} {statistics.median(values):8.1f} "
                  f"{statistics.median(cpu[case]):9.3f}")
        masked = statistics.median(results[("this tree", "json")])
        masked_cpu = statistics.median(cpu[("this tree", "json")])
        for other, label in ((("this tree", "bin"), "binary"), (("baseline", "json"), "baseline JSON")):
            if other in results:
                print(f"masked JSON / {label}: MB/s {masked / statistics.median(results[other]):.3f}, "
                      f"CPU per byte {masked_cpu / statistics.median(cpu[other]):.3f}")
    finally:
        for proc in reversed(procs):
            proc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
