# -*- test-case-name: tests.test_git_clientconfig,tests.test_clientconfig,tests.test_client_packages -*-
"""
Client-side configuration for a Connector: the files the Connectors CSI
driver mounts into a pod, written here for standalone users (a laptop, a CI
runner outside the cluster) so their tools reach the proxy the same way.

Small pure functions that return file contents, and a tiny command line::

    python -m connectors_proxy.clientconfig git --connector NS/NAME \\
        --address https://git.example.com --token-file TOKEN [--proxy URL] ...
    python -m connectors_proxy.clientconfig files --connector NS/NAME \\
        (--manifests PATH | --kubeconfig FILE | --in-cluster) --token-file TOKEN \\
        [--proxy URL] --dir DIR            # every file the CSI driver would mount

The token is the client's own (a ServiceAccount token, or a line of the
proxy's C{--tokens} file): never the Git server's credentials, which stay
in the proxy.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlsplit
from xml.sax.saxutils import escape as xml_escape

import yaml
from attrs import field, frozen

from connectors_proxy.kube.reconcile import class_proxy_url, proxy_url
from connectors_proxy.model.objects import GROUP, InvalidObject, parse_connector, parse_connector_class

DEFAULT_CLUSTER_DOMAIN = "cluster.local"


def connector_host(namespace: str, name: str, cluster_domain: str = DEFAULT_CLUSTER_DOMAIN) -> str:
    """The host name of a Connector's Service: C{c-NAME.NS.svc.DOMAIN}."""
    return f"c-{name}.{namespace}.svc.{cluster_domain}"


def host_mode_url(namespace: str, name: str, cluster_domain: str = DEFAULT_CLUSTER_DOMAIN,
                  scheme: str = "http") -> str:
    """The Connector's proxy address in host mode (its C{status.proxy.httpAddress.url})."""
    return f"{scheme}://{connector_host(namespace, name, cluster_domain)}"


def path_mode_url(proxy_url: str, namespace: str, name: str) -> str:
    """The Connector's proxy address in path mode: C{PROXY/namespaces/NS/connectors/NAME}."""
    return f"{proxy_url.rstrip('/')}/namespaces/{namespace}/connectors/{name}"


def basic_authorization(token: str) -> str:
    """C{Authorization} value carrying C{token}: Basic with an empty user name, as the CSI driver writes it."""
    return "Basic " + base64.b64encode((":" + token).encode("utf-8")).decode("ascii")


