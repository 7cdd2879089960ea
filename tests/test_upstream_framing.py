# -*- test-case-name: tests.test_upstream_framing -*-
"""
Reading upstream responses: heads, body framing (RFC 9112 section 6.3)
and the chunked coding, decoded and handed on framed.
"""

from __future__ import annotations

import random

from twisted.trial.unittest import SynchronousTestCase

from connectors_proxy.upstream.framing import (
    MAX_SIZE_LINE,
    ChunkedReader,
    Framing,
    Head,
    MalformedResponse,
    framing,
    head_end,
    parse_head,
)


def head(text: bytes) -> Head:
    return parse_head(text)


class HeadTests(SynchronousTestCase):
    def test_status_and_fields(self) -> None:
        parsed = head(b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nX-A:  1 \r\nx-a: 2")
        self.assertEqual((parsed.version, parsed.code, parsed.phrase), ((1, 1), 404, b"Not Found"))
        self.assertEqual(parsed.fields, [(b"content-type", b"text/plain"), (b"x-a", b"1"), (b"x-a", b"2")])
        self.assertEqual(parsed.values(b"x-a"), [b"1", b"2"])

    def test_no_phrase_and_bare_line_feeds(self) -> None:
        parsed = head(b"HTTP/1.0 204\nA: b")
        self.assertEqual((parsed.version, parsed.code, parsed.phrase, parsed.fields), ((1, 0), 204, b"", [(b"a", b"b")]))

    def test_refused(self) -> None:
        for bad, why in [
            (b"HTTP/2.0 200 OK", "HTTP/2.0"),
            (b"ICY 200 OK", "status line"),
            (b"HTTP/1.1 20 OK", "status line"),
            (b"HTTP/1.1 200 OK\r\n folded: x", "folding"),
            (b"HTTP/1.1 200 OK\r\nBad Name: x", "header field"),
            (b"HTTP/1.1 200 OK\r\nNoColon", "header field"),
            (b"HTTP/1.1 200 OK\r\nA: x\x00y", "control character"),
            (b"HTTP/1.1 200 OK\r\nA: x\ry", "control character"),
            (b"HTTP/1.1 200 OK" + b"\r\nA: b" * 300, "fields"),
        ]:
            with self.assertRaises(MalformedResponse, msg=bad) as caught:
                parse_head(bad)
            self.assertIn(why, str(caught.exception))

    def test_head_end(self) -> None:
        self.assertEqual(head_end(b"HTTP/1.1 200 OK\r\nA: b\r\n\r\nbody"), (21, 25))
        self.assertEqual(head_end(b"HTTP/1.1 200 OK\nA: b\n\nbody"), (20, 22))
        self.assertEqual(head_end(b"HTTP/1.1 200 OK\r\nA: b\r\n"), (-1, -1))


class FramingTests(SynchronousTestCase):
    def frame(self, method: bytes, text: bytes) -> tuple[Framing, int | None, bool]:
        return framing(method, parse_head(text))

    def test_length(self) -> None:
        self.assertEqual(self.frame(b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 12"), (Framing.LENGTH, 12, True))
        # The same value repeated is one value (RFC 9110 section 8.6).
        self.assertEqual(self.frame(b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\nContent-Length: 3"),
                         (Framing.LENGTH, 3, True))

    def test_no_body(self) -> None:
        self.assertEqual(self.frame(b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 12"), (Framing.NONE, None, True))
        for code in (b"204", b"304"):
            self.assertEqual(self.frame(b"GET", b"HTTP/1.1 " + code + b" X\r\nContent-Length: 5")[0], Framing.NONE)

    def test_chunked(self) -> None:
        self.assertEqual(self.frame(b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked"),
                         (Framing.CHUNKED, None, True))

    def test_chunked_with_length_is_not_reused(self) -> None:
        # A response framed two ways may be a smuggling attempt: the coding
        # frames it, and the connection carries nothing after it.
        self.assertEqual(self.frame(b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5"),
                         (Framing.CHUNKED, None, False))

    def test_until_close(self) -> None:
        self.assertEqual(self.frame(b"GET", b"HTTP/1.1 200 OK"), (Framing.CLOSE, None, False))

    def test_keep_alive(self) -> None:
        self.assertFalse(self.frame(b"GET", b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0")[2])
        self.assertFalse(self.frame(b"GET", b"HTTP/1.0 200 OK\r\nContent-Length: 0")[2])
        self.assertTrue(self.frame(b"GET", b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0")[2])

    def test_refused(self) -> None:
        for text, why in [
            (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4", "conflicting"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: -1", "bad Content-Length"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 0x10", "bad Content-Length"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999", "bad Content-Length"),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked", "more than once"),
            # The proxy sends no TE: no coding but chunked may come, and it could decode none.
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip", "other than chunked"),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked", "other than chunked"),
        ]:
            with self.assertRaises(MalformedResponse) as caught:
                self.frame(b"GET", text)
            self.assertIn(why, str(caught.exception))


SIZES = [5, 300, 1, 70000, 16]


def chunked_body(variant: str) -> tuple[bytes, bytes]:
    """A chunked body (with a trailer and bytes after it) and its payload."""
    out, payload = [], []
    for i, size in enumerate(SIZES):
        data = bytes([65 + i]) * size
        payload.append(data)
        if variant == "extensions" and i % 2:
            line = b"%x;name=value\r\n" % size
        elif variant == "lf" and i % 2:
            line = b"%X\n" % size
        else:
            line = b"%x\r\n" % size
        end = b"\n" if variant == "lf" and i % 3 == 0 else b"\r\n"
        out.append(line + data + end)
    return b"".join(out) + b"0\r\nX-Trailer: t\r\n\r\nNEXT", b"".join(payload)


def feed_in_pieces(reader: ChunkedReader, data: bytes, rng: random.Random) -> tuple[bytes, bytes]:
    """Feed C{data} cut at random places: what was handed on, and the bytes after the body."""
    cuts = sorted(rng.sample(range(1, len(data)), rng.randint(0, 40)))
    out, after = [], b""
    for piece in (data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)):
        if reader.done:
            after += piece
            continue
        pieces, used = reader.feed(piece)
        out += pieces
        if reader.done:
            after += piece[used:]
    return b"".join(out), after


class ChunkedTests(SynchronousTestCase):
    def test_decoded_whatever_the_cuts(self) -> None:
        rng = random.Random(1)
        for variant in ("plain", "extensions", "lf"):
            body, payload = chunked_body(variant)
            for _ in range(200):
                reader = ChunkedReader(framed=False)
                out, after = feed_in_pieces(reader, body, rng)
                self.assertEqual((out, after, reader.done, reader.payload), (payload, b"NEXT", True, len(payload)))

    def test_framed_whatever_the_cuts(self) -> None:
        """Framed output is canonical chunks: a client decodes the same payload from it."""
        rng = random.Random(2)
        for variant in ("plain", "extensions", "lf"):
            body, payload = chunked_body(variant)
            for _ in range(200):
                reader = ChunkedReader(framed=True)
                out, after = feed_in_pieces(reader, body, rng)
                self.assertEqual((after, reader.done, reader.payload), (b"NEXT", True, len(payload)))
                # No extension, bare LF, last chunk or trailer is handed on.
                self.assertNotIn(b";", out)
                self.assertNotIn(b"X-Trailer", out)
                self.assertEqual(out.count(b"\n"), out.count(b"\r\n"))
                check = ChunkedReader(framed=False)
                decoded, rest = check.feed(out + b"0\r\n\r\n")
                self.assertEqual((b"".join(decoded), check.done), (payload, True))

    def test_framed_in_one_read_is_one_slice(self) -> None:
        body = b"5\r\nhello\r\n3\r\nabc\r\n0\r\n\r\n"
        reader = ChunkedReader(framed=True)
        self.assertEqual(reader.feed(body), ([b"5\r\nhello\r\n3\r\nabc\r\n"], len(body)))
        self.assertTrue(reader.done)

    def test_refused(self) -> None:
        for body, why in [
            (b"zz\r\n", "bad chunk size"),
            (b"-5\r\n", "bad chunk size"),
            (b"1" * 17 + b"\r\n", "bad chunk size"),
            (b"3\r\nabcX\r\n", "not followed by CRLF"),
            (b"1" * (MAX_SIZE_LINE + 1), "too long"),
        ]:
            with self.assertRaises(MalformedResponse) as caught:
                ChunkedReader(framed=False).feed(body)
            self.assertIn(why, str(caught.exception))
