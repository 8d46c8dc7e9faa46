"""Every TCP hop of the stack is mutual TLS, a caller's certificate says what it may do, a tenant reads only
its namespaces, and the node's Unix sockets are the owner's only. On the real stack, which runs with TLS on
as `imagestream stack up` sets it up."""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import os
import pathlib
import ssl
import stat
import subprocess
import sys
import tarfile
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imagestream import config, tls
from imagestream.digests import Digest, compress, decompress_verified
from imagestream.v1 import (admin_pb2, admin_pb2_grpc, chunk_store_pb2, chunk_store_pb2_grpc, distribution_pb2,
                            distribution_pb2_grpc, images_pb2, images_pb2_grpc)
from tests.conftest import run_cli

DENIED = grpc.StatusCode.PERMISSION_DENIED


def _layout(tmp: pathlib.Path, name: str) -> pathlib.Path:
    from imagestream_dev import imagebuild

    layer = tmp / f"{name}.tar"
    with tarfile.open(layer, "w") as tar:
        payload = os.urandom(200_000)  # chunks of its own: no other image shares them
        info = tarfile.TarInfo(f"{name}/file")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    imagebuild.write_oci_layout_from_layers([layer], tmp / name)
    return tmp / name


def _push(tmp: pathlib.Path, name: str) -> images_pb2.Image:
    run_cli("push", "--quiet", str(_layout(tmp, name.replace("/", "-"))), name)
    return _images_stub(_pusher()).ResolveImage(images_pb2.ResolveImageRequest(name=name), timeout=10)


def _cert(identity: str) -> tuple[pathlib.Path, pathlib.Path]:
    return tls.tls_dir() / f"{identity}.crt", tls.tls_dir() / f"{identity}.key"


def _channel(target: str, cert: tuple[pathlib.Path, pathlib.Path] | None, ca: pathlib.Path | None = None,
             plain: bool = False) -> grpc.Channel:
    if plain:
        return grpc.insecure_channel(target)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(ca or tls.ca_path()).read_bytes(),
        private_key=cert[1].read_bytes() if cert else None, certificate_chain=cert[0].read_bytes() if cert else None)
    return grpc.secure_channel(target, credentials)


def _region() -> str:
    return config.get("region")


def _pusher() -> grpc.Channel:
    return _channel(_region(), _cert("pusher"))


def _images_stub(channel: grpc.Channel) -> images_pb2_grpc.ImagesStub:
    return images_pb2_grpc.ImagesStub(channel)


def _code(call) -> grpc.StatusCode | None:  # type: ignore[no-untyped-def]
    """The status a call fails with (None if it succeeds)."""
    try:
        call()
    except grpc.RpcError as e:
        _code.details = e.details()  # type: ignore[attr-defined]
        return e.code()
    return None


@pytest.fixture(scope="module")
def pushed(stack, tmp_path_factory):  # type: ignore[no-untyped-def]
    return _push(tmp_path_factory.mktemp("auth"), "auth/app")


@pytest.fixture(scope="module")
def strangers(stack, tmp_path_factory):  # type: ignore[no-untyped-def]
    """Certificates the stack did not hand out: one from another CA (with the pusher role), one from the
    stack's CA with no role, and tenants' ones."""
    from imagestream_dev.stack import certs

    d = tmp_path_factory.mktemp("strangers")
    rogue = certs.make_ca(d / "rogue", name="another CA")
    certs.issue(rogue, d, "intruder", ["pusher"])
    ca = certs.load_ca(tls.tls_dir())
    certs.issue(ca, d, "nobody", [])
    certs.issue(ca, d, "acme-node", ["node"], tenant="acme")
    certs.issue(ca, d, "acme-pusher", ["pusher"], tenant="acme")
    return {name: (d / f"{name}.crt", d / f"{name}.key") for name in ("intruder", "nobody", "acme-node", "acme-pusher")}


def _attempts(image: images_pb2.Image):  # type: ignore[no-untyped-def]
    """(what, call on a channel) for reading, publishing and deleting on the regional store."""
    stolen = images_pb2.Image()
    stolen.CopyFrom(image)
    stolen.name = "auth/stolen"
    return [
        ("list", lambda ch: _images_stub(ch).ListImages(images_pb2.ListImagesRequest(), timeout=5)),
        ("resolve", lambda ch: _images_stub(ch).ResolveImage(images_pb2.ResolveImageRequest(name=image.name),
                                                             timeout=5)),
        ("read index", lambda ch: chunk_store_pb2_grpc.ChunkStoreStub(ch).GetChunk(
            chunk_store_pb2.GetChunkRequest(digest=image.index), timeout=5)),
        ("publish", lambda ch: _images_stub(ch).PublishImage(images_pb2.PublishImageRequest(image=stolen),
                                                             timeout=5)),
        ("delete", lambda ch: _images_stub(ch).DeleteImage(images_pb2.DeleteImageRequest(name=image.name),
                                                           timeout=5)),
    ]


