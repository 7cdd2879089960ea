"""
connectors-proxy benchmark (not a test: CI never runs it).

Runs, side by side on this machine and interleaved so that background load
hits every target alike:

  direct          nginx serving the files itself (the client sends the Basic credentials)
  nginx-hop       an nginx proxy_pass hop injecting Authorization (keepalive upstream)
  twisted-rp      Twisted's ReverseProxyResource injecting Authorization (bench/reverse_proxy.py)
  twistd-web      `twistd -n web --path WWW`: twisted.web serving the same files itself (no
                  proxying, no credentials; its request log on, to a file); what twisted.web's
                  server side costs on its own (no uploads: it has no PUT)
  connectors-proxy  the real `twistd -n connectors-proxy` with generated --manifests/--tokens:
                  client token checked, routed by Host c-origin.bench.svc.cluster.local,
                  Basic secret injected, access log on (stdout to a file)

All the proxies reach the same origin nginx, which answers 401 unless the injected
Authorization is right, so every figure is for a correctly proxied request.

Load: wrk (1 KiB GETs, -t2 -c50), curl 1 GiB download and upload (PUT into
nginx's DAV module on /dev/shm: nginx reads every byte before answering),
curl --limit-rate 20M download (a slow client: memory must stay flat).
Peak RSS growth of each target's process(es) is sampled every 100 ms.
Each wrk round also says how many CPUs processes outside the bench used
meanwhile ("others"): on a machine shared with other test suites, the noise
in that round's figures.

    python bench/run.py            # full: 10 s wrk x 3 rounds, 1 GiB x 2 rounds, 300 MiB slow
    python bench/run.py --quick    # 3 s wrk x 1 round, 256 MiB, 64 MiB slow
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MiB = 1 << 20

NAMESPACE, CONNECTOR = "bench", "origin"
CONNECTOR_HOST = f"c-{CONNECTOR}.{NAMESPACE}.svc.cluster.local"


def need(program: str) -> str:
    path = shutil.which(program) or next(
        (p for p in (f"/usr/sbin/{program}", f"/usr/bin/{program}") if os.path.exists(p)), None)
    if path is None:
        sys.exit(f"bench: {program} is not installed (apt-get install -y {program})")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


# Processes ---------------------------------------------------------------

@dataclass
class Proc:
    name: str
    argv: list[str]
    log_path: str
    env: dict[str, str] | None = None
    cwd: str | None = None
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=self.env, cwd=self.cwd)
        log.close()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-3000:].decode("utf-8", "replace")
        except OSError:
            return ""

    def wait_port(self, port: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not port_open(port):
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not listen on {port}:\n{self.tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        p = self.process
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU time a process (or only its C{thread}) has used so far."""
    try:
        with open(f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree_cpu_seconds(root: int) -> float:
    """
    CPU time of C{root} and every process below it, including the children
    they have reaped (cutime, cstime): a process that ends meanwhile moves
    its time to its parent, so the sum only grows with the work done.
    """
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        pid = int(entry)
        parents[pid] = int(fields[1])
        times[pid] = sum(int(x) for x in fields[11:15]) / tick
    total = 0.0
    for pid, cpu in times.items():
        p = pid
        while p and p != root and p in parents:
            p = parents[p]
        if p == root:
            total += cpu
    return total


def _system_busy_seconds() -> float:
    """user + nice + system time of all CPUs (not irq/softirq: the kernel charges those to no process)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    return sum(int(x) for x in fields[:3]) / os.sysconf("SC_CLK_TCK")


class Background:
    """
    How much CPU the processes outside this bench (other engineers' test
    suites) used while a measurement ran, in CPUs: the noise of a shared
    machine, which the load average cannot tell apart from the bench's own
    processes.
    """

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.busy = _system_busy_seconds()
        self.ours = _tree_cpu_seconds(os.getpid())

    def cpus(self) -> float:
        elapsed = max(time.monotonic() - self.start, 1e-6)
        others = (_system_busy_seconds() - self.busy) - (_tree_cpu_seconds(os.getpid()) - self.ours)
        return max(others, 0.0) / elapsed


class RssSampler:
    """
    Sum of VmRSS of a target's processes, every 100 ms, in a thread; and the
    CPU time they used meanwhile (a per-request cost that background load
    on the machine distorts much less than req/s).
    """

    def __init__(self, pids: Callable[[], list[int]], interval: float = 0.1) -> None:
        self.pids = pids
        self.interval = interval
        self.cpu_start = sum(cpu_seconds(p) for p in pids())
        self.cpu = 0.0
        self.baseline = self._sample()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> int:
        return sum(rss_kib(p) for p in self.pids())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._sample())

    def stop(self) -> float:
        """Peak growth over the baseline, in MiB."""
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())
        self.cpu = sum(cpu_seconds(p) for p in self.pids()) - self.cpu_start
        return (self.peak - self.baseline) / 1024


# Configuration -----------------------------------------------------------

NGINX_COMMON = """\
worker_processes {workers};
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
{user}
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 10000000;
    keepalive_timeout 65;
    types {{ application/octet-stream bin; }}
    default_type application/octet-stream;
    client_body_temp_path {body_temp};
    proxy_temp_path {prefix}/proxy_temp;
    fastcgi_temp_path {prefix}/fastcgi_temp;
    uwsgi_temp_path {prefix}/uwsgi_temp;
    scgi_temp_path {prefix}/scgi_temp;
{server}
}}
"""

# The origin: files under {www}; PUT /upload/NAME lands in {shm}/upload/NAME
# (DAV reads the whole body into a temporary file on the same tmpfs, then
# renames it).  Anything without the right credentials is a 401, so a proxy
# that failed to inject them cannot score.
ORIGIN_SERVER = """\
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {www};
        if ($http_authorization != "{authorization}") {{ return 401; }}
        location / {{ }}
        location /upload/ {{
            root {shm};
            dav_methods PUT;
            create_full_put_path on;
            client_max_body_size 0;
            client_body_buffer_size 256k;
        }}
    }}
