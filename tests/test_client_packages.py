"""
Package managers through the proxy, configured only by the files
C{python -m connectors_proxy.clientconfig files} writes for the upstream
classes of C{k8s/classes/}:

 - C{npm} against a real C{verdaccio} registry whose packages only its
   (canary) htpasswd users may read: the generated C{.npmrc} names the
   proxy as C{proxy} (an C{http://} registry) or C{https-proxy} (an
   C{https://} one, the tunnel intercepted with the proxy's CA), and a
   placeholder C{_auth} the proxy replaces with the Connector's Secret;
 - Maven's C{mvn} with the generated C{settings.xml}, resolving one
   artifact from the Connector's repository (credentials injected) and one
   from a host no Connector lists, a stand-in for Maven Central that
   must see no credential at all.

Every byte a client shows or writes (its output, its cache in a fresh
C{HOME}, the project it installed into) and the proxy's log are scanned
for the canary credentials.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from attrs import frozen
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import DNSLookupError
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from twisted.web.static import File

from connectors_proxy import clientconfig
from connectors_proxy.tls.mint import CertificateAuthority
from connectors_proxy.upstream.forward import ForwardAgents, ForwardGuard

from .support.command import run_main
from .support.hosts import with_private_hosts
from .support.maven import maven_artifact
from .support.procs import Server, check, free_port, require, run, start_server
from .support.proxy import ProxyProcess, start_proxy, start_proxy_process, write_setup

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ROOT / "k8s" / "classes"
NS = "team"
CLIENT_USER = f"system:serviceaccount:{NS}:builder"

#: Where C{.ci/setup} installs verdaccio (outside the work tree, kept between runs).
VERDACCIO_VERSION = "6.8.0"
VERDACCIO = Path(f"/var/cache/connectors-proxy/verdaccio-{VERDACCIO_VERSION}/node_modules/.bin/verdaccio")
#: The https registry's name: only the proxy resolves it (npm sends it in its CONNECT).
REGISTRY_NAME = "registry.npm.test"


def upstream_class(name: str) -> dict[str, Any]:
    """The upstream example class C{name}, as shipped (none of our annotations)."""
    [doc] = [d for d in yaml.safe_load_all((CLASSES / f"{name}.yaml").read_text()) if d]
    return doc


def basic_connector(name: str, cls: str, address: str, secret: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "connectors.alauda.io/v1alpha1", "kind": "Connector",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"connectorClassName": cls, "address": address,
                     "auth": {"name": "basicAuth", "secretRef": {"name": secret}}, **spec}}


def basic_secret(name: str, user: str, password: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/basic-auth",
            "metadata": {"name": name, "namespace": NS}, "stringData": {"username": user, "password": password}}


def client_files(test: TestCase, objects: Sequence[dict[str, Any]], ref: str, token: str, proxy_url: str,
                 *extra: str) -> Path:
    """The folder C{clientconfig files} writes for Connector C{ref}, reached at C{proxy_url}."""
    folder = Path(test.mktemp()).resolve()
    folder.parent.mkdir(parents=True, exist_ok=True)
    manifests = folder.with_suffix(".yaml")
    manifests.write_text(yaml.safe_dump_all(list(objects)))
    token_file = folder.with_suffix(".token")
    token_file.write_text(token)
    code, out, err = run_main(clientconfig.main, [
        "files", "--manifests", str(manifests), "--connector", ref, "--token-file", str(token_file),
        "--proxy", proxy_url, "--dir", str(folder), *extra])
    test.assertEqual((code, err), (0, ""), out)
    return folder


def tree_bytes(*folders: Path) -> list[tuple[str, bytes]]:
    """Every regular file under C{folders}: (path, content)."""
    found = []
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink():
                found.append((str(path), path.read_bytes()))
    return found


def assert_no_canary(test: TestCase, outputs: Iterable[tuple[str, bytes]], *canaries: bytes) -> None:
    """None of C{canaries} in any of C{outputs} (C{(where, bytes)}), said with where it was."""
    for where, data in outputs:
        for canary in canaries:
            test.assertNotIn(canary, data, f"a canary in {where}")


def basic_forms(user: str, password: str) -> tuple[bytes, ...]:
    """A password as it may show: itself, and the Basic credentials carrying it."""
    return (password.encode(), base64.b64encode(f"{user}:{password}".encode()))


# -- npm and verdaccio ---------------------------------------------------------------

def verdaccio_program() -> str:
    """verdaccio's launcher; a failure saying how to install it when it is not there (never a skip)."""
    if not os.access(VERDACCIO, os.X_OK):
        raise AssertionError(f"verdaccio {VERDACCIO_VERSION} is not installed at {VERDACCIO}: run .ci/setup")
    return str(VERDACCIO)


