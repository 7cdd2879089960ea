# -*- test-case-name: tests.test_tls_serve -*-
"""
TLS for clients of the proxy: the C{cptls:} listener.

Clients reach a Connector at C{https://c-NAME.NS.svc[.CLUSTER-DOMAIN]} (or
C{c-NAME.NS}); the SNI callback answers such a name with a leaf minted on
demand by the proxy's CA for all three forms of that Connector's name, and
every other name (or no SNI at all) with the configured default
certificate.  TLS 1.2 is the floor, ciphers are ECDHE with AEAD only, ALPN
offers C{http/1.1}.

The certificate, key, CA and client-CA files are read again every second
and compared by content, so a Kubernetes Secret volume update (an atomic
C{..data} symlink swap) or a plain rewrite is used for the next handshake;
connections already open keep the certificate they started with.

Optionally (C{clientCA=}) the listener asks for a client certificate and
verifies it; L{client_identity} turns the verified certificate of a
connection into an L{Identity} (CN is the user, O the groups, as the
Kubernetes API server reads client certificates).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence

from attrs import field, frozen
from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorTCP,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from connectors_proxy.auth.interfaces import Identity
from connectors_proxy.server.routing import host_connector
from connectors_proxy.tls.mint import LEAF_LIFETIME, CertificateAuthority, Leaf, LeafCache, load_pair

log = Logger()

# TLS 1.2 suites: forward secret and AEAD only (TLS 1.3 suites are all of that already).
CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"
ALPN = b"http/1.1"
RELOAD_INTERVAL = 1.0
DEFAULT_CLUSTER_DOMAIN = "cluster.local"


# -- names ------------------------------------------------------------------------------


def connector_hostnames(namespace: str, name: str, cluster_domain: str) -> tuple[str, ...]:
    """The three host names of a Connector's Service, longest first."""
    return (f"c-{name}.{namespace}.svc.{cluster_domain}", f"c-{name}.{namespace}.svc",
            f"c-{name}.{namespace}")


def parse_connector_host(host: str, cluster_domain: str) -> tuple[str, str] | None:
    """
    C{(namespace, name)} when C{host} (an SNI name, so no port) is
    C{c-NAME.NS}, C{c-NAME.NS.svc} or C{c-NAME.NS.svc.CLUSTER-DOMAIN}, else
    C{None}: the routing rule, applied to the handshake.
    """
    if ":" in host:
        return None
    try:
        return host_connector(host.encode("ascii"), cluster_domain)
    except UnicodeEncodeError:
        return None


# -- material from files ----------------------------------------------------------------


@frozen
class TLSFiles:
    """Where the listener's PEM files are; C{None} for the parts not used."""

    cert: str | None
    key: str | None
    ca_cert: str | None = None
    ca_key: str | None = None
    client_ca: str | None = None

    def paths(self) -> tuple[str | None, ...]:
        return (self.cert, self.key, self.ca_cert, self.ca_key, self.client_ca)


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"cannot read {what} {path}: {e.strerror}") from None


def _load_pair(cert_pem: bytes, key_pem: bytes, cert_path: str, key_path: str) -> Leaf:
    # Each file named as what it is: a mismatch names the key's file, not
    # the certificate's twice.
    certs, key = load_pair(cert_pem, key_pem, cert_path, f"the private key in {key_path}")
    return Leaf(certs[0], key, tuple(certs[1:]))


@frozen
class Material:
    """
    What one reading of the files gave, validated: the default certificate,
    the CA (when minting), the client CAs (when verifying clients), and
    the raw bytes they came from (to notice changes).
    """

    default: Leaf
    ca: CertificateAuthority | None
    client_cas: tuple[x509.Certificate, ...]
    raw: tuple[bytes | None, ...] = field(repr=False)


def read_files(files: TLSFiles) -> tuple[bytes | None, ...]:
    """The files' bytes, in L{TLSFiles.paths} order; L{ValueError} naming one that cannot be read."""
    return tuple(_read(p, w) for p, w in zip(
        files.paths(), ("certKey", "privateKey", "caCert", "caKey", "clientCA"), strict=True))


