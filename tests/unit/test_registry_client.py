"""The registry client's own parts, without a registry: references, Docker's config.json, the challenge,
platform choice in an image index, and the regional names that keep a name's OCI tag in step."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from chunk_store.distribution.blobs import Distribution, MemoryBlobIndex, TaggedNames
from imagestream.digests import Digest, compress
from imagestream.errors import BadImage, FailedPrecondition
from imagestream.names import MemoryNames
from imagestream.oci import MEDIA_OCI_MANIFEST, BlobRecord
from imagestream.store import MemoryStore
from imagestream.v1 import images_pb2
from imagestream.ingest.registry import (Reference, RegistryError, credentials, looks_like_reference, parse_challenge,
                                      parse_reference)
from imagestream.ingest.source import _pick_manifest


def test_references() -> None:
    assert parse_reference("reg.example:5000/team/app:1.0") == Reference("reg.example:5000", "team/app", "1.0")
    digest = "sha256:" + "a" * 64
    assert parse_reference(f"docker://localhost/app@{digest}") == Reference("localhost", "app", "", digest)
    assert parse_reference("docker.io/debian").repository == "library/debian"
    assert parse_reference("reg.example/app").reference == "latest"
    assert looks_like_reference("127.0.0.1:5000/app") and not looks_like_reference("images/app.tar")
    for bad in ("reg.example/App", "reg.example/app:bad tag", "reg.example/app@sha256:12", "noslash"):
        with pytest.raises(BadImage):
            parse_reference(bad)


def test_credentials_from_docker_config(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "config.json"
    assert credentials("reg.example", path) is None  # no file: anonymous
    auth = base64.b64encode(b"alice:pa:ss").decode()
    path.write_text(json.dumps({"auths": {"https://reg.example:5000/v1/": {"auth": auth},
                                          "https://index.docker.io/v1/": {"username": "bob", "password": "pw"}}}))
    assert credentials("reg.example:5000", path) == ("alice", "pa:ss")
    assert credentials("docker.io", path) == ("bob", "pw")
    assert credentials("other.example", path) is None
    path.write_text(json.dumps({"auths": {"reg.example": {"auth": "%%%"}}}))
    with pytest.raises(RegistryError, match="not base64"):
        credentials("reg.example", path)
    path.write_text("{nope")
    with pytest.raises(RegistryError, match="not valid JSON"):
        credentials("reg.example", path)


def test_challenges() -> None:
    scheme, params = parse_challenge('Bearer realm="https://auth.example/token",service="reg",'
                                     'scope="repository:team/app:pull"')
    assert scheme == "bearer" and params == {"realm": "https://auth.example/token", "service": "reg",
                                             "scope": "repository:team/app:pull"}
    assert parse_challenge('Basic realm="x"') == ("basic", {"realm": "x"})


def test_platform_choice() -> None:
    index = {"manifests": [{"digest": "a", "platform": {"os": "linux", "architecture": "amd64"}},
                           {"digest": "b", "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
                           {"digest": "c", "platform": {"os": "unknown", "architecture": "unknown"}}]}
    assert _pick_manifest(index, "index", "linux/amd64")["digest"] == "a"
    assert _pick_manifest(index, "index", "linux/arm64")["digest"] == "b"
    assert _pick_manifest(index, "index", "linux/arm64/v8")["digest"] == "b"
    with pytest.raises(BadImage, match=r"no linux/arm64/v7 manifest \(the index has linux/amd64, linux/arm64/v8"):
        _pick_manifest(index, "index", "linux/arm64/v7")
    with pytest.raises(BadImage, match="want OS/ARCH"):
        _pick_manifest(index, "index", "amd64")
    assert _pick_manifest({"manifests": [{"digest": "only"}]}, "index", "linux/riscv64")["digest"] == "only"


async def test_a_names_tag_comes_and_goes_with_it() -> None:
    dist = Distribution(MemoryStore(), MemoryBlobIndex())
    names = TaggedNames(MemoryNames(), dist)
    config = b'{"rootfs": {"diff_ids": []}}'
    await dist.store.put(Digest.of(config), compress(config))
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    await dist.put_blob(BlobRecord(config_digest, len(config), "c", [Digest.of(config)]))
    manifest = json.dumps({"config": {"digest": config_digest}, "layers": []}).encode()
    digest = await dist.put_manifest("team/app", "", MEDIA_OCI_MANIFEST, manifest)
    assert await dist.index.get_tag("team/app", "v1") is None  # stored untagged
    with pytest.raises(FailedPrecondition, match="is not stored"):
        await names.publish(images_pb2.Image(name="team/app:v1", manifest_digest="sha256:" + "0" * 64))
    await names.publish(images_pb2.Image(name="team/app:v1", manifest_digest=digest))
    assert await dist.index.get_tag("team/app", "v1") == digest
    assert await names.delete("team/app:v1")
    assert await dist.index.get_tag("team/app", "v1") is None


async def test_a_mirrored_manifest_is_stored_without_its_layers_and_small_blobs_in_pieces() -> None:
    from imagestream.errors import InvalidArgument
    from imagestream.oci import PIECE_SIZE

    dist = Distribution(MemoryStore(), MemoryBlobIndex())
    layer = "sha256:" + "c" * 64
    manifest = json.dumps({"schemaVersion": 2, "mediaType": MEDIA_OCI_MANIFEST,
                           "config": {"digest": "sha256:" + "b" * 64, "size": 2},
                           "layers": [{"digest": layer, "size": 10}]}).encode()
    with pytest.raises(FailedPrecondition):  # a push's manifest needs its blobs stored
        await dist.put_manifest("hub/app", "", MEDIA_OCI_MANIFEST, manifest)
    digest = await dist.put_proxied_manifest(MEDIA_OCI_MANIFEST, manifest)  # a mirror's: its layers are proxied
    assert digest == "sha256:" + hashlib.sha256(manifest).hexdigest()
    assert await dist.read_all(await dist.blob(digest)) == manifest
    assert await dist.index.get_blob(layer) is None
    with pytest.raises(InvalidArgument):
        await dist.put_proxied_manifest("application/json", manifest)
    big = bytes(range(256)) * ((PIECE_SIZE + 1000) // 256)
    record = await dist.blob(await dist.put_small_blob("application/octet-stream", big))
    assert len(record.pieces) == 2 and await dist.read_all(record) == big


def test_mirror_names() -> None:
    from chunk_store.mirror import default_prefix, tag_name

    assert default_prefix("Registry.Example:5000") == "registry.example-5000"
    assert tag_name("hub/team/app", "v1") == "hub/team/app:v1"
    assert tag_name("hub/team/app", "sha256:" + "a" * 64) is None  # a digest: nothing to convert
    assert tag_name("hub/Team/app", "v1") is None
