"""
Loading the API server configuration (kubeconfig and in-cluster) with the
C{kubernetes} package into a frozen L{KubeConfig}, token files that rotate,
and the daemon's C{cluster_service} built from command-line options.
"""

from __future__ import annotations

import base64
import os
import secrets
import time
from typing import Any

import yaml
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from connectors_proxy.kube.cluster import ClusterMode, cluster_service
from connectors_proxy.kube.config import (
    KubeConfigError,
    TokenSource,
    load_in_cluster,
    load_kubeconfig,
)
from connectors_proxy.tls.mint import CertificateAuthority


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class KubeconfigTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.ca = CertificateAuthority.generate("kube CA", time.time())
        self.client = self.ca.mint([], time.time(), client=True, common_name="admin")

    def write(self, user: dict[str, Any], cluster: dict[str, Any] | None = None,
              namespace: str | None = "team") -> str:
        context: dict[str, Any] = {"cluster": "c", "user": "u"}
        if namespace:
            context["namespace"] = namespace
        doc = {"apiVersion": "v1", "kind": "Config", "current-context": "ctx",
               "clusters": [{"name": "c", "cluster": cluster or {
                   "server": "https://127.0.0.1:6443/",
                   "certificate-authority-data": b64(self.ca.cert_pem())}}],
               "users": [{"name": "u", "user": user}],
               "contexts": [{"name": "ctx", "context": context}]}
        path = os.path.join(self.dir, "config")
        with open(path, "w") as f:
            yaml.safe_dump(doc, f)
        return path

    def test_token_and_ca(self) -> None:
        token = secrets.token_hex(16)
        config = load_kubeconfig(self.write({"token": token}))
        self.assertEqual(config.server, "https://127.0.0.1:6443")
        self.assertEqual(config.ca_pem, self.ca.cert_pem())
        self.assertEqual(config.authorization, "Bearer " + token)
        self.assertIsNone(config.token_file)
        self.assertEqual(config.namespace, "team")
        self.assertFalse(config.insecure)
        self.assertNotIn(token, repr(config))

    def test_client_certificate(self) -> None:
        config = load_kubeconfig(self.write({
            "client-certificate-data": b64(self.client.cert_pem()),
            "client-key-data": b64(self.client.key_pem())}))
        self.assertEqual(config.client_cert_pem, self.client.cert_pem())
        self.assertEqual(config.client_key_pem, self.client.key_pem())
        self.assertIsNone(config.authorization)
        self.assertNotIn("PRIVATE", repr(config))

    def test_token_file_is_followed(self) -> None:
        with open(os.path.join(self.dir, "token"), "w") as f:
            f.write("first\n")
        config = load_kubeconfig(self.write({"tokenFile": "token"}))
        self.assertEqual(config.token_file, os.path.join(os.path.abspath(self.dir), "token"))
        clock = Clock()
        source = TokenSource(config, clock, refresh=60)
        self.assertEqual(source.authorization(), "Bearer first")
        with open(os.path.join(self.dir, "token"), "w") as f:
            f.write("second")
        clock.advance(59)
        self.assertEqual(source.authorization(), "Bearer first")
        clock.advance(1)
        self.assertEqual(source.authorization(), "Bearer second")
        # A file caught mid-rotation (empty, or gone) keeps the last good token.
        os.remove(os.path.join(self.dir, "token"))
        clock.advance(60)
        self.assertEqual(source.authorization(), "Bearer second")
        with open(os.path.join(self.dir, "token"), "w") as f:
            f.write("third")
        source.invalidate()
        self.assertEqual(source.authorization(), "Bearer third")

    def test_insecure_and_server_name(self) -> None:
        config = load_kubeconfig(self.write({"token": "t"}, cluster={
            "server": "https://10.0.0.1:443", "insecure-skip-tls-verify": True,
            "tls-server-name": "kubernetes.default"}))
        self.assertTrue(config.insecure)
        self.assertEqual(config.tls_server_name, "kubernetes.default")

    def test_errors_are_one_line(self) -> None:
        missing = os.path.join(self.dir, "nope")
        e = self.assertRaises(KubeConfigError, load_kubeconfig, missing)
        self.assertIn(missing, str(e))
        self.assertNotIn("\n", str(e))
        with open(os.path.join(self.dir, "bad"), "w") as f:
            f.write("apiVersion: v1\nkind: Config\ncontexts: []\n")
        e = self.assertRaises(KubeConfigError, load_kubeconfig, os.path.join(self.dir, "bad"))
        self.assertNotIn("\n", str(e))


class InClusterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.ca = CertificateAuthority.generate("kube CA", time.time())
        self.paths = {name: os.path.join(self.dir, name) for name in ("token", "ca.crt", "namespace")}
        with open(self.paths["token"], "w") as f:
            f.write("sa-token")
        with open(self.paths["ca.crt"], "wb") as f:
            f.write(self.ca.cert_pem())
        with open(self.paths["namespace"], "w") as f:
            f.write("connectors-system\n")

    def load(self, environ: dict[str, str]) -> Any:
        return load_in_cluster(self.paths["token"], self.paths["ca.crt"], self.paths["namespace"],
                               environ=environ)

    def test_in_cluster(self) -> None:
        config = self.load({"KUBERNETES_SERVICE_HOST": "10.96.0.1",
                            "KUBERNETES_SERVICE_PORT": "443"})
        self.assertEqual(config.server, "https://10.96.0.1:443")
        self.assertEqual(config.ca_pem, self.ca.cert_pem())
        self.assertEqual(config.token_file, self.paths["token"])
        self.assertEqual(config.namespace, "connectors-system")
        source = TokenSource(config, Clock())
        self.assertEqual(source.authorization(), "Bearer sa-token")

    def test_ipv6_host(self) -> None:
        config = self.load({"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"})
        self.assertEqual(config.server, "https://[fd00::1]:443")

    def test_not_in_a_pod(self) -> None:
        e = self.assertRaises(KubeConfigError, self.load, {})
        self.assertIn("in-cluster", str(e))


class ClusterServiceTests(SynchronousTestCase):
    def options(self, **kw: Any) -> dict[str, Any]:
        folder = self.mktemp()
        os.makedirs(folder)
        path = os.path.join(folder, "config")
        with open(path, "w") as f:
            yaml.safe_dump({"apiVersion": "v1", "kind": "Config", "current-context": "x",
                            "clusters": [{"name": "x", "cluster": {"server": "http://127.0.0.1:1"}}],
                            "users": [{"name": "x", "user": {"token": "t"}}],
                            "contexts": [{"name": "x", "context": {"cluster": "x", "user": "x",
                                                                   "namespace": "ops"}}]}, f)
        base = {"kubeconfig": path, "in-cluster": False, "cluster-domain": "corp.local",
                "leader-elect": False, "review-cache-seconds": 10.0, "token-audience": None,
                "lease-namespace": None, "listen": ["tcp:8080"]}
        base.update(kw)
        return base

    def test_from_options(self) -> None:
        mode = cluster_service(self.options(**{"leader-elect": True, "review-cache-seconds": 3.0,
                                               "token-audience": "a, b",
                                               "listen": ["tcp:8080", "ssl:8443:privateKey=k"]}),
                               Clock())
        self.assertIsInstance(mode, ClusterMode)
        self.assertEqual(mode.inventory.cluster_domain, "corp.local")
        self.assertTrue(mode.inventory.serve_tls)
        self.assertEqual(mode.verifier.audiences, ("a", "b"))
        self.assertEqual(mode.verifier.ttl, 3.0)
        assert mode.elector is not None
        self.assertEqual(mode.elector.namespace, "ops")
        self.assertFalse(mode.store.ready)

    def test_zero_seconds_are_kept(self) -> None:
        """C{--review-cache-seconds 0} turns the cache off; it is not replaced by the default."""
        mode = cluster_service(self.options(**{"review-cache-seconds": 0.0, "review-stale-seconds": 0.0}), Clock())
        self.assertEqual((mode.verifier.ttl, mode.verifier.stale), (0.0, 0.0))
        mode = cluster_service(self.options(), Clock())
        self.assertEqual((mode.verifier.ttl, mode.verifier.stale), (10.0, 300.0))

    def test_plain_listeners_no_tls_port(self) -> None:
        mode = cluster_service(self.options(), Clock())
        self.assertFalse(mode.inventory.serve_tls)
        self.assertIsNone(mode.elector)

    def test_bad_kubeconfig_raises_naming_the_file(self) -> None:
        """
        C{cluster_service} raises; the daemon (C{tap.make_service}) turns
        that into one line and exit status 2.
        """
        error = self.assertRaises(KubeConfigError, cluster_service,
                                  self.options(kubeconfig="/nonexistent/config"), Clock())
        self.assertIn("/nonexistent/config", str(error))

    def test_bad_kubeconfig_exits_with_one_line(self) -> None:
        import io
        import sys

        from connectors_proxy.tap import Options, make_service
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        options = Options()
        options.parseOptions(["--kubeconfig", "/nonexistent/config"])
        exit_ = self.assertRaises(SystemExit, make_service, options, MemoryReactorClock())
        self.assertEqual(exit_.code, 2)
        self.assertEqual(len(err.getvalue().strip().splitlines()), 1)
        self.assertIn("/nonexistent/config", err.getvalue())