"""

HOP_SERVER = """\
    upstream origin {{
        server 127.0.0.1:{origin};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        client_max_body_size 0;
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "{authorization}";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            # Stream both ways, as the other proxies do: no spooling to disk.
            proxy_request_buffering off;
            proxy_max_temp_file_size 0;
        }}
    }}
"""


def nginx_config(prefix: str, workers: int, server: str, body_temp: str) -> str:
    user = "user root;" if os.geteuid() == 0 else ""
    return NGINX_COMMON.format(workers=workers, prefix=prefix, user=user, server=server, body_temp=body_temp)


def proxy_manifests(origin_port: int, username: str, password: str) -> str:
    return f"""\
apiVersion: connectors.alauda.io/v1alpha1
kind: ConnectorClass
metadata:
  name: bench-rest
  annotations:
    proxy.connectors.alauda.io/protocol: http
spec:
  auth:
    types:
    - {{name: basicAuth, secretType: kubernetes.io/basic-auth, optional: false}}
---
apiVersion: connectors.alauda.io/v1alpha1
kind: Connector
metadata: {{name: {CONNECTOR}, namespace: {NAMESPACE}}}
spec:
  connectorClassName: bench-rest
  address: http://127.0.0.1:{origin_port}
  auth:
    name: basicAuth
    secretRef: {{name: origin-basic}}