def read_material(files: TLSFiles, now: float,
                  default_names: Sequence[str] = ("localhost",),
                  raw: tuple[bytes | None, ...] | None = None) -> Material:
    """
    Read and check the files (or C{raw}, what L{read_files} read of
    them).  Raise L{ValueError} naming the file and the problem.  Without
    C{cert}, the default certificate is minted by the CA for
    C{default_names}.
    """
    if raw is None:
        raw = read_files(files)
    cert_pem, key_pem, ca_cert_pem, ca_key_pem, client_ca_pem = raw
    ca = None
    if ca_cert_pem is not None or ca_key_pem is not None:
        if ca_cert_pem is None or ca_key_pem is None:
            raise ValueError("caCert and caKey go together")
        try:
            ca = CertificateAuthority.from_pem(ca_cert_pem, ca_key_pem)
        except ValueError as e:
            raise ValueError(f"{files.ca_cert}: {e}") from None
    if cert_pem is not None:
        default = _load_pair(cert_pem, key_pem if key_pem is not None else cert_pem,
                             f"{files.cert}", f"{files.key if key_pem is not None else files.cert}")
    elif ca is not None:
        default = ca.mint(list(default_names), now)
    else:
        raise ValueError("certKey (or caCert and caKey) is required")
    client_cas: tuple[x509.Certificate, ...] = ()
    if client_ca_pem is not None:
        try:
            client_cas = tuple(x509.load_pem_x509_certificates(client_ca_pem))
        except ValueError as e:
            raise ValueError(f"{files.client_ca}: no valid PEM certificate ({e})") from None
    return Material(default, ca, client_cas, raw)


# -- contexts ---------------------------------------------------------------------------


def _select_alpn(connection: SSL.Connection, offered: list[bytes]) -> bytes:
    # Only HTTP/1.1 is spoken; a client offering only h2 gets no ALPN at all.
    return ALPN if ALPN in offered else SSL.NO_OVERLAPPING_PROTOCOLS  # type: ignore[return-value]


