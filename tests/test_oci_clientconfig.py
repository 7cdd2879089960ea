"""The docker config.json writer of L{connectors_proxy.clientconfig} (used by the OCI integration tests too)."""

from __future__ import annotations

import base64
import json
import os
import sys

from twisted.trial.unittest import TestCase

from connectors_proxy.clientconfig import docker_config, registry_host

from .support.procs import check, run


class DockerConfigTests(TestCase):
    def test_config(self) -> None:
        doc = json.loads(docker_config(["c-harbor.default.svc.cluster.local", "127.0.0.1:8080"], "tok"))
        self.assertEqual(set(doc["auths"]), {"c-harbor.default.svc.cluster.local", "127.0.0.1:8080"})
        for entry in doc["auths"].values():
            user, _, token = base64.b64decode(entry["auth"]).decode().partition(":")
            self.assertEqual(token, "tok")
            self.assertTrue(user)

    def test_bad_token(self) -> None:
        self.assertRaises(ValueError, docker_config, ["h"], "two\nlines")

    def test_registry_host(self) -> None:
        self.assertEqual(registry_host("http://127.0.0.1:8080/"), "127.0.0.1:8080")
        self.assertEqual(registry_host("Proxy.Example:443"), "proxy.example:443")
        self.assertRaises(ValueError, registry_host, "http://u:p@h")

    async def test_command(self) -> None:
        token_file = os.path.abspath(self.mktemp())
        with open(token_file, "w") as f:
            f.write("client-token\n")
        out = os.path.abspath(self.mktemp())
        base = [sys.executable, "-m", "connectors_proxy.clientconfig"]
        env = {"PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
        check(await run([*base, "-o", out, "docker", "--connector", "default/harbor", "--token-file", token_file],
                        env=env))
        self.assertEqual(os.stat(out).st_mode & 0o777, 0o600)
        with open(out) as f:
            self.assertEqual(list(json.load(f)["auths"]), ["c-harbor.default.svc.cluster.local"])
        result = check(await run([*base, "docker", "--connector", "default/harbor", "--token-file", token_file,
                                  "--proxy", "http://127.0.0.1:8080"], env=env))
        self.assertEqual(list(json.loads(result.stdout)["auths"]), ["127.0.0.1:8080"])