def _quote(value: str) -> str:
    """A git-config value in double quotes (backslash and quote escaped)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _check_config_text(what: str, value: str) -> None:
    if any(c in value for c in "\n\r\0"):
        raise ValueError(f"{what} must be a single line")


def gitconfig(address: str, proxy_address: str, token: str, *, http_proxy: str | None = None,
              ca_file: str | None = None, comment: str | None = None) -> str:
    """
    A C{.gitconfig} that sends every Git URL under C{address} (the
    Connector's C{spec.address}) to C{proxy_address} with C{token}:

     - C{url.<proxy_address>/.insteadOf = <address>/}, so users keep the
       Git server's own URLs (C{git clone https://git.example.com/team/app});
     - C{http.<proxy_address>/.extraHeader = Authorization: Basic ...}, scoped
       to the proxy so the token is never sent to any other server (also
       used by git-lfs);
     - with C{http_proxy} (host mode for clients that cannot resolve
       C{c-NAME.NS.svc...}): C{http.<proxy_address>/.proxy}, so git sends
       absolute-form requests to the proxy;
     - with C{ca_file}: C{http.<proxy_address>/.sslCAInfo}, for a proxy
       serving TLS with its own CA.
    """
    for what, value in (("address", address), ("proxy address", proxy_address), ("token", token),
                        ("http proxy", http_proxy or ""), ("CA file", ca_file or "")):
        _check_config_text(what, value)
    base = address.rstrip("/") + "/"
    proxy = proxy_address.rstrip("/") + "/"
    lines: list[str] = []
    if comment:
        lines.extend("# " + line for line in comment.splitlines())
    lines += [
        f"[url {_quote(proxy)}]",
        f"\tinsteadOf = {_quote(base)}",
        f"[http {_quote(proxy)}]",
        f"\textraHeader = {_quote('Authorization: ' + basic_authorization(token))}",
    ]
    if http_proxy:
        lines.append(f"\tproxy = {_quote(http_proxy)}")
    if ca_file:
        lines.append(f"\tsslCAInfo = {_quote(ca_file)}")
    return "\n".join(lines) + "\n"


def _split_connector(value: str) -> tuple[str, str]:
    namespace, sep, name = value.partition("/")
    if not sep or not namespace or not name or "/" in name:
        raise argparse.ArgumentTypeError(f"{value!r} is not NAMESPACE/NAME")
    return namespace, name


def _read_token(path: str) -> str:
    if path == "-":
        token = sys.stdin.readline()
    else:
        with open(path, encoding="utf-8") as f:
            token = f.read()
    token = token.strip()
    if not token or "\n" in token:
        raise ValueError(f"{path}: expected one token on one line")
    return token


def _git_command(args: argparse.Namespace) -> str:
    namespace, name = args.connector
    if args.proxy:
        proxy_address = path_mode_url(args.proxy, namespace, name)
    else:
        proxy_address = host_mode_url(namespace, name, args.cluster_domain)
    token = _read_token(args.token_file)
    comment = (
        f"Git through connectors-proxy for Connector {namespace}/{name} ({args.address}).\n"
        "Written by: python -m connectors_proxy.clientconfig git"
    )
    return gitconfig(args.address, proxy_address, token, http_proxy=args.http_proxy,
                     ca_file=args.ca_file, comment=comment)


def add_git_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    git = commands.add_parser(
        "git", help="a .gitconfig that sends a Connector's Git URLs through the proxy",
        description="Write the .gitconfig the Connectors CSI driver would mount for a git Connector.",
    )
    git.add_argument("--connector", required=True, type=_split_connector, metavar="NAMESPACE/NAME")
    git.add_argument("--address", required=True,
                     help="the Connector's spec.address (the Git server URL users clone from)")
    git.add_argument("--token-file", required=True, metavar="FILE",
                     help="file holding the client token ('-' for standard input)")
    git.add_argument("--proxy", metavar="URL",
                     help="path mode: the proxy's URL, e.g. http://127.0.0.1:8080 "
                          "(default: host mode, http://c-NAME.NAMESPACE.svc.CLUSTER-DOMAIN)")
    git.add_argument("--http-proxy", metavar="URL",
                     help="host mode through http.proxy: the proxy's URL (for hosts that cannot "
                          "resolve c-NAME.NAMESPACE.svc names)")
    git.add_argument("--cluster-domain", default=DEFAULT_CLUSTER_DOMAIN)
    git.add_argument("--ca-file", metavar="FILE", help="CA bundle to trust when the proxy serves TLS")
    git.set_defaults(render=_git_command)


DOCKER_USERNAME = "connectors-proxy"


def registry_host(url: str) -> str:
    """C{host[:port]} of a proxy URL: what image references and config.json keys name."""
    netloc = urlsplit(url if "://" in url else "//" + url).netloc
    if not netloc or "@" in netloc:
        raise ValueError(f"{url!r} is not a proxy URL (scheme://host[:port])")
    return netloc.lower()


def docker_config(registries: Sequence[str], token: str) -> str:
    """
    A docker C{config.json} (read by docker, podman, skopeo, buildah, crane)
    that presents C{token} to each of C{registries}, as C{host[:port]}:
    C{c-NAME.NS.svc.DOMAIN} for host mode (images named
    C{c-NAME.NS.svc.DOMAIN/REPO:TAG}), the proxy's own host for path mode
    (images named C{PROXY-HOST/namespaces/NS/connectors/NAME/REPO:TAG}).
    The user name is ignored by the proxy; the token is the client's own.
    """
    _check_config_text("token", token)
    auth = base64.b64encode(f"{DOCKER_USERNAME}:{token}".encode()).decode("ascii")
    return json.dumps({"auths": {host: {"auth": auth} for host in registries}}, indent=2) + "\n"


def _docker_command(args: argparse.Namespace) -> str:
    namespace, name = args.connector
    if args.proxy:
        registry = registry_host(args.proxy)
    else:
        registry = connector_host(namespace, name, args.cluster_domain)
    return docker_config([registry], _read_token(args.token_file))


def add_docker_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    docker = commands.add_parser(
        "docker", help="a config.json that lets registry clients pull and push through the proxy",
        description="Write the docker config.json the Connectors CSI driver would mount for an oci Connector.",
    )
    docker.add_argument("--connector", required=True, type=_split_connector, metavar="NAMESPACE/NAME")
    docker.add_argument("--token-file", required=True, metavar="FILE",
                        help="file holding the client token ('-' for standard input)")
    docker.add_argument("--proxy", metavar="URL",
                        help="path mode: the proxy's URL, e.g. http://127.0.0.1:8080; images are then named "
                             "HOST:PORT/namespaces/NS/connectors/NAME/REPO:TAG (default: host mode, "
                             "c-NAME.NAMESPACE.svc.CLUSTER-DOMAIN/REPO:TAG)")
    docker.add_argument("--cluster-domain", default=DEFAULT_CLUSTER_DOMAIN)
    docker.set_defaults(render=_docker_command)


# -- the files of the Connectors CSI driver -----------------------------------
#
# What a pod gets when it mounts a Connector with the CSI driver
# (UPSTREAM-COMPAT section 6): built-in files for every class, plus the files
# of the class's spec.configurations that the volume names.  The classes'
# configurations are Go templates that the driver renders; here each known
# configuration name has a renderer that writes the same file, so
# standalone users (and clusters without the driver) get the same files.

CONNECTOR_USER = "connectors-proxy"
#: A placeholder the proxy replaces with the Connector's real credentials.
PLACEHOLDER_PASSWORD = "replaced-by-the-proxy"


@frozen
class Configuration:
    """
    One entry of a ConnectorClass's C{spec.configurations}.

    @ivar params: parameter name -> default (C{None}: required).
    @ivar files: the file names of its C{data}, as the class declares them.
    """

    name: str
    params: Mapping[str, str | None] = field(factory=dict)
    files: tuple[str, ...] = ()


@frozen
class ClassInfo:
    """What the files need of a ConnectorClass."""

    name: str
    configurations: tuple[Configuration, ...] = ()
    #: C{.connectorclass.proxyAddress}: where the class's proxy is.
    proxy_address: str = ""

    def configuration(self, name: str) -> Configuration | None:
        return next((c for c in self.configurations if c.name == name), None)


@frozen
class ConnectorInfo:
    """What the files need of a Connector."""

    namespace: str
    name: str
    address: str
    #: C{.connector.status.proxyAddress}: the Connector's proxy address.
    proxy_address: str
    cls: ClassInfo
    #: The proxy's own URL when the client reaches it directly rather than by
    #: cluster names (C{--proxy}); C{proxy_address} is then in path form on it.
    via: str | None = None
    #: The address inside the cluster (status, or as the proxy writes it).
    cluster_address: str = ""

    @property
    def user(self) -> str:
        return f"{self.namespace}/{self.name}"


@frozen
class Context:
    """
    Everything one configuration is rendered from: the Connectors (of the
    classes that have it; the last is C{.connector}), the client token, the
    configuration's parameters and the proxy's CA (C{context.proxy.caCert}).
    """

    connectors: tuple[ConnectorInfo, ...]
    # Out of repr: a traceback or a debug print of the context shows no token.
    token: str = field(repr=False)
    params: Mapping[str, str] = field(factory=dict)
    ca_cert: str | None = None

    @property
    def connector(self) -> ConnectorInfo:
        return self.connectors[-1]

    @property
    def proxy_host(self) -> str:
        """C{host[:port]} of the last Connector's proxy address: the forward proxy."""
        return urlsplit(self.connector.proxy_address).netloc

    def forward_proxy_url(self) -> str:
        """C{http://NS%2FNAME[,NS2%2FNAME2]:TOKEN@HOST[:PORT]}: the forward proxy with the Connectors listed."""
        users = ",".join(quote(c.user, safe="") for c in self.connectors)
        return f"http://{users}:{quote(self.token, safe='')}@{self.proxy_host}"

    def param(self, name: str) -> str:
        return self.params.get(name, "")


def _join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def _repository_urls(ctx: Context) -> dict[str, str]:
    """
    The repository URLs of the Connector's class by format (C{maven},
    C{npm}, C{pypi}, C{upload}): Nexus and Artifactory lay out repositories
    under their own paths (parameter C{repository}); other classes are one
    repository at C{spec.address}.
    """
    address = ctx.connector.address.rstrip("/")
    repo = ctx.param("repository")
    if ctx.connector.cls.name == "nexus":
        base = _join(address, "repository", repo)
        return {"maven": base, "npm": base + "/", "pypi": base + "/simple", "upload": base + "/"}
    if ctx.connector.cls.name == "jfrog":
        return {"maven": _join(address, "artifactory", repo),
                "npm": _join(address, "artifactory/api/npm", repo) + "/",
                "pypi": _join(address, "artifactory/api/pypi", repo, "simple"),
                "upload": _join(address, "artifactory/api/pypi", repo)}
    return {"maven": address, "npm": address + "/", "pypi": address + "/simple/", "upload": address + "/"}


def _layout(ctx: Context) -> bool:
    """Whether the class is a repository manager (Nexus, Artifactory) with a layout of its own."""
    return ctx.connector.cls.name in ("nexus", "jfrog")


def env_file(ctx: Context) -> str:
    """C{.env}: C{http_proxy}/C{https_proxy} naming the Connectors; loopback goes direct."""
    url = ctx.forward_proxy_url()
    return f"http_proxy={url}\nhttps_proxy={url}\nno_proxy=localhost,127.0.0.1\n"


def builtin_files(ctx: Context) -> dict[str, str]:
    """The files every CSI volume holds, whatever its class."""
    files = {
        ".env": env_file(ctx),
        "http.proxy": ctx.forward_proxy_url(),
        "https.proxy": ctx.forward_proxy_url(),
        "context.token": ctx.token,
        "connector.status.proxyAddress": ctx.connector.proxy_address,
    }
    if ctx.ca_cert:
        files["ca.crt"] = files["ca.cert"] = ctx.ca_cert
    return files


def render_gitconfig(ctx: Context) -> dict[str, str]:
    """C{.gitconfig}: each Connector's address rewritten to its proxy address, the token sent there only."""
    texts = [gitconfig(c.address, c.proxy_address, ctx.token) for c in ctx.connectors]
    return {".gitconfig": "".join(texts)}


def render_registry_config(ctx: Context) -> dict[str, str]:
    """C{config.json}: the token for each Connector's registry host (its proxy address's host)."""
    return {"config.json": docker_config(list(dict.fromkeys(registry_host(c.proxy_address)
                                                            for c in ctx.connectors)), ctx.token)}


def render_buildkitd(ctx: Context) -> dict[str, str]:
    """C{buildkitd.toml}: the proxy addresses are plain-HTTP registries."""
    lines = ['insecure-entitlements = ["network.host", "security.insecure"]']
    for host in dict.fromkeys(registry_host(c.proxy_address) for c in ctx.connectors):
        lines += [f"[registry.{json.dumps(host)}]", "  http = true"]
    return {"buildkitd.toml": "\n".join(lines) + "\n"}


def render_settings(ctx: Context) -> dict[str, str]:
    """
    Maven's C{settings.xml}: the proxy as Maven's HTTP proxy with the
    Connectors as user and the token as password, and a mirror of every
    repository: the Connector's repository (C{useAsMirror=true}) or, for
    Nexus and Artifactory, the repository named by C{repository}.
    """
    proxy = urlsplit(ctx.connector.proxy_address)
    users = ",".join(c.user for c in ctx.connectors)
    mirror = ""
    if _layout(ctx):
        mirror = _mirror(f"{ctx.connector.name}-mirror", _repository_urls(ctx)["maven"])
    elif ctx.param("useAsMirror") == "true":
        mirror = _mirror("connectors-mirror", ctx.connector.address)
    text = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<settings xmlns="http://maven.apache.org/SETTINGS/1.2.0">\n'
        "  <proxies>\n"
        "    <proxy>\n"
        "      <id>connectors-proxy</id>\n"
        "      <active>true</active>\n"
        "      <protocol>http</protocol>\n"
        f"      <host>{xml_escape(proxy.hostname or '')}</host>\n"
        f"      <port>{proxy.port or 80}</port>\n"
        f"      <username>{xml_escape(users)}</username>\n"
        f"      <password>{xml_escape(ctx.token)}</password>\n"
        "      <nonProxyHosts>localhost</nonProxyHosts>\n"
        "    </proxy>\n"
        "  </proxies>\n"
        f"{mirror}"
        "</settings>\n"
    )
    return {"settings.xml": text}


