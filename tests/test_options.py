"""
The daemon's command line where it meets upstream's: the flags of the
upstream connectors-proxy Deployment (C{--metrics-bind-address=:8443},
C{-kube-api-qps=60}, C{-kube-api-burst=80}, Go style with one dash) and
C{--reconcile all|none}, parsed and wired to the cluster mode they mean.
"""

from __future__ import annotations

import io
from contextlib import redirect_stderr

import yaml
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from connectors_proxy import tap
from connectors_proxy.kube.cluster import ClusterMode, cluster_service


def parse(*argv: str) -> tap.Options:
    options = tap.Options()
    options.parseOptions(list(argv))
    return options


class GoStyleFlagTests(SynchronousTestCase):
    LONG = ["kube-api-qps=", "kube-api-burst=", "metrics-bind-address=", "in-cluster", "reconcile="]

    def test_single_dash_long_options_become_double(self) -> None:
        self.assertEqual(tap.go_style_flags(["-kube-api-qps=60", "-kube-api-burst", "80", "-in-cluster",
                                             "--reconcile=none", "-metrics-bind-address=:8443"], self.LONG),
                         ["--kube-api-qps=60", "--kube-api-burst", "80", "--in-cluster", "--reconcile=none",
                          "--metrics-bind-address=:8443"])

    def test_other_arguments_are_kept(self) -> None:
        """Unknown names, short options, values and everything after -- are not touched."""
        argv = ["-x", "-unknown=1", "-", "60", "--", "-kube-api-qps=1"]
        self.assertEqual(tap.go_style_flags(argv, self.LONG), argv)


class AdminEndpointTests(SynchronousTestCase):
    def test_go_listen_addresses(self) -> None:
        self.assertEqual(tap.admin_endpoint(":8443"), "tcp:8443")
        self.assertEqual(tap.admin_endpoint("127.0.0.1:9443"), "tcp:9443:interface=127.0.0.1")
        self.assertEqual(tap.admin_endpoint("[::1]:8443"), "tcp6:8443:interface=\\:\\:1")

    def test_bad_addresses(self) -> None:
        for bad in ("8443", ":", ":http", ":70000", "::1:8443", "a=b:1"):
            self.assertRaises(usage.UsageError, tap.admin_endpoint, bad)


class UpstreamDeploymentFlagTests(SynchronousTestCase):
    def test_the_upstream_deployment_args(self) -> None:
        """The three documented flags of the upstream Deployment, exactly as it writes them."""
        options = parse("--in-cluster", "--metrics-bind-address=:8443", "-kube-api-qps=60", "-kube-api-burst=80")
        self.assertEqual((options["admin"], options["kube-api-qps"], options["kube-api-burst"]),
                         ("tcp:8443", 60.0, 80.0))
        self.assertEqual(options["mode"], "cluster")
        self.assertEqual(options["reconcile"], "all")

    def test_double_dash_and_space_forms(self) -> None:
        options = parse("--in-cluster", "--kube-api-qps", "5", "-kube-api-burst", "7",
                        "--metrics-bind-address", "127.0.0.1:8443")
        self.assertEqual((options["admin"], options["kube-api-qps"], options["kube-api-burst"]),
                         ("tcp:8443:interface=127.0.0.1", 5.0, 7.0))

    def test_metrics_bind_address_zero_keeps_the_default(self) -> None:
        self.assertEqual(parse("--in-cluster", "--metrics-bind-address=0")["admin"], tap.DEFAULT_ADMIN)

    def test_defaults(self) -> None:
        options = parse("--in-cluster")
        self.assertEqual((options["admin"], options["kube-api-qps"], options["kube-api-burst"], options["reconcile"]),
                         (tap.DEFAULT_ADMIN, None, None, "all"))

    def refused(self, *argv: str) -> str:
        err = io.StringIO()
        with redirect_stderr(err), self.assertRaises(SystemExit) as exit:
            parse(*argv)
        self.assertEqual(exit.exception.code, 2)
        self.assertEqual(len(err.getvalue().splitlines()), 1, err.getvalue())
        return err.getvalue()

    def test_errors_are_one_line(self) -> None:
        self.assertIn("--kube-api-qps must be a number", self.refused("--in-cluster", "-kube-api-qps=fast"))
        self.assertIn("--kube-api-burst must be positive", self.refused("--in-cluster", "-kube-api-burst=0"))
        self.assertIn("both name the admin listener",
                      self.refused("--in-cluster", "--admin=tcp:1", "--metrics-bind-address=:2"))
        self.assertIn("[HOST]:PORT", self.refused("--in-cluster", "--metrics-bind-address=8443"))
        self.assertIn("--reconcile must be all or none", self.refused("--in-cluster", "--reconcile=some"))
        self.assertIn("is for cluster mode", self.refused("--reconcile=none"))
        self.assertIn("give one", self.refused("--in-cluster", "--leader-elect", "--reconcile=none"))


class ClusterWiringTests(SynchronousTestCase):
    def kubeconfig(self) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            yaml.safe_dump({
                "apiVersion": "v1", "kind": "Config", "current-context": "c",
                "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:1"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u", "namespace": "connectors-system"}}],
            }, f)
        return path

    def mode(self, *argv: str) -> ClusterMode:
        options = parse("--kubeconfig", self.kubeconfig(), *argv)
        mode = cluster_service(options, MemoryReactorClock())
        self.assertIsInstance(mode, ClusterMode)
        return mode

    def test_qps_and_burst_reach_the_write_limiter(self) -> None:
        mode = self.mode("-kube-api-qps=60", "-kube-api-burst=80")
        assert mode.writer is not None
        self.assertEqual((mode.writer.qps, mode.writer.burst), (60.0, 80.0))

    def test_default_rate(self) -> None:
        writer = self.mode().writer
        assert writer is not None
        self.assertEqual((writer.qps, writer.burst), (100.0, 200.0))
        writer = self.mode("-kube-api-qps=10").writer
        assert writer is not None
        self.assertEqual((writer.qps, writer.burst), (10.0, 20.0))

    def test_reconcile_none_has_no_writer_and_no_election(self) -> None:
        mode = self.mode("--reconcile=none")
        self.assertIsNone(mode.writer)
        self.assertIsNone(mode.elector)
        self.assertTrue(mode.is_leader)

    def test_reconcile_all_with_election(self) -> None:
        mode = self.mode("--leader-elect")
        self.assertIsNotNone(mode.writer)
        self.assertIsNotNone(mode.elector)
