"""
The client-configuration writers (connectors_proxy/clientconfig.py): the
.gitconfig the CSI driver would mount, read back by the real git.
"""

from __future__ import annotations

import base64
import os
import stat
import sys

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from connectors_proxy import clientconfig
from tests.support.command import run_main
from tests.support.gitserver import git_env
from tests.support.procs import check, run

TOKEN = "client-token-0123456789"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PureTests(SynchronousTestCase):
    def test_urls(self) -> None:
        self.assertEqual(clientconfig.host_mode_url("dev", "repo"), "http://c-repo.dev.svc.cluster.local")
        self.assertEqual(clientconfig.host_mode_url("dev", "repo", "k.local", "https"),
                         "https://c-repo.dev.svc.k.local")
        self.assertEqual(clientconfig.path_mode_url("http://127.0.0.1:8080/", "dev", "repo"),
                         "http://127.0.0.1:8080/namespaces/dev/connectors/repo")

    def test_basic_authorization_has_an_empty_user(self) -> None:
        value = clientconfig.basic_authorization(TOKEN)
        self.assertTrue(value.startswith("Basic "))
        self.assertEqual(base64.b64decode(value[6:]), b":" + TOKEN.encode())

    def test_gitconfig(self) -> None:
        text = clientconfig.gitconfig("https://git.example.com/scm/", "http://c-repo.dev.svc.cluster.local", TOKEN,
                                      comment="hello\nworld")
        self.assertEqual(text, (
            "# hello\n# world\n"
            '[url "http://c-repo.dev.svc.cluster.local/"]\n'
            '\tinsteadOf = "https://git.example.com/scm/"\n'
            '[http "http://c-repo.dev.svc.cluster.local/"]\n'
            f'\textraHeader = "Authorization: {clientconfig.basic_authorization(TOKEN)}"\n'
        ))

    def test_gitconfig_options(self) -> None:
        text = clientconfig.gitconfig("https://g", "http://c-r.d.svc.cluster.local", TOKEN,
                                      http_proxy="http://127.0.0.1:8080", ca_file='/x/"ca".pem')
        self.assertIn('\tproxy = "http://127.0.0.1:8080"\n', text)
        self.assertIn('\tsslCAInfo = "/x/\\"ca\\".pem"\n', text)

    def test_multiline_values_are_refused(self) -> None:
        self.assertRaises(ValueError, clientconfig.gitconfig, "https://g", "http://p", "a\nb")
        self.assertRaises(ValueError, clientconfig.gitconfig, "https://g\n[core]", "http://p", "t")


class CommandTests(SynchronousTestCase):
    def _main(self, *argv: str) -> tuple[int, str, str]:
        return run_main(clientconfig.main, argv)

    def _token_file(self) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(TOKEN + "\n")
        return path

    def test_host_mode_by_default(self) -> None:
        code, out, _ = self._main("git", "--connector", "dev/repo", "--address", "https://g.example.com",
                                  "--token-file", self._token_file())
        self.assertEqual(code, 0)
        self.assertIn('[url "http://c-repo.dev.svc.cluster.local/"]', out)
        self.assertIn('insteadOf = "https://g.example.com/"', out)
        self.assertIn("# Git through connectors-proxy for Connector dev/repo", out)

    def test_path_mode_and_output_file(self) -> None:
        output = self.mktemp()
        # An existing, world-readable file is narrowed too: it will hold the token.
        with open(output, "w") as f:
            f.write("old\n")
        os.chmod(output, 0o644)
        code, out, _ = self._main("-o", output, "git", "--connector", "dev/repo", "--address", "https://g",
                                  "--token-file", self._token_file(), "--proxy", "http://127.0.0.1:9")
        self.assertEqual((code, out), (0, ""))
        self.assertEqual(stat.S_IMODE(os.stat(output).st_mode), 0o600)
        with open(output) as f:
            self.assertIn('[url "http://127.0.0.1:9/namespaces/dev/connectors/repo/"]', f.read())

    def test_errors_are_one_line(self) -> None:
        code, _, err = self._main("git", "--connector", "dev/repo", "--address", "https://g",
                                  "--token-file", "/nonexistent/token")
        self.assertEqual(code, 2)
        self.assertEqual(len(err.strip().splitlines()), 1)
        self.assertIn("/nonexistent/token", err)
        code, _, err = self._main("git", "--connector", "norepo", "--address", "https://g", "--token-file", "x")
        self.assertEqual(code, 2)
        self.assertIn("NAMESPACE/NAME", err)


class RealGitReadsItTests(TestCase):
    def test_git_rewrites_urls_and_scopes_the_header(self) -> Deferred[None]:
        async def go() -> None:
            home = os.path.abspath(self.mktemp())
            os.makedirs(home)
            token = os.path.join(home, "token")
            with open(token, "w") as f:
                f.write(TOKEN)
            check(await run([sys.executable, "-m", "connectors_proxy.clientconfig", "-o",
                             os.path.join(home, ".gitconfig"), "git", "--connector", "dev/repo",
                             "--address", "https://git.example.com/scm", "--token-file", token,
                             "--proxy", "http://127.0.0.1:8080"], env={"PYTHONPATH": ROOT}))
            env = git_env(home)
            url = check(await run(["git", "ls-remote", "--get-url", "https://git.example.com/scm/team/app.git"],
                                  env=env))
            self.assertEqual(url.stdout.decode().strip(),
                             "http://127.0.0.1:8080/namespaces/dev/connectors/repo/team/app.git")
            wanted = f"Authorization: {clientconfig.basic_authorization(TOKEN)}"
            scoped = check(await run(["git", "config", "--get-urlmatch", "http.extraHeader",
                                      "http://127.0.0.1:8080/namespaces/dev/connectors/repo/team/app.git"], env=env))
            self.assertEqual(scoped.stdout.decode().strip(), wanted)
            elsewhere = await run(["git", "config", "--get-urlmatch", "http.extraHeader",
                                   "https://github.com/team/app.git"], env=env)
            self.assertEqual(elsewhere.stdout, b"")
        return Deferred.fromCoroutine(go())
