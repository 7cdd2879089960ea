"""
Where connectors-proxy spends its CPU per request (not a test: CI never runs it).

Runs the same setup as bench/run.py's C{connectors-proxy} target (an origin
nginx checking the injected Basic credentials, the real C{twistd -n
connectors-proxy} with a client token, routing by host, access log on),
loads it with C{wrk -t2 -c50} GETs of a 1 KiB file and records the proxy
process with py-spy for C{--seconds}.  Then prints:

  - CPU microseconds per request (process CPU time over the recording
    window / requests the access log counted in it);
  - self and inclusive CPU shares and microseconds per request by area:
    the twisted.web client (Agent, _newclient), the twisted.web server,
    connectors_proxy's own code, logging, the reactor and epoll, syscalls,
    Deferreds/coroutines, Headers, everything else;
  - the top functions by self share and by inclusive share.

Each C{--extra-proxy NAME=DIR} is profiled in turn under the same load,
and the area table then has one column per tree (before/after).

py-spy (PyPI C{py-spy}, a static binary): it is looked up on PATH, then in
C{WORKDIR/tools/bin}.  To install it there, once:

    python3 -m venv /tmp/connectors-proxy-bench/tools
    /tmp/connectors-proxy-bench/tools/bin/pip install py-spy==0.4.3

(or C{pip install --user py-spy==0.4.3}).  py-spy attaches with ptrace; where
it cannot (no py-spy, C{kernel.yama.ptrace_scope}, a container without
C{CAP_SYS_PTRACE}), the proxy is run under C{twistd --profile=FILE
--profiler=cprofile} instead, which the output says: cProfile's own
overhead (a hook on every call) inflates the many small calls, so its shares
are only roughly comparable to py-spy's.

py-spy's sampling (C{--mode}): C{blocking} (the default, py-spy's own)
stops the proxy for a moment at each sample and reads a consistent Python
stack (the request rate while recording is about 5% lower); a syscall is
recognised by the source line of the Python function that makes it
(C{self.socket.recv(...)}, C{untilConcludes(self.socket.send, ...)}, the epoll
reactor's C{register}/C{modify}/C{unregister}/C{poll}, a log file's
C{write}).  C{native} unwinds C frames too (libc's send, recv, epoll_ctl by
name; interpreter work charged to the Python function that called it): the
same shares within a point or two, but the request rate halves while
recording.  C{nonblocking} does not stop the proxy, but on a busy reactor
about half its reads of the stack fail (py-spy's "Errors"), and the samples
left are skewed (syscalls 3% instead of 11%): it is there for comparison.
Only the reactor's thread is tabled; samples of other threads are counted
apart.

    python bench/profile.py                                # this tree, 20 s
    python bench/profile.py --proxy-src /tmp/before --extra-proxy after=.
    python bench/profile.py --seconds 8 --profiler cprofile
"""

from __future__ import annotations

import argparse
import linecache
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

# bench/run.py: the same processes and configuration.
from run import (
    CONNECTOR,
    CONNECTOR_HOST,
    NAMESPACE,
    ORIGIN_SERVER,
    ROOT,
    Background,
    Proc,
    basic_credentials,
    cpu_seconds,
    need,
    new_run_dir,
    origin_nginx,
    parse_wrk,
    proxy_manifests,
    proxy_proc,
    run_main,
    source_trees,
    wrk_argv,
)

# Areas, in the order they are printed.
CLIENT = "twisted.web client (Agent, _newclient, pool)"
SERVER = "twisted.web server (http, server, resource)"
PROXY = "connectors_proxy (routing, identity, relay...)"
OWN_CLIENT = "own upstream client (upstream.client, framing)"
LOGGING = "logging (twisted.logger, access log)"
REACTOR = "reactor/epoll (loop, tcp, context, epoll_*)"
SYSCALLS = "syscalls (send, recv, other I/O)"
DEFERREDS = "Deferreds and coroutines"
HEADERS = "twisted.web Headers"
OTHER_TWISTED = "other Twisted"
OTHER = "other (stdlib, attrs, interpreter)"
AREAS = (CLIENT, OWN_CLIENT, SERVER, PROXY, LOGGING, REACTOR, SYSCALLS, DEFERREDS, HEADERS, OTHER_TWISTED, OTHER)

