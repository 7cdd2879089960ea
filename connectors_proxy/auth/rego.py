# -*- test-case-name: tests.test_rego -*-
"""
ConnectorClass Rego hooks (UPSTREAM-COMPAT section 4): a class's
C{spec.proxy.authExtractor.rego} says where a client's token sits, its
C{spec.auth.types[].generator.rego} how a Connector's Secret is injected.
Both are queried as C{data.proxy.auth} with a real Rego engine, rego-cpp
through C{regopy}.

 - L{WorkerPool} evaluates them in separate processes
   (L{connectors_proxy.auth.regoworker}), so that a policy that loops is
   stopped (the process is killed at a deadline) and one that allocates
   without end meets that process's memory limit, not the proxy's.  Each
   policy is compiled once per process, keyed by its text: a class that
   changes brings new text, hence a new compilation.
 - L{RegoHooks} turns their answers into what the request path needs (a
   token, a L{Placement}), checks them, caches generator answers that do
   not depend on the request, and turns every failure into L{HookFailed},
   whose message names the class and nothing secret, logged once per
   class version.

What a policy reads of C{input.request} is found from its text
(L{request_fields}), so the request path builds (and reads a body for)
only what the policy can see.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

from attrs import define, evolve, field, frozen
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from connectors_proxy.auth import regoworker
from connectors_proxy.model.credentials import POSITIONS, Placement, RegoCredentials
from connectors_proxy.upstream.reflection import secrets_for

log = Logger()

EXTRACTOR = "authExtractor"
GENERATOR = "generator"

# Evaluations longer than this are stopped (their process killed): the
# policies upstream ships take well under a millisecond.
DEFAULT_TIMEOUT = 1.0
# Memory an evaluator process may allocate beyond what it holds at start.
DEFAULT_MEMORY = 256 * 1024 * 1024
DEFAULT_PROCESSES = 2
# After an evaluator process could not start, evaluations fail at once
# for this long instead of starting one process per request.
START_BACKOFF = 5.0
# After a policy was stopped (time or memory), it is answered 503 at once
# for this long: a policy that some input makes run away would otherwise
# let a few requests a second keep every evaluator process busy, and every
# other class waiting.
SUSPEND = 10.0


# -- what a policy reads -------------------------------------------------------

_INPUT = re.compile(r"\binput\b")
_SELECTOR = re.compile(r"""\s*(?:\.\s*([A-Za-z_][A-Za-z0-9_]*)|\[\s*(?:"((?:[^"\\]|\\.)*)"|`([^`]*)`)\s*\])""")

_COMPUTED = re.compile(r"\s*\[")
# Builtins whose answer is not a function of the input: a policy that
# calls one is evaluated every time, never answered from the cache.
_NONDETERMINISTIC = re.compile(r"\b(?:time\.now_ns|rand\.|uuid\.|http\.send|net\.lookup|opa\.runtime)")


def _selectors(text: str, at: int, count: int) -> list[str | None]:
    """Up to C{count} literal selectors after position C{at}; C{None} for a computed one."""
    found: list[str | None] = []
    while len(found) < count:
        match = _SELECTOR.match(text, at)
        if match is None:
            if _COMPUTED.match(text, at):
                found.append(None)
            break
        name = match.group(1) if match.group(1) is not None else (
            match.group(2) if match.group(2) is not None else match.group(3))
        found.append(name)
        at = match.end()
    return found


@frozen
class Reads:
    """
    What of C{input.request} a policy may read, found from its text
    (L{reads_of}).  C{None} means any: the field, header or parameter is
    named with a computed key, or the whole is bound to a variable.

    @ivar fields: the fields (C{method}, C{path}, C{host}, C{headers},
        C{query}, C{body}).
    @ivar headers: the header names (Go-canonical spelling, as the policy
        must write them) it reads.
    @ivar query: the query parameter names it reads.
    """

    fields: frozenset[str] | None
    headers: frozenset[str] | None = None
    query: frozenset[str] | None = None

    def __contains__(self, name: str) -> bool:
        return self.fields is None or name in self.fields

    @property
    def request(self) -> bool:
        """Whether it reads anything of the request at all."""
        return self.fields is None or bool(self.fields)


EVERYTHING = Reads(None)