@pytest.mark.parametrize("tier", ["chunk_store", "zonal_cache"])
@pytest.mark.parametrize("who", ["plain", "tls without a certificate", "certificate of another CA"])
def test_an_unauthenticated_caller_can_neither_read_nor_publish_nor_delete(stack, pushed, strangers, tier,
                                                                           who) -> None:  # type: ignore[no-untyped-def]
    target = config.get(f"{tier}_listen")
    channel = {"plain": lambda: _channel(target, None, plain=True),
               "tls without a certificate": lambda: _channel(target, None),
               "certificate of another CA": lambda: _channel(target, strangers["intruder"])}[who]()
    with channel:
        for what, call in _attempts(pushed):
            code = _code(lambda: call(channel))
            assert code == grpc.StatusCode.UNAVAILABLE, f"{who} could {what} on {tier}: {code}"
    # nothing happened: the name is still there, unchanged, and no other was published
    names = _images_stub(_pusher()).ListImages(images_pb2.ListImagesRequest(), timeout=10).images
    assert [i.index.hash for i in names if i.name == "auth/app"] == [pushed.index.hash]
    assert "auth/stolen" not in [i.name for i in names]


def test_a_refused_handshake_names_the_certificate_it_presented(stack, strangers, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """From the client's side a refused TLS handshake is a closed socket: our client says what it presented."""
    from imagestream.errors import Unavailable
    from imagestream.rpc.client import GrpcImageNames

    cert, key = strangers["intruder"]
    monkeypatch.setenv("IMAGESTREAM_TLS_CERT", str(cert))
    monkeypatch.setenv("IMAGESTREAM_TLS_KEY", str(key))

    async def listing() -> None:
        names = GrpcImageNames(_region(), timeout_s=5)
        try:
            await names.list()
        finally:
            await names.close()

    with pytest.raises(Unavailable, match=f"does it trust our certificate {cert}"):
        asyncio.run(listing())


@pytest.mark.parametrize("identity", ["node-cache", "zonal-cache"])
def test_nodes_and_zonal_caches_read_but_cannot_write(stack, pushed, identity) -> None:  # type: ignore[no-untyped-def]
    with _channel(_region(), _cert(identity)) as ch:
        images = _images_stub(ch)
        assert images.ResolveImage(images_pb2.ResolveImageRequest(name="auth/app"), timeout=10).index == pushed.index
        chunk = chunk_store_pb2_grpc.ChunkStoreStub(ch).GetChunk(chunk_store_pb2.GetChunkRequest(digest=pushed.index),
                                                                 timeout=10)
        decompress_verified(Digest.from_proto(pushed.index), chunk.compressed)  # the index's own bytes
        stolen = images_pb2.Image()
        stolen.CopyFrom(pushed)
        stolen.name = "auth/stolen"
        raw = b"not allowed " * 100
        writes = {
            "publish": lambda: images.PublishImage(images_pb2.PublishImageRequest(image=stolen), timeout=10),
            "delete": lambda: images.DeleteImage(images_pb2.DeleteImageRequest(name="auth/app"), timeout=10),
            "set profile": lambda: images.SetProfile(images_pb2.SetProfileRequest(
                name="auth/app", index=pushed.index, profile=pushed.index), timeout=10),
            "put chunks": lambda: chunk_store_pb2_grpc.ChunkStoreStub(ch).PutChunks(iter([
                chunk_store_pb2.PutChunksRequest(chunks=[chunk_store_pb2.Chunk(
                    digest=Digest.of(raw).to_proto(), compressed=compress(raw))])]), timeout=10),
            "put manifest": lambda: distribution_pb2_grpc.DistributionStub(ch).PutManifest(
                distribution_pb2.PutManifestRequest(repository="auth/app", reference="evil"), timeout=10),
            "scrub": lambda: admin_pb2_grpc.RegionalAdminStub(ch).Scrub(admin_pb2.ScrubRequest(limit=1), timeout=10),
        }
        for what, call in writes.items():
            assert _code(call) == DENIED, what
            assert "needs the role" in _code.details and "pusher" in _code.details, _code.details  # type: ignore[attr-defined]
    assert _images_stub(_pusher()).ResolveImage(images_pb2.ResolveImageRequest(name="auth/app"),
                                                timeout=10).index == pushed.index


def test_a_certificate_without_a_role_gets_health_and_nothing_else(stack, pushed, strangers) -> None:  # type: ignore[no-untyped-def]
    with _channel(_region(), strangers["nobody"]) as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert _code(lambda: _images_stub(ch).ListImages(images_pb2.ListImagesRequest(), timeout=10)) == DENIED
        assert "'nobody' (roles: none)" in _code.details  # type: ignore[attr-defined]


def test_a_pusher_publishes_and_deletes(stack, pushed) -> None:  # type: ignore[no-untyped-def]
    copy = images_pb2.Image()
    copy.CopyFrom(pushed)
    copy.name = "auth/copy"
    with _pusher() as ch:
        images = _images_stub(ch)
        assert images.PublishImage(images_pb2.PublishImageRequest(image=copy), timeout=30).index == pushed.index
        assert images.DeleteImage(images_pb2.DeleteImageRequest(name="auth/copy"), timeout=10).deleted
        assert _code(lambda: images.ResolveImage(images_pb2.ResolveImageRequest(name="auth/copy"),
                                                 timeout=10)) == grpc.StatusCode.NOT_FOUND


def test_the_cli_says_in_one_line_what_is_wrong_with_its_certificate(stack, pushed, strangers) -> None:  # type: ignore[no-untyped-def]
    cert, key = strangers["nobody"]
    result = run_cli("images", check=False, env={"IMAGESTREAM_TLS_CERT": str(cert), "IMAGESTREAM_TLS_KEY": str(key)})
    assert result.returncode != 0
    assert "PERMISSION_DENIED" in result.stderr and "'nobody'" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("images", check=False, env={"IMAGESTREAM_TLS_CERT": "/nonexistent.crt"})
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "cannot read the certificate /nonexistent.crt" in result.stderr, result.stderr


# -- the OCI Distribution endpoint (HTTPS) ------------------------------------------------------------------

def _https_get(path: str, cert: tuple[pathlib.Path, pathlib.Path] | None, ca: pathlib.Path | None = None,
               listen: str | None = None, plain: bool = False) -> tuple[int, bytes]:
    """GET from the OCI endpoint, presenting `cert` (none: no client certificate; `plain`: no TLS at all)."""
    host, _, port = (listen or config.get("distribution_listen")).rpartition(":")
    if plain:
        conn: http.client.HTTPConnection = http.client.HTTPConnection(host, int(port), timeout=10)
    else:
        ctx = ssl.create_default_context(cafile=str(ca or tls.ca_path()))
        if cert:
            ctx.load_cert_chain(str(cert[0]), str(cert[1]))
        conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=10)
    try:
        conn.request("GET", path)
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


