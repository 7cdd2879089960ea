"""
connectors-proxy: a secretless proxy for Kubernetes workloads, as a twistd plugin.

One folder per concern:

    tap.py        twistd options -> the service tree (plugin stubs in twisted/plugins/)
    router.py     the root resource, where a request is routed and checked:
                  route -> identity -> authorization -> target -> protocol
    protocols/    one module per wire protocol: rest.py, git.py, oci/ (resource, auth, names, tokens),
                  forward.py (unlisted forward-proxy targets, no credentials)
    upstream/     target.py (a routed Connector), agents.py (one client per TLS identity),
                  client.py (the upstream HTTP/1.1 client: keep-alive pool, timeouts), framing.py
                  (response heads, body framing, chunked), relay.py (streaming;
                  request_headers: where credentials are injected), reflection.py (masking),
                  hooks.py (Rego extractor/generator on a request), timeouts.py, forward.py
    server/       channel.py (streaming HTTP, hostile input), routing.py (host/path -> Connector),
                  headers, errors, accesslog, limits
    auth/         identity.py (the client's token, static tokens), interfaces.py (the seams tests fake),
                  rego.py + regoworker.py (ConnectorClass Rego policies, evaluated in bounded processes)
    model/        objects.py (frozen values), state.py (snapshot), credentials.py (Secret -> credentials),
                  protocols.py (the protocol registry), flags.py (connectors-config feature flags)
    kube/         cluster mode: client, reflector, identity, reconcile, writer.py (where a Service is
                  written), leader, flags (the connectors-config watch)
    sources/      manifests.py (standalone mode: files reloaded on change), lint.py (typos in manifests)
    tls/          upstream.py (upstream trust), capool.py (the tool CA pool), serve.py (the cptls:
                  listener), mint.py (CA, leaves), intercept.py (TLS of intercepted CONNECT tunnels)
    ops/          drain, metrics, admin listener, sd_notify, log format
    compat.py     every private Twisted name, each pinned by tests.test_compat
    testing/      the fake Kubernetes API server
"""