def _mirror(mirror_id: str, url: str) -> str:
    return ("  <mirrors>\n"
            "    <mirror>\n"
            f"      <id>{xml_escape(mirror_id)}</id>\n"
            "      <mirrorOf>*</mirrorOf>\n"
            f"      <url>{xml_escape(url)}</url>\n"
            "    </mirror>\n"
            "  </mirrors>\n")


def _npm_auth_key(registry: str) -> str:
    """npm's per-registry key: C{//host[:port]/path/}."""
    parts = urlsplit(registry)
    return f"//{parts.netloc}{parts.path.rstrip('/')}/"


def render_npmrc(ctx: Context) -> dict[str, str]:
    """
    C{.npmrc}: the registry (unless it is for publishing only), a
    placeholder C{_auth} so npm sends credentials the proxy replaces, and
    the proxy as npm's C{proxy}/C{https-proxy}.
    """
    registry = _repository_urls(ctx)["npm"]
    lines = []
    if ctx.param("registryType") != "publish":
        lines.append(f"registry={registry}")
    placeholder = base64.b64encode(f"{CONNECTOR_USER}:{PLACEHOLDER_PASSWORD}".encode()).decode()
    lines += [f"{_npm_auth_key(registry)}:_auth={placeholder}",
              f"proxy={ctx.forward_proxy_url()}", f"https-proxy={ctx.forward_proxy_url()}"]
    if ctx.param("strict-ssl"):
        lines.append(f"strict-ssl={ctx.param('strict-ssl')}")
    return {".npmrc": "\n".join(lines) + "\n"}


