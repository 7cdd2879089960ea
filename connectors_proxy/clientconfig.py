# -*- test-case-name: tests.test_git_clientconfig -*-
"""
Client-side configuration for a Connector: the files the Connectors CSI
driver mounts into a pod, written here for standalone users (a laptop, a CI
runner outside the cluster) so their tools reach the proxy the same way.

Small pure functions that return file contents, and a tiny command line::

    python -m connectors_proxy.clientconfig git --connector NS/NAME \\
        --address https://git.example.com --token-file TOKEN [--proxy URL] ...

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
from collections.abc import Sequence
from urllib.parse import urlsplit

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        text = args.render(args)
    except (OSError, ValueError) as e:
        print(f"{parser.prog} {args.command}: {e}", file=sys.stderr)
        return 2
    if args.output:
        fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        # O_CREAT's mode applies only to a new file: an existing one is
        # narrowed too, since it is about to hold the client's token.
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
