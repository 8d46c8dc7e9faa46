"""Whiteouts: the one rule, and the streamed view of a layered image against its unpacked overlay view."""

from __future__ import annotations

import io
import os
import pathlib
import stat
import subprocess
import tarfile

import pytest

from imagestream import whiteouts
from imagestream.digests import Digest, decompress_verified
from imagestream.errors import BadImage
from imagestream.index import Index
from imagestream.v1 import index_pb2
from imagestream.ingest.convert import convert
from imagestream_cli.pull import write_tree
from imagestream.ingest.source import open_image
from imagestream_dev import imagebuild
from snapshotter.unpack import unpack
from tests.conftest import needs_overlayfs

T = index_pb2.Inode


def _tar(path: pathlib.Path, entries: list[tuple]) -> pathlib.Path:
    """An uncompressed layer from (kind, name, mode, extra) tuples, written in the order given."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for kind, name, mode, *extra in entries:
            info = tarfile.TarInfo(name)
            info.mode, info.mtime, info.uid, info.gid = mode, 1_700_000_000, 0, 0
            data = b""
            if kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "file":
                data = extra[0]
                info.size = len(data)
                if len(extra) > 1:
                    info.uid, info.gid = extra[1]
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, extra[0]
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, extra[0]
            tar.addfile(info, io.BytesIO(data) if data else None)
    return path


def _wh(name: str) -> tuple:
    return ("file", name, 0o644, b"")


LAYERS = [
    [  # the base
        ("dir", "etc", 0o755), ("file", "etc/keep", 0o644, b"keep"), ("file", "etc/gone", 0o600, b"gone"),
        ("hardlink", "etc/keep-too", 0o644, "etc/keep"), ("symlink", "etc/link", 0o777, "keep"),
        ("dir", "opt", 0o755), ("file", "opt/old", 0o644, b"old"), ("dir", "opt/-early", 0o755),
        ("file", "opt/-early/lower", 0o644, b"lower"), ("dir", "opt/sub", 0o755), ("file", "opt/sub/old", 0o644, b"o"),
        ("file", "first-whiteout", 0o644, b"v1"), ("file", "first-file", 0o644, b"v1"),
        ("dir", "dir-first-whiteout", 0o755), ("file", "dir-first-whiteout/lower", 0o644, b"l"),
        ("dir", "dir-first-entry", 0o755), ("file", "dir-first-entry/lower", 0o644, b"l"),
        ("dir", "becomes-file", 0o755), ("file", "becomes-file/inside", 0o644, b"i"),
        ("file", "becomes-dir", 0o644, b"f"),
        ("dir", "bin", 0o755), ("file", "bin/tool", 0o4755, b"#!/bin/sh\n", (0, 0)),
        ("file", "owned", 0o640, b"owned", (1000, 1000)),
    ],
    [
        ("dir", "etc", 0o755), _wh("etc/.wh.gone"), ("file", "etc/new", 0o644, b"new"),
        # an entry that sorts before the opaque marker is added first: it must still lose its lower content
        ("dir", "opt", 0o750), ("dir", "opt/-early", 0o755), ("file", "opt/-early/upper", 0o644, b"upper"),
        _wh("opt/.wh..wh..opq"), ("file", "opt/new", 0o644, b"new"),
        # a whiteout and an entry of the same name in one layer, in both orders
        _wh(".wh.first-whiteout"), ("file", "first-whiteout", 0o600, b"v2"),
        ("file", "first-file", 0o600, b"v2"), _wh(".wh.first-file"),
        _wh(".wh.dir-first-whiteout"), ("dir", "dir-first-whiteout", 0o700),
        ("file", "dir-first-whiteout/upper", 0o644, b"u"),
        ("dir", "dir-first-entry", 0o700), ("file", "dir-first-entry/upper", 0o644, b"u"), _wh(".wh.dir-first-entry"),
        _wh(".wh.becomes-file"), ("file", "becomes-file", 0o644, b"now a file"),
        ("dir", "becomes-dir", 0o711), ("file", "becomes-dir/inside", 0o644, b"i"),
        ("file", "data", 0o644, b"d" * 5000), ("hardlink", "data-link", 0o644, "data"),
        ("symlink", "abs-link", 0o777, "/etc/keep"), ("symlink", "etc/relative", 0o777, "../etc/keep"),
    ],
    [
        _wh(".wh.abs-link"), ("dir", "etc", 0o755), ("file", "etc/gone", 0o644, b"back"), _wh("etc/.wh.link"),
        ("dir", "opt", 0o755), ("dir", "opt/sub", 0o755), _wh("opt/sub/.wh..wh..opq"),
    ],
]


def _view(root: pathlib.Path) -> dict[str, tuple]:
    """Every entry below root: type, mode, owner, and its content or link target; hardlinks as groups."""
    out: dict[str, tuple] = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    what: object = f.read()
                inodes.setdefault(st.st_ino, []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                what = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                what = (os.major(st.st_rdev), os.minor(st.st_rdev))
            else:
                what = None
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, what)
    links = [sorted(group) for group in inodes.values() if len(group) > 1]
    out["(hardlinks)"] = tuple(sorted(tuple(g) for g in links))
    return out


def _image(tmp: pathlib.Path) -> imagebuild.OciImage:
    tars = [_tar(tmp / f"layer{i}.tar", entries) for i, entries in enumerate(LAYERS)]
    return imagebuild.write_oci_layout_from_layers(tars, tmp / "image")


def _converted(image: imagebuild.OciImage, tmp: pathlib.Path) -> tuple[Index, dict]:
    spool = tmp / "spool"
    spool.mkdir()
    with open_image(image.layout_dir) as source:
        converted, chunks = convert(source, spool)
    return Index(converted.index), {d: decompress_verified(d, chunks.read(d)) for d in converted.chunks}


def test_the_rule():  # type: ignore[no-untyped-def]
    assert whiteouts.parse("etc/passwd") is None and whiteouts.parse("etc/x.wh.y") is None
    assert whiteouts.parse("etc/.wh.passwd") == whiteouts.Whiteout("etc/passwd", opaque=False)
    assert whiteouts.parse(".wh.etc") == whiteouts.Whiteout("etc", opaque=False)
    assert whiteouts.parse("etc/.wh..wh..opq") == whiteouts.Whiteout("etc", opaque=True)
    assert whiteouts.parse(".wh..wh..opq") == whiteouts.Whiteout("", opaque=True)
    for bad in ("etc/.wh.", "etc/.wh..", "etc/.wh..."):
        with pytest.raises(BadImage, match="names no entry"):
            whiteouts.parse(bad)
    name, opaque = whiteouts.Whiteout("etc/passwd", False), whiteouts.Whiteout("etc", True)
    assert whiteouts.effect(name, whiteouts.Layered.NOTHING) is whiteouts.Effect.REMOVE
    assert whiteouts.effect(name, whiteouts.Layered.OTHER) is whiteouts.Effect.NONE
    assert whiteouts.effect(name, whiteouts.Layered.DIRECTORY) is whiteouts.Effect.EMPTY
    assert whiteouts.effect(opaque, whiteouts.Layered.DIRECTORY) is whiteouts.Effect.EMPTY


def test_unpacking_refuses_a_whiteout_of_the_parent_directory(tmp_path):  # type: ignore[no-untyped-def]
    (tmp_path / "beside").write_bytes(b"untouched")
    blob = _tar(tmp_path / "layer.tar", [("dir", "a", 0o755), _wh("a/.wh...")])
    with pytest.raises(BadImage, match="names no entry"):
        unpack(blob, tmp_path / "layers" / "0")
    assert (tmp_path / "beside").read_bytes() == b"untouched" and (tmp_path / "layers" / "0" / "a").is_dir()


def test_the_streamed_view_is_the_one_the_layers_describe(tmp_path):  # type: ignore[no-untyped-def]
    index, data = _converted(_image(tmp_path), tmp_path)
    paths = {p.decode().lstrip("/"): index.inode(ino) for p, ino in index.walk()}

    def content(path: str) -> bytes:
        out = b""
        for ext in paths[path].extents:
            out += data[Digest.from_proto(ext.chunk)][ext.chunk_offset : ext.chunk_offset + ext.length]
        return out

    assert content("first-whiteout") == content("first-file") == b"v2"
    assert sorted(p for p in paths if p.startswith("opt/")) == ["opt/-early", "opt/-early/upper", "opt/new", "opt/sub"]
    assert sorted(p for p in paths if p.startswith("dir-first")) == [
        "dir-first-entry", "dir-first-entry/upper", "dir-first-whiteout", "dir-first-whiteout/upper"]
    assert content("etc/gone") == b"back" and "etc/link" not in paths and "abs-link" not in paths
    assert paths["becomes-file"].type == T.REGULAR and paths["becomes-dir"].type == T.DIRECTORY
    assert not any(".wh." in p for p in paths)


@needs_overlayfs
def test_streamed_and_unpacked_views_of_a_layered_image_are_the_same(tmp_path):  # type: ignore[no-untyped-def]
    image = _image(tmp_path)
    index, data = _converted(image, tmp_path)
    write_tree(index, data, tmp_path / "streamed")
    streamed = _view(tmp_path / "streamed")

    lowers = []
    for i, layer in enumerate(image.layers):
        unpack(layer.path, tmp_path / "layers" / str(i))
        lowers.insert(0, str(tmp_path / "layers" / str(i)))  # overlayfs lists the top layer first
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", "lowerdir=" + ":".join(lowers), str(mnt)],
                   check=True, capture_output=True)
    try:
        unpacked = _view(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)

    assert sorted(unpacked) == sorted(streamed)
    for path in streamed:
        assert unpacked[path] == streamed[path], path
    # the comparison covers what the layers hold
    assert streamed["(hardlinks)"] == (("data", "data-link"), ("etc/keep", "etc/keep-too"))
    assert streamed["bin/tool"][1] == 0o4755 and streamed["owned"][2:4] == (1000, 1000)
    assert streamed["etc/relative"][4] == "../etc/keep" and streamed["etc/keep"][4] == b"keep"
