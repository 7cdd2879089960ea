# -*- test-case-name: tests.test_oci_fixtures -*-
"""
Real OCI registries for tests: the distribution registry (C{docker-registry})
with token auth, fed by a token server that runs in the test process, or with
htpasswd Basic auth; and an image built offline with C{umoci}.

The token server is the one part written here (no token server is packaged):
it answers C{GET realm?service=S&scope=...} with an RS256 JWT that the
registry checks against C{rootcertbundle}, and it records every request so a
test can count token requests per scope and list every token it ever issued
(to prove none of them reaches a client).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from attrs import define, field, frozen
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.protocols import portforward
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from twisted.web.static import File

from .procs import check, free_port, require, run, start_server

# -- JWTs the distribution registry accepts ---------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def libtrust_key_id(public_key: rsa.RSAPublicKey) -> str:
    """
    The key id that distribution's C{libtrust} gives a public key: base32 of
    the first 240 bits of the SHA-256 of its DER SubjectPublicKeyInfo, in
    colon-separated groups of four.
    """
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode("ascii").rstrip("=")
    return ":".join(encoded[i:i + 4] for i in range(0, len(encoded), 4))


@frozen
class SigningKey:
    """An RSA key and the self-signed certificate the registry trusts."""

    key: rsa.RSAPrivateKey = field(repr=False)
    certificate: x509.Certificate

    @classmethod
    def generate(cls, issuer: str) -> SigningKey:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)])
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def jwt(self, claims: dict[str, Any], header_style: str = "x5c") -> str:
        """An RS256 JWT whose header ties it to our certificate by C{x5c} or C{kid}."""
        header: dict[str, Any] = {"typ": "JWT", "alg": "RS256"}
        if header_style == "x5c":
            der = self.certificate.public_bytes(serialization.Encoding.DER)
            header["x5c"] = [base64.b64encode(der).decode("ascii")]
        elif header_style == "kid":
            header["kid"] = libtrust_key_id(self.key.public_key())
        else:
            raise ValueError(f"unknown JWT header style {header_style!r}")
        signing_input = (
            b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        signature = self.key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + b64url(signature)


def parse_scope(scope: str) -> tuple[str, str, tuple[str, ...]] | None:
    """C{repository:a/b:pull,push} -> C{("repository", "a/b", ("pull", "push"))}."""
    kind, sep, rest = scope.partition(":")
    name, sep2, actions = rest.rpartition(":")
    if not (sep and sep2 and kind and name):
        return None
    return kind, name, tuple(a for a in actions.split(",") if a)


def _listen(test: TestCase, site: Site) -> Any:
    """Listen on a free loopback port until C{test} ends; the listening port."""
    port = _reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined, arg-type]
    test.addCleanup(port.stopListening)
    return port


# -- the token server --------------------------------------------------------


@frozen
class TokenRequest:
    """One request the token server answered (or refused)."""

    service: str
    scopes: tuple[str, ...]
    account: str | None
    granted: bool
    user_agent: str


Grant = Callable[[str | None, str, str, tuple[str, ...]], tuple[str, ...]]


def grant_all(account: str | None, kind: str, name: str, actions: tuple[str, ...]) -> tuple[str, ...]:
    """Authenticated users get every action they ask for."""
    return actions


@define
class TokenServer:
    """
    A Docker token server (the C{realm} of a registry's C{Bearer} challenge).

    @ivar users: C{{username: password}} accepted in C{Authorization: Basic}.
    @ivar anonymous_actions: what a request without credentials may get
        (C{("pull",)} for a public registry, C{()} to refuse it with 401).
    @ivar grant: decides which of the asked actions an account gets.
    @ivar header_style: C{"x5c"} or C{"kid"}, how the JWT names its key.
    @ivar delay: seconds to wait before answering, so a test can see whether
        concurrent requests for one scope share one token request.
    """

    users: dict[str, str]
    service: str = "test-registry"
    issuer: str = "test-token-issuer"
    header_style: str = "x5c"
    expires_in: int = 300
    anonymous_actions: tuple[str, ...] = ()
    grant: Grant = grant_all
    delay: float = 0.0
    signing_key: SigningKey = field(default=None)
    requests: list[TokenRequest] = field(factory=list)
    tokens: list[str] = field(factory=list, repr=False)
    port: int = 0
    _listening: Any = None

    def __attrs_post_init__(self) -> None:
        if self.signing_key is None:
            self.signing_key = SigningKey.generate(self.issuer)

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def count(self, scope: str | None = None) -> int:
        """Requests served, all of them or those that asked for C{scope}."""
        return sum(1 for r in self.requests if scope is None or scope in r.scopes)

    def issue(self, account: str | None, scopes: Sequence[str]) -> str:
        access = []
        for scope in scopes:
            parsed = parse_scope(scope)
            if parsed is None:
                continue
            kind, name, actions = parsed
            allowed = (self.grant(account, kind, name, actions) if account is not None
                       else tuple(a for a in actions if a in self.anonymous_actions))
            if allowed:
                access.append({"type": kind, "name": name, "actions": list(allowed)})
        now = int(time.time())
        token = self.signing_key.jwt({
            "iss": self.issuer,
            "sub": account or "",
            "aud": self.service,
            "exp": now + self.expires_in,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }, self.header_style)
        self.tokens.append(token)
        return token

    def listen(self, test: TestCase) -> None:
        """Listen on a loopback port until C{test} ends."""
        root = Resource()
        root.putChild(b"token", _TokenResource(self))
        self._listening = _listen(test, Site(root))
        self.port = self._listening.getHost().port


class _TokenResource(Resource):
    isLeaf = True

    def __init__(self, server: TokenServer) -> None:
        super().__init__()
        # Not "self.server": twisted.web.server.Site sets that on resources.
        self._tokens = server

    def render_GET(self, request: Request) -> Any:
        server = self._tokens
        args = request.args or {}
        service = b"".join(args.get(b"service", [b""])).decode()
        scopes = tuple(s.decode() for s in args.get(b"scope", []) for s in s.split(b" "))
        account: str | None = None
        granted = True
        auth = request.getHeader("authorization") or ""
        if auth.lower().startswith("basic "):
            try:
                user, _, password = base64.b64decode(auth[6:].strip()).decode().partition(":")
            except ValueError:
                user, password = "", ""
            if server.users.get(user) == password and user:
                account = user
            else:
                granted = False
        elif not server.anonymous_actions:
            granted = False
        if service != server.service:
            granted = False
        server.requests.append(TokenRequest(
            service, scopes, account, granted,
            (request.getHeader("user-agent") or ""),
        ))
        request.setHeader("content-type", "application/json")
        if not granted:
            request.setResponseCode(401)
            request.setHeader("www-authenticate", 'Basic realm="test-token-server"')
            return json.dumps({"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]}).encode()
        token = server.issue(account, scopes)
        body = json.dumps({
            "token": token,
            "access_token": token,
            "expires_in": server.expires_in,
            "issued_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        }).encode()
        if server.delay:
            _reactor.callLater(server.delay, _finish, request, body)  # type: ignore[attr-defined]
            return 1  # NOT_DONE_YET
        return body


def _finish(request: Request, body: bytes) -> None:
    request.write(body)
    request.finish()


# -- a blob origin for redirects ---------------------------------------------


@frozen
class OriginRequest:
    method: str
    path: str
    authorization: str | None


@define
class BlobOrigin:
    """
    Serves the registry's storage directory on another port: the "CDN" that
    the registry's C{redirect} storage middleware sends blob GETs to.  Every
    request is recorded with whatever C{Authorization} it carried.
    """

    root: str
    requests: list[OriginRequest] = field(factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def listen(self, test: TestCase) -> None:
        origin = self

        class Recording(File):
            def render(self, request: Request) -> Any:
                origin.requests.append(OriginRequest(
                    request.method.decode(), request.uri.decode(),
                    request.getHeader("authorization"),
                ))
                return super().render(request)

        self.port = _listen(test, Site(Recording(self.root))).getHost().port


# -- the registries ----------------------------------------------------------


@define
class Registry:
    """A running C{docker-registry}."""

    port: int
    storage: str
    auth: str  # "token" | "basic" | "none"
    token_server: TokenServer | None = None
    users: dict[str, str] = field(factory=dict)
    origin: BlobOrigin | None = None
    server: Any = None

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return str(self.server.log()) if self.server is not None else ""


def _registry_config(test: TestCase, port: int, storage: str, auth: dict[str, Any],
                     redirect_to: str | None) -> str:
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "info", "accesslog": {"disabled": False}},
        "storage": {
            "filesystem": {"rootdirectory": storage},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {"addr": f"127.0.0.1:{port}", "secret": secrets.token_hex(16)},
    }
    if auth:
        config["auth"] = auth
    if redirect_to is not None:
        config["middleware"] = {"storage": [{"name": "redirect", "options": {"baseurl": redirect_to}}]}
    path = os.path.join(test.mktemp() + "-registry.yml")
    # YAML is a superset of JSON: no YAML writer needed.
    with open(path, "w") as f:
        json.dump(config, f)
    return path


async def _start_registry(test: TestCase, auth_kind: str, auth: dict[str, Any],
                          redirect_blobs: bool, port: int | None = None) -> Registry:
    program = require("docker-registry")
    storage = os.path.abspath(test.mktemp())
    os.makedirs(storage)
    origin = None
    if redirect_blobs:
        origin = BlobOrigin(storage)
        origin.listen(test)
    if port is None:
        port = free_port()
    config = _registry_config(test, port, storage, auth, origin.url if origin else None)
    server = await start_server(test, [program, "serve", config], port=port, name="docker-registry")
    return Registry(port=port, storage=storage, auth=auth_kind, origin=origin, server=server)


def start_token_registry(test: TestCase, users: dict[str, str] | None = None,
                         header_style: str = "x5c", redirect_blobs: bool = False,
                         **token_options: Any) -> Deferred[Registry]:
    """
    Start a token server (in this process) and a registry that trusts it.
    C{users} default to one random canary user; the registry's C{users}
    attribute gives them back.
    """
    users = users if users is not None else {"user-" + secrets.token_hex(4): secrets.token_hex(16)}

    async def start() -> Registry:
        tokens = TokenServer(users=dict(users), header_style=header_style, **token_options)
        tokens.listen(test)
        registry = await _start_registry(test, "token", _token_auth(test, tokens, tokens.realm), redirect_blobs)
        registry.token_server = tokens
        registry.users = dict(users)
        return registry

    return Deferred.fromCoroutine(start())


def start_registry_trusting(test: TestCase, tokens: TokenServer, realm: str, port: int) -> Deferred[Registry]:
    """
    Start a registry on C{port} trusting C{tokens}, a token server the test
    started itself, and sending its clients to C{realm} for tokens: for a
    test that puts a front (TLS, a host name) before both, so chooses the
    registry's port before it starts and the realm's URL.
    """

    async def start() -> Registry:
        registry = await _start_registry(test, "token", _token_auth(test, tokens, realm), False, port)
        registry.token_server = tokens
        registry.users = dict(tokens.users)
        return registry

    return Deferred.fromCoroutine(start())


def _token_auth(test: TestCase, tokens: TokenServer, realm: str) -> dict[str, Any]:
    """A registry's C{auth} section trusting C{tokens} (its signing certificate written to a file)."""
    bundle = test.mktemp() + "-root.pem"
    with open(bundle, "wb") as f:
        f.write(tokens.signing_key.certificate_pem())
    return {"token": {"realm": realm, "service": tokens.service, "issuer": tokens.issuer,
                      "rootcertbundle": os.path.abspath(bundle)}}


def start_basic_registry(test: TestCase, users: dict[str, str] | None = None,
                         redirect_blobs: bool = False) -> Deferred[Registry]:
    """Start a registry that asks for C{Basic} credentials (htpasswd, bcrypt)."""
    users = users if users is not None else {"user-" + secrets.token_hex(4): secrets.token_hex(16)}

    async def start() -> Registry:
        htpasswd = require("htpasswd")
        lines = []
        for user, password in users.items():
            result = check(await run([htpasswd, "-Bbn", user, password]))
            lines.append(result.stdout.decode().strip())
        path = os.path.abspath(test.mktemp() + "-htpasswd")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        registry = await _start_registry(test, "basic", {
            "htpasswd": {"realm": "test-basic-registry", "path": path},
        }, redirect_blobs)
        registry.users = dict(users)
        return registry

    return Deferred.fromCoroutine(start())


def start_open_registry(test: TestCase) -> Deferred[Registry]:
    """Start a registry without any auth (for anonymous Connectors)."""
    return Deferred.fromCoroutine(_start_registry(test, "none", {}, False))


# -- images built offline ----------------------------------------------------


@frozen
class Image:
    """An OCI image layout on disk, as C{umoci} built it."""

    layout: str
    tag: str
    manifest_digest: str
    config_digest: str
    layer_digests: tuple[str, ...]
    layer_sizes: tuple[int, ...]

    @property
    def reference(self) -> str:
        """The C{oci:} transport reference skopeo reads."""
        return f"oci:{self.layout}:{self.tag}"

    def blob_path(self, digest: str) -> str:
        algorithm, _, hex_digest = digest.partition(":")
        return os.path.join(self.layout, "blobs", algorithm, hex_digest)


_images: dict[tuple[str, tuple[int, ...]], Image] = {}


def build_image(name: str = "multi", layer_sizes: Sequence[int] = (4096, 100 * 1024 * 1024 + 17, 1000),
                tag: str = "v1") -> Deferred[Image]:
    """
    Build (once per test process) an image of random files, one layer per
    entry of C{layer_sizes}.  Random data does not compress, so a 100 MiB
    file gives a layer of a little over 100 MiB.

    The layout lives under the trial working directory, which trial wipes
    at the start of the next run.
    """
    key = (name, tuple(layer_sizes))
    if key in _images:
        return Deferred.fromCoroutine(_cached(_images[key]))
    return Deferred.fromCoroutine(_build(key, tag))


async def _cached(image: Image) -> Image:
    return image


async def _build(key: tuple[str, tuple[int, ...]], tag: str) -> Image:
    umoci = require("umoci")
    name, sizes = key
    base = os.path.abspath(os.path.join("oci-images", name + "-" + secrets.token_hex(4)))
    layout = os.path.join(base, "layout")
    os.makedirs(base)
    image = f"{layout}:{tag}"
    check(await run([umoci, "init", "--layout", layout]))
    check(await run([umoci, "new", "--image", image]))
    for i, size in enumerate(sizes):
        source = os.path.join(base, f"layer{i}.bin")
        with open(source, "wb") as f:
            remaining = size
            while remaining:
                chunk = min(remaining, 1 << 20)
                f.write(os.urandom(chunk))
                remaining -= chunk
        check(await run([umoci, "insert", "--image", image, source, f"/data/layer{i}.bin"]))
        os.unlink(source)
    check(await run([umoci, "config", "--image", image, "--config.cmd", "/data/layer0.bin",
                     "--author", "connectors-proxy tests"]))
    check(await run([umoci, "gc", "--layout", layout]))
    with open(os.path.join(layout, "index.json")) as f:
        index = json.load(f)
    (entry,) = [m for m in index["manifests"]
                if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
    manifest_digest = entry["digest"]
    with open(os.path.join(layout, "blobs", *manifest_digest.split(":"))) as f:
        manifest = json.load(f)
    result = Image(
        layout=layout, tag=tag, manifest_digest=manifest_digest,
        config_digest=manifest["config"]["digest"],
        layer_digests=tuple(layer["digest"] for layer in manifest["layers"]),
        layer_sizes=tuple(layer["size"] for layer in manifest["layers"]),
    )
    _images[key] = result
    return result


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


# -- client commands ---------------------------------------------------------


def write_authfile(path: str, auths: dict[str, tuple[str, str]]) -> str:
    """A docker C{config.json} with C{{host: (user, password)}}."""
    with open(path, "w") as f:
        json.dump({"auths": {
            host: {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}
            for host, (user, password) in auths.items()
        }}, f)
    return path


def skopeo(command: str, *args: str, authfile: str | None = None) -> list[str]:
    """
    A skopeo command line.  C{authfile} (a docker config.json) is the only
    place it looks for credentials; without one it is anonymous, whatever
    the machine's own logins.
    """
    argv = [require("skopeo"), "--command-timeout", "5m", command]
    # A file that does not exist counts as empty: no stored login is used.
    argv.append(f"--authfile={authfile or '/nonexistent/connectors-proxy-tests.json'}")
    return argv + list(args)


@define
class Podman:
    """
    podman with its own storage (vfs: no overlay mounts needed) and run
    directory under the test's temp dir, so tests never touch the machine's
    images or each other's.
    """

    root: str
    runroot: str

    @classmethod
    def isolated(cls, test: TestCase) -> Podman:
        root = os.path.abspath(test.mktemp())
        os.makedirs(root)
        # podman refuses a run root longer than 50 characters.
        runroot = tempfile.mkdtemp(prefix="cp-podman-")
        test.addCleanup(shutil.rmtree, runroot, True)
        return cls(root, runroot)

    def argv(self, *args: str) -> list[str]:
        return [
            require("podman"),
            "--root", os.path.join(self.root, "storage"),
            "--runroot", self.runroot,
            "--storage-driver", "vfs",
            "--events-backend", "none",
            "--cgroup-manager", "cgroupfs",
            *args,
        ]

    @property
    def env(self) -> dict[str, str]:
        # No user or system registries.conf search lists, no stored logins.
        return {"REGISTRY_AUTH_FILE": os.path.join(self.root, "no-auth.json"),
                "XDG_RUNTIME_DIR": os.path.join(self.root, "xdg"),
                "HOME": self.root}


# -- what the client sees ------------------------------------------------------


class _TapClient(portforward.ProxyClient):
    def dataReceived(self, data: bytes) -> None:
        assert self.peer is not None
        self.peer.factory.tap.record(data)  # type: ignore[attr-defined]
        super().dataReceived(data)


class _TapClientFactory(portforward.ProxyClientFactory):
    protocol = _TapClient


class _TapServer(portforward.ProxyServer):
    clientProtocolFactory = _TapClientFactory

    def dataReceived(self, data: bytes) -> None:
        self.factory.tap.record(data)  # type: ignore[attr-defined]
        super().dataReceived(data)


@define
class TrafficTap:
    """
    A TCP relay in front of the proxy that writes every byte, both ways, to
    a file: the client side of the wire, to search for secrets that must
    never reach a client.  Flow control is the port forwarder's (producers
    registered both ways), so large transfers do not pile up in memory.
    """

    path: str
    port: int = 0
    size: int = 0
    _file: Any = None

    @classmethod
    def start(cls, test: TestCase, target_port: int) -> TrafficTap:
        tap = cls(os.path.abspath(test.mktemp()))
        tap._file = open(tap.path, "wb")
        test.addCleanup(tap._file.close)
        factory = portforward.ProxyFactory("127.0.0.1", target_port)
        factory.protocol = _TapServer  # type: ignore[assignment]
        factory.tap = tap  # type: ignore[attr-defined]
        factory.noisy = False
        tap.port = _listen(test, factory).getHost().port  # type: ignore[arg-type]
        return tap

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def record(self, data: bytes) -> None:
        self.size += len(data)
        self._file.write(data)

    def find(self, needles: Sequence[bytes]) -> list[bytes]:
        """The needles that occur anywhere in what passed through."""
        if not self._file.closed:
            self._file.flush()
        needles = [n for n in needles if n]
        overlap = max((len(n) for n in needles), default=1)
        found: set[bytes] = set()
        tail = b""
        with open(self.path, "rb") as f:
            while chunk := f.read(8 << 20):
                window = tail + chunk
                found.update(n for n in needles if n in window)
                tail = window[-overlap:]
        return sorted(found)
