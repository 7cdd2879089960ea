"""
Names only one process resolves: a command run under C{unshare --mount}
with a private C{/etc/hosts} bound over the machine's (which stays
untouched, and which no other process sees changed).

Clients that go through a forward proxy send it the target's name and
never resolve it themselves; Go and Java clients also never proxy a
loopback address.  So a test names its loopback upstream by a made-up name
(C{registry.test}) that only the proxy daemon, run this way, resolves.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from twisted.trial.unittest import TestCase

from .procs import require


def with_private_hosts(test: TestCase, names: Mapping[str, str], argv: Sequence[str]) -> list[str]:
    """
    C{argv} run with an C{/etc/hosts} of its own that maps each of
    C{names} (name -> address) and C{localhost}; the file is written in
    one of C{test}'s folders.  Needs root (or a user namespace), as the
    tests run.
    """
    folder = os.path.abspath(test.mktemp())
    os.makedirs(folder)
    hosts = os.path.join(folder, "hosts")
    with open(hosts, "w") as f:
        f.write("127.0.0.1 localhost\n" + "".join(f"{address} {name}\n" for name, address in names.items()))
    return [require("unshare"), "--mount", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', hosts,
            *argv]
