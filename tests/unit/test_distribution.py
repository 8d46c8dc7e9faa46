"""The OCI Distribution read side over memory stores, the streamable-layer annotations, and containerd's
filter syntax as the snapshotter parses it."""

from __future__ import annotations

import hashlib
import json

import pytest

from imagestream.digests import Digest, compress
from chunk_store.distribution.blobs import Distribution, MemoryBlobIndex
from imagestream.oci import MEDIA_LAYER, MEDIA_OCI_CONFIG, MEDIA_OCI_MANIFEST, BlobRecord, repository_and_tag
from imagestream.snapshot_labels import LABEL_INDEX, StreamedLayer, annotate_for_streaming
from imagestream.errors import FailedPrecondition, InvalidArgument
from imagestream.store import MemoryStore


async def stored_blob(dist: Distribution, data: bytes, media_type: str, piece: int = 3) -> dict:
    pieces = []
    for i in range(0, len(data), piece):
        d = Digest.of(data[i : i + piece])
        await dist.store.put(d, compress(data[i : i + piece]))
        pieces.append(d)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    await dist.put_blob(BlobRecord(digest, len(data), media_type, pieces))
    return {"digest": digest, "size": len(data), "mediaType": media_type}


async def test_registry_serves_what_was_stored_and_refuses_what_does_not_add_up() -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from chunk_store.distribution.http import app

    dist = Distribution(MemoryStore(), MemoryBlobIndex())
    config = await stored_blob(dist, b'{"rootfs": {"diff_ids": []}}', MEDIA_OCI_CONFIG)
    layer = await stored_blob(dist, b"layer bytes, in pieces", MEDIA_LAYER["none"])
    manifest = json.dumps({"schemaVersion": 2, "config": config, "layers": [layer]}).encode()
    digest = await dist.put_manifest("team/app", "v1", MEDIA_OCI_MANIFEST, manifest)
    # a blob whose pieces do not make its digest, or a manifest naming a missing blob, is refused
    bad = BlobRecord("sha256:" + "0" * 64, 3, "x", [Digest.of(b"lay")])
    await dist.store.put(Digest.of(b"lay"), compress(b"lay"))
    with pytest.raises(InvalidArgument):
        await dist.put_blob(bad)
    with pytest.raises(FailedPrecondition):
        await dist.put_manifest("team/app", "v2", MEDIA_OCI_MANIFEST,
                                json.dumps({"config": config, "layers": [{"digest": "sha256:" + "1" * 64}]}).encode())

    async with TestClient(TestServer(app(dist))) as client:
        assert (await client.get("/v2/")).headers["Docker-Distribution-API-Version"] == "registry/2.0"
        r = await client.get("/v2/team/app/manifests/v1")
        assert r.status == 200 and await r.read() == manifest and r.headers["Docker-Content-Digest"] == digest
        r = await client.head(f"/v2/team/app/manifests/{digest}")
        assert r.status == 200 and int(r.headers["Content-Length"]) == len(manifest)
        r = await client.get(f"/v2/team/app/blobs/{layer['digest']}")
        assert await r.read() == b"layer bytes, in pieces"
        assert (await client.get("/v2/team/app/manifests/v2")).status == 404
        assert (await client.get("/v2/team/app/blobs/sha256:" + "2" * 64)).status == 404
        r = await client.get("/v2/team/app/blobs/md5:abc")
        assert r.status == 400 and (await r.json())["errors"][0]["code"] == "DIGEST_INVALID"


def test_streaming_annotations_round_trip() -> None:
    index = Digest("ab" * 32, 1234)
    manifest = {"layers": [{"digest": "sha256:" + "1" * 64}, {"digest": "sha256:" + "2" * 64, "annotations": {"keep": "me"}}]}
    out = annotate_for_streaming(manifest, "app:v1", index)
    assert "annotations" not in manifest["layers"][0]  # the source is left alone
    assert out["layers"][1]["annotations"]["keep"] == "me"
    top = StreamedLayer.from_labels(out["layers"][1]["annotations"])
    assert top == StreamedLayer("app:v1", index, 2, 2, "sha256:" + "2" * 64) and top.is_top
    assert not StreamedLayer.from_labels(out["layers"][0]["annotations"]).is_top
    assert StreamedLayer.from_labels({"containerd.io/snapshot.ref": "x"}) is None
    with pytest.raises(InvalidArgument):
        StreamedLayer.from_labels({**out["layers"][0]["annotations"], LABEL_INDEX: "sha256:zz/1"})
    assert repository_and_tag("a/b:c") == ("a/b", "c") and repository_and_tag("a/b") == ("a/b", "latest")


@pytest.mark.parametrize("expr,expected", [
    ('labels."containerd.io/snapshot.ref"==sha256:12.3,parent==""', True),
    ('labels."containerd.io/snapshot.ref"==sha256:999', False),
    ("kind==committed", True), ("kind!=committed", False), ("labels.gc", True), ("labels.none", False),
    ('name~="^a/"', True), ("parent", False),
])
def test_filters(expr: str, expected: bool) -> None:
    from snapshotter.filters import matcher

    fields = {"name": "a/b", "parent": "", "kind": "committed",
              "labels": {"containerd.io/snapshot.ref": "sha256:12.3", "gc": "1"}}
    assert matcher([expr])(fields) is expected
    assert matcher([expr, "kind==committed"])(fields)  # alternatives
