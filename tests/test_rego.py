"""
ConnectorClass Rego hooks (UPSTREAM-COMPAT section 4): the authExtractor
finds a client's token, the generator places a Connector's credentials.

Policies are our own, one per variant (header, query and body extraction;
two headers, a query parameter and a JSON body field generated; v1,
C{import rego.v1}, C{future.keywords} and v0 syntax; a compile error, an
evaluation error, a policy that never ends and one that allocates without
end).  The engine is the real one (regopy), in its evaluator processes
where bounds matter; the end-to-end tests run real C{curl} as glab calls
GitLab (C{PRIVATE-TOKEN: <client token>}) through the proxy and the real
relay to a GitLab-like REST stand-in that accepts only
C{Private-Token: <secret>}, and scan everything the client and the logs
saw for canaries.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface.verify import verifyObject

from connectors_proxy.auth.rego import (
    HookFailed,
    InlineEvaluator,
    IPolicyEvaluator,
    RegoHooks,
    Reply,
    WorkerPool,
    describe_compile_error,
    describe_evaluation_error,
    deterministic,
    placement_of,
    reads_of,
    request_fields,
)
from connectors_proxy.auth.regoworker import compile_policy
from connectors_proxy.model.credentials import Placement, RegoCredentials, resolve, with_query
from connectors_proxy.model.objects import parse_connector_class
from connectors_proxy.model.state import Snapshot
from connectors_proxy.sources.manifests import parse_documents
from connectors_proxy.upstream.hooks import (
    _without_parameter,
    canonical_header,
    header_map,
    place_in_body,
    query_map,
)
from connectors_proxy.upstream.reflection import secrets_for

from .support.procs import check, require, run
from .support.proxy import manifests_text, sa, secret, start_proxy

# -- policies ------------------------------------------------------------------

# glab's header, OPA v1 with the import (the upstream gitlab class's form).
EXTRACT_HEADER = """package proxy

import rego.v1

default auth := {"token": ""}

auth := {"token": v[0]} if {
  v := input.request.headers["Private-Token"]
  count(v) > 0
}
"""

# OPA 1.0 syntax without any import (the upstream docs' extractor sample).
EXTRACT_HEADER_V1 = """package proxy

default auth := {"token": ""}

auth := {"token": input.request.headers["Private-Token"][0]} if {
  count(input.request.headers["Private-Token"]) > 0
}
"""

# A query parameter, with future.keywords imports (the CRD sample's style).
EXTRACT_QUERY = """package proxy

import future.keywords.if
import future.keywords.in

default auth := {"token": ""}

auth := {"token": t} if {
  some t in input.request.query["private_token"]
}
"""

# A JSON body field.
EXTRACT_BODY = """package proxy

import rego.v1

auth := {"token": input.request.body.auth.token} if {
  is_string(input.request.body.auth.token)
}
"""

# v0 syntax: '=' and bodies without 'if'.
EXTRACT_V0 = """package proxy

default auth = {"token": ""}

auth = {"token": t} {
  t := input.request.headers["X-Api-Token"][0]
}
"""

GENERATE_TWO_HEADERS = """package proxy

import rego.v1

auth := {"position": "header", "auth": {"Private-Token": input.data.token, "X-Gitlab-User": input.data.user}}
"""

GENERATE_QUERY = """package proxy

auth := {"position": "query", "auth": {"private_token": input.data.token}}
"""

GENERATE_BODY = """package proxy

import rego.v1

auth := {"position": "body", "contentType": "application/json", "auth": {"api_key": input.data.token, "scope": "read"}}
"""

# Depends on the request's path (the upstream gitlab class's generator does).
GENERATE_BY_PATH = """package proxy

import rego.v1

default auth := {"position": "header", "auth": {}}

auth := {"position": "header", "auth": {"Private-Token": input.data.token}} if {
  startswith(input.request.path, "/api/v4/")
}
"""

COMPILE_ERROR = """package proxy

