"""The push spool's sweep: what it removes and what it leaves."""

from __future__ import annotations

import os
import pathlib

from imagestream.ingest import spool


def _spool(parent: pathlib.Path, name: str, owner: str | None, age_s: float = 0) -> pathlib.Path:
    path = parent / f"{spool.PREFIX}{name}"
    path.mkdir()
    (path / "chunk").write_bytes(b"x" * 100)
    if owner is not None:
        (path / spool.OWNER).write_text(owner)
    if age_s:
        t = os.stat(path).st_mtime - age_s
        os.utime(path, (t, t))
    return path


def test_sweep_removes_dead_owners_and_old_unreadable_records_only(tmp_path) -> None:  # type: ignore[no-untyped-def]
    me = f"{os.getpid()} {spool._start_time(os.getpid())}\n"
    live = _spool(tmp_path, "live", me)
    reused_pid = _spool(tmp_path, "reused", f"{os.getpid()} 1\n")  # same pid, another start: not the owner
    dead = _spool(tmp_path, "dead", "999999999 12345\n")
    young_garbage = _spool(tmp_path, "young", "\x00\xff not a record")
    old_garbage = _spool(tmp_path, "old", "../../etc 1 2 3", age_s=2 * spool.UNOWNED_GRACE_S)
    old_unowned = _spool(tmp_path, "unowned", None, age_s=2 * spool.UNOWNED_GRACE_S)
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep").write_text("keep")
    link = tmp_path / f"{spool.PREFIX}link"
    link.symlink_to(target)

    removed = spool.sweep(tmp_path)

    assert sorted(removed) == sorted([reused_pid, dead, old_garbage, old_unowned])
    assert live.exists() and young_garbage.exists() and link.is_symlink()
    assert (target / "keep").read_text() == "keep"


def test_push_spool_is_removed_on_an_exception(tmp_path) -> None:  # type: ignore[no-untyped-def]
    try:
        with spool.push_spool(tmp_path) as path:
            (path / "chunk").write_bytes(b"x")
            assert (path / spool.OWNER).read_text().split()[0] == str(os.getpid())
            raise RuntimeError("conversion failed")
    except RuntimeError:
        pass
    assert not path.exists()