def render_yarnrc(ctx: Context) -> dict[str, str]:
    """C{.yarnrc.yml}: what C{.npmrc} says, in Yarn (berry) terms."""
    registry = _repository_urls(ctx)["npm"].rstrip("/")
    lines = [f"npmRegistryServer: {json.dumps(registry)}",
             f'npmAuthIdent: "{CONNECTOR_USER}:{PLACEHOLDER_PASSWORD}"',
             "npmAlwaysAuth: true",
             f"httpProxy: {json.dumps(ctx.forward_proxy_url())}",
             f"httpsProxy: {json.dumps(ctx.forward_proxy_url())}"]
    if ctx.param("strict-ssl"):
        lines.append(f"enableStrictSsl: {ctx.param('strict-ssl')}")
    return {".yarnrc.yml": "\n".join(lines) + "\n"}


def render_pipconf(ctx: Context) -> dict[str, str]:
    """
    C{pip.conf}: for a PyPI Connector, the index at the Connector's proxy
    address with C{NS-NAME:TOKEN} as credentials (reverse proxy); for Nexus
    and Artifactory, the repository's own URL through the forward proxy.
    """
    if _layout(ctx):
        return {"pip.conf": (f"[global]\nindex-url = {_repository_urls(ctx)['pypi']}\n"
                             f"proxy = {ctx.forward_proxy_url()}\ntimeout = 30\n")}
    c = ctx.connector
    # Reached from outside the cluster, the index keeps its cluster address
    # and pip goes through the proxy's own URL (requests in absolute form,
    # routed by host): indexes that link their files by absolute path
    # (pypiserver's /packages/...) would escape a path-form address.
    proxy = urlsplit(c.cluster_address if c.via and c.cluster_address else c.proxy_address)
    user = f"{c.namespace}-{c.name}"
    index = f"{proxy.scheme}://{user}:{quote(ctx.token, safe='')}@{proxy.netloc}{proxy.path.rstrip('/')}/simple/"
    via = f"proxy = {c.via.rstrip('/')}\n" if c.via and c.cluster_address else ""
    return {"pip.conf": f"[global]\nindex-url = {index}\n{via}timeout = 30\ntrusted-host = {proxy.hostname}\n"}


