# -*- test-case-name: tests.test_operator -*-
"""
Mistakes in manifests that would otherwise pass without a word: a
document whose C{kind} is misspelled (C{Conector}) is not an object the
proxy reads, so it was skipped, and clients got 404; a misspelled field
(C{adress}, C{secretref}) was ignored, or reported as a missing one with
no hint of the typo.

L{lint_documents} finds them, as plain values naming the file, the line
and the document number, in the documents the loader decoded (each file
is read and decoded once at startup, for both).  Standalone mode reports
them at startup: warnings by default, a refusal to start with C{--strict}.

Only what looks like a mistake is reported.  Kinds of other APIs (a
Namespace, a Deployment in the same file) are what a manifest folder holds
and are left alone; a field the proxy does not know is reported only when
it is close to one it does (C{difflib}) or differs from one only in case:
the upstream CRDs have many fields the proxy has no use for.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from attrs import frozen

from connectors_proxy.model.objects import API_VERSION, GROUP
from connectors_proxy.sources.manifests import Document, ManifestError, decode_documents, list_items

KINDS = ("ConnectorClass", "Connector", "Secret")

_METADATA = frozenset({
    "name", "namespace", "labels", "annotations", "uid", "generation", "resourceVersion",
    "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "ownerReferences",
    "finalizers", "generateName", "managedFields", "selfLink",
})
_TOP = frozenset({"apiVersion", "kind", "metadata", "spec", "status"})
_REF = frozenset({"name", "namespace", "apiVersion", "fieldPath", "kind", "resourceVersion", "uid"})
_NAME_VALUE = frozenset({"name", "value"})
_PARAM_SPEC = frozenset({"name", "type", "default", "description", "enum", "annotations", "properties"})
_SERVICE_REF = frozenset({"address", "apiVersion", "group", "kind", "name", "namespace"})

# The fields each kind may have, by dotted path ("[]": each item of a list),
# after the upstream CRDs (k8s/crd-*.yaml) and core v1 Secret.
SCHEMAS: dict[str, dict[str, frozenset[str]]] = {
    "Connector": {
        "": _TOP,
        "metadata": _METADATA,
        "spec": frozenset({"connectorClassName", "address", "addressExtensions", "auth", "caCertSecretRef",
                           "clientCertSecretRef", "params"}),
        "spec.addressExtensions[]": _NAME_VALUE,
        "spec.params[]": _NAME_VALUE,
        "spec.auth": frozenset({"name", "secretRef", "params"}),
        "spec.auth.params[]": _NAME_VALUE,
        "spec.auth.secretRef": _REF,
        "spec.caCertSecretRef": frozenset({"name", "namespace"}),
        "spec.clientCertSecretRef": frozenset({"name", "namespace"}),
    },
    "ConnectorClass": {
        "": _TOP,
        "metadata": _METADATA,
        "spec": frozenset({"address", "addressExtensions", "api", "auth", "authProbes", "configurations",
                           "livenessProbe", "params", "proxy"}),
        "spec.auth": frozenset({"types"}),
        "spec.auth.types[]": frozenset({"name", "secretType", "optional", "generator", "params", "description",
                                        "displayName", "annotations"}),
        "spec.auth.types[].generator": frozenset({"rego"}),
        "spec.auth.types[].params[]": _PARAM_SPEC,
        "spec.params[]": _PARAM_SPEC,
        "spec.addressExtensions[]": _PARAM_SPEC,
        "spec.proxy": frozenset({"ref", "uri", "authExtractor", "CACerts", "audience"}),
        "spec.proxy.ref": _SERVICE_REF,
        "spec.proxy.authExtractor": frozenset({"rego"}),
        "spec.api": frozenset({"CACerts", "audience", "openapi", "permissions", "ref", "uri"}),
        "spec.configurations[]": frozenset({"annotations", "data", "name", "params"}),
    },
    "Secret": {
        "": frozenset({"apiVersion", "kind", "metadata", "data", "stringData", "type", "immutable"}),
        "metadata": _METADATA,
    },
}

API_VERSIONS = {"ConnectorClass": API_VERSION, "Connector": API_VERSION, "Secret": "v1"}


@frozen
class Problem:
    """
    One mistake.

    @ivar source: the file.
    @ivar line: the line its document starts at (1-based).
    @ivar document: the document's number in the file (1-based), with the
        item's index for a C{kind: List}.
    @ivar message: what is wrong, and the likely fix.
    @ivar mistake: whether it is a likely mistake (a misspelling: refused
        with C{--strict}) rather than a note (a kind of the Connectors API
        the proxy has no use for).
    """

    source: str
    line: int
    document: str
    message: str
    # A likely mistake (refused with --strict), rather than a note.
    mistake: bool = True

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: document {self.document}: {self.message}"


def _close(word: str, known: Any, cutoff: float = 0.75) -> str | None:
    """The known word C{word} is likely a misspelling of, if any."""
    for candidate in known:
        if candidate.lower() == word.lower():
            return str(candidate)
    found = difflib.get_close_matches(word, list(known), n=1, cutoff=cutoff)
    return found[0] if found else None


def _name(doc: Mapping[str, Any]) -> str:
    meta = doc.get("metadata")
    name = meta.get("name") if isinstance(meta, Mapping) else None
    return f" (name {name!r})" if isinstance(name, str) else ""


def lint_document(doc: Any) -> list[tuple[str, bool]]:
    """
    The problems of one decoded document, as C{(message, mistake)} (none
    for kinds of other APIs).
    """
    if not isinstance(doc, Mapping):
        return []
    kind = doc.get("kind")
    version = doc.get("apiVersion")
    if not isinstance(kind, str):
        return []
    if kind not in SCHEMAS:
        guess = _close(kind, KINDS, cutoff=0.75)
        if guess is not None:
            return [(f"kind {kind!r}{_name(doc)} is not one the proxy reads, so it is ignored: "
                     f"did you mean {guess!r}?", True)]
        if isinstance(version, str) and version.split("/")[0] == GROUP:
            return [(f"kind {kind!r}{_name(doc)} of {GROUP} is not one the proxy reads "
                     f"(it reads {', '.join(KINDS)}), so it is ignored", False)]
        return []
    problems = []
    if kind == "Secret" and version != API_VERSIONS[kind]:
        # The parser skips it as another API's object: say so.
        problems.append((f"Secret{_name(doc)}: apiVersion {version!r} is not 'v1', so it is ignored", True))
    for path, key, known in _unknown_fields(doc, SCHEMAS[kind]):
        guess = _close(key, known)
        if guess is not None:
            where = f"{path}.{key}" if path else key
            problems.append((f"{kind}{_name(doc)}: unknown field {where!r}: did you mean {guess!r}?", True))
    return problems


def _unknown_fields(doc: Mapping[str, Any], schema: Mapping[str, frozenset[str]]
                    ) -> Iterator[tuple[str, str, frozenset[str]]]:
    """C{(path, key, known keys)} for each key of C{doc} its schema does not name."""
    stack: list[tuple[str, str, Any]] = [("", "", doc)]
    while stack:
        shape, shown, node = stack.pop()
        if isinstance(node, list):
            for i, item in enumerate(node):
                stack.append((shape + "[]", f"{shown}[{i}]", item))
            continue
        known = schema.get(shape)
        if known is None or not isinstance(node, Mapping):
            continue
        for key, value in node.items():
            if not isinstance(key, str):
                continue
            if key in known:
                child = f"{shape}.{key}" if shape else key
                stack.append((child, f"{shown}.{key}" if shown else key, value))
            else:
                yield shown, key, known


def lint_documents(documents: Iterable[Document]) -> list[Problem]:
    """
    The mistakes in decoded documents: those the loader decoded at startup
    (L{Parser.keeping<connectors_proxy.sources.manifests.Parser.keeping>}),
    so the files are not read and decoded a second time to be linted.
    """
    problems: list[Problem] = []
    for document in documents:
        items = list_items(document.content)
        if items is not None:
            for i, item in enumerate(items):
                problems.extend(Problem(document.source, document.line, f"{document.number} (items[{i}])",
                                        message, mistake)
                                for message, mistake in lint_document(item))
        else:
            problems.extend(Problem(document.source, document.line, str(document.number), message, mistake)
                            for message, mistake in lint_document(document.content))
    return problems


def lint_text(text: str, source: str) -> list[Problem]:
    """
    The mistakes in one file's YAML documents.  Where the file stops
    parsing, so does the lint: loading it reports that, with the line.
    """
    documents: list[Document] = []
    try:
        for number, (line, content) in enumerate(decode_documents(text, source), 1):
            documents.append(Document(source, line, number, content))
    except ManifestError:
        pass
    return lint_documents(documents)