def make_context(leaf: Leaf, client_cas: Sequence[x509.Certificate] = (),
                 require_client_cert: bool = False) -> SSL.Context:
    """
    A server context presenting C{leaf}.  Every context the listener uses
    (default and minted) is made here, because OpenSSL takes the client-CA
    store and list from the context that SNI switched to.
    """
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_TICKET
                    | SSL.OP_CIPHER_SERVER_PREFERENCE)
    ctx.set_cipher_list(CIPHERS)
    ctx.use_certificate(crypto.X509.from_cryptography(leaf.certificate))
    ctx.use_privatekey(crypto.PKey.from_cryptography_key(leaf.key))  # type: ignore[arg-type]
    for extra in leaf.chain:
        ctx.add_extra_chain_cert(crypto.X509.from_cryptography(extra))
    ctx.set_alpn_select_callback(_select_alpn)
    ctx.set_session_id(b"connectors-proxy")
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    if client_cas:
        store = ctx.get_cert_store()
        assert store is not None
        for ca in client_cas:
            store.add_cert(crypto.X509.from_cryptography(ca))
        ctx.set_client_ca_list([crypto.X509.from_cryptography(ca).get_subject()
                                for ca in client_cas])
        mode = SSL.VERIFY_PEER
        if require_client_cert:
            mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        ctx.set_verify(mode)
    return ctx


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """
    The listener's TLS: picks a certificate per handshake (SNI) and keeps
    its files fresh.

    @param files: where the PEM files are.
    @param clock: for the reload loop and the leaves' lifetimes.
    @param cluster_domain: C{None} means C{cluster.local} until the daemon
        sets its C{--cluster-domain} (an explicit C{clusterDomain=} wins).
    @param known: optional C{known(namespace, name) -> bool}; when given,
        only Connectors it accepts get a minted certificate, the others get
        the default one.
    """

    def __init__(self, files: TLSFiles, clock: IReactorTime, cluster_domain: str | None = None,
                 known: Callable[[str, str], bool] | None = None, require_client_cert: bool = False,
                 max_cached: int = 1024, lifetime: datetime.timedelta = LEAF_LIFETIME,
                 default_names: Sequence[str] = ("localhost",)) -> None:
        self.files = files
        self.clock = clock
        self.cluster_domain = cluster_domain
        self.known = known
        self.require_client_cert = require_client_cert
        self.max_cached = max_cached
        self.lifetime = lifetime
        self.default_names = tuple(default_names)
        self.reloads = 0
        self._loop: LoopingCall | None = None
        self._last_error: str | None = None
        self.leaves: LeafCache | None = None
        self._install(read_material(files, clock.seconds(), self.default_names), keep_leaves=False)

    # The current configuration (material, default_context, leaves) is replaced
    # whole on reload, so a handshake sees one consistent set.
    material: Material
    default_context: SSL.Context

    def _install(self, material: Material, keep_leaves: bool) -> None:
        default_context = make_context(material.default, material.client_cas,
                                       self.require_client_cert)
        default_context.set_tlsext_servername_callback(self._servername)
        leaves = None
        if keep_leaves:
            leaves = self.leaves
        elif material.ca is not None:
            cas = material.client_cas
            leaves = LeafCache(material.ca, self.clock.seconds,
                               lambda leaf: make_context(leaf, cas, self.require_client_cert),
                               self.max_cached, self.lifetime)
        self.material, self.default_context, self.leaves = material, default_context, leaves

    def reload(self) -> bool:
        """
        Read the files again; install them when their content changed and is
        valid.  Return whether a new configuration was installed.  A broken
        set (a key written before its certificate) keeps the old one, logged
        once, and is tried again at the next tick.
        """
        try:
            raw = read_files(self.files)
            if raw == self.material.raw:
                return False
            material = read_material(self.files, self.clock.seconds(), self.default_names, raw)
        except ValueError as e:
            if str(e) != self._last_error:
                self._last_error = str(e)
                log.warn("TLS files not reloaded, still serving the previous ones: {error}",
                         error=str(e))
            return False
        # When only the default certificate changed, the minted leaves stay good;
        # a new CA or client CA needs new leaf contexts.
        self._install(material, keep_leaves=material.raw[2:] == self.material.raw[2:])
        self._last_error = None
        self.reloads += 1
        log.info("TLS files reloaded: default certificate for {names}",
                 names=", ".join(material.default.names))
        return True

    def start(self, interval: float = RELOAD_INTERVAL) -> None:
        """Poll the files every C{interval} seconds."""
        if self._loop is None:
            self._loop = LoopingCall(self.reload)
            self._loop.clock = self.clock
            self._loop.start(interval, now=False).addErrback(
                lambda f: log.failure("TLS reload loop stopped", f))

    def stop(self) -> None:
        if self._loop is not None:
            loop, self._loop = self._loop, None
            if loop.running:
                loop.stop()

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self.default_context, None)

    def context_for(self, server_name: str | None) -> SSL.Context | None:
        """The context for an SNI name: a minted one for a Connector, else C{None}."""
        if server_name is None or self.leaves is None:
            return None
        domain = self.cluster_domain or DEFAULT_CLUSTER_DOMAIN
        parsed = parse_connector_host(server_name, domain)
        if parsed is None:
            return None
        namespace, name = parsed
        if self.known is not None and not self.known(namespace, name):
            return None
        _, ctx = self.leaves.get(connector_hostnames(namespace, name, domain))
        assert isinstance(ctx, SSL.Context)
        return ctx

    def _servername(self, connection: SSL.Connection) -> None:
        raw = connection.get_servername()
        try:
            ctx = self.context_for(raw.decode("ascii") if raw else None)
        except Exception:  # noqa: BLE001
            # An exception in an OpenSSL callback would kill the handshake
            # obscurely; serve the default certificate and say why.
            log.failure("minting a certificate for SNI name {name!r} failed", name=raw)
            return
        if ctx is not None:
            connection.set_context(ctx)


# -- the endpoint ----------------------------------------------------------------------


@implementer(IListeningPort)
class _Port:
    """The TCP port, which also stops the reload loop when it stops listening."""

    def __init__(self, port: IListeningPort, tls: ServerTLS) -> None:
        self._port = port
        self._tls = tls

    def startListening(self) -> None:
        self._port.startListening()

    def stopListening(self) -> Deferred[None] | None:
        self._tls.stop()
        return self._port.stopListening()

    def getHost(self) -> IAddress:
        return self._port.getHost()


