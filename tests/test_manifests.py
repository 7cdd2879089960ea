from __future__ import annotations

import json
import os

from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from connectors_proxy.model.objects import InvalidObject, ObjectRef, parse_object, validate_address
from connectors_proxy.model.state import Store
from connectors_proxy.ops.logformat import json_line, text_line
from connectors_proxy.protocols.oci.resource import error_body
from connectors_proxy.server.accesslog import redact_target
from connectors_proxy.server.errors import ProxyError, text_response
from connectors_proxy.sources.manifests import (
    SETTLE_SECONDS,
    ManifestError,
    ManifestSource,
    load,
    manifest_files,
    parse_documents,
    split_documents,
)

GOOD = """\
apiVersion: connectors.alauda.io/v1alpha1
kind: ConnectorClass
metadata:
  name: git
  annotations: {proxy.connectors.alauda.io/protocol: git}
spec:
  auth: {types: [{name: basicAuth, secretType: kubernetes.io/basic-auth}]}
  proxy: {ref: {kind: Service, name: connectors-proxy-service, namespace: connectors-system}}
---
apiVersion: connectors.alauda.io/v1alpha1
kind: Connector
metadata: {name: gitlab, namespace: team, generation: 3, uid: u-1}
spec:
  connectorClassName: git
  address: https://git.example.com/gitlab/
  auth: {name: basicAuth, secretRef: {name: gl}}
  caCertSecretRef: {name: gl-ca}
---
apiVersion: v1
kind: Secret
metadata: {name: gl, namespace: team}
type: kubernetes.io/basic-auth
data: {username: dXNlcg==}
stringData: {password: pw}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: ignored}
"""


class Objects(SynchronousTestCase):
    def test_parse(self) -> None:
        objects = parse_documents(GOOD, "f.yaml")
        self.assertEqual(len(objects), 3)
        cls, connector, secret = objects
        self.assertEqual((cls.name, cls.protocol, cls.proxy.name), ("git", "git", "connectors-proxy-service"))  # type: ignore[union-attr]
        self.assertEqual(connector.address, "https://git.example.com/gitlab")  # type: ignore[union-attr]
        self.assertEqual(connector.secret_ref, ObjectRef("team", "gl"))  # type: ignore[union-attr]
        self.assertEqual(connector.ca_secret_ref, ObjectRef("team", "gl-ca"))  # type: ignore[union-attr]
        self.assertEqual((connector.generation, connector.uid), (3, "u-1"))  # type: ignore[union-attr]
        self.assertEqual(secret.data, {"username": b"user", "password": b"pw"})  # type: ignore[union-attr]

    def test_errors_name_object_and_field(self) -> None:
        cases = [
            ({"apiVersion": "connectors.alauda.io/v1alpha1", "kind": "Connector",
              "metadata": {"name": "x", "namespace": "n"}, "spec": {"connectorClassName": "c", "address": 5}},
             "Connector n/x", "spec.address"),
            ({"apiVersion": "connectors.alauda.io/v1alpha1", "kind": "Connector",
              "metadata": {"name": "x"}, "spec": {"connectorClassName": "c", "address": "https://u:p@h"}},
             "Connector default/x", "spec.address"),
            ({"apiVersion": "connectors.alauda.io/v1alpha1", "kind": "ConnectorClass",
              "metadata": {"name": "c", "annotations": {"proxy.connectors.alauda.io/protocol": "ftp"}}},
             "ConnectorClass c", "protocol"),
            ({"apiVersion": "connectors.alauda.io/v1", "kind": "Connector", "metadata": {"name": "x"}},
             "Connector default/x", "apiVersion"),
            ({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "Bad_Name"}}, "Secret", "metadata.name"),
        ]
        for doc, what, field in cases:
            e = self.assertRaises(InvalidObject, parse_object, doc)
            self.assertIn(what, str(e))
            self.assertIn(field, e.field)

    def test_address_errors_quote_no_credentials(self) -> None:
        """A rejected address is quoted (into statuses and logs) without its userinfo or query."""
        canary = "canary-" + os.urandom(8).hex()
        for address in (f"https://u:{canary}@h:port/", f"ftp://u:{canary}@h", f"http://u:{canary}@[::1",
                        f"https://h/?private_token={canary}", f"https://h/#{canary}"):
            e = self.assertRaises(InvalidObject, validate_address, address)
            self.assertNotIn(canary, str(e))
            self.assertIn("h", e.problem)

    def test_duplicate_across_files(self) -> None:
        folder = self.mktemp()
        os.makedirs(os.path.join(folder, "..data"))
        for name in ("a.yaml", "b.yml"):
            with open(os.path.join(folder, name), "w") as f:
                f.write(GOOD)
        with open(os.path.join(folder, "..data", "hidden.yaml"), "w") as f:
            f.write("not: [valid")
        self.assertEqual([os.path.basename(p) for p in manifest_files([folder])], ["a.yaml", "b.yml"])
        e = self.assertRaises(ManifestError, load, [folder])
        self.assertIn("also defined in", str(e))

    def test_list_kind(self) -> None:
        objects = parse_documents(json.dumps({"kind": "List", "items": [
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "stringData": {"token": "t"}}]}), "l")
        self.assertEqual(len(objects), 1)


