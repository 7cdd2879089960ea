# -*- test-case-name: tests.test_kube_writer,tests.test_kube_e2e -*-
"""
Cluster mode: everything that talks to the Kubernetes API server.

  - L{config}: kubeconfig / in-cluster configuration as a frozen value;
  - L{client}: an asynchronous API client over Twisted's HTTP client;
  - L{reflector}: list + watch caches that survive API server outages;
  - L{reconcile}: pure decisions (the proxy Service, the Connector status);
  - L{writer}: applies those decisions, leader-gated and rate-limited;
  - L{leader}: Lease-based leader election;
  - L{identity}: TokenReview / SubjectAccessReview with caches;
  - L{cluster}: the C{ClusterMode} service that ties them together.
"""