@lru_cache(maxsize=256)
def reads_of(text: str) -> Reads:
    """
    What policy C{text} may read of C{input.request}.  Conservative: a
    mention in a comment or a string counts, and C{input} or
    C{input.request} named as a whole (C{r := input.request},
    C{input.request[k]}, C{walk(input, ...)}) reads everything.
    """
    fields: set[str] = set()
    keys: dict[str, set[str] | None] = {"headers": set(), "query": set()}
    for match in _INPUT.finditer(text):
        chain = _selectors(text, match.end(), 3)
        if not chain or chain[0] is None:
            return EVERYTHING
        if chain[0] != "request":
            continue
        if len(chain) < 2 or chain[1] is None:
            return EVERYTHING
        fields.add(chain[1])
        if chain[1] in keys:
            named = keys[chain[1]]
            if len(chain) < 3 or chain[2] is None:
                keys[chain[1]] = None
            elif named is not None:
                named.add(chain[2])
    return Reads(frozenset(fields), *(None if keys[f] is None else frozenset(keys[f] or ()) for f in ("headers", "query")))


def request_fields(text: str) -> frozenset[str] | None:
    """The fields of C{input.request} that policy C{text} may read, C{None} for any (L{reads_of})."""
    return reads_of(text).fields


def deterministic(text: str) -> bool:
    """Whether policy C{text} answers the same to the same input (it calls no clock, random or I/O builtin)."""
    return _NONDETERMINISTIC.search(text) is None


# -- evaluators ----------------------------------------------------------------


@frozen
class Reply:
    """
    What an evaluator answered.

    @ivar kind: C{value} (C{text} is rego-cpp's output JSON), C{undefined},
        C{compile} (the policy does not compile: C{text} says why),
        C{error} (evaluation failed), C{timeout}, C{crashed} (the process
        died: its memory limit, or a fault), C{unavailable} (no evaluator
        could be started), C{compiled} (the answer to a compile check:
        the policy compiles).
    """

    kind: str
    text: str = field(default="", repr=False)


class IPolicyEvaluator(Interface):
    """Evaluates C{data.proxy.auth} of a policy."""

    def evaluate(policy: str, input_json: str) -> Deferred[Reply]:
        """Evaluate C{policy} with input C{input_json}; never fails, the L{Reply} says."""

    def compile(policy: str) -> Deferred[Reply]:
        """Whether C{policy} compiles: a C{compiled} or C{compile} L{Reply} (or C{timeout}, ...)."""

    def stop() -> Deferred[None]:
        """Stop evaluating: pending evaluations answer C{unavailable}."""


def _reply(status: bytes, text: str) -> Reply:
    kinds = {b"V": "value", b"U": "undefined", b"C": "compile", b"X": "error", b"O": "compiled"}
    return Reply(kinds.get(status, "error"), text)


@implementer(IPolicyEvaluator)
@define
class InlineEvaluator:
    """
    Evaluates in this process, on the calling thread, without any limit:
    for tests and measurements that are not about bounds.  The daemon uses
    L{WorkerPool}, not only for the bounds: rego-cpp prints compile errors,
    and some builtins' errors quoting their argument (a token), on the
    process's stdout, which an evaluator process sends nowhere.
    """

    _compiled: dict[str, Any] = field(factory=dict, init=False)

    def evaluate(self, policy: str, input_json: str) -> Deferred[Reply]:
        compiled = self._compiled.get(policy)
        if compiled is None:
            compiled = self._compiled[policy] = regoworker.compile_policy(policy)
        return succeed(_reply(*regoworker.evaluate(compiled, input_json)))

    def compile(self, policy: str) -> Deferred[Reply]:
        compiled = self._compiled.get(policy)
        if compiled is None:
            compiled = self._compiled[policy] = regoworker.compile_policy(policy)
        return succeed(Reply("compile", compiled) if isinstance(compiled, str) else Reply("compiled"))

    def stop(self) -> Deferred[None]:
        return succeed(None)


@define
class _Job:
    key: bytes
    policy: str = field(repr=False)
    input: bytes | None = field(repr=False)  # None: a compile check
    result: Deferred[Reply]


