"""Real containers (containerd + runc from Debian, a private daemon) from images served by the regional tier.

* the streamed Debian + python3 image, pulled the way the kubelet pulls (CRI): manifest and config only,
  its layer never fetched; `ctr run` starts on the image's FUSE mount while the node fetches on demand;
* the same image pushed with --no-streaming, pulled with `ctr images pull`: layers fetched and unpacked,
  run through the same snapshotter by its overlay fallback.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.containerd.conftest import needs_containerd, registry_host

pytestmark = [pytest.mark.services, needs_containerd]

PROGRAM = ("import json, sqlite3, hashlib; db = sqlite3.connect(':memory:'); "
           "print(json.dumps({'sqlite': sqlite3.sqlite_version, 'h': hashlib.sha256(b'x').hexdigest()[:8]}))")


def status() -> dict:
    from imagestream import config

    return json.loads((config.snapshotter_root() / "status.json").read_text())


def metric(name: str) -> float:
    """A sample of the snapshotter's Prometheus endpoint."""
    import os
    import urllib.request

    with urllib.request.urlopen(f"http://{os.environ['IMAGESTREAM_SNAPSHOTTER_METRICS']}/metrics") as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} is not exported")


def content_digests(containerd, namespace: str) -> set[str]:  # type: ignore[no-untyped-def]
    return {line.split()[0] for line in containerd.ctr("content", "ls", "-q", namespace=namespace).stdout.split("\n")
            if line.strip()}


def layer_digest(image: str) -> str:
    import urllib.request

    repository, tag = image.split(":")
    with urllib.request.urlopen(f"http://{registry_host()}/v2/{repository}/manifests/{tag}") as r:
        return json.load(r)["layers"][0]["digest"]


def test_streamed_image_runs_without_being_pulled(containerd, pushed_images) -> None:  # type: ignore[no-untyped-def]
    from imagestream.rpc.client import node_status
    from imagestream_dev.stack import local
    from snapshotter.cri import pull

    local.empty_caches()  # a cold node: nothing of the image on it
    image = pushed_images["streamed"]
    ref = f"{registry_host()}/{image}"
    before = status()
    pull(containerd.socket, ref)
    # manifest and config fetched, the layer blob not: the snapshotter committed the layer itself
    held = content_digests(containerd, "k8s.io")
    assert layer_digest(image) not in held and len(held) == 2
    assert status()["streamed_layers"] == before["streamed_layers"] + 1
    assert status()["image_mounts"] == before["image_mounts"] + 1  # attached at pull time
    node = node_status()
    disk_before = next(t for t in node.tiers if t.tier == "node disk").size_bytes
    assert disk_before < 10 << 20  # the 160 MB image is not on the node

    started = time.monotonic()
    result = containerd.ctr("run", "--rm", "--snapshotter", "imagestream", ref, "streamed-1", "python3", "-c", PROGRAM,
                            namespace="k8s.io")
    seconds = time.monotonic() - started
    assert json.loads(result.stdout) == {"sqlite": "3.40.1", "h": "2d711642"}
    after = node_status()
    assert after.blocking_fetches > node.blocking_fetches  # read on demand while it ran
    assert status()["streamed_snapshots"] == before["streamed_snapshots"] + 1
    assert status()["image_mounts"] == before["image_mounts"] + 1  # the run mounted nothing
    assert metric("imagestream_snapshotter_streamed_layers_total") == status()["streamed_layers"] >= 1
    print(f"streamed: ctr run to output in {seconds:.2f} s")


def test_two_containers_on_one_image_are_served_by_one_fuse_client(containerd, pushed_images) -> None:  # type: ignore[no-untyped-def]
    import subprocess

    from fuse_client import attach
    from imagestream import config
    from imagestream_dev.stack import local
    from snapshotter.cri import pull

    ref = f"{registry_host()}/{pushed_images['streamed']}"
    pull(containerd.socket, ref)
    program = "import time; print('up', flush=True); time.sleep(3)"
    running = [subprocess.Popen(["ctr", "--address", containerd.socket, "--namespace", "k8s.io", "run", "--rm",
                                 "--snapshotter", "imagestream", ref, f"pair-{i}", "python3", "-c", program],
                                stdout=subprocess.PIPE, text=True) for i in (1, 2)]
    try:
        assert [p.stdout.readline().strip() for p in running] == ["up", "up"]  # both run at once
        attached, mountpoint, pid = attach.attachments()
        assert [a.image for a in attached].count(pushed_images["streamed"]) == 1
        assert pid == local.running_pid("fuse_client") and mountpoint == str(config.fuse_mountpoint())
        with open("/proc/self/mountinfo") as f:  # and no FUSE mount of our node but its one
            ours = [line.split()[4] for line in f if str(config.home()) in line.split()[4]
                    and line.split()[line.split().index("-") + 1] == "fuse.imagestream"]
        assert ours == [mountpoint]
    finally:
        assert [p.wait(60) for p in running] == [0, 0]


def test_unstreamable_image_runs_by_the_fallback(containerd, pushed_images) -> None:  # type: ignore[no-untyped-def]
    image = pushed_images["plain"]
    ref = f"{registry_host()}/{image}"
    before = status()
    containerd.ctr("images", "pull", "--plain-http", "--snapshotter", "imagestream", ref, namespace="plain")
    assert layer_digest(image) in content_digests(containerd, "plain")  # pulled the normal way
    result = containerd.ctr("run", "--rm", "--snapshotter", "imagestream", ref, "plain-1", "python3", "-c", PROGRAM,
                            namespace="plain")
    assert json.loads(result.stdout) == {"sqlite": "3.40.1", "h": "2d711642"}
    after = status()
    assert after["streamed_layers"] == before["streamed_layers"]
    assert after["plain_snapshots"] >= before["plain_snapshots"] + 2  # the unpacked layer and the container
    assert after["image_mounts"] == before["image_mounts"]


def test_streamable_image_also_pulls_the_normal_way(containerd, pushed_images) -> None:  # type: ignore[no-untyped-def]
    """`ctr images pull` (containerd 1.6) fetches every blob and unpacks without the snapshot labels: the
    streamable image is then pulled in full from the regional tier and still runs."""
    image = pushed_images["streamed"]
    ref = f"{registry_host()}/{image}"
    containerd.ctr("images", "pull", "--plain-http", "--snapshotter", "imagestream", ref, namespace="full")
    assert layer_digest(image) in content_digests(containerd, "full")
    result = containerd.ctr("run", "--rm", "--snapshotter", "imagestream", ref, "full-1", "python3", "-c", PROGRAM,
                            namespace="full")
    assert json.loads(result.stdout)["h"] == "2d711642"
