"""
The manifests of C{k8s/}, checked offline: every built-in object against
the Kubernetes OpenAPI schemas (C{kubernetes-validate}, strict: a misspelt
field fails), the CRDs as CRDs and as structural schemas, the shipped custom
resources against our own CRD schemas and the proxy's parsers, the RBAC
against exactly the permissions the proxy needs, and the Deployment and
Service against the proxy's ports and command line; the container recipe
and the systemd units of C{deploy/} against those and against systemd.
"""

from __future__ import annotations

import base64
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml
from jsonschema import Draft4Validator
from twisted.trial.unittest import SynchronousTestCase, TestCase

from connectors_proxy.model.objects import parse_connector, parse_connector_class, parse_secret
from connectors_proxy.testing.fakekube_strategy import load_crd_schemas, prune, to_jsonschema

from .support.procs import require, run

K8S = Path(__file__).resolve().parents[1] / "k8s"
#: The oldest Kubernetes the manifests promise to work on, and the newest schemas we have.
VERSIONS = ("1.28", kubernetes_validate.latest_version())
GROUP = "connectors.alauda.io"
SECRET_TYPES = ("kubernetes.io/basic-auth", "connectors.cpaas.io/bearer-token", "cpaas.io/distribution-registry-token",
                "connectors.cpaas.io/gitlab-pat-auth", "Opaque")
SA_USER = ("connectors-system", "connectors-proxy")

#: Exactly what the proxy may do: (apiGroup, resource, verb, namespace or None for cluster-wide).
EXPECTED_GRANTS = (
    {(GROUP, r, v, None) for r in ("connectors", "connectorclasses") for v in ("get", "list", "watch")}
    | {(GROUP, "connectors/status", "update", None)}
    | {("", "secrets", v, None) for v in ("get", "list", "watch")}
    | {("", "services", v, None) for v in ("create", "update", "delete", "get", "list", "watch")}
    | {("authentication.k8s.io", "tokenreviews", "create", None),
       ("authorization.k8s.io", "subjectaccessreviews", "create", None)}
    | {("coordination.k8s.io", "leases", v, "connectors-system") for v in ("get", "create", "update")}
    # Upstream's feature flags: the ConfigMap connectors-config, watched.
    | {("", "configmaps", v, "connectors-system") for v in ("get", "list", "watch")}
)


CLASSES = K8S / "classes"
#: The upstream example ConnectorClasses shipped in k8s/classes/, and the protocol each is served with.
UPSTREAM_CLASSES = {"git": "git", "github": "git", "gitlab": "git", "oci": "oci", "harbor": "oci",
                    "maven": "http", "npm": "http", "pypi": "http", "k8s": "http", "sonarqube": "http",
                    "nexus": "http", "jfrog": "http"}
RESOLVER_ANNOTATION = "connectors.cpaas.io/proxy-resolver"


def manifest_files() -> list[Path]:
    """Every manifest of k8s/ and k8s/classes/, kustomization.yaml aside."""
    return [p for p in sorted(K8S.glob("*.yaml")) + sorted(CLASSES.glob("*.yaml"))
            if p.name != "kustomization.yaml"]


