# -*- test-case-name: tests.test_logformat -*-
"""
The log observer's stream: access lines reach standard output in batches,
also when Python writes C{sys.stdout} through (C{PYTHONUNBUFFERED}).
"""

from __future__ import annotations

import io
import os
import sys

from twisted.internet.task import Clock
from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase

from connectors_proxy.ops import logformat


def event(access: bool, text: str) -> dict[str, object]:
    return {"log_level": LogLevel.info, "log_format": text, "log_time": 0.0, "access": access,
            "access_text": text if access else None, "log_namespace": "t"}


class StdoutTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()
        # What Python gives a process with PYTHONUNBUFFERED: every write goes straight to the file.
        raw = open(self.path, "wb", buffering=0)  # noqa: SIM115
        unbuffered = io.TextIOWrapper(raw, encoding="utf-8", write_through=True)
        self.addCleanup(unbuffered.close)
        self.patch(sys, "stdout", unbuffered)

    def written(self) -> str:
        with open(self.path, encoding="utf-8") as f:
            return f.read()

    def test_access_lines_flushed_in_batches(self) -> None:
        clock = Clock()
        observer = logformat.observer("text", clock=clock)
        for i in range(100):
            observer(event(True, f"access {i}"))
        self.assertEqual(self.written(), "")
        # Written once the reactor turn is over.
        clock.advance(0)
        self.assertEqual(self.written().count("access "), 100)

    def test_other_lines_at_once(self) -> None:
        observer = logformat.observer("text", clock=Clock())
        observer(event(False, "started"))
        self.assertIn("started", self.written())

    def test_stdout_that_is_no_file(self) -> None:
        self.patch(sys, "stdout", io.StringIO())
        self.assertIs(logformat.buffered_stdout(), sys.stdout)

    def test_the_fd_stays_open(self) -> None:
        stream = logformat.buffered_stdout()
        stream.close()
        os.fstat(sys.stdout.fileno())