# Module (dotted, from the file path) prefixes -> area; the longest match wins.
MODULE_AREAS = {
    "twisted.web.client": CLIENT,
    "twisted.web._newclient": CLIENT,
    "twisted.web.iweb": CLIENT,
    "twisted.web.http": SERVER,
    "twisted.web.server": SERVER,
    "twisted.web.resource": SERVER,
    "twisted.web.http_headers": HEADERS,
    "twisted.web": OTHER_TWISTED,
    "twisted.logger": LOGGING,
    "twisted.python.log": LOGGING,
    "connectors_proxy.server.accesslog": LOGGING,
    "connectors_proxy.ops.logformat": LOGGING,
    "connectors_proxy": PROXY,
    # The client that replaces Agent (issue 15), apart from the rest.
    "connectors_proxy.upstream.client": OWN_CLIENT,
    "connectors_proxy.upstream.framing": OWN_CLIENT,
    "twisted.internet.defer": DEFERREDS,
    "twisted.internet._resolver": OTHER_TWISTED,
    "twisted.internet": REACTOR,
    "twisted.python.context": REACTOR,
    "twisted.python.failure": DEFERREDS,
    "twisted": OTHER_TWISTED,
    "asyncio": DEFERREDS,
}

# libc/native functions that are system calls (py-spy --native leaf frames).
EPOLL_CALLS = {"epoll_ctl", "epoll_wait", "epoll_pwait"}
IO_CALLS = {"send", "sendto", "sendmsg", "recv", "recvfrom", "recvmsg", "read", "write", "writev", "readv",
            "__send", "__recv", "__libc_send", "__libc_recv", "__libc_write", "__libc_read",
            "getsockname", "getpeername", "setsockopt", "getsockopt", "accept", "accept4", "close", "__close",
            "shutdown", "connect", "socket", "fstat", "lseek", "clock_gettime", "__clock_gettime",
            "gettimeofday", "__poll", "poll", "fsync", "fdatasync", "openat", "__open64", "__libc_open64"}
# Without native frames: a Python frame whose current line calls a socket's
# method (followed by "(", or by "," when passed on:
# untilConcludes(self.socket.send, data)); not a generator's send().
SOCKET_LINE = re.compile(r"sock\w*\.(send|sendall|sendmsg|recv|recv_into|recvfrom|getsockname|getpeername|"
                         r"setsockopt|accept|close|shutdown)\s*[(,]|\bos\.(write|read|writev)\s*[(,]")
# ... or a file's write/flush, in the modules that write log files (a
# write to a buffer elsewhere is no syscall).
FILE_LINE = re.compile(r"\.(write|flush|writelines)\s*\(")
FILE_MODULES = {"twisted.logger._file", "twisted.python.log", "twisted.python.logfile", "connectors_proxy.ops.logformat"}
# ... and in the epoll reactor, the epoll object's methods.
EPOLL_LINE = re.compile(r"\.(poll|register|modify|unregister)\(")
EPOLL_MODULE = "twisted.internet.epollreactor"
# Frames that only pass a call on (the syscall is on their caller's line).
PASS_ON = {"twisted.python.util.untilConcludes"}


@dataclass(frozen=True)
class Frame:
    function: str
    module: str  # dotted module, or a library name for native frames
    line: int
    native: bool
    path: str = ""

    @property
    def key(self) -> str:
        return f"{self.module}.{self.function}" if not self.native else f"{self.function} [{self.module}]"


def module_of(path: str) -> str:
    """C{.../site-packages/twisted/web/http.py} -> C{twisted.web.http}."""
    parts = path.replace("\\", "/").split("/")
    for anchor in ("twisted", "connectors_proxy", "attr", "attrs", "zope", "yaml", "hyperlink",
                   "constantly", "incremental", "automat", "prometheus_client"):
        if anchor in parts:
            i = len(parts) - 1 - parts[::-1].index(anchor)
            # The last "twisted" in twisted/plugins/x.py is the package.
            rest = parts[i:]
            return ".".join(rest)[:-3] if rest[-1].endswith(".py") else ".".join(rest)
    base = parts[-1]
    return base[:-3] if base.endswith(".py") else base


