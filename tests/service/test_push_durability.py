"""`push` publishes last and leaves no spool behind, whatever ends it."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import time

import pytest

from tests.conftest import as_foreground_job, run_cli


def _small_layout(tmp_path: pathlib.Path, name: str = "image", size: int = 300_000) -> pathlib.Path:
    from imagestream_dev import imagebuild

    return imagebuild.layout_of_files({"data/file": os.urandom(size)}, tmp_path / name, tmp_path)


def _spools(tmpdir: pathlib.Path) -> list[pathlib.Path]:
    return sorted(tmpdir.glob("imagestream-push-*"))


def _published(name: str) -> bool:
    return name in run_cli("images").stdout.split()


def test_a_push_failing_at_its_manifest_publishes_no_name_and_removes_its_spool(stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import hashlib

    layout = _small_layout(tmp_path)
    index = json.loads((layout / "index.json").read_text())
    old = index["manifests"][0]["digest"]
    manifest = json.loads((layout / "blobs/sha256" / old[7:]).read_text())
    manifest["mediaType"] = "text/plain"  # the regional store refuses it, after every chunk is uploaded
    content = json.dumps(manifest).encode()
    digest = "sha256:" + hashlib.sha256(content).hexdigest()
    (layout / "blobs/sha256" / digest[7:]).write_bytes(content)
    index["manifests"][0].update(digest=digest, size=len(content))
    (layout / "index.json").write_text(json.dumps(index))
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()

    result = run_cli("push", "-q", str(layout), "durable/text-plain", check=False, env={"TMPDIR": str(tmpdir)})
    assert result.returncode != 0
    assert "text/plain" in result.stderr
    assert not _published("durable/text-plain")
    assert _spools(tmpdir) == []


def _push_in_background(source: pathlib.Path, name: str, tmpdir: pathlib.Path) -> subprocess.Popen:
    return subprocess.Popen(["imagestream", "push", "-q", str(source), name], env={**os.environ, "TMPDIR": str(tmpdir)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=as_foreground_job)


def _wait_for_spooled_chunks(proc: subprocess.Popen, tmpdir: pathlib.Path, count: int = 20) -> pathlib.Path:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        spools = _spools(tmpdir)
        if spools and sum(1 for _ in spools[0].iterdir()) >= count:
            return spools[0]
        time.sleep(0.05)
    raise AssertionError("the push never spooled anything")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_push_stopped_by_a_signal_removes_its_spool_and_publishes_nothing(stack, debian_image, tmp_path, sig) -> None:  # type: ignore[no-untyped-def]
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    name = f"durable/stopped-{sig.name.lower()}"
    proc = _push_in_background(debian_image, name, tmpdir)
    _wait_for_spooled_chunks(proc, tmpdir)
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert _spools(tmpdir) == []
    assert not _published(name)


def test_the_spool_of_a_killed_push_is_removed_by_the_next_push(stack, debian_image, tmp_path) -> None:  # type: ignore[no-untyped-def]
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    proc = _push_in_background(debian_image, "durable/killed", tmpdir)
    left = _wait_for_spooled_chunks(proc, tmpdir)
    proc.kill()
    proc.wait(timeout=30)
    assert left.exists() and (left / "owner").read_text().split()[0] == str(proc.pid)
    # a spool whose owner still runs is another push's, and stays
    live = tmpdir / "imagestream-push-live"
    live.mkdir()
    start = pathlib.Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19]
    (live / "owner").write_text(f"{os.getpid()} {start}\n")

    result = run_cli("push", "-q", str(_small_layout(tmp_path)), "durable/after-kill", env={"TMPDIR": str(tmpdir)})
    assert result.returncode == 0
    assert _spools(tmpdir) == [live]
    assert not _published("durable/killed")
    assert _published("durable/after-kill")
