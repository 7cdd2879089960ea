"""
The files the Connectors CSI driver mounts, written by
C{python -m connectors_proxy.clientconfig files} for the upstream example
classes of C{k8s/classes/}: contents checked per file kind, from manifests
and from a live Connector (fake API server); then real clients using them:
C{pip} against a local C{pypiserver}, C{mvn} against a local repository,
both through the proxy.
"""

from __future__ import annotations

import base64
import configparser
import json
import os
import secrets
import stat
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from connectors_proxy import clientconfig
from connectors_proxy.clientconfig import ClientConfigError, connector_info, render_files
from connectors_proxy.testing.fakekube import start_fake_kube

from .support.command import run_main
from .support.kubeapi import go_toolchain
from .support.maven import maven_artifact
from .support.procs import check, free_port, require, run, start_server

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ROOT / "k8s" / "classes"
TOKEN = "eyJhbGciOiJSUzI1NiJ9.client-token_0123456789"
BUILTINS = {".env", "http.proxy", "https.proxy", "context.token", "connector.status.proxyAddress"}


def upstream_class(name: str) -> dict[str, Any]:
    [doc] = [d for d in yaml.safe_load_all((CLASSES / f"{name}.yaml").read_text()) if d]
    return doc


def connector(name: str, cls: str, address: str, ns: str = "team", url: str | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"apiVersion": "connectors.alauda.io/v1alpha1", "kind": "Connector",
                           "metadata": {"name": name, "namespace": ns},
                           "spec": {"connectorClassName": cls, "address": address}}
    if url is not None:
        doc["status"] = {"proxy": {"httpAddress": {"url": url}}}
    return doc


def info(name: str, cls: str, address: str, ns: str = "team", url: str | None = None,
         proxy: str | None = None) -> clientconfig.ConnectorInfo:
    return connector_info(connector(name, cls, address, ns, url), upstream_class(cls), proxy=proxy)


def files_for(cls: str, address: str = "https://tool.example.com", name: str = "c1", **kw: Any) -> dict[str, str]:
    proxy = kw.pop("proxy", None)
    return render_files([info(name, cls, address, proxy=proxy)], TOKEN, **kw)


def proxy_user(url: str) -> tuple[str, str, str]:
    """(user, password, host:port) of a forward-proxy URL, decoded."""
    parts = urlsplit(url)
    return unquote(parts.username or ""), unquote(parts.password or ""), parts.netloc.rsplit("@", 1)[1]


class ProxyAddressTests(SynchronousTestCase):
    def test_status_address_first(self) -> None:
        c = info("r", "oci", "https://registry.example.com", url="http://c-r.team.svc.k.local/namespaces/team/connectors/r")
        self.assertEqual(c.proxy_address, "http://c-r.team.svc.k.local/namespaces/team/connectors/r")

    def test_computed_like_the_proxy_writes_it(self) -> None:
        """No status yet: host form, path form for path-resolver classes."""
        self.assertEqual(info("r", "oci", "https://r.example.com").proxy_address,
                         "http://c-r.team.svc.cluster.local/namespaces/team/connectors/r")
        self.assertEqual(info("g", "git", "https://g.example.com").proxy_address, "http://c-g.team.svc.cluster.local")
        self.assertEqual(info("g", "git", "https://g.example.com").cls.proxy_address,
                         "http://connectors-proxy-service.connectors-system.svc.cluster.local")

    def test_explicit_proxy_url_is_path_form(self) -> None:
        c = info("g", "git", "https://g.example.com", url="http://c-g.team.svc.cluster.local",
                 proxy="http://127.0.0.1:8080/")
        self.assertEqual(c.proxy_address, "http://127.0.0.1:8080/namespaces/team/connectors/g")

    def test_class_without_proxy(self) -> None:
        cls = upstream_class("git")
        del cls["spec"]["proxy"]
        with self.assertRaises(ClientConfigError) as e:
            connector_info(connector("g", "git", "https://g"), cls)
        self.assertIn("has no spec.proxy", str(e.exception))


