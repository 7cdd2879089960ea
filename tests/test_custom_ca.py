"""
Upstream's C{enable-custom-ca-certs} (UPSTREAM-COMPAT section 7 and 9,
checklist 16): with the flag on in C{connectors-config}, a Connector's
upstream certificate is verified against the system roots, every Secret of
the install namespace labelled C{connectors.cpaas.io/ca-cert: "true"} and
the Connector's own C{spec.caCertSecretRef}; Connectors get the C{Info}
condition C{CACertReady}.  Off, nothing changes.

Pure first (reading Secrets, the pool, which agent a Connector gets, the
condition), then real TLS: a Twisted TLS upstream whose certificate comes
from a private CA found only in a labelled Secret, reached through the
proxy in standalone mode (manifests replaced) and in cluster mode (the fake
API server, the flag flipped at run time).  No client or log ever sees the
Connector's password.
"""

from __future__ import annotations

import copy
import os
import secrets
import time
from collections.abc import Mapping
from typing import Any, cast

import treq
import yaml
from cryptography import x509
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from connectors_proxy.kube.cluster import ClusterMode
from connectors_proxy.kube.config import load_kubeconfig
from connectors_proxy.kube.reconcile import CA_CERT_READY, READY, World, decide, format_time
from connectors_proxy.model.flags import CUSTOM_CA_CERTS, DEFAULTS, FeatureFlags, parse_flags
from connectors_proxy.model.objects import (
    ConfigMap,
    ObjectRef,
    parse_connector,
    parse_connector_class,
    parse_object,
    parse_secret,
)
from connectors_proxy.model.state import Snapshot, Store, ca_cert_secrets
from connectors_proxy.server.errors import ProxyError
from connectors_proxy.sources.manifests import ManifestError, Parser, parse_documents
from connectors_proxy.testing.fakekube import start_fake_kube
from connectors_proxy.tls.capool import GlobalCAPool, merge_bundles, pool_bundle, secret_ca_bundle
from connectors_proxy.tls.mint import CertificateAuthority
from connectors_proxy.upstream.agents import Agents, ConnectorAgents

from .support.proxy import (
    ROOT,
    LogCapture,
    basic_secret,
    capture_logs,
    connector,
    connector_class,
    manifests_text,
    sa,
    serve_site,
    start_proxy,
)
from .test_tls import server_options

log = Logger()

INSTALL_NS = "connectors-system"
NS = "team"
T0 = format_time(1_700_000_000)
# The bound on a flag flip (UPSTREAM-COMPAT checklist 12).
FLAG_DEADLINE = 2.0


def authority(name: str) -> CertificateAuthority:
    return CertificateAuthority.generate(f"{name} {secrets.token_hex(4)}", time.time())


def secret_doc(name: str, namespace: str = INSTALL_NS, labelled: bool = False, **data: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if labelled:
        meta["labels"] = {"connectors.cpaas.io/ca-cert": "true"}
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": meta, "stringData": dict(data)}


def config_map(namespace: str = INSTALL_NS, **data: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "connectors-config", "namespace": namespace}, "data": data}


FLAG_ON = {CUSTOM_CA_CERTS: "true"}
ON = FeatureFlags(frozenset({CUSTOM_CA_CERTS}))


def subjects(pem: bytes | None) -> set[str]:
    """The subjects of the certificates in C{pem}."""
    if not pem:
        return set()
    return {c.subject.rfc4514_string() for c in x509.load_pem_x509_certificates(pem)}


def subject(ca: CertificateAuthority) -> str:
    return ca.certificate.subject.rfc4514_string()


# -- reading Secrets ------------------------------------------------------------------


