"""Corrupt chunks heal: a bad node-local file is replaced, a bad regional row is quarantined (never deleted).

Real stack (one Cassandra node here; healing from another replica is shown on three nodes in tests/replicated).
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import urllib.request

import pytest

from fuse_client import mounts
from imagestream import config
from imagestream.digests import Digest, compress, decompress_verified
from imagestream.errors import CorruptChunk, ImagestreamError
from imagestream.rpc.client import GrpcChunkStore
from imagestream_dev.stack import local

from tests.conftest import needs_fuse, run_cli
from tests.service.test_streaming_node import big_image, download_of, wait_until

pytestmark = pytest.mark.services


def flip(path: pathlib.Path) -> None:
    """Flip one byte in the middle of a file, in place."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def intact(path: pathlib.Path, digest: Digest) -> bool:
    try:
        decompress_verified(digest, path.read_bytes())
    except (OSError, CorruptChunk):
        return False
    return True


@needs_fuse
def test_corrupt_node_local_chunks_are_replaced_and_every_read_succeeds(stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    image, data = big_image(tmp_path, 40)
    run_cli("push", "-q", str(image), "durable/flipped")
    local.empty_caches()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounts.mount("durable/flipped", mnt)
    try:
        wait_until(lambda: (d := download_of(mnt)) and d.done, what="the download")
        digests = [Digest.of(data[i:i + (1 << 20)]) for i in range(0, len(data), 1 << 20)]
        files = [config.node_disk_dir() / d.hash[:2] / f"{d.hash}-{d.size}" for d in digests]
        assert all(intact(f, d) for f, d in zip(files, digests))
        for f in files:
            flip(f)
        # and the node restarted: nothing good left in its memory, only the bad files
        local.down(print, "node_cache")
        local.up(print, "node_cache")
        eio = 0
        for _ in range(2):  # a second pass reads the healed files (the first pass's pages are dropped)
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1")
            try:
                with open(mnt / "big.bin", "rb") as f:
                    assert f.read() == data
            except OSError:
                eio += 1
        assert eio == 0
        assert all(intact(f, d) for f, d in zip(files, digests))  # each replaced by a good copy
        logs = "".join(p.read_text(errors="replace") for p in (config.home() / "logs").glob("*.log"))
        assert "corrupt" in logs
    finally:
        mounts.unmount(mnt)


def _metric(name: str, label: str) -> float:
    with urllib.request.urlopen(f"http://{config.get('chunk_store_metrics')}/metrics", timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(name) and label in line:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def _cql(statement: str, params: tuple) -> list:  # type: ignore[type-arg]
    from imagestream_dev.stack import credentials

    cluster = credentials.cassandra_admin()
    try:
        cluster.session.set_keyspace(config.get("cassandra_keyspace"))
        return list(cluster.session.execute(statement, params))
    finally:
        cluster.shutdown()


def test_a_corrupt_regional_chunk_is_quarantined_not_deleted_and_healed_by_a_push(stack) -> None:  # type: ignore[no-untyped-def]
    raw = os.urandom(200_000)
    digest, good = Digest.of(raw), compress(raw)
    bad = compress(raw[:-1] + bytes([raw[-1] ^ 1]))

    async def scenario() -> None:
        regional = GrpcChunkStore(config.get("region"))
        try:
            await regional.put(digest, good)
            _cql("UPDATE chunks SET data = %s WHERE hash = %s AND size = %s", (bad, digest.hash, digest.size))
            before = _metric("imagestream_regional_corrupt_chunks_total", 'outcome="quarantined"')
            for _ in range(2):
                with pytest.raises(ImagestreamError) as raised:
                    await regional.get(digest)  # never served
                assert "corrupt" in str(raised.value)
            # never deleted: the row is still there for a good copy to replace
            assert [r.data for r in _cql("SELECT data FROM chunks WHERE hash = %s AND size = %s",
                                         (digest.hash, digest.size))] == [bad]
            assert _metric("imagestream_regional_corrupt_chunks_total", 'outcome="quarantined"') > before
            # a push of any image holding it uploads it again
            assert await regional.find_missing([digest]) == [digest]
        finally:
            await regional.close()

    asyncio.run(scenario())
    listed = run_cli("scrub", "--list").stdout
    assert str(digest) in listed and "QUARANTINED" in listed
    scrubbed = run_cli("scrub", check=False)
    assert scrubbed.returncode == 1
    assert "1 quarantined without a good copy" in scrubbed.stdout and str(digest) in scrubbed.stdout

    async def push_again() -> None:
        regional = GrpcChunkStore(config.get("region"))
        try:
            await regional.put(digest, good)
            assert await regional.get(digest) == good
            assert await regional.find_missing([digest]) == []
        finally:
            await regional.close()

    asyncio.run(push_again())
    scrubbed = run_cli("scrub")
    assert " 0 corrupt" in scrubbed.stdout
    assert f"{digest}  healed" in run_cli("scrub", "--list").stdout
