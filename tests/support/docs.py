"""
Documentation pages run as tests (C{docs/clients/*.md} in
L{tests.test_docs}, C{docs/connect.md} in L{tests.test_connect_clients}):
their fenced code blocks, each marked with whether it runs (C{```sh test}),
and one shell block run the way the pages say, in a client's clean
environment.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Mapping

from attrs import frozen
from twisted.internet import threads

_FENCE = re.compile(r"^```([\w-]*)[ \t]*([\w-]*)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


@frozen
class Block:
    """One fenced code block of a page."""

    language: str
    marker: str | None
    text: str
    line: int


def page_blocks(path: str) -> list[Block]:
    """The fenced blocks of the page at C{path}, in order."""
    with open(path) as f:
        text = f.read()
    return [Block(m.group(1), m.group(2) or None, m.group(3), text.count("\n", 0, m.start()) + 1)
            for m in _FENCE.finditer(text)]


def substitute(text: str, replacements: Mapping[str, str]) -> str:
    for old, new in replacements.items():
        text = text.replace(old, new)
    return text


def client_env(home: str) -> dict[str, str]:
    """
    What the pages' clients (git, npm, pip, kubectl) get beside their
    commands: the empty C{home} as C{HOME}, no system configuration, no
    prompts, update notices or version checks.
    """
    return {
        "HOME": home, "XDG_CONFIG_HOME": os.path.join(home, ".config"), "LC_ALL": "C.UTF-8",
        "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0",
        "NPM_CONFIG_UPDATE_NOTIFIER": "false", "NPM_CONFIG_FUND": "false", "NPM_CONFIG_AUDIT": "false",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1", "PIP_CONFIG_FILE": os.devnull,
        "PIP_CACHE_DIR": os.path.join(home, ".cache", "pip"), "KUBECONFIG": os.path.join(home, ".kube", "config"),
    }


async def run_block(where: str, script: str, env: Mapping[str, str], cwd: str, timeout: float,
                    proxy_log: Callable[[], str]) -> subprocess.CompletedProcess[bytes]:
    """
    Run C{script} (a C{sh test} block) with C{bash -euo pipefail} in C{cwd},
    with exactly C{env}, in a thread (the reactor serves the proxy
    meanwhile).  A non-zero exit fails with C{where} (C{page.md:LINE}), the
    script, its output and the tail of C{proxy_log()}.
    """
    result = await threads.deferToThread(
        subprocess.run, ["bash", "-euo", "pipefail", "-c", script], capture_output=True, env=dict(env), cwd=cwd,
        timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(
            f"{where}: the block exited {result.returncode}\n{script}\n"
            f"stdout: {result.stdout.decode(errors='replace')[-3000:]}\n"
            f"stderr: {result.stderr.decode(errors='replace')[-3000:]}\n"
            f"the proxy's log:\n{proxy_log()[-3000:]}")
    return result
