"""`imagestream push REF NAME` from real registries (docker-registry, distribution 2.8): TLS with a test CA
and htpasswd auth, plain HTTP, an image index with two platforms, Docker schema 2 and OCI manifests, gzip,
zstd and uncompressed layers; and every way it can go wrong ends in one line and nothing published."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import urllib.error

import pytest

from tests.conftest import run_cli
from tests.registry.conftest import (DOCKER_GZIP_LAYER, PASSWORD, USER, CuttingProxy, docker_config, layer,
                                     needs_registry, registry_ports, upload_image, upload_multiplatform)

pytestmark = [needs_registry]

BIG = os.urandom(3 << 20)  # incompressible: the layer blob is about this size whatever its compression


async def _read(name: str, path: str) -> bytes:
    """A file of a published image, read from the regional store through its index."""
    from imagestream import config
    from imagestream.digests import Digest, decompress_verified
    from imagestream.index import ROOT_INODE, load_index
    from imagestream.rpc.client import GrpcChunkStore, GrpcImageNames

    names, store = GrpcImageNames(config.get("region")), GrpcChunkStore(config.get("region"))
    try:
        image = await names.resolve(name)
        index = await load_index(store, Digest.from_proto(image.index))
        ino = ROOT_INODE
        for part in path.strip("/").split("/"):
            ino = index.lookup(ino, part.encode())
            assert ino is not None, f"{path} is not in {name}"
        out = b""
        for ext in index.inode(ino).extents:
            digest = Digest.from_proto(ext.chunk)
            data = decompress_verified(digest, await store.get(digest))
            out += data[ext.chunk_offset : ext.chunk_offset + ext.length]
        return out
    finally:
        await names.close()
        await store.close()


def read(name: str, path: str) -> bytes:
    return asyncio.run(_read(name, path))


def published(name: str) -> bool:
    return name in run_cli("images").stdout.split()


def regional_manifest(name: str) -> dict | None:
    """The manifest the regional OCI endpoint serves for NAME (repository:tag), None if it has no such tag."""
    from imagestream.oci import repository_and_tag

    repository, tag = repository_and_tag(name)
    from imagestream import tls

    where = f"{os.environ['IMAGESTREAM_DISTRIBUTION_LISTEN']}/v2/{repository}/manifests/{tag}"
    try:
        with tls.urlopen(where) as r:  # https with this test's certificate (http with IMAGESTREAM_TLS=off)
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        assert e.code == 404
        return None


def one_line_error(result) -> str:  # type: ignore[no-untyped-def]
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imagestream: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def secure_image(registries, tmp_path_factory):  # type: ignore[no-untyped-def]
    """team/app:multi (an image index, amd64 + arm64) on the TLS registry, and a DOCKER_CONFIG logged in to it."""
    registry = registries["secure"]
    with registry.client((USER, PASSWORD)) as client:
        upload_multiplatform(client, "team/app", "multi", BIG)
    good = docker_config(tmp_path_factory.mktemp("docker-good"), registry.address, USER, PASSWORD)
    return {"ref": f"{registry.address}/team/app:multi", "ca": str(registries["ca"]), "docker_config": str(good),
            "registry": registry}


def test_an_image_index_is_pushed_by_reference_with_the_right_platform(stack, secure_image) -> None:  # type: ignore[no-untyped-def]
    from imagestream.ingest.source import node_platform

    env = {"DOCKER_CONFIG": secure_image["docker_config"]}
    arm = run_cli("push", "-q", "--ca-file", secure_image["ca"], "--platform", "linux/arm64",
                  secure_image["ref"], "registry/app:arm", env=env)
    assert read("registry/app:arm", "/etc/platform") == b"arm64\n"
    assert read("registry/app:arm", "/data/big") == BIG
    assert read("registry/app:arm", "/usr/share/doc/readme") == b"shared by both platforms\n"
    assert "3 blobs stored, 0 already stored" in arm.stdout, arm.stdout

    # no --platform: this node's; the zstd layer both platforms share is stored once
    amd = run_cli("push", "-q", "--ca-file", secure_image["ca"], secure_image["ref"], "registry/app:node", env=env)
    expected = {"linux/amd64": b"amd64\n", "linux/arm64": b"arm64\n"}.get(node_platform())
    if expected is None:
        pytest.skip(f"this node is {node_platform()}; the test image has amd64 and arm64")
    assert read("registry/app:node", "/etc/platform") == expected
    if expected == b"amd64\n":
        assert "2 blobs stored, 1 already stored" in amd.stdout, amd.stdout

    # the regional OCI endpoint serves the platform's manifest, with the registry's own layer blobs
    with secure_image["registry"].client((USER, PASSWORD)) as client:
        index = client.get("/v2/team/app/manifests/multi",
                           headers={"Accept": "application/vnd.oci.image.index.v1+json"}).json()
        arm_manifest = client.get(f"/v2/team/app/manifests/{index['manifests'][1]['digest']}",
                                  headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).json()
        zstd_layer = client.get(f"/v2/team/app/blobs/{arm_manifest['layers'][1]['digest']}").content
    served = regional_manifest("registry/app:arm")
    assert served is not None
    assert [x["digest"] for x in served["layers"]] == [x["digest"] for x in arm_manifest["layers"]]
    from imagestream import tls

    where = f"{os.environ['IMAGESTREAM_DISTRIBUTION_LISTEN']}/v2/registry/app/blobs/{arm_manifest['layers'][1]['digest']}"
    with tls.urlopen(where) as r:
        assert r.read() == zstd_layer


def test_a_docker_schema2_image_by_digest_over_plain_http(stack, registries) -> None:  # type: ignore[no-untyped-def]
    registry = registries["plain"]
    blob, diff_id = layer({"etc/hostname": b"docker-v2\n", "bin/tool": os.urandom(200_000)}, "gzip")
    with registry.client(None) as client:
        descriptor = upload_image(client, "legacy/tool", [(blob, diff_id, DOCKER_GZIP_LAYER)], "amd64", docker=True,
                                  tag="v2")
    ref = f"{registry.address}/legacy/tool@{descriptor['digest']}"
    # without --plain-http the client speaks TLS to a plain-HTTP registry: one line, naming the flag
    line = one_line_error(run_cli("push", "-q", ref, "registry/tool:v2", check=False))
    assert "--plain-http" in line
    out = run_cli("push", "-q", "--plain-http", ref, "registry/tool:v2").stdout
    assert read("registry/tool:v2", "/etc/hostname") == b"docker-v2\n"
    image = json.loads(json.dumps(regional_manifest("registry/tool:v2")))
    assert image["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert "pushed registry/tool:v2" in out


@pytest.mark.parametrize("case", ["wrong credentials", "no credentials", "missing tag", "platform not in the index",
                                  "unknown CA"])
def test_bad_requests_end_in_one_line_and_publish_nothing(stack, secure_image, tmp_path, case) -> None:  # type: ignore[no-untyped-def]
    registry = secure_image["registry"]
    args = ["--ca-file", secure_image["ca"]]
    env = {"DOCKER_CONFIG": secure_image["docker_config"]}
    ref, expect = secure_image["ref"], ""
    if case == "wrong credentials":
        env["DOCKER_CONFIG"] = str(docker_config(tmp_path / "bad", registry.address, USER, "not-the-password"))
        expect = "unauthorized: the registry refused the credentials"
    elif case == "no credentials":
        env["DOCKER_CONFIG"] = str(tmp_path / "nothing")
        expect = "asks for a login"
    elif case == "missing tag":
        ref, expect = f"{registry.address}/team/app:no-such-tag", "no such manifest"
    elif case == "platform not in the index":
        args += ["--platform", "linux/s390x"]
        expect = "no linux/s390x manifest (the index has linux/amd64, linux/arm64/v8"
    else:
        args, expect = [], "--ca-file"
    name = f"registry/bad:{case.replace(' ', '-')}"
    line = one_line_error(run_cli("push", "-q", *args, ref, name, env=env, check=False))
    assert expect in line, line
    assert not published(name)
    assert regional_manifest(name) is None


def test_an_upstream_that_dies_mid_layer_publishes_nothing(stack, registries, tmp_path) -> None:  # type: ignore[no-untyped-def]
    registry = registries["plain"]
    with registry.client(None) as client:
        upload_multiplatform(client, "team/cut", "multi", BIG)
    # manifests and config pass; a 3 MiB layer does not
    proxy = CuttingProxy(registry.address, limit=1 << 20, port=registry_ports()[0] + 4)
    try:
        tmpdir = tmp_path / "tmp"
        tmpdir.mkdir()
        result = run_cli("push", "-q", "--plain-http", f"{proxy.address}/team/cut:multi", "registry/cut:multi",
                         env={"TMPDIR": str(tmpdir)}, check=False)
    finally:
        proxy.close()
    line = one_line_error(result)
    assert proxy.cut >= 1
    assert "team/cut: blob sha256:" in line and ("connection lost after" in line or "ended after" in line), line
    assert not published("registry/cut:multi")
    assert regional_manifest("registry/cut:multi") is None
    assert not list(tmpdir.iterdir())  # the spool, with the part of the layer it had, is gone


def test_bearer_tokens_from_the_registrys_token_service(stack, registries, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The registry answers 401 with a Bearer challenge; the client asks the realm it names for a token,
    with the credentials of Docker's config.json, and the registry checks that token (JWT, RS256)."""
    registry, tokens = registries["token"], registries["token_service"]
    with registry.client(None) as client:
        client.headers["Authorization"] = "Bearer " + tokens.token("imagestream-test-registry",
                                                                   ["repository:team/tokens:pull,push"])
        upload_multiplatform(client, "team/tokens", "v1", BIG[: 1 << 20])
    ref, ca = f"{registry.address}/team/tokens:v1", str(registries["ca"])
    issued = tokens.issued
    bad = docker_config(tmp_path / "bad", registry.address, USER, "not-the-password")
    line = one_line_error(run_cli("push", "-q", "--ca-file", ca, ref, "registry/tokens:v1",
                                  env={"DOCKER_CONFIG": str(bad)}, check=False))
    assert "token service" in line and "refused" in line, line
    assert tokens.issued == issued and not published("registry/tokens:v1")

    good = docker_config(tmp_path / "good", registry.address, USER, PASSWORD)
    run_cli("push", "-q", "--ca-file", ca, "--platform", "linux/arm64", ref, "registry/tokens:v1",
            env={"DOCKER_CONFIG": str(good)})
    assert tokens.issued > issued
    assert read("registry/tokens:v1", "/etc/platform") == b"arm64\n"