auth := {"token":
"""

# Two complete definitions that disagree: an evaluation error in OPA and here.
EVALUATION_ERROR = """package proxy

auth := {"token": "a"} if { input.request.method }
auth := {"token": "b"} if { input.request.method }
"""

# A builtin that fails on the client's token: rego-cpp's error quotes its
# argument, which must never reach a log line.
BUILTIN_ERROR = """package proxy

import rego.v1

auth := {"token": x} if {
  x := to_number(input.request.headers["Private-Token"][0])
}
"""

# rego-cpp prints a parse error of json.unmarshal's argument (the client's
# token) on its stdout: the evaluator processes print nowhere.
PRINTS_INPUT = """package proxy

import rego.v1

auth := {"token": json.unmarshal(input.request.headers["Private-Token"][0])}
"""

# 10^10 iterations holding nothing: only a time limit stops it.
NEVER_ENDS = """package proxy

import rego.v1

auth := {"token": "done"} if {
  every x in numbers.range(1, 100000) {
    every y in numbers.range(1, 100000) {
      x + y > 0
    }
  }
}
"""

# A 10^8-element array: only a memory limit stops it.
ALLOCATES = """package proxy

auth := {"token": sprintf("%d", [count(numbers.range(1, 100000000))])}
"""


def value(reply: Reply) -> Any:
    assert reply.kind == "value", reply
    return json.loads(reply.text)["expressions"][0]


def extractor_input(headers: dict[str, list[str]] | None = None, query: dict[str, list[str]] | None = None,
                    body: Any = None) -> dict[str, Any]:
    request: dict[str, Any] = {"method": "GET", "path": "/api/v4/user", "host": "c-gl.team.svc",
                               "headers": headers if headers is not None else {}, "query": query or {}}
    if body is not None:
        request["body"] = body
    return request


def run_now(d: Deferred[Any]) -> Any:
    """The result of a Deferred that has fired (the in-process evaluator answers at once)."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "not fired"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def capture(test: Any) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    test.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


def logged(events: list[dict[str, Any]]) -> str:
    from twisted.logger import formatEvent

    return "\n".join(formatEvent(e) for e in events)


# -- pure parts ----------------------------------------------------------------


class RequestFieldsTests(SynchronousTestCase):
    """What of input.request a policy reads, found from its text, conservatively."""

    def test_literal_selectors(self) -> None:
        self.assertEqual(request_fields(EXTRACT_HEADER), frozenset({"headers"}))
        self.assertEqual(request_fields(EXTRACT_QUERY), frozenset({"query"}))
        self.assertEqual(request_fields(EXTRACT_BODY), frozenset({"body"}))
        self.assertEqual(request_fields(GENERATE_TWO_HEADERS), frozenset())
        self.assertEqual(request_fields(GENERATE_BY_PATH), frozenset({"path"}))
        self.assertEqual(request_fields('x := input["request"]["body"].a'), frozenset({"body"}))

    def test_whole_or_computed_references_read_everything(self) -> None:
        for text in ("r := input.request", "input.request[k]", "walk(input, x)", "x := input",
                     "import input.request as req"):
            self.assertIsNone(request_fields(text), text)

    def test_headers_and_parameters_by_name(self) -> None:
        reads = reads_of(EXTRACT_HEADER)
        self.assertEqual((reads.headers, reads.query), (frozenset({"Private-Token"}), frozenset()))
        self.assertEqual(reads_of(EXTRACT_QUERY).query, frozenset({"private_token"}))
        self.assertIsNone(reads_of('h := input.request.headers; h["A"]').headers)
        self.assertIsNone(reads_of('input.request.headers[name]').headers)
        self.assertFalse(reads_of(GENERATE_TWO_HEADERS).request)

    def test_deterministic(self) -> None:
        self.assertTrue(deterministic(GENERATE_TWO_HEADERS))
        self.assertFalse(deterministic('auth := {"t": sprintf("%d", [time.now_ns()])}'))


class HeadersAndQueryTests(SynchronousTestCase):
    def test_go_canonical_names(self) -> None:
        self.assertEqual(canonical_header("PRIVATE-TOKEN"), "Private-Token")
        self.assertEqual(canonical_header("x-api-key"), "X-Api-Key")
        self.assertEqual(canonical_header("bad name"), "bad name")

    def test_header_map_lists_values_without_host(self) -> None:
        headers = Headers({b"private-token": [b"a"], b"accept": [b"x", b"y"], b"host": [b"h"]})
        self.assertEqual(header_map(headers), {"Private-Token": ["a"], "Accept": ["x", "y"]})

    def test_query_map(self) -> None:
        self.assertEqual(query_map(b"a=1&a=2&b=&c=%2Fx"), {"a": ["1", "2"], "b": [""], "c": ["/x"]})

    def test_query_parameter_of_the_token_removed(self) -> None:
        self.assertEqual(_without_parameter(b"/p?x=1&private_token=T&y=2", "T"), b"/p?x=1&y=2")
        self.assertEqual(_without_parameter(b"/p?private_token=T", "T"), b"/p")
        self.assertEqual(_without_parameter(b"/p?private_token=T%2B", "T+"), b"/p")


class PlacementTests(SynchronousTestCase):
    def test_header_query_body(self) -> None:
        self.assertEqual(placement_of({"position": "header", "auth": {"A": "1", "B": 2}}),
                         Placement("header", (("A", "1"), ("B", "2"))))
        self.assertEqual(placement_of({"position": "query", "auth": {"k": "v"}}), Placement("query", (("k", "v"),)))
        self.assertEqual(placement_of({"position": "body", "contentType": "application/json", "auth": {"n": [1]}}),
                         Placement("body", (("n", "[1]"),), "application/json"))
        self.assertEqual(placement_of({"auth": {"A": "1"}}).position, "header")

    def test_refused_answers(self) -> None:
        from connectors_proxy.auth.rego import _BadOutput

        for bad in ("x", {"position": "cookie"}, {"auth": []}, {"auth": {"Host": "h"}},
                    {"auth": {"Content-Length": "1"}}, {"auth": {"A": "a\r\nB: b"}}, {"auth": {"bad name": "v"}},
                    {"auth": {"A": {"nested": 1}}}):
            self.assertRaises(_BadOutput, placement_of, bad)

    def test_query_replaces_the_clients(self) -> None:
        url = with_query(b"http://u/api?private_token=CLIENT&a=1&private%5Ftoken=X", (("private_token", "S/1"),))
        self.assertEqual(url, b"http://u/api?a=1&private_token=S%2F1")
        self.assertEqual(with_query(b"http://u/api", (("k", "v"),)), b"http://u/api?k=v")

    def test_body_fields_set(self) -> None:
        body = place_in_body(b'{"name": "x", "api_key": "client"}', (("api_key", '"s"'), ("n", "1")), "c")
        self.assertEqual(json.loads(body), {"name": "x", "api_key": "s", "n": 1})
        self.assertEqual(json.loads(place_in_body(b"", (("k", '"v"'),), "c")), {"k": "v"})

    def test_non_json_body_refused(self) -> None:
        from connectors_proxy.server.errors import ProxyError

        e = self.assertRaises(ProxyError, place_in_body, b"a=1", (("k", '"v"'),), "restb")
        self.assertEqual(e.status, 415)
        self.assertIn("restb", e.message)

    def test_generated_values_are_secrets(self) -> None:
        """Every injected value counts for the masking of reflected credentials (and log redaction)."""
        placed = RegoCredentials("c", "a", GENERATE_TWO_HEADERS, (("token", "sekrit-123456"),),
                                 Placement("header", (("Private-Token", "derived-abcdef"), ("X-Trace", "c"))))
        values = placed.secret_values()
        self.assertIn(b"sekrit-123456", values)
        self.assertIn(b"derived-abcdef", values)
        masked = secrets_for(placed).mask(b"echo derived-abcdef and sekrit-123456 c")
        self.assertEqual(masked, b"echo ************** and ************* c")


class ModelTests(SynchronousTestCase):
    def klass(self, **spec: Any) -> dict[str, Any]:
        return {"apiVersion": "connectors.alauda.io/v1alpha1", "kind": "ConnectorClass",
                "metadata": {"name": "gitlab"}, "spec": spec}

    def test_hooks_parsed(self) -> None:
        parsed = parse_connector_class(self.klass(
            auth={"types": [{"name": "patAuth", "secretType": "connectors.cpaas.io/gitlab-pat-auth",
                             "generator": {"rego": GENERATE_TWO_HEADERS}}, {"name": "basicAuth"}]},
            proxy={"authExtractor": {"rego": EXTRACT_HEADER}}))
        self.assertEqual(parsed.extractor, EXTRACT_HEADER)
        self.assertEqual(parsed.auth_type("patAuth").generator, GENERATE_TWO_HEADERS)  # type: ignore[union-attr]
        self.assertIsNone(parsed.auth_type("basicAuth").generator)  # type: ignore[union-attr]
        self.assertTrue(parsed.has_generators)

    def test_no_hooks(self) -> None:
        parsed = parse_connector_class(self.klass(auth={"types": [{"name": "basicAuth"}]}))
        self.assertIsNone(parsed.extractor)
        self.assertFalse(parsed.has_generators)

    def test_resolve_defers_to_the_generator(self) -> None:
        snapshot = Snapshot.of(parse_documents(manifests_text([
            {"apiVersion": "connectors.alauda.io/v1alpha1", "kind": "ConnectorClass",
             "metadata": {"name": "gitlab"}, "spec": {"auth": {"types": [
                 {"name": "patAuth", "generator": {"rego": GENERATE_TWO_HEADERS}}]}}},
            {"apiVersion": "connectors.alauda.io/v1alpha1", "kind": "Connector",
             "metadata": {"name": "gl", "namespace": "team"},
             "spec": {"connectorClassName": "gitlab", "address": "https://gitlab.example",
                      "auth": {"name": "patAuth", "secretRef": {"name": "pat"}}}},
            secret("team", "pat", "connectors.cpaas.io/gitlab-pat-auth", apikey="k1234567"),
        ]), "<test>"))
        [connector] = snapshot.connectors.values()
        credentials = resolve(connector, snapshot.connector_class(connector), snapshot)
        self.assertIsInstance(credentials, RegoCredentials)
        self.assertEqual(credentials.data, (("apikey", "k1234567"),))  # type: ignore[union-attr]
        self.assertNotIn("k1234567", repr(credentials))


class ErrorTextTests(SynchronousTestCase):
    def test_compile_error_has_a_line(self) -> None:
        compiled = compile_policy(COMPILE_ERROR)
        self.assertIsInstance(compiled, str)
        self.assertIn("line 3", describe_compile_error(compiled, COMPILE_ERROR))

    def test_evaluation_error_masks_the_input(self) -> None:
        text = '(error (errormsg 25:to_number: bad "tok-9999") (errorast x))'
        described = describe_evaluation_error(text, {"request": {"headers": {"Private-Token": ["tok-9999"]}}})
        self.assertEqual(described, 'to_number: bad "***"')

    def test_evaluation_error_masks_encoded_secrets(self) -> None:
        """
        A message may quote a secret as the policy turned it: in the base64
        of a Basic header it built, or JSON-escaped.  Those forms are masked
        as the relay masks reflected credentials, not only the exact string.
        """
        canary = 'c"' + secrets.token_hex(8)  # the quote is escaped in JSON
        basic = base64.b64encode(f"build:{canary}".encode()).decode("ascii")
        for quoted in (basic, base64.urlsafe_b64encode(canary.encode()).decode("ascii"), json.dumps(canary)[1:-1]):
            message = f'invalid header value "Basic {quoted}"'
            text = f"(error (errormsg {len(message)}:{message}) (errorast x))"
            described = describe_evaluation_error(text, {"data": {"username": "build", "password": canary}})
            self.assertTrue(described.startswith('invalid header value "Basic '), described)
            self.assertIn("***", described)
            self.assertFalse(secrets_for(None, canary).found_in(described.encode()), described)
            self.assertNotIn(quoted, described)

    def test_evaluation_error_log_masks_encoded_secrets(self) -> None:
        """The generator's failure, as logged: the Basic header quoted in it is masked."""
        class QuotesTheHeader:
            """An evaluator whose error quotes the Basic header the policy built of C{input.data}."""

            def evaluate(self, policy: str, input_json: str) -> Deferred[Reply]:
                data = json.loads(input_json)["data"]
                pair = f"{data['username']}:{data['password']}".encode()
                message = f'invalid header value "Basic {base64.b64encode(pair).decode()}"'
                return succeed(Reply("error", f"(error (errormsg {len(message)}:{message}) (errorast x))"))

            def stop(self) -> Deferred[None]:
                return succeed(None)

        events = capture(self)
        canary = secrets.token_urlsafe(12)
        credentials = RegoCredentials("gitlab", "basicAuth", "package proxy\n",
                                      (("password", canary), ("username", "build")))
        hooks = RegoHooks(QuotesTheHeader())  # type: ignore[arg-type]
        with self.assertRaises(HookFailed):
            run_now(Deferred.fromCoroutine(hooks.generate(credentials, lambda reads: {})))
        text = logged(events)
        self.assertIn("invalid header value", text)
        self.assertFalse(secrets_for(None, canary).found_in(text.encode()), text)


# -- the engine, in process ------------------------------------------------------


class CountingEvaluator(InlineEvaluator):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def evaluate(self, policy: str, input_json: str) -> Deferred[Reply]:
        self.calls += 1
        return super().evaluate(policy, input_json)


class RunsAway:
    """An evaluator for which every policy runs past its time limit."""

    calls = 0

    def evaluate(self, policy: str, input_json: str) -> Deferred[Reply]:
        self.calls += 1
        return succeed(Reply("timeout", "evaluation took longer than 1s"))

    def stop(self) -> Deferred[None]:
        return succeed(None)


class ExtractorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.hooks = RegoHooks(InlineEvaluator())
        self.events = capture(self)

    def extract(self, policy: str, request: dict[str, Any]) -> str | None:
        return run_now(Deferred.fromCoroutine(self.hooks.extract("gitlab", policy, request)))

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IPolicyEvaluator, InlineEvaluator()))
        self.assertTrue(verifyObject(IPolicyEvaluator, WorkerPool()))

    def test_header(self) -> None:
        for policy in (EXTRACT_HEADER, EXTRACT_HEADER_V1):
            self.assertEqual(self.extract(policy, extractor_input({"Private-Token": ["tok-1"]})), "tok-1")
            self.assertIsNone(self.extract(policy, extractor_input({"Accept": ["*/*"]})))

    def test_same_input_evaluated_once(self) -> None:
        evaluator = CountingEvaluator()
        hooks = RegoHooks(evaluator)
        for token in ("tok-1", "tok-1", "tok-2", "tok-1"):
            extracted = run_now(Deferred.fromCoroutine(
                hooks.extract("gitlab", EXTRACT_HEADER, extractor_input({"Private-Token": [token]}))))
            self.assertEqual(extracted, token)
        self.assertEqual(evaluator.calls, 2)

    def test_null_headers_survive(self) -> None:
        self.assertIsNone(self.extract(EXTRACT_HEADER, {"headers": None, "query": None}))

    def test_query_with_future_keywords(self) -> None:
        self.assertEqual(self.extract(EXTRACT_QUERY, extractor_input(query={"private_token": ["tok-2"]})), "tok-2")
        self.assertIsNone(self.extract(EXTRACT_QUERY, extractor_input()))

    def test_body(self) -> None:
        self.assertEqual(self.extract(EXTRACT_BODY, extractor_input(body={"auth": {"token": "tok-3"}})), "tok-3")
        self.assertIsNone(self.extract(EXTRACT_BODY, extractor_input(body={"auth": {"token": 5}})))

    def test_v0_syntax(self) -> None:
        """rego-cpp parses v0 rule bodies too: no retry needed."""
        self.assertEqual(self.extract(EXTRACT_V0, extractor_input({"X-Api-Token": ["tok-4"]})), "tok-4")

    def test_compile_error(self) -> None:
        for _ in range(2):
            e = self.assertRaises(HookFailed, self.extract, COMPILE_ERROR, extractor_input())
            self.assertIn("ConnectorClass gitlab", e.message)
            self.assertIn("does not compile", e.message)
        [line] = [e for e in self.events if "Rego policy" in logged([e])]
        self.assertIn("line 3", logged([line]))

    def test_evaluation_error(self) -> None:
        e = self.assertRaises(HookFailed, self.extract, EVALUATION_ERROR, extractor_input())
        self.assertIn("failed to evaluate", e.message)

    def test_builtin_error_quotes_nothing(self) -> None:
        token = "tok-" + secrets.token_hex(8)
        for _ in range(3):
            e = self.assertRaises(HookFailed, self.extract, BUILTIN_ERROR, extractor_input({"Private-Token": [token]}))
            self.assertNotIn(token, e.message)
        self.assertNotIn(token, logged(self.events))
        self.assertEqual(len([e for e in self.events if "Rego policy" in logged([e])]), 1)

    def test_stopped_policy_suspended(self) -> None:
        """A policy stopped at its time limit is answered 503 at once for a while: other classes go on."""
        now = [100.0]
        evaluator = RunsAway()
        hooks = RegoHooks(evaluator, clock=lambda: now[0])

        def extract() -> None:
            run_now(Deferred.fromCoroutine(hooks.extract("slow", NEVER_ENDS, extractor_input())))

        self.assertIn("time limit", self.assertRaises(HookFailed, extract).message)
        self.assertIn("suspended", self.assertRaises(HookFailed, extract).message)
        self.assertEqual(evaluator.calls, 1)
        now[0] += 11
        self.assertRaises(HookFailed, extract)
        self.assertEqual(evaluator.calls, 2)

    def test_answer_not_a_token(self) -> None:
        e = self.assertRaises(HookFailed, self.extract, 'package proxy\nauth := {"token": 5}\n', extractor_input())
        self.assertIn("gitlab", e.message)


class GeneratorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.evaluator = CountingEvaluator()
        self.hooks = RegoHooks(self.evaluator)
        self.built: list[frozenset[str] | None] = []

    def credentials(self, policy: str, **data: str) -> RegoCredentials:
        return RegoCredentials("gitlab", "patAuth", policy, tuple(sorted(data.items())))

    def generate(self, credentials: RegoCredentials, path: str = "/api/v4/user") -> RegoCredentials:
        def request(reads: Any) -> dict[str, Any]:
            self.built.append(reads.fields)
            return {"method": "GET", "path": path, "host": "gitlab.example"}

        return run_now(Deferred.fromCoroutine(self.hooks.generate(credentials, request)))

    def test_two_headers(self) -> None:
        placed = self.generate(self.credentials(GENERATE_TWO_HEADERS, token="s-1", user="bot"))
        self.assertEqual(placed.header_pairs, ((b"Private-Token", b"s-1"), (b"X-Gitlab-User", b"bot")))
        self.assertEqual(placed.query_pairs, ())

    def test_query(self) -> None:
        placed = self.generate(self.credentials(GENERATE_QUERY, token="s-2"))
        self.assertEqual(placed.query_pairs, (("private_token", "s-2"),))
        self.assertEqual(placed.header_pairs, ())

    def test_body(self) -> None:
        placed = self.generate(self.credentials(GENERATE_BODY, token="s-3"))
        self.assertEqual(placed.placement, Placement("body", (("api_key", '"s-3"'), ("scope", '"read"')),
                                                      "application/json"))
        self.assertIn(b"s-3", placed.secret_values())

    def test_once_per_secret_version(self) -> None:
        """A generator that does not read the request is evaluated once per Secret data."""
        for _ in range(3):
            self.generate(self.credentials(GENERATE_TWO_HEADERS, token="s-1", user="bot"))
        self.assertEqual(self.evaluator.calls, 1)
        self.assertEqual(self.built, [])
        changed = self.generate(self.credentials(GENERATE_TWO_HEADERS, token="s-9", user="bot"))
        self.assertEqual(self.evaluator.calls, 2)
        self.assertEqual(changed.header_pairs[0], (b"Private-Token", b"s-9"))

    def test_by_path_cached_per_path(self) -> None:
        credentials = self.credentials(GENERATE_BY_PATH, token="s-4")
        api = self.generate(credentials, "/api/v4/projects")
        git = self.generate(credentials, "/group/repo.git/info/refs")
        self.generate(credentials, "/api/v4/projects")
        self.assertEqual(api.header_pairs, ((b"Private-Token", b"s-4"),))
        self.assertEqual(git.header_pairs, ())
        self.assertEqual(self.evaluator.calls, 2)
        self.assertEqual(self.built, [frozenset({"path"})] * 3)

    def test_clock_reading_generator_not_cached(self) -> None:
        policy = GENERATE_QUERY.replace("input.data.token", 'sprintf("%s-%d", [input.data.token, time.now_ns()])')
        first = self.generate(self.credentials(policy, token="s-5"))
        self.generate(self.credentials(policy, token="s-5"))
        self.assertEqual(self.evaluator.calls, 2)
        self.assertTrue(first.query_pairs[0][1].startswith("s-5-"))

    def test_undefined_places_nothing(self) -> None:
        placed = self.generate(self.credentials('package proxy\nauth := 1 if { false }\n', token="s"))
        self.assertIsNone(placed.placement)


