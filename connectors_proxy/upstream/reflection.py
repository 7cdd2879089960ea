# -*- test-case-name: tests.test_reflection -*-
"""
Credentials an upstream reflects (README.md, "Reflected credentials"): an upstream that echoes
the request (C{/headers} endpoints, debug pages, a 401 body quoting the
C{Authorization}, a foreign C{Location} carrying it in its query) would hand
the Connector's Secret to every workload allowed to use the Connector.

What is secret (L{secrets_for}): the values of the credentials the proxy
injected (L{connectors_proxy.model.credentials.BasicCredentials.secret_values}),
whatever else it injected (a registry token), and the forms a reflection
carries them in.  What the relay does with them: header values that contain
one are dropped (L{drop_reflected}), textual bodies are masked with
same-length C{*} as they stream (L{Masker}, so C{Content-Length} stays
right and nothing is buffered), binary bodies are left intact
(L{textual}).  Pure functions and plain objects, no I/O.
"""

from __future__ import annotations

import base64
import functools
import json
import zlib
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote

from attrs import field, frozen
from twisted.web.http_headers import Headers

from connectors_proxy.model.credentials import Credentials

# Shorter values are only looked for as part of their longer forms (the
# Basic user:password pair, the header value): masking every "p" or "1234"
# of a body would destroy it, and say nothing an attacker could not guess.
MIN_SECRET = 6

_SCHEMES = (b"Basic ", b"Bearer ")
_URLSAFE = bytes.maketrans(b"+/", b"-_")