def area_of_module(module: str) -> str:
    best, area = -1, OTHER
    for prefix, a in MODULE_AREAS.items():
        if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
            best, area = len(prefix), a
    return area


_FRAME = re.compile(r"^(?P<func>.*) \((?P<where>[^()]*)\)$")


def parse_frame(text: str) -> Frame:
    m = _FRAME.match(text)
    if not m:
        return Frame(text, "?", 0, True)
    func, where = m.group("func"), m.group("where")
    path, sep, line = where.rpartition(":")
    if sep and line.isdigit() and (path.endswith(".py") or path.startswith("<")):
        return Frame(func, module_of(path), int(line), False, path)
    # Native: "symbol (libfoo.so.6)" or "0x7f... (libc.so.6)".
    return Frame(func, os.path.basename(where), 0, True, where)


def syscall_name(frame: Frame) -> str | None:
    """The system call a native frame is, if it is one."""
    if not frame.native:
        return None
    name = frame.function.split("@")[0].lstrip("_") if frame.function.startswith("__") else frame.function
    if frame.function in EPOLL_CALLS or frame.function in IO_CALLS or name in EPOLL_CALLS or name in IO_CALLS:
        return name.replace("libc_", "")
    return None


def line_syscall(frame: Frame) -> str | None:
    """Without native frames: the call on this Python frame's line, if it is a syscall wrapper."""
    if frame.native or not frame.path:
        return None
    text = linecache.getline(frame.path, frame.line)
    if frame.module == EPOLL_MODULE:
        m = EPOLL_LINE.search(text)
        if m:
            return "epoll " + m.group(1)
    m = SOCKET_LINE.search(text)
    if m:
        return m.group(1) or m.group(2)
    if frame.module in FILE_MODULES:
        m = FILE_LINE.search(text)
        if m:
            return "file " + m.group(1)
    return None


@dataclass
class Profile:
    """Samples, charged by area and function."""

    samples: int = 0
    self_area: Counter[str] = field(default_factory=Counter)
    incl_area: Counter[str] = field(default_factory=Counter)
    self_fn: Counter[str] = field(default_factory=Counter)
    incl_fn: Counter[str] = field(default_factory=Counter)
    fn_area: dict[str, str] = field(default_factory=dict)
    note: str = ""
    # Samples of threads other than the reactor's, by thread name.
    other_threads: Counter[str] = field(default_factory=Counter)
    py_spy: str = ""  # what py-spy said of its run
    # Samples without a Python frame (py-spy --nonblocking read the stack
    # while it changed): left out of the shares.
    torn: int = 0

    def add(self, stack: Sequence[Frame], count: int) -> None:
        """C{stack}: root first, leaf last."""
        self.samples += count
        owner_key, owner_area = self._owner(stack)
        self.self_area[owner_area] += count
        self.self_fn[owner_key] += count
        self.fn_area.setdefault(owner_key, owner_area)
        keys, areas = {owner_key}, {owner_area}
        for f in stack:
            if f.native:
                continue
            keys.add(f.key)
            area = area_of_module(f.module)
            areas.add(area)
            self.fn_area.setdefault(f.key, area)
        for k in keys:
            self.incl_fn[k] += count
        for a in areas:
            self.incl_area[a] += count

    def _owner(self, stack: Sequence[Frame]) -> tuple[str, str]:
        # The leaf, unless it is the interpreter's own native code: then the
        # nearest Python frame above it (as a sampler without --native sees
        # it).  A syscall is charged to itself.
        python = [f for f in stack if not f.native]
        for f in reversed(stack):
            call = syscall_name(f)
            if call is not None:
                if call in EPOLL_CALLS:
                    return f"syscall {call}", REACTOR
                return f"syscall {call}", SYSCALLS
            if f.native:
                continue
            caller = f
            call = line_syscall(f)
            if call is None and f.key in PASS_ON and python.index(f) > 0:
                caller = python[python.index(f) - 1]
                call = line_syscall(caller)
            if call is not None:
                return f"syscall {call} in {caller.key}", REACTOR if call.startswith("epoll") else SYSCALLS
            return f.key, area_of_module(f.module)
        return "(native only)", OTHER


