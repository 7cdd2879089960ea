"""
More real clients through C{CONNECT} (issue 14): C{pip install} from an
HTTPS package index (a real C{pypiserver} behind TLS, its own user and a
canary password), and the recipes of C{docs/connect.md}, run as written.

The upstreams are addressed by made-up host names (C{pypi.test},
C{api.example.com}...): Go clients never send loopback targets to a proxy,
and the docs name real-looking hosts.  Only the proxy resolves them: it
runs as the real daemon with a private C{/etc/hosts}
(L{tests.support.hosts}), as L{tests.test_connect.OCITests} does.  The
clients hold only their own token and the proxy CA (from the admin
listener's C{/ca.crt}); canary credentials never appear in what they
print or in the proxy's log.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import secrets
import shutil
import sys
import time
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import yaml
from attrs import define, frozen
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import Site

from connectors_proxy.testing.fakekube import start_fake_kube
from connectors_proxy.tls.mint import CertificateAuthority
from tests.support.docs import client_env, page_blocks, run_block, substitute
from tests.support.gitserver import start_git_server
from tests.support.hosts import with_private_hosts
from tests.support.procs import Server, check, free_port, require, run, start_server
from tests.support.proxy import (
    ROOT,
    basic_secret,
    bearer_secret,
    connector,
    connector_class,
    json_lines,
    manifests_text,
    sa,
    secret,
    write_setup,
)
from tests.support.registry import TokenServer, build_image, start_registry_trusting
from tests.support.waiting import eventually
from tests.test_connect import CURL_ENV, basic, no_canary, proxy_user, start_https_upstream, write_ca
from tests.test_docs import Files, tarball, wheel

NS = "team"
CLASSES = os.path.join(ROOT, "k8s", "classes")
TWISTD = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.exit(run())"]


def upstream_class(name: str) -> list[dict[str, Any]]:
    """The upstream ConnectorClass C{name}, as C{k8s/classes/} ships it."""
    with open(os.path.join(CLASSES, name + ".yaml")) as f:
        return [d for d in yaml.safe_load_all(f) if d]


# ------------------------------------------------------------------ the daemon, resolving made-up names


@define
class HostsDaemon:
    """
    C{twistd -n connectors-proxy} with an intercepting CA, in a mount
    namespace whose C{/etc/hosts} names the test's hosts.
    """

    server: Server
    port: int
    admin: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def proxy_url(self, token: str, *connectors: str) -> str:
        """The C{https_proxy} of a workload listing C{connectors} (C{NS/NAME})."""
        return f"http://{proxy_user(token, *connectors)}@127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.server.log()

    def access(self) -> list[dict[str, Any]]:
        return [line for line in json_lines(self.log()) if line.get("event") == "access"]


async def start_daemon_with_hosts(test: TestCase, objects: Iterable[Mapping[str, Any]], tokens: Mapping[str, str],
                                  names: Sequence[str], ca_cert: str, ca_key: str) -> HostsDaemon:
    """
    The daemon over C{objects} and C{tokens}, JSON log, C{--proxy-ca-cert}
    C{ca_cert} and C{--proxy-ca-key} C{ca_key}; C{names} resolve to
    127.0.0.1 for it alone.
    """
    args = write_setup(test, objects, tokens)
    port, admin = free_port(), free_port()
    argv = with_private_hosts(test, dict.fromkeys(names, "127.0.0.1"), [
        *TWISTD, "-n", "--pidfile=", "connectors-proxy", *args, "--log-format", "json",
        "--listen", f"tcp:{port}:interface=127.0.0.1", "--admin", f"tcp:{admin}:interface=127.0.0.1",
        "--proxy-ca-cert", ca_cert, "--proxy-ca-key", ca_key])
    server = await start_server(test, argv, port=port, env={"PYTHONPATH": ROOT}, name="connectors-proxy")
    return HostsDaemon(server, port, admin)


def write_proxy_ca(test: TestCase) -> tuple[str, str]:
    """A fresh proxy CA's certificate and key files."""
    folder = os.path.abspath(test.mktemp())
    os.makedirs(folder)
    paths = write_ca(folder, CertificateAuthority.generate("clients CA " + secrets.token_hex(3), time.time()))
    return paths["ca.crt"], paths["ca.key"]