class SecretReadingTests(SynchronousTestCase):
    """Upstream's reading of a CA Secret: C{*.crt}, C{*.pem}, or any PEM value."""

    def test_named_and_any_pem_value(self) -> None:
        a, b, c = authority("a"), authority("b"), authority("c")
        bundle = secret_ca_bundle({"x.pem": a.cert_pem(), "ca.crt": b.cert_pem(), "root": c.cert_pem(),
                                   "README": b"trust these", "tls.key": a.key_pem()})
        self.assertEqual(subjects(bundle), {subject(a), subject(b), subject(c)})
        # ca.crt first, then named keys, then the other PEM values.
        self.assertTrue(bundle.startswith(b.cert_pem()))
        self.assertNotIn(b"PRIVATE KEY", bundle)

    def test_only_an_unnamed_pem_value(self) -> None:
        """A Secret whose one key is not C{*.crt}/C{*.pem} still counts when its value is PEM."""
        a = authority("a")
        self.assertEqual(subjects(secret_ca_bundle({"certificate": a.cert_pem()})), {subject(a)})

    def test_no_certificate(self) -> None:
        e = self.assertRaises(ValueError, secret_ca_bundle, {"token": b"abc", "tls.key": b"-----BEGIN PRIVATE KEY-----"})
        self.assertIn("no CA certificate", str(e))

    def test_broken_pem_named(self) -> None:
        e = self.assertRaises(ValueError, secret_ca_bundle, {"ca.crt": b"not pem at all"})
        self.assertIn("'ca.crt'", str(e))
        broken = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
        e = self.assertRaises(ValueError, secret_ca_bundle, {"root": broken})
        self.assertIn("'root'", str(e))

    def test_merge_dedupes(self) -> None:
        a, b = authority("a"), authority("b")
        self.assertIsNone(merge_bundles(None, b""))
        merged = merge_bundles(a.cert_pem(), a.cert_pem() + b.cert_pem(), None)
        self.assertEqual(merged, a.cert_pem() + b.cert_pem())


class LabelTests(SynchronousTestCase):
    """Which Secrets form the global pool: labelled exactly C{"true"}, in the install namespace."""

    def test_label_parsed(self) -> None:
        self.assertTrue(parse_secret(secret_doc("a", labelled=True)).ca_cert)
        self.assertFalse(parse_secret(secret_doc("a")).ca_cert)
        for value in ("True", "yes", "", True):
            doc = secret_doc("a")
            doc["metadata"]["labels"] = {"connectors.cpaas.io/ca-cert": value}
            self.assertFalse(parse_secret(doc).ca_cert, value)

    def test_install_namespace_only(self) -> None:
        found = [parse_secret(d) for d in (
            secret_doc("z", labelled=True), secret_doc("a", labelled=True), secret_doc("plain"),
            secret_doc("elsewhere", namespace=NS, labelled=True))]
        self.assertEqual([s.name for s in ca_cert_secrets(found, INSTALL_NS)], ["a", "z"])
        self.assertEqual(ca_cert_secrets(found, None), ())

    def test_config_map(self) -> None:
        """Only C{connectors-config} is read; other ConfigMaps are none of the proxy's business."""
        parsed = parse_object(config_map(**FLAG_ON))
        self.assertIsInstance(parsed, ConfigMap)
        assert isinstance(parsed, ConfigMap)
        self.assertTrue(parsed.flags.custom_ca_certs)
        self.assertFalse(parse_flags(config_map(**{CUSTOM_CA_CERTS: "false"})).custom_ca_certs)
        other = config_map()
        other["metadata"]["name"] = "app_settings"  # not even a valid name: still left alone
        self.assertIsNone(parse_object(other))

    def test_standalone_snapshot(self) -> None:
        """Standalone: the ConfigMap's namespace is the install namespace; its flags are the snapshot's."""
        a = authority("a")
        docs = [secret_doc("g", labelled=True, **{"ca.crt": a.cert_pem().decode()}),
                secret_doc("other", namespace=NS, labelled=True, **{"ca.crt": a.cert_pem().decode()})]
        plain = Snapshot.of(parse_documents(manifests_text(docs), "<test>"))
        self.assertEqual((plain.flags, plain.ca_secrets), (DEFAULTS, ()))
        snapshot = Snapshot.of(parse_documents(manifests_text([config_map(**FLAG_ON), *docs]), "<test>"))
        self.assertTrue(snapshot.flags.custom_ca_certs)
        self.assertEqual([s.ref for s in snapshot.ca_secrets], [ObjectRef(INSTALL_NS, "g")])
        moved = Snapshot.of(parse_documents(manifests_text([config_map(NS, **FLAG_ON), *docs]), "<test>"))
        self.assertEqual([s.ref for s in moved.ca_secrets], [ObjectRef(NS, "other")])

    def test_one_config_map_per_manifest_set(self) -> None:
        files = [("a.yaml", manifests_text([config_map(**FLAG_ON)]).encode()),
                 ("b.yaml", manifests_text([config_map(NS)]).encode())]
        e = self.assertRaises(ManifestError, Parser().parse, files)
        self.assertIn("connectors-config is also defined in a.yaml", str(e))