_THREAD = re.compile(r"^thread \((\d+)\)(?:: (.*))?$")


def read_raw(path: str, main_tid: int) -> Profile:
    """
    py-spy's C{--format raw --threads}: C{thread (TID): NAME;frame;... COUNT}
    per line, root first.  The tables are of the reactor's thread
    (C{main_tid}); the others are only counted.
    """
    profile = Profile()
    with open(path) as f:
        for line in f:
            stack_text, _, count = line.rstrip("\n").rpartition(" ")
            if not stack_text or not count.isdigit():
                continue
            frames = stack_text.split(";")
            m = _THREAD.match(frames[0])
            if m:
                frames = frames[1:]
                if int(m.group(1)) != main_tid:
                    profile.other_threads[m.group(2) or m.group(1)] += int(count)
                    continue
            stack = [parse_frame(t) for t in frames if t]
            if all(f.native for f in stack) and not any(syscall_name(f) for f in stack):
                profile.torn += int(count)
                continue
            profile.add(stack, int(count))
    return profile


def read_pstats(path: str) -> Profile:
    """A cProfile dump: tottime as self, cumtime as inclusive (in microseconds, as 'samples')."""
    import pstats

    stats = pstats.Stats(path)
    profile = Profile(note="cProfile")
    raw = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for (_, _, tt, _, _) in raw.values())
    profile.samples = int(total * 1e6)
    for (filename, _line, name), (_, _, tt, ct, _) in raw.items():
        if filename == "~":  # a built-in: "<method 'send' of '_socket.socket' objects>"
            m = (re.search(r"<(?:built-in )?method '?(\w+)'? of '?([\w.]+)", name)
                 or re.search(r"<built-in function (\w+)>", name))
            call = m.group(1) if m else name
            owner = m.group(2) if m and m.lastindex and m.lastindex > 1 else "builtins"
            key = f"{owner}.{call}"
            if call in EPOLL_CALLS or (owner.startswith("select.epoll") and call in ("poll", "register", "modify",
                                                                                      "unregister")):
                area = REACTOR
                key = f"syscall epoll.{call}"
            elif owner.startswith("_socket.socket") or call in IO_CALLS:
                area = SYSCALLS
                key = f"syscall {key}"
            else:
                area = OTHER
        else:
            module = module_of(filename)
            key, area = f"{module}.{name}", area_of_module(module)
        profile.self_area[area] += int(tt * 1e6)
        profile.self_fn[key] += int(tt * 1e6)
        # cumtime of recursive functions is counted once by cProfile.
        profile.incl_fn[key] = max(profile.incl_fn[key], int(ct * 1e6))
        profile.fn_area.setdefault(key, area)
    # Inclusive by area needs call stacks, which cProfile does not keep.
    return profile


# The run ---------------------------------------------------------------------


def find_py_spy(workdir: str, explicit: str | None) -> str | None:
    for candidate in (explicit, shutil.which("py-spy"), os.path.join(workdir, "tools", "bin", "py-spy"),
                      os.path.expanduser("~/.local/bin/py-spy")):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def access_lines(path: str) -> int:
    needle = f"{NAMESPACE}/{CONNECTOR}".encode()
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if needle in line)
    except OSError:
        return 0


@dataclass
class Measured:
    name: str
    src: str
    profiler: str
    profile: Profile
    requests: int
    cpu: float  # the whole process
    cpu_main: float  # the reactor's thread, which the tables describe
    window: float
    wrk: dict[str, float]
    raw_path: str
    others_cpus: float
    profile_rate: int = 0

    @property
    def us_per_request(self) -> float:
        """The reactor thread's CPU per request: what the shares divide."""
        return self.cpu_main / max(self.requests, 1) * 1e6

    @property
    def process_us_per_request(self) -> float:
        return self.cpu / max(self.requests, 1) * 1e6


