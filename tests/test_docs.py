"""
The client pages of C{docs/clients/} are run, so they cannot rot (issue 17,
item 6).

Each page's C{yaml manifest} blocks (with the upstream class from
C{k8s/classes/}) are loaded into a proxy started here; the example hosts
of the page (C{git.example.com}, ...) are replaced by real or fake upstreams
on loopback, and the documented credentials by the fixtures' random ones;
then every C{sh test} block runs with C{bash -euo pipefail}, in order, in
one empty folder with an empty C{HOME}, with C{PROXY} and C{TOKEN} set as
the pages say.  A block that fails fails the test with its output.  No
output may carry an upstream credential: the workload is secretless.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import secrets
import shutil
import subprocess
import time
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import yaml
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from connectors_proxy.tls.mint import CertificateAuthority

from .support.docs import Block, client_env, page_blocks, run_block, substitute
from .support.gitserver import start_git_server
from .support.procs import check, run
from .support.proxy import ROOT, sa, start_proxy
from .support.registry import build_image, skopeo, start_basic_registry, start_token_registry

PAGES = os.path.join(ROOT, "docs", "clients")
CLASSES = os.path.join(ROOT, "k8s", "classes")
PAGE_NAMES = ("git", "gitlab", "oci", "maven", "npm", "pypi", "k8s")
MARKERS = {"sh": ("test", "no-test", "cluster"), "yaml": ("manifest", "cluster", None)}


def blocks(page: str) -> list[Block]:
    """The fenced blocks of C{docs/clients/PAGE.md}, in order."""
    return page_blocks(os.path.join(PAGES, page + ".md"))


def _tls_listener(folder: str) -> tuple[str, str]:
    """A C{cptls:} endpoint on loopback with a fresh CA (and a certificate for localhost); the CA's file."""
    now = time.time()
    ca = CertificateAuthority.generate(f"docs test CA {secrets.token_hex(3)}", now)
    leaf = ca.mint(["localhost", "127.0.0.1"], now)
    paths = {}
    for name, data in (("tls.crt", leaf.cert_pem()), ("tls.key", leaf.key_pem()),
                       ("ca.crt", ca.cert_pem()), ("ca.key", ca.key_pem())):
        paths[name] = os.path.join(folder, name)
        with open(paths[name], "wb") as f:
            f.write(data)
    endpoint = (f"cptls:0:certKey={paths['tls.crt']}:privateKey={paths['tls.key']}:caCert={paths['ca.crt']}"
                f":caKey={paths['ca.key']}:interface=127.0.0.1")
    return endpoint, paths["ca.crt"]


class PageStructure(SynchronousTestCase):
    """Every page exists, is listed, and marks every block it has."""

    def test_pages(self) -> None:
        with open(os.path.join(PAGES, "README.md")) as f:
            index = f.read()
        for page in PAGE_NAMES:
            self.assertIn(f"]({page}.md)", index)
            found = blocks(page)
            self.assertTrue([b for b in found if (b.language, b.marker) == ("sh", "test")], page)
            self.assertTrue([b for b in found if (b.language, b.marker) == ("yaml", "manifest")], page)
            for block in found:
                if block.language in MARKERS:
                    # An unmarked shell block would be neither run nor said not to be.
                    self.assertIn(block.marker, MARKERS[block.language], f"{page}.md:{block.line}")


