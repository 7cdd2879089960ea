# -*- test-case-name: tests.test_upstream_framing -*-
"""
Reading an upstream's HTTP/1.1 response, as pure functions and a small
state machine: the head (status line and fields) and the body's framing
(RFC 9112 section 6.3), and the chunked coding.

Nothing here does I/O; L{connectors_proxy.upstream.client} feeds it the
bytes a connection reads.  A response the proxy cannot frame with certainty
raises L{MalformedResponse}: the connection is then closed, never reused,
so bytes of one response can never be taken for the next one's.
"""

from __future__ import annotations

import re
from enum import Enum

from attrs import frozen

# A response head larger than this is refused (a hostile or broken upstream
# must not make the proxy buffer without bound).
MAX_HEAD = 64 * 1024
MAX_FIELDS = 256
# A chunk-size line, its extensions included; a longer one is refused.
MAX_SIZE_LINE = 4096
# The largest chunk size accepted, as for requests (server/channel.py): framed
# chunk-size lines reach clients as they came, and other parsers (JavaScript's
# doubles, narrower integers) would read a larger one differently.
MAX_CHUNK_SIZE = 2**53

# Fields about this connection only, never part of the response handed on.
# Content-Length is one too, except in answers to HEAD and in 304s, where
# it describes the body a GET would have had.
CONNECTION_FIELDS = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"trailers",
    b"transfer-encoding", b"upgrade", b"content-length",
})

_STATUS = re.compile(rb"HTTP/(\d)\.(\d) (\d{3})(?: ([^\r\n]*))?")
# RFC 9110 section 5.6.2: a field name is a token.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_DIGITS = re.compile(rb"[0-9]+")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
# The fields of a head, every one well formed: a token, a colon, a value of
# visible characters, spaces, tabs and obs-text; lines end in CRLF or LF.
_FIELDS = re.compile(rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*\r?\n)*"
                     rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*\r?")
# Field values: visible characters, spaces and tabs, and obs-text.
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class MalformedResponse(ValueError):
    """
    The upstream's response cannot be framed (the message says why).  The
    message never quotes the response: it reaches the client, and an
    upstream may reflect credentials anywhere.
    """


class Framing(Enum):
    NONE = "none"          # no body (HEAD, 1xx, 204, 304)
    LENGTH = "length"      # Content-Length bytes
    CHUNKED = "chunked"    # the chunked coding
    CLOSE = "close"        # until the connection closes


@frozen
class Head:
    """
    A parsed response head.

    @ivar fields: C{(lower-case name, value)} in order, every field kept.
    """

    version: tuple[int, int]
    code: int
    phrase: bytes
    fields: list[tuple[bytes, bytes]]

    def values(self, name: bytes) -> list[bytes]:
        return [value for field, value in self.fields if field == name]


def head_end(buffer: bytes | bytearray) -> tuple[int, int]:
    """
    Where the head in C{buffer} ends: C{(end of its last line, start of
    the body)}, or C{(-1, -1)} if it is not complete yet.  A bare LF ends
    lines too (RFC 9112 section 2.2 lets a recipient accept it).
    """
    # The first empty line wins, however it and the line before it end.
    best = (-1, -1)
    for pattern in (b"\r\n\r\n", b"\n\n", b"\n\r\n"):
        at = buffer.find(pattern, 0, best[1] if best[1] >= 0 else len(buffer))
        if at >= 0 and (best[1] < 0 or at + len(pattern) < best[1]):
            best = (at, at + len(pattern))
    return best