def start_proxy(name: str, src: str, run_dir: str, origin: int, username: str, password: str, token: str,
                cprofile_path: str | None) -> tuple[Proc, int]:
    proc, port = proxy_proc(name, src, os.path.join(run_dir, name), proxy_manifests(origin, username, password),
                            token, "access.log", listen_options=":backlog=4096")
    if cprofile_path:
        # twistd's own options come before the plugin's name.
        at = proc.argv.index("connectors-proxy")
        proc.argv[at:at] = [f"--profile={cprofile_path}", "--profiler=cprofile", "--savestats"]
    proc.start()
    proc.wait_port(port, timeout=60)
    return proc, port


def check(port: int, token: str) -> None:
    result = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10",
                             "-H", f"Authorization: Bearer {token}", "-H", f"Host: {CONNECTOR_HOST}",
                             f"http://127.0.0.1:{port}/small.bin"], capture_output=True, text=True, timeout=30)
    if result.stdout != "200":
        raise RuntimeError(f"GET /small.bin through the proxy gave {result.stdout} {result.stderr}")


def profile_tree(name: str, src: str, args: argparse.Namespace, run_dir: str, origin: int, username: str,
                 password: str, token: str, py_spy: str | None) -> Measured:
    profiler = args.profiler
    if profiler == "auto":
        profiler = "py-spy" if py_spy else "cprofile"
        if not py_spy:
            print("  py-spy not found (see --help for how to install it): using twistd --profiler=cprofile",
                  flush=True)
    if profiler == "py-spy":
        measured = _run(name, src, args, run_dir, origin, username, password, token, py_spy, None)
        if measured is not None:
            return measured
        if args.profiler == "py-spy":
            raise RuntimeError("py-spy could not record the proxy (see above)")
        print("  py-spy could not attach to the proxy (ptrace restricted?): falling back to "
              "twistd --profile=FILE --profiler=cprofile", flush=True)
    stats = os.path.join(run_dir, f"{name}.pstats")
    measured = _run(name, src, args, run_dir, origin, username, password, token, None, stats)
    assert measured is not None
    return measured