@frozen
class Verdaccio:
    """A verdaccio registry for one test: only htpasswd users read or publish, no uplinks."""

    server: Server
    port: int
    scheme: str
    user: str
    password: str

    @property
    def url(self) -> str:
        """Its URL on loopback, as the test reaches it directly."""
        return f"{self.scheme}://127.0.0.1:{self.port}/"

    def _entries(self) -> list[dict[str, Any]]:
        """Its JSON log lines."""
        out = []
        for line in self.server.log().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # Node's own warnings
            if isinstance(entry, dict):
                out.append(entry)
        return out

    def headers(self) -> list[dict[str, str]]:
        """The headers of each request as verdaccio logs them (C{authorization} shown as C{<Classified>})."""
        return [dict(e["req"].get("headers") or {}) for e in self._entries() if isinstance(e.get("req"), dict)]

    def requests(self) -> list[dict[str, Any]]:
        """
        Its access lines (method, url, user, status, bytes out), as
        verdaccio logs them: each request twice, first before its body with
        no user, then when done.
        """
        return [{"method": e["request"].get("method"), "url": e["request"].get("url"), "user": e.get("user"),
                 "status": e["status"], "out": (e.get("bytes") or {}).get("out", 0)}
                for e in self._entries() if isinstance(e.get("request"), dict) and "status" in e]


async def start_verdaccio(test: TestCase, tls: tuple[str, str] | None = None) -> Verdaccio:
    """
    verdaccio on a free loopback port, its storage in the test's folder,
    readable only by a random canary user (C{$authenticated}, no sign-up);
    over HTTPS with C{tls} (certificate and key files).
    """
    program = verdaccio_program()
    folder = Path(test.mktemp()).resolve()
    folder.mkdir(parents=True)
    user, password = "reader-" + secrets.token_hex(4), "canary-" + secrets.token_hex(16)
    htpasswd = folder / "htpasswd"
    check(await run([require("htpasswd"), "-b", "-c", "-B", str(htpasswd), user, password]))
    port = free_port()
    scheme = "https" if tls else "http"
    config: dict[str, Any] = {
        "storage": str(folder / "storage"),
        "auth": {"htpasswd": {"file": str(htpasswd), "max_users": -1}},
        "packages": {"**": {"access": "$authenticated", "publish": "$authenticated",
                            "unpublish": "$authenticated"}},
        "log": {"type": "stdout", "format": "json", "level": "http"},
        "listen": f"{scheme}://127.0.0.1:{port}",
        "web": {"enable": False},
    }
    if tls:
        config["https"] = {"cert": tls[0], "key": tls[1]}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    server = await start_server(test, [program, "--config", str(folder / "config.yaml")], port=port,
                                env={"HOME": str(folder)}, name="verdaccio")
    return Verdaccio(server, port, scheme, user, password)


def npm(home: Path, *args: str, ca_file: str | None = None) -> list[str]:
    """
    C{npm ARGS} in an empty environment but for C{PATH} and a fresh
    C{HOME} (its C{~/.npmrc}, cache and logs there): nothing from this
    machine configures it, not even its global npmrc, and it checks for no
    newer npm.  C{ca_file}: more CAs Node trusts (C{NODE_EXTRA_CA_CERTS}).
    """
    env = [f"PATH={os.environ.get('PATH', '')}", f"HOME={home}",
           f"npm_config_globalconfig={home / 'no-global-npmrc'}", "npm_config_update_notifier=false"]
    if ca_file:
        env.append(f"NODE_EXTRA_CA_CERTS={ca_file}")
    return [require("env"), "-i", *env, require("npm"), *args]


