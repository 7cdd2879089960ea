"""
Running the real components (nginx, docker-registry, git, skopeo...) from
trial tests: start a server process, wait for its port, stop it at cleanup;
run a client command without blocking the reactor.

Every real-component test fails (never skips) when a program is missing:
CI installs them, and a silent skip would hide that it did not.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence

from twisted.internet import reactor as _reactor
from twisted.internet import threads
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase


def require(program: str) -> str:
    """The path of C{program}; a clear failure (not a skip) when absent."""
    path = shutil.which(program) or next(
        (p for p in (f"/usr/sbin/{program}", f"/usr/bin/{program}", f"/usr/lib/git-core/{program}")
         if os.path.exists(p)),
        None,
    )
    if path is None:
        raise AssertionError(
            f"{program} is not installed: run .ci/run (or apt-get install it) first"
        )
    return path


def free_port() -> int:
    """A loopback TCP port that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


class Server:
    """A server process started for one test, stopped at the test's cleanup."""

    def __init__(self, argv: Sequence[str], log_path: str,
                 env: Mapping[str, str] | None = None, cwd: str | None = None) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen(
            self.argv, stdout=self._log, stderr=subprocess.STDOUT,
            env=dict(os.environ, **(env or {})), cwd=cwd, start_new_session=True,
        )

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        self._log.close()

    @inlineCallbacks
    def wait_for_port(self, port: int, timeout: float = 20.0):  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not port_open(port):
            if self.process.poll() is not None:
                raise AssertionError(
                    f"{self.argv[0]} exited with {self.process.returncode}:\n{self.log()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.argv[0]} did not listen on {port}:\n{self.log()[-3000:]}")
            yield deferLater(_reactor, 0.05, lambda: None)


def start_server(test: TestCase, argv: Sequence[str], port: int | None = None,
                 env: Mapping[str, str] | None = None, cwd: str | None = None,
                 name: str | None = None) -> Deferred[Server]:
    """
    Start C{argv}, register its stop as a cleanup of C{test}, and fire with
    the L{Server} once C{port} accepts connections.
    """
    log_dir = test.mktemp()
    os.makedirs(log_dir)
    server = Server(argv, os.path.join(log_dir, (name or os.path.basename(argv[0])) + ".log"),
                    env=env, cwd=cwd)
    test.addCleanup(server.stop)
    if port is None:
        return succeed(server)
    d = server.wait_for_port(port)
    d.addCallback(lambda _: server)
    return d


def run(argv: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | None = None,
        input: bytes | None = None, timeout: float = 300.0) -> Deferred[subprocess.CompletedProcess[bytes]]:
    """
    Run a client command (git, curl, skopeo...) in a thread so the reactor
    keeps serving the proxy that the command talks to.  Fires with the
    completed process, whatever its exit code.
    """
    return threads.deferToThread(
        subprocess.run, list(argv), capture_output=True, input=input, timeout=timeout,
        env=dict(os.environ, **(env or {})), cwd=cwd,
    )


def check(result: subprocess.CompletedProcess[bytes]) -> subprocess.CompletedProcess[bytes]:
    """Fail with the command's output when it did not exit 0."""
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, result.args))} exited {result.returncode}\n"
            f"stdout: {result.stdout[-3000:]!r}\nstderr: {result.stderr[-3000:]!r}"
        )
    return result
