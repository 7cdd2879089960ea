# -*- test-case-name: tests.test_manifests -*-
"""
Standalone mode's source of objects: YAML manifest files and folders on
disk, and the static token file; both reloaded when they change.

A change is noticed by comparing file contents once a second (mtimes are
unreliable under Kubernetes' C{..data} symlink swaps and same-second
writes), so a rotated Secret is used by the next request within 2 seconds.
An invalid edit keeps the last good state and says why in the log.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable, Sequence

import yaml
from attrs import define, field
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from connectors_proxy.auth.identity import InvalidTokenFile, StaticTokens, parse_token_file
from connectors_proxy.model.objects import InvalidObject, KubeObject, ObjectRef, parse_object
from connectors_proxy.model.state import Snapshot, Store

log = Logger()

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
POLL_SECONDS = 1.0

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


def parse_documents(text: str, source: str) -> list[KubeObject]:
    """Parse one file's YAML documents (a C{List} kind's C{items} too)."""
    try:
        documents = list(yaml.load_all(text, Loader=_LOADER))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ManifestError(f"{source}:{where}: invalid YAML: {problem}") from None
    objects: list[KubeObject] = []
    for doc in documents:
        if doc is None:
            continue
        items = doc.get("items") if isinstance(doc, dict) and doc.get("kind") == "List" else [doc]
        for item in items or []:
            try:
                obj = parse_object(item)
            except InvalidObject as e:
                raise ManifestError(f"{source}: {e}") from None
            if obj is not None:
                objects.append(obj)
    return objects


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


def _digest_only(paths: Sequence[str]) -> bytes:
    """The digest L{load} would return, without parsing anything."""
    digest = hashlib.sha256()
    for path in manifest_files(paths):
        digest.update(path.encode() + b"\0" + hashlib.sha256(_read(path)).digest())
    return digest.digest()


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ManifestError(f"{path}: cannot read ({e.strerror})") from None


def load_tokens(path: str) -> tuple[StaticTokens, bytes]:
    data = _read(path)
    try:
        table = parse_token_file(data.decode("utf-8"), path)
    except UnicodeDecodeError:
        raise ManifestError(f"{path}: not UTF-8 text") from None
    except InvalidTokenFile as e:
        raise ManifestError(str(e)) from None
    return StaticTokens(table), hashlib.sha256(data).digest()


def warnings(snapshot: Snapshot) -> Iterable[str]:
    """Problems that do not stop loading but that a user wants to hear of."""
    for connector in snapshot.connectors.values():
        if connector.class_name not in snapshot.classes:
            yield f"Connector {connector.ref}: ConnectorClass {connector.class_name!r} is not defined"
        if connector.secret_ref is not None and connector.secret_ref not in snapshot.secrets:
            yield f"Connector {connector.ref}: Secret {connector.secret_ref} is not defined"


@define
class ManifestSource(Service):
    """
    Keeps C{store} and C{tokens} in step with the files on disk.  The first
    load happens in the constructor's caller (so that errors stop the daemon
    before it starts); this service only polls for changes.
    """

    reactor: IReactorTime
    paths: Sequence[str]
    store: Store
    tokens: StaticTokens | None = None
    tokens_path: str | None = None
    interval: float = POLL_SECONDS
    reloads: int = 0
    last_success: float = 0.0
    _digest: bytes = b""
    _tokens_digest: bytes = b""
    _last_error: str | None = None
    _loop: LoopingCall | None = field(default=None)
    on_reload: list[Callable[[bool], None]] = field(factory=list)

    def load_now(self) -> None:
        """Load everything once; raises L{ManifestError}."""
        snapshot, self._digest = load(self.paths)
        if self.tokens_path is not None:
            tokens, self._tokens_digest = load_tokens(self.tokens_path)
            if self.tokens is None:
                self.tokens = tokens
            else:
                self.tokens.table = tokens.table
        for warning in warnings(snapshot):
            log.warn("{warning}", warning=warning)
        self.store.replace(snapshot)
        self.last_success = time.time()

    def poll(self) -> None:
        try:
            if _digest_only(self.paths) == self._digest:
                digest = self._digest
            else:
                snapshot, digest = load(self.paths)
            if digest != self._digest:
                self._digest = digest
                for warning in warnings(snapshot):
                    log.warn("{warning}", warning=warning)
                self.store.replace(snapshot)
                self.reloads += 1
                log.info("manifests reloaded: {classes} classes, {connectors} connectors, {secrets} secrets",
                         classes=len(snapshot.classes), connectors=len(snapshot.connectors),
                         secrets=len(snapshot.secrets))
                self._notify(True)
            if self.tokens_path is not None and self.tokens is not None:
                tokens, digest = load_tokens(self.tokens_path)
                if digest != self._tokens_digest:
                    self._tokens_digest = digest
                    self.tokens.table = tokens.table
                    log.info("token file reloaded: {count} tokens", count=len(tokens.table))
            self.last_success = time.time()
        except ManifestError as e:
            # Only say it once per distinct broken state.
            if str(e) != self._last_error:
                self._last_error = str(e)
                log.error("reload failed, keeping the last good state: {error}", error=str(e))
                self._notify(False)
            return
        self._last_error = None

    def _notify(self, ok: bool) -> None:
        for callback in self.on_reload:
            callback(ok)

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.poll)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=False)

    def stopService(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return super().stopService()  # type: ignore[no-any-return]