# -- the evaluator processes -----------------------------------------------------


class WorkerPoolTests(TestCase):
    timeout = 120

    def pool(self, **kwargs: Any) -> WorkerPool:
        pool = WorkerPool(reactor, **kwargs)
        self.addCleanup(pool.stop)
        return pool

    @inlineCallbacks
    def test_evaluates_in_a_process(self):  # type: ignore[no-untyped-def]
        pool = self.pool(size=1)
        self.assertEqual(pool.processes, 0, "no process before a class with hooks is used")
        reply = yield pool.evaluate(EXTRACT_HEADER, json.dumps({"request": extractor_input({"Private-Token": ["t"]})}))
        self.assertEqual(value(reply), {"token": "t"})
        self.assertEqual(pool.processes, 1)
        self.assertEqual((yield pool.evaluate(COMPILE_ERROR, "{}")).kind, "compile")
        self.assertEqual((yield pool.evaluate(EVALUATION_ERROR, json.dumps({"request": {"method": "GET"}}))).kind,
                         "error")

    @inlineCallbacks
    def test_never_ending_policy_stopped(self):  # type: ignore[no-untyped-def]
        pool = self.pool(size=1, timeout=0.5)
        yield pool.evaluate(EXTRACT_HEADER, "{}")  # the process is up
        started = time.monotonic()
        looping = pool.evaluate(NEVER_ENDS, "{}")
        # Queued behind it on the same process: answered once it is killed.
        after = pool.evaluate(EXTRACT_HEADER, json.dumps({"request": extractor_input({"Private-Token": ["t"]})}))
        self.assertEqual((yield looping).kind, "timeout")
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual(value((yield after)), {"token": "t"})

    @inlineCallbacks
    def test_unbounded_allocation_stopped(self):  # type: ignore[no-untyped-def]
        pool = self.pool(size=1, timeout=30, memory=64 * 1024 * 1024)
        self.assertEqual((yield pool.evaluate(ALLOCATES, "{}")).kind, "crashed")
        self.assertEqual(value((yield pool.evaluate(EXTRACT_HEADER, "{}"))), {"token": ""})

    @inlineCallbacks
    def test_compiled_once_per_text(self):  # type: ignore[no-untyped-def]
        pool = self.pool(size=1, max_policies=2)
        for text in (EXTRACT_HEADER, EXTRACT_HEADER, EXTRACT_QUERY, EXTRACT_V0, EXTRACT_HEADER):
            reply = yield pool.evaluate(text, "{}")
            self.assertEqual(reply.kind, "value")
        [worker] = pool._workers
        self.assertEqual(len(worker.defined), 2)