def render_pypirc(ctx: Context) -> dict[str, str]:
    """C{.pypirc}: an index server C{connectors-pypi} for twine, at the proxy (or the repository, forward)."""
    if _layout(ctx):
        repository, user, password = _repository_urls(ctx)["upload"], CONNECTOR_USER, PLACEHOLDER_PASSWORD
    else:
        repository = ctx.connector.proxy_address.rstrip("/") + "/"
        user, password = f"{ctx.connector.namespace}-{ctx.connector.name}", ctx.token
    return {".pypirc": ("[distutils]\nindex-servers = connectors-pypi\n\n[connectors-pypi]\n"
                        f"repository = {repository}\nusername = {user}\npassword = {password}\n")}


def render_kubeconfig(ctx: Context) -> dict[str, str]:
    """A kubeconfig for the API server at C{spec.address}, reached through the proxy (C{proxy-url})."""
    name = ctx.connector.name
    cluster: dict[str, Any] = {"server": ctx.connector.address,
                               "proxy-url": f"http://{quote(ctx.connector.user, safe='')}:"
                                            f"{quote(ctx.token, safe='')}@{ctx.proxy_host}"}
    if ctx.ca_cert:
        cluster["certificate-authority-data"] = base64.b64encode(ctx.ca_cert.encode()).decode()
    config = {"apiVersion": "v1", "kind": "Config",
              "clusters": [{"name": name, "cluster": cluster}],
              # A placeholder: the proxy sends the Connector's own token instead.
              "users": [{"name": CONNECTOR_USER, "user": {"token": "fake-token"}}],
              "contexts": [{"name": name, "context": {"cluster": name, "user": CONNECTOR_USER}}],
              "current-context": name}
    return {"kubeconfig": yaml.safe_dump(config, sort_keys=False)}


def render_sonar(ctx: Context) -> dict[str, str]:
    """C{sonar-project.properties}: the server, and the proxy as the scanner's HTTP proxy."""
    proxy = urlsplit(ctx.connector.proxy_address)
    port = 443 if urlsplit(ctx.connector.address).scheme == "https" else (proxy.port or 80)
    return {"sonar-project.properties": (
        f"sonar.host.url={ctx.connector.address}\n"
        f"sonar.scanner.proxyHost={proxy.hostname}\n"
        f"sonar.scanner.proxyPort={port}\n"
        f"sonar.scanner.proxyUser={quote(ctx.connector.user, safe='')}\n"
        f"sonar.scanner.proxyPassword={ctx.token}\n")}


def render_glab(ctx: Context) -> dict[str, str]:
    """
    glab's C{config.yml}: the Connector's proxy host as a GitLab host over
    plain HTTP, with the client token (glab sends it as C{PRIVATE-TOKEN},
    which the gitlab class's authExtractor reads).  Host form only: glab
    cannot put a path in front of C{/api/v4}.
    """
    host = urlsplit(ctx.connector.proxy_address).netloc
    config = {"hosts": {host: {"token": ctx.token, "api_host": host, "api_protocol": "http",
                               "git_protocol": "http"}}}
    return {"config.yml": yaml.safe_dump(config, sort_keys=False)}


#: Configuration name (a class's C{spec.configurations[].name}) -> renderer.
RENDERERS: dict[str, Callable[[Context], dict[str, str]]] = {
    "gitconfig": render_gitconfig,
    "registry-config": render_registry_config,
    "docker-config": render_registry_config,
    "config": render_registry_config,
    "buildkitd": render_buildkitd,
    "settings": render_settings,
    "npmrc": render_npmrc,
    "yarnrc": render_yarnrc,
    "pipconf": render_pipconf,
    "pypirc": render_pypirc,
    "kubeconfig": render_kubeconfig,
    "sonar-scanner": render_sonar,
    "gitlabconfig": render_glab,
}


class ClientConfigError(ValueError):
    """Files that cannot be written as asked; the message says why, in one line."""


def _selection(names: Sequence[str] | None) -> tuple[list[str] | None, set[str]]:
    """CSI C{configuration.names}: configurations to render, and C{!file} names to leave out."""
    if names is None:
        return None, set()
    chosen = [n for n in names if n and not n.startswith("!")]
    return chosen, {n[1:] for n in names if n.startswith("!")}