async def publish(test: TestCase, registry: Verdaccio, name: str, ca_file: str | None = None) -> bytes:
    """Publish package C{name} 1.0.0 straight to C{registry} with its user; the module's text."""
    folder = Path(test.mktemp()).resolve()
    package = folder / "package"
    package.mkdir(parents=True)
    text = f"module.exports = {json.dumps('served through connectors-proxy ' + secrets.token_hex(4))};\n"
    (package / "index.js").write_text(text)
    (package / "package.json").write_text(json.dumps({"name": name, "version": "1.0.0", "main": "index.js"}))
    auth = base64.b64encode(f"{registry.user}:{registry.password}".encode()).decode()
    key = registry.url.split(":", 1)[1]
    (folder / ".npmrc").write_text(f"registry={registry.url}\n{key}:_auth={auth}\n")
    check(await run(npm(folder, "publish", "--userconfig", str(folder / ".npmrc"), ca_file=ca_file),
                    cwd=str(package)))
    return text.encode()


async def start_proxy_with_hosts(test: TestCase, args: Sequence[str], names: dict[str, str]) -> ProxyProcess:
    """The proxy daemon (as L{start_proxy_process}) resolving C{names} by a private C{/etc/hosts}."""
    port, admin = free_port(), free_port()
    argv = with_private_hosts(test, names, [
        sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.exit(run())",
        "-n", "--pidfile=", "connectors-proxy", "--listen", f"tcp:{port}:interface=127.0.0.1",
        "--admin", f"tcp:{admin}:interface=127.0.0.1", *args])
    server = await start_server(test, argv, port=port, env={"PYTHONPATH": str(ROOT)}, name="connectors-proxy")
    return ProxyProcess(server, port, admin)