# -- end to end: curl as glab, the real relay, a GitLab-like stand-in -------------


class GitLabLike(Resource):
    """
    A GitLab REST stand-in: C{/api/v4/...} answers only C{Private-Token: SECRET}
    (401 otherwise); C{/echo} reflects the request headers; everything it
    received is recorded.
    """

    isLeaf = True

    def __init__(self, secret: str) -> None:
        super().__init__()
        self.secret = secret
        self.received: list[dict[str, Any]] = []

    def render(self, request: Any) -> bytes:
        body = request.content.read()
        self.received.append({
            "method": request.method, "uri": request.uri,
            "headers": [(k, v) for k, vs in request.requestHeaders.getAllRawHeaders() for v in vs], "body": body,
        })
        request.setHeader(b"Content-Type", b"application/json")
        if request.path.startswith(b"/echo"):
            headers = {k.decode(): v.decode() for k, v in self.received[-1]["headers"]}
            return json.dumps({"headers": headers, "uri": request.uri.decode(), "body": body.decode()}).encode()
        if request.path.startswith(b"/api/v4/"):
            if request.getHeader(b"private-token") != self.secret.encode():
                request.setResponseCode(401)
                return b'{"message":"401 Unauthorized"}'
            return json.dumps({"username": "someone", "path": request.path.decode()}).encode()
        if request.path.startswith(b"/query"):
            if request.args.get(b"private_token") != [self.secret.encode()]:
                request.setResponseCode(401)
                return b'{"message":"401 Unauthorized"}'
            return b'{"ok":true}'
        if request.path.startswith(b"/body"):
            try:
                doc = json.loads(body)
            except ValueError:
                doc = None
            if not isinstance(doc, dict) or doc.get("api_key") != self.secret:
                request.setResponseCode(401)
                return b'{"message":"401 Unauthorized"}'
            return json.dumps({"ok": True, "fields": sorted(doc)}).encode()
        request.setResponseCode(404)
        return b"{}"