def render_files(connectors: Sequence[ConnectorInfo], token: str, names: Sequence[str] | None = None,
                 params: Mapping[str, Mapping[str, str]] | None = None, ca_cert: str | None = None,
                 ) -> dict[str, str]:
    """
    The files a CSI volume for C{connectors} would hold: the built-ins,
    then each chosen configuration of their classes rendered over the
    Connectors whose class has it (a later file of the same name wins).

    @param names: configuration names as the volume's C{configuration.names}
        gives them (C{!FILE} leaves a file out); C{None}: every
        configuration the classes have.
    @param params: per configuration, parameters over the class's defaults
        (the volume's C{configuration.params}).
    @raise ClientConfigError: a named configuration no class has, one
        this module cannot render, or a required parameter not given.
    """
    if not connectors:
        raise ClientConfigError("no Connector given")
    _check_config_text("token", token)
    chosen, excluded = _selection(names)
    params = params or {}
    files = builtin_files(Context(tuple(connectors), token, ca_cert=ca_cert))
    available: dict[str, None] = {}
    for c in connectors:
        for entry in c.cls.configurations:
            available.setdefault(entry.name, None)
    if chosen is not None:
        missing = [n for n in chosen if n not in available]
        if missing and len(missing) == len(chosen):
            raise ClientConfigError(f"no configuration named {', '.join(missing)} in the Connectors' classes "
                                    f"(they have: {', '.join(available) or 'none'})")
    for name in chosen if chosen is not None else list(available):
        if name not in available:
            continue
        renderer = RENDERERS.get(name)
        if renderer is None:
            if chosen is None:
                continue  # a custom template: only the CSI driver renders those
            raise ClientConfigError(f"configuration {name} is a template only the CSI driver renders "
                                    f"(known here: {', '.join(sorted(RENDERERS))})")
        having = tuple(c for c in connectors if c.cls.configuration(name) is not None)
        conf = having[-1].cls.configuration(name)
        assert conf is not None
        values: dict[str, str] = {}
        for key, default in conf.params.items():
            value = (params.get(name) or {}).get(key, default)
            if value is None:
                raise ClientConfigError(f"configuration {name} of class {having[-1].cls.name} needs parameter "
                                        f"{key!r}: give --params '{{\"{name}\": {{\"{key}\": \"...\"}}}}'")
            values[key] = str(value)
        for key, value in (params.get(name) or {}).items():
            values.setdefault(key, str(value))
        files.update(renderer(Context(having, token, values, ca_cert)))
    return {k: v for k, v in files.items() if k not in excluded}


# -- reading Connectors and classes -------------------------------------------

def _class_info(doc: Mapping[str, Any], cluster_domain: str) -> ClassInfo:
    cls = parse_connector_class(doc)
    configurations = []
    for entry in (doc.get("spec") or {}).get("configurations") or []:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
            continue
        defaults: dict[str, str | None] = {}
        for p in entry.get("params") or []:
            if isinstance(p, Mapping) and isinstance(p.get("name"), str):
                defaults[p["name"]] = None if p.get("default") is None else str(p["default"])
        configurations.append(Configuration(entry["name"], defaults, tuple(entry.get("data") or {})))
    status_url = (((doc.get("status") or {}).get("proxy") or {}).get("httpAddress") or {}).get("url")
    return ClassInfo(cls.name, tuple(configurations),
                     status_url or (class_proxy_url(cls, cluster_domain) if cls.has_proxy else ""))


def connector_info(connector_doc: Mapping[str, Any], class_doc: Mapping[str, Any],
                   cluster_domain: str = DEFAULT_CLUSTER_DOMAIN, proxy: str | None = None) -> ConnectorInfo:
    """
    A Connector as the CSI driver sees it.  Its proxy address is C{proxy}
    in path form when given (a proxy the client reaches by its own URL, as
    standalone users do), else the Connector's C{status.proxy.httpAddress.url},
    else that address as the proxy would write it.

    @raise ClientConfigError: the Connector or class is invalid, or the
        class has no proxy.
    """
    try:
        connector = parse_connector(connector_doc)
        cls = parse_connector_class(class_doc)
        info = _class_info(class_doc, cluster_domain)
    except InvalidObject as e:
        raise ClientConfigError(str(e)) from None
    status = connector_doc.get("status") or {}
    cluster_address = ((status.get("proxy") or {}).get("httpAddress") or {}).get("url") or ""
    if not cluster_address and cls.has_proxy:
        cluster_address = proxy_url(connector, cluster_domain, cls)
    if proxy:
        address = path_mode_url(proxy, connector.namespace, connector.name)
    elif cluster_address:
        address = cluster_address
    else:
        raise ClientConfigError(f"ConnectorClass {cls.name} has no spec.proxy: Connector "
                                f"{connector.ref} is not reached through a proxy")
    return ConnectorInfo(connector.namespace, connector.name, connector.address, address, info,
                         via=proxy or None, cluster_address=cluster_address)


