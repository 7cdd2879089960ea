"""
tests/support's real-component fixtures (the token-auth docker-registry and
its token server, git-http-backend behind nginx, OCI images built with
umoci) used from a benchmark script instead of a trial test.

Those helpers take a C{TestCase} only for C{mktemp} and C{addCleanup}, and
expect the Twisted reactor to be running (the token server answers in it;
client commands run in its thread pool).  L{Harness} stands in for the test
case and runs the reactor in a thread of the bench process; L{Harness.call}
runs a helper in the reactor thread and waits for its result.  The token
server therefore runs in the bench process, not in the proxy's.

Cached data (generated once, reused by later runs): L{cached_image} keeps an
umoci-built image layout under C{CACHE}.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, cast

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    # For "tests.support"; after bench/ (sys.path[0] when a bench script runs).
    sys.path.insert(1, ROOT)

from twisted.internet import reactor as _reactor  # noqa: E402
from twisted.internet.defer import Deferred, maybeDeferred  # noqa: E402
from twisted.internet.threads import blockingCallFromThread  # noqa: E402

CACHE = os.path.join("/tmp", "connectors-proxy-bench", "cache")
reactor: Any = cast(Any, _reactor)


class Harness:
    """
    What tests/support's fixtures need of a C{TestCase}, with the reactor
    running in a daemon thread until L{close}.

    @ivar folder: where C{mktemp} paths go (each one new, not created, as
        trial's).
    """

    def __init__(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        self.folder = folder
        self._count = itertools.count(1)
        self._cleanups: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = []
        self._thread = threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False},  # type: ignore[attr-defined]
                                        name="reactor", daemon=True)
        self._thread.start()

    # -- the TestCase part --------------------------------------------------

    def mktemp(self) -> str:
        return os.path.join(self.folder, f"tmp-{next(self._count)}")

    def addCleanup(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> None:  # noqa: N802
        self._cleanups.append((function, args, kwargs))

    # -- running helpers ------------------------------------------------------

    def call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """
        Run C{function} in the reactor thread; its result, once any
        Deferred or coroutine it returns has fired.
        """
        def run() -> Any:
            result = function(*args, **kwargs)
            if hasattr(result, "__await__") and not isinstance(result, Deferred):
                return Deferred.fromCoroutine(result)
            return result

        return blockingCallFromThread(reactor, run)

    def close(self) -> None:
        """Run the cleanups (newest first: servers stop), then stop the reactor."""
        while self._cleanups:
            function, args, kwargs = self._cleanups.pop()
            try:
                blockingCallFromThread(reactor, maybeDeferred, function, *args, **kwargs)
            except Exception as e:  # keep cleaning up
                print(f"bench: cleanup {getattr(function, '__qualname__', function)}: {e}", file=sys.stderr)
        reactor.callFromThread(reactor.stop)  # type: ignore[attr-defined]
        self._thread.join(10)


def connector_manifests(namespace: str, protocol: str, name: str, address: str, user: str, password: str) -> str:
    """
    Manifests of one Connector C{NAMESPACE/NAME} on C{address}, of the class
    C{bench-PROTOCOL}, with the Basic credentials of its Secret C{NAME-creds}.
    """
    from tests.support.proxy import basic_secret, connector, connector_class, manifests_text

    return manifests_text([
        connector_class(f"bench-{protocol}", protocol),
        connector(namespace, name, f"bench-{protocol}", address, secret=f"{name}-creds"),
        basic_secret(namespace, f"{name}-creds", user, password),
    ])


def cached_image(harness: Harness, name: str, layer_sizes: Sequence[int], tag: str = "v1") -> Any:
    """
    An OCI image layout of random layers (tests.support.registry.build_image),
    built once into C{CACHE}/image-NAME and reused while its description
    file is there.  Returns a L{tests.support.registry.Image}.
    """
    from tests.support.registry import Image, build_image

    folder = os.path.join(CACHE, f"image-{name}")
    described = os.path.join(folder, "image.json")
    if os.path.exists(described):
        with open(described) as f:
            data = json.load(f)
        if data.get("layer_request") == list(layer_sizes) and os.path.isdir(data["layout"]):
            return Image(layout=data["layout"], tag=data["tag"], manifest_digest=data["manifest_digest"],
                         config_digest=data["config_digest"], layer_digests=tuple(data["layer_digests"]),
                         layer_sizes=tuple(data["layer_sizes"]))
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    print(f"building image {name} ({len(layer_sizes)} random layers, {sum(layer_sizes) / 1e6:.0f} MB) in {folder}"
          " (once) ...", flush=True)
    # build_image works under the current directory ("oci-images/..."):
    # make that the cache folder while it runs.
    here = os.getcwd()
    os.chdir(folder)
    try:
        image = harness.call(build_image, name, tuple(layer_sizes), tag)
    finally:
        os.chdir(here)
    with open(described, "w") as f:
        json.dump({"layer_request": list(layer_sizes), "layout": image.layout, "tag": image.tag,
                   "manifest_digest": image.manifest_digest, "config_digest": image.config_digest,
                   "layer_digests": list(image.layer_digests), "layer_sizes": list(image.layer_sizes)}, f)
    return image


def image_bytes(image: Any) -> int:
    """What a pull of C{image} transfers: manifest, config and (compressed) layers."""
    total = sum(image.layer_sizes)
    for digest in (image.manifest_digest, image.config_digest):
        total += os.path.getsize(image.blob_path(digest))
    return total
