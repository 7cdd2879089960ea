"""Running a command's C{main} in the test's own process, its output captured."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from contextlib import redirect_stderr, redirect_stdout
from typing import Any


def run_main(main: Callable[[list[str]], Any], argv: Sequence[str]) -> tuple[int, str, str]:
    """C{main(argv)}: its exit code (a C{SystemExit}'s too), what it wrote to stdout and to stderr."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as e:
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()