def _pick(docs: Iterable[Any], kind: str, name: str, namespace: str | None = None) -> Mapping[str, Any] | None:
    for doc in docs:
        if not isinstance(doc, Mapping) or doc.get("kind") != kind:
            continue
        meta = doc.get("metadata") or {}
        if meta.get("name") == name and (namespace is None or (meta.get("namespace") or "default") == namespace):
            return doc
    return None


def from_manifests(paths: Sequence[str], refs: Sequence[tuple[str, str]], cluster_domain: str = DEFAULT_CLUSTER_DOMAIN,
                   proxy: str | None = None) -> list[ConnectorInfo]:
    """The Connectors C{refs} (namespace, name) and their classes, from manifest files or folders."""
    from connectors_proxy.sources.manifests import ManifestError, decode_documents, manifest_files, objects_in

    docs: list[Any] = []
    try:
        for path in manifest_files(paths):
            with open(path, encoding="utf-8") as f:
                text = f.read()
            # Read as the proxy reads them: a List's items (kubectl get -o yaml) too.
            for _, content in decode_documents(text, path):
                docs.extend(objects_in(content))
    except ManifestError as e:
        raise ClientConfigError(str(e).replace("\n", " ")) from None
    out = []
    for namespace, name in refs:
        connector = _pick(docs, "Connector", name, namespace)
        if connector is None:
            raise ClientConfigError(f"no Connector {namespace}/{name} in {', '.join(paths)}")
        class_name = (connector.get("spec") or {}).get("connectorClassName")
        cls = _pick(docs, "ConnectorClass", str(class_name))
        if cls is None:
            raise ClientConfigError(f"Connector {namespace}/{name}: no ConnectorClass {class_name} in "
                                    f"{', '.join(paths)}")
        out.append(connector_info(connector, cls, cluster_domain, proxy))
    return out


def from_cluster(refs: Sequence[tuple[str, str]], kubeconfig: str | None, cluster_domain: str = DEFAULT_CLUSTER_DOMAIN,
                 proxy: str | None = None) -> list[ConnectorInfo]:
    """The live Connectors C{refs} and their classes, read with C{kubeconfig} (C{None}: in-cluster)."""
    from kubernetes import client as kclient
    from kubernetes import config as kconfig
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config.config_exception import ConfigException

    try:
        if kubeconfig:
            api = kconfig.new_client_from_config(config_file=kubeconfig)
        else:
            kconfig.load_incluster_config()
            api = kclient.ApiClient()
    except (ConfigException, OSError) as e:
        raise ClientConfigError(f"cannot load the cluster configuration: {e}") from None
    custom = kclient.CustomObjectsApi(api)
    group, version = GROUP, "v1alpha1"
    out = []
    with api:
        for namespace, name in refs:
            what = f"Connector {namespace}/{name}"
            try:
                connector: Any = custom.get_namespaced_custom_object(
                    group, version, namespace, "connectors", name)
                class_name = str((connector.get("spec") or {}).get("connectorClassName") or "")
                what = f"Connector {namespace}/{name}: ConnectorClass {class_name}"
                cls: Any = custom.get_cluster_custom_object(group, version, "connectorclasses",
                                                                          class_name)
            except ApiException as e:
                raise ClientConfigError(f"{what}: {e.status} {e.reason}") from None
            except (OSError, ValueError) as e:
                raise ClientConfigError(f"{what}: {e}") from None
            out.append(connector_info(connector, cls, cluster_domain, proxy))
    return out


def _connector_ref(value: str) -> tuple[str | None, str]:
    """C{NS/NAME} or C{NAME} (then in C{--namespace}), as the CSI volume's C{connectors} attribute."""
    namespace, sep, name = value.partition("/")
    if not sep:
        namespace, name = "", value
    if not name or "/" in name or (sep and not namespace):
        raise argparse.ArgumentTypeError(f"{value!r} is not NAME or NAMESPACE/NAME")
    return namespace or None, name


def _connector_list(value: str) -> list[tuple[str | None, str]]:
    return [_connector_ref(v.strip()) for v in value.split(",") if v.strip()]


