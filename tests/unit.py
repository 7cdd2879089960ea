"""
The unit suite: the test modules that need no real component, for
C{tox -e unit} (C{python -m twisted.trial tests.unit}), in well under 30 s.

"Real component" means a program the test starts or drives: nginx,
docker-registry, git / git-http-backend, skopeo, podman, curl, openssl,
systemd-analyze, the C{twistd} daemon as a subprocess, a kube-apiserver.
Unit modules may use loopback sockets with the proxy and its upstreams
running in the test's own reactor (Twisted resources), and may run the
proxy's own command-line helpers (C{python -m connectors_proxy.clientconfig}).

Every C{tests/test_*.py} is listed in exactly one of L{UNIT} and
L{INTEGRATION} (C{tests.test_layout} checks it), so a new module cannot be
left out of both; a module with one test that needs a real component is
integration as a whole.
"""

from __future__ import annotations

from twisted.trial.runner import TestLoader
from twisted.trial.unittest import TestSuite

UNIT = (
    "tests.test_compat",
    "tests.test_connect_memory",
    "tests.test_credentials",
    "tests.test_custom_ca",
    "tests.test_drain",
    "tests.test_fairness",
    "tests.test_git",
    "tests.test_git_resource",
    "tests.test_headers",
    "tests.test_kube_client",
    "tests.test_kube_config",
    "tests.test_kube_identity",
    "tests.test_kube_leader",
    "tests.test_kube_memory",
    "tests.test_kube_reconcile",
    "tests.test_kube_reflector",
    "tests.test_kube_writer",
    "tests.test_layout",
    "tests.test_limits",
    "tests.test_logformat",
    "tests.test_manifests",
    "tests.test_memory_protocols",
    "tests.test_memory_relay",
    "tests.test_memory_router",
    "tests.test_metrics",
    "tests.test_oci_auth",
    "tests.test_oci_clientconfig",
    "tests.test_oci_names",
    "tests.test_oci_protocol",
    "tests.test_oci_tokens",
    "tests.test_options",
    "tests.test_protocol_registry",
    "tests.test_reflection",
    "tests.test_routing",
    "tests.test_streaming",
    "tests.test_tls",
    "tests.test_tls_mint",
    "tests.test_upstream_client",
    "tests.test_upstream_client_hostile",
    "tests.test_upstream_framing",
)

# What each needs, besides the proxy itself.
INTEGRATION = (
    "tests.test_coexistence",  # twistd subprocess (upstream's Deployment flags)
    "tests.test_connect",  # curl, git, nginx, git-http-backend, twistd subprocess
    "tests.test_connect_clients",  # pip, pypiserver, skopeo, npm, mvn, kubectl, git, nginx, docker-registry, twistd
    "tests.test_clientconfig",  # pip, mvn, git, go
    "tests.test_client_packages",  # npm, verdaccio, mvn, unshare
    "tests.test_docs",  # runs the commands of docs/ pages
    "tests.test_upstream_compat",  # curl, git, kube-apiserver
    "tests.test_daemon",  # twistd subprocess, nginx
    "tests.test_drain_process",  # twistd subprocess, curl
    "tests.test_fakekube_contract",  # kube-apiserver (the same contract as the fake)
    "tests.test_faults",  # twistd subprocess
    "tests.test_git_clientconfig",  # git
    "tests.test_git_fixture",  # git, git-http-backend, nginx
    "tests.test_git_integration",  # git, git-http-backend, nginx
    "tests.test_hostile",  # nginx
    "tests.test_k8s_manifests",  # systemd-analyze
    "tests.test_kube_e2e",  # twistd subprocess
    "tests.test_kube_real",  # kube-apiserver, twistd subprocess
    "tests.test_lfs_leak",  # git, git-lfs
    "tests.test_metrics_process",  # twistd subprocess
    "tests.test_oci_fixtures",  # docker-registry, skopeo, podman
    "tests.test_oci_integration",  # docker-registry, skopeo, podman
    "tests.test_operator",  # twistd subprocess, curl
    "tests.test_rego",  # curl (and Rego evaluator subprocesses)
    "tests.test_rest_integration",  # nginx, curl
    "tests.test_smuggling",  # nginx
    "tests.test_systemd",  # twistd subprocess, systemd-socket-activate
    "tests.test_tls_proxy",  # docker-registry, skopeo, git, curl
    "tests.test_tls_serve",  # openssl, curl
)


def testSuite() -> TestSuite:
    """The unit modules, as trial loads a module it is named (an import error fails loudly)."""
    suite: TestSuite = TestLoader().loadByNames(list(UNIT))
    return suite