async def fetch_ca(daemon: HostsDaemon, path: str) -> str:
    """The proxy CA from the admin listener's C{/ca.crt}, into C{path}."""
    check(await run([require("curl"), "-sS", "--fail", "-o", path, f"http://127.0.0.1:{daemon.admin}/ca.crt"],
                    env=CURL_ENV))
    return path


# ------------------------------------------------------------------ upstreams


@frozen
class PackageIndex:
    """A pypiserver on loopback (plain HTTP), every read behind its htpasswd user."""

    port: int
    user: str
    password: str


async def start_pypiserver(test: TestCase, packages: Mapping[str, bytes]) -> PackageIndex:
    pypi_server = os.path.join(os.path.dirname(sys.executable), "pypi-server")
    if not os.path.exists(pypi_server):
        raise AssertionError("pypiserver is not installed: pip install -e .[test]")
    folder = os.path.abspath(test.mktemp())
    directory = os.path.join(folder, "packages")
    os.makedirs(directory)
    for name, data in packages.items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
    user, password = "indexer-" + secrets.token_hex(3), "canary-" + secrets.token_hex(16)
    htpasswd = os.path.join(folder, "htpasswd")
    check(await run([require("htpasswd"), "-b", "-c", "-B", htpasswd, user, password]))
    port = free_port()
    # -a: downloads and listings need the user too, not only uploads.
    await start_server(test, [pypi_server, "run", "-i", "127.0.0.1", "-p", str(port), "-P", htpasswd,
                              "-a", "download,list,update", directory], port=port, name="pypiserver")
    return PackageIndex(port, user, password)


def listen_plain(test: TestCase, resource: Any) -> int:
    port: Any = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")  # type: ignore[attr-defined,arg-type]
    test.addCleanup(port.stopListening)
    return int(port.getHost().port)


# ------------------------------------------------------------------ pip


