"""
A real Kubernetes control plane for the cluster-mode tests (issue 16):
etcd, kube-apiserver and kube-controller-manager (garbage collection and
namespace deletion only), built from their Go modules by C{.ci/build-kube}
and started here on loopback.

One control plane serves a whole test run (L{shared_cluster}): starting it
costs tens of seconds on two cores, and every test works in namespaces of
its own.  It stops at interpreter exit (or when a test calls L{KubeAPI.stop}).

The API server runs with C{--authorization-mode=RBAC}; the only static
token is the harness's admin (group C{system:masters}).  The proxy under test
gets a kubeconfig with a TokenRequest token of the ServiceAccount that
C{k8s/rbac.yaml} binds, never the admin's, so the shipped RBAC is what
allows (or refuses) what it does.

Without the binaries the tests fail, pointing at C{.ci/build-kube}; they
skip only when no Go toolchain exists to build them (L{skip_reason}).
"""

from __future__ import annotations

import atexit
import base64
import datetime
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import threads
from twisted.internet.defer import Deferred

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "tests" / "kube" / "apiserver"
#: The version both this fixture and C{.ci/build-kube} read.
VERSION = (MODULE / "VERSION").read_text().strip()
CACHE = Path(os.environ.get("CONNECTORS_PROXY_CACHE", "/var/cache/connectors-proxy"))
BINARIES = CACHE / f"kube-{VERSION}"

#: The API server's own audience (and issuer) for ServiceAccount tokens.
API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
PROXY_NAMESPACE = "connectors-system"
PROXY_SA = "connectors-proxy"
ADMIN_USER = "test-admin"

#: What the API server records: every write the proxy can make.  Tests read
#: it to tell which credential wrote what (leader election: no write from a
#: non-holder lands).  C{user.extra["authentication.kubernetes.io/credential-id"]}
#: names the token (its JTI), so two daemons of one ServiceAccount differ.
AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  verbs: [create, update, patch, delete]
  resources:
  - {group: "", resources: [services]}
  - {group: connectors.alauda.io, resources: [connectors/status]}
  - {group: coordination.k8s.io, resources: [leases]}
- level: None
"""


def go_toolchain() -> str | None:
    return shutil.which("go") or next((p for p in ("/usr/local/go/bin/go",) if os.path.exists(p)), None)


def skip_reason() -> str | None:
    """
    Why the real-apiserver tests cannot run here, or C{None} when they can
    (or must: Go is present, so missing binaries are a failure of set-up,
    reported by L{KubeAPI.start}, not a skip).
    """
    if all((BINARIES / b).exists() for b in ("etcd", "kube-apiserver", "kube-controller-manager")):
        return None
    if go_toolchain() is None:
        return (f"no Go toolchain to build kube-apiserver {VERSION} (.ci/build-kube): "
                "real-apiserver tests skipped")
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- keys and certificates ------------------------------------------------------

def _key() -> ec.EllipticCurvePrivateKey:
    # P-256: quick to generate, accepted for serving and for signing SA tokens (ES256).
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificates() -> tuple[bytes, bytes, bytes]:
    """A CA and a serving certificate for 127.0.0.1: (CA PEM, cert PEM, key PEM)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "connectors-proxy test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = _key()
    names = [x509.DNSName(n) for n in ("localhost", "kubernetes", "kubernetes.default",
                                       "kubernetes.default.svc", "kubernetes.default.svc.cluster.local")]
    ips = [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "10.96.0.1")]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(names + ips), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return (ca.public_bytes(serialization.Encoding.PEM), cert.public_bytes(serialization.Encoding.PEM),
            _pem_key(key))


# --- processes -------------------------------------------------------------------

class _Process:
    """One control-plane process, in a session of its own so it is stopped whole."""

    def __init__(self, name: str, argv: list[str], log_dir: Path) -> None:
        self.name, self.argv = name, argv
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.process.returncode}:\n{self.tail()}")

    def tail(self, size: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-size:].decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


