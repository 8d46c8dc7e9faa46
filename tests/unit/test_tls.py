"""The pieces of authentication on their own: certificates and who they name, the permission table, the tenant
policy file, and the mode of a Unix socket from the moment it exists."""

from __future__ import annotations

import grp
import os
import pathlib
import stat

import grpc
import pytest

from imagestream import tls
from imagestream.rpc.server import ANY, PERMISSIONS, add_port
from imagestream_dev.stack import certs


def test_the_local_stacks_certificates_carry_each_processs_roles(tmp_path: pathlib.Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("IMAGESTREAM_HOME", str(tmp_path))
    directory = certs.ensure()
    assert directory == tmp_path / "tls"
    assert stat.S_IMODE(os.stat(directory / "ca.key").st_mode) == 0o600
    for identity, roles in certs.IDENTITIES.items():
        caller = tls.caller_from_pem((directory / f"{identity}.crt").read_bytes())
        assert caller.name == identity and caller.roles == frozenset(roles) and caller.tenant is None
        assert stat.S_IMODE(os.stat(directory / f"{identity}.key").st_mode) == 0o600
    before = (directory / "pusher.crt").read_bytes()
    certs.ensure()  # idempotent: nothing is made again
    assert (directory / "pusher.crt").read_bytes() == before
    monkeypatch.setenv("IMAGESTREAM_CHUNK_STORE_LISTEN", "127.0.0.9:50061")  # a new address: certificates again
    certs.ensure()
    assert (directory / "pusher.crt").read_bytes() != before
    ca = certs.load_ca(directory)
    tenant = tls.caller_from_pem(certs.issue(ca, tmp_path, "t", ["node"], tenant="acme").read_bytes())
    assert tenant.tenant == "acme" and tenant.roles == {"node"}


def test_every_method_of_every_tcp_service_has_its_roles() -> None:
    """A method missing here is refused to everyone: this keeps the table whole as the protos grow."""
    from imagestream.v1 import admin_pb2, chunk_store_pb2, distribution_pb2, images_pb2, mirror_pb2, node_pb2

    for module in (admin_pb2, chunk_store_pb2, distribution_pb2, images_pb2, mirror_pb2, node_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                assert f"/{service.full_name}/{method.name}" in PERMISSIONS, method.full_name
    writes = [m for m, roles in PERMISSIONS.items() if roles is not ANY and "node" not in roles]
    assert "/imagestream.v1.Images/PublishImage" in writes and "/imagestream.v1.Images/DeleteImage" in writes
    assert "/imagestream.v1.Mirrors/AddMirror" in writes and "/imagestream.v1.Mirrors/RemoveMirror" in writes
    assert all("zonal" not in PERMISSIONS[m] for m in writes)


def test_tenant_policy_file_errors_name_the_line(tmp_path: pathlib.Path) -> None:
    from chunk_store.tenancy import PolicyError, load_policy, parse_policy

    assert parse_policy("# who reads what\nacme acme/ shared/  # two\n\nglobex globex/\n") == {
        "acme": ("acme/", "shared/"), "globex": ("globex/",)}
    with pytest.raises(PolicyError, match=r"policy:2: expected 'TENANT PREFIX"):
        parse_policy("acme acme/\nlonely\n", "policy")
    with pytest.raises(PolicyError, match="listed twice"):
        parse_policy("a x/\na y/\n")
    with pytest.raises(PolicyError, match="cannot read it"):
        load_policy(str(tmp_path / "missing"))


@pytest.mark.parametrize("group", ["", "daemon"])
async def test_a_unix_socket_is_owner_only_or_shared_with_its_group(tmp_path: pathlib.Path, monkeypatch,
                                                                    group: str) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("IMAGESTREAM_SOCKET_GROUP", group)
    path = tmp_path / "s.sock"
    path.write_text("stale")  # a stale file from a killed run is replaced
    umask = os.umask(0o022)
    os.umask(umask)
    server = grpc.aio.server()
    add_port(server, "test", f"unix:{path}")
    try:
        await server.start()
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        if group:
            assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == grp.getgrnam(group).gr_gid
        else:
            assert stat.S_IMODE(st.st_mode) == 0o600
        assert os.umask(umask) == umask  # the process's umask is as it was
    finally:
        await server.stop(None)


def test_an_unknown_socket_group_is_one_clear_error(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("IMAGESTREAM_SOCKET_GROUP", "no-such-group-here")
    with pytest.raises(tls.TlsError, match="IMAGESTREAM_SOCKET_GROUP='no-such-group-here': no such group"):
        tls.socket_mode()


async def test_with_tls_off_a_tcp_tier_serves_plain_grpc(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """IMAGESTREAM_TLS=off (a network trusted already): plain gRPC on TCP, with no certificate to check."""
    from imagestream.names import MemoryNames
    from imagestream.rpc.client import GrpcImageNames
    from imagestream.rpc.server import start_server
    from imagestream.store import MemoryStore

    monkeypatch.setenv("IMAGESTREAM_TLS", "off")
    address = f"127.0.0.1:{int(os.environ.get('IMAGESTREAM_TEST_PORT_BASE', '20100')) + 19}"
    server, _ = await start_server("test", [address], MemoryStore(), MemoryNames())
    names = GrpcImageNames(address, timeout_s=5)
    try:
        assert await names.list() == []
    finally:
        await names.close()
        await server.stop(None)
    monkeypatch.setenv("IMAGESTREAM_TLS", "maybe")
    with pytest.raises(tls.TlsError, match="IMAGESTREAM_TLS='maybe': expected 'on' or 'off'"):
        tls.enabled()