class BuiltinFileTests(SynchronousTestCase):
    def test_every_class_gets_the_builtins(self) -> None:
        for name in ("git", "github", "gitlab", "oci", "harbor", "maven", "npm", "pypi", "k8s", "sonarqube",
                     "nexus", "jfrog"):
            files = files_for(name, params={c: {"repository": "r"} for c in
                                            ("settings", "npmrc", "yarnrc", "pipconf", "pypirc")})
            self.assertLessEqual(BUILTINS, set(files), name)
            self.assertEqual(files["context.token"], TOKEN)

    def test_env_and_proxy_files(self) -> None:
        files = files_for("maven", address="http://repo.example.com/maven2")
        url = "http://team%2Fc1:" + TOKEN + "@c-c1.team.svc.cluster.local"
        self.assertEqual(files["http.proxy"], url)
        self.assertEqual(files["https.proxy"], url)
        self.assertEqual(files[".env"], f"http_proxy={url}\nhttps_proxy={url}\nno_proxy=localhost,127.0.0.1\n")
        self.assertEqual(files["connector.status.proxyAddress"], "http://c-c1.team.svc.cluster.local")
        self.assertEqual(proxy_user(url), ("team/c1", TOKEN, "c-c1.team.svc.cluster.local"))

    def test_several_connectors_listed_last_proxy_wins(self) -> None:
        connectors = [info("a", "maven", "http://a.example.com", ns="one"),
                      info("b", "npm", "http://b.example.com", ns="two", proxy="http://127.0.0.1:8080")]
        files = render_files(connectors, TOKEN)
        self.assertEqual(files["http.proxy"], f"http://one%2Fa,two%2Fb:{TOKEN}@127.0.0.1:8080")
        # Each class's own configuration is rendered over its own Connectors.
        self.assertIn("<username>one/a</username>", files["settings.xml"])
        self.assertIn("registry=http://b.example.com/", files[".npmrc"])

    def test_ca_files(self) -> None:
        files = files_for("git", ca_cert="-----BEGIN CERTIFICATE-----\n")
        self.assertEqual((files["ca.crt"], files["ca.cert"]), ("-----BEGIN CERTIFICATE-----\n",) * 2)
        self.assertNotIn("ca.crt", files_for("git"))


