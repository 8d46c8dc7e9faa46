"""A node cache restarted (or killed) mid-download resumes its downloads and pins; dead mounts are not reported as streaming.

Real stack and real FUSE mounts.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from fuse_client import mounts
from imagestream import config
from imagestream.proc import alive
from imagestream.rpc.client import node_status
from imagestream_dev.stack import local

from tests.conftest import needs_fuse, run_cli
from tests.service.test_streaming_node import big_image, download_of, restart_node, wait_until

pytestmark = [pytest.mark.services, needs_fuse]


def _state_file():  # type: ignore[no-untyped-def]
    return config.node_disk_dir() / "downloads.json"


def _kill_node() -> None:
    pid = local.running_pid("node_cache")
    assert pid is not None
    os.killpg(pid, signal.SIGKILL)
    os.waitpid(pid, 0)  # the stack started it from this process: reap it


def _node_log() -> str:
    return (config.home() / "logs" / "node_cache.log").read_text(errors="replace")


def test_a_killed_node_cache_resumes_the_download_and_the_pins_of_a_live_mount(stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    image, data = big_image(tmp_path, 40)
    run_cli("push", "-q", str(image), "durable/resume")
    local.empty_caches()
    restart_node(IMAGESTREAM_NODE_BACKGROUND_BANDWIDTH="2MiB")  # 40 MB take ~20 s
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        m = mounts.mount("durable/resume", mnt)
        before = wait_until(lambda: (d := download_of(mnt)) and d.chunks_local >= 2 and d, what="the download to start")
        assert not before.done
        recorded = json.loads(_state_file().read_text())["downloads"]
        assert [e["mount_id"] for e in recorded] == [m.download_id]

        _kill_node()  # no goodbye: only the state file remembers
        restart_node()  # full speed now
        # nobody sends StartDownload again: the node resumes on its own
        after = wait_until(lambda: (d := download_of(mnt)) and d.done and d, timeout=120, what="the resumed download")
        assert after.chunks_total == before.chunks_total
        assert node_status().pinned_chunks == after.chunks_total + 1  # and the index
        assert "resumed 1 background downloads" in _node_log()
        with open(mnt / "big.bin", "rb") as f:
            assert f.read() == data
    finally:
        mounts.unmount(mnt)
    wait_until(lambda: node_status().pinned_chunks == 0, timeout=10, what="the pins to go with the mount")
    # the node writes its state file behind the RPC that changed it
    wait_until(lambda: json.loads(_state_file().read_text())["downloads"] == [], timeout=10,
               what="the state file to forget the download")


@pytest.mark.parametrize("content", [
    b"\x00\xff\xfe not json at all",
    b'{"version": 1, "downloads": {"not": "a list"}}',
    b'[' * 100_000,
    json.dumps({"version": 1, "downloads": [
        {"mount_id": "x" * 100_000, "image": "a", "index": ["0" * 64, 1], "first": [], "owner": None},
        {"mount_id": "1:/m", "image": "../../etc", "index": ["0" * 64, 1], "first": [], "owner": None},
        {"mount_id": "1:/m", "image": "a", "index": ["ZZ", -1], "first": [], "owner": None},
        {"mount_id": "1:/m", "image": "a", "index": ["0" * 64, 1], "first": [["0" * 64, 1]] * 3, "owner": [1, "x"]},
        "just a string",
    ]}).encode(),
], ids=["garbage", "wrong-shape", "deep-nesting", "hostile-entries"])
def test_a_corrupt_or_hostile_state_file_is_reported_and_ignored(stack, content) -> None:  # type: ignore[no-untyped-def]
    local.down(print, "node_cache")
    _state_file().parent.mkdir(parents=True, exist_ok=True)
    _state_file().write_bytes(content)
    log_size = len(_node_log())
    local.up(print, "node_cache")  # waits until it is SERVING
    said = _node_log()[log_size:]
    assert "node state file" in said and "ignored" in said and "Traceback" not in said
    assert node_status().downloads == [] and node_status().pinned_chunks == 0


def test_a_mount_whose_process_died_while_the_node_was_down_is_not_resumed(stack) -> None:  # type: ignore[no-untyped-def]
    local.down(print, "node_cache")
    # a pid that ran and is gone: its start time cannot match any process now running
    gone = [os.getpid(), "1"]
    _state_file().write_text(json.dumps({"version": 1, "downloads": [
        {"mount_id": f"{gone[0]}:/nowhere", "image": "durable/resume", "index": ["a" * 64, 10], "first": [],
         "owner": gone}]}))
    local.up(print, "node_cache")
    assert node_status().downloads == [] and node_status().pinned_chunks == 0
    assert "ended while the node cache was down" in _node_log()
    assert json.loads(_state_file().read_text())["downloads"] == []


def test_a_killed_fuse_client_is_never_reported_as_streaming(stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    image, _ = big_image(tmp_path, 8)
    run_cli("push", "-q", str(image), "durable/killed-fuse")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounts.mount("durable/killed-fuse", mnt)
    try:
        wait_until(lambda: (d := download_of(mnt)) and d.done, what="the download")
        assert "ImageStreaming engaged" in run_cli("status").stdout
        pid = local.running_pid("fuse_client")
        os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert not alive(pid)
        assert "ImageStreaming engaged" not in run_cli("status").stdout
    finally:
        mounts.unmount(mnt)
        local.up(print, "fuse_client")
    assert not mounts.is_mountpoint(mnt)