class PipTests(TestCase):
    """
    C{pip install} from an HTTPS index that is a listed Connector's: pip
    holds its token and the proxy CA, the proxy logs in to pypiserver.
    """

    timeout = 180

    async def _pip(self) -> None:
        filename, data = wheel("demo-tool", "1.0")
        index = await start_pypiserver(self, {filename: data})
        upstream = await start_https_upstream(self, backends=[index.port], names=("pypi.test",))
        origin = f"https://pypi.test:{upstream.fronts[0]}"
        token = "client-" + secrets.token_hex(16)
        ca_cert, ca_key = write_proxy_ca(self)
        daemon = await start_daemon_with_hosts(self, [
            *upstream_class("pypi"),
            basic_secret(NS, "index", index.user, index.password),
            secret(NS, "upstream-ca", "Opaque", **{"ca.crt": upstream.ca_pem}),
            connector(NS, "pypi", "pypi", origin, secret="index", caCertSecretRef={"name": "upstream-ca"}),
        ], {token: sa(NS)}, ["pypi.test"], ca_cert, ca_key)
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        ca_file = await fetch_ca(daemon, os.path.join(folder, "ca.crt"))
        proxy = daemon.proxy_url(token, f"{NS}/pypi")
        pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-cache-dir", "--retries", "0",
               "--index-url", f"{origin}/simple/"]
        env = {**CURL_ENV, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
               "PIP_CERT": "", "REQUESTS_CA_BUNDLE": ""}
        outputs: list[bytes] = []

        # --proxy and --cert, as docs/connect.md shows.
        first = os.path.join(folder, "first")
        result = check(await run([*pip, "--target", first, "--proxy", proxy, "--cert", ca_file, "demo-tool"], env=env))
        outputs += [result.stdout, result.stderr]
        self.assertTrue(os.path.exists(os.path.join(first, "demo_tool", "__init__.py")), result.stdout)
        # https_proxy and PIP_CERT, as a CSI volume's .env and ca.crt give them.
        second = os.path.join(folder, "second")
        result = check(await run([*pip, "--target", second, "demo-tool==1.0"],
                                 env={**env, "https_proxy": proxy, "PIP_CERT": ca_file}))
        outputs += [result.stdout, result.stderr]
        self.assertTrue(os.path.exists(os.path.join(second, "demo_tool", "__init__.py")), result.stdout)
        # Without the proxy CA, pip refuses the minted certificate.
        refused = await run([*pip, "--target", os.path.join(folder, "third"), "--proxy", proxy, "demo-tool"], env=env)
        outputs += [refused.stdout, refused.stderr]
        self.assertNotEqual(refused.returncode, 0)
        self.assertIn(b"CERTIFICATE_VERIFY_FAILED", refused.stdout + refused.stderr)

        # pypiserver saw the Connector's user on every request, never the client's token.
        entries = upstream.requests(at_least=4)
        self.assertEqual(sorted({e["request_uri"] for e in entries}), [f"/packages/{filename}", "/simple/demo-tool/"])
        self.assertEqual({e["status"] for e in entries}, {"200"})
        self.assertEqual({e["http_authorization"] for e in entries}, {basic(index.user, index.password)})
        self.assertEqual({e["ssl_server_name"] for e in entries}, {"pypi.test"})
        # The proxy's log: the requests inside the tunnels, and each CONNECT with its tunnel's bytes.
        await eventually(lambda: len([a for a in daemon.access() if a.get("mode") == "tunnel"]) >= 3,
                         what="the CONNECT lines, written when their tunnels close")
        access = daemon.access()
        inner = [(a["method"], a["path"].split("#")[0], a["status"]) for a in access if a.get("mode") == "connect"]
        self.assertEqual(sorted(set(inner)), [("GET", f"/packages/{filename}", 200), ("GET", "/simple/demo-tool/", 200)])
        tunnels = [a for a in access if a.get("mode") == "tunnel"]
        self.assertTrue(all(a["path"] == f"pypi.test:{upstream.fronts[0]}" and a["connector"] == "pypi"
                            for a in tunnels), tunnels)
        # Each counts its tunnel's bytes (TLS records each way): the two installs carried the index page
        # and the wheel, the refused one only a handshake.
        [first_tunnel, second_tunnel, refused_tunnel] = tunnels
        for installed in (first_tunnel, second_tunnel):
            self.assertGreater(installed["bytes_out"], refused_tunnel["bytes_out"] + len(data), tunnels)
            self.assertGreater(installed["bytes_in"], refused_tunnel["bytes_in"], tunnels)
        self.assertGreater(refused_tunnel["bytes_in"], 0)
        no_canary(self, [*outputs, daemon.log()], index.password)
        self.assertNotIn(base64.b64encode(f"{index.user}:{index.password}".encode()).decode(), daemon.log())
        for entry in entries:
            self.assertNotIn(token, entry["http_authorization"])

    def test_pip_install(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._pip())


# ------------------------------------------------------------------ docs/connect.md, run

PAGE = os.path.join(ROOT, "docs", "connect.md")
# Every shell and YAML block says whether it runs: test (run here), no-test, cluster (needs one).
MARKERS = {"sh": ("test", "no-test", "cluster"), "yaml": ("cluster", None)}

#: The page's example hosts, which only the proxy resolves (to loopback).
HOSTS = ("api.example.com", "git.example.com", "harbor.example.com", "pypi.example.com", "registry.example.com",
         "kubernetes.example.com", "maven.example.com")