class ConfigurationFileTests(SynchronousTestCase):
    def test_gitconfig(self) -> None:
        files = files_for("gitlab", address="https://gitlab.example.com/scm")
        self.assertEqual(files[".gitconfig"], clientconfig.gitconfig(
            "https://gitlab.example.com/scm", "http://c-c1.team.svc.cluster.local", TOKEN))
        self.assertIn('insteadOf = "https://gitlab.example.com/scm/"', files[".gitconfig"])

    def test_registry_config_and_buildkitd(self) -> None:
        for cls in ("oci", "harbor"):
            files = files_for(cls, address="https://registry.example.com")
            auths = json.loads(files["config.json"])["auths"]
            self.assertEqual(list(auths), ["c-c1.team.svc.cluster.local"])
            self.assertEqual(base64.b64decode(auths["c-c1.team.svc.cluster.local"]["auth"]).decode(),
                             f"connectors-proxy:{TOKEN}")
            self.assertEqual(files["buildkitd.toml"],
                             'insecure-entitlements = ["network.host", "security.insecure"]\n'
                             '[registry."c-c1.team.svc.cluster.local"]\n  http = true\n')
        standalone = files_for("oci", proxy="http://127.0.0.1:5050")
        self.assertEqual(list(json.loads(standalone["config.json"])["auths"]), ["127.0.0.1:5050"])

    def settings(self, text: str) -> dict[str, str]:
        ns = {"m": "http://maven.apache.org/SETTINGS/1.2.0"}
        root = ET.fromstring(text)
        proxy = root.find("m:proxies/m:proxy", ns)
        assert proxy is not None
        out = {child.tag.split("}")[1]: child.text or "" for child in proxy}
        mirror = root.find("m:mirrors/m:mirror", ns)
        if mirror is not None:
            out.update({"mirror." + child.tag.split("}")[1]: child.text or "" for child in mirror})
        return out

    def test_maven_settings(self) -> None:
        plain = self.settings(files_for("maven", address="http://repo.example.com/maven2",
                                        proxy="http://127.0.0.1:8080")["settings.xml"])
        self.assertEqual({k: plain[k] for k in ("id", "protocol", "host", "port", "username", "password",
                                                "nonProxyHosts")},
                         {"id": "connectors-proxy", "protocol": "http", "host": "127.0.0.1", "port": "8080",
                          "username": "team/c1", "password": TOKEN, "nonProxyHosts": "localhost"})
        self.assertNotIn("mirror.url", plain)
        mirrored = self.settings(files_for("maven", address="http://repo.example.com/maven2",
                                           params={"settings": {"useAsMirror": "true"}})["settings.xml"])
        self.assertEqual((mirrored["port"], mirrored["mirror.id"], mirrored["mirror.mirrorOf"], mirrored["mirror.url"]),
                         ("80", "connectors-mirror", "*", "http://repo.example.com/maven2"))

    def test_nexus_and_jfrog_layouts(self) -> None:
        params = {c: {"repository": "team-repo"} for c in ("settings", "npmrc", "yarnrc", "pipconf", "pypirc")}
        nexus = files_for("nexus", address="https://nexus.example.com/", name="nx", params=params)
        self.assertEqual(self.settings(nexus["settings.xml"])["mirror.url"],
                         "https://nexus.example.com/repository/team-repo")
        self.assertEqual(self.settings(nexus["settings.xml"])["mirror.id"], "nx-mirror")
        self.assertIn("registry=https://nexus.example.com/repository/team-repo/\n", nexus[".npmrc"])
        self.assertIn("//nexus.example.com/repository/team-repo/:_auth=", nexus[".npmrc"])
        pip = configparser.RawConfigParser()  # as pip reads it: '%' is no interpolation
        pip.read_string(nexus["pip.conf"])
        self.assertEqual(pip["global"]["index-url"], "https://nexus.example.com/repository/team-repo/simple")
        self.assertEqual(proxy_user(pip["global"]["proxy"])[:2], ("team/nx", TOKEN))
        jfrog = files_for("jfrog", address="https://example.jfrog.io", params=params)
        self.assertEqual(self.settings(jfrog["settings.xml"])["mirror.url"],
                         "https://example.jfrog.io/artifactory/team-repo")
        self.assertIn("registry=https://example.jfrog.io/artifactory/api/npm/team-repo/\n", jfrog[".npmrc"])
        self.assertIn("repository = https://example.jfrog.io/artifactory/api/pypi/team-repo\n", jfrog[".pypirc"])

    def test_required_parameter(self) -> None:
        with self.assertRaises(ClientConfigError) as e:
            files_for("nexus", names=["settings"])
        self.assertIn("needs parameter 'repository'", str(e.exception))

    def test_npmrc_and_yarnrc(self) -> None:
        files = files_for("npm", address="http://npm.example.com:4873/", proxy="http://127.0.0.1:8080")
        lines = files[".npmrc"].splitlines()
        self.assertEqual(lines[0], "registry=http://npm.example.com:4873/")
        key, value = lines[1].split("=", 1)
        self.assertEqual(key, "//npm.example.com:4873/:_auth")
        self.assertEqual(base64.b64decode(value).decode(), "connectors-proxy:replaced-by-the-proxy")
        self.assertEqual(lines[2:], [f"proxy=http://team%2Fc1:{TOKEN}@127.0.0.1:8080",
                                     f"https-proxy=http://team%2Fc1:{TOKEN}@127.0.0.1:8080", "strict-ssl=true"])
        publish = files_for("npm", params={"npmrc": {"registryType": "publish", "strict-ssl": "false"}})
        self.assertFalse(publish[".npmrc"].startswith("registry="))
        self.assertIn("strict-ssl=false", publish[".npmrc"])
        yarn = yaml.safe_load(files[".yarnrc.yml"])
        self.assertEqual((yarn["npmRegistryServer"], yarn["npmAlwaysAuth"], yarn["enableStrictSsl"]),
                         ("http://npm.example.com:4873", True, True))
        self.assertEqual(proxy_user(yarn["httpsProxy"]), ("team/c1", TOKEN, "127.0.0.1:8080"))

    def test_pip_conf_and_pypirc(self) -> None:
        files = files_for("pypi", address="https://pypi.example.com", name="pkgs")
        pip = configparser.RawConfigParser()
        pip.read_string(files["pip.conf"])
        self.assertEqual(dict(pip["global"]), {
            "index-url": f"http://team-pkgs:{TOKEN}@c-pkgs.team.svc.cluster.local/simple/",
            "timeout": "30", "trusted-host": "c-pkgs.team.svc.cluster.local"})
        # From outside the cluster: the cluster address, reached through the proxy's own URL.
        standalone = files_for("pypi", name="pkgs", proxy="http://127.0.0.1:8080/")
        self.assertEqual(standalone["pip.conf"], (
            f"[global]\nindex-url = http://team-pkgs:{TOKEN}@c-pkgs.team.svc.cluster.local/simple/\n"
            "proxy = http://127.0.0.1:8080\ntimeout = 30\ntrusted-host = c-pkgs.team.svc.cluster.local\n"))
        pypirc = configparser.RawConfigParser()
        pypirc.read_string(files[".pypirc"])
        self.assertEqual(pypirc["distutils"]["index-servers"].strip(), "connectors-pypi")
        self.assertEqual(dict(pypirc["connectors-pypi"]), {
            "repository": "http://c-pkgs.team.svc.cluster.local/", "username": "team-pkgs", "password": TOKEN})

    def test_kubeconfig(self) -> None:
        files = files_for("k8s", address="https://kube.example.com:6443", name="prod", ca_cert="PEM")
        config = yaml.safe_load(files["kubeconfig"])
        cluster = config["clusters"][0]["cluster"]
        self.assertEqual(cluster["server"], "https://kube.example.com:6443")
        self.assertEqual(proxy_user(cluster["proxy-url"]), ("team/prod", TOKEN, "c-prod.team.svc.cluster.local"))
        self.assertEqual(base64.b64decode(cluster["certificate-authority-data"]), b"PEM")
        self.assertEqual(config["users"][0]["user"], {"token": "fake-token"})
        self.assertEqual(config["current-context"], "prod")

    def test_sonar(self) -> None:
        files = files_for("sonarqube", address="http://sonar.example.com", name="sq")
        props = dict(line.split("=", 1) for line in files["sonar-project.properties"].splitlines())
        self.assertEqual(props, {"sonar.host.url": "http://sonar.example.com",
                                 "sonar.scanner.proxyHost": "c-sq.team.svc.cluster.local",
                                 "sonar.scanner.proxyPort": "80", "sonar.scanner.proxyUser": "team%2Fsq",
                                 "sonar.scanner.proxyPassword": TOKEN})
        https = files_for("sonarqube", address="https://sonar.example.com")["sonar-project.properties"]
        self.assertIn("sonar.scanner.proxyPort=443\n", https)

    def test_glab_config(self) -> None:
        files = files_for("gitlab", address="https://gitlab.example.com", name="gl")
        config = yaml.safe_load(files["config.yml"])
        self.assertEqual(config, {"hosts": {"c-gl.team.svc.cluster.local": {
            "token": TOKEN, "api_host": "c-gl.team.svc.cluster.local", "api_protocol": "http",
            "git_protocol": "http"}}})

    def test_configuration_names_as_the_volume_gives_them(self) -> None:
        """Chosen configurations, !FILE exclusions, and unknown names."""
        files = files_for("oci", names=["buildkitd", "!.env"])
        self.assertEqual(set(files), BUILTINS - {".env"} | {"buildkitd.toml"})
        with self.assertRaises(ClientConfigError) as e:
            files_for("oci", names=["npmrc"])
        self.assertIn("no configuration named npmrc", str(e.exception))
        # One of several not found is fine, as with the CSI driver.
        self.assertIn("config.json", files_for("oci", names=["npmrc", "registry-config"]))

    def test_every_upstream_configuration_has_a_renderer(self) -> None:
        """Each configuration of the shipped classes is rendered, and writes the files the class declares."""
        for path in sorted(CLASSES.glob("*.yaml")):
            doc = upstream_class(path.stem)
            for conf in doc["spec"].get("configurations", []):
                self.assertIn(conf["name"], clientconfig.RENDERERS, path.name)
                files = files_for(path.stem, names=[conf["name"]],
                                  params={conf["name"]: {"repository": "r"}})
                self.assertLessEqual(set(conf["data"]), set(files), f"{path.name} {conf['name']}")

    def test_no_line_breaks_in_the_token(self) -> None:
        with self.assertRaises(ValueError):
            render_files([info("g", "git", "https://g")], "a\nb")