class KubeAPI:
    """
    etcd + kube-apiserver + kube-controller-manager on loopback, with the
    manifests of C{k8s/} applied.

    @ivar url: the API server's C{https://127.0.0.1:PORT}.
    @ivar ca_pem: the CA that signed its serving certificate.
    @ivar admin_token: the harness's static admin token (C{system:masters}).
    @ivar proxy_kubeconfig: a kubeconfig for the proxy's ServiceAccount.
    @ivar etcd_url: etcd's client URL (plain HTTP on loopback).
    """

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="kubeapi-"))
        self.etcd_port, self.peer_port, self.port = free_port(), free_port(), free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.etcd_url = f"http://127.0.0.1:{self.etcd_port}"
        self.admin_token = secrets.token_hex(24)
        self.ca_pem, cert, key = _certificates()
        self._write("ca.crt", self.ca_pem)
        self._write("apiserver.crt", cert)
        self._write("apiserver.key", key, private=True)
        sa_key = _key()
        self._write("sa.key", _pem_key(sa_key), private=True)
        self._write("sa.pub", sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        # kube-apiserver's static token file: token,user,uid,"groups"
        self._write("tokens.csv", f'{self.admin_token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n'.encode(),
                    private=True)
        self.admin_kubeconfig = self.write_kubeconfig(str(self.dir / "admin.kubeconfig"), self.admin_token)
        self._write("audit-policy.yaml", AUDIT_POLICY.encode())
        self.audit_log = self.dir / "audit.log"
        self.proxy_kubeconfig = ""
        self.proxy_token = ""
        self._ssl = ssl.create_default_context(cadata=self.ca_pem.decode())
        self.etcd = _Process("etcd", [
            str(BINARIES / "etcd"), "--name", "test", "--data-dir", str(self.dir / "etcd"),
            "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
            "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port}",
            "--initial-cluster", f"test=http://127.0.0.1:{self.peer_port}",
            # A test cluster's data is thrown away: fsync only costs time.
            "--unsafe-no-fsync", "--log-level", "warn",
        ], self.dir)
        self.apiserver = _Process("kube-apiserver", [
            str(BINARIES / "kube-apiserver"),
            "--etcd-servers", self.etcd_url,
            "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
            "--secure-port", str(self.port),
            "--tls-cert-file", str(self.dir / "apiserver.crt"),
            "--tls-private-key-file", str(self.dir / "apiserver.key"),
            "--token-auth-file", str(self.dir / "tokens.csv"),
            "--authorization-mode", "RBAC",
            "--service-account-issuer", API_AUDIENCE,
            "--api-audiences", API_AUDIENCE,
            "--service-account-key-file", str(self.dir / "sa.pub"),
            "--service-account-signing-key-file", str(self.dir / "sa.key"),
            "--service-cluster-ip-range", "10.96.0.0/16",
            "--audit-policy-file", str(self.dir / "audit-policy.yaml"),
            "--audit-log-path", str(self.audit_log), "--audit-log-format", "json",
            "--audit-log-mode", "blocking",
            "--profiling=false", "--v=1",
        ], self.dir)
        self.controller_manager = _Process("kube-controller-manager", [
            str(BINARIES / "kube-controller-manager"),
            "--kubeconfig", self.admin_kubeconfig,
            # Only what the tests rely on: owner-reference GC and the
            # deletion of the namespaces tests create.
            "--controllers", "garbagecollector,namespace",
            "--leader-elect=false", "--secure-port=0", "--v=1",
        ], self.dir)
        self.processes = [self.etcd, self.apiserver, self.controller_manager]

    def _write(self, name: str, data: bytes, private: bool = False) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        if private:
            path.chmod(0o600)
        return path

    # -- kubeconfigs ------------------------------------------------------------

    def write_kubeconfig(self, path: str, token: str, namespace: str = "default") -> str:
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {
                "server": self.url, "certificate-authority-data": base64.b64encode(self.ca_pem).decode()}}],
            "users": [{"name": "test", "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test",
                                                       "namespace": namespace}}],
        }
        with open(path, "w") as f:
            yaml.safe_dump(config, f)
        os.chmod(path, 0o600)
        return path

    # -- a blocking admin client (set-up only; tests use their own) -----------------

    def request(self, method: str, path: str, body: Any = None, token: str | None = None,
                content_type: str = "application/json", timeout: float = 10.0) -> tuple[int, Any]:
        """C{(code, parsed JSON body)} of one call as the admin (or C{token})."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {token or self.admin_token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, context=self._ssl, timeout=timeout) as response:
                code, raw = response.status, response.read()
        except urllib.error.HTTPError as e:
            code, raw = e.code, e.read()
        try:
            return code, json.loads(raw) if raw else None
        except ValueError:
            return code, raw.decode("utf-8", "replace")

    def token_request(self, namespace: str, name: str, audiences: list[str] | None = None,
                      seconds: int = 3600) -> str:
        """A TokenRequest token for ServiceAccount C{namespace/name} (created if missing)."""
        code, body = self.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts",
                                  {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}})
        if code not in (201, 409):
            raise AssertionError(f"creating ServiceAccount {namespace}/{name}: {code} {body}")
        spec: dict[str, Any] = {"expirationSeconds": seconds}
        if audiences is not None:
            spec["audiences"] = audiences
        code, body = self.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
                                  {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec})
        if code != 201:
            raise AssertionError(f"TokenRequest for {namespace}/{name}: {code} {body}")
        return str(body["status"]["token"])

    # -- life cycle -------------------------------------------------------------------

    def _wait(self, what: str, ready: Any, process: _Process, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            process.check()
            try:
                if ready():
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not ready in {timeout:.0f}s:\n{process.tail()}")
            time.sleep(0.2)

    def _etcd_ready(self) -> bool:
        with urllib.request.urlopen(self.etcd_url + "/health", timeout=2) as r:
            return bool(json.loads(r.read()).get("health") == "true")

    def _apiserver_ready(self) -> bool:
        code, _ = self.request("GET", "/readyz", timeout=3)
        return code == 200

    def start_apiserver(self, timeout: float = 180.0) -> None:
        self.apiserver.start()
        self._wait("kube-apiserver", self._apiserver_ready, self.apiserver, timeout)

    def stop_apiserver(self) -> None:
        self.apiserver.stop()

    def restart_apiserver(self) -> None:
        self.stop_apiserver()
        self.start_apiserver()

    def start(self) -> None:
        """Start everything and apply C{k8s/} (blocking: run it in a thread)."""
        missing = [b for b in ("etcd", "kube-apiserver", "kube-controller-manager") if not (BINARIES / b).exists()]
        if missing:
            raise AssertionError(f"{', '.join(missing)} not built in {BINARIES}: run .ci/build-kube (or .ci/setup)")
        started = time.monotonic()
        self.etcd.start()
        self._wait("etcd", self._etcd_ready, self.etcd, 60)
        self.start_apiserver()
        self.apply_manifests()
        self.controller_manager.start()
        self.proxy_token = self.token_request(PROXY_NAMESPACE, PROXY_SA, seconds=24 * 3600)
        self.proxy_kubeconfig = self.write_kubeconfig(str(self.dir / "proxy.kubeconfig"), self.proxy_token,
                                                      PROXY_NAMESPACE)
        # A CRD's storage answers 429 "storage is (re)initializing" for a
        # moment after it is established: let that pass before tests start.
        self._wait("the proxy's view of Connectors",
                   lambda: self.request("GET", "/apis/connectors.alauda.io/v1alpha1/connectors",
                                        token=self.proxy_token)[0] == 200, self.apiserver, 60)
        self.started_in = time.monotonic() - started

    def apply_manifests(self, timeout: float = 60.0) -> None:
        """
        C{kubectl apply -k k8s/} (or, without kubectl, the same documents
        created one by one), again until the CRDs' own objects go in too.
        """
        kubectl = shutil.which("kubectl") or ("/usr/bin/kubectl" if os.path.exists("/usr/bin/kubectl") else None)
        deadline = time.monotonic() + timeout
        while True:
            if kubectl:
                result = subprocess.run([kubectl, "--kubeconfig", self.admin_kubeconfig, "apply", "-k",
                                         str(ROOT / "k8s")], capture_output=True, timeout=120)
                error = result.stderr.decode()[-3000:] if result.returncode else ""
            else:
                error = self._create_manifests()
            if not error:
                return
            # The first apply can race the CRDs becoming established.
            if time.monotonic() > deadline:
                raise AssertionError(f"applying k8s/ failed:\n{error}")
            time.sleep(1)

    #: kind -> (API path prefix, plural, namespaced) for what k8s/ holds.
    KINDS = {
        "Namespace": ("/api/v1", "namespaces", False),
        "ServiceAccount": ("/api/v1", "serviceaccounts", True),
        "Service": ("/api/v1", "services", True),
        "Deployment": ("/apis/apps/v1", "deployments", True),
        "PodDisruptionBudget": ("/apis/policy/v1", "poddisruptionbudgets", True),
        "ClusterRole": ("/apis/rbac.authorization.k8s.io/v1", "clusterroles", False),
        "ClusterRoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "clusterrolebindings", False),
        "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles", True),
        "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings", True),
        "CustomResourceDefinition": ("/apis/apiextensions.k8s.io/v1", "customresourcedefinitions", False),
        "ConnectorClass": ("/apis/connectors.alauda.io/v1alpha1", "connectorclasses", False),
    }

    def _create_manifests(self) -> str:
        """Create the documents C{k8s/kustomization.yaml} lists; the first error, or C{""}."""
        kustomization = yaml.safe_load((ROOT / "k8s" / "kustomization.yaml").read_text())
        for name in kustomization["resources"]:
            for doc in yaml.safe_load_all((ROOT / "k8s" / name).read_text()):
                if not doc:
                    continue
                if doc["kind"] not in self.KINDS:
                    return f"{name}: no API path known here for kind {doc['kind']} (add it to KubeAPI.KINDS)"
                prefix, plural, namespaced = self.KINDS[doc["kind"]]
                ns = doc["metadata"].get("namespace", "default")
                path = f"{prefix}/namespaces/{ns}/{plural}" if namespaced else f"{prefix}/{plural}"
                code, body = self.request("POST", path, doc)
                if code not in (201, 409):
                    return f"{doc['kind']} {doc['metadata']['name']}: {code} {body}"
        return ""

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def audit_events(self) -> list[dict[str, Any]]:
        """The audit log so far (C{ResponseComplete} events of writes)."""
        try:
            text = self.audit_log.read_text()
        except OSError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    # -- etcd ---------------------------------------------------------------------------

    def etcd_call(self, path: str, body: dict[str, Any]) -> Any:
        """One call to etcd's JSON gateway (C{/v3/...})."""
        req = urllib.request.Request(self.etcd_url + path, data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def compact(self) -> int:
        """Compact etcd's history up to its current revision; the revision."""
        revision = int(self.etcd_call("/v3/kv/range", {"key": base64.b64encode(b"/").decode()})
                       ["header"]["revision"])
        self.etcd_call("/v3/kv/compaction", {"revision": str(revision), "physical": True})
        return revision


async def settle(port: int, timeout: float = 5.0) -> None:
    """
    Wait until this process has no connection left to loopback C{port}
    (a test cleanup): TLS connections to the API server close after a
    round trip, which trial would otherwise report as a dirty reactor.
    Stragglers past C{timeout} are aborted.
    """
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    def open_to_port() -> list[Any]:
        found = []
        for selectable in set(reactor.getReaders()) | set(reactor.getWriters()):
            try:
                peer = selectable.getPeer()
            except Exception:  # noqa: BLE001 - listening ports, wakers: not connections
                continue
            if getattr(peer, "port", None) == port and getattr(peer, "host", None) == "127.0.0.1":
                found.append(selectable)
        return found
    deadline = time.monotonic() + timeout
    while (left := open_to_port()) and time.monotonic() < deadline:
        await deferLater(reactor, 0.02, lambda: None)
    for connection in open_to_port():
        connection.abortConnection()
    if left:
        await deferLater(reactor, 0, lambda: None)


_shared: KubeAPI | None = None
# Why the control plane could not start: every later test fails at once with
# it, instead of spending a minute each on the same failure.
_failed: BaseException | None = None
_lock = threading.Lock()


def _start_shared() -> KubeAPI:
    global _shared, _failed
    with _lock:
        if _failed is not None:
            raise AssertionError(f"the shared control plane failed to start earlier: {_failed}")
        if _shared is None:
            cluster = KubeAPI()
            try:
                cluster.start()
            except BaseException as e:
                cluster.stop()
                _failed = e
                raise
            _shared = cluster
            atexit.register(cluster.stop)
        elif not _shared.apiserver.running():
            # A test stopped it (outage tests) and failed before restarting.
            _shared.start_apiserver()
        return _shared


def shared_cluster() -> Deferred[KubeAPI]:
    """The control plane of this test run, started (in a thread) on first use."""
    return threads.deferToThread(_start_shared)
