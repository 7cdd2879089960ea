# -*- test-case-name: tests.test_manifests -*-
"""
Standalone mode's source of objects: YAML manifest files and folders on
disk, and the static token file; both reloaded when they change.

A change is noticed by comparing file contents once a second (mtimes are
unreliable under Kubernetes' C{..data} symlink swaps and same-second
writes), so a rotated Secret is used by the next request within 2 seconds.
An invalid edit keeps the last good state and says why in the log.

Reloads never stall the requests being served:

  - reading, hashing and parsing run in a thread of the source's own
    one-thread pool, and the new L{Snapshot} is swapped in whole on the
    reactor thread (requests see the old state or the new, never a mix);
  - parsing is incremental: each file is cut into its YAML documents and
    only documents whose text changed are parsed again, so editing one
    Secret among 10,000 objects costs one document's parse, not the set's
    (the GIL is shared with the reactor, so less work in the thread is
    also less latency for requests);
  - a change is applied once it has settled: files that differ from the
    loaded ones must read the same again C{SETTLE_SECONDS} later, so a file
    being written in several steps (editors and tools that do not write a
    temporary file and rename it) is loaded whole instead of briefly
    dropping the objects of its unwritten part.  C{SIGHUP} loads at once.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import yaml
from attrs import define, field, frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from connectors_proxy.auth.identity import InvalidTokenFile, StaticTokens, parse_token_file
from connectors_proxy.model.objects import InvalidObject, KubeObject, ObjectRef, parse_object
from connectors_proxy.model.state import Snapshot, Store

log = Logger()

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
POLL_SECONDS = 1.0
# How long changed files must stay the same before they are loaded.
SETTLE_SECONDS = 0.5

T = TypeVar("T")

# libyaml's safe loader when PyYAML was built with it: ten times faster on
# large manifest sets, same documents.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class ManifestError(ValueError):
    """A manifest set that cannot be loaded; the message is one line naming file, object, field."""


def manifest_files(paths: Sequence[str]) -> list[str]:
    """
    The files to read for C{--manifests} arguments: files as given, and the
    C{.yaml}/C{.yml}/C{.json} files of folders (recursively, sorted, hidden
    entries such as Kubernetes' C{..data} skipped).
    """
    files: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, names in os.walk(path, followlinks=True):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                files.extend(os.path.join(root, n) for n in sorted(names)
                             if n.endswith(MANIFEST_SUFFIXES) and not n.startswith("."))
        elif os.path.exists(path):
            files.append(path)
        else:
            raise ManifestError(f"{path}: no such file or folder")
    return files


@frozen
class Document:
    """
    One YAML document of a manifest file, as decoded.

    @ivar line: the line of the file its content starts at (1-based).
    @ivar number: its place among the file's documents (1-based).
    """

    source: str
    line: int
    number: int
    content: Any = field(repr=False, eq=False)


def decode_documents(text: str, source: str, first_line: int = 1) -> Iterator[tuple[int, Any]]:
    """
    The YAML documents of C{text}, decoded one by one, each with the line
    of the file its content starts at; L{ManifestError} where the YAML is
    invalid (after the documents before it).  The one YAML reader of
    manifests: the loader, its lint and C{clientconfig} all read with it.

    @param first_line: the line of the file C{text} starts at (when
        C{text} is one document cut from a longer file).
    """
    loader = _LOADER(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:  # the stream's end, which check_node() said it was not
                break
            yield node.start_mark.line + first_line, loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + first_line}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ManifestError(f"{source}:{where}: invalid YAML: {problem}") from None
    finally:
        loader.dispose()


def list_items(content: Any) -> list[Any] | None:
    """
    The items of a C{kind: List} document (what C{kubectl get -o yaml}
    writes: C{apiVersion: v1}, C{kind: List}, C{items: [...]}), each an
    object of its own; C{None} for any other document.
    """
    if isinstance(content, Mapping) and content.get("kind") == "List":
        items = content.get("items")
        if isinstance(items, list):
            return items
    return None


def objects_in(content: Any) -> list[Any]:
    """The objects a decoded document holds: a C{List}'s items, none for an empty document, else itself."""
    items = list_items(content)
    if items is not None:
        return items
    return [] if content is None else [content]


def _parse_objects(contents: Iterable[Any], source: str) -> list[KubeObject]:
    objects: list[KubeObject] = []
    for content in contents:
        for item in objects_in(content):
            try:
                obj = parse_object(item)
            except InvalidObject as e:
                raise ManifestError(f"{source}: {e}") from None
            if obj is not None:
                objects.append(obj)
    return objects


def parse_documents(text: str, source: str, first_line: int = 1) -> list[KubeObject]:
    """
    Parse one file's YAML documents (a C{List} kind's C{items} too).

    @param first_line: the line of the file C{text} starts at, for errors
        (when C{text} is one document cut from a longer file).
    """
    # Every document decoded before any is parsed: invalid YAML is what a
    # file with both problems is refused for.
    contents = [content for _, content in decode_documents(text, source, first_line)]
    return _parse_objects(contents, source)


def _key(obj: KubeObject) -> tuple[str, str | ObjectRef]:
    return (type(obj).__name__, getattr(obj, "ref", None) or obj.name)  # type: ignore[union-attr]


def load(paths: Sequence[str], read: Callable[[str], bytes] | None = None) -> tuple[Snapshot, bytes]:
    """
    Load every object under C{paths}.  Returns the snapshot and a digest of
    everything read (to notice changes).  Raises L{ManifestError}.
    """
    reader = read or _read
    digest = hashlib.sha256()
    seen: dict[tuple[str, str | ObjectRef], str] = {}
    objects: list[KubeObject] = []
    for path in manifest_files(paths):
        data = reader(path)
        digest.update(path.encode() + b"\0" + hashlib.sha256(data).digest())
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ManifestError(f"{path}: not UTF-8 text") from None
        for obj in parse_documents(text, path):
            key = _key(obj)
            if key in seen:
                raise ManifestError(f"{path}: {key[0]} {key[1]} is also defined in {seen[key]}")
            seen[key] = path
            objects.append(obj)
    return Snapshot.of(objects), digest.digest()


# A line that starts a YAML document: "---" at column 0, alone or followed
# by a space (a "---" inside a scalar is indented, or an error anyway).
_DOCUMENT_START = re.compile(r"^---(?=[ \t\r\n]|$)", re.M)


def split_documents(text: str) -> list[tuple[int, str]]:
    """
    C{text} cut before each document start marker: C{(first line, text)}
    pieces that parse, one by one, to what C{text} parses to.  A file with
    YAML directives (C{%YAML}, C{%TAG}, which apply to the document after
    them) is kept whole.
    """
    if text.startswith("%") or "\n%" in text:
        return [(1, text)]
    starts = [m.start() for m in _DOCUMENT_START.finditer(text)]
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    pieces = []
    line = 1
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(text)
        piece = text[start:end]
        pieces.append((line, piece))
        line += piece.count("\n")
    return pieces


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


@frozen
class Scan:
    """
    What the files held at one moment: their paths and contents (and
    digests, computed where the files were read: off the reactor thread),
    or why they could not be read.  C{fingerprint} is what is compared.
    """

    manifests: tuple[tuple[str, bytes], ...] = field(default=(), repr=False)
    tokens: bytes | None = field(default=None, repr=False)
    error: str | None = None
    manifests_digests: tuple[tuple[str, bytes], ...] = ()
    tokens_digest: bytes | None = None

    @classmethod
    def of(cls, manifests: tuple[tuple[str, bytes], ...], tokens: bytes | None) -> Scan:
        return cls(manifests, tokens, None, tuple((path, _digest(data)) for path, data in manifests),
                   None if tokens is None else _digest(tokens))

    @property
    def fingerprint(self) -> tuple[object, ...]:
        return (self.manifests_digests, self.tokens_digest, self.error)


def scan(paths: Sequence[str], tokens_path: str | None = None) -> Scan:
    """Read every manifest file under C{paths}, and the token file."""
    try:
        manifests = tuple((path, _read(path)) for path in manifest_files(paths))
        tokens = _read(tokens_path) if tokens_path is not None else None
    except ManifestError as e:
        return Scan(error=str(e))
    return Scan.of(manifests, tokens)


@frozen
class _Piece:
    """
    What the text of one document (L{split_documents}) parsed to.

    @ivar contents: its decoded documents, as C{(lines after the piece's
        first, content)}: only while a L{Parser} keeps them (L{Parser.keeping}).
    """

    objects: list[KubeObject]
    contents: tuple[tuple[int, Any], ...] | None = field(default=None, repr=False)


@define
class Parser:
    """
    Parses L{Scan}s into L{Snapshot}s, re-parsing only the YAML documents
    whose text changed since the last successful parse.  Not thread-safe:
    one parse at a time (L{ManifestSource} runs them in one thread).
    """

    _documents: dict[str, _Piece] = field(factory=dict)
    parsed: int = 0
    reused: int = 0
    _kept: list[Document] | None = None

    @contextmanager
    def keeping(self) -> Iterator[list[Document]]:
        """
        Keep the documents a parse made in the block reads in the list
        given (those of the last one, as far as it got when it failed), for
        the startup's lint (L{connectors_proxy.sources.lint.lint_documents}):
        each document is decoded once, for both.
        """
        kept: list[Document] = []
        self._kept = kept
        try:
            yield kept
        finally:
            self._kept = None
            # The decoded contents are not kept past the block: memory follows the objects.
            self._documents = {text: _Piece(piece.objects) for text, piece in self._documents.items()}

    def parse(self, manifests: Sequence[tuple[str, bytes]],
              yield_gil: bool = False) -> tuple[Snapshot, list[str]]:
        """
        The snapshot and its warnings; raises L{ManifestError}.

        @param yield_gil: give other threads the GIL after each document
            parsed (in a background thread, so the reactor is not kept waiting).
        """
        kept = self._kept
        if kept is not None:
            kept.clear()
        documents: dict[str, _Piece] = {}
        seen: dict[tuple[str, str | ObjectRef], str] = {}
        objects: list[KubeObject] = []
        for path, data in manifests:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                raise ManifestError(f"{path}: not UTF-8 text") from None
            number = 0  # documents of this file so far
            for first_line, piece in split_documents(text):
                found = documents.get(piece)
                if found is None:
                    found = self._documents.get(piece)
                    if found is None or (kept is not None and found.contents is None):
                        found = self._parse_piece(piece, path, first_line, number)
                        self.parsed += 1
                        if yield_gil:
                            # Let the reactor thread have the GIL now rather
                            # than at the next forced switch (5 ms away):
                            # requests wait for it at every system call.
                            time.sleep(0)
                    else:
                        self.reused += 1
                        self._keep(found.contents, path, first_line, number)
                    documents[piece] = found
                else:
                    self._keep(found.contents, path, first_line, number)
                number += len(found.contents or ())
                for obj in found.objects:
                    key = _key(obj)
                    if key in seen:
                        raise ManifestError(f"{path}: {key[0]} {key[1]} is also defined in {seen[key]}")
                    seen[key] = path
                    objects.append(obj)
        # Only what the current files hold is kept (memory follows the files).
        self._documents = documents
        snapshot = Snapshot.of(objects)
        return snapshot, list(warnings(snapshot))

    def _parse_piece(self, piece: str, path: str, first_line: int, number: int) -> _Piece:
        """Decode and parse one document's text (C{number} documents of the file before it)."""
        if self._kept is None:
            return _Piece(parse_documents(piece, path, first_line))
        contents = tuple((line - first_line, content) for line, content in decode_documents(piece, path, first_line))
        # Kept before the objects are parsed: a misspelling the lint finds
        # is often why an object is invalid.
        self._keep(contents, path, first_line, number)
        return _Piece(_parse_objects((content for _, content in contents), path), contents)

    def _keep(self, contents: tuple[tuple[int, Any], ...] | None, path: str, first_line: int, number: int) -> None:
        """Keep the documents of a piece (C{number} documents of the file before it), when keeping."""
        if self._kept is not None and contents is not None:
            self._kept.extend(Document(path, first_line + offset, number + i, content)
                              for i, (offset, content) in enumerate(contents, 1))


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ManifestError(f"{path}: cannot read ({e.strerror})") from None


def warnings(snapshot: Snapshot) -> Iterable[str]:
    """Problems that do not stop loading but that a user wants to hear of."""
    for connector in snapshot.connectors.values():
        if connector.class_name not in snapshot.classes:
            yield f"Connector {connector.ref}: ConnectorClass {connector.class_name!r} is not defined"
        if connector.secret_ref is not None and connector.secret_ref not in snapshot.secrets:
            yield f"Connector {connector.ref}: Secret {connector.secret_ref} is not defined"


def parse_tokens(data: bytes, path: str) -> StaticTokens:
    try:
        table = parse_token_file(data.decode("utf-8"), path)
    except UnicodeDecodeError:
        raise ManifestError(f"{path}: not UTF-8 text") from None
    except InvalidTokenFile as e:
        raise ManifestError(str(e)) from None
    return StaticTokens(table)


@define
class _Loaded:
    """What a scan parsed to (each part C{None} when unchanged or absent)."""

    snapshot: Snapshot | None = None
    warnings: list[str] = field(factory=list)
    tokens: StaticTokens | None = None
    manifests_error: str | None = None
    tokens_error: str | None = None


@define
class ManifestSource(Service):
    """
    Keeps C{store} and C{tokens} in step with the files on disk.  The first
    load happens in the constructor's caller (so that errors stop the daemon
    before it starts); this service only polls for changes.

    With a reactor that runs threads, files are read and parsed in a
    dedicated one-thread pool started with the service; otherwise (a
    L{twisted.internet.task.Clock} in tests) on the calling thread.

    @ivar on_reload: called with C{True}/C{False} after each manifest reload
        (or failed one); C{on_tokens_reload} the same for the token file.
    """

    reactor: IReactorTime
    paths: Sequence[str]
    store: Store
    tokens: StaticTokens | None = None
    tokens_path: str | None = None
    interval: float = POLL_SECONDS
    settle: float = SETTLE_SECONDS
    reloads: int = 0
    tokens_reloads: int = 0
    last_success: float = 0.0
    on_reload: list[Callable[[bool], None]] = field(factory=list)
    on_tokens_reload: list[Callable[[bool], None]] = field(factory=list)
    parser: Parser = field(factory=Parser)
    _loaded: Scan = field(factory=Scan)
    _pending: tuple[object, ...] | None = None
    _failed: tuple[object, ...] | None = None
    _manifests_error: str | None = None
    _tokens_error: str | None = None
    _loop: LoopingCall | None = None
    _recheck: IDelayedCall | None = None
    _pool: ThreadPool | None = None
    _lock: DeferredLock = field(factory=DeferredLock)

    def load_now(self) -> None:
        """Load everything once, on this thread; raises L{ManifestError}."""
        found = scan(self.paths, self.tokens_path)
        if found.error is not None:
            raise ManifestError(found.error)
        snapshot, warnings_ = self.parser.parse(found.manifests)
        if found.tokens is not None and self.tokens_path is not None:
            tokens = parse_tokens(found.tokens, self.tokens_path)
            if self.tokens is None:
                self.tokens = tokens
            else:
                self.tokens.table = tokens.table
        for warning in warnings_:
            log.warn("{warning}", warning=warning)
        self.store.replace(snapshot)
        self._loaded = found
        self.last_success = time.time()

    def poll(self) -> Deferred[None]:
        """Load what changed now, without waiting for it to settle (C{SIGHUP})."""
        return self._lock.run(self._check, False)

    def _tick(self) -> None:
        # A check still running (a large parse) is not queued behind: the
        # next tick looks again.
        if not self._lock.locked:
            self._lock.run(self._check, True).addErrback(
                lambda f: log.failure("checking the manifests failed", f))

    def _in_thread(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        if self._pool is None:
            return maybeDeferred(f, *args)
        return deferToThreadPool(self.reactor, self._pool, f, *args)  # type: ignore[arg-type]

    async def _check(self, settle: bool) -> None:
        found = await self._in_thread(scan, self.paths, self.tokens_path)
        fingerprint = found.fingerprint
        if fingerprint == self._loaded.fingerprint:
            self._pending = None
            self.last_success = time.time()
            if self._failed is not None:
                self._undone()
            return
        if fingerprint == self._failed:
            return  # this broken state was reported already
        if settle and fingerprint != self._pending:
            # Changed since the last look: look again shortly, and load only
            # what read the same twice.
            self._pending = fingerprint
            if self._recheck is None or not self._recheck.active():
                self._recheck = self.reactor.callLater(self.settle, self._tick)
            return
        self._pending = None
        loaded = await self._in_thread(self._parse, found)
        self._apply(found, loaded)

    def _parse(self, found: Scan) -> _Loaded:
        """In the thread: parse what differs from the loaded files."""
        loaded = _Loaded()
        if found.error is not None:
            loaded.manifests_error = found.error
            return loaded
        if found.manifests_digests != self._loaded.manifests_digests:
            try:
                loaded.snapshot, loaded.warnings = self.parser.parse(found.manifests,
                                                                     yield_gil=self._pool is not None)
            except ManifestError as e:
                loaded.manifests_error = str(e)
        if (found.tokens_digest != self._loaded.tokens_digest and found.tokens is not None
                and self.tokens_path is not None):
            try:
                loaded.tokens = parse_tokens(found.tokens, self.tokens_path)
            except ManifestError as e:
                loaded.tokens_error = str(e)
        return loaded

    def _apply(self, found: Scan, loaded: _Loaded) -> None:
        """On the reactor thread: swap in what parsed, report what did not."""
        if loaded.snapshot is not None:
            for warning in loaded.warnings:
                log.warn("{warning}", warning=warning)
            snapshot = loaded.snapshot
            self.store.replace(snapshot)
            self.reloads += 1
            self._manifests_error = None
            log.info("manifests reloaded: {classes} classes, {connectors} connectors, {secrets} secrets",
                     classes=len(snapshot.classes), connectors=len(snapshot.connectors),
                     secrets=len(snapshot.secrets))
            self._notify(self.on_reload, True)
        if loaded.tokens is not None and self.tokens is not None:
            self.tokens.table = loaded.tokens.table
            self.tokens_reloads += 1
            self._tokens_error = None
            log.info("token file reloaded: {count} tokens", count=len(loaded.tokens.table))
            self._notify(self.on_tokens_reload, True)
        manifests_ok = loaded.manifests_error is None
        tokens_ok = loaded.tokens_error is None
        if not manifests_ok and loaded.manifests_error != self._manifests_error:
            self._manifests_error = loaded.manifests_error
            log.error("reload failed, keeping the last good state: {error}", error=loaded.manifests_error)
            self._notify(self.on_reload, False)
        if not tokens_ok and loaded.tokens_error != self._tokens_error:
            self._tokens_error = loaded.tokens_error
            log.error("reload failed, keeping the last good state: {error}", error=loaded.tokens_error)
            self._notify(self.on_tokens_reload, False)
        # Keep what loaded: a part that failed is compared as it last loaded,
        # so it is parsed again once it changes (and only then).
        new_manifests = manifests_ok and found.error is None
        new_tokens = tokens_ok and found.error is None
        old = self._loaded
        self._loaded = Scan(
            found.manifests if new_manifests else old.manifests, found.tokens if new_tokens else old.tokens,
            None, found.manifests_digests if new_manifests else old.manifests_digests,
            found.tokens_digest if new_tokens else old.tokens_digest)
        if manifests_ok and tokens_ok:
            self._failed = None
            self.last_success = time.time()
        else:
            self._failed = found.fingerprint

    def _undone(self) -> None:
        """
        The files read as they were last loaded again (a broken edit was
        undone): the error reported for them is over, as after a reload
        that worked (so the log can say it recovered).
        """
        self._failed = None
        if self._manifests_error is not None:
            self._manifests_error = None
            self._notify(self.on_reload, True)
        if self._tokens_error is not None:
            self._tokens_error = None
            self._notify(self.on_tokens_reload, True)

    @staticmethod
    def _notify(callbacks: list[Callable[[bool], None]], ok: bool) -> None:
        for callback in callbacks:
            callback(ok)

    def startService(self) -> None:
        super().startService()
        if IReactorFromThreads.providedBy(self.reactor):
            # Its own pool (not the reactor's): a parse never waits behind
            # other threaded work, and there is never more than one.
            self._pool = ThreadPool(minthreads=0, maxthreads=1, name="manifests")
            self._pool.start()
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=False)

    def stopService(self) -> Deferred[None] | None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._recheck is not None and self._recheck.active():
            self._recheck.cancel()
        pool, self._pool = self._pool, None
        if pool is not None:
            # Joins the thread: at most one parse still running.
            pool.stop()
        return super().stopService()  # type: ignore[no-any-return]
