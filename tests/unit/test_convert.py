"""Conversion: layers applied in order with whiteouts, full metadata in the index, chunking, determinism, bad input."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import pathlib
import tarfile

import pytest

from imagestream_dev import imagebuild
from imagestream.ingest.convert import convert
from imagestream.digests import Digest
from imagestream.errors import BadImage
from imagestream.index import Index
from imagestream.ingest.source import open_image
from imagestream.v1 import index_pb2

T = index_pb2.Inode


def layer(tmp: pathlib.Path, name: str, entries: list[tuple]) -> pathlib.Path:
    """An uncompressed layer tar from (kind, path, extra...) tuples."""
    path = tmp / f"{name}.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for kind, member, *rest in entries:
            info = tarfile.TarInfo(member)
            info.mtime = 1_700_000_000
            info.mode = 0o644
            data = b""
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            elif kind == "file":
                data = rest[0]
                info.size = len(data)
                if len(rest) > 1:
                    info.pax_headers.update(rest[1])
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, rest[0]
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, rest[0]
            elif kind == "chardev":
                info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, rest[0], rest[1]
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            tar.addfile(info, io.BytesIO(data) if data else None)
    return path


def image(tmp: pathlib.Path, layers: list[pathlib.Path]) -> pathlib.Path:
    out = tmp / "image"
    imagebuild.write_oci_layout_from_layers(layers, out)
    return out


def converted(tmp: pathlib.Path, layers: list[pathlib.Path], chunk_size: int = 1 << 20):
    spool = tmp / "spool"
    spool.mkdir(exist_ok=True)
    with open_image(image(tmp, layers)) as src:
        result, chunks = convert(src, spool, chunk_size)
    return Index(result.index), result, chunks


def tree(index: Index) -> dict[str, index_pb2.Inode]:
    return {path.decode().lstrip("/"): index.inode(ino) for path, ino in index.walk()}


def file_bytes(index: Index, spool, inode) -> bytes:  # type: ignore[no-untyped-def]
    from imagestream.digests import decompress_verified

    out = b""
    for ext in inode.extents:
        if ext.HasField("chunk"):
            d = Digest.from_proto(ext.chunk)
            out += decompress_verified(d, spool.read(d))[ext.chunk_offset : ext.chunk_offset + ext.length]
        else:
            out += bytes(ext.length)
    return out


def test_layers_apply_in_order_with_whiteouts_and_opaque_dirs(tmp_path):  # type: ignore[no-untyped-def]
    lower = layer(tmp_path, "l1", [
        ("dir", "etc"), ("file", "etc/keep", b"keep"), ("file", "etc/gone", b"gone"),
        ("dir", "opt"), ("file", "opt/old1", b"1"), ("dir", "opt/sub"), ("file", "opt/sub/old2", b"2"),
        ("file", "replaced", b"v1"),
    ])
    upper = layer(tmp_path, "l2", [
        ("file", "etc/.wh.gone", b""),
        ("dir", "opt"), ("file", "opt/.wh..wh..opq", b""), ("file", "opt/new", b"new"),
        ("file", "replaced", b"v2"),
    ])
    index, _, spool = converted(tmp_path, [lower, upper])
    paths = tree(index)
    assert "etc/keep" in paths and "etc/gone" not in paths
    assert sorted(p for p in paths if p.startswith("opt/")) == ["opt/new"]
    assert file_bytes(index, spool, paths["replaced"]) == b"v2"
    assert not any(".wh." in p for p in paths)


def test_whiteout_in_a_layer_does_not_remove_what_that_layer_adds(tmp_path):  # type: ignore[no-untyped-def]
    lower = layer(tmp_path, "l1", [("dir", "x"), ("file", "x/a", b"a")])
    upper = layer(tmp_path, "l2", [("file", "x", b"now a file"), ("file", ".wh.x", b"")])
    index, _, spool = converted(tmp_path, [lower, upper])
    paths = tree(index)
    assert paths["x"].type == T.REGULAR and "x/a" not in paths


def test_index_keeps_full_metadata(tmp_path):  # type: ignore[no-untyped-def]
    entries = [
        ("dir", "bin"), ("file", "bin/tool", b"#!/bin/sh\n", {"SCHILY.xattr.user.note": "hello"}),
        ("hardlink", "bin/tool2", "bin/tool"), ("symlink", "bin/sh", "/usr/bin/dash"),
        ("symlink", "bin/rel", "../etc/x"), ("dir", "dev"), ("chardev", "dev/null", 1, 3), ("fifo", "run.fifo"),
    ]
    index, _, _ = converted(tmp_path, [layer(tmp_path, "l1", entries)])
    paths = tree(index)
    tool = paths["bin/tool"]
    assert tool.type == T.REGULAR and tool.mode == 0o644 and tool.size == 10 and tool.nlink == 2
    assert tool.mtime_ns == 1_700_000_000 * 10**9
    assert [(x.name, x.value) for x in tool.xattrs] == [(b"user.note", b"hello")]
    assert index.lookup(index.lookup(1, b"bin"), b"tool2") == index.lookup(index.lookup(1, b"bin"), b"tool")
    assert paths["bin/sh"].type == T.SYMLINK and paths["bin/sh"].symlink_target == b"/usr/bin/dash"
    assert (paths["dev/null"].type, paths["dev/null"].rdev_major, paths["dev/null"].rdev_minor) == (T.CHAR_DEVICE, 1, 3)
    assert paths["run.fifo"].type == T.FIFO
    assert index.inode(1).nlink == 2 + 2  # root: itself, its parent entry, and two subdirectories


def test_contents_are_chunked_by_size_with_holes_and_dedup(tmp_path):  # type: ignore[no-untyped-def]
    cs = 4096
    a = bytes(range(256)) * 16  # one full chunk
    data = a + bytes(cs) + a + b"tail"  # chunk, hole, same chunk again, short last chunk
    index, result, spool = converted(tmp_path, [layer(tmp_path, "l1", [("file", "f", data), ("file", "g", a)])], cs)
    f = tree(index)["f"]
    assert [e.length for e in f.extents] == [cs, cs, cs, 4]
    assert not f.extents[1].HasField("chunk")  # zeros are a hole: nothing stored
    assert f.extents[0].chunk == f.extents[2].chunk
    assert len(result.chunks) == 2  # `a` stored once for three uses, plus the tail
    assert file_bytes(index, spool, f) == data
    assert Digest.from_proto(f.extents[0].chunk).hash == hashlib.sha256(a).hexdigest()


def test_small_files_are_packed_together_in_tree_order(tmp_path):  # type: ignore[no-untyped-def]
    cs = 4096  # packs of up to 4096 bytes; files up to 256 bytes are small
    small = {f"lib/m{i}.py": f"module {i}\n".encode() * (i + 1) for i in range(30)}
    entries = [("dir", "lib"), *[("file", p, d) for p, d in reversed(small.items())], ("file", "lib/zeros", bytes(100)),
               ("file", "lib/big", b"B" * 3000)]
    index, result, spool = converted(tmp_path, [layer(tmp_path, "l1", entries)], cs)
    paths = tree(index)
    packs = {Digest.from_proto(paths[p].extents[0].chunk) for p in small}
    assert 1 < len(packs) < len(small)  # several files share a chunk, and no pack exceeds the chunk size
    assert all(d.size <= cs for d in packs)
    for p, data in small.items():
        assert len(paths[p].extents) == 1 and file_bytes(index, spool, paths[p]) == data
    # neighbours in the tree are neighbours in a pack: m1 follows m0 in the same chunk
    m0, m1 = paths["lib/m0.py"].extents[0], paths["lib/m1.py"].extents[0]
    assert m0.chunk == m1.chunk and m1.chunk_offset == m0.chunk_offset + m0.length
    assert not paths["lib/zeros"].extents[0].HasField("chunk")
    assert paths["lib/big"].extents[0].chunk_offset == 0 and len(result.chunks) == len(packs) + 1


def test_same_input_gives_the_same_index_digest(tmp_path):  # type: ignore[no-untyped-def]
    entries = [("dir", "a"), ("file", "a/b", b"x" * 5000), ("symlink", "a/c", "b")]
    (tmp_path / "1").mkdir()
    (tmp_path / "2").mkdir()
    _, r1, _ = converted(tmp_path / "1", [layer(tmp_path / "1", "l", entries)])
    _, r2, _ = converted(tmp_path / "2", [layer(tmp_path / "2", "l", list(reversed(entries[1:])) + entries[:1])])
    assert r1.index_digest == r2.index_digest  # entry order in the tar does not matter


def test_docker_archive_and_oci_archive_give_the_same_index(tmp_path):  # type: ignore[no-untyped-def]
    l1 = layer(tmp_path, "l1", [("dir", "a"), ("file", "a/b", b"hello")])
    imagebuild.write_oci_layout_from_layers([l1], tmp_path / "oci")
    imagebuild.write_oci_archive(tmp_path / "oci", tmp_path / "oci.tar")
    imagebuild.write_docker_archive([l1], tmp_path / "docker.tar", "x:latest")
    digests = set()
    for src in ("oci", "oci.tar", "docker.tar"):
        spool = tmp_path / f"spool-{src}"
        spool.mkdir()
        with open_image(tmp_path / src) as s:
            digests.add(convert(s, spool)[0].index_digest)
    assert len(digests) == 1


# -- bad input: refused with an error naming the entry -------------------------

@pytest.mark.parametrize(("entries", "message"), [
    ([("file", "/etc/passwd", b"x")], "'/etc/passwd': absolute path"),
    ([("file", "a/../../etc/passwd", b"x")], "'a/../../etc/passwd': '..' in path"),
    ([("dir", "etc"), ("symlink", "etc/evil", "../../../etc/shadow")], "'etc/evil': symlink target '../../../etc/shadow' escapes"),
    ([("hardlink", "evil", "../etc/shadow")], "'evil': hardlink target"),
    ([("hardlink", "evil", "/etc/shadow")], "'evil': hardlink target"),
    ([("hardlink", "evil", "nothere")], "'evil': hardlink target 'nothere' is not in the image"),
    ([("dir", "usr"), ("chardev", "usr/mem", 1, 1)], "'usr/mem': character device outside /dev"),
    ([("symlink", "lnk", "/etc"), ("file", "lnk/passwd", b"x")], "'lnk/passwd': parent 'lnk' is not a directory"),
    ([("dir", "etc"), ("file", "etc/.wh...", b"")], "whiteout 'etc/.wh...' names no entry"),
])
def test_hostile_entries_are_refused_by_name(tmp_path, entries, message):  # type: ignore[no-untyped-def]
    with pytest.raises(BadImage, match=message.replace("(", r"\(").replace(".", r"\.")):
        converted(tmp_path, [layer(tmp_path, "l1", entries)])


def _corrupt_layer_blob(layout: pathlib.Path, mutate) -> str:  # type: ignore[no-untyped-def]
    index = json.loads((layout / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"]
    manifest = json.loads((layout / "blobs/sha256" / manifest_digest.split(":")[1]).read_bytes())
    digest = manifest["layers"][0]["digest"]
    blob = layout / "blobs/sha256" / digest.split(":")[1]
    mutate(blob)
    return digest


def test_truncated_layer_is_refused(tmp_path):  # type: ignore[no-untyped-def]
    out = image(tmp_path, [layer(tmp_path, "l1", [("file", "big", bytes(range(256)) * 4000)])])
    digest = _corrupt_layer_blob(out, lambda b: b.write_bytes(b.read_bytes()[: b.stat().st_size // 2]))
    with open_image(out) as src, pytest.raises(BadImage, match=rf"layer 1 \({digest}\).*(truncated|corrupt|readable)"):
        convert(src, tmp_path)


def test_blob_whose_digest_does_not_match_is_refused(tmp_path):  # type: ignore[no-untyped-def]
    out = image(tmp_path, [layer(tmp_path, "l1", [("file", "a", b"original")])])
    other = gzip.compress(layer(tmp_path, "evil", [("file", "a", b"tampered")]).read_bytes(), mtime=0)
    digest = _corrupt_layer_blob(out, lambda b: b.write_bytes(other))
    with open_image(out) as src, pytest.raises(BadImage, match=rf"{digest}.*does not match"):
        convert(src, tmp_path)


def test_missing_blob_is_refused(tmp_path):  # type: ignore[no-untyped-def]
    out = image(tmp_path, [layer(tmp_path, "l1", [("file", "a", b"x")])])
    digest = _corrupt_layer_blob(out, lambda b: b.unlink())
    with pytest.raises(BadImage, match="missing"):
        with open_image(out) as src:
            convert(src, tmp_path)
    assert digest


def test_not_an_image_is_refused(tmp_path):  # type: ignore[no-untyped-def]
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(BadImage, match="junk.tar"):
        open_image(tmp_path / "junk.tar")
    with pytest.raises(BadImage, match="no oci-layout"):
        open_image(tmp_path)