class Reload(SynchronousTestCase):
    def setUp(self) -> None:
        folder = self.mktemp()
        os.makedirs(folder)
        self.path = os.path.join(folder, "objects.yaml")
        self.write(GOOD)
        self.clock = Clock()
        self.store = Store()
        self.source = ManifestSource(self.clock, [self.path], self.store)
        self.source.load_now()
        self.source.startService()
        self.addCleanup(self.source.stopService)
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def write(self, text: str) -> None:
        with open(self.path, "w") as f:
            f.write(text)

    def test_change_picked_up_within_a_poll(self) -> None:
        first = self.store.snapshot
        self.clock.advance(1)
        self.assertIs(self.store.snapshot, first)  # unchanged: no new snapshot
        self.write(GOOD.replace("stringData: {password: pw}", "stringData: {password: rotated}"))
        self.clock.advance(1)
        self.assertIs(self.store.snapshot, first)  # changed: read again once settled
        self.clock.advance(SETTLE_SECONDS)
        self.assertEqual(self.store.snapshot.secrets[ObjectRef("team", "gl")].data["password"], b"rotated")
        self.assertEqual(self.source.reloads, 1)

    def test_broken_edit_keeps_last_good(self) -> None:
        good = self.store.snapshot
        self.write(GOOD.replace("address: https://git.example.com/gitlab/", "address: nope"))
        self.clock.advance(1)
        self.clock.advance(1)
        self.assertIs(self.store.snapshot, good)
        errors = [e for e in self.events if e.get("log_level") and e["log_level"].name == "error"]
        self.assertEqual(len(errors), 1)  # said once, not every second
        self.assertIn("Connector team/gitlab: spec.address", errors[0]["error"])

    def test_file_written_in_steps_is_loaded_once_settled(self) -> None:
        # A writer that truncates and writes in two steps: the first half is
        # valid YAML on its own, without the Secret.
        good = self.store.snapshot
        cut = GOOD.index("---\napiVersion: v1\nkind: Secret")
        rotated = GOOD.replace("stringData: {password: pw}", "stringData: {password: rotated}")
        self.write(rotated[:cut])
        self.clock.advance(1)
        self.clock.advance(SETTLE_SECONDS / 2)
        self.write(rotated)
        self.clock.advance(SETTLE_SECONDS / 2)  # differs from the first look: not settled
        self.assertIs(self.store.snapshot, good)
        self.clock.advance(SETTLE_SECONDS)
        self.assertEqual(self.store.snapshot.secrets[ObjectRef("team", "gl")].data["password"], b"rotated")
        self.assertEqual(self.source.reloads, 1)  # never the half

    def test_sighup_loads_at_once(self) -> None:
        self.write(GOOD.replace("stringData: {password: pw}", "stringData: {password: rotated}"))
        self.successResultOf(self.source.poll())
        self.assertEqual(self.store.snapshot.secrets[ObjectRef("team", "gl")].data["password"], b"rotated")

    def test_only_changed_documents_are_parsed(self) -> None:
        parsed = self.source.parser.parsed
        self.write(GOOD.replace("stringData: {password: pw}", "stringData: {password: rotated}"))
        self.successResultOf(self.source.poll())
        self.assertEqual(self.source.parser.parsed, parsed + 1)
        # The objects of unchanged documents are the same values.
        before = self.store.snapshot
        self.write(GOOD)
        self.successResultOf(self.source.poll())
        self.assertIs(self.store.snapshot.connectors[ObjectRef("team", "gitlab")],
                      before.connectors[ObjectRef("team", "gitlab")])

    def test_errors_name_the_line_in_the_file(self) -> None:
        self.write(GOOD + "---\nkind: Secret\nmetadata: {name: x\n")
        self.source.poll()
        [error] = [e for e in self.events if e.get("log_level") and e["log_level"].name == "error"]
        broken = (GOOD + "---\nkind: Secret\nmetadata: {name: x\n").count("\n") + 1
        self.assertIn(f"line {broken}:", error["error"])
        with self.assertRaises(ManifestError) as e:
            load([self.path])
        self.assertIn(f"line {broken}:", str(e.exception))

    def test_tokens_reload_reported(self) -> None:
        folder = os.path.dirname(self.path)
        tokens = os.path.join(folder, "tokens.csv")
        with open(tokens, "w") as f:
            f.write("t1,system:serviceaccount:team:a\n")
        source = ManifestSource(self.clock, [self.path], Store(), tokens_path=tokens)
        source.load_now()
        results: list[bool] = []
        manifests: list[bool] = []
        source.on_tokens_reload.append(results.append)
        source.on_reload.append(manifests.append)
        with open(tokens, "w") as f:
            f.write("t2,system:serviceaccount:team:b\n")
        self.successResultOf(source.poll())
        with open(tokens, "w") as f:
            f.write("bad\n")
        self.successResultOf(source.poll())
        self.successResultOf(source.poll())  # reported once
        self.assertEqual((results, manifests), ([True, False], []))
        assert source.tokens is not None
        self.assertEqual(len(source.tokens.table), 1)