class NpmTests(TestCase):
    """
    C{npm install} with only the generated C{.npmrc} in a fresh C{HOME},
    the proxy daemon standalone (manifests), verdaccio behind it.
    """

    timeout = 60

    async def _install(self, registry: Verdaccio, module: bytes, proxy: ProxyProcess,
                       objects: Sequence[dict[str, Any]], client_token: str, name: str,
                       *extra: str, ca_env: bool = False) -> None:
        folder = client_files(self, objects, f"{NS}/npm", client_token, proxy.url, *extra)
        npmrc = (folder / ".npmrc").read_text()
        home = Path(self.mktemp()).resolve()
        home.mkdir(parents=True)
        (home / ".npmrc").write_text(npmrc)
        project = home / "project"
        project.mkdir()
        seen_before, headers_before = len(registry.requests()), len(registry.headers())
        started = time.monotonic()
        # The CSI volume's ca.crt, as a pod's environment would point Node at it.
        result = await run(npm(home, "install", "--no-audit", "--no-fund", name,
                               ca_file=str(folder / "ca.crt") if ca_env else None), cwd=str(project), timeout=60)
        elapsed = time.monotonic() - started
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 0, output.decode("utf-8", "replace")[-3000:]
                         + "\n...PROXY LOG:\n" + proxy.log()[-3000:])
        self.assertEqual((project / "node_modules" / name / "index.js").read_bytes(), module)
        self.assertLess(elapsed, 30)
        # verdaccio served the metadata and the tarball to its own user,
        # which only the proxy could have named: the client holds a placeholder.
        served = registry.requests()[seen_before:]
        done = [r for r in served if r["out"]]
        self.assertEqual({(r["method"], r["url"], r["status"], r["user"]) for r in done},
                         {("GET", f"/{name}", 200, registry.user),
                          ("GET", f"/{name}/-/{name}-1.0.0.tgz", 200, registry.user)}, served)
        self.assertEqual([r for r in served if r["status"] >= 400], [])
        logged = registry.headers()[headers_before:]
        self.assertTrue(logged, "verdaccio logged no request headers to check")
        for headers in logged:
            self.assertIn("authorization", headers)
            self.assertNotIn("proxy-authorization", headers)
        outputs = [("npm output", output), ("proxy log", proxy.log().encode()),
                   ("verdaccio log", registry.server.log().encode()),
                   *tree_bytes(home)]
        assert_no_canary(self, outputs, *basic_forms(registry.user, registry.password))
        # The client's token reached the proxy only.
        assert_no_canary(self, [("verdaccio log", registry.server.log().encode())], client_token.encode())

    async def _plain(self) -> None:
        registry = await start_verdaccio(self)
        name = "connectors-canary"
        module = await publish(self, registry, name)
        client_token = "client-" + secrets.token_hex(12)
        objects = [upstream_class("npm"), basic_connector("npm", "npm", registry.url, "npm-cred"),
                   basic_secret("npm-cred", registry.user, registry.password)]
        proxy = await start_proxy_process(self, write_setup(self, objects, {client_token: CLIENT_USER}))
        await self._install(registry, module, proxy, objects, client_token, name)
        self.assertIn(f"GET {registry.url}{name}", proxy.log())

    def test_http_registry_through_proxy(self) -> Deferred[None]:
        """An C{http://} registry: npm sends absolute-form requests to C{proxy}."""
        return Deferred.fromCoroutine(self._plain())

    async def _tls(self) -> None:
        # The registry's own CA (the Connector trusts it through its
        # caCertSecretRef), and the proxy's CA that mints the certificate
        # npm sees inside its CONNECT tunnel.
        folder = Path(self.mktemp()).resolve()
        folder.mkdir(parents=True)
        now = time.time()
        upstream_ca = CertificateAuthority.generate("verdaccio CA " + secrets.token_hex(3), now)
        leaf = upstream_ca.mint([REGISTRY_NAME, "127.0.0.1"], now)
        (folder / "registry.crt").write_bytes(leaf.cert_pem())
        (folder / "registry.key").write_bytes(leaf.key_pem())
        (folder / "upstream-ca.crt").write_bytes(upstream_ca.cert_pem())
        proxy_ca = CertificateAuthority.generate("proxy CA " + secrets.token_hex(3), now)
        (folder / "proxy-ca.crt").write_bytes(proxy_ca.cert_pem())
        (folder / "proxy-ca.key").write_bytes(proxy_ca.key_pem())
        registry = await start_verdaccio(self, tls=(str(folder / "registry.crt"), str(folder / "registry.key")))
        name = "connectors-canary-tls"
        module = await publish(self, registry, name, ca_file=str(folder / "upstream-ca.crt"))
        client_token = "client-" + secrets.token_hex(12)
        address = f"https://{REGISTRY_NAME}:{registry.port}/"
        ca_secret = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                     "metadata": {"name": "npm-ca", "namespace": NS},
                     "stringData": {"ca.crt": upstream_ca.cert_pem().decode()}}
        objects = [upstream_class("npm"),
                   basic_connector("npm", "npm", address, "npm-cred", caCertSecretRef={"name": "npm-ca"}),
                   basic_secret("npm-cred", registry.user, registry.password), ca_secret]
        proxy = await start_proxy_with_hosts(self, [*write_setup(self, objects, {client_token: CLIENT_USER}),
                                                    "--proxy-ca-cert", str(folder / "proxy-ca.crt"),
                                                    "--proxy-ca-key", str(folder / "proxy-ca.key")],
                                             {REGISTRY_NAME: "127.0.0.1"})
        await self._install(registry, module, proxy, objects, client_token, name,
                            "--ca-file", str(folder / "proxy-ca.crt"), ca_env=True)
        # npm's requests were relayed inside the intercepted tunnel.
        self.assertIn(f'"CONNECT {REGISTRY_NAME}:{registry.port}" 200', proxy.log())
        self.assertIn(f'"GET /{name}" 200', proxy.log())
        self.assertIn("mode=connect", proxy.log())

    def test_https_registry_through_https_proxy(self) -> Deferred[None]:
        """
        An C{https://} registry: npm opens a C{CONNECT} tunnel to
        C{https-proxy} (the same plain-HTTP proxy URL), which the proxy
        intercepts with its CA (the volume's C{ca.crt}) to inject the
        credentials.
        """
        return Deferred.fromCoroutine(self._tls())