def _params(value: str) -> dict[str, dict[str, str]]:
    try:
        parsed = json.loads(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--params is not JSON: {e}") from None
    if not isinstance(parsed, dict) or not all(isinstance(v, dict) for v in parsed.values()):
        raise argparse.ArgumentTypeError('--params must be {"CONFIGURATION": {"PARAM": "VALUE"}}')
    return {str(k): {str(p): str(v) for p, v in values.items()} for k, values in parsed.items()}


def _files_command(args: argparse.Namespace) -> str | dict[str, str]:
    refs = [(ns or args.namespace, name) for group in args.connector for ns, name in group]
    if args.manifests:
        connectors = from_manifests(args.manifests, refs, args.cluster_domain, args.proxy)
    else:
        connectors = from_cluster(refs, args.kubeconfig, args.cluster_domain, args.proxy)
    ca_cert = read_ca(args.ca_file) if args.ca_file else None
    names = None if args.configurations is None else [n.strip() for n in args.configurations.split(",")]
    files = render_files(connectors, _read_token(args.token_file), names, args.params, ca_cert)
    if args.only is not None:
        if args.only not in files:
            raise ClientConfigError(f"no file {args.only} (the volume would hold: {', '.join(sorted(files))})")
        return files[args.only]
    if not args.dir:
        raise ClientConfigError("give --dir DIR for the files, or --only FILE for one of them")
    return files


def read_ca(where: str) -> str:
    """
    The proxy's CA certificate (PEM) from a file, or from a URL: the
    proxy's admin listener publishes it as C{/ca.crt} (with
    C{--proxy-ca-cert}).  Fetch it over a network you trust (a
    C{kubectl port-forward}), since it is what your tools will trust.
    """
    if where.startswith(("http://", "https://")):
        import urllib.request
        with urllib.request.urlopen(where, timeout=10) as response:  # noqa: S310 - the user's own URL
            text = response.read().decode("utf-8", "replace")
    else:
        with open(where, encoding="utf-8") as f:
            text = f.read()
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise ClientConfigError(f"{where} holds no PEM certificate")
    return text


def write_files(folder: str, files: Mapping[str, str]) -> None:
    """Write C{files} into C{folder} (created), each mode 0600: they hold the client token."""
    os.makedirs(folder, exist_ok=True)
    for name, text in files.items():
        if "/" in name or name in ("", ".", ".."):
            raise ClientConfigError(f"{name!r} is not a file name")
        _write_private(os.path.join(folder, name), text)


def add_files_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    files = commands.add_parser(
        "files", help="every file the Connectors CSI driver would mount for Connectors",
        description="Write the files a Connectors CSI volume would hold for these Connectors: .env, http.proxy, "
                    "https.proxy, context.token, connector.status.proxyAddress (and ca.crt), plus the files of "
                    "their classes' configurations (.gitconfig, config.json, buildkitd.toml, settings.xml, "
                    ".npmrc, .yarnrc.yml, pip.conf, .pypirc, kubeconfig, sonar-project.properties).",
    )
    files.add_argument("--connector", required=True, action="append", type=_connector_list,
                       metavar="[NAMESPACE/]NAME[,...]", help="repeatable; the last one's proxy is the forward proxy")
    files.add_argument("--namespace", default="default", help="for Connectors named without one")
    source = files.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifests", action="append", metavar="PATH",
                        help="repeatable; YAML files or folders holding the Connectors and their classes")
    source.add_argument("--kubeconfig", metavar="FILE", help="read the live Connectors with this kubeconfig")
    source.add_argument("--in-cluster", action="store_true", help="read the live Connectors as this pod")
    files.add_argument("--token-file", required=True, metavar="FILE",
                       help="file holding the client token ('-' for standard input)")
    files.add_argument("--proxy", metavar="URL",
                       help="the proxy's URL as this machine reaches it, e.g. http://127.0.0.1:8080: addresses in "
                            "path form on it (default: the Connectors' status addresses)")
    files.add_argument("--cluster-domain", default=DEFAULT_CLUSTER_DOMAIN)
    files.add_argument("--configurations", metavar="NAME[,NAME|!FILE...]",
                       help="the class configurations to render, as the volume's configuration.names (!FILE leaves "
                            "a file out); default: all the classes have")
    files.add_argument("--params", type=_params, default={}, metavar="JSON",
                       help='configuration parameters, as the volume\'s configuration.params: {"settings": '
                            '{"useAsMirror": "true"}}')
    files.add_argument("--ca-file", metavar="FILE|URL",
                       help="the proxy's CA certificate (a file, or its admin listener's /ca.crt URL), written as "
                            "ca.crt and ca.cert, and into kubeconfig as certificate-authority-data: tools trust "
                            "it for https:// addresses reached through https_proxy")
    files.add_argument("--dir", metavar="DIR", help="write every file into this folder (mode 0600)")
    files.add_argument("--only", metavar="FILE", help="write only this file (to standard output or --output)")
    files.set_defaults(render=_files_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m connectors_proxy.clientconfig",
        description="Write a tool's client configuration for a Connector served by connectors-proxy.",
    )
    parser.add_argument("--output", "-o", metavar="FILE",
                        help="write here (mode 0600: it holds the client token) instead of standard output")
    commands = parser.add_subparsers(dest="command", required=True)
    add_git_command(commands)
    add_docker_command(commands)
    add_files_command(commands)
    for sub in commands.choices.values():
        # Also after the command (clientconfig git -o FILE); SUPPRESS keeps
        # the subcommand from resetting a value given before it.
        sub.add_argument("--output", "-o", metavar="FILE", default=argparse.SUPPRESS,
                         help="write here (mode 0600: it holds the client token) instead of standard output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        text = args.render(args)
        if isinstance(text, dict):
            write_files(args.dir, text)
        elif args.output:
            _write_private(args.output, text)
        else:
            sys.stdout.write(text)
    except (OSError, ValueError) as e:
        print(f"{parser.prog} {args.command}: {e}", file=sys.stderr)
        return 2
    return 0


def _write_private(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    # O_CREAT's mode applies only to a new file: an existing one is
    # narrowed too, since it is about to hold the client's token.
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    raise SystemExit(main())
