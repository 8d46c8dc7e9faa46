"""End to end on a real image: Debian bookworm minbase + python3 (debootstrap), pushed through the CLI,
streamed node -> zonal -> regional on real Redis and Cassandra, run, and compared file by file."""

from __future__ import annotations

import hashlib
import os
import pathlib
import stat

import pytest

from tests.conftest import needs_fuse, run_cli

pytestmark = [pytest.mark.services, needs_fuse]


@pytest.fixture(scope="module")
def pushed(stack, debian_image):  # type: ignore[no-untyped-def]
    result = run_cli("push", "--quiet", str(debian_image), "debian-python:e2e")
    assert "pushed debian-python:e2e" in result.stdout
    return result


def test_images_lists_the_pushed_name(pushed) -> None:  # type: ignore[no-untyped-def]
    out = run_cli("images").stdout
    assert "debian-python:e2e" in out


def test_push_is_deterministic_and_deduplicated(pushed, debian_image) -> None:  # type: ignore[no-untyped-def]
    again = run_cli("push", "--quiet", str(debian_image), "debian-python:again").stdout
    first_index = pushed.stdout.split("index sha256:")[1][:12]
    assert f"index sha256:{first_index}" in again
    assert "uploaded 0 new chunks" in again  # every chunk was already in the region


def test_run_python_with_standard_modules(pushed) -> None:  # type: ignore[no-untyped-def]
    program = (
        "import json, sqlite3, hashlib, decimal, email.parser, urllib.parse, xml.etree.ElementTree as ET\n"
        "db = sqlite3.connect(':memory:'); db.execute('create table t (x)')\n"
        "db.executemany('insert into t values (?)', [(i,) for i in range(100)])\n"
        "print(json.dumps({'sum': db.execute('select sum(x) from t').fetchone()[0],"
        " 'h': hashlib.sha256(b'x').hexdigest()[:8], 'root': ET.fromstring('<a><b/></a>')[0].tag}))\n"
    )
    result = run_cli("run", "debian-python:e2e", "--", "python3", "-c", program)
    assert result.stdout.strip() == '{"sum": 4950, "h": "2d711642", "root": "b"}'


def test_run_returns_the_exit_status_and_leaves_no_mounts(pushed, stack_home) -> None:  # type: ignore[no-untyped-def]
    result = run_cli("run", "debian-python:e2e", "--", "sh", "-c", "echo hi > /tmp/f && cat /tmp/f && exit 7", check=False)
    assert result.returncode == 7 and result.stdout.strip() == "hi"
    from fuse_client import attach

    with open("/proc/self/mountinfo") as f:  # the node's one FUSE mount, and nothing of the run
        assert [line.split()[4] for line in f if str(stack_home) in line] == [str(stack_home / "images")]
    attached, _, _ = attach.attachments()
    assert not [lease for a in attached for lease in a.leases if lease.startswith("run:")]  # its lease is gone
    assert not any((stack_home / "runs").iterdir())  # the run's upper dir is gone


def test_run_sees_proc_dev_sys_and_a_writable_overlay(pushed) -> None:  # type: ignore[no-untyped-def]
    script = "test -e /proc/self/status && test -c /dev/null && test -d /sys/kernel && touch /usr/new && echo ok"
    assert run_cli("run", "debian-python:e2e", "--", "sh", "-c", script).stdout.strip() == "ok"
    # the write went to that run's upper dir only: a new run does not see it
    assert run_cli("run", "debian-python:e2e", "--", "sh", "-c", "test ! -e /usr/new && echo clean").stdout.strip() == "clean"


def snapshot(root: pathlib.Path) -> dict[str, tuple]:
    """Everything the comparison checks, for every path under root."""
    out: dict[str, tuple] = {}
    inode_groups: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = pathlib.Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            kind = stat.S_IFMT(st.st_mode)
            entry: tuple = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
            if stat.S_ISREG(kind):
                entry += (st.st_size, hashlib.sha256(p.read_bytes()).hexdigest())
                if st.st_nlink > 1:
                    inode_groups.setdefault(st.st_ino, []).append(rel)
            elif stat.S_ISLNK(kind):
                entry += (os.readlink(p),)
            elif stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
                entry += (os.major(st.st_rdev), os.minor(st.st_rdev))
            out[rel] = entry
    for group in inode_groups.values():
        if len(group) < 2:  # links from outside this tree (a copy made with cp -al) are not a group in it
            continue
        for rel in group:
            out[rel] += (tuple(sorted(group)),)  # hardlink group membership
    return out


