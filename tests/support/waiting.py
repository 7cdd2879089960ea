"""
Waiting in tests that run on the real reactor: for a while, or until
something is true (polled, with a deadline that fails the test).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater


async def sleep(seconds: float) -> None:
    """Let C{seconds} pass on the reactor."""
    await deferLater(reactor, seconds, lambda: None)


async def eventually(check: Callable[[], Any], timeout: float = 10.0, what: str = "",
                     interval: float = 0.02) -> Any:
    """
    Call C{check} every C{interval} seconds until it returns something
    true, and return that; after C{timeout} seconds, fail, naming C{what}.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await sleep(interval)
