"""Pull-through conversion seen from containerd's CRI path (the kubelet's pull), with the snapshotter of the
stack: the first pull of a never-seen image at the regional endpoint falls back to a normal pull (the
upstream's layer streamed through the endpoint, unpacked), and once converted the same reference pulls
streamable: manifest and config only, its layer never fetched, and `ctr run` reads on demand."""

from __future__ import annotations

import json
import os

import pytest

from tests.containerd.conftest import needs_containerd, registry_host
from tests.containerd.test_ctr_run import PROGRAM, content_digests, status
from imagestream.oci import MEDIA_LAYER
from tests.registry.conftest import PASSWORD, USER, layer, needs_registry, upload_layout
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

    # the Debian image, whose layer other tests' pulls may have put in containerd's content store already,
    # and a layer of its own that only this upstream has
    own, own_id = layer({"etc/mirror-id": os.urandom(16).hex().encode(), "opt/data": os.urandom(2 << 20)}, "gzip")
    with mirrored_upstream.client((USER, PASSWORD)) as client:
        manifest = upload_layout(client, "team/debian", "py", debian_image, [(own, own_id, MEDIA_LAYER["gzip"])])
    top = manifest["layers"][-1]["digest"]
    ref = f"{registry_host()}/hub/team/debian:py"
    local.empty_caches()
    before, fallbacks = status(), metric("imagestream_mirror_fallback_pulls_total")
    proxied = metric("imagestream_mirror_proxied_bytes_total")

    # first pull: the endpoint has never seen it: the upstream's manifest, its layer streamed through
    image_ref = pull(containerd.socket, ref)
    assert metric("imagestream_mirror_fallback_pulls_total") >= fallbacks + 1
    assert top in content_digests(containerd, "k8s.io")  # pulled the normal way, through the endpoint
    assert status()["streamed_layers"] == before["streamed_layers"]
    assert metric("imagestream_mirror_proxied_bytes_total") - proxied >= len(own)
    fallback_run = containerd.ctr("run", "--rm", "--snapshotter", "imagestream", ref, "mirror-fallback", "python3",
                                  "-c", PROGRAM, namespace="k8s.io")
    assert json.loads(fallback_run.stdout)["h"] == "2d711642"

    wait_for_state("hub/team/debian:py", "ready", timeout=600)
    _forget(containerd, "hub/team/debian", image_ref)
    assert top not in content_digests(containerd, "k8s.io")
    local.empty_caches()  # a cold node

    # converted: the same reference pulls streamable, its layer blob never fetched from anywhere
    proxied, was = metric("imagestream_mirror_proxied_bytes_total"), status()
    pull(containerd.socket, ref)
    held = content_digests(containerd, "k8s.io")
    assert not {x["digest"] for x in manifest["layers"]} & held
    # the top layer at least (the Debian layer's snapshot may be there already, from another test's image)
    assert status()["streamed_layers"] > was["streamed_layers"]
    assert status()["image_mounts"] == was["image_mounts"] + 1  # attached at pull time
    assert metric("imagestream_mirror_proxied_bytes_total") == proxied  # manifest and config are the store's
    node = node_status()
    result = containerd.ctr("run", "--rm", "--snapshotter", "imagestream", ref, "mirror-streamed", "python3", "-c",
                            PROGRAM, namespace="k8s.io")
    assert json.loads(result.stdout) == {"sqlite": "3.40.1", "h": "2d711642"}
    assert node_status().blocking_fetches > node.blocking_fetches  # read on demand while it ran