async def run_page(test: TestCase, page: str, hosts: Mapping[str, str], credentials: Mapping[str, str],
                   forbidden: Sequence[str] = (), tls: bool = False,
                   ) -> tuple[Any, list[subprocess.CompletedProcess[bytes]]]:
    """
    Run C{page}: its manifests (C{hosts} and C{credentials} replaced) in a
    proxy, then its C{sh test} blocks (C{hosts} replaced).  Fails on a
    block that exits non-zero, or whose output holds one of C{forbidden}
    (the upstream's credentials).  Returns the proxy and the results.

    @param tls: serve the proxy on a C{cptls:} listener (C{PROXY_URL}
        C{https://localhost:PORT}, C{PROXY_CA} its CA certificate).
    """
    found = blocks(page)
    objects: list[Any] = []
    for block in found:
        if (block.language, block.marker) == ("yaml", "manifest"):
            objects.extend(d for d in yaml.safe_load_all(substitute(substitute(block.text, credentials), hosts)) if d)
    classes = sorted({o["spec"]["connectorClassName"] for o in objects if o["kind"] == "Connector"})
    for name in classes:
        with open(os.path.join(CLASSES, name + ".yaml")) as f:
            objects.extend(d for d in yaml.safe_load_all(f) if d)
    token = "tok-" + secrets.token_hex(12)
    folder = os.path.abspath(test.mktemp())
    os.makedirs(folder)
    endpoint, ca_path = None, ""
    if tls:
        endpoint, ca_path = _tls_listener(folder)
    proxy = await start_proxy(test, objects, {token: sa("ci", "builder")}, endpoint=endpoint)
    url = f"https://localhost:{proxy.port}" if tls else proxy.url
    # The Rego evaluator processes (classes with hooks) end with the test.
    stop_rego = getattr(getattr(proxy.root, "rego", None), "stop", None)
    if stop_rego is not None:
        test.addCleanup(stop_rego)
    home, work = os.path.join(folder, "home"), os.path.join(folder, "work")
    os.makedirs(home)
    os.makedirs(work)
    env = {
        **os.environ, **client_env(home), "PROXY_URL": url, "PROXY_CA": ca_path, "TOKEN": token,
        "http_proxy": "", "https_proxy": "", "HTTP_PROXY": "", "HTTPS_PROXY": "", "no_proxy": "",
    }
    results = []
    for block in found:
        if (block.language, block.marker) != ("sh", "test"):
            continue
        result = await run_block(f"docs/clients/{page}.md:{block.line}", substitute(block.text, hosts), env, work,
                                 180, proxy.logs.text)
        output = result.stdout + result.stderr
        for secret in forbidden:
            test.assertNotIn(secret.encode(), output, f"docs/clients/{page}.md:{block.line}")
        results.append(result)
    for secret in forbidden:
        test.assertNotIn(secret, proxy.logs.text())
    return proxy, results


class GitPage(TestCase):
    timeout = 180

    def test_page(self) -> Deferred[None]:
        async def go() -> None:
            server = await start_git_server(self)
            await server.create_repo("team/app")
            await run_page(self, "git", {"https://git.example.com": server.base_url},
                           {"ci-bot": server.username, "the-git-servers-password": server.password},
                           forbidden=[server.password, server.authorization])
            # The push reached the server, through the proxy.
            log = check(await run(["git", "-C", server.bare_path("team/app"), "log", "--format=%s", "-1"]))
            self.assertEqual(log.stdout, b"Add BUILD.txt\n")

        return Deferred.fromCoroutine(go())


class OciPage(TestCase):
    timeout = 300

    def test_page(self) -> Deferred[None]:
        async def go() -> None:
            harbor = await start_basic_registry(self)
            registry = await start_token_registry(self)
            [(harbor_user, harbor_password)] = harbor.users.items()
            [(registry_user, registry_password)] = registry.users.items()
            image = await build_image("docs", (2048,), tag="1.0")
            check(await run(skopeo("copy", "-q", "--dest-tls-verify=false",
                                   f"--dest-creds={harbor_user}:{harbor_password}", image.reference,
                                   f"docker://{harbor.host}/library/app:1.0")))
            await run_page(self, "oci",
                           {"https://harbor.example.com": harbor.address,
                            "https://registry.example.com": registry.address},
                           {"robot$ci": harbor_user, "the-harbor-robot-secret": harbor_password,
                            "ci-pusher": registry_user, "the-registry-password": registry_password},
                           forbidden=[harbor_password, registry_password])
            # What the page pushed is in the registries.
            tags = check(await run(skopeo("list-tags", "--tls-verify=false",
                                          f"--creds={harbor_user}:{harbor_password}",
                                          f"docker://{harbor.host}/library/app")))
            self.assertIn(b'"1.0-ci"', tags.stdout)
            assert registry.token_server is not None
            self.assertGreater(registry.token_server.count(), 0)

        return Deferred.fromCoroutine(go())