# -- the pool and the agents ----------------------------------------------------------


class PoolTests(SynchronousTestCase):
    def test_broken_labelled_secret_skipped(self) -> None:
        """One broken labelled Secret is left out (and said why), the others still count."""
        a = authority("a")
        good = parse_secret(secret_doc("good", labelled=True, bundle=a.cert_pem().decode()))
        bad = parse_secret(secret_doc("bad", labelled=True, **{"ca.crt": "garbage"}))
        pem, problems = pool_bundle([bad, good])
        self.assertEqual(subjects(pem), {subject(a)})
        self.assertEqual(len(problems), 1)
        self.assertIn(f"CA Secret {INSTALL_NS}/bad", problems[0])
        self.assertEqual(pool_bundle([]), (None, []))

    def test_read_once_per_secret_version(self) -> None:
        """Same Secret objects: the same bundle, not parsed again; a new object (an update): read again."""
        a = authority("a")
        first = parse_secret(secret_doc("g", labelled=True, **{"ca.crt": a.cert_pem().decode()}))
        pool = GlobalCAPool()
        pem = pool.bundle((first,))
        self.assertIs(pool.bundle((first,)), pem)
        again = parse_secret(secret_doc("g", labelled=True, **{"ca.crt": a.cert_pem().decode()}))
        other = pool.bundle((again,))
        self.assertEqual(other, pem)
        self.assertIsNot(other, pem)
        self.assertIsNone(pool.bundle(()))


class FakeAgent:
    """What L{RecordingAgents} hands out: an agent that only says what it trusts."""

    def __init__(self, ca_pem: bytes | None) -> None:
        self.ca_pem = ca_pem


class RecordingAgents:
    """L{Agents} as L{ConnectorAgents} uses it: counts the agents asked for."""

    def __init__(self) -> None:
        self.asked = 0

    def agent(self, ca_pem: bytes | None = None, cert_pem: bytes | None = None,
              key_pem: bytes | None = None) -> FakeAgent:
        self.asked += 1
        return FakeAgent(ca_pem)


