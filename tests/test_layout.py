"""
The house rules a reader relies on to find things: every module under
C{connectors_proxy/} names its tests on its first line
(C{# -*- test-case-name: tests.test_A[,tests.test_B] -*-}, as Twisted's
own modules do, so C{trial --testmodule} and editors find them), every
test module it names exists, and every test module is classified as unit
or integration (L{tests.unit}), so C{tox -e unit} cannot forget one.
"""

from __future__ import annotations

import os
import re
import unittest

from twisted.trial.unittest import SynchronousTestCase

from tests import unit

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
PACKAGE = os.path.join(ROOT, "connectors_proxy")

HEADER = re.compile(r"^# -\*- test-case-name: (?P<names>\S+) -\*-$")
TEST_NAME = re.compile(r"^tests\.(test_\w+)$")


def package_modules() -> list[str]:
    """Paths (relative to the repository) of every module under C{connectors_proxy/}."""
    found: list[str] = []
    for folder, dirs, files in os.walk(PACKAGE):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__pycache__")))
        found.extend(os.path.relpath(os.path.join(folder, f), ROOT) for f in sorted(files) if f.endswith(".py"))
    return found


def test_modules() -> set[str]:
    """The dotted names of the test modules in C{tests/}."""
    return {f"tests.{f[:-3]}" for f in os.listdir(TESTS) if f.startswith("test_") and f.endswith(".py")}


def needs_header(path: str) -> bool:
    """
    Whether C{path} must name its tests: all but the test fakes
    (C{testing/}, tested through the suites that use them) and C{__init__}
    faces.
    """
    return not (path.startswith(os.path.join("connectors_proxy", "testing", ""))
                or os.path.basename(path) == "__init__.py")


def header_problems(path: str, first_line: str, existing: set[str]) -> list[str]:
    """What is wrong with the C{test-case-name} line of C{path} (C{first_line}), if anything."""
    match = HEADER.match(first_line.rstrip("\n"))
    if match is None:
        if needs_header(path):
            return [f"{path}: line 1 is not '# -*- test-case-name: tests.test_... -*-'"]
        return []
    problems = []
    for name in match.group("names").split(","):
        if TEST_NAME.match(name) is None:
            problems.append(f"{path}: {name!r} is not a tests.test_* module name")
        elif name not in existing:
            problems.append(f"{path}: names {name}, which does not exist")
    return problems


class Headers(SynchronousTestCase):
    def test_rules(self) -> None:
        existing = {"tests.test_a", "tests.test_b"}
        self.assertEqual(header_problems("connectors_proxy/x.py", "# -*- test-case-name: tests.test_a,tests.test_b -*-\n",
                                         existing), [])
        self.assertEqual(header_problems("connectors_proxy/x.py", "# -*- test-case-name: tests.test_c -*-", existing),
                         ["connectors_proxy/x.py: names tests.test_c, which does not exist"])
        self.assertEqual(header_problems("connectors_proxy/x.py", "# -*- test-case-name: test_a -*-", existing),
                         ["connectors_proxy/x.py: 'test_a' is not a tests.test_* module name"])
        self.assertEqual(len(header_problems("connectors_proxy/x.py", '"""', existing)), 1)
        self.assertEqual(header_problems(os.path.join("connectors_proxy", "kube", "__init__.py"), "", existing), [])
        self.assertEqual(header_problems(os.path.join("connectors_proxy", "testing", "fake.py"), "", existing), [])
        self.assertEqual(len(header_problems(os.path.join("connectors_proxy", "testing", "fake.py"),
                                             "# -*- test-case-name: tests.test_gone -*-", existing)), 1)

    def test_every_module(self) -> None:
        existing = test_modules()
        problems = []
        modules = package_modules()
        self.assertIn(os.path.join("connectors_proxy", "compat.py"), modules)
        for path in modules:
            with open(os.path.join(ROOT, path), encoding="utf-8") as f:
                problems.extend(header_problems(path, f.readline(), existing))
        self.assertEqual(problems, [], "fix line 1 of these modules: name the test modules that test them")


class Classified(SynchronousTestCase):
    def test_every_test_module(self) -> None:
        listed = list(unit.UNIT) + list(unit.INTEGRATION)
        self.assertEqual(sorted(n for n in set(listed) if listed.count(n) > 1), [],
                         "listed more than once in tests/unit.py")
        self.assertEqual(sorted(test_modules() - set(listed)), [],
                         "add these to UNIT (no real component) or INTEGRATION in tests/unit.py")
        self.assertEqual(sorted(set(listed) - test_modules()), [],
                         "tests/unit.py lists modules that do not exist")

    def test_unit_suite_loads(self) -> None:
        # Loaded as trial loads it: an import error would be an error
        # holder in the suite, not a silently smaller run.
        names = {type(test).__module__ for test in _flatten(unit.testSuite())}
        self.assertEqual(names, set(unit.UNIT))


def _flatten(suite: object) -> list[object]:
    """The tests of a (nested) suite."""
    if not isinstance(suite, unittest.TestSuite):
        return [suite]
    return [t for s in suite for t in _flatten(s)]