class _Worker(ProcessProtocol):
    """One evaluator process: a queue of evaluations, answered in order."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.jobs: deque[_Job] = deque()
        self.defined: set[bytes] = set()
        self.buffer = bytearray()
        self.ready = False
        self.alive = True
        self.timer: IDelayedCall | None = None
        self.stderr = b""
        self.ended: Deferred[None] = Deferred()

    # -- the pool's side

    def submit(self, job: _Job) -> None:
        if job.key not in self.defined:
            self._send(b"D" + job.key + job.policy.encode("utf-8"))
            self.defined.add(job.key)
        self._send(b"K" + job.key if job.input is None else b"E" + job.key + job.input)
        self.jobs.append(job)
        if self.ready and len(self.jobs) == 1:
            self._arm(self.pool.timeout)

    def forget(self, key: bytes) -> None:
        if key in self.defined and self.alive:
            self.defined.discard(key)
            self._send(b"F" + key)

    def kill(self) -> None:
        self.alive = False
        self._disarm()
        try:
            if self.transport is not None:
                self.transport.signalProcess("KILL")
        except (ProcessExitedAlready, OSError):
            pass

    def _send(self, frame: bytes) -> None:
        assert self.transport is not None
        self.transport.write(struct.pack(">I", len(frame)) + frame)

    # -- deadlines: only the evaluation at the head of the queue is running

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self.timer = self.pool._reactor().callLater(seconds, self._too_slow)

    def _disarm(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _too_slow(self) -> None:
        self.timer = None
        if not self.ready:
            log.error("the Rego evaluator process did not start within {seconds}s", seconds=self.pool.startup_timeout)
            self._abandon(Reply("unavailable", "the Rego evaluator process did not start in time"))
            return
        head = self.jobs.popleft()
        self.kill()
        self.pool._requeue(self)
        head.result.callback(Reply("timeout", f"evaluation took longer than {self.pool.timeout:g}s"))

    def _abandon(self, reply: Reply) -> None:
        jobs = list(self.jobs)
        self.jobs.clear()
        self.kill()
        self.pool._unstartable()
        for job in jobs:
            job.result.callback(reply)

    # -- ProcessProtocol

    def connectionMade(self) -> None:
        self._arm(self.pool.startup_timeout)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 2:
            # Only before the process points its stderr at /dev/null (an
            # import error): kept for the log line if it never gets ready.
            self.stderr = (self.stderr + data)[-2000:]
            return
        self.buffer += data
        while len(self.buffer) >= 4:
            (size,) = struct.unpack(">I", self.buffer[:4])
            if len(self.buffer) < 4 + size:
                break
            frame = bytes(self.buffer[4:4 + size])
            del self.buffer[:4 + size]
            self._frame(frame)

    def _frame(self, frame: bytes) -> None:
        if not self.ready:
            self.ready = frame == b"R"
            self._disarm()
            if self.jobs:
                self._arm(self.pool.timeout)
            return
        if not self.jobs:
            return
        job = self.jobs.popleft()
        self._disarm()
        if self.jobs:
            self._arm(self.pool.timeout)
        job.result.callback(_reply(frame[:1], frame[1:].decode("utf-8", "replace")))

    def processEnded(self, reason: Failure) -> None:
        was_alive, self.alive = self.alive, False
        self._disarm()
        self.pool._ended(self)
        if not self.ready:
            if self.jobs:
                log.error("the Rego evaluator process could not start ({why}): {stderr}",
                          why=reason.getErrorMessage(), stderr=self.stderr.decode("utf-8", "replace")[-500:])
            self._abandon(Reply("unavailable", "the Rego evaluator process could not start"))
        elif was_alive and self.jobs:
            # It died evaluating the job at the head (its memory limit,
            # or a fault in the engine); the others go to another process.
            head = self.jobs.popleft()
            self.pool._requeue(self)
            head.result.callback(Reply("crashed", "the evaluator process died (memory limit exceeded, or a fault)"))
        else:
            self.pool._requeue(self)
        self.ended.callback(None)


@implementer(IPolicyEvaluator)
@define
class WorkerPool:
    """
    Evaluates policies in up to C{size} evaluator processes, started when
    first needed (classes without hooks start none), each evaluation sent
    to the least busy one.  An evaluation running longer than C{timeout}
    seconds has its process killed (the others queued there move on to
    another); a process that dies mid-evaluation (its C{memory} budget,
    in bytes) fails that evaluation only.

    @ivar reactor: an C{IReactorProcess} and C{IReactorTime}; the global
        reactor when not given (looked up when the first process starts).
    """

    reactor: Any = None
    size: int = DEFAULT_PROCESSES
    timeout: float = DEFAULT_TIMEOUT
    memory: int = DEFAULT_MEMORY
    startup_timeout: float = 30.0
    max_policies: int = 256
    _workers: list[_Worker] = field(factory=list, init=False)
    _keys: OrderedDict[str, bytes] = field(factory=OrderedDict, init=False)
    _serial: int = field(default=0, init=False)
    _unavailable_until: float = field(default=0.0, init=False)
    _stopped: bool = field(default=False, init=False)

    def _reactor(self) -> Any:
        if self.reactor is None:
            from twisted.internet import reactor

            self.reactor = reactor
        return self.reactor

    def evaluate(self, policy: str, input_json: str) -> Deferred[Reply]:
        return self._submit(policy, input_json.encode("utf-8"))

    def compile(self, policy: str) -> Deferred[Reply]:
        return self._submit(policy, None)

    def _submit(self, policy: str, input_bytes: bytes | None) -> Deferred[Reply]:
        if self._stopped or self._reactor().seconds() < self._unavailable_until:
            return succeed(Reply("unavailable", "the Rego evaluator process could not start"))
        job = _Job(self._key(policy), policy, input_bytes, Deferred())
        self._dispatch(job)
        return job.result

    def _key(self, policy: str) -> bytes:
        key = self._keys.get(policy)
        if key is not None:
            self._keys.move_to_end(policy)
            return key
        self._serial = (self._serial + 1) % 2**32
        key = self._keys[policy] = struct.pack(">I", self._serial)
        while len(self._keys) > self.max_policies:
            _, old = self._keys.popitem(last=False)
            for worker in self._workers:
                worker.forget(old)
        return key

    def _dispatch(self, job: _Job) -> None:
        live = [w for w in self._workers if w.alive]
        if len(live) < self.size and (not live or min(len(w.jobs) for w in live) > 0):
            live.append(self._spawn())
        min(live, key=lambda w: len(w.jobs)).submit(job)

    def _spawn(self) -> _Worker:
        worker = _Worker(self)
        self._workers.append(worker)
        executable = sys.executable
        self._reactor().spawnProcess(
            worker, executable, [executable, regoworker.__file__, str(self.memory)],
            env=dict(os.environ), childFDs={0: "w", 1: "r", 2: "r"},
        )
        return worker

    def _requeue(self, worker: _Worker) -> None:
        jobs = list(worker.jobs)
        worker.jobs.clear()
        for job in jobs:
            if self._stopped:
                job.result.callback(Reply("unavailable", "the proxy is stopping"))
            else:
                self._dispatch(job)

    def _ended(self, worker: _Worker) -> None:
        if worker in self._workers:
            self._workers.remove(worker)

    def _unstartable(self) -> None:
        self._unavailable_until = self._reactor().seconds() + START_BACKOFF

    def stop(self) -> Deferred[None]:
        """Kill the evaluator processes; fires when they have ended."""
        self._stopped = True
        ended = [w.ended for w in self._workers]
        for worker in list(self._workers):
            worker.kill()
        return gatherResults(ended).addCallback(lambda _: None)

    @property
    def processes(self) -> int:
        """How many evaluator processes are running."""
        return sum(1 for w in self._workers if w.alive)


# -- answers -------------------------------------------------------------------


class HookFailed(Exception):
    """
    A class's hook gave no usable answer.  The message names the class and
    the hook and is fit for the client (no policy output, no input value).
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