class PoolCompositionTests(SynchronousTestCase):
    """Which CA bundle a Connector's agents get, with the flag off and on."""

    def setUp(self) -> None:
        self.global_ca, self.own_ca, self.elsewhere = authority("global"), authority("own"), authority("elsewhere")
        self.docs: list[dict[str, Any]] = [
            connector_class("rest"),
            connector(NS, "plain", "rest", "https://tool.test"),
            connector(NS, "own", "rest", "https://tool.test", caCertSecretRef={"name": "own-ca"}),
            connector(NS, "odd", "rest", "https://tool.test", caCertSecretRef={"name": "odd-ca"}),
            connector(NS, "broken", "rest", "https://tool.test", caCertSecretRef={"name": "broken-ca"}),
            connector(NS, "missing", "rest", "https://tool.test", caCertSecretRef={"name": "gone"}),
            secret_doc("global-ca", labelled=True, **{"global.pem": self.global_ca.cert_pem().decode()}),
            secret_doc("unlabelled", **{"ca.crt": self.elsewhere.cert_pem().decode()}),
            secret_doc("labelled-elsewhere", namespace=NS, labelled=True,
                       **{"ca.crt": self.elsewhere.cert_pem().decode()}),
            secret_doc("own-ca", namespace=NS, **{"ca.crt": self.own_ca.cert_pem().decode()}),
            # Upstream reads any PEM value; before the flag only ca.crt, *.crt and *.pem were read.
            secret_doc("odd-ca", namespace=NS, root=self.own_ca.cert_pem().decode()),
            secret_doc("broken-ca", namespace=NS, **{"ca.crt": "garbage"}),
        ]

    def snapshot(self, flag: str | None) -> Snapshot:
        docs = self.docs + ([config_map(**{CUSTOM_CA_CERTS: flag})] if flag is not None else [])
        return Snapshot.of(parse_documents(manifests_text(docs), "<test>"))

    def ca_for(self, name: str, snapshot: Snapshot, agents: ConnectorAgents | None = None) -> bytes | None:
        """The CA bundle C{name}'s agents trust."""
        agents = agents or ConnectorAgents(cast(Agents, RecordingAgents()))
        connector_ = snapshot.connector(NS, name)
        assert connector_ is not None
        agent, foreign = cast(tuple[FakeAgent, FakeAgent], agents.for_connector(connector_, snapshot))
        # The agent for the address and the one for other origins trust the same.
        self.assertEqual(agent.ca_pem, foreign.ca_pem)
        return agent.ca_pem

    def test_flag_off_is_todays_behaviour(self) -> None:
        for flag in (None, "false"):
            snapshot = self.snapshot(flag)
            self.assertIsNone(self.ca_for("plain", snapshot))
            self.assertEqual(subjects(self.ca_for("own", snapshot)), {subject(self.own_ca)})
            e = self.assertRaises(ProxyError, self.ca_for, "odd", snapshot)
            self.assertEqual(e.status, 503)

    def test_flag_on(self) -> None:
        snapshot = self.snapshot("true")
        self.assertEqual(subjects(self.ca_for("plain", snapshot)), {subject(self.global_ca)})
        self.assertEqual(subjects(self.ca_for("own", snapshot)), {subject(self.global_ca), subject(self.own_ca)})
        self.assertEqual(subjects(self.ca_for("odd", snapshot)), {subject(self.global_ca), subject(self.own_ca)})

    def test_flag_on_own_secret_still_checked(self) -> None:
        """A missing or broken C{caCertSecretRef} is a 503 naming it, flag or not."""
        for flag in (None, "true"):
            snapshot = self.snapshot(flag)
            for name, ref in (("broken", "broken-ca"), ("missing", "gone")):
                e = self.assertRaises(ProxyError, self.ca_for, name, snapshot)
                self.assertEqual(e.status, 503)
                self.assertIn(f"{NS}/{ref}", str(e.message))

    def test_flip_is_not_cached(self) -> None:
        """The answer is cached per Secret objects and pool: a flip (or a new pool) is seen at once."""
        recording = RecordingAgents()
        agents = ConnectorAgents(cast(Agents, recording))
        off, on = self.snapshot(None), self.snapshot("true")
        self.assertIsNone(self.ca_for("plain", off, agents))
        self.assertEqual(subjects(self.ca_for("plain", on, agents)), {subject(self.global_ca)})
        asked = recording.asked
        self.assertEqual(subjects(self.ca_for("plain", on, agents)), {subject(self.global_ca)})
        self.assertIsNone(self.ca_for("plain", off, agents))
        self.assertEqual(recording.asked, asked)  # both answers from the cache
        self.docs.append(secret_doc("more", labelled=True, **{"ca.crt": self.elsewhere.cert_pem().decode()}))
        self.assertEqual(subjects(self.ca_for("plain", self.snapshot("true"), agents)),
                         {subject(self.global_ca), subject(self.elsewhere)})


# -- status ---------------------------------------------------------------------------