# -- Maven -----------------------------------------------------------------------------

#: The stand-in for Maven Central: a name only the proxy resolves (its test resolver).
CENTRAL_NAME = "central.unlisted.test"


class Repository(Resource):
    """
    A Maven repository (C{root}'s files) that records each request's
    headers; with C{authorization}, it serves only requests carrying it.
    """

    def __init__(self, root: Path, authorization: bytes | None = None) -> None:
        super().__init__()
        self.root = root
        self.authorization = authorization
        self.seen: list[tuple[bytes, dict[bytes, list[bytes]]]] = []

    def getChildWithDefault(self, path: bytes, request: Request) -> Any:  # type: ignore[override]
        self.seen.append((request.uri, {k.lower(): list(v) for k, v in request.requestHeaders.getAllRawHeaders()}))
        if self.authorization is not None and request.getHeader(b"authorization") != self.authorization:
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", b'Basic realm="repo"')
            return Resource.getChildWithDefault(self, path, request)
        return File(str(self.root)).getChildWithDefault(path, request)


def resolve_central() -> Any:
    """A resolver that knows L{CENTRAL_NAME} only (at loopback), as the proxy's private C{/etc/hosts} would."""

    def resolve(host: str, port: int) -> Deferred[Sequence[str]]:
        if host == CENTRAL_NAME:
            return succeed(["127.0.0.1"])
        return fail(DNSLookupError(host))

    return resolve