_ERRORMSG = re.compile(r"\(errormsg (\d+):")
_ERROR_AT = re.compile(r"\(error \d+:[^|\s]*\|(\d+)\|\d+")


def _messages(text: str) -> list[str]:
    """The messages in one of rego-cpp's error terms (length-prefixed: C{(errormsg N:TEXT)})."""
    found = []
    for match in _ERRORMSG.finditer(text):
        size = int(match.group(1))
        found.append(text[match.end():match.end() + size])
    return found


def describe_compile_error(text: str, policy: str) -> str:
    """rego-cpp's compile error as C{line L: message; ...}."""
    messages = _messages(text)
    places = [int(m.group(1)) for m in _ERROR_AT.finditer(text)]
    parts = []
    for i, message in enumerate(messages[:3]):
        if i < len(places):
            line = policy.encode("utf-8")[:places[i]].count(b"\n") + 1
            parts.append(f"line {line}: {message}")
        else:
            parts.append(message)
    if parts:
        return "; ".join(dict.fromkeys(parts))
    lines = text.strip().splitlines()
    return lines[0][:200] if lines else "unknown error"


def _strings(value: Any, out: set[str]) -> set[str]:
    if isinstance(value, str):
        out.add(value)
    elif isinstance(value, Mapping):
        for k, v in value.items():
            out.add(str(k))
            _strings(v, out)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _strings(v, out)
    return out