class QuietSite(Site):
    """The stand-in's own access log would show what it received (the secret): not the proxy's to judge."""

    noisy = False

    def log(self, request: Any) -> None:
        pass


def rego_class(name: str, protocol: str, extractor: str | None, generator: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"auth": {"types": [{"name": "patAuth", "secretType": "connectors.cpaas.io/gitlab-pat-auth",
                                                "optional": True}]}}
    if generator is not None:
        spec["auth"]["types"][0]["generator"] = {"rego": generator}
    if extractor is not None:
        spec["proxy"] = {"authExtractor": {"rego": extractor}}
    return {"apiVersion": "connectors.alauda.io/v1alpha1", "kind": "ConnectorClass",
            "metadata": {"name": name, "annotations": {"proxy.connectors.alauda.io/protocol": protocol}}, "spec": spec}


def rego_connector(name: str, class_name: str, address: str) -> dict[str, Any]:
    return {"apiVersion": "connectors.alauda.io/v1alpha1", "kind": "Connector",
            "metadata": {"name": name, "namespace": "team"},
            "spec": {"connectorClassName": class_name, "address": address,
                     "auth": {"name": "patAuth", "secretRef": {"name": "pat"}}}}


CURL = ["curl", "-sS", "--max-time", "60", "-i"]


class GlabThroughProxy(TestCase):
    timeout = 180

    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        require("curl")
        self.secret = "glpat-" + secrets.token_hex(16)
        self.token = "sa-" + secrets.token_hex(20)
        self.other = "sa-" + secrets.token_hex(20)
        self.upstream = GitLabLike(self.secret)
        port = reactor.listenTCP(0, QuietSite(self.upstream), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        base = f"http://127.0.0.1:{port.getHost().port}"
        objects = [
            # glab's class: the token in PRIVATE-TOKEN, the PAT sent as
            # Private-Token (and a second header) by the generator.
            rego_class("gitlab", "git", EXTRACT_HEADER, GENERATE_TWO_HEADERS),
            rego_class("restq", "http", EXTRACT_QUERY, GENERATE_QUERY),
            rego_class("restb", "http", EXTRACT_BODY, GENERATE_BODY),
            rego_class("hq", "http", EXTRACT_HEADER_V1, GENERATE_QUERY),
            rego_class("broken", "http", COMPILE_ERROR, None),
            rego_class("leaky", "http", PRINTS_INPUT, None),
            rego_class("slow", "http", EXTRACT_HEADER, NEVER_ENDS.replace('{"token": "done"}', '{"auth": {}}')),
            rego_connector("gl", "gitlab", base),
            rego_connector("q", "restq", base),
            rego_connector("b", "restb", base),
            rego_connector("hq", "hq", base),
            rego_connector("broken", "broken", base),
            rego_connector("leaky", "leaky", base),
            rego_connector("slow", "slow", base),
            secret("team", "pat", "connectors.cpaas.io/gitlab-pat-auth", token=self.secret, user="canary-bot"),
        ]
        self.proxy = yield start_proxy(self, objects, {self.token: sa("team"), self.other: sa("elsewhere")})
        self.proxy.root.rego = RegoHooks(WorkerPool(reactor, timeout=0.5))
        self.addCleanup(self.proxy.root.rego.stop)
        self.seen: list[bytes] = []

    def curl(self, *args: str) -> Deferred[Any]:
        def keep(result: Any) -> Any:
            self.seen.extend([result.stdout, result.stderr])
            return result

        return run([*CURL, *args]).addCallback(keep)

    def url(self, name: str, rest: str) -> str:
        return self.proxy.path_url("team", name, rest)

    def tearDown(self) -> None:
        """Canaries: the secret never reaches the client or a log; client tokens never reach the upstream."""
        logs = self.proxy.logs.text()
        for seen in self.seen:
            self.assertNotIn(self.secret.encode(), seen)
        self.assertNotIn(self.secret, logs)
        self.assertNotIn(self.token, logs)
        self.assertNotIn("Traceback", logs)
        for entry in self.upstream.received:
            everything = repr(entry).encode()
            self.assertNotIn(self.token.encode(), everything)
            self.assertNotIn(self.other.encode(), everything)

    @inlineCallbacks
    def test_glab_private_token(self):  # type: ignore[no-untyped-def]
        result = check((yield self.curl("-H", f"PRIVATE-TOKEN: {self.token}", self.url("gl", "/api/v4/user"))))
        self.assertIn(b"HTTP/1.1 200", result.stdout)
        self.assertIn(b'"username": "someone"', result.stdout)
        [entry] = self.upstream.received
        headers = dict((k.lower(), v) for k, v in entry["headers"])
        self.assertEqual(headers[b"private-token"], self.secret.encode())
        self.assertEqual(headers[b"x-gitlab-user"], b"canary-bot")
        self.assertNotIn(b"authorization", headers)
        [access] = self.proxy.logs.access()
        self.assertEqual((access["identity"], access["connector"], access["status"]), (sa("team"), "gl", 200))

    @inlineCallbacks
    def test_glab_host_mode(self):  # type: ignore[no-untyped-def]
        result = check((yield self.curl("-H", "Host: c-gl.team.svc.cluster.local", "-H", f"PRIVATE-TOKEN: {self.token}",
                                        self.proxy.url + "/api/v4/projects?per_page=2")))
        self.assertIn(b"HTTP/1.1 200", result.stdout)
        self.assertEqual(self.upstream.received[-1]["uri"], b"/api/v4/projects?per_page=2")

    @inlineCallbacks
    def test_missing_token_401(self):  # type: ignore[no-untyped-def]
        result = check((yield self.curl(self.url("gl", "/api/v4/user"))))
        self.assertIn(b"HTTP/1.1 401", result.stdout)
        self.assertIn(b'WWW-Authenticate: Basic realm="connectors-proxy"', result.stdout)
        self.assertEqual(self.upstream.received, [])

    @inlineCallbacks
    def test_invalid_token_401_then_bearer_fallback(self):  # type: ignore[no-untyped-def]
        result = check((yield self.curl("-H", "PRIVATE-TOKEN: sa-not-a-token", self.url("gl", "/api/v4/user"))))
        self.assertIn(b"HTTP/1.1 401", result.stdout)
        result = check((yield self.curl("-H", f"Authorization: Bearer {self.token}", self.url("gl", "/api/v4/user"))))
        self.assertIn(b"HTTP/1.1 200", result.stdout)

    @inlineCallbacks
    def test_order_403_404(self):  # type: ignore[no-untyped-def]
        result = check((yield self.curl("-H", f"PRIVATE-TOKEN: {self.other}", self.url("gl", "/api/v4/user"))))
        self.assertIn(b"HTTP/1.1 403", result.stdout)
        # An unknown Connector has no class, hence no extractor: 401 first, 404 with a token.
        result = check((yield self.curl("-H", f"PRIVATE-TOKEN: {self.token}", self.url("nothere", "/api/v4/user"))))
        self.assertIn(b"HTTP/1.1 401", result.stdout)
        result = check((yield self.curl("-H", f"Authorization: Bearer {self.token}", self.url("nothere", "/x"))))
        self.assertIn(b"HTTP/1.1 404", result.stdout)
        self.assertEqual(self.upstream.received, [])

    @inlineCallbacks
    def test_reflected_secret_masked(self):  # type: ignore[no-untyped-def]
        result = check((yield self.curl("-H", f"PRIVATE-TOKEN: {self.token}", self.url("gl", "/echo"))))
        self.assertIn(b"HTTP/1.1 200", result.stdout)
        self.assertIn(b"*" * len(self.secret), result.stdout)

    @inlineCallbacks
    def test_query_extracted_and_generated(self):  # type: ignore[no-untyped-def]
        result = check((yield self.curl(self.url("q", f"/query/items?page=2&private_token={self.token}"))))
        self.assertIn(b"HTTP/1.1 200", result.stdout)
        uri = self.upstream.received[-1]["uri"]
        self.assertEqual(uri, b"/query/items?page=2&private_token=" + self.secret.encode())
        [access] = self.proxy.logs.access()
        self.assertEqual(access["path"], "/namespaces/team/connectors/q/query/items?page=2")

    @inlineCallbacks
    def test_extracted_header_removed(self):  # type: ignore[no-untyped-def]
        """The header the token came in never reaches the upstream, even when nothing replaces it."""
        result = check((yield self.curl("-H", f"PRIVATE-TOKEN: {self.token}", "-H", "X-Kept: yes",
                                        self.url("hq", "/query/items"))))
        self.assertIn(b"HTTP/1.1 200", result.stdout)
        entry = self.upstream.received[-1]
        names = {k.lower() for k, _ in entry["headers"]}
        self.assertNotIn(b"private-token", names)
        self.assertIn(b"x-kept", names)
        self.assertEqual(entry["uri"], b"/query/items?private_token=" + self.secret.encode())

    @inlineCallbacks
    def test_body_extracted_and_generated(self):  # type: ignore[no-untyped-def]
        body = json.dumps({"name": "x", "auth": {"token": self.token}})
        result = check((yield self.curl("-X", "POST", "-H", "Content-Type: application/json", "--data-binary", body,
                                        self.url("b", "/body/items"))))
        self.assertIn(b"HTTP/1.1 200", result.stdout)
        entry = self.upstream.received[-1]
        sent = json.loads(entry["body"])
        self.assertEqual(sent, {"name": "x", "auth": {}, "api_key": self.secret, "scope": "read"})
        headers = dict((k.lower(), v) for k, v in entry["headers"])
        self.assertEqual(int(headers[b"content-length"]), len(entry["body"]))

    @inlineCallbacks
    def test_body_over_the_cap_413(self):  # type: ignore[no-untyped-def]
        body = json.dumps({"auth": {"token": self.token}, "pad": "x" * (70 * 1024)})
        result = check((yield self.curl("-X", "POST", "-H", "Content-Type: application/json", "--data-binary", body,
                                        self.url("b", "/body/items"))))
        self.assertIn(b"HTTP/1.1 413", result.stdout)
        self.assertEqual(self.upstream.received, [])

    @inlineCallbacks
    def test_compile_error_503(self):  # type: ignore[no-untyped-def]
        for _ in range(2):
            result = check((yield self.curl("-H", f"PRIVATE-TOKEN: {self.token}", self.url("broken", "/x"))))
            self.assertIn(b"HTTP/1.1 503", result.stdout)
            self.assertIn(b"ConnectorClass broken", result.stdout)
        lines = [line for line in self.proxy.logs.text().splitlines() if "Rego policy" in line and "broken" in line]
        self.assertTrue(lines)
        self.assertEqual(len({line for line in lines if not line.startswith("{")}), 1, lines)

    @inlineCallbacks
    def test_evaluation_error_503(self):  # type: ignore[no-untyped-def]
        result = check((yield self.curl("-H", f"PRIVATE-TOKEN: {self.token}", self.url("leaky", "/x"))))
        self.assertIn(b"HTTP/1.1 503", result.stdout)
        self.assertIn(b"ConnectorClass leaky", result.stdout)
        self.assertNotIn(b"Traceback", result.stdout)

    @inlineCallbacks
    def test_never_ending_generator_503(self):  # type: ignore[no-untyped-def]
        started = time.monotonic()
        result = check((yield self.curl("-H", f"PRIVATE-TOKEN: {self.token}", self.url("slow", "/api/v4/user"))))
        self.assertIn(b"HTTP/1.1 503", result.stdout)
        self.assertIn(b"ConnectorClass slow", result.stdout)
        self.assertLess(time.monotonic() - started, 10)
        # The other classes are served meanwhile and after.
        result = check((yield self.curl("-H", f"PRIVATE-TOKEN: {self.token}", self.url("gl", "/api/v4/user"))))
        self.assertIn(b"HTTP/1.1 200", result.stdout)