---
apiVersion: v1
kind: Secret
metadata: {{name: origin-basic, namespace: {NAMESPACE}}}
type: kubernetes.io/basic-auth
stringData: {{username: {username}, password: {password}}}
"""


def nginx_proc(name: str, prefix: str, workers: int, server: str, body_temp: str) -> Proc:
    """nginx serving C{server}, its configuration and logs under C{prefix} (not started)."""
    os.makedirs(prefix, exist_ok=True)
    conf = os.path.join(prefix, "nginx.conf")
    with open(conf, "w") as f:
        f.write(nginx_config(prefix, workers, server, body_temp))
    return Proc(name, ["nginx", "-p", prefix, "-c", conf, "-e", os.path.join(prefix, "error.log")],
                os.path.join(prefix, "stdout.log"))


def proxy_proc(name: str, src: str, folder: str, manifests: str, token: str, log: str,
               listen_options: str = "") -> tuple[Proc, int]:
    """
    The real C{twistd -n connectors-proxy} from the tree C{src}, with
    C{manifests} (text) and the client C{token}, its files in C{folder},
    its output in C{folder}/C{log}; the process (not started; its
    C{admin_port} set) and the port it serves on.
    """
    os.makedirs(folder, exist_ok=True)
    objects = os.path.join(folder, "objects.yaml")
    with open(objects, "w") as f:
        f.write(manifests)
    tokens = os.path.join(folder, "tokens.csv")
    with open(tokens, "w") as f:
        f.write(f'{token},system:serviceaccount:{NAMESPACE}:client,uid-1,"system:serviceaccounts"\n')
    port, admin = free_port(), free_port()
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    argv = [sys.executable, "-c", "import sys, connectors_proxy; print('connectors_proxy from', "
            "connectors_proxy.__path__[0], flush=True); from twisted.scripts.twistd import run; sys.exit(run())",
            "-n", "--pidfile=", "connectors-proxy",
            "--listen", f"tcp:{port}:interface=127.0.0.1{listen_options}",
            "--admin", f"tcp:{admin}:interface=127.0.0.1",
            "--manifests", objects, "--tokens", tokens]
    # "python -c" puts the working directory first on sys.path: it must be
    # the tree under test, or another checkout's modules would be used.
    proc = Proc(name, argv, os.path.join(folder, log), env=env, cwd=src)
    proc.admin_port = admin  # type: ignore[attr-defined]
    return proc, port


def twistd_web_proc(folder: str, www: str, port: int) -> Proc:
    """
    C{twistd -n web --path WWW} on C{port} (not started): twisted.web's own
    static file server, its request log on (to its log file, as twistd
    writes it), the ceiling of what a twisted.web server side can serve.
    """
    argv = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.exit(run())",
            "-n", "--pidfile=", "web", "--path", www, "--listen", f"tcp:{port}:interface=127.0.0.1:backlog=4096"]
    # The working directory is first on sys.path with "python -c": not a
    # source tree, so that no project's twisted/plugins is scanned.
    return Proc("twistd-web", argv, os.path.join(folder, "twistd-web.log"), cwd=folder)


def make_file(path: str, size: int) -> None:
    """A file of C{size} bytes of incompressible data (kept between runs)."""
    if os.path.exists(path) and os.path.getsize(path) == size:
        return
    block = os.urandom(MiB)
    with open(path + ".part", "wb") as f:
        left = size
        while left > 0:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n
    os.replace(path + ".part", path)


# What every bench script does alike (bench/paths.py, profile.py, rego.py, workloads.py import these) --------


def basic_credentials() -> tuple[str, str, str]:
    """Random canary upstream credentials: a user name, a password and their C{Basic} Authorization value."""
    username, password = "bench-" + secrets.token_hex(4), secrets.token_hex(16)
    return username, password, "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def write_small_file(www: str) -> None:
    """C{WWW/small.bin}: the 1 KiB of random bytes every wrk load GETs."""
    with open(os.path.join(www, "small.bin"), "wb") as f:
        f.write(os.urandom(1024))


def new_run_dir(workdir: str, kind: str) -> tuple[str, str]:
    """
    A run's new folder C{WORKDIR/KIND-DATE} and in it C{www} (created,
    holding L{write_small_file}'s file) for an origin nginx to serve.
    """
    run_dir = os.path.join(workdir, f"{kind}-" + time.strftime("%Y%m%d-%H%M%S"))
    www = os.path.join(run_dir, "www")
    os.makedirs(www)
    write_small_file(www)
    return run_dir, www


def origin_nginx(run_dir: str, server: str, **fields: str) -> tuple[Proc, int]:
    """
    One-worker nginx (not started) serving C{server} (a template, its
    C{port} filled in, and C{fields}) from C{RUN_DIR/origin}; and its port.
    """
    port = free_port()
    prefix = os.path.join(run_dir, "origin")
    return nginx_proc("origin", prefix, 1, server.format(port=port, **fields), os.path.join(prefix, "tmp")), port


def wrk_cpu(port: int, path: str, headers: Sequence[str], seconds: float, pids: Sequence[int], threads: int = 2,
            connections: int = 50) -> dict[str, Any]:
    """
    L{wrk_argv} on C{http://127.0.0.1:PORT/PATH}: L{parse_wrk}'s figures,
    with C{cpu_us} (the CPU time C{pids} used per request) and
    C{others_cpus} (L{Background}).
    """
    before, background = sum(cpu_seconds(p) for p in pids), Background()
    result = subprocess.run(wrk_argv(f"http://127.0.0.1:{port}{path}", headers, seconds, threads, connections),
                            capture_output=True, text=True, timeout=seconds + 60)
    cpu = sum(cpu_seconds(p) for p in pids) - before
    parsed = parse_wrk(result.stdout)
    parsed["cpu_us"] = cpu / max(parsed["requests"], 1) * 1e6
    parsed["others_cpus"] = background.cpus()
    return parsed


def source_trees(proxy_src: str, extra_proxy: Sequence[str]) -> list[tuple[str, str]]:
    """The (name, absolute folder) of each tree to run: C{--proxy-src}, then each C{--extra-proxy NAME=DIR}."""
    trees = [("connectors-proxy", os.path.abspath(proxy_src))]
    for spec in extra_proxy:
        name, _, src = spec.partition("=")
        trees.append((name, os.path.abspath(src)))
    return trees


def start_proxies(trees: Sequence[tuple[str, str]], run_dir: str, manifests: str, token: str,
                  procs: list[Proc]) -> list[tuple[str, Proc, int]]:
    """
    L{proxy_proc} of each (name, tree) of C{trees} (files in
    C{RUN_DIR/NAME}, output in its C{proxy.log}, a listen backlog of 4096),
    all started and added to C{procs} (for L{stop_all}), then each waited
    for and its first line (which tree's code it runs) printed; (name,
    process, port) of each.
    """
    proxies: list[tuple[str, Proc, int]] = []
    for name, src in trees:
        proc, port = proxy_proc(name, src, os.path.join(run_dir, name), manifests, token, "proxy.log",
                                listen_options=":backlog=4096")
        proc.start()
        procs.append(proc)
        proxies.append((name, proc, port))
    for name, proc, port in proxies:
        proc.wait_port(port, timeout=60)
        with open(proc.log_path) as log:
            print(f"{name}: {log.readline().strip()}", flush=True)
    return proxies


def stop_all(procs: Sequence[Proc]) -> None:
    """Stop C{procs}, the last started first, each even when stopping another failed."""
    for proc in reversed(procs):
        try:
            proc.stop()
        except Exception as e:  # keep stopping the others
            print(f"bench: stopping {proc.name}: {e}", file=sys.stderr)


def run_main(main: Callable[[], int]) -> None:
    """
    A bench script's entry point: exit with C{main()}'s status, or 130 on
    Ctrl-C (its C{finally} has stopped what it started).
    """
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.stderr.write("bench: interrupted; every process it started is stopped\n")
        sys.exit(130)


# Targets -----------------------------------------------------------------

@dataclass
class Target:
    name: str
    port: int
    headers: list[str]
    pids: Callable[[], list[int]]
    proc: Proc
    # Phases this target takes part in (None: all of them).
    phases: frozenset[str] | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def curl_headers(self) -> list[str]:
        out: list[str] = []
        for h in self.headers:
            out += ["-H", h]
        return out


@dataclass
class Results:
    """Every measurement, by phase, then target, then round."""

    wrk: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    download: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    upload: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    slow: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


# Load --------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(output: str) -> dict[str, Any]:
    out: dict[str, Any] = {"errors": 0, "non2xx": 0}
    m = re.search(r"Requests/sec:\s*([\d.]+)", output)
    if not m:
        raise RuntimeError(f"cannot parse wrk output:\n{output}")
    out["rps"] = float(m.group(1))
    for pct in ("50", "90", "99"):
        m = re.search(rf"^\s*{pct}%\s+(\S+)", output, re.M)
        out[f"p{pct}"] = _ms(m.group(1)) if m else float("nan")
    m = re.search(r"(\d+) requests in", output)
    out["requests"] = int(m.group(1)) if m else 0
    m = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", output)
    if m:
        out["non2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if m:
        out["errors"] = sum(int(g) for g in m.groups())
    return out


def wrk_argv(url: str, headers: Sequence[str], seconds: float, threads: int = 2, connections: int = 50) -> list[str]:
    """C{wrk} GETs of C{url} with C{headers} for C{seconds} (at least one), latencies kept."""
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", "--timeout", "10s"]
    for h in headers:
        argv += ["-H", h]
    return [*argv, url]


def run_wrk(target: Target, seconds: float, threads: int = 2, connections: int = 50) -> dict[str, Any]:
    argv = wrk_argv(target.url("/small.bin"), target.headers, seconds, threads, connections)
    sampler = RssSampler(target.pids)
    background = Background()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    growth = sampler.stop()
    others = background.cpus()
    if result.returncode != 0:
        raise RuntimeError(f"wrk failed on {target.name}: {result.stdout}{result.stderr}")
    parsed = parse_wrk(result.stdout)
    parsed["rss_growth_mib"] = growth
    parsed["rss_start_mib"] = sampler.baseline / 1024
    parsed["cpu_us_per_request"] = sampler.cpu / max(parsed["requests"], 1) * 1e6
    parsed["others_cpus"] = others
    return parsed


CURL_WRITE_OUT = "%{http_code} %{size_download} %{size_upload} %{speed_download} %{speed_upload} %{time_total}"


def run_curl(target: Target, args: Sequence[str], path: str, timeout: float) -> dict[str, Any]:
    argv = ["curl", "-sS", "-o", "/dev/null", "-w", CURL_WRITE_OUT, "--max-time", str(int(timeout)),
            *target.curl_headers(), *args, target.url(path)]
    sampler = RssSampler(target.pids)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30)
    growth = sampler.stop()
    fields = result.stdout.split()
    if result.returncode != 0 or len(fields) != 6:
        return {"ok": False, "error": f"curl exit {result.returncode}: {result.stderr.strip()} {result.stdout}",
                "rss_growth_mib": growth, "rss_start_mib": sampler.baseline / 1024}
    code, down, up, speed_down, speed_up, total = fields
    return {"ok": True, "code": int(code), "bytes_down": int(down), "bytes_up": int(up),
            "mbps_down": float(speed_down) / 1e6, "mbps_up": float(speed_up) / 1e6,
            "seconds": float(total), "rss_growth_mib": growth, "rss_start_mib": sampler.baseline / 1024,
            # How busy the target was: near 100% per process means CPU-bound.
            "cpu_percent": 100 * sampler.cpu / max(float(total), 1e-6)}


def check_request(target: Target, headers: Sequence[str] | None = None, path: str = "/small.bin") -> tuple[int, int]:
    argv = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download}", "--max-time", "10"]
    for h in (target.headers if headers is None else headers):
        argv += ["-H", h]
    result = subprocess.run([*argv, target.url(path)], capture_output=True, text=True, timeout=30)
    code, size = result.stdout.split()
    return int(code), int(size)


# The run -----------------------------------------------------------------

def fmt(value: float, width: int = 9, digits: int = 1) -> str:
    if value != value:  # NaN
        return "-".rjust(width)
    return f"{value:{width}.{digits}f}"


def version(argv: Sequence[str]) -> str:
    try:
        r = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
    except OSError:
        return "?"
    return (r.stdout + r.stderr).strip().splitlines()[0] if (r.stdout + r.stderr).strip() else "?"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter runs and 256 MiB bodies")
    parser.add_argument("--rounds", type=int, default=None, help="wrk rounds per target (full 3, quick 1)")
    parser.add_argument("--transfer-rounds", type=int, default=None,
                        help="1 GiB download/upload rounds per target (full 2, quick 1)")
    parser.add_argument("--seconds", type=float, default=None, help="wrk duration (full 10, quick 3)")
    parser.add_argument("--big-mib", type=int, default=None, help="download/upload size (full 1024, quick 256)")
    parser.add_argument("--slow-mib", type=int, default=None, help="slow-client download size (full 300, quick 64)")
    parser.add_argument("--only", default="", help="comma-separated phases: wrk,download,upload,slow")
    parser.add_argument("--targets", default="", help="comma-separated target names (default: all)")
    parser.add_argument("--proxy-src", default=ROOT,
                        help="source tree whose connectors-proxy runs (default: this checkout)")
    parser.add_argument("--extra-proxy", action="append", default=[], metavar="NAME=DIR",
                        help="also run connectors-proxy from DIR as target NAME (to measure a change)")
    parser.add_argument("--workdir", default=os.path.join("/tmp", "connectors-proxy-bench"),
                        help="data files (kept between runs) and logs")
    parser.add_argument("--json", default=None, help="also write the results as JSON to this file")
    args = parser.parse_args(argv)

    quick = args.quick
    rounds = args.rounds or (1 if quick else 3)
    transfer_rounds = args.transfer_rounds or (1 if quick else 2)
    seconds = args.seconds or (3 if quick else 10)
    warmup = 1 if quick else 2
    big = (args.big_mib or (256 if quick else 1024)) * MiB
    slow = (args.slow_mib or (64 if quick else 300)) * MiB
    phases = set(filter(None, args.only.split(","))) or {"wrk", "download", "upload", "slow"}

    for program in ("nginx", "wrk", "curl"):
        need(program)

    # Everything dies with us: on Ctrl-C, SIGTERM, or an exception.  (SIGINT
    # is set explicitly: a shell starting us in the background ignores it.)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)

    work = args.workdir
    run_dir = os.path.join(work, "run-" + time.strftime("%Y%m%d-%H%M%S"))
    www = os.path.join(work, "www")
    shm = f"/dev/shm/connectors-proxy-bench-{os.getpid()}"
    for d in (run_dir, www, os.path.join(shm, "upload"), os.path.join(shm, "tmp-origin"), os.path.join(shm, "tmp-hop")):
        os.makedirs(d, exist_ok=True)

    print(f"preparing data files in {www} ...", flush=True)
    write_small_file(www)
    big_path = os.path.join(www, f"big-{big // MiB}M.bin")
    make_file(big_path, big)
    big_name = os.path.basename(big_path)
    slow_path = os.path.join(www, f"slow-{slow // MiB}M.bin")
    make_file(slow_path, slow)
    slow_name = os.path.basename(slow_path)

    # Random canaries: the upstream's credentials and the client's token.
    username, password, upstream_auth = basic_credentials()
    client_token = secrets.token_hex(24)
    client_auth = f"Authorization: Bearer {client_token}"

    origin_port, hop_port, rp_port, web_port = free_port(), free_port(), free_port(), free_port()
    procs: list[Proc] = []
    targets: list[Target] = []

    def nginx(name: str, workers: int, server: str) -> Proc:
        return nginx_proc(name, os.path.join(run_dir, name), workers, server, os.path.join(shm, f"tmp-{name}"))

    def cp_proc(name: str, src: str) -> tuple[Proc, int]:
        return proxy_proc(name, src, os.path.join(run_dir, name), proxy_manifests(origin_port, username, password),
                          client_token, "access.log", listen_options=":backlog=4096")

    try:
        origin = nginx("origin", 2, ORIGIN_SERVER.format(port=origin_port, www=www, shm=shm,
                                                         authorization=upstream_auth))
        hop = nginx("hop", 1, HOP_SERVER.format(port=hop_port, origin=origin_port, authorization=upstream_auth))
        rp = Proc("twisted-rp", [sys.executable, os.path.join(HERE, "reverse_proxy.py"), "--port", str(rp_port),
                                 "--upstream", f"127.0.0.1:{origin_port}",
                                 "--access-log", os.path.join(run_dir, "twisted-rp-access.log")],
                  os.path.join(run_dir, "twisted-rp.log"), env=dict(os.environ, BENCH_AUTHORIZATION=upstream_auth))
        web = twistd_web_proc(run_dir, www, web_port)
        proxies = [cp_proc(name, src) for name, src in source_trees(args.proxy_src, args.extra_proxy)]

        for p in (origin, hop, rp, web, *(p for p, _ in proxies)):
            p.start()
            procs.append(p)
        origin.wait_port(origin_port)
        hop.wait_port(hop_port)
        rp.wait_port(rp_port)
        web.wait_port(web_port)
        for p, port in proxies:
            p.wait_port(port, timeout=60)
            with open(p.log_path) as log:
                print(f"{p.name}: {log.readline().strip()}")

        cp_headers = [client_auth, f"Host: {CONNECTOR_HOST}"]
        targets = [
            Target("direct", origin_port, [f"Authorization: {upstream_auth}"], lambda: children(origin.pid), origin),
            Target("nginx-hop", hop_port, [client_auth], lambda: children(hop.pid), hop),
            Target("twisted-rp", rp_port, [client_auth], lambda: [rp.pid], rp),
            Target("twistd-web", web_port, [], lambda: [web.pid], web, frozenset({"wrk", "download", "slow"})),
        ]
        for p, port in proxies:
            targets.append(Target(p.name, port, cp_headers, (lambda pid: lambda: [pid])(p.pid), p))
        if args.targets:
            wanted = set(args.targets.split(","))
            targets = [t for t in targets if t.name in wanted]

        # Sanity: the origin refuses missing credentials; every target gets a
        # 200 with them; connectors-proxy refuses a missing or unknown token.
        bare = Target("origin-bare", origin_port, [], lambda: [], origin)
        assert check_request(bare)[0] == 401, "the origin must refuse requests without credentials"
        for t in targets:
            code, size = check_request(t)
            if (code, size) != (200, 1024):
                raise RuntimeError(f"{t.name}: GET /small.bin gave {code} with {size} bytes\n{t.proc.tail()}")
        for p, port in proxies:
            t = Target(p.name, port, [f"Host: {CONNECTOR_HOST}"], lambda: [], p)
            assert check_request(t)[0] == 401, f"{p.name} must refuse a request without a token"
            assert check_request(t, [f"Host: {CONNECTOR_HOST}", "Authorization: Bearer nope"])[0] == 401
            with urllib.request.urlopen(f"http://127.0.0.1:{p.admin_port}/readyz", timeout=5) as r:  # type: ignore[attr-defined]
                assert r.status == 200

        results = Results()
        print_header(args, quick, rounds, seconds, big, slow, targets)

        if "wrk" in phases:
            print(f"\n== wrk -t2 -c50 -d{seconds:g}s GET /small.bin (1 KiB), {rounds} round(s), interleaved",
                  flush=True)
            for t in targets:
                run_wrk(t, warmup)
            for r in range(rounds):
                for t in targets:
                    res = run_wrk(t, seconds)
                    results.wrk.setdefault(t.name, []).append(res)
                    bad = f"  NON-2xx {res['non2xx']} ERRORS {res['errors']}" if res["non2xx"] or res["errors"] else ""
                    print(f"  round {r + 1} {t.name:<18} {res['rps']:8.0f} req/s  p50 {res['p50']:6.2f} ms"
                          f"  p99 {res['p99']:7.2f} ms  cpu {res['cpu_us_per_request']:5.0f} us/req"
                          f"  rss {res['rss_start_mib']:.1f} +{res['rss_growth_mib']:.1f} MiB"
                          f"  others {res['others_cpus']:.2f} cpus{bad}", flush=True)

        if "download" in phases:
            print(f"\n== curl GET {big // MiB} MiB, {transfer_rounds} round(s)", flush=True)
            for r in range(transfer_rounds):
                for t in targets:
                    res = run_curl(t, [], "/" + big_name, timeout=600)
                    if res["ok"] and (res["code"] != 200 or res["bytes_down"] != big):
                        res["ok"], res["error"] = False, f"HTTP {res['code']}, {res['bytes_down']} bytes"
                    results.download.setdefault(t.name, []).append(res)
                    print_transfer(r, t.name, res, "mbps_down")

        if "upload" in phases:
            print(f"\n== curl PUT {big // MiB} MiB (nginx DAV reads it all into tmpfs), {transfer_rounds} round(s)",
                  flush=True)
            for r in range(transfer_rounds):
                for t in targets:
                    if t.phases is not None and "upload" not in t.phases:
                        continue
                    dest = os.path.join(shm, "upload", f"{t.name}.bin")
                    res = run_curl(t, ["-T", big_path], f"/upload/{t.name}.bin", timeout=600)
                    landed = os.path.getsize(dest) if os.path.exists(dest) else 0
                    if res["ok"] and (res["code"] not in (201, 204) or landed != big):
                        res["ok"], res["error"] = False, f"HTTP {res['code']}, {landed} bytes reached the origin"
                    if os.path.exists(dest):
                        os.unlink(dest)
                    results.upload.setdefault(t.name, []).append(res)
                    print_transfer(r, t.name, res, "mbps_up")

        if "slow" in phases:
            print(f"\n== slow client: curl --limit-rate 20M GET {slow // MiB} MiB", flush=True)
            for t in targets:
                res = run_curl(t, ["--limit-rate", "20M"], "/" + slow_name, timeout=600)
                if res["ok"] and (res["code"] != 200 or res["bytes_down"] != slow):
                    res["ok"], res["error"] = False, f"HTTP {res['code']}, {res['bytes_down']} bytes"
                results.slow.setdefault(t.name, []).append(res)
                print_transfer(0, t.name, res, "mbps_down")

        for p, _ in proxies:
            with open(p.log_path, "rb") as access:
                lines = sum(1 for line in access if f"{NAMESPACE}/{CONNECTOR}".encode() in line)
            print(f"\n{p.name}: {lines} access-log lines in {p.log_path}")
        summary(results, targets, [p.name for p, _ in proxies])
        if args.json:
            with open(args.json, "w") as out:
                json.dump({"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "argv": sys.argv,
                           "quick": quick, "results": results.__dict__}, out, indent=2)
        print(f"\nload average now: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; logs in {run_dir}")
        return 0
    finally:
        stop_all(procs)
        shutil.rmtree(shm, ignore_errors=True)


def print_header(args: Any, quick: bool, rounds: int, seconds: float, big: int, slow: int,
                 targets: list[Target]) -> None:
    git = version(["git", "-C", args.proxy_src, "rev-parse", "--short", "HEAD"])
    print(f"\nconnectors-proxy bench {time.strftime('%Y-%m-%d %H:%M:%S %z')}  mode={'quick' if quick else 'full'}"
          f"  src={args.proxy_src} ({git})")
    print(f"  {platform.node()} {os.cpu_count()} cpus, load {' '.join(f'{x:.2f}' for x in os.getloadavg())};"
          f" python {platform.python_version()}; {version(['nginx', '-v'])}; {version(['curl', '--version'])[:40]}")
    print("  targets: " + ", ".join(f"{t.name}=127.0.0.1:{t.port}" for t in targets))


def print_transfer(round_: int, name: str, res: dict[str, Any], key: str) -> None:
    rss = f"rss {res['rss_start_mib']:.1f} +{res['rss_growth_mib']:.1f} MiB"
    if not res["ok"]:
        print(f"  round {round_ + 1} {name:<18} FAILED: {res['error']}  {rss}", flush=True)
        return
    print(f"  round {round_ + 1} {name:<18} {res[key]:8.1f} MB/s  {res['seconds']:6.1f} s"
          f"  cpu {res['cpu_percent']:3.0f}%  {rss}", flush=True)


NAN = float("nan")


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else NAN


def summary(results: Results, targets: list[Target], proxies: list[str]) -> None:
    def wrk(name: str, key: str) -> float:
        return _median([r[key] for r in results.wrk.get(name, [])])

    def best(table: dict[str, list[dict[str, Any]]], name: str, key: str) -> float:
        return max((r[key] for r in table.get(name, []) if r["ok"]), default=NAN)

    def growth(table: dict[str, list[dict[str, Any]]], name: str) -> float:
        return max((r["rss_growth_mib"] for r in table.get(name, [])), default=NAN)

    print("\n== summary: wrk figures are medians over rounds; MB/s (10^6 bytes/s) the best round;"
          " rss = peak VmRSS growth during a phase (MiB)")
    print(f"  {'target':<18}{'req/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'cpu us/req':>11}{'down MB/s':>10}{'up MB/s':>9}"
          f"{'rss wrk':>8}{'rss down':>9}{'rss up':>8}{'rss slow':>9}")
    for t in targets:
        print(f"  {t.name:<18}{fmt(wrk(t.name, 'rps'), 8, 0)}{fmt(wrk(t.name, 'p50'), 8, 2)}"
              f"{fmt(wrk(t.name, 'p99'), 8, 2)}{fmt(wrk(t.name, 'cpu_us_per_request'), 11, 0)}"
              f"{fmt(best(results.download, t.name, 'mbps_down'), 10)}{fmt(best(results.upload, t.name, 'mbps_up'), 9)}"
              f"{fmt(growth(results.wrk, t.name), 8)}{fmt(growth(results.download, t.name), 9)}"
              f"{fmt(growth(results.upload, t.name), 8)}{fmt(growth(results.slow, t.name), 9)}")

    print("\n== targets of issue 15 (req/s: median of the per-round ratios, each round's targets ran back to back)")

    def per_round(name: str, base: str) -> list[float]:
        return [c["rps"] / b["rps"] for c, b in
                zip(results.wrk.get(name, []), results.wrk.get(base, []), strict=False)]

    def verdict(ok: bool) -> str:
        return "met" if ok else "missed"

    for name in proxies:
        for base, target in (("twisted-rp", 2.5), ("twistd-web", 1.2)):
            ratios = per_round(name, base)
            if ratios:
                ratio = _median(ratios)
                print(f"  {name} / {base} req/s: {ratio:.2f}x ({wrk(name, 'rps'):.0f} vs {wrk(base, 'rps'):.0f})"
                      f"  target >= {target}x: {verdict(ratio >= target)}"
                      f"  (rounds: {', '.join(f'{x:.2f}' for x in ratios)})")
        p99, rp_p99 = wrk(name, "p99"), wrk("twisted-rp", "p99")
        if p99 == p99 and rp_p99 == rp_p99:
            print(f"  {name} p99 {p99:.2f} ms vs twisted-rp {rp_p99:.2f} ms: {p99 / rp_p99:.2f}x"
                  f"  target <= 0.5x: {verdict(p99 <= rp_p99 / 2)}")
        for base in ("twisted-rp", "twistd-web"):
            cpu, base_cpu = wrk(name, "cpu_us_per_request"), wrk(base, "cpu_us_per_request")
            if cpu == cpu and base_cpu == base_cpu:
                print(f"  {name} CPU per request {cpu:.0f} us vs {base} {base_cpu:.0f} us: {base_cpu / cpu:.2f}x"
                      f"  (above 1: {name} is cheaper)")
        down, hop_down = best(results.download, name, "mbps_down"), best(results.download, "nginx-hop", "mbps_down")
        if down == down and hop_down == hop_down:
            print(f"  {name} / nginx-hop download MB/s: {down / hop_down:.2f}x ({down:.0f} vs {hop_down:.0f})"
                  f"  target >= 0.85x: {verdict(down / hop_down >= 0.85)}")
        direct_down = best(results.download, "direct", "mbps_down")
        if down == down and direct_down == direct_down:
            print(f"  {name} / direct download MB/s: {down / direct_down:.0%}")
        up = best(results.upload, name, "mbps_up") / best(results.upload, "direct", "mbps_up")
        if up == up:
            print(f"  {name} / direct upload MB/s: {up:.0%}")
        hop = wrk("nginx-hop", "rps")
        if results.wrk.get(name) and hop == hop:
            print(f"  {name} / nginx-hop req/s: {wrk(name, 'rps') / hop:.2f}x")
        growths = [(phase, growth(table, name)) for phase, table in
                   (("download", results.download), ("upload", results.upload), ("slow client", results.slow))]
        growths = [(phase, g) for phase, g in growths if g == g]
        if growths:
            worst = max(g for _, g in growths)
            print(f"  {name} peak RSS growth: {', '.join(f'{phase} {g:.1f} MiB' for phase, g in growths)}"
                  f"  target < 32 MiB: {verdict(worst < 32)}")

    # Several trees side by side (--extra-proxy): each against the first.
    for name in proxies[1:]:
        ratios = per_round(name, proxies[0])
        if ratios:
            cpu = wrk(proxies[0], "cpu_us_per_request") / wrk(name, "cpu_us_per_request")
            print(f"  {name} / {proxies[0]} req/s: {_median(ratios):.2f}x"
                  f"  (rounds: {', '.join(f'{x:.2f}' for x in ratios)}); CPU per request {cpu:.2f}x cheaper")

if __name__ == "__main__":
    run_main(main)
