"""The snapshotter's spans in the stack's real Zipkin: pulling a streamed image through containerd's CRI (as the
kubelet does) is one trace from containerd's Prepare of the layer, through the image's attach in the node's FUSE
client, down the tiers; the container's Prepare is a span that names the streamed image."""

from __future__ import annotations

import time

import pytest

from tests.containerd.conftest import needs_containerd, registry_host
from tests.service.test_tracing import arrived, check_links, services, zipkin

pytestmark = [pytest.mark.services, needs_containerd]

PREPARE = "/containerd.services.snapshots.v1.snapshots/prepare"


def forget_layers(snapshots, image: str) -> None:  # type: ignore[no-untyped-def]
    """The snapshotter holds no layer of `image` any more (a node that never pulled it): the streamed layers,
    and whatever sits on them, removed through the snapshots API, children first. The image is then detached."""
    from containerd.services.snapshots.v1 import snapshots_pb2
    from imagestream.snapshot_labels import LABEL_IMAGE

    infos = [i for reply in snapshots.List(snapshots_pb2.ListSnapshotsRequest(snapshotter="imagestream"))
             for i in reply.info]
    # every streamed layer, whatever name it was pulled under: containerd finds a layer by its chain, so a
    # layer another test pulled under another name would be used again with no Prepare (and no trace)
    doomed = {i.name for i in infos if LABEL_IMAGE in i.labels}
    while True:
        grown = doomed | {i.name for i in infos if i.parent in doomed}
        if grown == doomed:
            break
        doomed = grown
    parents = {i.name: i.parent for i in infos}
    while doomed:
        leaves = [k for k in doomed if not any(parents.get(c) == k for c in doomed)]
        for key in leaves:
            snapshots.Remove(snapshots_pb2.RemoveSnapshotRequest(snapshotter="imagestream", key=key))
            doomed.discard(key)


def snapshotter_traces(since_ms: int, want, timeout: float = 60.0) -> list:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        now = int(time.time() * 1000)
        traces = zipkin(f"/api/v2/traces?serviceName=snapshotter&limit=1000&endTs={now + 1000}"
                        f"&lookback={now - since_ms + 1000}")
        if want(traces) or time.monotonic() > deadline:
            return traces
        time.sleep(0.5)


def pull_trace(traces: list) -> list | None:  # type: ignore[type-arg]
    """The trace of the layer's Prepare that streamed the layer and attached the image."""
    for trace in traces:
        names = {(s["localEndpoint"]["serviceName"], s["name"].lower()) for s in trace}
        if {("snapshotter", "stream layer"), ("snapshotter", "attach image")} <= names:
            return trace
    return None


def test_a_streamed_pull_is_one_trace_from_the_snapshotter_down_the_tiers(containerd, pushed_images, snapshots) -> None:  # type: ignore[no-untyped-def]
    from imagestream_dev.stack import local
    from snapshotter.cri import pull

    image = pushed_images["streamed"]
    ref = f"{registry_host()}/{image}"
    forget_layers(snapshots, image)
    local.empty_caches()  # cold: the attach reads the image's name and index from the regional store
    since = int(time.time() * 1000)
    pull(containerd.socket, ref)
    every_tier = {"snapshotter", "fuse_client", "node_cache", "zonal_cache", "chunk_store"}
    traces = snapshotter_traces(since, lambda ts: (t := pull_trace(ts)) is not None and every_tier <= services(t)
                                and arrived(t))
    trace = pull_trace(traces)
    assert trace is not None, [sorted({s["name"] for s in t}) for t in traces]
    by_id = check_links(trace)
    spans = {s["name"].lower(): s for s in trace if s["localEndpoint"]["serviceName"] == "snapshotter"}
    root = spans[PREPARE]  # containerd's call, as the snapshotter served it
    assert root.get("kind") == "SERVER" and "parentId" not in root
    stream, attach = spans["stream layer"], spans["attach image"]
    assert stream["parentId"] == root["id"] and attach["parentId"] == stream["id"]
    assert stream["tags"]["imagestream.image"] == image and stream["tags"]["imagestream.streamed"] == "true"
    # the attach goes on in the FUSE client (its Attach), which reads the image's index down the tiers
    attach_server = [s for s in trace if s["localEndpoint"]["serviceName"] == "fuse_client" and s.get("kind") == "SERVER"]
    assert attach_server and by_id[attach_server[0]["parentId"]]["parentId"] == attach["id"]
    assert every_tier <= services(trace), sorted(services(trace))

    # the container's snapshot: a Prepare span that says it runs on the streamed image
    since = int(time.time() * 1000)
    result = containerd.ctr("run", "--rm", "--snapshotter", "imagestream", ref, "traced-1", "true", namespace="k8s.io")
    assert result.returncode == 0

    def container_prepare(ts: list) -> list:  # type: ignore[type-arg]
        return [s for t in ts for s in t if s["name"].lower() == PREPARE
                and s.get("tags", {}).get("imagestream.streamed") == "true"]

    found = container_prepare(snapshotter_traces(since, lambda ts: bool(container_prepare(ts))))
    assert found and found[0]["tags"]["imagestream.image"] == image