def _go() -> str:
    go = go_toolchain()
    if go is None:
        raise AssertionError("no Go toolchain: the class templates are checked with Go's text/template")
    return go


_RENDERER: list[str] = []


def go_renderer() -> str:
    """tests/support/csitemplate.go, built once per test run."""
    if not _RENDERER:
        out = os.path.abspath(os.path.join(tempfile.mkdtemp(prefix="csitemplate-"), "csitemplate"))
        result = subprocess.run([_go(), "build", "-o", out, str(ROOT / "tests" / "support" / "csitemplate.go")],
                                capture_output=True, timeout=300, cwd=os.path.dirname(out),
                                env=dict(os.environ, GOTOOLCHAIN="local", GOFLAGS="-mod=mod"))
        if result.returncode:
            raise AssertionError(f"go build csitemplate.go failed: {result.stderr.decode()[-2000:]}")
        _RENDERER.append(out)
    return _RENDERER[0]


def template_data(ctx: clientconfig.Context) -> dict[str, Any]:
    """What the CSI driver hands a class's template (UPSTREAM-COMPAT section 6)."""
    def one(c: clientconfig.ConnectorInfo) -> dict[str, Any]:
        return {"metadata": {"name": c.name, "namespace": c.namespace}, "name": c.name,
                "spec": {"address": c.address, "connectorClassName": c.cls.name},
                "status": {"proxyAddress": c.proxy_address}}
    return {"connector": one(ctx.connector), "connectors": [one(c) for c in ctx.connectors],
            "connectorclass": {"proxyAddress": ctx.connector.cls.proxy_address},
            "context": {"token": ctx.token, "proxy": {"caCert": ctx.ca_cert or ""}},
            "configurations": dict(ctx.params)}


def same_file(name: str, go: str, python: str) -> bool:
    """Equal as data (JSON, YAML) or line by line, blank lines and indentation aside."""
    if name.endswith(".json"):
        return bool(json.loads(go) == json.loads(python))
    if name.endswith((".yml", ".yaml")) or name == "kubeconfig":
        return bool(yaml.safe_load(go) == yaml.safe_load(python))
    def lines(text: str) -> list[str]:
        return [line.strip() for line in text.splitlines() if line.strip()]
    return lines(go) == lines(python)


