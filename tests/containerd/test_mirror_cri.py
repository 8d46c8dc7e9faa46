"""Pull-through conversion seen from containerd's CRI path (the kubelet's pull), with the snapshotter of the
stack: the first pull of a never-seen image at the regional endpoint falls back to a normal pull (the
upstream's layer streamed through the endpoint, unpacked), and once converted the same reference pulls
streamable: manifest and config only, its layer never fetched, and `ctr run` reads on demand."""

from __future__ import annotations

import json

import pytest

from tests.containerd.conftest import needs_containerd, registry_host
from tests.containerd.test_ctr_run import PROGRAM, content_digests, status
from tests.registry.conftest import PASSWORD, USER, needs_registry, upload_layout
from tests.registry.test_mirror import metric, wait_for_state

pytestmark = [pytest.mark.services, needs_containerd, needs_registry]


def _forget(containerd, repository: str, image_ref: str) -> None:  # type: ignore[no-untyped-def]
    """Remove the image from containerd's k8s.io namespace, with its content and snapshots (a node that
    never pulled it)."""
    names = [n for n in containerd.ctr("images", "ls", "-q", namespace="k8s.io").stdout.split()
             if repository in n or n == image_ref]
    if names:
        containerd.ctr("images", "rm", "--sync", *names, namespace="k8s.io")


def test_a_never_seen_image_falls_back_then_streams(containerd, mirrored_upstream, debian_image) -> None:  # type: ignore[no-untyped-def]
    from imagestream.rpc.client import node_status
    from imagestream_dev.stack import local
    from snapshotter.cri import pull

    with mirrored_upstream.client((USER, PASSWORD)) as client:
        manifest = upload_layout(client, "team/debian", "py", debian_image)
    layer = manifest["layers"][0]["digest"]
    ref = f"{registry_host()}/hub/team/debian:py"
    local.empty_caches()
    before, fallbacks = status(), metric("imagestream_mirror_fallback_pulls_total")
    proxied = metric("imagestream_mirror_proxied_bytes_total")

    # first pull: the endpoint has never seen it: the upstream's manifest, its layer streamed through
    image_ref = pull(containerd.socket, ref)
    assert metric("imagestream_mirror_fallback_pulls_total") >= fallbacks + 1
    assert layer in content_digests(containerd, "k8s.io")  # pulled the normal way
    assert status()["streamed_layers"] == before["streamed_layers"]
    assert metric("imagestream_mirror_proxied_bytes_total") - proxied >= manifest["layers"][0]["size"]
    fallback_run = containerd.ctr("run", "--rm", "--snapshotter", "imagestream", ref, "mirror-fallback", "python3",
                                  "-c", PROGRAM, namespace="k8s.io")
    assert json.loads(fallback_run.stdout)["h"] == "2d711642"

    wait_for_state("hub/team/debian:py", "ready", timeout=600)
    _forget(containerd, "hub/team/debian", image_ref)
    assert layer not in content_digests(containerd, "k8s.io")
    local.empty_caches()  # a cold node

    # converted: the same reference pulls streamable, its layer blob never fetched from anywhere
    proxied, streamed = metric("imagestream_mirror_proxied_bytes_total"), status()["streamed_layers"]
    pull(containerd.socket, ref)
    held = content_digests(containerd, "k8s.io")
    assert layer not in held
    assert status()["streamed_layers"] == streamed + 1
    assert metric("imagestream_mirror_proxied_bytes_total") == proxied  # manifest and config are the store's
    node = node_status()
    result = containerd.ctr("run", "--rm", "--snapshotter", "imagestream", ref, "mirror-streamed", "python3", "-c",
                            PROGRAM, namespace="k8s.io")
    assert json.loads(result.stdout) == {"sqlite": "3.40.1", "h": "2d711642"}
    assert node_status().blocking_fetches > node.blocking_fetches  # read on demand while it ran