class FakeGitLab(Resource):
    """The few GitLab API calls the page makes, answered only with the right C{PRIVATE-TOKEN}."""

    isLeaf = True

    def __init__(self, token: str) -> None:
        super().__init__()
        self.token = token
        self.seen: list[tuple[bytes, bytes | None]] = []

    def render_GET(self, request: Request) -> bytes:
        self.seen.append((request.uri, request.getHeader(b"authorization")))
        request.setHeader(b"Content-Type", b"application/json")
        if request.getHeader(b"private-token") != self.token.encode() or request.getHeader(b"authorization"):
            request.setResponseCode(401)
            return b'{"message": "401 Unauthorized"}'
        if request.uri == b"/api/v4/version":
            return b'{"version": "17.5.0-ee", "revision": "0123abcd"}'
        if request.uri == b"/api/v4/projects/team%2Fapp":
            return b'{"id": 7, "path_with_namespace": "team/app"}'
        request.setResponseCode(404)
        return b'{"message": "404 Not Found"}'


class GitLabPage(TestCase):
    timeout = 180

    def test_page(self) -> Deferred[None]:
        async def go() -> None:
            pat = "glpat-" + secrets.token_hex(10)
            upstream = FakeGitLab(pat)
            port = reactor.listenTCP(0, Site(upstream), interface="127.0.0.1")  # type: ignore[attr-defined]
            self.addCleanup(port.stopListening)
            await run_page(self, "gitlab", {"https://gitlab.example.com": f"http://127.0.0.1:{port.getHost().port}"},
                           {"glpat-the-projects-access-token": pat}, forbidden=[pat])
            self.assertEqual([uri for uri, _ in upstream.seen],
                             [b"/api/v4/version", b"/api/v4/projects/team%2Fapp", b"/api/v4/version"])

        return Deferred.fromCoroutine(go())


class Files(Resource):
    """
    A static upstream: C{files} by path (its address's path prefix
    included), answered only to requests carrying C{authorization}.
    """

    isLeaf = True

    def __init__(self, files: Mapping[bytes, tuple[bytes, bytes]], authorization: bytes) -> None:
        super().__init__()
        self.files = dict(files)
        self.authorization = authorization
        self.seen: list[bytes] = []

    def render_GET(self, request: Request) -> bytes:
        self.seen.append(request.path)
        if request.getHeader(b"authorization") != self.authorization:
            request.setResponseCode(401)
            request.setHeader(b"WWW-Authenticate", b'Basic realm="upstream"')
            return b"unauthorized\n"
        found = self.files.get(request.path)
        if found is None:
            request.setResponseCode(404)
            return b"not found\n"
        content_type, body = found
        request.setHeader(b"Content-Type", content_type)
        return body

    def render_HEAD(self, request: Request) -> bytes:
        return self.render_GET(request)


def listen(test: TestCase, resource: Resource) -> str:
    port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")  # type: ignore[attr-defined]
    test.addCleanup(port.stopListening)
    return f"http://127.0.0.1:{port.getHost().port}"


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


def wheel(name: str, version: str) -> tuple[str, bytes]:
    """A minimal pure-Python wheel: its file name and bytes."""
    dist = f"{name.replace('-', '_')}-{version}"
    files = {
        f"{name.replace('-', '_')}/__init__.py": b"",
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(
        f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}\n"
        for path, data in files.items()) + f"{dist}.dist-info/RECORD,,\n"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
        archive.writestr(f"{dist}.dist-info/RECORD", record)
    return f"{dist}-py3-none-any.whl", buffer.getvalue()