class TemplateAgreementTests(SynchronousTestCase):
    """
    The Go templates of k8s/classes/, rendered as the CSI driver renders
    them, give the files clientconfig writes: the classes and this command
    agree, and the templates parse and name only data the driver provides.
    """

    PARAMS = {"repository": "team-repo"}

    def check_class(self, cls: str, connectors: list[clientconfig.ConnectorInfo],
                    params: dict[str, str] | None = None) -> int:
        doc = upstream_class(cls)
        checked = 0
        for conf in doc["spec"].get("configurations", []):
            values = {p["name"]: str(p.get("default", "")) for p in conf.get("params", [])}
            values.update({k: v for k, v in (params or self.PARAMS).items() if k in values})
            python = render_files(connectors, TOKEN, [conf["name"]], {conf["name"]: values}, ca_cert="PEM\n")
            ctx = clientconfig.Context(tuple(connectors), TOKEN, values, "PEM\n")
            for filename, template in conf["data"].items():
                result = subprocess.run([go_renderer()], input=json.dumps(
                    {"template": template, "data": template_data(ctx)}).encode(), capture_output=True, timeout=60)
                self.assertEqual(result.returncode, 0, f"{cls} {conf['name']} {filename}: {result.stderr.decode()}")
                rendered = result.stdout.decode()
                self.assertTrue(same_file(filename, rendered, python[filename]),
                                f"{cls} {conf['name']} {filename}:\n--- template\n{rendered}\n--- clientconfig\n"
                                f"{python[filename]}")
                checked += 1
        return checked

    def test_every_class(self) -> None:
        checked = 0
        for path in sorted(CLASSES.glob("*.yaml")):
            checked += self.check_class(path.stem, [info("c1", path.stem, "https://tool.example.com/base")])
        self.assertGreaterEqual(checked, 25)

    def test_parameters_and_several_connectors(self) -> None:
        self.check_class("maven", [info("m", "maven", "http://repo.example.com/maven2")], {"useAsMirror": "true"})
        self.check_class("npm", [info("n", "npm", "http://npm.example.com:4873")],
                         {"registryType": "publish", "strict-ssl": "false"})
        self.check_class("maven", [info("a", "maven", "http://a.example.com", ns="one"),
                                   info("b", "maven", "http://b.example.com", ns="two")])
        self.check_class("git", [info("a", "git", "https://a.example.com"), info("b", "git", "https://b.example.com")])
        self.check_class("oci", [info("a", "oci", "https://a.example.com"), info("b", "oci", "https://b.example.com")])