class PageStructureTests(SynchronousTestCase):
    """docs/connect.md marks every block, and the recipes the issue names are among those run."""

    def test_markers(self) -> None:
        found = page_blocks(PAGE)
        for block in found:
            if block.language in MARKERS:
                self.assertIn(block.marker, MARKERS[block.language], f"docs/connect.md:{block.line}")
        tested = "\n".join(b.text for b in found if (b.language, b.marker) == ("sh", "test"))
        for command in ("openssl req", "connectors_proxy.clientconfig files", "skopeo copy", "skopeo inspect",
                        "--tls-verify=false", "mvn ", "npm install", "pip install", "kubectl ", "curl -x",
                        "git -c http.sslCAInfo"):
            self.assertIn(command, tested)


def _maven_repository(password: str) -> tuple[Files, str]:
    """
    A Maven repository (under C{/maven2}) holding a build extension and the
    plexus-utils Maven adds to every extension, for C{deployer:password}
    only; and the Basic header it wants.
    """
    jar = io.BytesIO()
    with zipfile.ZipFile(jar, "w") as z:
        z.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\n")
    files: dict[bytes, tuple[bytes, bytes]] = {}
    for group, name, version in (("org/example", "canary-ext", "1.0"), ("org/codehaus/plexus", "plexus-utils", "1.1")):
        pom = ("<project xmlns=\"http://maven.apache.org/POM/4.0.0\"><modelVersion>4.0.0</modelVersion>"
               f"<groupId>{group.replace('/', '.')}</groupId><artifactId>{name}</artifactId>"
               f"<version>{version}</version><packaging>jar</packaging></project>\n").encode()
        for file, data in ((f"{name}-{version}.pom", pom), (f"{name}-{version}.jar", jar.getvalue())):
            path = f"/maven2/{group}/{name}/{version}/{file}".encode()
            files[path] = (b"application/octet-stream", data)
            files[path + b".sha1"] = (b"text/plain", hashlib.sha1(data).hexdigest().encode())
    header = basic("deployer", password)
    return Files(files, header.encode()), header


PROJECT_POM = ("<project xmlns=\"http://maven.apache.org/POM/4.0.0\"><modelVersion>4.0.0</modelVersion>"
               "<groupId>org.example</groupId><artifactId>app</artifactId><version>1</version>"
               "<packaging>pom</packaging><build><extensions><extension><groupId>org.example</groupId>"
               "<artifactId>canary-ext</artifactId><version>1.0</version></extension></extensions></build>"
               "</project>\n")


