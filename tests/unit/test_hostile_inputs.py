"""Hostile source images and crafted indexes get a clear error naming the entry, never a traceback;
nothing is written outside the push's spool; the limits are checked in one place (index_checks)."""

from __future__ import annotations

import gzip
import os
import pathlib

import pytest

from imagestream import index_checks
from imagestream.errors import BadImage
from imagestream.index import Index, load_config, load_index
from imagestream.digests import Digest, compress
from imagestream.store import MemoryStore
from imagestream.v1 import index_pb2
from imagestream.ingest.convert import convert
from imagestream.ingest.source import open_image

from tests.hostile_inputs import ARCHIVES, BOMB_ENV, INDEXES, OK, file, info, oci, tar_bytes

T = index_pb2.Inode


def spool(parent: pathlib.Path, name: str = "spool") -> pathlib.Path:
    (parent / name).mkdir()
    return parent / name


def tree(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() and not p.is_symlink() else b"")
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", ARCHIVES, ids=[c[0] for c in ARCHIVES])
def test_hostile_archive_is_refused_with_a_clear_error(case, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    _, build, expected = case
    for k, v in BOMB_ENV.items():
        monkeypatch.setenv(k, v)
    source = build(tmp_path / "src")
    before = tree(tmp_path)
    spool = tmp_path / "spool"
    spool.mkdir()
    with pytest.raises(BadImage) as refused:
        with open_image(source) as image:
            convert(image, spool, chunk_size=64 * 1024)
    assert expected in str(refused.value)
    assert "\n" not in str(refused.value)
    after = tree(tmp_path)
    # nothing written anywhere but the spool (which push removes)
    assert {k: v for k, v in after.items() if not k.startswith("spool")} == before


def test_the_campaign_is_large_enough() -> None:
    assert len(ARCHIVES) + len(INDEXES) >= 50
    assert len({c[0] for c in ARCHIVES}) == len(ARCHIVES) and len({c[0] for c in INDEXES}) == len(INDEXES)


def test_a_non_utf8_symlink_target_is_kept_byte_for_byte(tmp_path) -> None:  # type: ignore[no-untyped-def]
    target = b"caf\xe9/\xff"
    layer = tar_bytes([(info("link", b"2", linkname=os.fsdecode(target)), None), file("etc/x")])
    with open_image(oci(tmp_path / "src", [layer])) as image:
        converted, _ = convert(image, spool(tmp_path))
    index = Index(converted.index)
    node = index.inode(index.lookup(1, b"link"))
    assert node.type == T.SYMLINK and node.symlink_target == target and node.size == len(target)


def test_deep_but_legal_trees_convert(tmp_path) -> None:  # type: ignore[no-untyped-def]
    layer = tar_bytes([file("/".join(["d"] * 500) + "/f", b"deep")])
    with open_image(oci(tmp_path / "src", [layer])) as image:
        converted, _ = convert(image, spool(tmp_path))
    assert len(converted.index.inodes) == 502


def test_unpack_ratio_bound(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from imagestream.ingest import source

    monkeypatch.setattr(source, "RATIO_FROM_BYTES", 1 << 20)
    monkeypatch.setenv("IMAGESTREAM_MAX_UNPACK_RATIO", "50")
    layer = tar_bytes([file("zeros", bytes(8 << 20))])
    with pytest.raises(BadImage, match="expands more than 50 times"):
        with open_image(oci(tmp_path / "src", [layer])) as image:
            convert(image, spool(tmp_path))
    monkeypatch.setenv("IMAGESTREAM_MAX_UNPACK_RATIO", "0")  # 0 turns it off
    with open_image(oci(tmp_path / "src2", [layer])) as image:
        converted, _ = convert(image, spool(tmp_path, "spool2"))
    assert converted.content_bytes == 8 << 20


@pytest.mark.parametrize("case", INDEXES, ids=[c[0] for c in INDEXES])
def test_crafted_index_is_refused_wherever_it_is_loaded(case) -> None:  # type: ignore[no-untyped-def]
    _, build, expected = case
    message = build()
    with pytest.raises(index_checks.BadIndex) as refused:
        index_checks.check(message)
    assert expected in str(refused.value)
    with pytest.raises(index_checks.BadIndex):  # the only way anything gets an Index
        Index.parse(message.SerializeToString())


async def test_a_crafted_index_is_refused_when_loaded_from_a_store() -> None:
    store = MemoryStore()
    data = INDEXES[0][1]().SerializeToString()
    digest = Digest.of(data)
    await store.put(digest, compress(data))
    with pytest.raises(index_checks.BadIndex, match="holds '/'"):
        await load_index(store, digest)
    junk = Digest.of(b"not a protobuf \xff\xff\xff")
    await store.put(junk, compress(b"not a protobuf \xff\xff\xff"))
    with pytest.raises(BadImage, match="cannot be parsed"):
        await load_index(store, junk)


@pytest.mark.parametrize("config_json", [b"[1, 2]", b"{not json", b"\xff\xfe", b"42"])
async def test_a_config_that_is_not_an_object_is_refused(config_json) -> None:  # type: ignore[no-untyped-def]
    message = index_pb2.ImageIndex(chunk_size=4096, inodes=[T(type=T.DIRECTORY)], config_json=config_json)
    data = message.SerializeToString()
    store = MemoryStore()
    await store.put(Digest.of(data), compress(data))
    with pytest.raises(BadImage, match="index: config is not"):
        await load_config(store, Digest.of(data))
    with pytest.raises(BadImage, match="index: config is not"):
        Index(message).config()


def test_the_debian_sized_index_checks_quickly() -> None:
    """Checked at every mount: 20,000 files must take well under a warm start's budget."""
    import time

    message = index_pb2.ImageIndex(chunk_size=1 << 20)
    root = message.inodes.add(type=T.DIRECTORY, mode=0o755)
    for i in range(100):
        root.entries.add(name=f"d{i}".encode(), inode=len(message.inodes) + 1)
        d = message.inodes.add(type=T.DIRECTORY, mode=0o755)
        for j in range(200):
            d.entries.add(name=f"f{j}".encode(), inode=len(message.inodes) + 1)
            f = message.inodes.add(type=T.REGULAR, mode=0o644, size=100)
            f.extents.add(length=100, chunk_offset=j * 100).chunk.CopyFrom(Digest("a" * 64, 20_000).to_proto())
    started = time.process_time()
    index_checks.check(message)
    assert time.process_time() - started < 0.5


def test_gzip_bomb_is_refused_before_it_is_unpacked(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from tests.hostile_inputs import _bomb

    monkeypatch.setenv("IMAGESTREAM_MAX_UNPACKED_BYTES", "4MiB")
    source = _bomb(tmp_path / "src")
    assert source.stat().st_size < 1 << 20 and sum(f.stat().st_size for f in source.rglob("*") if f.is_file()) < 1 << 20
    with pytest.raises(BadImage, match="unpacks to more than 4194304 bytes"):
        with open_image(source) as image:
            convert(image, spool(tmp_path))
    assert gzip  # the bomb is gzip: see tests.hostile_inputs._bomb