def parse_head(block: bytes) -> Head:
    """
    Parse a response head (without its closing empty line).

    @raise MalformedResponse: a bad status line or field, obsolete line
        folding, or too many fields.
    """
    lines = block.split(b"\n")
    status = lines[0].rstrip(b"\r")
    match = _STATUS.fullmatch(status)
    if match is None:
        raise MalformedResponse("bad status line")
    major, minor = int(match.group(1)), int(match.group(2))
    if major != 1:
        raise MalformedResponse(f"HTTP/{major}.{minor} is not HTTP/1.x")
    if len(lines) - 1 > MAX_FIELDS:
        raise MalformedResponse(f"more than {MAX_FIELDS} header fields")
    newline = block.find(b"\n")
    if newline < 0:
        return Head((major, minor), int(match.group(3)), match.group(4) or b"", [])
    if _FIELDS.fullmatch(block, newline + 1) is not None:
        # Every field well formed (checked in one pass): just split them.
        fields = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            fields.append((name.lower(), value.strip(b" \t\r")))
        return Head((major, minor), int(match.group(3)), match.group(4) or b"", fields)
    fields = []
    for number, line in enumerate(lines[1:], 2):
        if line.endswith(b"\r"):
            line = line[:-1]
        if line[:1] in (b" ", b"\t"):
            raise MalformedResponse("obsolete line folding in a header field")
        name, colon, value = line.partition(b":")
        if not colon or _TOKEN.fullmatch(name) is None:
            raise MalformedResponse(f"bad header field (line {number})")
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value) is not None:
            raise MalformedResponse(f"control character in header field (line {number})")
        fields.append((name.lower(), value))
    return Head((major, minor), int(match.group(3)), match.group(4) or b"", fields)


def _tokens(values: list[bytes]) -> list[bytes]:
    return [t.strip().lower() for v in values for t in v.split(b",") if t.strip()]


def framing(method: bytes, head: Head) -> tuple[Framing, int | None, bool]:
    """
    How the body of C{head} (the answer to a C{method} request) is
    delimited: C{(framing, length, reusable)}, C{length} for
    L{Framing.LENGTH}, and whether the connection may carry another request
    afterwards.

    @raise MalformedResponse: conflicting or invalid Content-Length, or a
        transfer coding that is not chunked last.
    """
    connection = _tokens(head.values(b"connection"))
    if head.version >= (1, 1):
        reusable = b"close" not in connection
    else:
        reusable = b"keep-alive" in connection
    lengths = head.values(b"content-length")
    length = None
    if lengths:
        # Checked even where it frames nothing: in answers to HEAD and in
        # 304s it is handed on to the client.
        parts = {p.strip() for v in lengths for p in v.split(b",")}
        if len(parts) != 1:
            raise MalformedResponse("conflicting Content-Length values")
        (text,) = parts
        if _DIGITS.fullmatch(text) is None or len(text) > 18:
            raise MalformedResponse("bad Content-Length")
        length = int(text)
    if method == b"HEAD" or head.code in (204, 304) or 100 <= head.code < 200:
        return Framing.NONE, None, reusable
    codings = _tokens(head.values(b"transfer-encoding"))
    if codings:
        if codings.count(b"chunked") > 1:
            raise MalformedResponse("chunked applied more than once")
        if codings != [b"chunked"]:
            # The proxy sends no TE: an upstream may apply no other coding
            # (RFC 9110 section 10.1.4), and the proxy could not decode it.
            raise MalformedResponse("a transfer coding other than chunked")
        # With a Content-Length as well, the message may be an attempt at
        # smuggling; on HTTP/1.0 its framing is faulty (RFC 9112 section
        # 6.1): framed by the coding, and the connection not reused.
        return Framing.CHUNKED, None, reusable and length is None and head.version >= (1, 1)
    if length is not None:
        return Framing.LENGTH, length, reusable
    return Framing.CLOSE, None, False


# Where a ChunkedReader is in the body.
_ST_SIZE, _ST_DATA, _ST_DATA_END, _ST_TRAILER = range(4)