def tarball(files: Mapping[str, bytes]) -> bytes:
    import tarfile
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class MavenPage(TestCase):
    timeout = 180

    def test_page(self) -> Deferred[None]:
        async def go() -> None:
            password = "repo-" + secrets.token_hex(12)
            prefix = b"/repository/releases/org/example/app"
            pom = (b"<project><modelVersion>4.0.0</modelVersion><groupId>org.example</groupId>"
                   b"<artifactId>app</artifactId><version>1.0</version></project>\n")
            metadata = (b"<metadata><groupId>org.example</groupId><artifactId>app</artifactId><versioning>"
                        b"<latest>1.0</latest><release>1.0</release></versioning></metadata>\n")
            upstream = Files({prefix + b"/1.0/app-1.0.pom": (b"text/xml", pom),
                              prefix + b"/maven-metadata.xml": (b"text/xml", metadata)},
                             basic("deployer", password))
            address = listen(self, upstream)
            proxy, _ = await run_page(self, "maven", {"https://maven.example.com": address},
                                      {"the-repository-password": password}, forbidden=[password])
            self.assertEqual(upstream.seen, [prefix + b"/1.0/app-1.0.pom", prefix + b"/maven-metadata.xml"])

        return Deferred.fromCoroutine(go())


class NpmPage(TestCase):
    timeout = 180

    def test_page(self) -> Deferred[None]:
        async def go() -> None:
            password = "npm-" + secrets.token_hex(12)
            package = tarball({"package/package.json": b'{"name": "left-pad", "version": "1.3.0"}\n'})
            packument = {
                "name": "left-pad", "dist-tags": {"latest": "1.3.0"},
                "versions": {"1.3.0": {
                    "name": "left-pad", "version": "1.3.0",
                    "dist": {"tarball": "https://npm.example.com/left-pad/-/left-pad-1.3.0.tgz",
                             "shasum": hashlib.sha1(package).hexdigest()},
                }},
            }
            upstream = Files({b"/left-pad": (b"application/json", json.dumps(packument).encode()),
                              b"/left-pad/-/left-pad-1.3.0.tgz": (b"application/octet-stream", package)},
                             basic("reader", password))
            address = listen(self, upstream)
            _, results = await run_page(self, "npm", {"https://npm.example.com": address},
                                        {"the-npm-password": password}, forbidden=[password])
            self.assertIn(b"left-pad-1.3.0.tgz", results[0].stdout)
            self.assertIn(b"/left-pad/-/left-pad-1.3.0.tgz", upstream.seen)

        return Deferred.fromCoroutine(go())


class PypiPage(TestCase):
    timeout = 180

    def test_page(self) -> Deferred[None]:
        async def go() -> None:
            password = "index-" + secrets.token_hex(12)
            filename, data = wheel("demo-tool", "1.0")
            digest = hashlib.sha256(data).hexdigest()
            page = (f'<!DOCTYPE html><html><body><a href="../../packages/{filename}#sha256={digest}">{filename}</a>'
                    "</body></html>\n").encode()
            upstream = Files({b"/simple/demo-tool/": (b"text/html", page),
                              b"/packages/" + filename.encode(): (b"application/octet-stream", data)},
                             basic("reader", password))
            address = listen(self, upstream)
            await run_page(self, "pypi", {"https://pypi.example.com": address},
                           {"the-index-password": password}, forbidden=[password])
            self.assertEqual(upstream.seen, [b"/simple/demo-tool/", b"/packages/" + filename.encode()])

        return Deferred.fromCoroutine(go())


class K8sPage(TestCase):
    timeout = 180
    # kubectl is no Debian package of its own; machines of this project's
    # kind come with it.  Where one genuinely lacks it, say so.
    if shutil.which("kubectl") is None:
        skip = "kubectl is not installed on this machine (the page's commands need it)"

    def test_page(self) -> Deferred[None]:
        async def go() -> None:
            from connectors_proxy.testing.fakekube import start_fake_kube
            fake, server = start_fake_kube(self, reactor)
            fake.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ci"}},
                       {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "app-settings", "namespace": "ci"},
                        "data": {"greeting": "hello"}})
            await run_page(self, "k8s", {"https://kubernetes.example.com:6443": server.url},
                           {"the-target-clusters-token": fake.admin_token}, forbidden=[fake.admin_token], tls=True)

        return Deferred.fromCoroutine(go())