class ConnectPageTests(TestCase):
    """
    The C{sh test} blocks of docs/connect.md, in order, with C{bash -euo
    pipefail} in one folder and an empty C{HOME}: the example hosts are
    upstreams on loopback behind TLS (only their ports are added to the
    names), C{/connectors} is where the page's C{clientconfig} block writes.
    """

    timeout = 300

    async def _page(self) -> None:
        folder = os.path.abspath(self.mktemp())
        work, home = os.path.join(folder, "work"), os.path.join(folder, "home")
        os.makedirs(work)
        os.makedirs(home)

        # The upstreams (plain HTTP), then one nginx in front of them all, with TLS for every example host.
        git = await start_git_server(self)
        await git.create_repo("team/app")
        registry_user, registry_password = "pusher-" + secrets.token_hex(3), "canary-" + secrets.token_hex(16)
        token_server = TokenServer(users={registry_user: registry_password})
        token_server.listen(self)
        registry_port = free_port()
        filename, wheel_data = wheel("demo-tool", "1.0")
        index = await start_pypiserver(self, {filename: wheel_data})
        npm_password = "canary-" + secrets.token_hex(16)
        npm = Files({}, basic("reader", npm_password).encode())
        npm_port = listen_plain(self, npm)
        kube, kube_server = start_fake_kube(self, reactor)
        maven_password = "canary-" + secrets.token_hex(16)
        maven, maven_header = _maven_repository(maven_password)
        maven_port = listen_plain(self, maven)
        upstream = await start_https_upstream(
            self, backends=[git.port, registry_port, token_server.port, index.port, npm_port, kube_server.port,
                            maven_port], names=HOSTS)
        git_front, registry_front, token_front, pypi_front, npm_front, kube_front, maven_front = upstream.fronts
        await start_registry_trusting(self, token_server, f"https://harbor.example.com:{token_front}/token",
                                      registry_port)
        upstream.write_file("basic/v1/things", b'{"things": ["through CONNECT"]}\n')
        npm_origin = f"https://registry.example.com:{npm_front}"
        package = tarball({"package/package.json": b'{"name": "left-pad", "version": "1.3.0"}\n'})
        npm.files.update({
            b"/left-pad": (b"application/json", json.dumps({
                "name": "left-pad", "dist-tags": {"latest": "1.3.0"},
                "versions": {"1.3.0": {"name": "left-pad", "version": "1.3.0", "dist": {
                    "tarball": f"{npm_origin}/left-pad/-/left-pad-1.3.0.tgz",
                    "shasum": hashlib.sha1(package).hexdigest()}}}}).encode()),
            b"/left-pad/-/left-pad-1.3.0.tgz": (b"application/octet-stream", package),
        })
        image = await build_image("docs-connect", (2000, 3000), tag="1.0")
        shutil.copytree(image.layout, os.path.join(work, "image"))
        with open(os.path.join(work, "pom.xml"), "w") as f:
            f.write(PROJECT_POM)

        # The Connectors of the page's examples, and the client's token.
        token = "client-" + secrets.token_hex(16)
        ca: dict[str, Any] = {"caCertSecretRef": {"name": "upstream-ca"}}
        classes = [connector_class("rest"), *(d for name in ("git", "harbor", "pypi", "npm", "k8s", "maven")
                                              for d in upstream_class(name))]
        connectors = [
            connector(NS, "api", "rest", f"https://api.example.com:{upstream.port}/basic", secret="api", **ca),
            connector(NS, "git", "git", f"https://git.example.com:{git_front}", secret="git", **ca),
            connector(NS, "harbor", "harbor", f"https://harbor.example.com:{registry_front}", secret="harbor", **ca),
            connector(NS, "pypi", "pypi", f"https://pypi.example.com:{pypi_front}", secret="pypi", **ca),
            connector(NS, "npm", "npm", npm_origin, secret="npm", **ca),
            connector(NS, "k8s", "k8s", f"https://kubernetes.example.com:{kube_front}", secret="k8s",
                      auth="bearerTokenAuth", **ca),
            connector(NS, "maven", "maven", f"https://maven.example.com:{maven_front}/maven2", secret="maven", **ca),
        ]
        secrets_ = [
            secret(NS, "upstream-ca", "Opaque", **{"ca.crt": upstream.ca_pem}),
            basic_secret(NS, "api", upstream.username, upstream.password),
            basic_secret(NS, "git", git.username, git.password),
            basic_secret(NS, "harbor", registry_user, registry_password),
            basic_secret(NS, "pypi", index.user, index.password),
            basic_secret(NS, "npm", "reader", npm_password),
            bearer_secret(NS, "k8s", kube.admin_token),
            basic_secret(NS, "maven", "deployer", maven_password),
        ]
        canaries = [upstream.password, git.password, registry_password, index.password, npm_password,
                    kube.admin_token, maven_password]
        # What the workload's side knows: the Connectors and their classes, never a Secret.
        with open(os.path.join(work, "connectors.yaml"), "w") as f:
            f.write(manifests_text([*classes, *connectors]))
        with open(os.path.join(work, "token"), "w") as f:
            f.write(token + "\n")

        env = {key: value for key, value in os.environ.items() if key not in ("GIT_SSL_CAINFO", "MAVEN_OPTS")}
        env.update(client_env(home))
        env.update({
            "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""), "PYTHONPATH": ROOT,
            "REGISTRY_AUTH_FILE": os.path.join(home, "no-auth.json"), "XDG_RUNTIME_DIR": os.path.join(home, "run"),
            # Java takes its home from the password database, not $HOME: Maven's local repository
            # must be the test's, not this machine's.
            "JAVA_TOOL_OPTIONS": f"-Duser.home={home}",
            **CURL_ENV, "HTTP_PROXY": "",
        })
        daemon: HostsDaemon | None = None

        def daemon_log() -> str:
            return daemon.log() if daemon else ""

        replacements: dict[str, str] = {
            "/connectors": os.path.join(work, "connectors"),
            "https://api.example.com": f"https://api.example.com:{upstream.port}/basic",
            "https://git.example.com": f"https://git.example.com:{git_front}",
            "harbor.example.com": f"harbor.example.com:{registry_front}",
            "https://pypi.example.com": f"https://pypi.example.com:{pypi_front}",
        }
        blocks = page_blocks(PAGE)
        [maven_proxy] = [b for b in blocks if b.language == "xml"]
        outputs: list[bytes] = []
        for block in blocks:
            if (block.language, block.marker) != ("sh", "test"):
                continue
            if "mvn " in block.text:
                # The page's https <proxy> goes beside the http one the settings configuration wrote.
                assert daemon is not None
                settings = os.path.join(work, "connectors", "settings.xml")
                with open(settings) as f:
                    text = f.read()
                entry = substitute(maven_proxy.text, {
                    "c-maven.team.svc.cluster.local": "127.0.0.1", "<port>80</port>": f"<port>{daemon.port}</port>",
                    "TOKEN": token})
                entry = entry.split("<proxies>", 1)[1].rsplit("</proxies>", 1)[0]
                self.assertIn("</proxies>", text)
                with open(settings, "w") as f:
                    f.write(text.replace("</proxies>", entry + "</proxies>", 1))
            result = await run_block(f"docs/connect.md:{block.line}", substitute(block.text, replacements), env, work,
                                     240, daemon_log)
            outputs += [result.stdout, result.stderr]
            if daemon is None and os.path.exists(os.path.join(work, "ca.key")):
                # The page's own CA is the proxy's.
                daemon = await start_daemon_with_hosts(self, [*classes, *connectors, *secrets_], {token: sa(NS)},
                                                       HOSTS, os.path.join(work, "ca.crt"), os.path.join(work, "ca.key"))
                replacements["PROXY-HOST:8080"] = f"127.0.0.1:{daemon.port}"
                replacements["PROXY-HOST:9090"] = f"127.0.0.1:{daemon.admin}"
        assert daemon is not None

        # What each recipe did, through the proxy, with the Connectors' credentials.
        self.assertIn(b'{"things": ["through CONNECT"]}\n', outputs)
        self.assertEqual([(e["request_uri"], e["status"], e["http_authorization"]) for e in upstream.requests()
                          if e["request_uri"] == "/basic/v1/things"],
                         [("/basic/v1/things", "200", basic(upstream.username, upstream.password))])
        self.assertTrue(os.path.exists(os.path.join(work, "deps", "demo_tool", "__init__.py")))
        self.assertTrue(os.path.isdir(os.path.join(work, "app", ".git")))
        self.assertTrue(os.path.exists(os.path.join(work, "node_modules", "left-pad", "package.json")))
        self.assertIn(b"/left-pad/-/left-pad-1.3.0.tgz", npm.seen)
        self.assertTrue(os.path.exists(os.path.join(home, ".m2", "repository", "org", "example", "canary-ext", "1.0",
                                                    "canary-ext-1.0.jar")))
        self.assertTrue(token_server.requests)
        self.assertEqual({r.account for r in token_server.requests}, {registry_user})
        access = daemon.access()
        # Every example host was intercepted, and only they.
        intercepted = {a["path"].rsplit(":", 1)[0] for a in access if a.get("mode") == "tunnel" and a["status"] == 200}
        self.assertEqual(intercepted, set(HOSTS))
        self.assertEqual({a["protocol"] for a in access if a.get("mode") == "tunnel" and a["status"] == 200},
                         {"connect"})
        no_canary(self, [*outputs, daemon.log()], *canaries)

    def test_page(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._page())
