"""Mutual TLS between the tiers: one place for the certificates a process presents and trusts, and for
who a caller is.

Every TCP hop (gRPC and the OCI Distribution HTTP endpoint) is TLS with a client certificate signed
by the deployment's CA, unless IMAGESTREAM_TLS=off. Unix sockets stay plain: the file's mode decides
who may connect (see `unix_socket_permissions`).

What a caller may do is written in its certificate as SAN URIs:

    imagestream://role/pusher      publish, delete, set profiles, write chunks and blobs, scrub
    imagestream://role/profiler    store startup profiles (the node's FUSE client records them)
    imagestream://role/node        read (the node cache)
    imagestream://role/zonal       read (the zonal cache)
    imagestream://tenant/NAME      with a tenant policy (IMAGESTREAM_TENANTS): reads only NAME's prefixes

The local stack's CA and certificates live in IMAGESTREAM_TLS_DIR (HOME/tls by default,
`imagestream stack up` makes them); a process presents `<its identity>.crt` from there unless
IMAGESTREAM_TLS_CERT / IMAGESTREAM_TLS_KEY name other files (in Kubernetes: a mounted Secret).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import grp
import os
import pathlib
import ssl
from collections.abc import Iterator

from imagestream import config
from imagestream.errors import ImagestreamError

ROLE_URI = "imagestream://role/"
TENANT_URI = "imagestream://tenant/"
ROLES = ("pusher", "profiler", "node", "zonal")
SETTINGS = ("tls", "tls_dir", "tls_ca", "tls_cert", "tls_key")  # every process that dials or serves TCP reads them

# the certificate a process presents when IMAGESTREAM_TLS_CERT is not set: its file in the TLS folder
_identity = "pusher"  # the CLI's; each service sets its own (rpc.server.service_main)


class TlsError(ImagestreamError):
    """A certificate or key that cannot be read or used."""


def set_identity(name: str) -> None:
    global _identity
    _identity = name


def identity() -> str:
    return _identity


def enabled() -> bool:
    value = config.get("tls").strip().lower()
    if value not in ("on", "off"):
        raise TlsError(f"{config.SETTINGS['tls'].env}={value!r}: expected 'on' or 'off'")
    return value == "on"


def tls_dir() -> pathlib.Path:
    return pathlib.Path(config.get("tls_dir") or config.home() / "tls").absolute()


def ca_path() -> pathlib.Path:
    return pathlib.Path(config.get("tls_ca") or tls_dir() / "ca.crt")


def cert_path(identity: str | None = None) -> pathlib.Path:
    """This process's certificate, or the local stack's one of `identity`."""
    return pathlib.Path(config.get("tls_cert") or tls_dir() / f"{identity or _identity}.crt")


def key_path(identity: str | None = None) -> pathlib.Path:
    return pathlib.Path(config.get("tls_key") or tls_dir() / f"{identity or _identity}.key")


def _read(path: pathlib.Path, what: str, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise TlsError(f"TLS: cannot read {what} {path} ({e.strerror}); `imagestream stack up` makes the local "
                       f"stack's, or set {config.SETTINGS[setting].env} (or IMAGESTREAM_TLS=off on a trusted "
                       "network)") from None


def _material() -> tuple[bytes, bytes, bytes]:
    """(CA certificates, own certificate chain, own private key), PEM."""
    return (_read(ca_path(), "the CA certificate", "tls_ca"), _read(cert_path(), "the certificate", "tls_cert"),
            _read(key_path(), "the private key", "tls_key"))


def channel_credentials():  # type: ignore[no-untyped-def]
    """gRPC client credentials: trust the CA, present our certificate."""
    import grpc

    ca, cert, key = _material()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def grpc_channel(target: str, options=(), aio: bool = True):  # type: ignore[no-untyped-def]
    """A channel to `target`: TLS with our certificate to a host:port, plain to a Unix socket (unix:PATH)."""
    import grpc

    module = grpc.aio if aio else grpc
    if target.startswith("unix:") or not enabled():
        return module.insecure_channel(target, options=list(options))
    return module.secure_channel(target, channel_credentials(), options=list(options))


def server_credentials():  # type: ignore[no-untyped-def]
    """gRPC server credentials that require a client certificate signed by the CA. The files are read
    again on a new connection when they changed, so a renewed certificate (cert-manager) is used without
    a restart."""
    import grpc

    def load():  # type: ignore[no-untyped-def]
        ca, cert, key = matched_material()
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    seen = [material_stamp()]
    initial = load()

    def fetch():  # type: ignore[no-untyped-def]
        now = material_stamp()
        if now == seen[0]:
            return None  # unchanged: keep the current configuration
        try:
            configuration = load()
        except TlsError:  # caught mid-rotation: keep serving the old one, try again on the next handshake
            return None
        seen[0] = now
        return configuration

    return grpc.dynamic_ssl_server_credentials(initial, fetch, require_client_authentication=True)


# How often a long-lived client or HTTP server looks at its certificate files for a renewal (a stat of
# three files). gRPC servers look on every new connection instead (dynamic credentials).
RENEWAL_CHECK_S = 10.0


def matched_material() -> tuple[bytes, bytes, bytes]:
    """As _material, and the key is the certificate's: a renewal caught between its two files is an
    error rather than a configuration no handshake can use."""
    material = _material()
    try:
        ssl.create_default_context().load_cert_chain(str(cert_path()), str(key_path()))
    except (ssl.SSLError, OSError) as e:
        raise TlsError(f"TLS: {cert_path()} and {key_path()} are not a certificate and its key ({e})") from None
    return material


def material_stamp() -> tuple[float, ...]:
    """When the CA, certificate and key files last changed: a renewal (cert-manager rewrites the
    Secret's files) changes it."""
    return tuple(_mtime(p) for p in (ca_path(), cert_path(), key_path()))


def _mtime(path: pathlib.Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def server_ssl_context() -> ssl.SSLContext:
    """The same for an HTTP server (aiohttp): a client certificate signed by the CA is required."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.verify_mode = ssl.CERT_REQUIRED
    _read(ca_path(), "the CA certificate", "tls_ca")  # the same one-line error as gRPC's when missing
    _read(cert_path(), "the certificate", "tls_cert")
    ctx.load_verify_locations(cafile=str(ca_path()))
    ctx.load_cert_chain(str(cert_path()), str(key_path()))
    return ctx


async def keep_renewed(ctx: ssl.SSLContext) -> None:
    """Load renewed certificate files into a server's context, so that new handshakes present the
    renewed certificate without a restart. A new CA is trusted beside the old one (a context cannot
    forget one), which is what a CA rotation needs while both are in use."""
    import asyncio

    seen = material_stamp()
    while True:
        await asyncio.sleep(RENEWAL_CHECK_S)
        now = material_stamp()
        if now == seen:
            continue
        try:
            matched_material()
            ctx.load_verify_locations(cafile=str(ca_path()))
            ctx.load_cert_chain(str(cert_path()), str(key_path()))
        except (TlsError, ssl.SSLError, OSError):  # caught mid-renewal: keep the loaded one, look again
            continue
        seen = now


def client_ssl_context() -> ssl.SSLContext:
    """An HTTP client's context: trust the CA, present our certificate."""
    ctx = ssl.create_default_context(cafile=str(ca_path()))
    ctx.load_cert_chain(str(cert_path()), str(key_path()))
    return ctx


def urlopen(where: str, timeout: float = 60):  # type: ignore[no-untyped-def]
    """GET https://WHERE with our certificate (http:// with IMAGESTREAM_TLS=off): the regional OCI endpoint."""
    import urllib.request

    if not enabled():
        return urllib.request.urlopen(f"http://{where}", timeout=timeout)
    return urllib.request.urlopen(f"https://{where}", timeout=timeout, context=client_ssl_context())


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who a verified client certificate says the caller is."""

    name: str  # the subject's common name
    roles: frozenset[str]
    tenant: str | None

    def __str__(self) -> str:
        return f"{self.name!r} (roles: {', '.join(sorted(self.roles)) or 'none'})"


@functools.lru_cache(maxsize=256)
def caller_from_der(der: bytes) -> Caller:
    """The caller named by a certificate (already verified against the CA by the TLS handshake)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_der_x509_certificate(der)
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    try:
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    roles = frozenset(u.removeprefix(ROLE_URI) for u in uris if u.startswith(ROLE_URI))
    tenants = [u.removeprefix(TENANT_URI) for u in uris if u.startswith(TENANT_URI)]
    return Caller(str(cn[0].value) if cn else "(no common name)", roles, tenants[0] if tenants else None)


def caller_from_pem(pem: bytes) -> Caller:
    return caller_from_der(ssl.PEM_cert_to_DER_cert(pem.decode("ascii")))


# -- Unix sockets ------------------------------------------------------------

def socket_mode() -> tuple[int, int | None]:
    """(mode, group id) for the node's Unix sockets: 0600, or 0660 with IMAGESTREAM_SOCKET_GROUP."""
    group = config.get("socket_group")
    if not group:
        return 0o600, None
    try:
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise TlsError(f"{config.SETTINGS['socket_group'].env}={group!r}: no such group") from None
    return 0o660, gid


@contextlib.contextmanager
def unix_socket_permissions(path: str) -> Iterator[None]:
    """Around the bind of a Unix socket at `path`: made with no access for others from the start (a umask
    set around the bind, so there is no moment it is world-writable), then given its mode and group."""
    mode, gid = socket_mode()
    old = os.umask(0o177 if gid is None else 0o117)
    try:
        yield
    finally:
        os.umask(old)
    if os.path.exists(path):
        if gid is not None:
            os.chown(path, -1, gid)
        os.chmod(path, mode)
