"""The Tiltfile's local branch, run for real the way Tilt runs it: each resource's cmd, then its serve_cmd
with its serve_env, polled with its readiness probe until ready, in order; then the smoke test.

Slow (a Cassandra node starts) and it needs the local stack's parts (redis-server, Java, Cassandra's jars):
marked `services`, like the other tests on the real stack. It runs on ports and a home of its own, beside
the session's stack and a developer's.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import CACHE, have_fuse
from tests.deploy.manifests import OVERLAYS, Workload, annotation, quantity, render
from tests.deploy.tilt import Tilt

ROOT = pathlib.Path(__file__).resolve().parents[2]
PORT_BASE = 20300  # the session's stack uses 20100, a developer's the defaults


def _rss_bytes(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _wait_ready(resource: dict, process: subprocess.Popen, env: dict[str, str], log: pathlib.Path,
                timeout_s: float = 300) -> float:
    probe = resource["readiness_probe"]
    started = time.monotonic()
    while True:
        try:
            checked = subprocess.run(probe["exec"]["command"], env=env, cwd=ROOT, capture_output=True,
                                     timeout=probe["timeout_secs"])
            if checked.returncode == 0:
                return time.monotonic() - started
        except subprocess.TimeoutExpired:
            pass
        if process.poll() is not None:
            pytest.fail(f"{resource['name']} exited {process.returncode} before it was ready:\n{log.read_text()[-3000:]}")
        if time.monotonic() - started > timeout_s:
            pytest.fail(f"{resource['name']} not ready after {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(min(probe["period_secs"], 1))


@pytest.mark.services
@pytest.mark.timeout(900)
def test_local_branch_starts_every_process_and_the_smoke_test_passes(tmp_path: pathlib.Path) -> None:
    from imagestream_dev.stack import local

    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGESTREAM_", "TILT_"))}
    env.update(local.private_env(tmp_path / "home", CACHE, port_base=PORT_BASE))
    env.update({"PYTHON": sys.executable, "IMAGESTREAM_NODE_MEMORY_BYTES": "64MiB"})
    tilt = Tilt(ROOT / "Tiltfile", k8s_context="", env=env).evaluate()
    resources = [r for r in tilt.called("local_resource") if r["serve_cmd"]]

    running: list[tuple[dict, subprocess.Popen]] = []
    ready_after = {}
    try:
        for resource in resources:
            prepared = subprocess.run(resource["cmd"], env={**env, **resource["env"]}, cwd=ROOT, capture_output=True,
                                      text=True, timeout=600)
            assert prepared.returncode == 0, f"{resource['name']}: {prepared.stdout}{prepared.stderr}"
            log = tmp_path / f"{resource['name']}.log"
            with open(log, "wb") as out:
                process = subprocess.Popen(resource["serve_cmd"], env={**env, **resource["serve_env"]}, cwd=ROOT,
                                           stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           start_new_session=True)
            running.append((resource, process))
            ready_after[resource["name"]] = _wait_ready(resource, process, env, log)
        print("ready after (s):", {k: round(v, 1) for k, v in ready_after.items()})

        # the node cache at rest stays within the overhead the node agent's manifests reserve beyond its chunks
        (node_cache,) = [p for r, p in running if r["name"] == "node-cache"]
        print(f"node cache at rest: {_rss_bytes(node_cache.pid) / 2**20:.1f} MiB RSS")
        for overlay in OVERLAYS:
            (agent,) = [Workload(d) for d in render(overlay) if d["kind"] == "DaemonSet"]
            overhead = quantity(annotation(agent.obj, "imagestream.dev/node-cache-memory-overhead"))
            assert _rss_bytes(node_cache.pid) < overhead / 2, (overlay, _rss_bytes(node_cache.pid), overhead)

        (smoke,) = [r for r in tilt.called("local_resource") if r["name"] == "smoke-test"]
        if not have_fuse():
            pytest.skip("the smoke test mounts and chroots: needs /dev/fuse and root")
        from imagestream_dev import imagebuild

        image = imagebuild.build_debian_python(CACHE, CACHE / "images", fmt="oci")
        smoked = subprocess.run(smoke["cmd"], env={**env, **smoke["env"], "SMOKE_IMAGE": str(image)}, cwd=ROOT,
                                capture_output=True, text=True, timeout=600)
        assert smoked.returncode == 0, smoked.stdout + smoked.stderr
        assert "smoke-test: ok (local)" in smoked.stdout
    finally:
        for resource, process in reversed(running):
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            except ProcessLookupError:
                pass
