"""The local stack's CA and certificates (`imagestream stack up` makes them under IMAGESTREAM_TLS_DIR).

One certificate per process, each both a server and a client certificate, carrying the process's role
as a SAN URI (see imagestream.tls). In Kubernetes, cert-manager issues them instead (docs/kubernetes.md).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import pathlib
from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from imagestream import config, tls

# identity (file name) -> roles; every tier service presents its own, the CLI presents the pusher's
IDENTITIES: dict[str, tuple[str, ...]] = {
    "chunk-store": (),
    "zonal-cache": ("zonal",),
    "node-cache": ("node",),
    "fuse-client": ("node", "profiler"),  # records startup profiles and stores them in the region
    "snapshotter": ("node",),  # and containerd, pulling from the regional OCI endpoint for it
    "pusher": ("pusher",),
}

DAY = datetime.timedelta(days=1)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: pathlib.Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(directory: pathlib.Path, name: str = "imagestream local CA") -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new self-signed CA written to directory/ca.crt and ca.key."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - DAY).not_valid_after(now + 3650 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    _write(directory / "ca.key", _pem_key(key), 0o600)
    _write(directory / "ca.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert, key


def load_ca(directory: pathlib.Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    return cert, key  # type: ignore[return-value]


def issue(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], directory: pathlib.Path, name: str,
          roles: Iterable[str] = (), tenant: str | None = None, hosts: Iterable[str] = ("localhost", "127.0.0.1")
          ) -> pathlib.Path:
    """A certificate for `name` signed by `ca`, written to directory/NAME.crt and NAME.key; its path."""
    ca_cert, ca_key = ca
    key = _key()
    sans: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    sans += [x509.UniformResourceIdentifier(tls.ROLE_URI + r) for r in roles]
    if tenant:
        sans.append(x509.UniformResourceIdentifier(tls.TENANT_URI + tenant))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "imagestream"),
                                     x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - DAY).not_valid_after(now + 825 * DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write(directory / f"{name}.key", _pem_key(key), 0o600)
    _write(directory / f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return directory / f"{name}.crt"


def stack_hosts() -> list[str]:
    """The names and addresses the local stack's servers are dialled at."""
    hosts = ["localhost", "127.0.0.1", "::1"]
    for setting in ("chunk_store_listen", "zonal_cache_listen", "distribution_listen", "region", "zonal_upstreams",
                    "node_upstreams"):
        for address in config.parse_list(config.get(setting)):
            host = address.rpartition(":")[0].strip("[]")
            if host and host not in ("0.0.0.0", "::", "*"):
                hosts.append(host)
    return list(dict.fromkeys(hosts))


def _has_sans(path: pathlib.Path, hosts: list[str]) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    have = {str(v) for v in san.get_values_for_type(x509.IPAddress)} | set(san.get_values_for_type(x509.DNSName))
    return all(str(ipaddress.ip_address(h)) in have if _is_ip(h) else h in have for h in hosts)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def ensure(directory: pathlib.Path | None = None, log=lambda _: None,  # type: ignore[no-untyped-def]
           extra_hosts: tuple[str, ...] = ()) -> pathlib.Path:
    """The local stack's CA and one certificate per identity, made where missing (or not naming every
    address the stack listens on, and `extra_hosts`: e.g. a benchmark's emulated link, which its clients
    dial). Idempotent; the CA is kept once made."""
    directory = directory or tls.tls_dir()
    if (directory / "ca.crt").exists() and (directory / "ca.key").exists():
        ca, fresh = load_ca(directory), False
    else:
        ca, fresh = make_ca(directory), True
        log(f"  made a CA in {directory}")
    hosts = list(dict.fromkeys([*stack_hosts(), *extra_hosts]))
    for name, roles in IDENTITIES.items():
        if fresh or not ((directory / f"{name}.key").exists() and _has_sans(directory / f"{name}.crt", hosts)):
            issue(ca, directory, name, roles, hosts=hosts)
    return directory