def test_mounted_tree_equals_the_source_rootfs(pushed, debian_rootfs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = run_cli("mount", "debian-python:e2e", str(mnt)).stdout
    assert "mounted debian-python:e2e" in out
    try:
        mounted, source = snapshot(mnt), snapshot(debian_rootfs)
    finally:
        run_cli("umount", str(mnt))
    assert len(mounted) > 5000
    assert mounted.keys() == source.keys()
    differing = [p for p in source if mounted[p] != source[p]]
    assert not differing, [(p, source[p], mounted[p]) for p in differing[:5]]
    assert any(len(v) > 6 for v in source.values())  # the image does have hardlink groups to compare


@pytest.mark.parametrize("bad", ["absolute", "truncated", "mismatch"])
def test_bad_images_are_refused_and_nothing_is_published(stack, tmp_path, bad) -> None:  # type: ignore[no-untyped-def]
    import gzip
    import io
    import json
    import tarfile

    from imagestream_dev import imagebuild

    layer_tar = tmp_path / "layer.tar"
    with tarfile.open(layer_tar, "w") as tar:
        info = tarfile.TarInfo("/etc/passwd" if bad == "absolute" else "etc/file")
        payload = os.urandom(200_000)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    layout = tmp_path / "image"
    imagebuild.write_oci_layout_from_layers([layer_tar], layout)
    manifest_digest = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
    manifest = json.loads((layout / "blobs/sha256" / manifest_digest[7:]).read_text())
    blob = layout / "blobs/sha256" / manifest["layers"][0]["digest"][7:]
    if bad == "truncated":
        blob.write_bytes(blob.read_bytes()[:-5000])
    elif bad == "mismatch":
        blob.write_bytes(gzip.compress(b"\0" * 1024, mtime=0))
    name = f"bad/{bad}"
    result = run_cli("push", "--quiet", str(layout), name, check=False)
    assert result.returncode != 0
    expected = {"absolute": "'/etc/passwd': absolute path", "truncated": "layer 1", "mismatch": "does not match"}[bad]
    assert expected in result.stderr
    assert name not in run_cli("images").stdout


def test_streaming_engaged_is_said(pushed) -> None:  # type: ignore[no-untyped-def]
    result = run_cli("run", "debian-python:e2e", "--", "true")
    assert "ImageStreaming engaged for debian-python:e2e" in result.stderr


def test_fallback_full_pull_when_the_node_cannot_stream(pushed, debian_rootfs, stack_home) -> None:  # type: ignore[no-untyped-def]
    result = run_cli("run", "debian-python:e2e", "--", "python3", "-c", "import sqlite3; print('pulled ok')",
                     env={"IMAGESTREAM_STREAMING": "off"})
    assert result.stdout.strip() == "pulled ok"
    assert "streaming not engaged for debian-python:e2e: streaming is turned off on this node" in result.stderr
    pulled = [p for p in (stack_home / "pulled").iterdir() if not p.name.startswith(".")]
    assert len(pulled) == 1
    assert snapshot(pulled[0]) == snapshot(debian_rootfs)  # the full pull wrote the tree exactly


def test_fallback_for_an_image_pushed_without_streaming(stack, debian_image) -> None:  # type: ignore[no-untyped-def]
    run_cli("push", "-q", "--no-streaming", str(debian_image), "debian-python:nostream")
    result = run_cli("run", "debian-python:nostream", "--", "python3", "-c", "print(6 * 7)")
    assert result.stdout.strip() == "42"
    assert "streaming not engaged for debian-python:nostream: the image was pushed with streaming disabled" in result.stderr