_STARS = re.compile(r"\*{3,}")


def describe_evaluation_error(text: str, given: Any) -> str:
    """
    rego-cpp's evaluation error, cut to its messages, with every string of
    the input C{given} (tokens, Secret data, headers) masked: a message may
    quote what a builtin was called with, or what the policy made of it (a
    Basic header's base64, a JSON-escaped string).  The forms looked for
    are those of reflected credentials (L{secrets_for}); strings too short
    for those are masked where they appear as they are.
    """
    messages = _messages(text)[:3] or ["evaluation failed"]
    values = sorted((s for s in _strings(given, set()) if len(s) >= 3), key=len, reverse=True)
    forms = secrets_for(None, *values)
    masked = []
    for m in messages:
        # Masked before it is cut: a value across the cut would leave its start.
        m = forms.mask(m.encode("utf-8")).decode("utf-8", "replace")
        for value in values:
            m = m.replace(value, "***")
        # Same-length masks would tell each secret's length.
        masked.append(_STARS.sub("***", m)[:200])
    return "; ".join(dict.fromkeys(masked))


_TOKEN_CHARS = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Headers a generator may not set: the framing and routing of the
# upstream request are the proxy's.
_FRAMING = frozenset({
    "host", "content-length", "transfer-encoding", "connection", "keep-alive", "te", "trailer",
    "upgrade", "proxy-connection", "expect",
})
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class _BadOutput(Exception):
    pass


def _text_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return json.dumps(value)
    if isinstance(value, str):
        return value
    raise _BadOutput("auth values must be strings for a header or query position")


def placement_of(value: Any) -> Placement:
    """
    A generator's answer as a L{Placement}:
    C{{"position": "header"|"query"|"body", "contentType": ..., "auth": {KEY: VALUE}}}
    (C{position} defaults to C{header}, a missing C{auth} places nothing).
    L{_BadOutput} says what is wrong with any other answer.
    """
    if not isinstance(value, Mapping):
        raise _BadOutput("the answer is not an object")
    position = value.get("position", "header")
    if position not in POSITIONS:
        raise _BadOutput(f"position must be one of {', '.join(POSITIONS)}")
    content_type = value.get("contentType")
    if content_type is not None and (not isinstance(content_type, str) or _BAD_VALUE.search(content_type)):
        raise _BadOutput("contentType must be a string")
    auth = value.get("auth", {})
    if auth is None:
        auth = {}
    if not isinstance(auth, Mapping):
        raise _BadOutput("auth must be an object")
    pairs = []
    for name, item in auth.items():
        if not isinstance(name, str) or not name:
            raise _BadOutput("auth keys must be non-empty strings")
        if position == "header":
            if not _TOKEN_CHARS.match(name) or name.lower() in _FRAMING:
                raise _BadOutput(f"{name[:60]!r} is not a header a generator may set")
            text = _text_value(item)
            if _BAD_VALUE.search(text):
                raise _BadOutput(f"the value for header {name[:60]!r} holds control characters")
            pairs.append((name, text))
        elif position == "query":
            pairs.append((name, _text_value(item)))
        else:
            pairs.append((name, json.dumps(item)))
    return Placement(position, tuple(pairs), content_type)


def _expression(reply: Reply) -> Any:
    """The value of C{data.proxy.auth} in a C{value} reply."""
    # rego-cpp can answer "ok" with an error term inside a value
    # (a builtin that failed), which is not JSON.
    document = json.loads(reply.text)
    expressions = document["expressions"] if isinstance(document, Mapping) else None
    if not isinstance(expressions, list) or len(expressions) != 1:
        raise ValueError("unexpected output shape")
    return expressions[0]


_UNDEFINED = object()
_MISSING = object()


