"""The hostile-input campaign on the real stack: every hostile archive pushed with the CLI gets a one-line
error naming the entry (never a traceback), leaves no spool and writes nothing outside; every crafted
index published over the regional store's gRPC API gets INVALID_ARGUMENT; nothing is published."""

from __future__ import annotations

import asyncio
import hashlib
import os
import pathlib

import grpc
import pytest

from imagestream.digests import Digest, compress
from imagestream.rpc.client import GrpcChunkStore
from imagestream.v1 import images_pb2, images_pb2_grpc
from tests.conftest import run_cli
from tests.hostile_inputs import ARCHIVES, BOMB_ENV, GOOD_CHUNK, INDEXES

pytestmark = [pytest.mark.services]


def listing(root: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", ARCHIVES, ids=[c[0] for c in ARCHIVES])
def test_hostile_archive_push_fails_cleanly(stack, case, tmp_path) -> None:  # type: ignore[no-untyped-def]
    case_id, build, expected = case
    source = build(tmp_path / "src")
    spool = tmp_path / "tmp"
    spool.mkdir()
    before = listing(tmp_path)
    name = f"hostile/{case_id}:latest"
    result = run_cli("push", "--quiet", str(source), name, check=False,
                     env={**BOMB_ENV, "TMPDIR": str(spool)})
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imagestream: error: "), result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    assert listing(tmp_path) == before  # the spool is gone, the source untouched, nothing else written
    assert name not in run_cli("images").stdout


@pytest.mark.parametrize("case", INDEXES, ids=[c[0] for c in INDEXES])
def test_crafted_index_is_refused_at_publish(stack, case) -> None:  # type: ignore[no-untyped-def]
    case_id, build, expected = case
    target = stack["IMAGESTREAM_REGION"]
    data = build().SerializeToString()
    digest = Digest.of(data)
    name = f"crafted/{case_id}:latest"

    async def publish() -> grpc.aio.AioRpcError:
        store = GrpcChunkStore(target)
        try:
            await store.put(digest, compress(data))
            await store.put(GOOD_CHUNK, compress(b"c" * GOOD_CHUNK.size))
        finally:
            await store.close()
        async with grpc.aio.insecure_channel(target) as channel:
            stub = images_pb2_grpc.ImagesStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.PublishImage(images_pb2.PublishImageRequest(
                    image=images_pb2.Image(name=name, index=digest.to_proto())))
            return refused.value

    refused = asyncio.run(publish())
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, refused
    assert expected in refused.details()
    assert name not in run_cli("images").stdout


def test_an_unexpected_error_is_one_line_unless_debugging(stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = {"IMAGESTREAM_CHUNK_SIZE": "0"}  # no chunk size: a ValueError, not one of imagestream's errors
    source = ARCHIVES[0][1](tmp_path / "src")
    quiet = run_cli("push", "--quiet", str(source), "x:y", env=env, check=False)
    assert quiet.returncode == 1 and len(quiet.stderr.strip().splitlines()) == 1
    assert "internal error" in quiet.stderr and "Traceback" not in quiet.stderr
    loud = run_cli("push", "--quiet", str(source), "x:y", env={**env, "IMAGESTREAM_DEBUG": "1"}, check=False)
    assert loud.returncode == 1 and "Traceback" in loud.stderr
    assert os.path.exists(source)