def _run(name: str, src: str, args: argparse.Namespace, run_dir: str, origin: int, username: str, password: str,
         token: str, py_spy: str | None, cprofile_path: str | None) -> Measured | None:
    proc, port = start_proxy(name, src, run_dir, origin, username, password, token, cprofile_path)
    try:
        with open(proc.log_path) as log:
            print(f"  {name}: {log.readline().strip()}, pid {proc.pid}", flush=True)
        check(port, token)
        total = args.warmup + args.seconds + 2
        wrk = subprocess.Popen(wrk_argv(f"http://127.0.0.1:{port}/small.bin",
                                        [f"Authorization: Bearer {token}", f"Host: {CONNECTOR_HOST}"], total,
                                        args.threads, args.connections),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(args.warmup)
            lines0, t0 = access_lines(proc.log_path), time.monotonic()
            cpu0, main0 = cpu_seconds(proc.pid), cpu_seconds(proc.pid, thread=proc.pid)
            background = Background()
            raw_path = os.path.join(run_dir, f"{name}.pyspy.txt")
            if py_spy:
                argv = [py_spy, "record", "--pid", str(proc.pid), "--duration", str(int(args.seconds)),
                        "--rate", str(args.rate), "--format", "raw", "--output", raw_path, "--full-filenames",
                        "--threads"]
                argv += {"nonblocking": ["--nonblocking"], "native": ["--native"], "blocking": []}[args.mode]
                recorded = subprocess.run(argv, capture_output=True, text=True, timeout=args.seconds + 60)
                if recorded.returncode != 0 or not os.path.exists(raw_path):
                    print(f"  py-spy failed ({recorded.returncode}): "
                          f"{(recorded.stderr or recorded.stdout).strip()[:600]}", flush=True)
                    return None
                said = re.search(r"Samples: \d+ Errors: \d+", recorded.stdout + recorded.stderr)
                lagging = "behind" in recorded.stdout + recorded.stderr
                py_spy_note = (said.group(0) if said else "") + (", it fell behind in sampling" if lagging else "")
            else:
                py_spy_note = ""
                time.sleep(args.seconds)
            lines1, t1 = access_lines(proc.log_path), time.monotonic()
            cpu1, main1 = cpu_seconds(proc.pid), cpu_seconds(proc.pid, thread=proc.pid)
            others = background.cpus()
        finally:
            out, err = wrk.communicate(timeout=total + 60)
        parsed = parse_wrk(out)
        if parsed["non2xx"] or parsed["errors"]:
            print(f"  wrk saw failures: non-2xx {parsed['non2xx']}, socket errors {parsed['errors']}", flush=True)
        requests = lines1 - lines0
        if requests <= 0:  # no access log lines counted: estimate from wrk
            requests = int(parsed["rps"] * (t1 - t0))
        if cprofile_path:
            proc.stop()  # twistd writes the profile as the reactor stops
            profile = read_pstats(cprofile_path)
            profile.note = "cProfile (twistd --profiler=cprofile): the whole run, warm-up included"
            raw_path = cprofile_path
        else:
            profile = read_raw(raw_path, proc.pid)
            profile.py_spy = py_spy_note
            profile.note = {"native": "py-spy --native (stops the proxy for each sample)",
                            "blocking": "py-spy (stops the proxy for each sample; syscalls found by the source line"
                                        " that makes them)",
                            "nonblocking": "py-spy --nonblocking (syscalls found by the source line that makes them)",
                            }[args.mode]
        return Measured(name, src, "cprofile" if cprofile_path else "py-spy", profile, requests, cpu1 - cpu0,
                        main1 - main0, t1 - t0, parsed, raw_path, others, args.rate)
    finally:
        proc.stop()


# Output -------------------------------------------------------------------------


def print_tree(m: Measured, top: int) -> None:
    p = m.profile
    us = m.us_per_request
    print(f"\n== {m.name} ({m.src}): {m.profile.note}")
    print(f"  window {m.window:.1f} s: {m.requests} requests ({m.requests / m.window:.0f} req/s while profiled;"
          f" wrk over its whole run {m.wrk['rps']:.0f} req/s, p99 {m.wrk['p99']:.1f} ms),"
          f" proxy CPU {m.cpu:.2f} s = {m.process_us_per_request:.0f} us/request, of which the reactor thread"
          f" {m.cpu_main:.2f} s = {us:.0f} us/request (the tables below divide that);"
          f" {p.samples} samples; data in {m.raw_path}")
    print(f"  processes outside the bench used {m.others_cpus:.2f} CPUs meanwhile")
    if m.profiler == "py-spy":
        # A sample is taken of a thread that is not idle: running, or
        # runnable but waiting for a CPU (then its shares are of time, not CPU).
        expected = m.cpu_main * m.profile_rate
        print(f"  py-spy: {p.py_spy or '?'}; {p.samples} samples of the reactor thread tabled"
              f" ({p.torn} torn ones left out), {p.samples / max(expected, 1):.0%} of its CPU time x rate")
        said = re.search(r"Samples: (\d+) Errors: (\d+)", p.py_spy)
        if said and int(said.group(2)) > 0.1 * (int(said.group(1)) + int(said.group(2))):
            print("  WARNING: py-spy could not read the stack for many samples: the shares are skewed")
    if p.other_threads:
        print("  other threads' samples (not in the tables): "
              + ", ".join(f"{name} {n}" for name, n in p.other_threads.most_common(5)))
    total = max(p.samples, 1)
    print(f"\n  {'area':<48}{'self':>7}{'us/req':>8}{'incl':>7}{'us/req':>8}")
    for area in sorted(AREAS, key=lambda a: -p.self_area[a]):
        if not p.self_area[area] and not p.incl_area[area]:
            continue
        s, i = p.self_area[area] / total, p.incl_area[area] / total
        incl = f"{i:7.1%}{i * us:8.0f}" if p.incl_area else f"{'-':>7}{'-':>8}"
        print(f"  {area:<48}{s:7.1%}{s * us:8.0f}{incl}")

    def table(title: str, counter: Counter[str]) -> None:
        print(f"\n  top {top} functions by {title} share (area; us/request)")
        for key, count in counter.most_common(top):
            share = count / total
            print(f"  {share:6.1%} {share * us:6.1f}  {key[:96]:<96}  {short_area(p.fn_area.get(key, OTHER))}")

    table("self", p.self_fn)
    # The frames every sample has (twistd, the reactor's run loop) say nothing.
    table("inclusive", Counter({k: n for k, n in p.incl_fn.items()
                                if not k.startswith(ROOT_FRAMES) and k not in ROOT_FUNCTIONS}))


ROOT_FRAMES = ("twisted.scripts.", "twisted.application.", "<string>.")
ROOT_FUNCTIONS = {"twisted.internet.base.ReactorBase.run", "twisted.internet.base.ReactorBase.mainLoop",
                  "twisted.internet.base.run", "twisted.internet.base.mainLoop"}


def short_area(area: str) -> str:
    return area.split(" (")[0]


def print_comparison(measured: list[Measured]) -> None:
    if len(measured) < 2:
        return
    print("\n== side by side: CPU us/request by area (self time)")
    print(f"  {'area':<48}" + "".join(f"{m.name[:14]:>15}" for m in measured))
    for area in AREAS:
        if not any(m.profile.self_area[area] for m in measured):
            continue
        cells = "".join(f"{m.profile.self_area[area] / max(m.profile.samples, 1) * m.us_per_request:15.0f}"
                        for m in measured)
        print(f"  {area:<48}{cells}")
    print(f"  {'reactor thread CPU / requests':<48}" + "".join(f"{m.us_per_request:15.0f}" for m in measured))
    print(f"  {'process CPU / requests':<48}" + "".join(f"{m.process_us_per_request:15.0f}" for m in measured))
    print(f"  {'req/s while profiled':<48}" + "".join(f"{m.requests / m.window:15.0f}" for m in measured))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20, help="recording window (default 20)")
    parser.add_argument("--warmup", type=float, default=3, help="load before recording starts (default 3)")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second (default 200)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--top", type=int, default=25, help="functions listed (default 25)")
    parser.add_argument("--profiler", choices=("auto", "py-spy", "cprofile"), default="auto",
                        help="auto: py-spy if found and it can attach, else cProfile")
    parser.add_argument("--mode", choices=("blocking", "native", "nonblocking"), default="blocking",
                        help="py-spy's way of sampling (default blocking; see above)")
    parser.add_argument("--py-spy", default=None, help="the py-spy program (default: PATH, then WORKDIR/tools/bin)")
    parser.add_argument("--proxy-src", default=ROOT, help="source tree to profile (default: this checkout)")
    parser.add_argument("--extra-proxy", action="append", default=[], metavar="NAME=DIR",
                        help="also profile the tree DIR as NAME (one after the other, same load)")
    parser.add_argument("--workdir", default=os.path.join("/tmp", "connectors-proxy-bench"))
    args = parser.parse_args(argv)
    for program in ("nginx", "wrk", "curl"):
        need(program)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)

    run_dir, www = new_run_dir(args.workdir, "profile")
    username, password, authorization = basic_credentials()
    token = secrets.token_hex(24)
    py_spy = find_py_spy(args.workdir, args.py_spy) if args.profiler != "cprofile" else None
    if args.profiler == "py-spy" and not py_spy:
        sys.exit("bench: py-spy not found; see --help for how to install it")

    trees = source_trees(args.proxy_src, args.extra_proxy)

    origin, origin_port = origin_nginx(run_dir, ORIGIN_SERVER, www=www, shm=run_dir, authorization=authorization)
    print(f"connectors-proxy profile {time.strftime('%Y-%m-%d %H:%M:%S %z')}: wrk -t{args.threads} "
          f"-c{args.connections} GET 1 KiB, {args.seconds:g} s recorded after {args.warmup:g} s of load; "
          f"{os.cpu_count()} cpus, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"py-spy: {py_spy or 'none'}", flush=True)
    measured: list[Measured] = []
    try:
        origin.start()
        origin.wait_port(origin_port)
        for tree_name, src in trees:
            measured.append(profile_tree(tree_name, src, args, run_dir, origin_port, username, password, token,
                                         py_spy))
    finally:
        origin.stop()
    for m in measured:
        print_tree(m, args.top)
    print_comparison(measured)
    print(f"\nload average now: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; logs in {run_dir}")
    return 0


if __name__ == "__main__":
    run_main(main)