def documents(name: str | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    for path in manifest_files() if name is None else [K8S / name]:
        with open(path, encoding="utf-8") as f:
            for doc in yaml.safe_load_all(f):
                if doc is not None:
                    yield str(path.relative_to(K8S)), doc


def kinds(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in documents() if doc["kind"] == kind]


def one(kind: str, name: str) -> dict[str, Any]:
    found = [doc for doc in kinds(kind) if doc["metadata"]["name"] == name]
    if len(found) != 1:
        raise AssertionError(f"expected one {kind} {name}, found {len(found)}")
    return found[0]


def schema_nodes(schema: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if not isinstance(schema, dict):
        return
    yield path, schema
    for key, sub in (schema.get("properties") or {}).items():
        yield from schema_nodes(sub, f"{path}.{key}")
    if isinstance(schema.get("items"), dict):
        yield from schema_nodes(schema["items"], path + "[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from schema_nodes(schema["additionalProperties"], path + "{}")


class ManifestSchemaTests(SynchronousTestCase):
    def test_every_builtin_object_is_valid(self) -> None:
        checked = 0
        for filename, doc in documents():
            if doc["apiVersion"].startswith(GROUP):
                continue
            for version in VERSIONS:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    raise AssertionError(f"{filename}: {doc['kind']} {doc['metadata'].get('name')} "
                                         f"(Kubernetes {version}): {e.message} at {list(e.absolute_path)}") from None
            checked += 1
        self.assertGreaterEqual(checked, 10)

    def test_a_misspelt_field_is_caught(self) -> None:
        """The strict validation the test above relies on does reject unknown fields."""
        service = dict(one("Service", "connectors-proxy-service"))
        service["spec"] = dict(service["spec"], prots=[])
        with self.assertRaises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(service, VERSIONS[0], strict=True)

    def test_crds(self) -> None:
        crds = {doc["spec"]["names"]["kind"]: doc for doc in kinds("CustomResourceDefinition")}
        self.assertEqual(set(crds), {"Connector", "ConnectorClass"})
        self.assertEqual((crds["Connector"]["spec"]["scope"], crds["ConnectorClass"]["spec"]["scope"]),
                         ("Namespaced", "Cluster"))
        for kind, crd in crds.items():
            spec = crd["spec"]
            self.assertEqual((spec["group"], crd["metadata"]["name"]), (GROUP, f"{spec['names']['plural']}.{GROUP}"))
            self.assertEqual(spec["names"]["categories"], ["alauda"])
            [version] = spec["versions"]
            self.assertEqual((version["name"], version["served"], version["storage"], version["subresources"]),
                             ("v1alpha1", True, True, {"status": {}}))
            self.assertIn("Age", [c["name"] for c in version["additionalPrinterColumns"]])
            schema = version["schema"]["openAPIV3Schema"]
            # Structural: every node typed (or explicitly free-form), no $ref, our own descriptions.
            for path, node in schema_nodes(schema):
                self.assertNotIn("$ref", node, path)
                self.assertTrue("type" in node or node.get("x-kubernetes-preserve-unknown-fields")
                                or node.get("x-kubernetes-int-or-string"), f"{kind}{path} has no type")
            self.assertTrue(schema.get("description"))
            self.assertEqual(set(schema["properties"]), {"apiVersion", "kind", "metadata", "spec", "status"})

    def test_connector_class_printer_columns(self) -> None:
        """Upstream's columns, in upstream's order: Ready and Reason from the Ready condition, Age."""
        crd = one("CustomResourceDefinition", f"connectorclasses.{GROUP}")
        columns = crd["spec"]["versions"][0]["additionalPrinterColumns"]
        self.assertEqual([c["name"] for c in columns], ["Ready", "Reason", "Age"])
        self.assertEqual([c["jsonPath"] for c in columns],
                         ['.status.conditions[?(@.type=="Ready")].status',
                          '.status.conditions[?(@.type=="Ready")].reason', ".metadata.creationTimestamp"])

    def test_upstream_schema_markers(self) -> None:
        """
        The list and map markers of upstream's CRDs: server-side apply merges
        auth types and auth probes by key, and replaces a secretRef whole;
        a Connector may omit connectorClassName; both kinds keep
        C{status.annotations}.
        """
        schemas = load_crd_schemas(kinds("CustomResourceDefinition"))
        klass = schemas[(GROUP, "v1alpha1", "connectorclasses")]["properties"]
        connector = schemas[(GROUP, "v1alpha1", "connectors")]["properties"]
        for node, key in ((klass["spec"]["properties"]["auth"]["properties"]["types"], "name"),
                          (klass["spec"]["properties"]["authProbes"], "authName")):
            self.assertEqual((node["x-kubernetes-list-type"], node["x-kubernetes-list-map-keys"]), ("map", [key]))
            # A list-map key must be required (or defaulted) for the API server to take the CRD.
            self.assertIn(key, node["items"]["required"])
        secret_ref = connector["spec"]["properties"]["auth"]["properties"]["secretRef"]
        self.assertEqual(secret_ref["x-kubernetes-map-type"], "atomic")
        self.assertNotIn("connectorClassName", connector["spec"].get("required", []))
        for status in (klass["status"], connector["status"]):
            self.assertEqual(status["properties"]["annotations"],
                             {"type": "object", "description": status["properties"]["annotations"]["description"],
                              "additionalProperties": {"type": "string"}})
        for spec in (klass["spec"], connector["spec"]):
            for name in ("addressExtensions", "params"):
                self.assertEqual(spec["properties"][name]["type"], "array")

    def test_upstream_objects_validate(self) -> None:
        """Objects as upstream writes them: no connectorClassName, duplicate-free keyed lists, annotations."""
        schemas = load_crd_schemas(kinds("CustomResourceDefinition"))
        connector = {"spec": {"address": "https://x", "auth": {"secretRef": {"name": "s"}}},
                     "status": {"annotations": {"connectors.cpaas.io/x": "y"}}}
        klass = {"spec": {"auth": {"types": [{"name": "a"}, {"name": "b"}]},
                          "authProbes": [{"authName": "a", "probe": {"api": {"path": "/"}}}]},
                 "status": {"annotations": {"k": "v"}, "conditions": [{"type": "Ready", "status": "True"}]}}
        for plural, obj in (("connectors", connector), ("connectorclasses", klass)):
            schema = schemas[(GROUP, "v1alpha1", plural)]
            for key in ("spec", "status"):
                sub = schema["properties"][key]
                self.assertEqual(list(Draft4Validator(to_jsonschema(sub)).iter_errors(obj[key])), [], plural)
                self.assertEqual(prune(obj[key], sub), obj[key])

    def test_connector_printer_columns(self) -> None:
        crd = one("CustomResourceDefinition", f"connectors.{GROUP}")
        columns = {c["name"]: c["jsonPath"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]}
        self.assertEqual(columns["Class"], ".spec.connectorClassName")
        self.assertEqual(columns["Address"], ".spec.address")
        self.assertIn('@.type=="Ready"', columns["Ready"])
        self.assertIn('@.type=="Ready"', columns["Reason"])

    def test_upstream_shaped_objects_survive_pruning(self) -> None:
        """Fields of the upstream API the proxy does not use are kept, not pruned away."""
        schemas = load_crd_schemas(kinds("CustomResourceDefinition"))
        connector = {"spec": {
            "connectorClassName": "git", "address": "https://x",
            "addressExtensions": [{"name": "org", "value": {"any": ["thing"]}}],
            "params": [{"name": "p", "value": 3}],
            "auth": {"name": "basicAuth", "params": [{"name": "q", "value": "v"}],
                     "secretRef": {"name": "s", "namespace": "n", "kind": "Secret", "apiVersion": "v1"}},
            "caCertSecretRef": {"name": "ca"}},
            "status": {"observedGeneration": 2, "annotations": {"a": "b"},
                       "conditions": [{"type": "Ready", "status": "True", "reason": "R", "message": "m",
                                       "severity": "Info", "lastTransitionTime": "2024-01-01T00:00:00Z"}],
                       "proxy": {"httpAddress": {"url": "http://c-x.ns.svc.cluster.local", "name": "n",
                                                 "CACerts": "pem", "audience": "a"}},
                       "api": {"path": "/p"}}}
        klass = {"spec": {
            "address": {"name": "address", "type": "string", "default": "https://d", "enum": ["a", 1],
                        "properties": {"x": {"y": 1}}, "annotations": {"k": "v"}},
            "auth": {"types": [{"name": "basicAuth", "displayName": "Basic", "secretType": "kubernetes.io/basic-auth",
                                "optional": True, "params": [{"name": "p"}], "generator": {"rego": "package x"},
                                "annotations": {"a": "b"}}]},
            "authProbes": [{"authName": "basicAuth", "probe": {"http": {"path": "/user", "method": "GET",
                                                                        "httpHeaders": [{"name": "a", "value": "b"}],
                                                                        "disableRedirect": True,
                                                                        "response": {"cel": "true"}}}}],
            "livenessProbe": {"api": {"path": "/healthz"}},
            "api": {"ref": {"kind": "Service", "name": "api"}, "uri": "/", "openapi": {"paths": {}},
                    "permissions": {"rego": "package p"}},
            "proxy": {"ref": {"kind": "Service", "name": "p", "namespace": "n"}, "authExtractor": {"rego": "x"},
                      "CACerts": "pem", "audience": "a"},
            "configurations": [{"name": "gitconfig", "data": {"a": "b"}, "params": [{"name": "p"}]}]},
            "status": {"observedGeneration": 1, "api": {"address": {"url": "u"}},
                       "proxy": {"httpAddress": {"url": "u"}}}}
        for plural, obj in (("connectors", connector), ("connectorclasses", klass)):
            schema = schemas[(GROUP, "v1alpha1", plural)]
            for key in ("spec", "status"):
                sub = schema["properties"][key]
                self.assertEqual(prune(obj[key], sub), obj[key], f"{plural}.{key} lost fields")
                self.assertEqual(list(Draft4Validator(to_jsonschema(sub)).iter_errors(obj[key])), [])


class ShippedObjectTests(SynchronousTestCase):
    def validate_custom(self, doc: dict[str, Any]) -> None:
        schemas = load_crd_schemas(kinds("CustomResourceDefinition"))
        plural = {"Connector": "connectors", "ConnectorClass": "connectorclasses"}[doc["kind"]]
        schema = schemas[(GROUP, doc["apiVersion"].split("/")[1], plural)]
        body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "metadata")}
        props = {k: v for k, v in schema["properties"].items() if k not in ("apiVersion", "kind", "metadata")}
        errors = [e.message for e in Draft4Validator(to_jsonschema(dict(schema, properties=props))).iter_errors(body)]
        self.assertEqual(errors, [], f"{doc['kind']} {doc['metadata']['name']}")
        self.assertEqual(prune(body, dict(schema, properties=props)), body,
                         f"{doc['kind']} {doc['metadata']['name']} has fields the CRD would prune")

    def test_connector_classes(self) -> None:
        service = one("Service", "connectors-proxy-service")
        from connectors_proxy.model.protocols import NAMES
        for name in NAMES:
            # The upstream classes git and oci serve two of the protocols by their names.
            doc = one("ConnectorClass", name)
            self.validate_custom(doc)
            parsed = parse_connector_class(doc)
            self.assertEqual(parsed.protocol, name)
            assert parsed.proxy is not None
            self.assertEqual((parsed.proxy.kind, parsed.proxy.name, parsed.proxy.namespace),
                             ("Service", service["metadata"]["name"], service["metadata"]["namespace"]))
            self.assertTrue(parsed.auth_types)

    def test_upstream_classes(self) -> None:
        """
        The twelve upstream example classes: one file each, free of any
        annotation of ours (byte for byte), valid against our CRD with
        nothing pruned, served with the protocol their name implies, pointed
        at the proxy Service, path-resolved exactly for oci and harbor.
        """
        service = one("Service", "connectors-proxy-service")
        self.assertEqual({p.stem for p in CLASSES.glob("*.yaml")}, set(UPSTREAM_CLASSES))
        for name, protocol in UPSTREAM_CLASSES.items():
            raw = (CLASSES / f"{name}.yaml").read_bytes()
            self.assertNotIn(b"proxy.connectors.alauda.io", raw, name)
            [doc] = [d for d in yaml.safe_load_all(raw) if d is not None]
            self.assertEqual((doc["kind"], doc["metadata"]["name"]), ("ConnectorClass", name))
            self.validate_custom(doc)
            parsed = parse_connector_class(doc)
            self.assertEqual(parsed.protocol, protocol, name)
            assert parsed.proxy is not None
            self.assertEqual((parsed.proxy.kind, parsed.proxy.name, parsed.proxy.namespace),
                             ("Service", service["metadata"]["name"], service["metadata"]["namespace"]))
            resolver = (doc["metadata"].get("annotations") or {}).get(RESOLVER_ANNOTATION, "host")
            self.assertEqual(resolver, "path" if name in ("oci", "harbor") else "host", name)
            self.assertTrue(parsed.auth_types, name)
            for auth in doc["spec"]["auth"]["types"]:
                self.assertIn(auth["secretType"], SECRET_TYPES, name)
            names = [c["name"] for c in doc["spec"].get("configurations", [])]
            self.assertEqual(len(names), len(set(names)), name)

    def test_upstream_class_auth_types(self) -> None:
        """The auth type names and Secret types of upstream's classes (UPSTREAM-COMPAT section 2)."""
        expected = {
            "git": ("basicAuth", "kubernetes.io/basic-auth", True),
            "github": ("patAuth", "Opaque", True),
            "gitlab": ("patAuth", "connectors.cpaas.io/gitlab-pat-auth", True),
            "k8s": ("bearerTokenAuth", "connectors.cpaas.io/bearer-token", False),
            "maven": ("basicAuth", "kubernetes.io/basic-auth", True),
            "npm": ("basicAuth", "kubernetes.io/basic-auth", True),
            "pypi": ("basicAuth", "kubernetes.io/basic-auth", True),
            "sonarqube": ("tokenAuth", "connectors.cpaas.io/bearer-token", False),
            "nexus": ("basicAuth", "kubernetes.io/basic-auth", True),
            "jfrog": ("basicAuth", "kubernetes.io/basic-auth", True),
            "oci": ("tokenAuth", "cpaas.io/distribution-registry-token", True),
            "harbor": ("basicAuth", "kubernetes.io/basic-auth", True),
        }
        for name, (auth, secret_type, optional) in expected.items():
            parsed = parse_connector_class(one("ConnectorClass", name))
            got = parsed.auth_type(auth)
            assert got is not None, name
            self.assertEqual((got.secret_type, got.optional), (secret_type, optional), name)
        configurations = {name: {c["name"] for c in one("ConnectorClass", name)["spec"].get("configurations", [])}
                          for name in expected}
        self.assertEqual(configurations["git"], {"gitconfig"})
        self.assertLessEqual({"registry-config", "buildkitd"}, configurations["oci"])
        self.assertLessEqual({"registry-config", "buildkitd"}, configurations["harbor"])
        self.assertEqual(configurations["maven"], {"settings"})
        self.assertLessEqual({"npmrc", "yarnrc"}, configurations["npm"])
        self.assertEqual(configurations["pypi"], {"pipconf", "pypirc"})
        for name in ("nexus", "jfrog"):
            self.assertEqual(configurations[name], {"settings", "npmrc", "yarnrc", "pipconf", "pypirc"})
        github = one("ConnectorClass", "github")["spec"]
        self.assertEqual([e["name"] for e in github["addressExtensions"]], ["api"])
        gitlab = one("ConnectorClass", "gitlab")["spec"]
        self.assertIn("Private-Token", gitlab["proxy"]["authExtractor"]["rego"])

    def test_upstream_class_policies(self) -> None:
        """
        The Rego hooks of the shipped classes compile and answer as their
        comments say, in the engine the proxy runs them with.
        """
        from connectors_proxy.auth import regoworker

        def run(policy: str, given: dict[str, Any]) -> Any:
            compiled = regoworker.compile_policy(policy)
            self.assertFalse(isinstance(compiled, str), compiled)
            status, text = regoworker.evaluate(compiled, json.dumps(given))
            self.assertEqual(status, b"V", text)
            return json.loads(text)["expressions"][0]

        def basic(user: str, password: str) -> str:
            return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

        gitlab = one("ConnectorClass", "gitlab")["spec"]
        generator = gitlab["auth"]["types"][0]["generator"]["rego"]
        self.assertEqual(run(generator, {"data": {"token": "T"}, "request": {"path": "/g/api/v4/user"}}),
                         {"position": "header", "auth": {"Private-Token": "T"}})
        self.assertEqual(run(generator, {"data": {"token": "T"}, "request": {"path": "/g/app.git/info/refs"}}),
                         {"position": "header", "auth": {"Authorization": basic("oauth2", "T")}})
        extractor = gitlab["proxy"]["authExtractor"]["rego"]
        self.assertEqual(run(extractor, {"request": {"headers": {"Private-Token": ["abc"]}}}), {"token": "abc"})
        self.assertEqual(run(extractor, {"request": {"headers": None}}), {"token": ""})
        github = one("ConnectorClass", "github")["spec"]["auth"]["types"][0]["generator"]["rego"]
        self.assertEqual(run(github, {"data": {"token": "T"}, "request": {"path": "/o/r.git/info/refs"}}),
                         {"position": "header", "auth": {"Authorization": basic("x-access-token", "T")}})

    def test_example_connector(self) -> None:
        connector = one("Connector", "github")
        self.validate_custom(connector)
        parsed = parse_connector(connector)
        secret = parse_secret(one("Secret", "github-credentials"))
        self.assertEqual(parsed.secret_ref, secret.ref)
        klass = parse_connector_class(one("ConnectorClass", parsed.class_name))
        auth = klass.auth_type(parsed.auth_name)
        assert auth is not None
        self.assertEqual(auth.secret_type, secret.type)

    def test_kustomization_lists_the_install(self) -> None:
        with open(K8S / "kustomization.yaml", encoding="utf-8") as f:
            kustomization = yaml.safe_load(f)
        files = {str(p.relative_to(K8S)) for p in manifest_files()}
        # The example carries a placeholder credential: applied by hand, never by default.
        self.assertEqual(set(kustomization["resources"]), files - {"example-connector.yaml"})
        self.assertEqual(kustomization["resources"][:3],
                         ["namespace.yaml", "crd-connectorclasses.yaml", "crd-connectors.yaml"])


class RbacTests(SynchronousTestCase):
    def grants(self) -> set[tuple[str, str, str, str | None]]:
        """Every (group, resource, verb, namespace) the proxy's ServiceAccount gets from k8s/."""
        roles = {(r["metadata"].get("namespace"), r["metadata"]["name"]): r for r in kinds("Role")}
        cluster_roles = {r["metadata"]["name"]: r for r in kinds("ClusterRole")}
        granted = set()
        for binding in kinds("ClusterRoleBinding") + kinds("RoleBinding"):
            subjects = {(s.get("namespace"), s["name"]) for s in binding["subjects"] if s["kind"] == "ServiceAccount"}
            if SA_USER not in subjects:
                continue
            scope = binding["metadata"].get("namespace") if binding["kind"] == "RoleBinding" else None
            ref = binding["roleRef"]
            self.assertEqual(ref["apiGroup"], "rbac.authorization.k8s.io")
            role = cluster_roles[ref["name"]] if ref["kind"] == "ClusterRole" else roles[(scope, ref["name"])]
            for rule in role["rules"]:
                self.assertNotIn("resourceNames", rule)
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        for verb in rule["verbs"]:
                            self.assertNotIn("*", (group, resource, verb), rule)
                            granted.add((group, resource, verb, scope))
        return granted

    def test_exactly_what_the_proxy_needs(self) -> None:
        granted = self.grants()
        self.assertEqual(granted - EXPECTED_GRANTS, set(), "more than needed")
        self.assertEqual(EXPECTED_GRANTS - granted, set(), "missing")

    def test_the_deployment_runs_as_that_service_account(self) -> None:
        sa = one("ServiceAccount", "connectors-proxy")
        self.assertEqual(sa["metadata"]["namespace"], SA_USER[0])
        pod = one("Deployment", "connectors-proxy")["spec"]["template"]["spec"]
        self.assertEqual(pod["serviceAccountName"], SA_USER[1])


class DeploymentTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.deployment = one("Deployment", "connectors-proxy")
        self.pod = self.deployment["spec"]["template"]["spec"]
        [self.container] = self.pod["containers"]

    def test_command_line(self) -> None:
        argv = self.container["command"] + self.container["args"]
        self.assertEqual(argv[:2], ["twistd", "-n"])
        self.assertEqual(argv[argv.index("connectors-proxy") + 1:][:2], ["--in-cluster", "--leader-elect"])
        self.assertIn("--listen=tcp:8080", argv)
        self.assertIn("--admin=tcp:9090", argv)
        # twistd writes a pid file unless told not to, and the root filesystem is read-only.
        self.assertIn("--pidfile=", argv[:argv.index("connectors-proxy")])

    def test_replicas_probes_ports(self) -> None:
        self.assertEqual(self.deployment["spec"]["replicas"], 2)
        ports = {p["name"]: p["containerPort"] for p in self.container["ports"]}
        self.assertEqual(ports, {"http": 8080, "admin": 9090})
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = self.container[probe]["httpGet"]
            self.assertEqual((get["path"], ports[get["port"]]), (path, 9090))

    def test_draining(self) -> None:
        sleep = self.container["lifecycle"]["preStop"]["exec"]["command"]
        self.assertEqual(sleep[0], "sleep")
        self.assertGreater(self.pod["terminationGracePeriodSeconds"], int(sleep[1]) + 10)
        self.assertEqual(self.deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0)

    def test_locked_down(self) -> None:
        pod_security = self.pod["securityContext"]
        self.assertTrue(pod_security["runAsNonRoot"])
        self.assertNotEqual(pod_security["runAsUser"], 0)
        security = self.container["securityContext"]
        self.assertEqual((security["readOnlyRootFilesystem"], security["allowPrivilegeEscalation"],
                          security["capabilities"]["drop"]), (True, False, ["ALL"]))

    def test_service_reaches_the_proxy_port(self) -> None:
        service = one("Service", "connectors-proxy-service")
        self.assertEqual(service["metadata"]["namespace"], "connectors-system")
        [port] = service["spec"]["ports"]
        named = {p["name"]: p["containerPort"] for p in self.container["ports"]}
        self.assertEqual((port["port"], named[port["targetPort"]]), (80, 8080))
        labels = self.deployment["spec"]["template"]["metadata"]["labels"]
        self.assertEqual({k: labels.get(k) for k in service["spec"]["selector"]}, service["spec"]["selector"])
        self.assertEqual(self.deployment["spec"]["selector"]["matchLabels"], service["spec"]["selector"])

    def test_everything_lives_in_connectors_system(self) -> None:
        one("Namespace", "connectors-system")
        for _, doc in documents():
            if doc["kind"] in ("Deployment", "Service", "ServiceAccount", "Role", "RoleBinding",
                               "PodDisruptionBudget") and doc["metadata"]["name"].startswith("connectors-proxy"):
                self.assertEqual(doc["metadata"]["namespace"], "connectors-system", doc["metadata"]["name"])


DEPLOY = K8S.parent / "deploy"


class DeployFilesTests(TestCase):
    """The container image recipe and the systemd units agree with the manifests and with systemd."""

    def test_containerfile(self) -> None:
        text = (DEPLOY / "Containerfile").read_text()
        lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
        self.assertEqual(lines[0], "FROM python:3.11-slim")
        self.assertIn('RUN python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"',
                      lines)
        entrypoint = json.loads(next(line for line in lines if line.startswith("ENTRYPOINT")).split(" ", 1)[1])
        self.assertEqual((entrypoint[:2], entrypoint[-1]), (["twistd", "-n"], "connectors-proxy"))
        pod = one("Deployment", "connectors-proxy")["spec"]["template"]["spec"]
        user = next(line for line in lines if line.startswith("USER")).split()[1]
        self.assertEqual(user, f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}")
        # pip install comes after the copy, the plugin cache after pip, the user switch after both.
        order = [next(i for i, line in enumerate(lines) if line.startswith(p))
                 for p in ("COPY", "RUN pip install", 'RUN python -c "from twisted.plugin', "USER")]
        self.assertEqual(order, sorted(order))

    def test_socket_activation_matches_the_service(self) -> None:
        socket_unit = (DEPLOY / "connectors-proxy.socket").read_text()
        service = (DEPLOY / "connectors-proxy.service").read_text()
        self.assertIn("ListenStream=0.0.0.0:8080", socket_unit)  # IPv4, as domain=INET adopts it
        self.assertIn("--listen systemd:domain=INET:index=0", service)
        self.assertIn("Type=notify", service)  # connectors_proxy.ops.sdnotify sends READY=1
        self.assertIn("Requires=connectors-proxy.socket", service)

    async def test_systemd_accepts_the_units(self) -> None:
        """systemd-analyze verify, with ExecStart pointed at this machine's twistd."""
        analyze = require("systemd-analyze")
        # The virtualenv running these tests has it even when its bin/ is not on PATH.
        twistd = shutil.which("twistd") or shutil.which("twistd", path=str(Path(sys.executable).parent))
        if twistd is None:
            raise AssertionError("twistd is not on PATH: install the project (pip install -e .)")
        units = Path(self.mktemp())
        units.mkdir()
        for name in ("connectors-proxy.socket", "connectors-proxy.service"):
            text = (DEPLOY / name).read_text().replace("/usr/local/bin/twistd", twistd)
            (units / name).write_text(text)
        result = await run([analyze, "verify", str(units / "connectors-proxy.socket"),
                            str(units / "connectors-proxy.service")], timeout=60)
        self.assertEqual((result.returncode, result.stdout + result.stderr), (0, b""))
