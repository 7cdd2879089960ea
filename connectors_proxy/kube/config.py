# -*- test-case-name: tests.test_kube_config -*-
"""
Where the API server is and how to prove who we are to it, as one frozen
L{KubeConfig}.

The official C{kubernetes} package does the parsing (kubeconfig files with
their contexts, C{*-data} fields and C{tokenFile}; the in-cluster service
account), because its loaders are the reference behaviour users expect.  Its
blocking HTTP client is never used: L{connectors_proxy.kube.client} talks to
the API server over Twisted.

A token that lives in a file (the in-cluster projected service account
token, a kubeconfig C{tokenFile}) is read again while the daemon runs,
because the kubelet rotates it: see L{TokenSource}.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import yaml
from attrs import define, field, frozen
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
SERVICE_TOKEN_FILENAME = SERVICE_ACCOUNT_DIR + "/token"
SERVICE_CERT_FILENAME = SERVICE_ACCOUNT_DIR + "/ca.crt"
SERVICE_NAMESPACE_FILENAME = SERVICE_ACCOUNT_DIR + "/namespace"

log = Logger()


class KubeConfigError(Exception):
    """The configuration cannot be loaded; C{str()} is one line for the user."""


@frozen
class KubeConfig:
    """
    How to reach one API server.

    @ivar server: base URL, C{https://host:port} (no trailing slash).
    @ivar ca_pem: PEM certificates to trust for the server, or C{None} for
        the platform's trust store.
    @ivar insecure: skip server certificate verification (kubeconfig
        C{insecure-skip-tls-verify}); never set by the in-cluster loader.
    @ivar tls_server_name: the name to verify the server certificate against
        instead of the host of C{server}.
    @ivar client_cert_pem: client certificate chain (PEM), with
        C{client_key_pem}.
    @ivar authorization: a static C{Authorization} header value
        (C{"Bearer ..."} or C{"Basic ..."}), if any.
    @ivar token_file: a file holding a bearer token that is re-read as it
        rotates; wins over C{authorization}.
    @ivar namespace: the namespace of the kubeconfig context, or of the pod
        in cluster (where the Lease lives by default).
    """

    server: str
    ca_pem: bytes | None = None
    insecure: bool = False
    tls_server_name: str | None = None
    client_cert_pem: bytes | None = None
    client_key_pem: bytes | None = field(default=None, repr=False)
    authorization: str | None = field(default=None, repr=False)
    token_file: str | None = None
    namespace: str | None = None


def _read(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise KubeConfigError(f"cannot read {what} {path}: {e.strerror}") from None


def _kubeconfig_token_file(path: str, context: str | None) -> tuple[str | None, str | None]:
    """
    The C{tokenFile} of the context's user (as an absolute path) and the
    context's namespace.  The C{kubernetes} loader reads C{tokenFile} once
    and forgets the path; we need the path to follow rotation.
    """
    first = path.split(os.pathsep)[0]
    try:
        with open(os.path.expanduser(first)) as f:
            doc = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None, None
    if not isinstance(doc, Mapping):
        return None, None
    name = context or doc.get("current-context")

    def named(section: str, wanted: object) -> Mapping[str, object]:
        for entry in doc.get(section) or []:
            if isinstance(entry, Mapping) and entry.get("name") == wanted:
                body = entry.get(section[:-1])
                return body if isinstance(body, Mapping) else {}
        return {}

    ctx = named("contexts", name)
    user = named("users", ctx.get("user"))
    namespace = ctx.get("namespace")
    token_file = user.get("tokenFile")
    if isinstance(token_file, str) and token_file and not user.get("token"):
        token_file = os.path.join(os.path.dirname(os.path.abspath(os.path.expanduser(first))), token_file)
    else:
        token_file = None
    return token_file, namespace if isinstance(namespace, str) else None


def load_kubeconfig(path: str, context: str | None = None) -> KubeConfig:
    """
    Load a kubeconfig file (or a C{KUBECONFIG}-style list of files) with the
    C{kubernetes} package's loader, for C{context} or the current context.
    """
    from kubernetes.client import Configuration
    from kubernetes.config import ConfigException, load_kube_config

    conf = Configuration()
    try:
        load_kube_config(config_file=path, context=context, client_configuration=conf,
                         persist_config=False)
    except ConfigException as e:
        raise KubeConfigError(f"kubeconfig {path}: {e}") from None
    except (OSError, yaml.YAMLError, TypeError, ValueError, KeyError) as e:
        raise KubeConfigError(f"kubeconfig {path}: {e}") from None
    token_file, namespace = _kubeconfig_token_file(path, context)
    return _from_configuration(conf, token_file=token_file, namespace=namespace,
                               what=f"kubeconfig {path}")


def load_in_cluster(token_path: str = SERVICE_TOKEN_FILENAME,
                    ca_path: str = SERVICE_CERT_FILENAME,
                    namespace_path: str = SERVICE_NAMESPACE_FILENAME,
                    environ: Mapping[str, str] = os.environ) -> KubeConfig:
    """
    The pod's service account: C{KUBERNETES_SERVICE_HOST}/C{_PORT}, the
    projected token (re-read as it rotates) and the cluster CA.
    """
    from kubernetes.client import Configuration
    from kubernetes.config import ConfigException
    from kubernetes.config.incluster_config import InClusterConfigLoader

    conf = Configuration()
    try:
        InClusterConfigLoader(token_filename=token_path, cert_filename=ca_path,
                              environ=environ).load_and_set(conf)
    except ConfigException as e:
        raise KubeConfigError(f"in-cluster configuration: {e}") from None
    except OSError as e:
        raise KubeConfigError(f"in-cluster configuration: {e}") from None
    namespace = None
    raw = _read(namespace_path, "namespace file") if os.path.exists(namespace_path) else None
    if raw:
        namespace = raw.decode("utf-8", "replace").strip() or None
    config = _from_configuration(conf, token_file=token_path, namespace=namespace,
                                 what="in-cluster configuration")
    return config


def _from_configuration(conf: object, token_file: str | None, namespace: str | None,
                        what: str) -> KubeConfig:
    host = str(getattr(conf, "host", "") or "").rstrip("/")
    if not host.startswith(("https://", "http://")):
        raise KubeConfigError(f"{what}: server {host!r} is not an http(s) URL")
    api_key: Mapping[str, str] = getattr(conf, "api_key", {}) or {}
    authorization = api_key.get("BearerToken") or api_key.get("authorization")
    if authorization and authorization.lower().startswith("bearer "):
        authorization = "Bearer " + authorization[len("bearer "):].strip()
    elif authorization and " " not in authorization:
        authorization = "Bearer " + authorization
    if getattr(conf, "username", None) and getattr(conf, "password", None) and not authorization:
        import base64
        pair = f"{conf.username}:{conf.password}".encode()  # type: ignore[attr-defined]
        authorization = "Basic " + base64.b64encode(pair).decode("ascii")
    cert = _read(getattr(conf, "cert_file", None), "client certificate")
    key = _read(getattr(conf, "key_file", None), "client key")
    if (cert is None) != (key is None):
        raise KubeConfigError(f"{what}: a client certificate needs both certificate and key")
    return KubeConfig(
        server=host,
        ca_pem=_read(getattr(conf, "ssl_ca_cert", None), "certificate authority"),
        insecure=not getattr(conf, "verify_ssl", True),
        tls_server_name=getattr(conf, "tls_server_name", None) or None,
        client_cert_pem=cert,
        client_key_pem=key,
        authorization=authorization or None,
        token_file=token_file,
        namespace=namespace,
    )


@define
class TokenSource:
    """
    The C{Authorization} header for the next request.

    A token file is read again at most every C{refresh} seconds (client-go
    uses one minute; the kubelet rotates projected tokens well before they
    expire).  When a read fails the last good token stays in use, so a
    kubelet caught mid-rename does not fail requests.
    """

    config: KubeConfig
    clock: IReactorTime
    refresh: float = 60.0
    _token: str | None = field(default=None, repr=False)
    _read_at: float | None = None

    def authorization(self) -> str | None:
        path = self.config.token_file
        if path is None:
            return self.config.authorization
        now = self.clock.seconds()
        if self._read_at is None or now - self._read_at >= self.refresh or self._token is None:
            self._read_at = now
            try:
                with open(path, encoding="utf-8") as f:
                    token = f.read().strip()
            except OSError as e:
                log.emit(LogLevel.warn, "cannot read token file {path}: {error}", path=path,
                         error=e.strerror)
                token = ""
            if token:
                self._token = token
        if self._token is None:
            return self.config.authorization
        return "Bearer " + self._token

    def invalidate(self) -> None:
        """Read the file again before the next request (after a 401)."""
        self._read_at = None