def base64_cores(value: bytes) -> list[bytes]:
    """
    The base64 of C{value} at each of the three alignments it can have
    inside a longer base64 text, cut to the characters that depend on
    C{value} alone: whatever surrounds it, these appear when it is encoded.
    The first is the plain base64 of C{value} without its last, partial
    group.
    """
    cores = []
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + value)
        # Character j holds bits 6j..6j+5; the value's bits are 8*offset..8*(offset+len).
        cores.append(encoded[(8 * offset + 5) // 6:(8 * (offset + len(value))) // 6])
    return cores


def _json_forms(form: bytes) -> set[bytes]:
    """How a JSON string may spell C{form} (escaped quotes, C{\\u} escapes, PHP's C{\\/})."""
    text = form.decode("utf-8", "surrogateescape")
    spellings = {form}
    try:
        spellings.add(json.dumps(text)[1:-1].encode("ascii"))
        spellings.add(json.dumps(text, ensure_ascii=False)[1:-1].encode("utf-8"))
    except UnicodeEncodeError:
        pass  # lone surrogates from undecodable bytes: no JSON spelling
    return spellings | {s.replace(b"/", b"\\/") for s in spellings}


def _url_forms(form: bytes) -> set[bytes]:
    """How a URL (a C{Location}'s query) may spell C{form}."""
    return {quote(form, safe="").encode("ascii"), quote(form, safe="/").encode("ascii")}


def _minimal(needles: Iterable[bytes]) -> tuple[bytes, ...]:
    """
    C{needles} long enough to look for, without those that contain another
    one: masking the shorter hides the secret in the longer, and every
    needle costs a pass over each body chunk.
    """
    kept: list[bytes] = []
    for needle in sorted({n for n in needles if len(n) >= MIN_SECRET}, key=len):
        if not any(shorter in needle for shorter in kept):
            kept.append(needle)
    return tuple(kept)


@frozen
class Secrets:
    """
    What must never reach the client, as byte strings to look for.

    @ivar streamed: looked for in streamed bodies (a pass over every chunk
        each, so few): the raw values and their plain base64, as they are
        and as JSON spells them.
    @ivar everywhere: looked for in headers, the status line and error
        bodies: also base64 at any alignment, URL-safe base64, and their
        URL-encoded and JSON-escaped spellings.
    """

    streamed: tuple[bytes, ...] = field(default=(), repr=False)
    everywhere: tuple[bytes, ...] = field(default=(), repr=False)
    # For header names, which HTTP (and Twisted's Headers) does not keep the case of.
    lowered: tuple[bytes, ...] = field(default=(), repr=False)

    def __bool__(self) -> bool:
        return bool(self.everywhere)

    def found_in(self, value: bytes) -> bool:
        """Whether C{value} (a header value, a URL) contains a secret."""
        for needle in self.everywhere:
            if needle in value:
                return True
        return False

    def found_in_name(self, name: bytes) -> bool:
        """Whether a header C{name} contains a secret, whatever its case."""
        name = name.lower()
        for needle in self.lowered:
            if needle in name:
                return True
        return False

    def mask(self, data: bytes) -> bytes:
        """C{data} (a whole small body) with every secret in it masked."""
        if not self.everywhere:
            return data
        masker = Masker(self.everywhere)
        return masker.feed(data) + masker.flush()

    def masker(self, error: bool = False) -> Masker:
        """A L{Masker} for a streamed body (an error body: with every form)."""
        return Masker(self.everywhere if error else self.streamed)


NO_SECRETS = Secrets()


@functools.lru_cache(maxsize=1024)
def _secrets(values: tuple[bytes, ...]) -> Secrets:
    """The L{Secrets} of injected C{values} (secrets and header values)."""
    raw: set[bytes] = set()
    bare: set[bytes] = set()
    for value in values:
        raw.add(value)
        scheme = next((s for s in _SCHEMES if value.startswith(s)), None)
        if scheme is not None:
            # A header value: its credential may be quoted without the scheme.
            raw.add(value[len(scheme):].strip())
        else:
            bare.add(value)
    streamed = raw | {base64_cores(v)[0] for v in bare}
    for form in list(streamed):
        # Most echoes are JSON: a form it spells otherwise (a "/" in base64,
        # for PHP) is one more needle.
        streamed.update(_json_forms(form))
    forms = set(streamed)
    for value in raw:
        for core in base64_cores(value):
            forms.update((core, core.translate(_URLSAFE)))
    for form in list(forms):
        forms.update(_url_forms(form) | _json_forms(form))
    everywhere = _minimal(forms)
    return Secrets(_minimal(streamed), everywhere, _minimal(f.lower() for f in everywhere))


def secrets_for(credentials: Credentials | None, *extra: bytes | str | None) -> Secrets:
    """
    The L{Secrets} of C{credentials} (the Connector's, C{None} for an
    anonymous one) and of C{extra} values the proxy also injected (a
    registry token and the header that carried it; C{None}s are skipped).
    """
    if not extra:
        return NO_SECRETS if credentials is None else _of_credentials(credentials)
    values = list(credentials.secret_values()) if credentials is not None else []
    values += [v.encode("utf-8") if isinstance(v, str) else v for v in extra if v]
    return _secrets(tuple(sorted(set(values)))) if values else NO_SECRETS


@functools.lru_cache(maxsize=1024)
def _of_credentials(credentials: Credentials) -> Secrets:
    # Per response: the values are worked out once per credentials.
    return _secrets(tuple(sorted(set(credentials.secret_values()))))


def drop_reflected(headers: Headers, secrets: Secrets) -> None:
    """
    Remove from C{headers} every value (and every header whose name)
    contains a secret.  Checks all of them at once first: nearly always
    there is none, and this runs for every response.
    """
    if not secrets:
        return
    parts: list[bytes] = []
    for name, values in headers.getAllRawHeaders():
        parts.append(name)
        parts.extend(values)
    # A secret in a value or a name is there, in lower case, in all of them lowered.
    if not secrets.found_in_name(b"\n".join(parts)):
        return
    for name, values_ in list(headers.getAllRawHeaders()):
        kept = [v for v in values_ if not secrets.found_in(v)]
        if secrets.found_in_name(name) or not kept:
            headers.removeHeader(name)
        elif len(kept) != len(values_):
            headers.setRawHeaders(name, kept)


_TEXT_SUBTYPES = frozenset({
    b"xml", b"javascript", b"x-javascript", b"ecmascript", b"x-www-form-urlencoded", b"yaml", b"x-yaml",
})


def textual(content_type: bytes | None) -> bool:
    """
    Whether a body of C{content_type} is text a reflection could be quoted
    in: C{text/*}, JSON (C{*/json}, C{*/*+json}, NDJSON), XML, JavaScript,
    forms, YAML, or no type at all.  Anything else (git packs, OCI blobs,
    C{application/octet-stream}, images) is binary and relayed intact.
    """
    if not content_type:
        return True
    media = content_type.split(b";", 1)[0].strip().lower()
    kind, _, subtype = media.partition(b"/")
    return (kind == b"text" or b"json" in subtype or subtype.endswith(b"+xml")
            or subtype in _TEXT_SUBTYPES)


class _CMemmem:
    """
    The C library's C{memmem}, where it has one (glibc, musl, BSD, macOS).
    On a body chunk it runs two to four times as fast as C{bytes.find}
    (glibc's skip table hashes two bytes, CPython's one byte modulo 64, so a
    token of hex digits in JSON full of digits and letters skips little),
    and a streamed body pays one search per needle.  Called with the GIL
    held (C{PyDLL}): a search of a chunk takes microseconds.  Lengths are
    C{size_t} objects made once (L{size}), not converted on every call
    (C{argtypes}), which would double the cost of a call.

    @ivar search: C{search(data, size(len(data)), needle, size(len(needle)))}
        is C{None} when C{needle} is not in C{data}.
    """

    def __init__(self) -> None:
        import ctypes

        self.size: Callable[[int], Any] = ctypes.c_size_t
        self.search: Callable[[bytes, Any, bytes, Any], int | None] = ctypes.PyDLL(None).memmem
        self.search.restype = ctypes.c_void_p  # type: ignore[attr-defined]
        size = self.size
        if (self.search(b"..needle..", size(10), b"needle", size(6)) is None
                or self.search(b"needl", size(5), b"needle", size(6)) is not None):
            raise OSError("memmem does not work as expected")


def _c_memmem() -> _CMemmem | None:
    try:
        return _CMemmem()
    except Exception:  # no ctypes, no dlopen(NULL) (Windows), no memmem
        return None


_memmem = _c_memmem()


@functools.lru_cache(maxsize=1024)
def _starts(needles: tuple[bytes, ...]) -> tuple[frozenset[bytes], frozenset[bytes], frozenset[bytes]]:
    """
    For the cheap test that a chunk's end cannot start a needle: its last
    byte is no needle's first, its last two no needle's first two, its last
    three in no needle.  Once per set of needles, not per response.
    """
    return (frozenset(n[:1] for n in needles), frozenset(n[:2] for n in needles),
            frozenset(n[i:i + 3] for n in needles for i in range(len(n) - 2)))


class Masker:
    """
    Masks needles in a body that arrives in chunks, with same-length C{*},
    also where a needle is split between chunks.  Bytes that could be the
    start of a needle are held back until the next chunk (or L{flush}) says
    whether they are; everything else goes out at once, so a stream of
    events is not delayed and the body is never buffered.

    The common chunk (no needle in it, no needle prefix at its end) is
    returned as it is: one C{bytes.find} per needle, no copy.
    """

    def __init__(self, needles: Iterable[bytes]) -> None:
        self._needles = tuple(needles)
        self._firsts, self._pairs, self._triples = _starts(self._needles)
        self._sizes = [_memmem.size(len(n)) for n in self._needles] if _memmem is not None else []
        self._carry = b""  # bytes held back, as they came
        self._head = 0  # how many of them to mask (a needle that began in bytes already sent)

    def feed(self, data: bytes) -> bytes:
        """The bytes of C{data} (and of earlier chunks held back) that can go out now."""
        if not self._needles:
            return data
        if self._carry:
            data = self._carry + data
            self._carry = b""
        return self._emit(data, self._safe_end(data))

    def flush(self) -> bytes:
        """What is still held back, masked: the body has ended."""
        data, self._carry = self._carry, b""
        return self._emit(data, len(data)) if data else b""

    def _safe_end(self, data: bytes) -> int:
        """Where the longest end of C{data} that is the start of a needle begins."""
        end = len(data)
        if not (data[-1:] in self._firsts or data[-2:] in self._pairs or data[-3:] in self._triples):
            return end
        best = end
        for needle in self._needles:
            first = needle[:1]
            at = data.find(first, max(end - len(needle) + 1, 0))
            while at != -1 and at < best:
                if needle.startswith(data[at:]):
                    best = at
                    break
                at = data.find(first, at + 1)
        return best

    def _emit(self, data: bytes, cut: int) -> bytes:
        """
        Send C{data[:cut]} with its needles masked and hold the rest back
        raw (a needle that starts there is found again with the next
        chunk); how far a masked needle runs into the held bytes is kept in
        C{_head}.
        """
        spans: list[tuple[int, int]] = [(0, self._head)] if self._head else []
        memmem = _memmem
        if memmem is not None and len(data) > 4096:
            # Most chunks: is any needle in it at all?
            search, size = memmem.search, memmem.size(len(data))
            needles = [n for n, n_size in zip(self._needles, self._sizes, strict=True)
                       if search(data, size, n, n_size) is not None]
        else:
            # A small chunk: bytes.find is quicker than a call through ctypes.
            needles = list(self._needles)
        for needle in needles:
            at = data.find(needle)
            while at != -1 and at < cut:
                spans.append((at, at + len(needle)))
                at = data.find(needle, at + 1)
        if cut < len(data):
            self._carry = data[cut:]
        if not spans:
            self._head = 0
            return data if cut == len(data) else data[:cut]
        self._head = max(0, max(end for _, end in spans) - cut)
        out = bytearray(data[:cut])
        for start, end in spans:
            end = min(end, cut)
            if start < end:
                out[start:end] = b"*" * (end - start)
        return bytes(out)


class Inflater:
    """
    Decodes a C{gzip} or C{deflate} C{Content-Encoding} as it streams, so
    the body can be masked: a compressed body would carry a reflected
    secret past any search.  C{deflate} is zlib-wrapped by the standard
    and raw from some servers; both are read.
    """

    # Output per call, so one compressed chunk does not become one huge string.
    PIECE = 256 * 1024

    def __init__(self, encoding: bytes) -> None:
        self._raw_fallback = encoding == b"deflate"
        # 32 + MAX_WBITS: a gzip or a zlib header, whichever it is.
        self._inflate = zlib.decompressobj(32 + zlib.MAX_WBITS)
        self._started = False

    def feed(self, data: bytes) -> list[bytes]:
        """The decoded pieces of C{data}; L{zlib.error} for a corrupt body."""
        if self._inflate.eof:
            return []  # after the end of the stream: padding or junk, dropped
        try:
            out = [self._inflate.decompress(data, self.PIECE)]
        except zlib.error:
            if self._started or not self._raw_fallback:
                raise
            self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)
            out = [self._inflate.decompress(data, self.PIECE)]
        self._started = True
        while self._inflate.unconsumed_tail and not self._inflate.eof:
            out.append(self._inflate.decompress(self._inflate.unconsumed_tail, self.PIECE))
        return out

    def flush(self) -> bytes:
        return self._inflate.flush()


# Content-Encodings the proxy can decode to mask what is in them.
DECODABLE = frozenset({b"gzip", b"x-gzip", b"deflate"})