class ChunkedReader:
    """
    Follows a chunked body through the reads that carry it.

    L{feed} returns what to hand on from each read, in one of two forms:

      - decoded (C{framed=False}): the payload pieces;
      - framed (C{framed=True}): the chunks as they came, size lines and
        all, minus the last chunk and trailer section: bytes that a client
        reading a chunked response takes unchanged (the relay writes its
        own last chunk).  Copying them through costs one slice per read
        instead of one write per chunk.  A size line split across reads,
        or with extensions or a bare LF, is written out anew in canonical
        form.

    Either way it finds where the body ends (L{done}) and counts its
    payload (L{payload}).
    """

    def __init__(self, framed: bool) -> None:
        self.framed = framed
        self.done = False
        self.payload = 0
        self._state = _ST_SIZE
        self._remaining = 0
        self._line = b""
        self._cr = False

    def feed(self, data: bytes) -> tuple[list[bytes], int]:
        """
        Read C{data}.  Returns C{(pieces, used)}: what to hand on, and how
        many bytes of C{data} belong to this body (any after them follow it
        on the connection).

        @raise MalformedResponse: a bad size line or chunk ending.
        """
        out: list[bytes] = []
        framed = self.framed
        pos, end = 0, len(data)
        # Framed: data[start:pos] is a run of bytes to hand on as they are
        # (None once the last chunk is reached).
        start: int | None = None if self._state == _ST_TRAILER else 0
        while pos < end and not self.done:
            state = self._state
            if state == _ST_DATA:
                take = min(self._remaining, end - pos)
                if not framed:
                    out.append(data[pos:pos + take])
                pos += take
                self._remaining -= take
                self.payload += take
                if not self._remaining:
                    self._state = _ST_DATA_END
            elif state == _ST_DATA_END:
                byte = data[pos]
                if byte == 13 and not self._cr:      # CR
                    self._cr = True
                    pos += 1
                elif byte == 10:                    # LF
                    if not self._cr and framed and start is not None:
                        # A bare LF: hand on a CRLF instead.
                        out.append(data[start:pos] + b"\r\n")
                        start = pos + 1
                    self._cr = False
                    pos += 1
                    self._state = _ST_SIZE
                else:
                    raise MalformedResponse("chunk data not followed by CRLF")
            elif state == _ST_SIZE:
                newline = data.find(b"\n", pos)
                if newline < 0:
                    if len(self._line) + end - pos > MAX_SIZE_LINE:
                        raise MalformedResponse("chunk-size line too long")
                    if framed and start is not None and start < pos:
                        out.append(data[start:pos])
                    self._line += data[pos:]
                    pos = end
                    start = end
                    break
                whole = not self._line
                line = self._line + data[pos:newline + 1]
                self._line = b""
                size, canonical = _chunk_size(line)
                if size == 0:
                    if framed and start is not None and start < pos:
                        out.append(data[start:pos])
                    start = None
                    pos = newline + 1
                    self._state = _ST_TRAILER
                    continue
                if framed and not (whole and canonical):
                    if start is not None and start < pos:
                        out.append(data[start:pos])
                    out.append(b"%x\r\n" % size)
                    start = newline + 1
                pos = newline + 1
                self._remaining = size
                self._state = _ST_DATA
            else:  # the trailer section: lines up to an empty one
                newline = data.find(b"\n", pos)
                if newline < 0:
                    if len(self._line) + end - pos > MAX_HEAD:
                        raise MalformedResponse("trailer section too long")
                    self._line += data[pos:]
                    pos = end
                    break
                line = (self._line + data[pos:newline]).rstrip(b"\r")
                self._line = b""
                pos = newline + 1
                if not line:
                    self.done = True
        if framed and start is not None and start < pos:
            out.append(data[start:pos])
        return out, pos


def _chunk_size(line: bytes) -> tuple[int, bool]:
    """The size a chunk-size line gives, and whether the line can be handed on as it is."""
    canonical = line.endswith(b"\r\n")
    text = line[:-2] if canonical else line[:-1]
    size_text, semicolon, _extensions = text.partition(b";")
    if semicolon:
        canonical = False
        size_text = size_text.rstrip(b" \t")
    if _HEX.fullmatch(size_text) is None:
        raise MalformedResponse("bad chunk size")
    size = int(size_text, 16)
    if size > MAX_CHUNK_SIZE:
        raise MalformedResponse("chunk size over 2^53")
    return size, canonical