class CommandTests(SynchronousTestCase):
    def main(self, *argv: str) -> tuple[int, str, str]:
        return run_main(clientconfig.main, argv)

    def setUp(self) -> None:
        self.token = self.mktemp()
        Path(self.token).write_text(TOKEN + "\n")
        self.manifests = self.mktemp()
        os.makedirs(self.manifests)
        Path(self.manifests, "objects.yaml").write_text(yaml.safe_dump_all([
            upstream_class("pypi"), upstream_class("maven"),
            connector("pkgs", "pypi", "https://pypi.example.com"),
            connector("repo", "maven", "http://repo.example.com/maven2", ns="build")]))

    def test_output_after_the_command(self) -> None:
        """clientconfig git -o FILE, as well as clientconfig -o FILE git."""
        for order in ("after", "before"):
            output = self.mktemp()
            args = ["git", "--connector", "dev/repo", "--address", "https://g", "--token-file", self.token]
            argv = [*args, "-o", output] if order == "after" else ["-o", output, *args]
            code, out, err = self.main(*argv)
            self.assertEqual((code, out, err), (0, "", ""))
            self.assertIn("insteadOf", Path(output).read_text())
            self.assertEqual(stat.S_IMODE(os.stat(output).st_mode), 0o600)

    def test_files_from_manifests(self) -> None:
        folder = self.mktemp()
        code, out, err = self.main("files", "--manifests", self.manifests, "--connector", "team/pkgs",
                                   "--token-file", self.token, "--proxy", "http://127.0.0.1:8080", "--dir", folder)
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(set(os.listdir(folder)), BUILTINS | {"pip.conf", ".pypirc"})
        for name in os.listdir(folder):
            self.assertEqual(stat.S_IMODE(os.stat(os.path.join(folder, name)).st_mode), 0o600, name)
        self.assertIn("proxy = http://127.0.0.1:8080\n", Path(folder, "pip.conf").read_text())
        self.assertEqual(Path(folder, "connector.status.proxyAddress").read_text(),
                         "http://127.0.0.1:8080/namespaces/team/connectors/pkgs")

    def test_from_manifests_reads_lists(self) -> None:
        """
        What C{kubectl get connectorclasses,connectors -o yaml} writes (a
        C{v1 List} of the objects) is read as the manifest loader reads it.
        """
        listed = self.mktemp()
        os.makedirs(listed)
        Path(listed, "exported.yaml").write_text(yaml.safe_dump(
            {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""},
             "items": [upstream_class("pypi"), connector("pkgs", "pypi", "https://pypi.example.com")]}))
        [found] = clientconfig.from_manifests([listed], [("team", "pkgs")], proxy="http://127.0.0.1:8080")
        self.assertEqual((found.namespace, found.name, found.cls.name, found.proxy_address),
                         ("team", "pkgs", "pypi", "http://127.0.0.1:8080/namespaces/team/connectors/pkgs"))
        self.assertEqual(found.cls.configurations, info("pkgs", "pypi", "https://pypi.example.com").cls.configurations)
        Path(listed, "broken.yaml").write_text("kind: [broken\n")
        with self.assertRaises(ClientConfigError) as raised:
            clientconfig.from_manifests([listed], [("team", "pkgs")])
        self.assertIn("broken.yaml: line 2: invalid YAML", str(raised.exception))

    def test_one_file_and_namespace_option(self) -> None:
        code, out, err = self.main("files", "--manifests", self.manifests, "--connector", "repo",
                                   "--namespace", "build", "--token-file", self.token, "--only", "settings.xml",
                                   "--params", '{"settings": {"useAsMirror": "true"}}')
        self.assertEqual((code, err), (0, ""))
        self.assertIn("<username>build/repo</username>", out)
        self.assertIn("<url>http://repo.example.com/maven2</url>", out)

    def test_errors_are_one_line(self) -> None:
        cases = [
            (["--connector", "team/nope", "--dir", "x"], "no Connector team/nope"),
            (["--connector", "team/pkgs"], "give --dir DIR"),
            (["--connector", "team/pkgs", "--only", "settings.xml"], "no file settings.xml"),
            (["--connector", "team/pkgs", "--configurations", "kubeconfig", "--dir", "x"], "no configuration named"),
        ]
        for extra, message in cases:
            code, out, err = self.main("files", "--manifests", self.manifests, "--token-file", self.token, *extra)
            self.assertEqual(code, 2, extra)
            self.assertIn(message, err)
            self.assertEqual(len(err.splitlines()), 1, err)
        code, _, err = self.main("files", "--manifests", self.manifests, "--token-file", self.token,
                                 "--connector", "team/pkgs", "--params", "[1]")
        self.assertEqual(code, 2)
        self.assertIn("--params must be", err)


