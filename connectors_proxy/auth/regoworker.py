# -*- test-case-name: tests.test_rego -*-
"""
The Rego evaluator process: compiles ConnectorClass policies and evaluates
them for the proxy (L{connectors_proxy.auth.rego.WorkerPool} runs it), one
at a time, in the order asked.

Evaluation happens here rather than in the proxy because rego-cpp (regopy)
has no time or memory limit of its own: a policy that loops is stopped by
the proxy killing this process, and one that allocates without end meets
this process's address-space limit (C{RLIMIT_AS}) and aborts it, never the
proxy.

Frames, both ways: a 4-byte big-endian length, then the frame.  From the
proxy: C{b"D" KEY TEXT} compile a policy under a 4-byte key; C{b"F" KEY}
forget it; C{b"E" KEY INPUT} evaluate C{data.proxy.auth} with the JSON
C{INPUT}; C{b"K" KEY} say whether it compiled.  To the proxy: C{b"R"}
once, when ready; then one answer per C{E}: C{b"V" OUTPUT} (rego-cpp's
output JSON text), C{b"U"} (undefined), C{b"C" MESSAGE} (the policy did
not compile), C{b"X" MESSAGE} (evaluation failed); and one per C{K}:
C{b"O"} (it compiled) or C{b"C" MESSAGE}.

Standalone on purpose: the standard library and regopy only, so the
process starts in a fraction of a second and shares nothing with the proxy.
"""

from __future__ import annotations

import os
import struct
import sys
from typing import Any, BinaryIO

QUERY = "data.proxy.auth"
MODULE_NAME = "policy.rego"

Compiled = Any  # (Interpreter, Bundle), or the compile error's text


def compile_policy(text: str) -> Compiled:
    """A policy built for L{QUERY}, or the text of why it does not compile."""
    import regopy

    interpreter = regopy.Interpreter()
    try:
        interpreter.add_module(MODULE_NAME, text)
        bundle = interpreter.build(QUERY)
    except Exception as e:  # regopy.RegoError, and anything the binding raises
        return str(e) or e.__class__.__name__
    if not bundle.ok():
        return "the policy did not build"
    return (interpreter, bundle)


def evaluate(compiled: Compiled, input_json: str) -> tuple[bytes, str]:
    """
    One evaluation: C{(b"V", output)}, C{(b"U", "")}, C{(b"C", why)} or
    C{(b"X", why)} (see the module docstring).
    """
    from regopy.rego_shared import (
        rego_bundle_query,
        rego_free_output,
        rego_output_ok,
        rego_output_string,
        rego_set_input_term,
    )

    if isinstance(compiled, str):
        return b"C", compiled
    interpreter, bundle = compiled
    try:
        # The lower-level calls: regopy's Output object decodes the result
        # twice and raises on rego-cpp's non-JSON error terms.
        rego_set_input_term(interpreter._impl, input_json)
        output = rego_bundle_query(interpreter._impl, bundle._impl)
        try:
            ok = rego_output_ok(output)
            text = rego_output_string(output)
        finally:
            rego_free_output(output)
    except Exception as e:
        return b"X", str(e) or e.__class__.__name__
    if not ok:
        return b"X", text
    if text == "undefined":
        return b"U", ""
    return b"V", text


def _address_space() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _read(stream: BinaryIO, size: int) -> bytes | None:
    data = stream.read(size)
    return data if data is not None and len(data) == size else None


def main(argv: list[str]) -> int:
    memory = int(argv[1]) if len(argv) > 1 else 0
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb")
    # rego-cpp prints compile errors on stdout, and an error can quote the
    # input (a client's token, a Secret's data): nothing this process
    # prints goes anywhere.
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    import regopy  # noqa: F401 (loaded before the limit: its arena is reserved at load)

    if memory:
        import resource

        # rego-cpp's allocator reserves a large address range when loaded;
        # the budget is counted from there.
        limit = _address_space() + memory
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    def reply(frame: bytes) -> None:
        replies.write(struct.pack(">I", len(frame)) + frame)
        replies.flush()

    policies: dict[bytes, Compiled] = {}
    reply(b"R")
    while True:
        header = _read(requests, 4)
        if header is None:
            return 0
        frame = _read(requests, struct.unpack(">I", header)[0])
        if frame is None:
            return 0
        op, key, body = frame[:1], frame[1:5], frame[5:]
        if op == b"D":
            policies[key] = compile_policy(body.decode("utf-8", "replace"))
        elif op == b"F":
            policies.pop(key, None)
        elif op == b"E":
            compiled = policies.get(key, "the policy was not sent to the evaluator")
            status, text = evaluate(compiled, body.decode("utf-8"))
            reply(status + text.encode("utf-8", "replace"))
        elif op == b"K":
            compiled = policies.get(key, "the policy was not sent to the evaluator")
            reply(b"C" + compiled.encode("utf-8", "replace") if isinstance(compiled, str) else b"O")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