@implementer(IStreamServerEndpoint)
class TLSServerEndpoint:
    """Any stream server endpoint, with L{ServerTLS} on top."""

    def __init__(self, wrapped: IStreamServerEndpoint, tls: ServerTLS, clock: IReactorTime) -> None:
        self.wrapped = wrapped
        self.tls = tls
        self.clock = clock

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        factory = TLSMemoryBIOFactory(self.tls, False, protocolFactory, clock=self.clock)
        d: Deferred[IListeningPort] = self.wrapped.listen(factory)

        def listening(port: IListeningPort) -> IListeningPort:
            self.tls.start()
            return _Port(port, self.tls)
        return d.addCallback(listening)


_KNOWN_OPTIONS = {"port", "interface", "backlog", "certKey", "privateKey", "caCert", "caKey",
                  "clientCA", "clientAuth", "clusterDomain", "maxCached", "hostnames"}


def endpoint_from_string(reactor: object, *args: str, **kwargs: str) -> TLSServerEndpoint:
    """
    Build the endpoint for C{cptls:PORT:key=value:...} (see docs/tls.md).
    Raise L{ValueError} with one clear line on a bad option or file.
    """
    unknown = sorted(set(kwargs) - _KNOWN_OPTIONS)
    if unknown:
        raise ValueError(f"cptls: unknown option {unknown[0]!r} (known: "
                         f"{', '.join(sorted(_KNOWN_OPTIONS))})")
    if len(args) > 1 or (args and "port" in kwargs):
        raise ValueError("cptls: give the port once, e.g. cptls:8443:certKey=...")
    port_text = args[0] if args else kwargs.get("port", "8443")
    try:
        port = int(port_text)
        backlog = int(kwargs.get("backlog", "50"))
        max_cached = int(kwargs.get("maxCached", "1024"))
    except ValueError:
        raise ValueError("cptls: port, backlog and maxCached must be numbers") from None
    client_auth = kwargs.get("clientAuth", "optional")
    if client_auth not in ("optional", "require"):
        raise ValueError("cptls: clientAuth must be optional or require")
    if client_auth == "require" and "clientCA" not in kwargs:
        raise ValueError("cptls: clientAuth=require needs clientCA=")
    cert = kwargs.get("certKey")
    files = TLSFiles(
        cert=cert, key=kwargs.get("privateKey", cert),
        ca_cert=kwargs.get("caCert"), ca_key=kwargs.get("caKey"), client_ca=kwargs.get("clientCA"),
    )
    if files.key is not None and files.cert is None:
        raise ValueError("cptls: privateKey needs certKey")
    for path in files.paths():
        if path is not None and not os.path.exists(path):
            raise ValueError(f"cptls: {path} does not exist")
    assert IReactorTime.providedBy(reactor) and IReactorTCP.providedBy(reactor)
    hostnames = [h for h in kwargs.get("hostnames", "localhost").split(",") if h]
    try:
        tls = ServerTLS(files, reactor, cluster_domain=kwargs.get("clusterDomain"),
                        require_client_cert=client_auth == "require", max_cached=max_cached,
                        default_names=hostnames)
    except ValueError as e:
        raise ValueError(f"cptls: {e}") from None
    tcp = TCP4ServerEndpoint(reactor, port, backlog=backlog,  # type: ignore[no-untyped-call]
                             interface=kwargs.get("interface", ""))
    return TLSServerEndpoint(tcp, tls, reactor)


# -- client certificates as identities --------------------------------------------------


def peer_certificate(transport: object) -> x509.Certificate | None:
    """
    The client certificate of a connection served through C{cptls:} with
    C{clientCA=}: present only when it was verified against the client CA
    (an unverifiable certificate fails the handshake).  C{None} for plain
    TCP or a client that sent none.  Pass C{request.channel.transport}.
    """
    get = getattr(transport, "getPeerCertificate", None)
    if get is None:
        return None
    cert = get()
    if cert is None:
        return None
    return cert.to_cryptography()  # type: ignore[no-any-return]


def client_identity(transport: object) -> Identity | None:
    """
    The L{Identity} a verified client certificate proves, read as the
    Kubernetes API server reads one: subject CN is the user name, each O is
    a group.  C{None} without a verified certificate or without a CN.
    """
    cert = peer_certificate(transport)
    if cert is None:
        return None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        return None
    groups = tuple(str(a.value) for a in cert.subject.get_attributes_for_oid(
        NameOID.ORGANIZATION_NAME))
    return Identity(username=str(names[0].value), groups=groups)
