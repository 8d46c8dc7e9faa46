"""Fixtures of the snapshotter tests: the stack's snapshotter (a process of the local stack), the images
pushed for it, a gRPC client of containerd's snapshots API, and a private containerd daemon."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import pathlib

import grpc
import pytest

from tests.conftest import have_fuse, run_cli

needs_containerd = pytest.mark.skipif(
    not (have_fuse() and shutil.which("containerd") and shutil.which("ctr") and shutil.which("runc")),
    reason="needs containerd, ctr and runc (Debian packages containerd, runc), /dev/fuse and root")

STREAMED = "debian-python:ctrd"
PLAIN = "debian-plain:ctrd"


@pytest.fixture(scope="session")
def pushed_images(stack, debian_image):  # type: ignore[no-untyped-def]
    """The Debian + python3 image twice: streamable, and pushed with --no-streaming."""
    out = run_cli("push", "--quiet", str(debian_image), STREAMED).stdout
    assert "manifest sha256:" in out
    run_cli("push", "--quiet", "--no-streaming", str(debian_image), PLAIN)
    return {"streamed": STREAMED, "plain": PLAIN}


@pytest.fixture
def snapshots(stack):  # type: ignore[no-untyped-def]
    """A client of the stack's snapshotter (containerd's snapshots API on its Unix socket)."""
    from containerd.services.snapshots.v1 import snapshots_pb2_grpc
    from imagestream import config

    with grpc.insecure_channel("unix:" + config.snapshotter_socket()) as channel:
        yield snapshots_pb2_grpc.SnapshotsStub(channel)


def registry_host() -> str:
    return os.environ["IMAGESTREAM_DISTRIBUTION_LISTEN"]


@pytest.fixture(scope="module")
def containerd(stack):  # type: ignore[no-untyped-def]
    """A private containerd (own config, root, state, socket) with the stack's snapshotter as a proxy plugin."""
    from imagestream import config
    from snapshotter.containerd_local import PrivateContainerd

    daemon = PrivateContainerd(pathlib.Path(tempfile.mkdtemp(prefix="imagestream-containerd-")),
                               config.snapshotter_socket(), (registry_host(),))
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.remove()


def fuse_mounts_under(path: pathlib.Path) -> list[tuple[str, str]]:
    """(mount point, fs type) of every mount below path."""
    with open("/proc/self/mountinfo") as f:
        rows = [line.split() for line in f]
    out = []
    for r in rows:
        if r[4].startswith(str(path)):
            out.append((r[4], r[r.index("-") + 1]))
    return out


def snapshotter_restart() -> None:
    from imagestream_dev.stack import local

    local.down(lambda _: None, only="snapshotter")
    local.up(lambda _: None, only="snapshotter")


def kill(pid: int) -> None:
    subprocess.run(["kill", "-9", str(pid)], check=False)