class LiveConnectorTests(TestCase):
    """C{files --kubeconfig}: the Connector and its class as the API server has them, status address included."""

    timeout = 60

    async def _live(self) -> None:
        fake, server = start_fake_kube(self, reactor)
        fake.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team"}},
                   upstream_class("oci"),
                   connector("registry", "oci", "https://registry.example.com",
                             url="http://c-registry.team.svc.corp.local/namespaces/team/connectors/registry"))
        kubeconfig = server.write_kubeconfig(self.mktemp() + ".kubeconfig")
        token = self.mktemp()
        Path(token).write_text(TOKEN)
        folder = self.mktemp()
        env = {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        result = check(await run([sys.executable, "-m", "connectors_proxy.clientconfig", "files",
                                  "--kubeconfig", kubeconfig, "--connector", "team/registry",
                                  "--token-file", token, "--dir", folder], env=env))
        self.assertEqual(result.stderr, b"")
        auths = json.loads(Path(folder, "config.json").read_text())["auths"]
        self.assertEqual(list(auths), ["c-registry.team.svc.corp.local"])
        self.assertEqual(Path(folder, "connector.status.proxyAddress").read_text(),
                         "http://c-registry.team.svc.corp.local/namespaces/team/connectors/registry")
        self.assertIn('[registry."c-registry.team.svc.corp.local"]', Path(folder, "buildkitd.toml").read_text())
        missing = await run([sys.executable, "-m", "connectors_proxy.clientconfig", "files",
                             "--kubeconfig", kubeconfig, "--connector", "team/absent",
                             "--token-file", token, "--dir", folder], env=env)
        self.assertEqual(missing.returncode, 2)
        self.assertIn(b"Connector team/absent: 404", missing.stderr)
        self.assertEqual(len(missing.stderr.splitlines()), 1, missing.stderr)

    def test_files_from_a_live_connector(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._live())


# -- real clients --------------------------------------------------------------

def tiny_wheel(folder: str, name: str = "connectors_canary", version: str = "1.0") -> str:
    """A minimal pure-Python wheel (one module), built by hand: no build tools needed."""
    dist = f"{name}-{version}"
    path = os.path.join(folder, f"{dist}-py3-none-any.whl")
    files = {
        f"{name}.py": "VALUE = 'served through connectors-proxy'\n",
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    import hashlib

    record = []
    for arc, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{arc},sha256={digest},{len(text.encode())}")
    record.append(f"{dist}.dist-info/RECORD,,")
    with zipfile.ZipFile(path, "w") as z:
        for arc, text in files.items():
            z.writestr(arc, text)
        z.writestr(f"{dist}.dist-info/RECORD", "\n".join(record) + "\n")
    return path


class RealClientTests(TestCase):
    """
    Standalone proxy processes serving upstream classes, clients configured
    only by the files C{clientconfig files} writes.
    """

    timeout = 180

    async def proxy(self, objects: list[dict[str, Any]], client_token: str) -> Any:
        from .support.proxy import start_proxy_process, write_setup

        args = write_setup(self, objects, {client_token: "system:serviceaccount:team:builder"})
        return await start_proxy_process(self, args)

    async def client_files(self, objects: list[dict[str, Any]], ref: str, token: str, proxy_url: str,
                           *extra: str) -> Path:
        manifests = self.mktemp()
        Path(manifests).write_text(yaml.safe_dump_all(objects))
        token_file = self.mktemp()
        Path(token_file).write_text(token)
        folder = Path(self.mktemp()).resolve()
        env = {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        check(await run([sys.executable, "-m", "connectors_proxy.clientconfig", "files", "--manifests", manifests,
                         "--connector", ref, "--token-file", token_file, "--proxy", proxy_url, "--dir", str(folder),
                         *extra], env=env))
        return folder

    async def _pip(self) -> None:
        pypi_server = os.path.join(os.path.dirname(sys.executable), "pypi-server")
        if not os.path.exists(pypi_server):
            raise AssertionError("pypiserver is not installed: pip install -e .[test]")
        packages = self.mktemp()
        os.makedirs(packages)
        tiny_wheel(packages)
        index_user, index_password = "indexer", "canary-" + secrets.token_hex(12)
        htpasswd = os.path.join(packages, "..", "htpasswd")
        check(await run([require("htpasswd"), "-b", "-c", "-B", htpasswd, index_user, index_password]))
        port = free_port()
        await start_server(self, [pypi_server, "run", "-i", "127.0.0.1", "-p", str(port), "-P", htpasswd,
                                  "-a", "download,list,update", packages], port=port, name="pypiserver")
        client_token = "client-" + secrets.token_hex(12)
        secret = {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/basic-auth",
                  "metadata": {"name": "index-cred", "namespace": "team"},
                  "stringData": {"username": index_user, "password": index_password}}
        pkgs = connector("pkgs", "pypi", f"http://127.0.0.1:{port}")
        pkgs["spec"]["auth"] = {"name": "basicAuth", "secretRef": {"name": "index-cred"}}
        objects = [upstream_class("pypi"), pkgs, secret]
        proxy = await self.proxy(objects, client_token)
        folder = await self.client_files(objects, "team/pkgs", client_token, proxy.url)
        target = self.mktemp()
        result = check(await run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-cache-dir",
                                  "--disable-pip-version-check", "--target", target, "connectors_canary"],
                                 env={"PIP_CONFIG_FILE": str(folder / "pip.conf"), "PIP_NO_INPUT": "1",
                                      "PIP_FIND_LINKS": "", "http_proxy": "", "https_proxy": "", "no_proxy": ""}))
        self.assertTrue(os.path.exists(os.path.join(target, "connectors_canary.py")))
        visible = result.stdout + result.stderr + proxy.log().encode()
        self.assertNotIn(index_password.encode(), visible)
        self.assertNotIn(base64.b64encode(f"{index_user}:{index_password}".encode()), visible)

    def test_pip_with_the_generated_pip_conf(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._pip())

    async def _maven(self) -> None:
        """
        mvn with the generated settings.xml (useAsMirror): Maven resolves a
        build extension from a password-protected repository through the
        proxy as its HTTP proxy, and the proxy injects the repository's
        credentials; mvn never holds them.
        """
        from twisted.web.resource import Resource
        from twisted.web.server import Request, Site
        from twisted.web.static import File

        mvn = require("mvn")
        repo_user, repo_password = "deployer", "canary-" + secrets.token_hex(12)
        expected = b"Basic " + base64.b64encode(f"{repo_user}:{repo_password}".encode())
        root = Path(self.mktemp())
        # The extension, and the plexus-utils Maven adds to every build extension.
        maven_artifact(root / "maven2", "org.example", "canary-ext", "1.0")
        maven_artifact(root / "maven2", "org.codehaus.plexus", "plexus-utils", "1.1")
        seen: list[bytes] = []

        class Guarded(Resource):
            """The repository: files only for the Connector's credentials."""

            def getChildWithDefault(self, path: bytes, request: Request) -> Any:  # type: ignore[override]
                seen.append(request.getHeader(b"authorization") or b"")
                if request.getHeader(b"authorization") != expected:
                    request.setResponseCode(401)
                    request.setHeader(b"www-authenticate", b'Basic realm="repo"')
                    return Resource.getChildWithDefault(self, path, request)
                return File(str(root)).getChildWithDefault(path, request)

        listening = reactor.listenTCP(0, Site(Guarded()), interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        address = f"http://127.0.0.1:{listening.getHost().port}/maven2"
        client_token = "client-" + secrets.token_hex(12)
        secret = {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/basic-auth",
                  "metadata": {"name": "repo-cred", "namespace": "team"},
                  "stringData": {"username": repo_user, "password": repo_password}}
        repo = connector("repo", "maven", address)
        repo["spec"]["auth"] = {"name": "basicAuth", "secretRef": {"name": "repo-cred"}}
        objects = [upstream_class("maven"), repo, secret]
        proxy = await self.proxy(objects, client_token)
        folder = await self.client_files(objects, "team/repo", client_token, proxy.url,
                                         "--params", '{"settings": {"useAsMirror": "true"}}')
        project = Path(self.mktemp()).resolve()
        project.mkdir()
        (project / "pom.xml").write_text(
            "<project xmlns=\"http://maven.apache.org/POM/4.0.0\"><modelVersion>4.0.0</modelVersion>"
            "<groupId>org.example</groupId><artifactId>app</artifactId><version>1</version>"
            "<packaging>pom</packaging><build><extensions><extension><groupId>org.example</groupId>"
            "<artifactId>canary-ext</artifactId><version>1.0</version></extension></extensions></build>"
            "</project>\n")
        local = Path(self.mktemp()).resolve()
        result = await run([mvn, "-B", "-e", "-s", str(folder / "settings.xml"), f"-Dmaven.repo.local={local}",
                            "validate"], cwd=str(project), timeout=120,
                           env={"MAVEN_OPTS": "-Xshare:auto", "http_proxy": "", "https_proxy": ""})
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 0, output[:3000] + b"\n...PROXY LOG:" + proxy.log().encode()[-3000:])
        self.assertTrue((local / "org" / "example" / "canary-ext" / "1.0" / "canary-ext-1.0.jar").exists())
        self.assertIn(expected, seen)
        for canary in (repo_password.encode(), expected):
            self.assertNotIn(canary, output)
            self.assertNotIn(canary, proxy.log().encode())

    def test_mvn_with_the_generated_settings_xml(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._maven())

    async def _git(self) -> None:
        """git clone and push through the upstream git class, with the .gitconfig of clientconfig files."""
        from .support.gitserver import fresh_home, git_env, has_secret, start_git_server

        server = await start_git_server(self)
        await server.create_repo("app", {"README.md": b"# through the proxy\n"})
        client_token = "client-" + secrets.token_hex(12)
        secret = {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/basic-auth",
                  "metadata": {"name": "git-cred", "namespace": "team"},
                  "stringData": {"username": server.username, "password": server.password}}
        repo = connector("scm", "git", server.base_url)
        repo["spec"]["auth"] = {"name": "basicAuth", "secretRef": {"name": "git-cred"}}
        objects = [upstream_class("git"), repo, secret]
        proxy = await self.proxy(objects, client_token)
        folder = await self.client_files(objects, "team/scm", client_token, proxy.url)
        home = fresh_home(self)
        (Path(home) / ".gitconfig").write_text((folder / ".gitconfig").read_text())
        env = git_env(home)
        dest = os.path.join(home, "app")
        git = require("git")
        clone = check(await run([git, "clone", server.url("app"), dest], env=env))
        self.assertEqual(Path(dest, "README.md").read_text(), "# through the proxy\n")
        Path(dest, "CHANGE").write_text("pushed\n")
        for args in (["add", "CHANGE"], ["-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-m", "c"]):
            check(await run([git, "-C", dest, *args], env=env))
        push = check(await run([git, "-C", dest, "push", "origin", "HEAD"], env=env))
        entries = server.requests()
        self.assertTrue(entries)
        self.assertEqual({e.remote_user for e in entries}, {server.username})
        self.assertIn("git-receive-pack", " ".join(e.request_uri for e in entries))
        output = [clone.stdout, clone.stderr, push.stdout, push.stderr, proxy.log().encode()]
        self.assertFalse(has_secret(output, server.password))

    def test_git_with_the_generated_gitconfig(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._git())