def raw_connector(ca_ref: str | None = None, status: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if ca_ref is not None:
        spec["caCertSecretRef"] = {"name": ca_ref}
    doc = connector(NS, "tool", "rest", "https://tool.test", **spec)
    doc["metadata"].update(uid="uid-tool", generation=1)
    if status is not None:
        doc["status"] = status
    return doc


def conditions(status: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (status or {}).get("conditions") or []}


class StatusTests(SynchronousTestCase):
    """C{CACertReady}: C{Info}, outside C{Ready}, written only with the flag."""

    def setUp(self) -> None:
        self.cls = parse_connector_class(connector_class("rest"))
        ca = authority("own")
        self.secrets = {s.ref: s for s in (
            parse_secret(secret_doc("good", namespace=NS, root=ca.cert_pem().decode())),
            parse_secret(secret_doc("junk", namespace=NS, **{"ca.crt": "not a certificate"})),
            parse_secret(secret_doc("empty", namespace=NS, token="abc")),
        )}

    def world(self, on: bool, invalid: Mapping[ObjectRef, str] | None = None) -> World:
        return World(classes={"rest": self.cls}, secrets=self.secrets, invalid_secrets=invalid or {},
                     custom_ca_certs=on)

    def status(self, raw: dict[str, Any], world: World) -> dict[str, Any] | None:
        decision = decide(raw, parse_connector(raw), world, None, T0)
        return decision.status

    def test_flag_off_writes_none(self) -> None:
        status = self.status(raw_connector("junk"), self.world(False))
        self.assertNotIn(CA_CERT_READY, conditions(status))

    def test_reasons(self) -> None:
        cases = [(None, "True", "NoCACert"), ("good", "True", "Valid"), ("gone", "False", "SecretNotFound"),
                 ("junk", "False", "InvalidPEM"), ("empty", "False", "InvalidPEM")]
        for ref, status_, reason in cases:
            cond = conditions(self.status(raw_connector(ref), self.world(True)))[CA_CERT_READY]
            self.assertEqual((cond["status"], cond["reason"], cond["severity"]), (status_, reason, "Info"), ref)
            if ref is not None:
                self.assertIn(f"{NS}/{ref}", cond["message"])
        # A Secret the watch could not parse (bad base64, say) is InvalidPEM too.
        invalid = {ObjectRef(NS, "bad"): "data.ca.crt: is not valid base64"}
        cond = conditions(self.status(raw_connector("bad"), self.world(True, invalid)))[CA_CERT_READY]
        self.assertEqual((cond["status"], cond["reason"]), ("False", "InvalidPEM"))

    def test_outside_ready(self) -> None:
        """A False C{CACertReady} does not make the Connector unready (it is Info)."""
        status = self.status(raw_connector("gone"), self.world(True))
        self.assertEqual(conditions(status)[READY]["status"], "True")
        # ...and written once, it stays out of Ready on the next pass, and needs no write.
        raw = raw_connector("gone", status=copy.deepcopy(status))
        decision = decide(raw, parse_connector(raw), self.world(True), None, format_time(1_700_000_100))
        self.assertIsNone(decision.status)

    def test_others_kept_when_off(self) -> None:
        """Flag off: a C{CACertReady} the upstream controller wrote stays as it is."""
        theirs = {"type": CA_CERT_READY, "status": "False", "reason": "SecretNotFound", "message": "theirs",
                  "severity": "Info", "lastTransitionTime": T0}
        status = self.status(raw_connector("good", status={"conditions": [theirs]}), self.world(False))
        self.assertEqual(conditions(status)[CA_CERT_READY], theirs)
        self.assertEqual(conditions(status)[READY]["status"], "True")


# -- real TLS -------------------------------------------------------------------------


class Tool(Resource):
    """The HTTPS upstream: answers, and records the C{Authorization} it got."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.authorizations: list[bytes | None] = []

    def render_GET(self, request: Request) -> bytes:
        self.authorizations.append(request.getHeader(b"authorization"))
        return b"hello from the tool"


class TLSCase(TestCase):
    """A TLS upstream whose certificate comes from a private CA no platform trusts."""

    timeout = 60

    def setUp(self) -> None:
        self.private_ca = authority("private tools CA")
        self.token = "client-" + secrets.token_hex(12)
        self.password = "canary-" + secrets.token_hex(16)
        self.tool = Tool()
        leaf = self.private_ca.mint(["localhost"], time.time())
        site = Site(self.tool)
        site.noisy = False
        port = reactor.listenSSL(0, site, server_options(leaf), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        self.address = f"https://localhost:{port.getHost().port}"
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.seen: list[bytes] = []

    def objects(self) -> list[dict[str, Any]]:
        """The Connector (no caCertSecretRef), its credentials, and the private CA in a labelled Secret only."""
        return [
            connector_class("rest"),
            connector(NS, "tool", "rest", self.address, secret="creds"),
            basic_secret(NS, "creds", "robot", self.password),
            secret_doc("tools-ca", labelled=True, **{"tools.pem": self.private_ca.cert_pem().decode()}),
        ]

    async def get(self, url: str) -> tuple[int, str]:
        response = await treq.get(url + "/things", headers={"Authorization": f"Bearer {self.token}"},
                                  pool=self.pool)
        body = await treq.content(response)
        self.seen.append(body)
        return int(response.code), body.decode("utf-8", "replace")

    async def until(self, url: str, code: int, deadline: float, what: str) -> float:
        """Ask until the answer is C{code}; the seconds it took."""
        started = time.monotonic()
        while (await self.get(url))[0] != code:
            if time.monotonic() - started > deadline:
                raise AssertionError(f"not within {deadline} s: {what}")
            await deferLater(reactor, 0.02, lambda: None)
        return time.monotonic() - started

    def assert_untrusted(self, answer: tuple[int, str]) -> None:
        code, body = answer
        self.assertEqual(code, 502, body)
        self.assertIn("upstream certificate for localhost is not trusted", body)

    def assert_no_secret(self, logs: LogCapture) -> None:
        for seen in (*self.seen, logs.text().encode()):
            self.assertNotIn(self.password.encode(), seen)
        # The tool got the Connector's credentials, never the client's token.
        for authorization in self.tool.authorizations:
            self.assertIsNotNone(authorization)
            assert authorization is not None
            self.assertTrue(authorization.startswith(b"Basic "))
            self.assertNotIn(self.token.encode(), authorization)


class StandaloneTLSTests(TLSCase):
    def test_flag_in_manifests(self) -> Deferred[None]:
        """Without the flag 502 (not trusted); the ConfigMap added by a reload: 200; removed: 502 again."""

        async def go() -> None:
            proxy = await start_proxy(self, self.objects(), {self.token: sa(NS)})
            url = proxy.path_url(NS, "tool", "")
            self.assert_untrusted(await self.get(url))
            # The flag on, but the ConfigMap in another namespace: the labelled Secret is not in it.
            proxy.set_objects([*self.objects(), config_map(NS, **FLAG_ON)])
            self.assert_untrusted(await self.get(url))
            proxy.set_objects([*self.objects(), config_map(**FLAG_ON)])
            self.assertEqual(await self.get(url), (200, "hello from the tool"))
            proxy.set_objects([*self.objects(), config_map(**{CUSTOM_CA_CERTS: "false"})])
            self.assert_untrusted(await self.get(url))
            self.assertEqual(len(self.tool.authorizations), 1)
            self.assert_no_secret(proxy.logs)

        return Deferred.fromCoroutine(go())


PROXY_SA = f"system:serviceaccount:{INSTALL_NS}:connectors-proxy"


class ClusterModeTLSTests(TLSCase):
    """The fake API server: the flag flipped at run time; labelled Secrets from the watch; CACertReady written."""

    def test_flag_at_run_time(self) -> Deferred[None]:
        async def go() -> None:
            logs = capture_logs(self)
            fake, server = start_fake_kube(self, reactor, bookmark_interval=0.5)
            fake.apply(*({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}} for n in (NS, INSTALL_NS)))
            with open(os.path.join(ROOT, "k8s", "rbac.yaml")) as f:
                fake.apply(*[d for d in yaml.safe_load_all(f) if d and d["kind"] != "ServiceAccount"])
            proxy_token = secrets.token_hex(16)
            fake.add_token(proxy_token, PROXY_SA, groups=["system:serviceaccounts",
                                                          f"system:serviceaccounts:{INSTALL_NS}"])
            user = sa(NS)
            fake.add_token(self.token, user, uid="u1", groups=["system:serviceaccounts",
                                                               f"system:serviceaccounts:{NS}"])
            fake.allow(user=user, verbs=["get"], api_groups=["connectors.alauda.io"], resources=["connectors"],
                       namespace=NS)
            other_ca = authority("other")
            fake.apply(
                *self.objects(),
                # Neither of these may join the pool: labelled elsewhere, unlabelled here.
                secret_doc("team-ca", namespace=NS, labelled=True, **{"ca.crt": other_ca.cert_pem().decode()}),
                secret_doc("plain-ca", **{"ca.crt": other_ca.cert_pem().decode()}),
                # Connectors for the condition's other reasons.
                connector(NS, "own", "rest", "https://own.test", caCertSecretRef={"name": "own-ca"}),
                secret_doc("own-ca", namespace=NS, root=other_ca.cert_pem().decode()),
                connector(NS, "gone", "rest", "https://gone.test", caCertSecretRef={"name": "no-such-secret"}),
                connector(NS, "junk", "rest", "https://junk.test", caCertSecretRef={"name": "junk-ca"}),
                secret_doc("junk-ca", namespace=NS, **{"ca.crt": "not a certificate"}),
            )
            path = server.write_kubeconfig(self.mktemp() + ".kubeconfig", token=proxy_token, namespace=INSTALL_NS)
            mode = ClusterMode(reactor, load_kubeconfig(path), Store(), flags_namespace=INSTALL_NS)
            mode.startService()
            self.addCleanup(mode.stopService)
            await mode.synced()
            started = time.monotonic()
            while not mode.store.ready:
                self.assertLess(time.monotonic() - started, 10, "ready (watches and flags read)")
                await deferLater(reactor, 0.02, lambda: None)
            self.assertEqual([s.ref for s in mode.store.snapshot.ca_secrets], [ObjectRef(INSTALL_NS, "tools-ca")])
            url = serve_site(self, mode.store, mode.verifier) + f"/namespaces/{NS}/connectors/tool"

            def condition(name: str) -> dict[str, Any] | None:
                return conditions((fake.object("connectors", NS, name) or {}).get("status")).get(CA_CERT_READY)

            async def status_until(name: str, want: tuple[str, str] | None) -> None:
                started = time.monotonic()
                while True:
                    cond = condition(name)
                    if (None if cond is None else (cond["status"], cond["reason"])) == want:
                        return
                    self.assertLess(time.monotonic() - started, 10, f"{name}: CACertReady {want}, not {cond}")
                    await deferLater(reactor, 0.05, lambda: None)

            # Off: not trusted, and no CACertReady written.
            self.assert_untrusted(await self.get(url))
            await status_until("tool", None)
            self.assertEqual(conditions(fake.object("connectors", NS, "tool")["status"])[READY]["status"], "True")

            fake.apply(config_map(**FLAG_ON))
            took_on = await self.until(url, 200, FLAG_DEADLINE, "flag on -> 200")
            self.assertEqual(await self.get(url), (200, "hello from the tool"))
            for name, want in (("tool", ("True", "NoCACert")), ("own", ("True", "Valid")),
                               ("gone", ("False", "SecretNotFound")), ("junk", ("False", "InvalidPEM"))):
                await status_until(name, want)
                cond = condition(name)
                assert cond is not None
                self.assertEqual(cond["severity"], "Info")
                # Info: never what makes a Connector unready.
                self.assertEqual(conditions(fake.object("connectors", NS, name)["status"])[READY]["status"], "True")
            # The CA Secret mended: the condition follows (the watch of Secrets, not a resync).
            fake.apply(secret_doc("junk-ca", namespace=NS, **{"ca.crt": other_ca.cert_pem().decode()}))
            await status_until("junk", ("True", "Valid"))
            # The labelled Secret gone: not trusted again, flag or not.
            fake.remove("secrets", INSTALL_NS, "tools-ca")
            await self.until(url, 502, FLAG_DEADLINE, "labelled Secret removed -> 502")
            fake.apply(self.objects()[-1])
            await self.until(url, 200, FLAG_DEADLINE, "labelled Secret back -> 200")

            fake.remove("configmaps", INSTALL_NS, "connectors-config")
            took_off = await self.until(url, 502, FLAG_DEADLINE, "flag off -> 502")
            self.assert_untrusted(await self.get(url))
            self.assertLess(max(took_on, took_off), FLAG_DEADLINE)
            log.info("custom CA flag applied {on:.3f} s (on) and {off:.3f} s (off) after the change",
                     on=took_on, off=took_off)
            self.assert_no_secret(logs)

        return Deferred.fromCoroutine(go())