class MavenTests(TestCase):
    """
    C{mvn} with the generated C{settings.xml} (the proxy as Maven's HTTP
    proxy, for every host but C{localhost}): build extensions from the
    Connector's repository and from a host no Connector lists.

    The unlisted host is a stand-in for Maven Central on loopback, named
    L{CENTRAL_NAME}: mvn hands the name to its proxy and never resolves it,
    so the artifacts can only have come through the proxy.  The daemon's
    forward-proxy guard refuses loopback targets under no Connector and
    has no switch to allow one (on purpose), so this proxy runs in the
    test's reactor, its unlisted relay given a resolver that knows that one
    name and a guard that lets through that one loopback port, as
    C{tests.test_connect} and C{tests.test_upstream_compat} reach their
    stand-ins for the internet.
    """

    timeout = 90

    async def _maven(self) -> None:
        mvn = require("mvn")
        repo_user, repo_password = "deployer", "canary-" + secrets.token_hex(12)
        expected = b"Basic " + base64.b64encode(f"{repo_user}:{repo_password}".encode())
        files = Path(self.mktemp()).resolve()
        maven_artifact(files / "listed" / "maven2", "org.example", "canary-ext", "1.0")
        # Maven adds plexus-utils to every build extension: found at "Central" only.
        maven_artifact(files / "central" / "maven2", "org.example.open", "open-ext", "1.0")
        maven_artifact(files / "central" / "maven2", "org.codehaus.plexus", "plexus-utils", "1.1")
        listed_repo = Repository(files / "listed", expected)
        central = Repository(files / "central")
        listening: list[Any] = [reactor.listenTCP(0, Site(r), interface="127.0.0.1")  # type: ignore[arg-type]
                                for r in (listed_repo, central)]
        for port in listening:
            self.addCleanup(port.stopListening)
        listed_url = f"http://127.0.0.1:{listening[0].getHost().port}/maven2"
        central_port = listening[1].getHost().port
        central_url = f"http://{CENTRAL_NAME}:{central_port}/maven2"

        client_token = "client-" + secrets.token_hex(12)
        objects = [upstream_class("maven"), basic_connector("repo", "maven", listed_url, "repo-cred"),
                   basic_secret("repo-cred", repo_user, repo_password)]
        proxy = await start_proxy(self, objects, {client_token: CLIENT_USER})
        forward = ForwardAgents(reactor, guard=ForwardGuard(exempt=frozenset({("127.0.0.1", central_port)})),
                                resolve=resolve_central())
        proxy.root.forward_agents = forward
        self.addCleanup(forward.close)
        folder = client_files(self, objects, f"{NS}/repo", client_token, proxy.url)

        home = Path(self.mktemp()).resolve()
        project = home / "project"
        project.mkdir(parents=True)

        def repositories(kind: str) -> str:
            # "central" replaces Maven's own: nothing goes to the internet.
            return "".join(f"<{kind}><id>{rid}</id><url>{url}</url></{kind}>"
                           for rid, url in (("connector", listed_url), ("central", central_url)))

        (project / "pom.xml").write_text(
            '<project xmlns="http://maven.apache.org/POM/4.0.0"><modelVersion>4.0.0</modelVersion>'
            "<groupId>org.example</groupId><artifactId>app</artifactId><version>1</version>"
            "<packaging>pom</packaging>"
            f"<repositories>{repositories('repository')}</repositories>"
            f"<pluginRepositories>{repositories('pluginRepository')}</pluginRepositories>"
            "<build><extensions>"
            "<extension><groupId>org.example</groupId><artifactId>canary-ext</artifactId><version>1.0</version>"
            "</extension>"
            "<extension><groupId>org.example.open</groupId><artifactId>open-ext</artifactId><version>1.0</version>"
            "</extension>"
            "</extensions></build></project>\n")
        # Maven's default global settings block http:// repositories off
        # localhost (the real Central is https://, a CONNECT tunnel the proxy
        # cannot look into); this stand-in speaks plain http so that the
        # request it gets is the one the proxy relayed, headers and all.
        global_settings = home / "global-settings.xml"
        global_settings.write_text('<settings xmlns="http://maven.apache.org/SETTINGS/1.2.0"/>\n')
        local = home / "m2"
        started = time.monotonic()
        result = await run([mvn, "-B", "-e", "-s", str(folder / "settings.xml"), "-gs", str(global_settings),
                            f"-Dmaven.repo.local={local}", "validate"], cwd=str(project), timeout=60,
                           env={"HOME": str(home), "MAVEN_OPTS": "-Xshare:auto", "http_proxy": "",
                                "https_proxy": "", "no_proxy": "", "MAVEN_ARGS": ""})
        elapsed = time.monotonic() - started
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 0, output.decode("utf-8", "replace")[-3000:]
                         + "\n...PROXY LOG:\n" + proxy.logs.text()[-3000:])
        self.assertLess(elapsed, 30)
        for group, name in (("org/example", "canary-ext"), ("org/example/open", "open-ext"),
                            ("org/codehaus/plexus", "plexus-utils")):
            version = "1.1" if name == "plexus-utils" else "1.0"
            self.assertTrue((local / group / name / version / f"{name}-{version}.jar").is_file(), name)

        # The listed repository: the Connector's credentials, injected.
        self.assertIn(expected, [h.get(b"authorization", [b""])[0] for _, h in listed_repo.seen])
        # The unlisted host: reached by its name, through the proxy, with no credential of any kind.
        served = [uri for uri, _ in central.seen]
        self.assertIn(b"/maven2/org/example/open/open-ext/1.0/open-ext-1.0.jar", served)
        self.assertIn(b"/maven2/org/codehaus/plexus/plexus-utils/1.1/plexus-utils-1.1.jar", served)
        placeholder = base64.b64encode(f"{clientconfig.CONNECTOR_USER}:".encode())
        for uri, headers in central.seen:
            self.assertEqual(headers.get(b"host"), [f"{CENTRAL_NAME}:{central_port}".encode()], uri)
            self.assertNotIn(b"authorization", headers, uri)
            self.assertNotIn(b"proxy-authorization", headers, uri)
            values = b"\n".join(v for vs in headers.values() for v in vs)
            for secret in (client_token.encode(), repo_password.encode(), expected, placeholder):
                self.assertNotIn(secret, values, uri)
        log = proxy.logs.text()
        self.assertIn(f"GET {central_url}/org/example/open/open-ext/1.0/open-ext-1.0.jar", log)
        outputs = [("mvn output", output), ("proxy log", log.encode()), *tree_bytes(home)]
        assert_no_canary(self, outputs, repo_password.encode(), expected, base64.b64encode(
            f"{repo_user}:{repo_password}".encode()))

    def test_listed_and_unlisted_repositories(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._maven())