class SplitDocuments(SynchronousTestCase):
    def test_pieces_parse_like_the_whole(self) -> None:
        pieces = split_documents(GOOD)
        self.assertEqual([line for line, _ in pieces], [1, 9, 18, 25])
        self.assertEqual("".join(piece for _, piece in pieces), GOOD)
        whole = parse_documents(GOOD, "f")
        self.assertEqual([o for _, p in pieces for o in parse_documents(p, "f")], whole)

    def test_markers(self) -> None:
        text = "a: 1\n--- # c\nb: |\n  ---\n  x\n---\n...\n"
        self.assertEqual(len(split_documents(text)), 3)
        self.assertEqual(split_documents("%YAML 1.1\n---\na: 1\n---\nb: 2\n"),
                         [(1, "%YAML 1.1\n---\na: 1\n---\nb: 2\n")])


class LogsAndErrors(SynchronousTestCase):
    def test_redaction(self) -> None:
        self.assertEqual(redact_target(b"/a?token=x&b=1&ACCESS_TOKEN=y&secret=&password=p%20q"),
                         "/a?token=REDACTED&b=1&ACCESS_TOKEN=REDACTED&secret=REDACTED&password=REDACTED")
        self.assertEqual(redact_target(b"/\xff?x=1"), "/\\xff?x=1")
        # Encoded names and ';' separators, as upstreams read them.
        self.assertEqual(redact_target(b"/a?%74oken=s1&x=1;Token=s2;private_token=s3&X-Amz-Signature=s4"),
                         "/a?%74oken=REDACTED&x=1;Token=REDACTED;private_token=REDACTED&X-Amz-Signature=REDACTED")

    def test_json_line(self) -> None:
        event = {"log_format": "{a} done", "a": "x", "log_time": 0.0, "log_namespace": "n", "access": True,
                 "status": 200, "path": "/p"}
        line = json.loads(json_line(event))
        self.assertEqual((line["message"], line["event"], line["status"], line["time"]),
                         ("x done", "access", 200, "1970-01-01T00:00:00.000Z"))
        self.assertIn("x done", text_line(event))

    def test_error_bodies(self) -> None:
        headers, body = error_body(ProxyError(401, "UNAUTHORIZED", "no token"))
        self.assertEqual(json.loads(body), {"errors": [{"code": "UNAUTHORIZED", "message": "no token"}]})
        self.assertEqual(headers.getRawHeaders(b"www-authenticate"), [b'Basic realm="connectors-proxy"'])
        headers, body = text_response(ProxyError(404, "NAME_UNKNOWN", "Connector a/b not found"))
        self.assertEqual(body, b"connectors-proxy: Connector a/b not found\n")
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/plain; charset=utf-8"])
