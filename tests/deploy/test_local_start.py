"""The Tiltfile's local branch, run by Tilt itself (`tilt ci -- --mode=local`): each resource's cmd, then
its serve_cmd with its serve_env, polled with its readiness probe until ready, in order; then the smoke test.

Slow (a Cassandra node starts) and it needs the local stack's parts (redis-server, Java, Cassandra's jars):
marked `services`, like the other tests on the real stack. It runs on ports and a home of its own, beside
the session's stack and a developer's.
"""

from __future__ import annotations

import os
import pathlib
import statistics
import sys
import threading
import time

import pytest

from tests.conftest import CACHE, have_fuse
from tests.deploy.manifests import OVERLAYS, Workload, annotation, quantity, render
from tests.deploy.tilt_ci import tilt_binary, tilt_ci

ROOT = pathlib.Path(__file__).resolve().parents[2]
# the session's stack uses IMAGESTREAM_TEST_PORT_BASE (20100) and up, a developer's the defaults
PORT_BASE = int(os.environ.get("IMAGESTREAM_TEST_PORT_BASE", "20100")) + 200


def _rss_bytes(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _processes_with(home: pathlib.Path, module: str) -> list[int]:
    """Pids of `python -m MODULE` processes whose IMAGESTREAM_HOME is `home` (the ones Tilt started)."""
    found = []
    for proc in pathlib.Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if module.encode() in argv and f"IMAGESTREAM_HOME={home}".encode() in environ:
            found.append(int(proc.name))
    return found


@pytest.mark.services
@pytest.mark.timeout(1500)
def test_local_branch_starts_every_process_and_the_smoke_test_passes(tmp_path: pathlib.Path) -> None:
    """`tilt ci -- --mode=local`: every local_resource's cmd, then its serve_cmd until its readiness probe
    passes, in order, then the smoke test; rc 0 only if all of that worked."""
    from imagestream_dev.stack import local

    tilt_binary()
    if not have_fuse():
        pytest.skip("the smoke test mounts and chroots: needs /dev/fuse and root")
    from imagestream_dev import imagebuild

    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGESTREAM_", "TILT_"))}
    env.update(local.private_env(home, CACHE, port_base=PORT_BASE))
    env.update({"PYTHON": sys.executable, "IMAGESTREAM_NODE_MEMORY_BYTES": "64MiB",
                "SMOKE_IMAGE": str(imagebuild.build_debian_python(CACHE, CACHE / "images", fmt="oci"))})
    # the node cache at rest stays within the overhead the node agent's manifests reserve beyond its chunks
    rss: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(1):
            for pid in _processes_with(home, "node_cache"):
                try:
                    rss.append(_rss_bytes(pid))
                except (OSError, AssertionError):  # it exited meanwhile
                    pass

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.monotonic()
    try:
        result = tilt_ci(env, tmp_path / "tilt-home", PORT_BASE + 90, ["--mode=local"], timeout_s=1200)
    finally:
        stop.set()
        watcher.join()
    print(f"tilt ci (local) in {time.monotonic() - started:.1f} s")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "smoke-test: ok (local)" in result.stdout + result.stderr
    assert rss, "never saw the node cache Tilt started"
    typical = statistics.median(rss)
    print(f"node cache while Tilt ran: {typical / 2**20:.1f} MiB RSS (median), {max(rss) / 2**20:.1f} at most")
    for overlay in OVERLAYS:
        (agent,) = [Workload(d) for d in render(overlay) if d["kind"] == "DaemonSet"]
        overhead = quantity(annotation(agent.obj, "imagestream.dev/node-cache-memory-overhead"))
        assert typical < overhead / 2, (overlay, typical, overhead)