@define
class RegoHooks:
    """
    A ConnectorClass's hooks, evaluated: L{extract} (the client's token),
    L{generate} (where the Connector's credentials go).

    Answers are cached by policy text and input: a policy that calls no
    clock, random or I/O builtin (L{deterministic}) answers the same input
    the same, and the input holds only what the policy reads (its
    headers and parameters by name, when it names them: L{reads_of}), so a
    workload that repeats its requests is evaluated once, and a generator
    that reads only the Secret once per Secret version.

    @ivar evaluator: the processes that evaluate (a L{WorkerPool} on the
        global reactor unless given).
    @ivar cache_size: answers kept.
    """

    evaluator: IPolicyEvaluator = field(factory=WorkerPool)
    cache_size: int = 4096
    clock: Callable[[], float] = time.monotonic
    _suspended: dict[str, float] = field(factory=dict, init=False, repr=False)
    _answers: OrderedDict[tuple[str, str], Any] = field(factory=OrderedDict, init=False, repr=False)
    _reported: set[tuple[str, str, str, str]] = field(factory=set, init=False)

    async def extract(self, class_name: str, policy: str, request: Mapping[str, Any]) -> str | None:
        """
        The token the class's authExtractor finds in C{request} (its
        C{input.request}), C{None} when it finds none (C{""} or undefined).
        """
        given = {"request": request}
        value = await self._evaluate(class_name, EXTRACTOR, policy, given)
        if value is _UNDEFINED or value is None:
            return None
        token = value.get("token") if isinstance(value, Mapping) else _UNDEFINED
        if token is None or token == "":
            return None
        if not isinstance(token, str):
            self._report(class_name, EXTRACTOR, policy, "output",
                         "answered something other than {\"token\": STRING}")
            raise HookFailed(self._failure(class_name, EXTRACTOR, "gave an answer that is not {\"token\": STRING}"))
        return token

    async def generate(self, credentials: RegoCredentials,
                       request: Callable[[Reads], Mapping[str, Any]]) -> RegoCredentials:
        """
        C{credentials} with the class's generator's L{Placement} (none when
        it answers undefined).  C{request(reads)} builds C{input.request}
        with at least what C{reads} says; it is called only when the policy
        reads the request.
        """
        policy = credentials.generator
        reads = reads_of(policy)
        given: dict[str, Any] = {"data": dict(credentials.data)}
        if reads.request:
            given["request"] = request(reads)
        value = await self._evaluate(credentials.class_name, GENERATOR, policy, given)
        placement: Placement | None = None
        if value is not _UNDEFINED:
            try:
                placement = placement_of(value)
            except _BadOutput as e:
                self._report(credentials.class_name, GENERATOR, policy, "output", str(e))
                raise HookFailed(self._failure(credentials.class_name, GENERATOR,
                                               "gave an answer the proxy cannot place")) from None
        return evolve(credentials, placement=placement)

    async def _evaluate(self, class_name: str, hook: str, policy: str, given: Mapping[str, Any]) -> Any:
        input_json = json.dumps(given, separators=(",", ":"))
        key = (policy, input_json)
        cached = self._answers.get(key, _MISSING)
        if cached is not _MISSING:
            self._answers.move_to_end(key)
            return cached
        if self._suspended and self._suspended.get(policy, 0.0) > self.clock():
            raise HookFailed(self._failure(class_name, hook, f"was stopped and is suspended for {SUSPEND:g}s"))
        reply = await self.evaluator.evaluate(policy, input_json)
        if reply.kind == "value":
            try:
                value = _expression(reply)
            except (ValueError, KeyError, TypeError):
                self._report(class_name, hook, policy, "error", describe_evaluation_error(reply.text, given))
                raise HookFailed(self._failure(class_name, hook, "failed to evaluate")) from None
        elif reply.kind == "undefined":
            value = _UNDEFINED
        elif reply.kind == "compile":
            self._report(class_name, hook, policy, "compile", describe_compile_error(reply.text, policy))
            raise HookFailed(self._failure(class_name, hook, "does not compile"))
        elif reply.kind == "error":
            self._report(class_name, hook, policy, "error", describe_evaluation_error(reply.text, given))
            raise HookFailed(self._failure(class_name, hook, "failed to evaluate"))
        elif reply.kind == "timeout":
            self._report(class_name, hook, policy, "timeout", reply.text)
            self._suspend(policy)
            raise HookFailed(self._failure(class_name, hook, "was stopped: it ran past its time limit"))
        elif reply.kind == "crashed":
            self._report(class_name, hook, policy, "crashed", reply.text)
            self._suspend(policy)
            raise HookFailed(self._failure(class_name, hook, "was stopped: it exhausted the evaluator's memory"))
        else:
            raise HookFailed(f"ConnectorClass {class_name}: the Rego evaluator is unavailable ({reply.text}); "
                             "retry later")
        if deterministic(policy):
            self._answers[key] = value
            while len(self._answers) > self.cache_size:
                self._answers.popitem(last=False)
        return value

    def _suspend(self, policy: str) -> None:
        now = self.clock()
        if len(self._suspended) > 256:
            self._suspended = {p: t for p, t in self._suspended.items() if t > now}
        self._suspended[policy] = now + SUSPEND

    @staticmethod
    def _failure(class_name: str, hook: str, what: str) -> str:
        return f"ConnectorClass {class_name}: its {hook} Rego policy {what} (see the proxy's log)"

    def _report(self, class_name: str, hook: str, policy: str, kind: str, detail: str) -> None:
        """Log a policy's problem once per class, hook, policy text and kind of problem."""
        version = hashlib.sha256(policy.encode("utf-8")).hexdigest()[:12]
        key = (class_name, hook, version, kind)
        if key in self._reported:
            return
        if len(self._reported) > 1024:
            self._reported.clear()
        self._reported.add(key)
        log.error("ConnectorClass {cls}: {hook} Rego policy (version {version}): {kind}: {detail}",
                  cls=class_name, hook=hook, version=version, kind=kind, detail=detail)

    def stop(self) -> Deferred[None]:
        """Stop the evaluator (its processes)."""
        return self.evaluator.stop()


