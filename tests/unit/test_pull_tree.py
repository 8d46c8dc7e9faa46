"""The full pull writes the tree below its root only, by descriptor, into a folder only root can enter."""

from __future__ import annotations

import os
import stat

import pytest

from imagestream.digests import Digest, decompress_verified
from imagestream.index import Index
from imagestream.index_checks import BadIndex
from imagestream_cli import pull

from tests.fuse.indexes import Builder, T, sample

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown and mknod need root")


def chunks_of(builder_chunks):  # type: ignore[no-untyped-def]
    return {d: decompress_verified(d, c) for d, c in builder_chunks.items()}


@needs_root
def test_the_tree_is_written_exactly_and_its_root_is_root_only(tmp_path) -> None:  # type: ignore[no-untyped-def]
    b = Builder()
    etc = b.dir(b.root, b"etc")
    data = os.urandom(100_000)
    f = b.file(etc, b"data", data, uid=1000, gid=100, mode=0o4755)
    b.link(etc, b"data-link", f)
    b.link(b.root, b"abs", b.add(T.SYMLINK, symlink_target=b"/etc/data", size=9, mode=0o777))
    root = tmp_path / "tree"
    pull.write_tree(Index(b.index), chunks_of(b.chunks), root)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    st = (root / "etc/data").stat()
    assert (root / "etc/data").read_bytes() == data
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_nlink) == (1000, 100, 0o4755, 2)
    assert (root / "etc/data-link").stat().st_ino == st.st_ino
    assert os.readlink(root / "abs") == "/etc/data"


@needs_root
def test_a_name_that_escapes_is_refused_even_past_the_index_checks(tmp_path) -> None:  # type: ignore[no-untyped-def]
    message, chunks, _ = sample()
    index = Index(message)
    outside = tmp_path / "outside"
    outside.mkdir()
    escape = message.inodes[0].entries.add(name=b"../outside/escaped", inode=2)  # changed after the check
    assert escape.name.startswith(b"..")
    with pytest.raises(BadIndex, match="holds '/'"):
        pull.write_tree(index, chunks_of(chunks), tmp_path / "tree")
    assert list(outside.iterdir()) == []


def test_pulled_folder_is_root_only_and_rm_removes_a_pull(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("IMAGESTREAM_HOME", str(tmp_path))
    (tmp_path / "pulled").mkdir(mode=0o755)  # as an older version left it
    pulled = pull.pulled_dir()
    assert stat.S_IMODE(pulled.stat().st_mode) == 0o700
    digest = Digest.of(b"index").hash
    (pulled / digest / "etc").mkdir(parents=True)
    assert not pull.remove_pulled("../" + digest)  # only an index digest names a pull
    assert pull.remove_pulled(digest) and not (pulled / digest).exists()
    assert not pull.remove_pulled(digest)