def test_the_oci_endpoint_serves_only_callers_with_a_certificate_of_the_ca(stack, pushed, strangers) -> None:  # type: ignore[no-untyped-def]
    path = "/v2/auth/app/manifests/latest"
    status, body = _https_get(path, _cert("node-cache"))
    assert status == 200 and json.loads(body)["layers"]
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
        _https_get(path, None, plain=True)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _https_get(path, None)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _https_get(path, strangers["intruder"])


# -- tenants: a chunk store with a read policy -----------------------------------------------------------

@pytest.fixture(scope="module")
def tenant_store(stack, pushed, tmp_path_factory):  # type: ignore[no-untyped-def]
    """A second regional chunk store on the same Cassandra with a tenant policy: acme reads acme/ only."""
    from imagestream.rpc import healthcheck

    tmp = tmp_path_factory.mktemp("tenants")
    acme, globex = _push(tmp, "acme/app"), _push(tmp, "globex/app")
    policy = tmp / "tenants"
    policy.write_text("# tenant  prefixes\nacme acme/ shared/\n")
    base = int(os.environ.get("IMAGESTREAM_TEST_PORT_BASE", "20100"))
    grpc_at, http_at = f"127.0.0.1:{base + 16}", f"127.0.0.1:{base + 17}"
    env = {**os.environ, "IMAGESTREAM_CHUNK_STORE_LISTEN": grpc_at, "IMAGESTREAM_DISTRIBUTION_LISTEN": http_at,
           "IMAGESTREAM_CHUNK_STORE_METRICS": f"127.0.0.1:{base + 18}", "IMAGESTREAM_TENANTS": str(policy),
           "OTEL_TRACES_EXPORTER": "none"}
    with open(tmp / "chunk_store.log", "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "chunk_store"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while healthcheck.status(grpc_at, timeout_s=1) != "SERVING":
            assert process.poll() is None and time.monotonic() < deadline, (tmp / "chunk_store.log").read_text()
            time.sleep(0.5)
        yield {"grpc": grpc_at, "http": http_at, "acme": acme, "globex": globex}
    finally:
        process.terminate()
        process.wait(30)


def _first_chunk(image: images_pb2.Image) -> Digest:
    from imagestream.index import load_index
    from imagestream.rpc.client import GrpcChunkStore

    async def first() -> Digest:
        store = GrpcChunkStore(_region())
        try:
            return (await load_index(store, Digest.from_proto(image.index))).chunks()[0]
        finally:
            await store.close()

    return asyncio.run(first())


def test_a_tenant_reads_only_its_namespaces(tenant_store, strangers) -> None:  # type: ignore[no-untyped-def]
    acme, globex = tenant_store["acme"], tenant_store["globex"]
    with _channel(tenant_store["grpc"], strangers["acme-node"]) as ch:
        images, chunks = _images_stub(ch), chunk_store_pb2_grpc.ChunkStoreStub(ch)
        listed = [i.name for i in images.ListImages(images_pb2.ListImagesRequest(), timeout=10).images]
        assert "acme/app" in listed and all(n.startswith(("acme/", "shared/")) for n in listed), listed
        assert images.ResolveImage(images_pb2.ResolveImageRequest(name="acme/app"), timeout=10).index == acme.index
        assert _code(lambda: images.ResolveImage(images_pb2.ResolveImageRequest(name="globex/app"), timeout=10)) == DENIED
        assert "tenant 'acme' may not read 'globex/app'" in _code.details  # type: ignore[attr-defined]
        # its own index and chunks read; another namespace's index and chunks do not
        assert chunks.GetChunk(chunk_store_pb2.GetChunkRequest(digest=acme.index), timeout=10).compressed
        own = _first_chunk(acme).to_proto()
        assert [c.digest for c in chunks.GetChunks(chunk_store_pb2.GetChunksRequest(digests=[own]), timeout=10)] == [own]
        assert _code(lambda: chunks.GetChunk(chunk_store_pb2.GetChunkRequest(digest=globex.index), timeout=10)) == DENIED
        theirs = _first_chunk(globex).to_proto()
        assert _code(lambda: list(chunks.GetChunks(chunk_store_pb2.GetChunksRequest(digests=[own, theirs]),
                                                   timeout=10))) == DENIED
        assert "in no image under the tenant's prefixes" in _code.details  # type: ignore[attr-defined]
    # the same store, to a caller of no tenant (a zonal cache): everything
    with _channel(tenant_store["grpc"], _cert("zonal-cache")) as ch:
        assert chunk_store_pb2_grpc.ChunkStoreStub(ch).GetChunk(
            chunk_store_pb2.GetChunkRequest(digest=globex.index), timeout=10).compressed
    # a tenant's pusher neither deletes nor publishes outside its prefixes
    with _channel(tenant_store["grpc"], strangers["acme-pusher"]) as ch:
        assert _code(lambda: _images_stub(ch).DeleteImage(images_pb2.DeleteImageRequest(name="globex/app"),
                                                          timeout=10)) == DENIED
    assert _images_stub(_pusher()).ResolveImage(images_pb2.ResolveImageRequest(name="globex/app"),
                                                timeout=10).index == globex.index


def test_a_tenant_pulls_only_its_namespaces_over_the_oci_endpoint(tenant_store, strangers) -> None:  # type: ignore[no-untyped-def]
    at, who = tenant_store["http"], strangers["acme-node"]
    status, body = _https_get("/v2/acme/app/manifests/latest", who, listen=at)
    assert status == 200
    own_layer = json.loads(body)["layers"][0]["digest"]
    assert _https_get(f"/v2/acme/app/blobs/{own_layer}", who, listen=at)[0] == 200
    status, body = _https_get("/v2/globex/app/manifests/latest", who, listen=at)
    assert status == 403 and b"DENIED" in body
    their_manifest = json.loads(_https_get("/v2/globex/app/manifests/latest", _cert("node-cache"), listen=at)[1])
    their_layer = their_manifest["layers"][0]["digest"]
    # asking for another namespace's blob through its own repository's path does not work either
    status, body = _https_get(f"/v2/acme/app/blobs/{their_layer}", who, listen=at)
    assert status == 403 and b"in no image under the tenant's prefixes" in body


# -- Unix sockets --------------------------------------------------------------------------------------------

def test_the_nodes_unix_sockets_are_the_owners_only(stack) -> None:  # type: ignore[no-untyped-def]
    from imagestream_dev.stack import local

    sockets = [config.node_cache_socket(), config.snapshotter_socket()]
    if any(p.name == "fuse_client" for p in local.processes()):
        sockets.append(config.fuse_socket())
    for path in sockets:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600, f"{path}: {oct(stat.S_IMODE(st.st_mode))}"


def test_a_long_lived_client_presents_its_renewed_certificate_without_a_restart(stack, pushed, strangers, tmp_path,
                                                                                monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """cert-manager renews a certificate by rewriting its Secret's files. A client that lives for days (the
    zonal cache, the node cache) takes the new files up on its next call; a renewal caught between its
    two files (the certificate new, the key still old) is not taken up, and the old channel goes on."""
    import shutil

    from imagestream.errors import PermissionDenied
    from imagestream.rpc.client import GrpcImageNames

    cert, key = tmp_path / "client.crt", tmp_path / "client.key"
    shutil.copy(strangers["nobody"][0], cert)
    shutil.copy(strangers["nobody"][1], key)
    monkeypatch.setenv("IMAGESTREAM_TLS_CERT", str(cert))
    monkeypatch.setenv("IMAGESTREAM_TLS_KEY", str(key))
    monkeypatch.setattr(tls, "RENEWAL_CHECK_S", 0.0)

    async def renewals() -> None:
        names = GrpcImageNames(_region(), timeout_s=10)
        try:
            with pytest.raises(PermissionDenied, match="'nobody'"):
                await names.list()
            pusher_cert, pusher_key = _cert("pusher")
            shutil.copy(pusher_cert, cert)  # half a renewal: the key does not match yet
            with pytest.raises(PermissionDenied, match="'nobody'"):
                await names.list()
            shutil.copy(pusher_key, key)  # the renewal is whole: the pusher's identity from now on
            assert "auth/app" in [i.name for i in await names.list()]
        finally:
            await names.close()

    asyncio.run(renewals())


def _certificate_serial(pem_or_der: bytes) -> int:
    from cryptography import x509

    if pem_or_der.startswith(b"-----"):
        return x509.load_pem_x509_certificate(pem_or_der).serial_number
    return x509.load_der_x509_certificate(pem_or_der).serial_number


def test_the_oci_endpoint_presents_its_renewed_certificate_without_a_restart(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The regional OCI endpoint (aiohttp) loads renewed files into its TLS context: the next handshake
    shows the new certificate, with no restart."""
    import socket

    from chunk_store.distribution import http as oci_http
    from imagestream_dev.stack import certs

    monkeypatch.setenv("IMAGESTREAM_HOME", str(tmp_path))
    for setting in ("DIR", "CA", "CERT", "KEY"):
        monkeypatch.delenv(f"IMAGESTREAM_TLS_{setting}", raising=False)
    directory = certs.ensure()
    monkeypatch.setattr(tls, "_identity", "chunk-store")
    monkeypatch.setattr(tls, "RENEWAL_CHECK_S", 0.05)
    port = 0  # the one the kernel gives: the stack's ports are taken

    def served_serial() -> int:
        context = tls.client_ssl_context()
        context.check_hostname = False
        with context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5)) as s:
            return _certificate_serial(s.getpeercert(binary_form=True))

    async def renewal() -> None:
        nonlocal port
        runner = await oci_http.start(None, "127.0.0.1:0")  # type: ignore[arg-type]
        port = runner.addresses[0][1]
        try:
            before = await asyncio.to_thread(served_serial)
            assert before == _certificate_serial((directory / "chunk-store.crt").read_bytes())
            certs.issue(certs.load_ca(directory), directory, "chunk-store", certs.IDENTITIES["chunk-store"])
            renewed = _certificate_serial((directory / "chunk-store.crt").read_bytes())
            deadline = time.monotonic() + 10
            while (now := await asyncio.to_thread(served_serial)) == before and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert now == renewed
        finally:
            await runner.cleanup()

    asyncio.run(renewal())