# -- compile checks (cluster mode's status) ------------------------------------


def class_policies(cls: Any) -> list[tuple[str, str]]:
    """
    The Rego policies of ConnectorClass C{cls}, as C{(hook, text)}: its
    C{authExtractor}, then each auth type's C{generator}.
    """
    found = [(EXTRACTOR, cls.extractor)] if cls.extractor else []
    found += [(f"{GENERATOR} (auth type {t.name})", t.generator) for t in cls.auth_types if t.generator]
    return found


@define
class PolicyChecks:
    """
    Whether policies compile, asked of an evaluator's processes (never
    this one: rego-cpp prints compile errors on stdout) and remembered per
    policy text, so a class is checked once per version.

    L{check} answers C{None} (it compiles, or could not be checked: a
    stopped or unavailable evaluator is no reason to call a policy
    broken, and such an answer is not remembered) or a short compiler
    message (L{describe_compile_error}, without the policy's text).
    """

    evaluator: IPolicyEvaluator = field(factory=lambda: WorkerPool(size=1))
    cache_size: int = 512
    _known: OrderedDict[str, str | None] = field(factory=OrderedDict, init=False, repr=False)
    _waiting: dict[str, list[Deferred[str | None]]] = field(factory=dict, init=False, repr=False)

    def check(self, policy: str) -> Deferred[str | None]:
        """Why C{policy} does not compile, or C{None}; never fails."""
        if policy in self._known:
            self._known.move_to_end(policy)
            return succeed(self._known[policy])
        result: Deferred[str | None] = Deferred()
        waiting = self._waiting.get(policy)
        if waiting is not None:
            waiting.append(result)
            return result
        self._waiting[policy] = [result]
        asked = self.evaluator.compile(policy)
        asked.addCallback(self._answered, policy)
        asked.addErrback(self._failed, policy)
        return result

    def _failed(self, failure: Failure, policy: str) -> None:
        log.failure("checking a Rego policy failed", failure)
        self._done(policy, None)

    def _answered(self, reply: Reply, policy: str) -> None:
        if reply.kind == "compile":
            problem = describe_compile_error(reply.text, policy)[:300]
            self._known[policy] = problem
        elif reply.kind == "compiled":
            problem = None
            self._known[policy] = None
        else:
            problem = None
        while len(self._known) > self.cache_size:
            self._known.popitem(last=False)
        self._done(policy, problem)

    def _done(self, policy: str, problem: str | None) -> None:
        for waiter in self._waiting.pop(policy, []):
            waiter.callback(problem)

    def stop(self) -> Deferred[None]:
        """Stop the evaluator (its processes)."""
        return self.evaluator.stop()
